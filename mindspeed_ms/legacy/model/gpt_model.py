"""GPT: a decoder-only transformer language model (the guide's GPTModel)."""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.communication import device_target
from mindspeed_ms.core.config.effects import report_device_bound
from mindspeed_ms.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from mindspeed_ms.legacy.model.enums import AttnMaskType
from mindspeed_ms.legacy.model.eos_mask import EosMask
from mindspeed_ms.legacy.model.language_model import get_language_model
from mindspeed_ms.legacy.model.module import Module
from mindspeed_ms.legacy.model.transformer import ParallelLMLogits, _check_architecture
from mindspeed_ms.training.loss_func import LossWithMask

__all__ = ["GPTModel", "post_language_model_processing"]


def post_language_model_processing(parallel_lm_logits, loss_fn, lm_output, labels, logit_weights, parallel_output,
                                   fp16_lm_cross_entropy, loss_mask):
    """Logits from the last hidden states, then the masked loss when labels are given.

    Without labels the logits are returned with the first two axes swapped, as the reference
    does (``(B, S, V)`` hidden layout -> ``(S, B, V)``).

    Raises:
        ValueError: ``fp16_lm_cross_entropy`` with logits that are not float16.
    """
    output = parallel_lm_logits(lm_output, logit_weights, parallel_output)
    if labels is None:
        return output.swapaxes(0, 1)
    if output.shape[:2] != labels.shape[:2]:
        output = output.swapaxes(0, 1)  # SBH layout: logits (S, B, V) -> (B, S, V) to match labels
    if fp16_lm_cross_entropy:
        if output.dtype != ms.float16:
            raise ValueError(f"When fp16_lm_cross_entropy=True, output should be float16, but got {output.dtype}")
        return loss_fn(output, labels, loss_mask)
    return loss_fn(output.astype(ms.float32), labels, loss_mask)


