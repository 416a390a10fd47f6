"""Transformer blocks: MLP, attention, layer, the layer stack, and the LM head.

Hidden states flow between layers in the configured data layout (``dataset_config.data_layout``:
BSH, the default, or SBH); with sequence parallelism the sequence dimension is split over the
tensor-parallel ranks outside the attention and MLP blocks. Inside attention, queries, keys and
values are laid out as (batch, heads, sequence, head_dim).
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import Normal

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.communication import device_target
from mindspeed_ms.core.config.recompute import resolve_recompute
from mindspeed_ms.core.config.fields import ConfigValueError
from mindspeed_ms.core.fusions import Gelu, Softmax
from mindspeed_ms.core.precision import add_bias, batch_matmul, matmul, resolve_dtype
from mindspeed_ms.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, dropout,
                                               get_rng_tracker)
from mindspeed_ms.core.tensor_parallel.layers import sequence_dim
from mindspeed_ms.core.tensor_parallel.mappings import CopyToRegion, GatherFromRegion
from mindspeed_ms.core.tensor_parallel.random import MODEL_PARALLEL_RNG
from mindspeed_ms.legacy.model.enums import AttnMaskType, AttnType, LayerType, ModelType
from mindspeed_ms.legacy.model.module import Module
from mindspeed_ms.legacy.model.moe.moe_utils import recomputation as moe_recomputation
from mindspeed_ms.legacy.model.norm import get_norm
from mindspeed_ms.legacy.model.rotary_pos_embedding import apply_rotary_pos_emb

__all__ = [
    "ParallelMLP",
    "CoreAttention",
    "ParallelAttention",
    "ParallelTransformerLayer",
    "ParallelTransformer",
    "ParallelLMLogits",
    "get_num_layers_and_offset",
    "normalize_attention_mask",
]

_MASK_FILL = -10000.0

logger = logging.getLogger("mindspeed_ms")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _check_architecture(config, what):
    """Name the missing required sizes of a TransformerConfig before a layer is built from it."""
    from mindspeed_ms.core.config import TransformerConfig  # pylint: disable=import-outside-toplevel

    if isinstance(config, TransformerConfig):
        config.check_architecture(what)


def _init_method(config):
    method = config.init_method
    if isinstance(method, str) and method.lower() == "normal":
        return Normal(sigma=float(config.init_method_std))
    return method


def _output_init_method(config):
    """Megatron's scaled init for layers that write into the residual stream: std / sqrt(2 L)."""
    method = config.init_method
    if isinstance(method, str) and method.lower() == "normal":
        std = float(config.init_method_std)
        return Normal(sigma=std / math.sqrt(2.0 * max(1, int(config.num_layers))))
    return method


def _num_query_groups(config):
    if config.group_query_attention:
        return int(config.num_query_groups)
    return int(config.num_attention_heads)


def normalize_attention_mask(mask) -> Optional[Tensor]:
    """A boolean mask of rank 4 broadcastable to (B, N, Sq, Sk); True = masked out.

    Accepts (S, S), (B, S, S), (B, 1, S, S) or (B, N, S, S) masks of bool/uint8/int, where nonzero
    means masked (the reference's convention).
    """
    if mask is None:
        return None
    if len(mask.shape) == 2:
        mask = mask.reshape((1, 1) + tuple(mask.shape))
    elif len(mask.shape) == 3:
        mask = ops.expand_dims(mask, 1)
    if mask.dtype != ms.bool_:
        mask = mask != 0
    return mask


def _causal_mask(sq, sk, q_offset=0):
    q = np.arange(sq)[:, None] + q_offset
    k = np.arange(sk)[None, :]
    return Tensor((k > q).reshape(1, 1, sq, sk))


def _activation(name):
    if name in ("gelu",):
        return Gelu("none")
    if name in ("fast_gelu", "gelu_tanh", "openai_gelu"):
        return Gelu("tanh")
    if name in ("relu",):
        return ops.relu
    if name in ("silu", "swish", "swiglu"):
        return ops.silu
    if name == "squared_relu":
        return lambda x: ops.square(ops.relu(x))
    raise ValueError(f"hidden_act must be one of ['gelu', 'fast_gelu', 'relu', 'silu', 'swiglu', 'squared_relu'], "
                     f"got {name!r}")


