"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding.

Weights are split over the tensor-parallel group: a column-parallel linear keeps a slice of the
output features (``weight`` of shape ``(out / tp, in)`` with ``transpose_b=True``), a row-parallel
linear a slice of the input features, and the vocabulary embedding a slice of the vocabulary.

Initialisation from a full master weight: with ``parallel_config.use_cpu_initialization`` every rank
draws the *full* weight from a random stream keyed by the global seed and a layout-independent key,
and keeps its slice. A model therefore starts from exactly the same weights under any parallel
layout, which is what makes layouts comparable (tests and the lab's strategy tuning rely on it).
Without it, each rank initialises its own slice with MindSpore's initializer (faster, but the
weights then depend on the layout).
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Optional, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import (Constant, Initializer, Normal, One, TruncatedNormal, Uniform,
                                          XavierUniform, Zero, initializer)

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.config.metadata import field_spec
from mindspeed_ms.core.config.parallel import ModelParallelConfig
from mindspeed_ms.core.config.transformer import TransformerConfig
from mindspeed_ms.core.precision import add_bias, matmul, readable, resolve_dtype
from mindspeed_ms.core.tensor_parallel.mappings import (CopyToRegion, GatherFromRegion, ReduceFromRegion,
                                                        ReduceScatterToRegion, ScatterToRegion)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "master_init_seed",
    "draw_full_weight",
    "init_partitioned_parameter",
    "sequence_dim",
    "get_parallel_config",
    "set_partition_attributes",
    "split_segments",
]

_auto_keys = itertools.count()


def get_parallel_config(config):
    """The ModelParallelConfig of a TransformerConfig (or the config itself if it is one)."""
    return config if isinstance(config, ModelParallelConfig) else config.parallel_config


def sequence_dim(config) -> int:
    """Sequence dimension of hidden states: 1 for the BSH layout (default), 0 for SBH."""
    return 0 if config.dataset_config.data_layout == "SBH" else 1


def master_init_seed(key: str, base_seed: Optional[int] = None) -> int:
    """Seed of the full-weight stream of ``key``: the global seed mixed with the key."""
    if base_seed is None:
        from mindspeed_ms.core.tensor_parallel.random import weight_init_seed  # pylint: disable=import-outside-toplevel

        base_seed = weight_init_seed()
    base_seed = 0 if base_seed is None else int(base_seed)
    return (base_seed * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 32)


def _sigma_of(config):
    # draw_full_weight may be called without a config (tests, tools): then the field's default
    if config is None:
        return float(field_spec(TransformerConfig, "init_method_std").default)
    return float(config.init_method_std)


