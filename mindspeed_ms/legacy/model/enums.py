"""Enumerations of the model family (values as in the reference: 1-based integers)."""

import enum

__all__ = ["AttnType", "AttnMaskType", "LayerType", "ModelType"]


class AttnType(enum.IntEnum):
    """Self- or cross-attention."""

    self_attn = 1
    cross_attn = 2


class AttnMaskType(enum.IntEnum):
    """How attention is masked."""

    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4


class LayerType(enum.IntEnum):
    """Transformer layer kinds."""

    encoder = 1
    decoder = 2
    retro_encoder = 3
    retro_decoder = 4
    retro_decoder_with_retriever = 5


class ModelType(enum.IntEnum):
    """Model kinds."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4