def get_num_layers_and_offset(config):
    """Layers of this pipeline stage (and virtual chunk) and the global index of the first one.

    With ``num_layer_list`` the split is custom: a flat list has one count per stage; with virtual
    pipelining it has one row per virtual chunk, each with one count per stage (MindSpeed-Core-MS's
    ``(vpp, pp)`` layout; chunk ``v`` of stage ``p`` holds ``num_layer_list[v][p]`` layers, and the
    model's layers run chunk 0 of every stage, then chunk 1, ...). Otherwise the layers are split
    evenly (over the stages after the first with ``standalone_embedding_stage``, which leaves the
    first stage the embedding only).

    Returns:
        ``(num_layers, offset, noop)``: layers here, global 0-based index of the first one, and the
        set of 0-based layer indices (``noop_layers``) replaced by identity layers.

    Raises:
        ValueError: the layers do not divide evenly without a list, or the list does not sum to
            ``num_layers``, has the wrong shape or a negative count.
    """
    num_layers = int(config.num_layers)
    parallel_config = config.parallel_config
    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    vpp_rank = ps.get_virtual_pipeline_model_parallel_rank() or 0
    noop = set(parallel_config.noop_layers or [])
    layer_list = parallel_config.num_layer_list
    if layer_list:
        grid = np.asarray(layer_list, dtype=np.int64)
        if grid.ndim == 1:
            grid = grid.reshape(1, -1)
        if grid.shape != (vpp, pp):
            raise ValueError(f"parallel_config.num_layer_list={layer_list} must have {vpp} row(s) (one per virtual "
                             f"chunk, virtual_pipeline_model_parallel_size) of {pp} counts (one per stage, "
                             f"pipeline_model_parallel_size)")
        if int(grid.sum()) != num_layers:
            raise ValueError(f"parallel_config.num_layer_list={layer_list} sums to {int(grid.sum())} layers, but "
                             f"model_config.num_layers is {num_layers}")
        if (grid < 0).any():
            raise ValueError(f"parallel_config.num_layer_list={layer_list} contains negative layer counts; "
                             f"counts must be >= 0")
        # chunk order in the model: chunk v of every stage, stage-major within v
        order = [(v, p) for v in range(vpp) for p in range(pp)]
        offset = 0
        for v, p in order:
            if (v, p) == (vpp_rank, pp_rank):
                return int(grid[v, p]), offset, noop
            offset += int(grid[v, p])
    standalone = bool(parallel_config.standalone_embedding_stage) and pp > 1
    stages = pp - 1 if standalone else pp
    if num_layers % (stages * vpp):
        raise ValueError(f"model_config.num_layers ({num_layers}) is not divisible by the {stages} pipeline stage(s) "
                         f"holding layers (pipeline_model_parallel_size={pp}"
                         f"{', standalone_embedding_stage' if standalone else ''}) x virtual pipeline size ({vpp}); "
                         f"give parallel_config.num_layer_list to split it unevenly")
    if standalone and pp_rank == 0:
        return 0, 0, noop
    stage = pp_rank - 1 if standalone else pp_rank
    per_chunk = num_layers // (stages * vpp)
    offset = vpp_rank * (num_layers // vpp) + stage * per_chunk
    return per_chunk, offset, noop


# ---------------------------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------------------------

class ParallelMLP(Module):
    """Feed-forward block: column-parallel up-projection, activation, row-parallel down-projection.

    With a gated linear unit (``gated_linear_unit`` or ``hidden_act='swiglu'``) the up-projection
    produces gate and value halves (``act(gate) * value``); each tensor-parallel rank holds its
    share of both.

    Args:
        config: TransformerConfig.
        is_expert: An expert of a MoE layer (its communication is done by the token dispatcher).
        ffn_hidden_size: Override of ``config.ffn_hidden_size`` (experts may differ).
        init_key: Prefix of the layout-independent master-initialisation keys.

    Inputs:
        - **hidden_states** (Tensor) - ``(B, S, H)`` or ``(S, B, H)``.

    Outputs:
        ``(output, output_bias)``; the bias is returned unadded (None without bias).
    """

    def __init__(self, config, is_expert=False, ffn_hidden_size=None, init_key=None):
        super().__init__(config=None)
        self.config = config
        hidden = int(config.hidden_size)
        ffn = int(ffn_hidden_size or config.ffn_hidden_size)
        act = config.hidden_act
        self.gated = bool(config.gated_linear_unit) or act == "swiglu"
        self.activation = _activation(act)
        # apply_swiglu_fusion: Ascend's fused SwiGLU kernel (gate is the first half, as here)
        self.fused_swiglu = self.gated and act in ("silu", "swiglu") and \
            bool(config.apply_swiglu_fusion) and device_target() == "Ascend"
        bias = bool(config.mlp_has_bias)
        key = init_key or "mlp"
        self.dense_h_to_4h = ColumnParallelLinear(
            hidden, 2 * ffn if self.gated else ffn, config=config, init_method=_init_method(config), bias=bias,
            gather_output=False, skip_bias_add=True, is_expert=is_expert, bias_init=config.bias_init,
            init_key=key + ".dense_h_to_4h", partition_segments=[ffn, ffn] if self.gated else None)
        self.dense_4h_to_h = RowParallelLinear(
            ffn, hidden, config=config, init_method=_output_init_method(config), bias=bias, input_is_parallel=True,
            skip_bias_add=True, is_expert=is_expert, bias_init=config.bias_init,
            init_key=key + ".dense_4h_to_h")

    def construct(self, hidden_states):
        intermediate, bias = self.dense_h_to_4h(hidden_states)
        if bias is not None:
            intermediate = add_bias(intermediate, bias)
        if self.fused_swiglu:
            intermediate = ops.swiglu(intermediate, -1)
        elif self.gated:
            gate, value = ops.chunk(intermediate, 2, axis=-1)
            intermediate = self.activation(gate) * value
        else:
            intermediate = self.activation(intermediate)
        return self.dense_4h_to_h(intermediate)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

class CoreAttention(nn.Cell):
    """Scaled dot-product attention over this rank's heads.

    Args:
        layer_number: 1-based index of the layer (query-key layer scaling uses it).
        config: TransformerConfig.
        attn_mask_type: ``AttnMaskType.padding`` (mask as given) or ``causal`` (the causal mask is
            added to the given one).

    Inputs:
        - **query_layer** (Tensor) - ``(S, B, N, D)``.
        - **key_layer** (Tensor) - ``(S, B, Nk, D)``.
        - **value_layer** (Tensor) - ``(S, B, Nk, D)``.
        - **attention_mask** (Tensor) - broadcastable to ``(B, N, Sq, Sk)``; nonzero = masked.

    Outputs:
        ``(S, B, N * D)``.

    Raises:
        NotImplementedError: ``masked_softmax_fusion`` is set.
    """

    def __init__(self, layer_number, config, attn_mask_type=AttnMaskType.padding):
        super().__init__()
        if config.masked_softmax_fusion:
            raise NotImplementedError("masked_softmax_fusion is not supported for now.")
        self.config = config
        self.layer_number = max(1, int(layer_number))
        self.attn_mask_type = attn_mask_type
        self.kv_channels = int(config.kv_channels)
        scaling = bool(config.apply_query_key_layer_scaling)
        self.coeff = float(self.layer_number) if scaling else 1.0
        self.norm_factor = math.sqrt(self.kv_channels) * self.coeff
        self.attention_dropout = float(config.attention_dropout)
        softmax_in_fp32 = bool(config.attention_softmax_in_fp32)
        self.softmax_dtype = ms.float32 if softmax_in_fp32 else resolve_dtype(
            config.softmax_compute_dtype)
        self.compute_dtype = resolve_dtype(config.compute_dtype)
        self.softmax = Softmax()
        self.mask_func_type = config.mask_func_type
        if self.mask_func_type not in ("attn_mask_add", "attn_mask_fill"):
            raise ValueError(f"mask_func_type must be 'attn_mask_add' or 'attn_mask_fill', got {self.mask_func_type!r}")

    def attend(self, query, key, value, attention_mask=None, q_offset=0):
        """Attention on ``(B, N, S, D)`` tensors; returns ``(B, N, Sq, D)``."""
        heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads != heads:
            key = ops.repeat_interleave(key, heads // kv_heads, axis=1)
            value = ops.repeat_interleave(value, heads // kv_heads, axis=1)
        scores = batch_matmul(query, key, transpose_b=True, compute_dtype=self.compute_dtype)
        scores = scores.astype(self.softmax_dtype) * (1.0 / self.norm_factor)
        mask = normalize_attention_mask(attention_mask)
        if self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal):
            causal = _causal_mask(query.shape[2], key.shape[2], q_offset)
            mask = causal if mask is None else ops.logical_or(mask, causal)
        if mask is not None:
            if self.mask_func_type == "attn_mask_add":
                scores = scores + mask.astype(scores.dtype) * _MASK_FILL
            else:
                scores = ops.masked_fill(scores, mask, Tensor(_MASK_FILL, scores.dtype))
        probs = self.softmax(scores * self.coeff)
        if self.attention_dropout > 0 and self.training:
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
                probs = dropout(probs, self.attention_dropout)
        return batch_matmul(probs.astype(self.compute_dtype), value, compute_dtype=self.compute_dtype)

    def construct(self, query_layer, key_layer, value_layer, attention_mask):
        to_bnsd = (1, 2, 0, 3)
        context = self.attend(query_layer.transpose(to_bnsd), key_layer.transpose(to_bnsd),
                              value_layer.transpose(to_bnsd), attention_mask)
        seq, batch = query_layer.shape[0], query_layer.shape[1]
        return context.transpose(2, 0, 1, 3).reshape(seq, batch, -1)


class ParallelAttention(Module):
    """Multi-head (or grouped-query) attention with heads split over tensor-parallel ranks.

    Args:
        config: TransformerConfig.
        layer_number: 1-based index of the layer.
        attention_type: ``AttnType.self_attn`` (1) or ``AttnType.cross_attn`` (2).
        attn_mask_type: ``AttnMaskType.padding`` (1) or ``AttnMaskType.causal`` (2).

    Inputs:
        - **hidden_states** (Tensor) - ``(B, S, H)`` (or ``(S, B, H)`` with the SBH layout).
        - **attention_mask** (Tensor) - broadcastable to ``(B, N, S_q, S_k)``; nonzero = masked.
        - **encoder_output** (Tensor, optional) - keys/values source for cross-attention.
        - **inference_params** - not supported.
        - **rotary_pos_emb** (Tensor, optional) - RoPE angles ``(S, 1, 1, rot_dim)``.

    Outputs:
        ``(output, bias)``: output like ``hidden_states``; the output projection's bias unadded.

    Raises:
        ValueError: heads or query groups not divisible by the tensor-parallel size; an unknown
            attention type; cross-attention with ``hidden_size != kv_hidden_size``.
        NotImplementedError: cross-attention with grouped-query attention; inference_params.
    """

    def __init__(self, config, layer_number, attention_type=AttnType.self_attn,
                 attn_mask_type=AttnMaskType.padding, init_key=None):
        super().__init__(config=None)
        self.config = config
        self.layer_number = max(1, int(layer_number))
        self.attention_type = AttnType(int(attention_type)) if int(attention_type) in (1, 2) else None
        if self.attention_type is None:
            raise ValueError(f"attention_type must be AttnType.self_attn (1) or AttnType.cross_attn (2), "
                             f"got {attention_type!r}")
        self.attn_mask_type = attn_mask_type
        # apply_rope_fusion: Ascend's fused rotary kernel (the CPU backend has none)
        self.fused_rope = bool(config.apply_rope_fusion) and device_target() == "Ascend"
        tp = ps.get_tensor_model_parallel_world_size()
        heads = int(config.num_attention_heads)
        groups = _num_query_groups(config)
        self.gqa = bool(config.group_query_attention)
        if heads % tp:
            raise ValueError(f"num_attention_heads ({heads}) must be divisible by the tensor model parallel size ({tp})")
        if self.gqa and groups % tp:
            raise ValueError(f"num_query_groups ({groups}) must be divisible by the tensor model parallel size ({tp}) "
                             "when group_query_attention is True")
        if heads % groups:
            raise ValueError(f"num_attention_heads ({heads}) must be divisible by num_query_groups ({groups})")
        self.kv_channels = int(config.kv_channels)
        self.heads_per_partition = heads // tp
        self.groups_per_partition = groups // tp
        hidden = int(config.hidden_size)
        q_size = heads * self.kv_channels
        kv_size = groups * self.kv_channels
        key = init_key or f"layer{self.layer_number}.attention"
        init = _init_method(config)
        qkv_bias = bool(config.qkv_has_bias)
        bias_init = config.bias_init
        if self.attention_type == AttnType.self_attn:
            self.query_key_value = ColumnParallelLinear(
                hidden, q_size + 2 * kv_size, config=config, init_method=init, bias=qkv_bias, gather_output=False,
                bias_init=bias_init, init_key=key + ".query_key_value", partition_segments=[q_size, kv_size, kv_size])
        else:
            if self.gqa:
                raise NotImplementedError("cross attention with group_query_attention is not supported for now.")
            kv_hidden = int(config.extra_options().get("kv_hidden_size", hidden))
            if kv_hidden != hidden:
                raise ValueError(f"cross attention needs hidden_size == kv_hidden_size, got {hidden} and {kv_hidden}")
            self.query = ColumnParallelLinear(hidden, q_size, config=config, init_method=init, bias=qkv_bias,
                                              gather_output=False, bias_init=bias_init, init_key=key + ".query")
            self.key_value = ColumnParallelLinear(hidden, 2 * kv_size, config=config, init_method=init,
                                                  bias=qkv_bias, gather_output=False, bias_init=bias_init,
                                                  init_key=key + ".key_value", partition_segments=[kv_size, kv_size])
        self.core_attention = CoreAttention(self.layer_number, config, attn_mask_type)
        self.use_flash_attention = bool(config.use_flash_attention)
        self.fa_config = config.fa_config
        self.dense = RowParallelLinear(
            q_size, hidden, config=config, init_method=_output_init_method(config),
            bias=bool(config.out_proj_has_bias), input_is_parallel=True, skip_bias_add=True,
            bias_init=bias_init, init_key=key + ".dense")
        self.batch_first = sequence_dim(config) == 1
        self.cp_size = ps.get_context_parallel_world_size()
        self.attend_recompute = None

    def enable_selective_recompute(self):
        """Recompute the core attention (scores, softmax, dropout) in the backward pass."""
        self.attend_recompute = _Recompute(_AttendCell(self.core_attention))

    def _to_bnsd(self, x, heads):
        """(B, S, h) or (S, B, h) -> (B, N, S, D)."""
        if self.batch_first:
            b, s = x.shape[0], x.shape[1]
            return x.reshape(b, s, heads, self.kv_channels).transpose(0, 2, 1, 3)
        s, b = x.shape[0], x.shape[1]
        return x.reshape(s, b, heads, self.kv_channels).transpose(1, 2, 0, 3)

    def _from_bnsd(self, x):
        if self.batch_first:
            return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
        return x.transpose(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1)

    def construct(self, hidden_states, attention_mask, encoder_output=None, inference_params=None,
                  rotary_pos_emb=None):
        if inference_params is not None:
            raise NotImplementedError("inference_params is not supported for now.")
        n_q, n_kv, d = self.heads_per_partition, self.groups_per_partition, self.kv_channels
        if self.attention_type == AttnType.self_attn:
            mixed, _ = self.query_key_value(hidden_states)
            query, key, value = ops.split(mixed, [n_q * d, n_kv * d, n_kv * d], axis=-1)
        else:
            query, _ = self.query(hidden_states)
            mixed_kv, _ = self.key_value(encoder_output)
            key, value = ops.chunk(mixed_kv, 2, axis=-1)
        query, key, value = self._to_bnsd(query, n_q), self._to_bnsd(key, n_kv), self._to_bnsd(value, n_kv)
        if rotary_pos_emb is not None:
            q_emb, k_emb = (rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb))
            query = apply_rotary_pos_emb(query, q_emb, seq_dim=2, fused=self.fused_rope)
            key = apply_rotary_pos_emb(key, k_emb, seq_dim=2, fused=self.fused_rope)
        context = self._attention(query, key, value, attention_mask)
        return self.dense(self._from_bnsd(context))

    def _attention(self, query, key, value, attention_mask):
        if self.cp_size > 1:
            from mindspeed_ms.core.context_parallel import context_parallel_attention  # pylint: disable=import-outside-toplevel

            return context_parallel_attention(self, query, key, value, attention_mask)
        return self.local_attention(query, key, value, attention_mask)

    def local_attention(self, query, key, value, attention_mask):
        """Attention over the whole sequence held by this rank, (B, N, S, D) in and out.

        The single-rank path; Ulysses context parallelism also runs it after its all-to-all.
        """
        if self.use_flash_attention:
            from mindspeed_ms.core.flash_attention import flash_attention  # pylint: disable=import-outside-toplevel

            mask = normalize_attention_mask(attention_mask)
            causal = self.attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
            dropout_p = self.core_attention.attention_dropout if self.training else 0.0
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
                return flash_attention(query, key, value, attn_mask=mask, causal=causal,
                                       scale=1.0 / math.sqrt(self.kv_channels), dropout_p=dropout_p,
                                       fa_config=self.fa_config)
        if self.attend_recompute is not None:
            return self.attend_recompute(query, key, value, attention_mask)
        return self.core_attention.attend(query, key, value, attention_mask)


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------

def _check_layer_type(layer_type, owner: str) -> None:
    # A decoder layer (Megatron's LayerType.decoder) adds cross-attention over an encoder's output;
    # without an encoder here it would silently build a self-attention layer, so it is refused.
    try:
        kind = LayerType(int(layer_type))
    except (TypeError, ValueError):
        kind = None
    if kind != LayerType.encoder:
        raise ConfigValueError(owner, "layer_type", layer_type, "LayerType.encoder (self-attention "
                               "layers of a decoder-only or encoder-only model)",
                               "decoder layers with cross-attention (LayerType.decoder) and retro "
                               "layers are not implemented")


class ParallelTransformerLayer(Module):
    """One transformer layer: norm, attention, residual, norm, MLP (or MoE), residual.

    Options: ``apply_residual_connection_post_norm`` (the residual is the normalised input),
    sandwich norm (``use_sandwich_norm``: the attention and MLP outputs are normalised again and
    scaled by ``attn_post_norm_scale`` / ``ffn_post_norm_scale`` before the residual add), hidden
    dropout, and the residual stream in ``residual_connection_dtype`` (float32 with
    ``fp32_residual_connection``).

    Args:
        config: TransformerConfig.
        layer_number: 1-based global index of the layer.
        layer_type: ``LayerType.encoder``; decoder (cross-attention) and retro layers raise
            ``ConfigValueError`` naming ``layer_type``.
        self_attn_mask_type: ``AttnMaskType``.
        drop_path_rate: Must be 0.

    Inputs:
        - **hidden_states** (Tensor) - ``(B, S, H)``.
        - **attention_mask** (Tensor) - nonzero = masked.
        - **encoder_output**, **enc_dec_attn_mask**, **retriever_input**, **retriever_output**,
          **retriever_attn_mask**, **inference_params** - not supported (must be None).
        - **rotary_pos_emb** (Tensor, optional) - RoPE angles.

    Outputs:
        ``(B, S, H)``.

    Raises:
        NotImplementedError: bias_dropout_fusion, drop_path_rate > 0, retro_add_retriever, or any
            unsupported input given.
    """

    def __init__(self, config, layer_number, layer_type=LayerType.encoder, self_attn_mask_type=AttnMaskType.padding,
                 drop_path_rate=0.0):
        super().__init__(config=None)
        _check_layer_type(layer_type, "ParallelTransformerLayer")
        if config.bias_dropout_fusion:
            raise NotImplementedError("bias_dropout_fusion is not supported for now.")
        if drop_path_rate > 0.0:
            raise NotImplementedError("drop_path_rate > 0 is not supported for now.")
        if config.retro_add_retriever:
            raise NotImplementedError("retro_add_retriever is not supported for now.")
        self.config = config
        self.layer_number = max(1, int(layer_number))
        self.layer_type = layer_type
        key = f"layer{self.layer_number}"
        self.input_norm = get_norm(config)
        self.attention = ParallelAttention(config, self.layer_number, AttnType.self_attn, self_attn_mask_type,
                                           init_key=key + ".attention")
        self.post_attention_norm = get_norm(config)
        self.use_sandwich_norm = bool(config.use_sandwich_norm)
        if self.use_sandwich_norm:
            self.attn_post_norm = get_norm(config)
            self.ffn_post_norm = get_norm(config)
        self.attn_post_norm_scale = float(config.attn_post_norm_scale)
        self.ffn_post_norm_scale = float(config.ffn_post_norm_scale)
        self.is_moe = _is_moe_layer(config, self.layer_number)
        if self.is_moe:
            from mindspeed_ms.legacy.model.moe.moe_layer import MoELayer  # pylint: disable=import-outside-toplevel

            self.mlp = MoELayer(config, layer_number=self.layer_number)
        else:
            self.mlp = ParallelMLP(config, init_key=key + ".mlp")
        self.apply_residual_connection_post_norm = bool(config.apply_residual_connection_post_norm)
        self.hidden_dropout = float(config.hidden_dropout)
        if config.fp32_residual_connection:
            self.residual_dtype = ms.float32
        else:
            self.residual_dtype = resolve_dtype(config.residual_connection_dtype)
        self.sequence_parallel = bool(config.parallel_config.sequence_parallel) \
            and ps.get_tensor_model_parallel_world_size() > 1

    def enable_comm_recompute(self) -> bool:
        """Recompute the sequence-parallel all-gathers of this layer's column-parallel linears
        (attention input projection, MLP up-projection) in the backward instead of keeping them.

        Returns:
            Whether any linear here has an all-gather to recompute (needs sequence parallelism
            with more than one tensor-parallel rank; MoE experts' linears have none).
        """
        linears = [getattr(self.attention, name, None) for name in ("query_key_value", "query", "key_value")]
        if isinstance(self.mlp, ParallelMLP):
            linears.append(self.mlp.dense_h_to_4h)
        found = [linear.enable_comm_recompute() for linear in linears if linear is not None]
        return any(found)

    def _dropout(self, x):
        if self.hidden_dropout == 0 or not self.training:
            return x
        if self.sequence_parallel:  # each rank holds different tokens: different masks
            with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
                return dropout(x, self.hidden_dropout)
        return dropout(x, self.hidden_dropout)

    def construct(self, hidden_states, attention_mask, encoder_output=None, enc_dec_attn_mask=None,
                  retriever_input=None, retriever_output=None, retriever_attn_mask=None, inference_params=None,
                  rotary_pos_emb=None):
        for name, value in (("encoder_output", encoder_output), ("enc_dec_attn_mask", enc_dec_attn_mask),
                            ("retriever_input", retriever_input), ("retriever_output", retriever_output),
                            ("retriever_attn_mask", retriever_attn_mask), ("inference_params", inference_params)):
            if value is not None:
                raise NotImplementedError(f"{name} is not supported for now.")
        norm_output = self.input_norm(hidden_states)
        attention_output, attention_bias = self.attention(norm_output, attention_mask, rotary_pos_emb=rotary_pos_emb)
        if attention_bias is not None:
            attention_output = add_bias(attention_output, attention_bias)
        if self.use_sandwich_norm:
            attention_output = self.attn_post_norm(attention_output) * self.attn_post_norm_scale
        residual = norm_output if self.apply_residual_connection_post_norm else hidden_states
        norm_input = residual.astype(self.residual_dtype) + self._dropout(attention_output).astype(self.residual_dtype)
        norm_output = self.post_attention_norm(norm_input)
        mlp_output, mlp_bias = self.mlp(norm_output)
        if mlp_bias is not None:
            mlp_output = add_bias(mlp_output, mlp_bias)
        if self.use_sandwich_norm:
            mlp_output = self.ffn_post_norm(mlp_output) * self.ffn_post_norm_scale
        residual = norm_output if self.apply_residual_connection_post_norm else norm_input
        return residual.astype(self.residual_dtype) + self._dropout(mlp_output).astype(self.residual_dtype)


def _is_moe_layer(config, layer_number):
    """Whether the 1-based global layer ``layer_number`` is a MoE layer (moe_config.moe_layer_freq)."""
    moe_config = config.moe_config
    if int(moe_config.num_experts) <= 1:
        return False
    freq = moe_config.moe_layer_freq
    if isinstance(freq, (list, tuple)):
        if len(freq) != int(config.num_layers):
            raise ValueError(f"moe_layer_freq list has {len(freq)} entries, expected num_layers={config.num_layers}")
        return bool(freq[layer_number - 1])
    freq = int(freq)
    if freq < 1:
        raise ValueError(f"moe_layer_freq must be a positive integer or a list of 0/1, got {freq}")
    return (layer_number - 1) % freq == 0


class NoopTransformerLayer(nn.Cell):
    """A layer that passes hidden states through (``noop_layers``: pads uneven pipeline splits)."""

    def __init__(self, layer_number):
        super().__init__()
        self.layer_number = layer_number

    def construct(self, hidden_states, attention_mask, *args, **kwargs):
        return hidden_states


class _ReplayRNG(nn.Cell):
    """Runs ``block``; when run again by the recomputation, with the forward's random-stream state."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.saved = collections.deque()
        self.forward_pending = False

    def construct(self, *args):
        if self.forward_pending:
            self.forward_pending = False
            return self.block(*args)
        tracker = get_rng_tracker()
        current = tracker.get_states()
        tracker.set_states(self.saved.popleft())
        try:
            # MoE routers record token counts and loss values once per forward pass, not again here.
            with moe_recomputation():
                return self.block(*args)
        finally:
            tracker.set_states(current)


class _Recompute(nn.Cell):
    """Run ``block`` under MindSpore's recompute with identical dropout masks in the recomputation.

    The random streams are numpy generators (``tensor_parallel.random``), so the recomputation would
    draw new masks; the forward's stream state is saved and restored around the second run.
    """

    def __init__(self, block):
        super().__init__()
        self.replay = _ReplayRNG(block)

    @property
    def block(self):
        """The wrapped cell."""
        return self.replay.block

    def construct(self, *args):
        if not self.training:  # no backward will recompute: run once, keep no state
            return self.replay.block(*args)
        self.replay.saved.append(get_rng_tracker().get_states())
        self.replay.forward_pending = True
        return ms.recompute(self.replay, *args)


class _LayerChunk(nn.Cell):
    """Consecutive layers run as one unit (the granularity of full recomputation)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.CellList(layers)

    def construct(self, hidden_states, attention_mask, rotary_pos_emb=None):
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb)
        return hidden_states