class GPTModel(Module):
    """Generative pre-trained transformer.

    Args:
        config: TransformerConfig.
        num_tokentypes: Token-type embeddings (0: none).
        parallel_output: Keep the logits split over tensor-parallel ranks.
        pre_process: First pipeline stage.
        post_process: Last pipeline stage (logits and loss).
        **kwargs: ``eod`` (end-of-document token id: masks and positions are derived from the
            tokens when not given) and ``reset_position_ids``.

    Inputs:
        - **tokens** (Tensor) - ``(B, S)``.
        - **position_ids** (Tensor) - ``(B, S)`` or None.
        - **attention_mask** (Tensor) - broadcastable to ``(B, 1, S, S)``; nonzero = masked.
        - **loss_mask** (Tensor) - ``(B, S)``.
        - **labels** (Tensor, optional) - ``(B, S)``: with labels the loss is returned.
        - **tokentype_ids** (Tensor, optional).
        - retriever inputs and **inference_params** - not supported.

    Outputs:
        The loss (a scalar) when labels are given, else the logits (see
        :func:`post_language_model_processing`); on other than the last pipeline stage the hidden
        states.
    """

    def __init__(self, config, num_tokentypes=0, parallel_output=True, pre_process=True, post_process=True,
                 **kwargs):
        _check_architecture(config, "GPTModel")
        # a model built directly (notebooks, tests) names its Ascend-only switches too, once
        report_device_bound(config, device_target())
        super().__init__(config,
                         share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights)
        self.parallel_output = parallel_output
        self.pre_process = pre_process
        self.post_process = post_process
        self.untie_embeddings_and_output_weights = bool(config.untie_embeddings_and_output_weights)
        self.fp16_lm_cross_entropy = bool(config.fp16_lm_cross_entropy)
        self.seq_length = config.seq_length
        self.compute_dtype = config.compute_dtype
        self.batch_size = config.dataset_config.batch_size
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        if self.cp_size > 1:
            from mindspeed_ms.core.context_parallel import check_context_parallel_config  # pylint: disable=import-outside-toplevel

            check_context_parallel_config(config, tensor_parallel_size=ps.get_tensor_model_parallel_world_size(),
                                          context_parallel_size=self.cp_size)
        self.eod = kwargs.get("eod")
        self.reset_position_ids = bool(kwargs.get("reset_position_ids", False))
        if self.eod is not None:
            self.eod_mask = EosMask(self.batch_size, config.seq_length, self.eod, self.reset_position_ids)
        self.language_model, _ = get_language_model(config=config, encoder_attn_mask_type=AttnMaskType.causal,
                                                    num_tokentypes=num_tokentypes, pre_process=self.pre_process,
                                                    post_process=self.post_process, add_pooler=False)
        if self.post_process:
            self.parallel_lm_logits = ParallelLMLogits(config=config, bias=False, compute_dtype=config.compute_dtype)
            self.loss = LossWithMask(VocabParallelCrossEntropy())
        if not self.untie_embeddings_and_output_weights:
            self.initialize_word_embeddings()

    def set_input_tensor(self, input_tensor):
        """Hidden states from the previous pipeline stage."""
        self.language_model.set_input_tensor(input_tensor)

    def take_input_tensor(self):
        """The hidden states given by :meth:`set_input_tensor`, cleared from the model (None if unset).

        For a compiled pipeline stage (``training.compilation``): the graph takes its input as an
        argument of :meth:`construct_with_input`, since a tensor held in an attribute would be
        frozen into the graph as a constant.
        """
        held = self.language_model.input_tensor
        self.set_input_tensor(None)
        return held

    def construct_with_input(self, input_tensor, tokens, position_ids, attention_mask, loss_mask,
                             retriever_input_ids=None, retriever_position_ids=None, retriever_attn_mask=None,
                             labels=None, tokentype_ids=None, inference_params=None):
        """:meth:`construct` of a pipeline stage with its input hidden states as the first argument
        (instead of :meth:`set_input_tensor`); ``input_tensor`` is ignored on the first stage."""
        return self._forward(tokens, position_ids, attention_mask, loss_mask, retriever_input_ids,
                             retriever_position_ids, retriever_attn_mask, labels, tokentype_ids, inference_params,
                             None if self.pre_process else input_tensor)

    def construct(self, tokens, position_ids, attention_mask, loss_mask, retriever_input_ids=None,
                  retriever_position_ids=None, retriever_attn_mask=None, labels=None, tokentype_ids=None,
                  inference_params=None):
        return self._forward(tokens, position_ids, attention_mask, loss_mask, retriever_input_ids,
                             retriever_position_ids, retriever_attn_mask, labels, tokentype_ids, inference_params,
                             None)

    def _forward(self, tokens, position_ids, attention_mask, loss_mask, retriever_input_ids, retriever_position_ids,
                 retriever_attn_mask, labels, tokentype_ids, inference_params, input_tensor):
        if (position_ids is None or attention_mask is None) and self.eod is not None and tokens is not None:
            eod_positions, eod_mask = self.eod_mask(tokens)
            position_ids = eod_positions if position_ids is None else position_ids
            attention_mask = eod_mask if attention_mask is None else attention_mask
        if self.cp_size > 1:
            from mindspeed_ms.core.context_parallel import split_batch_for_context_parallel  # pylint: disable=import-outside-toplevel

            tokens, position_ids, attention_mask, loss_mask, labels = split_batch_for_context_parallel(
                tokens, position_ids, attention_mask, loss_mask, labels)
        lm_output = self.language_model(tokens, position_ids, attention_mask, tokentype_ids=tokentype_ids,
                                        retriever_input_ids=retriever_input_ids,
                                        retriever_position_ids=retriever_position_ids,
                                        retriever_attn_mask=retriever_attn_mask, inference_params=inference_params,
                                        enc_hidden_states=input_tensor)
        if not self.post_process:
            return lm_output
        if self.untie_embeddings_and_output_weights:
            logit_weights = self.language_model.output_layer.weight
        else:
            logit_weights = self.shared_embedding_or_output_weight()
        if labels is not None and loss_mask is None:
            loss_mask = Tensor(np.ones(labels.shape, np.float32))
        return post_language_model_processing(self.parallel_lm_logits, self.loss, lm_output, labels, logit_weights,
                                              self.parallel_output, self.fp16_lm_cross_entropy, loss_mask)