def draw_full_weight(init_method, shape: Sequence[int], key: str, config=None) -> np.ndarray:
    """The full (unsplit) weight as float32 numpy, identical on every rank for the same key.

    Args:
        init_method: 'normal' (std = config.init_method_std), 'zeros', 'ones', 'uniform',
            'xavier_uniform', 'truncated_normal', a MindSpore Initializer of those kinds, a number
            (constant), a numpy array or Tensor of the full shape, or a callable ``f(shape, rng)``.
        shape: Full shape.
        key: Layout-independent name of the parameter.
        config: TransformerConfig (for init_method_std).
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.Generator(np.random.PCG64(master_init_seed(key)))
    if isinstance(init_method, Tensor):
        init_method = init_method.asnumpy()
    if isinstance(init_method, np.ndarray):
        if tuple(init_method.shape) != shape:
            raise ValueError(f"init_method array for {key} has shape {init_method.shape}, expected {shape}")
        return init_method.astype(np.float32)
    if callable(init_method) and not isinstance(init_method, Initializer):
        return np.asarray(init_method(shape, rng), dtype=np.float32)
    if isinstance(init_method, (int, float)) and not isinstance(init_method, bool):
        return np.full(shape, float(init_method), np.float32)
    name = init_method.lower() if isinstance(init_method, str) else None
    if name in ("normal",) or isinstance(init_method, Normal):
        sigma = _sigma_of(config) if name else float(init_method.sigma)
        mean = 0.0 if name else float(getattr(init_method, "mean", 0.0))
        return (rng.standard_normal(shape, dtype=np.float32) * sigma + mean).astype(np.float32)
    if name in ("zeros", "zero") or isinstance(init_method, Zero):
        return np.zeros(shape, np.float32)
    if name in ("ones", "one") or isinstance(init_method, One):
        return np.ones(shape, np.float32)
    if isinstance(init_method, Constant):
        return np.full(shape, float(init_method.value), np.float32)
    if name == "uniform" or isinstance(init_method, Uniform):
        scale = 0.07 if name else float(init_method.scale)
        return rng.uniform(-scale, scale, shape).astype(np.float32)
    if name in ("truncated_normal", "truncatednormal") or isinstance(init_method, TruncatedNormal):
        sigma = _sigma_of(config) if name else float(init_method.sigma)
        vals = rng.standard_normal(shape)
        bad = np.abs(vals) > 2
        while bad.any():
            vals[bad] = rng.standard_normal(int(bad.sum()))
            bad = np.abs(vals) > 2
        return (vals * sigma).astype(np.float32)
    if name == "xavier_uniform" or isinstance(init_method, XavierUniform):
        gain = 1.0 if name else float(init_method.gain)
        fan_out, fan_in = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    raise ValueError(
        f"use_cpu_initialization cannot draw init_method {init_method!r} for {key}; use 'normal', 'zeros', "
        "'ones', 'uniform', 'xavier_uniform', 'truncated_normal', a number, an array or a callable")


def _resolve_initializer(init_method, config):
    """A MindSpore initializer for per-rank (non-master) initialisation."""
    if isinstance(init_method, str) and init_method.lower() == "normal":
        return Normal(sigma=_sigma_of(config))
    return init_method


def split_segments(full: np.ndarray, axis: int, segments: Optional[Sequence[int]], parts: int, index: int):
    """This rank's slice of ``full`` along ``axis``: chunk ``index`` of every segment, concatenated.

    Fused weights (query/key/value, gate/up) are stored as consecutive segments; each rank must
    hold its share of every segment, not a contiguous slice of the whole.
    """
    if not segments:
        return np.split(full, parts, axis=axis)[index]
    bounds = np.cumsum([0] + list(segments))
    pieces = [np.split(np.take(full, np.arange(bounds[i], bounds[i + 1]), axis=axis), parts, axis=axis)[index]
              for i in range(len(segments))]
    return np.concatenate(pieces, axis=axis)


def init_partitioned_parameter(full_shape: Sequence[int], partition_dim: Optional[int], init_method, *,
                               config, dtype, name: str, key: Optional[str] = None,
                               segments: Optional[Sequence[int]] = None) -> Parameter:
    """Create this rank's slice of a parameter whose full shape is ``full_shape``.

    Args:
        full_shape: Shape of the unsplit parameter.
        partition_dim: Dimension split over the tensor-parallel group (None: replicated).
        init_method: See :func:`draw_full_weight`.
        config: TransformerConfig (its parallel_config.use_cpu_initialization decides how).
        dtype: Parameter dtype.
        name: Parameter name.
        key: Layout-independent key of the master stream (default: creation order).
        segments: Sizes of the fused segments along ``partition_dim`` (each split over ranks).
    """
    tp = ps.get_tensor_model_parallel_world_size()
    rank = ps.get_tensor_model_parallel_rank()
    full_shape = tuple(int(s) for s in full_shape)
    local_shape = list(full_shape)
    if partition_dim is not None:
        if full_shape[partition_dim] % tp:
            raise ValueError(
                f"{name}: dimension {partition_dim} of size {full_shape[partition_dim]} is not divisible by the "
                f"tensor model parallel size {tp}")
        local_shape[partition_dim] //= tp
        if segments is not None:
            if sum(segments) != full_shape[partition_dim] or any(seg % tp for seg in segments):
                raise ValueError(f"{name}: segments {list(segments)} must sum to {full_shape[partition_dim]} and "
                                 f"each be divisible by the tensor model parallel size {tp}")
    use_master = bool(get_parallel_config(config).use_cpu_initialization)
    if isinstance(init_method, (Tensor, np.ndarray)) and tuple(init_method.shape) == full_shape and not use_master:
        use_master = True  # a full weight was given: slice it
    if use_master:
        full = draw_full_weight(init_method, full_shape, key or f"auto{next(_auto_keys)}", config)
        if partition_dim is not None:
            full = split_segments(full, partition_dim, segments, tp, rank)
        data = Tensor(np.ascontiguousarray(full)).astype(dtype)
    else:
        data = initializer(_resolve_initializer(init_method, config), tuple(local_shape), dtype)
    param = Parameter(data, name=name)
    set_partition_attributes(param, partition_dim, segments)
    return param


def set_partition_attributes(param: Parameter, partition_dim: Optional[int], segments=None) -> None:
    """Record how ``param`` is split over tensor-parallel ranks.

    ``tensor_model_parallel`` (bool), ``partition_dim`` and ``partition_segments`` are read by the
    gradient-norm computation (split parameters count on every rank, replicated ones once) and by
    tests and checkpoint tools that reassemble full weights.
    """
    split = partition_dim is not None and ps.get_tensor_model_parallel_world_size() > 1
    param.tensor_model_parallel = split
    param.partition_dim = partition_dim if partition_dim is not None else -1
    param.partition_segments = list(segments) if segments else None


def _check_not_implemented(**options):
    for what, active in options.items():
        if active:
            raise NotImplementedError(f"`{what}` is not supported for now.")


def _zero3_check(config):
    parallel_config = get_parallel_config(config)
    if parallel_config.zero_level == "z3" and not ps.model_parallel_is_initialized() \
            and ps.get_data_parallel_world_size() > 1:
        raise RuntimeError("zero3 optimizer parallel is used but the data parallel group is not initialized")


def _explicit_expert_comm(is_expert: bool) -> bool:
    return bool(is_expert) and (ps.get_tensor_model_parallel_world_size() > 1
                                or ps.get_expert_model_parallel_world_size() > 1)


class ColumnParallelLinear(nn.Cell):
    """Linear layer with the weight split along the output features over tensor-parallel ranks.

    ``Y = X W^T + b`` with ``W = [W_1; ...; W_p]``: rank ``i`` computes ``Y_i = X W_i^T + b_i``.
    The input is copied into the tensor-parallel region (its gradient all-reduced), or, with
    sequence parallelism, all-gathered along the sequence (its gradient reduce-scattered).

    Args:
        input_size: Input features.
        output_size: Output features (all ranks together).
        config: TransformerConfig.
        init_method: Weight initialisation (see :func:`draw_full_weight`).
        bias: Whether to add a bias.
        gather_output: All-gather the output so every rank has all features.
        stride: Must be 1.
        keep_master_weight_for_test: Keep the full weight as ``self.master_weight`` (numpy;
            needs ``use_cpu_initialization``).
        skip_bias_add: Return the bias instead of adding it (for fusion).
        skip_weight_param_allocation: The weight is passed to ``construct``.
        embedding_activation_buffer, grad_output_buffer, tp_comm_buffer_name: Not supported.
        is_expert: An expert's linear: no tensor-parallel communication here (the token dispatcher
            does it) when tensor or expert parallelism is on.
        disable_grad_reduce: Not supported.
        bias_init: Bias initialisation.
        param_init_dtype: Parameter dtype (default: config.params_dtype).
        compute_dtype: Matmul dtype (default: config.compute_dtype).
        transpose_b: Store the weight as ``(out, in)`` (True) or ``(in, out)``.
        init_key: Layout-independent name for master initialisation (default: creation order).
        partition_segments: Output-feature sizes of fused segments (e.g. query/key/value), each
            split over ranks so every rank holds its share of each.

    Inputs:
        - **input_** (Tensor) - ``(*, input_size)``.
        - **weight** (Tensor, optional) - the weight when ``skip_weight_param_allocation``.

    Outputs:
        ``(output, output_bias)``: output ``(*, output_size / tp)`` (or ``output_size`` with
        gather_output); output_bias is the bias when ``skip_bias_add`` else None.

    Raises:
        ValueError: skip_weight_param_allocation=True but no weight given to construct.
        NotImplementedError: stride > 1, embedding_activation_buffer, grad_output_buffer,
            tp_comm_buffer_name, disable_grad_reduce=True.
        RuntimeError: zero3 without an initialised data-parallel group.
    """

    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False, stride=1,
                 keep_master_weight_for_test=False, skip_bias_add=False, skip_weight_param_allocation=False,
                 embedding_activation_buffer=None, grad_output_buffer=None, is_expert=False,
                 tp_comm_buffer_name=None, disable_grad_reduce=False, bias_init=Zero(), param_init_dtype=None,
                 compute_dtype=None, transpose_b=True, init_key: Optional[str] = None,
                 partition_segments: Optional[Sequence[int]] = None):
        super().__init__()
        _check_not_implemented(**{"stride > 1": stride > 1,
                                  "embedding_activation_buffer": embedding_activation_buffer is not None,
                                  "grad_output_buffer": grad_output_buffer is not None,
                                  "tp_comm_buffer_name": tp_comm_buffer_name is not None,
                                  "disable_grad_reduce=True": disable_grad_reduce})
        _zero3_check(config)
        self.config = config
        self.input_size = int(input_size)
        self.output_size = int(output_size)
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.skip_weight_param_allocation = skip_weight_param_allocation
        self.transpose_b = transpose_b
        self.is_expert = is_expert
        self.explicit_expert_comm = _explicit_expert_comm(is_expert)
        parallel_config = get_parallel_config(config)
        self.sequence_parallel = bool(parallel_config.sequence_parallel) \
            and ps.get_tensor_model_parallel_world_size() > 1
        self.seq_dim = sequence_dim(config)
        tp = ps.get_tensor_model_parallel_world_size()
        self.tensor_parallel = tp > 1
        if self.output_size % tp:
            raise ValueError(f"ColumnParallelLinear: output_size {self.output_size} is not divisible by the "
                             f"tensor model parallel size {tp}")
        self.output_size_per_partition = self.output_size // tp
        self.param_init_dtype = resolve_dtype(param_init_dtype or config.params_dtype)
        self.compute_dtype = resolve_dtype(compute_dtype or config.compute_dtype)
        key = init_key or f"column{next(_auto_keys)}"
        full_shape = (self.output_size, self.input_size) if transpose_b else (self.input_size, self.output_size)
        partition_dim = 0 if transpose_b else 1
        if keep_master_weight_for_test:
            if not parallel_config.use_cpu_initialization:
                raise NotImplementedError("`keep_master_weight_for_test=True` needs use_cpu_initialization.")
            self.master_weight = draw_full_weight(init_method, full_shape, key + ".weight", config)
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = init_partitioned_parameter(full_shape, partition_dim, init_method, config=config,
                                                     dtype=self.param_init_dtype, name="weight",
                                                     key=key + ".weight", segments=partition_segments)
        if bias:
            self.bias = init_partitioned_parameter((self.output_size,), 0, bias_init, config=config,
                                                   dtype=self.param_init_dtype, name="bias", key=key + ".bias",
                                                   segments=partition_segments)
        else:
            self.bias = None
        self.lora = None  # a LoraAdapter when apply_lora() selects this layer
        self.gather_matmul = None  # a _GatherMatmul when the all-gather is recomputed
        # the region mappings are cells of this layer (None: nothing to communicate), so that a
        # compiled chunk switches them to their graph collectives (mappings.use_graph_collectives)
        self.input_mapping = None
        self.output_gather = None
        if self.tensor_parallel and not self.explicit_expert_comm:
            group = ps.get_tensor_model_parallel_group()
            self.input_mapping = (GatherFromRegion(group, self.seq_dim, "reduce_scatter") if self.sequence_parallel
                                  else CopyToRegion(group))
            if gather_output:
                self.output_gather = GatherFromRegion(group, -1, "split")

    def enable_comm_recompute(self) -> bool:
        """Recompute the sequence-parallel all-gather of the input in the backward pass.

        Without it the gathered input (``tp`` times this rank's share) is kept for the weight
        gradient; with it only this rank's share is kept and the all-gather runs again in the
        backward (MindSpeed's ``select_comm_recompute``; Megatron's sequence-parallel linear
        does the same). A layer with a LoRA adapter keeps the gathered input (the adapter reads
        it) and is computed as without.

        Returns:
            Whether this layer has an all-gather to recompute (sequence parallelism with more
            than one tensor-parallel rank, not an expert's linear).
        """
        if not self.sequence_parallel or self.explicit_expert_comm:
            return False
        self.gather_matmul = _GatherMatmul(self.input_mapping, self.transpose_b, self.compute_dtype)
        return True

    def construct(self, input_, weight=None):
        if weight is None:
            weight = self.weight
            if weight is None:
                raise ValueError("For ColumnParallelLinear, weight was not supplied to construct(), and "
                                 "`skip_weight_param_allocation` is True.")
        if self.gather_matmul is not None and self.training and self.lora is None:
            # only the inputs are kept; the backward re-runs the all-gather (and stops there)
            output = ms.recompute(self.gather_matmul, input_, weight, use_reentrant=False)
        else:
            if self.input_mapping is None:
                parallel_input = input_
            else:
                parallel_input = self.input_mapping(input_)
            output = matmul(parallel_input, weight, transpose_b=self.transpose_b,
                            compute_dtype=self.compute_dtype)
            if self.lora is not None:
                output = output + self.lora(parallel_input).astype(output.dtype)
        if self.bias is not None and not self.skip_bias_add:
            output = add_bias(output, self.bias)
        if self.output_gather is not None:
            output = self.output_gather(output)
        return output, (self.bias if self.skip_bias_add else None)


class _GatherMatmul(nn.Cell):
    """All-gather the sequence-parallel input and multiply: the unit whose all-gather is recomputed."""

    def __init__(self, gather, transpose_b, compute_dtype):
        super().__init__()
        self.gather = gather  # the layer's sequence-parallel all-gather (a GatherFromRegion)
        self.transpose_b = transpose_b
        self.compute_dtype = compute_dtype

    def construct(self, input_, weight):
        full = self.gather(input_)
        return matmul(full, weight, transpose_b=self.transpose_b, compute_dtype=self.compute_dtype)


class RowParallelLinear(nn.Cell):
    """Linear layer with the weight split along the input features over tensor-parallel ranks.

    ``Y = X W^T + b`` with ``X = [X_1, ..., X_p]`` and ``W = [W_1, ..., W_p]``: rank ``i``
    computes ``X_i W_i^T`` and the partial results are summed (all-reduce, or reduce-scatter along
    the sequence with sequence parallelism). The bias is added once, after the reduction.

    Args:
        input_size: Input features (all ranks together).
        output_size: Output features.
        config: TransformerConfig.
        init_method: Weight initialisation.
        bias: Whether to add a bias.
        input_is_parallel: The input is already split along features (else it is scattered).
        skip_bias_add: Return the bias instead of adding it.
        stride: Must be 1.
        keep_master_weight_for_test: Keep the full weight as ``self.master_weight``.
        is_expert: An expert's linear (no reduction here when tensor/expert parallelism is on).
        tp_comm_buffer_name: Not supported.
        bias_init: Bias initialisation.
        param_init_dtype: Parameter dtype.
        compute_dtype: Matmul dtype.
        transpose_b: Weight layout ``(out, in)`` when True.
        init_key: Layout-independent name for master initialisation.

    Raises:
        ValueError: sequence parallelism without ``input_is_parallel``; explicit expert
            communication without ``skip_bias_add``.
        NotImplementedError: stride > 1, tp_comm_buffer_name.
        RuntimeError: zero3 without an initialised data-parallel group.
    """

    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel,
                 skip_bias_add=True, stride=1, keep_master_weight_for_test=False, is_expert=False,
                 tp_comm_buffer_name=None, bias_init=Zero(), param_init_dtype=None, compute_dtype=None,
                 transpose_b=True, init_key: Optional[str] = None):
        super().__init__()
        _check_not_implemented(**{"stride > 1": stride > 1,
                                  "tp_comm_buffer_name": tp_comm_buffer_name is not None})
        _zero3_check(config)
        parallel_config = get_parallel_config(config)
        tp = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(parallel_config.sequence_parallel) and tp > 1
        self.tensor_parallel = tp > 1
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("When input_is_parallel is False, sequence_parallel should be False, but got True.")
        self.explicit_expert_comm = _explicit_expert_comm(is_expert)
        if self.explicit_expert_comm and not skip_bias_add and bias:
            raise ValueError("When explicit_expert_comm is True, skip_bias_add should be True, but got False.")
        self.config = config
        self.input_size = int(input_size)
        self.output_size = int(output_size)
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.transpose_b = transpose_b
        self.is_expert = is_expert
        self.seq_dim = sequence_dim(config)
        if self.input_size % tp:
            raise ValueError(f"RowParallelLinear: input_size {self.input_size} is not divisible by the tensor "
                             f"model parallel size {tp}")
        self.input_size_per_partition = self.input_size // tp
        self.param_init_dtype = resolve_dtype(param_init_dtype or config.params_dtype)
        self.compute_dtype = resolve_dtype(compute_dtype or config.compute_dtype)
        key = init_key or f"row{next(_auto_keys)}"
        full_shape = (self.output_size, self.input_size) if transpose_b else (self.input_size, self.output_size)
        partition_dim = 1 if transpose_b else 0
        if keep_master_weight_for_test:
            if not parallel_config.use_cpu_initialization:
                raise NotImplementedError("`keep_master_weight_for_test=True` needs use_cpu_initialization.")
            self.master_weight = draw_full_weight(init_method, full_shape, key + ".weight", config)
        self.weight = init_partitioned_parameter(full_shape, partition_dim, init_method, config=config,
                                                 dtype=self.param_init_dtype, name="weight", key=key + ".weight")
        if bias:
            self.bias = init_partitioned_parameter((self.output_size,), None, bias_init, config=config,
                                                   dtype=self.param_init_dtype, name="bias", key=key + ".bias")
            # With sequence parallelism each rank sees a slice of the sequence, so the bias
            # gradient is partial and must be all-reduced over tensor-parallel ranks.
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.bias = None
        self.lora = None  # a LoraAdapter when apply_lora() selects this layer
        self.input_scatter = None
        self.output_reduce = None
        if self.tensor_parallel and not self.explicit_expert_comm:
            group = ps.get_tensor_model_parallel_group()
            if not input_is_parallel:
                self.input_scatter = ScatterToRegion(group, -1)
            self.output_reduce = (ReduceScatterToRegion(group, self.seq_dim) if self.sequence_parallel
                                  else ReduceFromRegion(group))

    def construct(self, input_):
        if self.input_scatter is None:
            parallel_input = input_
        else:
            parallel_input = self.input_scatter(input_)
        partial = matmul(parallel_input, self.weight, transpose_b=self.transpose_b, compute_dtype=self.compute_dtype)
        if self.output_reduce is None:
            output = partial
        else:
            output = self.output_reduce(partial)
        if self.lora is not None:
            output = output + self.lora(parallel_input).astype(output.dtype)
        if self.bias is not None and not self.skip_bias_add:
            output = add_bias(output, self.bias)
            return output, None
        return output, self.bias


class VocabParallelEmbedding(nn.Cell):
    """Embedding with the vocabulary split over tensor-parallel ranks.

    Rank ``i`` holds rows ``[i * V / tp, (i + 1) * V / tp)``; ids outside its range give zeros,
    and the partial embeddings are summed over the group (all-reduce, or reduce-scatter along
    the sequence when ``reduce_scatter_embeddings``).

    Args:
        num_embeddings: Vocabulary size.
        embedding_dim: Hidden size.
        init_method: Weight initialisation.
        reduce_scatter_embeddings: Reduce-scatter the output along the sequence (sequence
            parallelism).
        config: TransformerConfig.
        param_init_dtype: Parameter dtype (default: config.embedding_init_dtype or params_dtype).
        init_key: Layout-independent name for master initialisation.

    Inputs:
        - **input_** (Tensor) - ids of shape ``(B, S)`` or ``(S, B)``.

    Outputs:
        ``(B, S, H)`` or ``(S, B, H)`` (the sequence split over ranks with reduce_scatter_embeddings).

    Raises:
        ValueError: the vocabulary size is not divisible by the tensor-parallel size.
    """

    def __init__(self, num_embeddings, embedding_dim, *, init_method, reduce_scatter_embeddings=False, config,
                 param_init_dtype=None, init_key: Optional[str] = None):
        super().__init__()
        tp = ps.get_tensor_model_parallel_world_size()
        if num_embeddings % tp:
            raise ValueError(f"The vocab size {num_embeddings} must be divisible by the tensor model parallel "
                             f"size {tp}.")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.reduce_scatter_embeddings = bool(reduce_scatter_embeddings) and tp > 1
        self.config = config
        self.seq_dim = sequence_dim(config)
        self.num_embeddings_per_partition = self.num_embeddings // tp
        self.vocab_start_index = ps.get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.tensor_parallel = tp > 1
        dtype = resolve_dtype(param_init_dtype or config.embedding_init_dtype)
        key = init_key or f"embedding{next(_auto_keys)}"
        self.weight = init_partitioned_parameter((self.num_embeddings, self.embedding_dim), 0, init_method,
                                                 config=config, dtype=dtype, name="weight", key=key + ".weight")
        self.output_reduce = None
        if self.tensor_parallel:
            group = ps.get_tensor_model_parallel_group()
            self.output_reduce = (ReduceScatterToRegion(group, self.seq_dim) if self.reduce_scatter_embeddings
                                  else ReduceFromRegion(group))

    def construct(self, input_):
        ids = input_.astype(ms.int32)
        if self.tensor_parallel:
            outside = ops.logical_or(ids < self.vocab_start_index, ids >= self.vocab_end_index)
            local = ops.select(outside, ops.zeros_like(ids), ids - self.vocab_start_index)
        else:
            local = ids
        output = ops.gather(readable(self.weight), local, 0)
        if self.tensor_parallel:
            output = output * ops.expand_dims(ops.logical_not(outside), -1).astype(output.dtype)
            output = self.output_reduce(output)
        return output