def _recompute_plan(config, num_layers):
    """Local layer sets of full / selective / communication recomputation for this stage and chunk."""
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    parallel = config.parallel_config
    model = dict(recompute_granularity=config.recompute_granularity, recompute_method=config.recompute_method,
                 recompute_num_layers=config.recompute_num_layers, select_recompute=config.select_recompute,
                 select_comm_recompute=config.select_comm_recompute)
    # parallel_config.recompute_config holds the same three keys (the guide's train_config block)
    per_stage = dict(recompute=parallel.recompute, select_recompute=parallel.select_recompute,
                     select_comm_recompute=parallel.select_comm_recompute, recompute_config=parallel.recompute_config)
    return resolve_recompute(
        model, per_stage,
        num_layers=num_layers, pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vpp_rank=(ps.get_virtual_pipeline_model_parallel_rank() or 0) if vpp > 1 else None, vpp_size=vpp)


_NO_COMM_LOGGED = []


def _recompute_units(layers, plan):
    """Wrap the layers as the plan says: full recomputation per unit, selective (core attention)
    and communication (sequence-parallel all-gather) recomputation inside the layers."""
    for i in sorted(plan["selective"]):
        if isinstance(layers[i], ParallelTransformerLayer):
            layers[i].attention.enable_selective_recompute()
    comm = [layers[i].enable_comm_recompute() for i in sorted(plan["comm"])
            if isinstance(layers[i], ParallelTransformerLayer)]
    if comm and not any(comm) and not _NO_COMM_LOGGED:
        _NO_COMM_LOGGED.append(True)
        logger.warning("select_comm_recompute: no sequence-parallel all-gather to recompute in these "
                       "layers (tensor_model_parallel_size is 1, or the layers are MoE experts)")
    chunk = plan["uniform_chunk"]
    if chunk:  # Megatron's uniform method: every chunk of `chunk` layers is one recomputed unit
        return [_Recompute(_LayerChunk(layers[start:start + chunk])) for start in range(0, len(layers), chunk)]
    return [_Recompute(_LayerChunk([layer])) if i in plan["full"] else _LayerChunk([layer])
            for i, layer in enumerate(layers)]


