"""The GPT model family: attention, MLP, transformer layers, language model, GPTModel, MoE.

Import paths follow the reference: e.g. ``mindspeed_ms.legacy.model.ParallelAttention`` and
``mindspeed_ms.legacy.model.transformer.ParallelMLP`` both work.
"""

from .enums import AttnMaskType, AttnType, LayerType, ModelType
from .eos_mask import EosMask
from .language_model import Embedding, TransformerLanguageModel, get_language_model
from .module import Module
from .norm import LayerNorm, RMSNorm, get_norm
from .rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb
from .transformer import (CoreAttention, ParallelAttention, ParallelLMLogits, ParallelMLP, ParallelTransformer,
                          ParallelTransformerLayer)
from .gpt_model import GPTModel

__all__ = [
    "AttnMaskType", "AttnType", "LayerType", "ModelType", "EosMask", "Embedding", "TransformerLanguageModel",
    "get_language_model", "Module", "LayerNorm", "RMSNorm", "get_norm", "RotaryEmbedding", "apply_rotary_pos_emb",
    "CoreAttention", "ParallelAttention", "ParallelLMLogits", "ParallelMLP", "ParallelTransformer",
    "ParallelTransformerLayer", "GPTModel",
]