class ParallelTransformer(Module):
    """The stack of transformer layers held by this pipeline stage (and virtual chunk).

    Recomputation (activation checkpointing), resolved per stage and virtual chunk by
    :func:`mindspeed_ms.core.config.recompute.resolve_recompute`: ``recompute_granularity='full'``
    with ``recompute_method='uniform'`` (every chunk of ``recompute_num_layers`` layers is
    recomputed as a unit) or ``'block'`` (the first ``recompute_num_layers`` layers of the stage
    are recomputed individually), or ``parallel_config.recompute`` (the first n layers of each
    stage/chunk); ``'selective'`` / ``select_recompute`` recompute the core attention only;
    ``select_comm_recompute`` recomputes the sequence-parallel all-gathers in the backward.
    ``parallel_config.recompute_config`` holds the same three keys (the guide's
    ``train_config.recompute_config``).

    Args:
        config: TransformerConfig.
        model_type: ``ModelType`` (retro kinds are not supported).
        layer_type: ``LayerType.encoder`` (others raise ``ConfigValueError``, see
            :class:`ParallelTransformerLayer`).
        self_attn_mask_type: ``AttnMaskType``.
        post_norm: Apply the final norm on the last stage.
        pre_process: First pipeline stage (else the input comes from ``set_input_tensor``).
        post_process: Last pipeline stage.
        drop_path_rate: Must be 0.

    Raises:
        NotImplementedError: drop_path_rate > 0; distribute_saved_activations without sequence
            parallelism; transformer_impl 'transformer_engine'; fp8; retro; unsupported inputs.
    """

    def __init__(self, config, model_type, layer_type=LayerType.encoder, self_attn_mask_type=AttnMaskType.padding,
                 post_norm=True, pre_process=False, post_process=False, drop_path_rate=0.0):
        super().__init__(config=None)
        _check_architecture(config, "ParallelTransformer")
        _check_layer_type(layer_type, "ParallelTransformer")
        if drop_path_rate > 0.0:
            raise NotImplementedError("drop_path_rate > 0 is not supported for now.")
        if config.distribute_saved_activations and \
                not config.parallel_config.sequence_parallel:
            raise NotImplementedError("distribute_saved_activations needs sequence_parallel.")
        if config.transformer_impl == "transformer_engine":
            raise NotImplementedError("transformer_impl 'transformer_engine' is not supported.")
        if config.fp8_format is not None or config.extra_options().get("fp8") is not None:
            raise NotImplementedError("fp8 is not supported.")
        if config.retro_add_retriever:
            raise NotImplementedError("retro_add_retriever is not supported.")
        if model_type is not None and int(model_type) in (ModelType.retro_encoder, ModelType.retro_decoder):
            raise NotImplementedError("retro models are not supported.")
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.input_tensor = None
        num_layers, offset, noop = get_num_layers_and_offset(config)
        self.num_layers = num_layers
        self.layer_offset = offset
        layers = []
        for i in range(num_layers):
            number = offset + i + 1
            if number - 1 in noop:  # noop_layers holds 0-based indices, layer numbers start at 1
                layers.append(NoopTransformerLayer(number))
            else:
                layers.append(ParallelTransformerLayer(config, number, layer_type, self_attn_mask_type))
        self.recompute_granularity = config.recompute_granularity
        self.recompute_plan = _recompute_plan(config, num_layers)
        # read by the compile decision: recomputation replays numpy random streams (PyNative only)
        self.recomputes = any(self.recompute_plan[key] for key in ("full", "selective", "comm"))
        self.units = nn.CellList(_recompute_units(layers, self.recompute_plan))
        self.use_final_norm = bool(config.use_final_norm)
        if post_process and post_norm and self.use_final_norm:
            self.final_norm = get_norm(config)
        else:
            self.final_norm = None

    def set_input_tensor(self, input_tensor):
        """Hidden states received from the previous pipeline stage."""
        self.input_tensor = input_tensor

    def iter_layers(self):
        """The layers of this stage in order (wrappers for recomputation looked through)."""
        for unit in self.units:
            chunk = unit.block if isinstance(unit, _Recompute) else unit
            yield from chunk.layers

    def construct(self, hidden_states, attention_mask, encoder_output=None, enc_dec_attn_mask=None,
                  retriever_input=None, retriever_output=None, retriever_attn_mask=None, inference_params=None,
                  rotary_pos_emb=None):
        for name, value in (("encoder_output", encoder_output), ("enc_dec_attn_mask", enc_dec_attn_mask),
                            ("retriever_input", retriever_input), ("retriever_output", retriever_output),
                            ("retriever_attn_mask", retriever_attn_mask), ("inference_params", inference_params)):
            if value is not None:
                raise NotImplementedError(f"{name} is not supported for now.")
        if not self.pre_process and self.input_tensor is not None:
            hidden_states = self.input_tensor
        for unit in self.units:
            hidden_states = unit(hidden_states, attention_mask, rotary_pos_emb)
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states


class _AttendCell(nn.Cell):
    def __init__(self, core):
        super().__init__()
        self.core = core

    def construct(self, query, key, value, attention_mask=None):
        return self.core.attend(query, key, value, attention_mask)


# ---------------------------------------------------------------------------------------------
# LM head
# ---------------------------------------------------------------------------------------------

class ParallelLMLogits(nn.Cell):
    """Logits over the vocabulary from the (tied or untied) word-embedding matrix.

    Args:
        config: TransformerConfig.
        bias: Add a bias (given to construct).
        compute_dtype: Matmul dtype (default: config.compute_dtype).

    Inputs:
        - **input_** (Tensor) - hidden states ``(..., H)``.
        - **word_embeddings_weight** (Tensor) - ``(V / tp, H)``.
        - **parallel_output** (bool) - keep the vocabulary split over tensor-parallel ranks.
        - **bias** (Tensor, optional) - ``(V / tp,)``.

    Outputs:
        Logits ``(..., V / tp)``, or ``(..., V)`` when ``parallel_output`` is False.
    """

    def __init__(self, config, bias=False, compute_dtype=None):
        super().__init__()
        self.config = config
        self.use_bias = bias
        self.compute_dtype = resolve_dtype(compute_dtype or config.compute_dtype)
        parallel_config = config.parallel_config
        self.tensor_parallel = ps.get_tensor_model_parallel_world_size() > 1
        self.sequence_parallel = bool(parallel_config.sequence_parallel) and self.tensor_parallel
        self.seq_dim = sequence_dim(config)
        self.input_mapping = None
        self.output_gather = None
        if self.tensor_parallel:
            group = ps.get_tensor_model_parallel_group()
            self.input_mapping = (GatherFromRegion(group, self.seq_dim, "reduce_scatter") if self.sequence_parallel
                                  else CopyToRegion(group))
            self.output_gather = GatherFromRegion(group, -1, "split")

    def construct(self, input_, word_embeddings_weight, parallel_output=True, bias=None):
        if self.input_mapping is None:
            input_parallel = input_
        else:
            input_parallel = self.input_mapping(input_)
        logits = matmul(input_parallel, word_embeddings_weight, transpose_b=True, compute_dtype=self.compute_dtype)
        if self.use_bias and bias is not None:
            logits = add_bias(logits, bias)
        if parallel_output or self.output_gather is None:
            return logits
        return self.output_gather(logits)
