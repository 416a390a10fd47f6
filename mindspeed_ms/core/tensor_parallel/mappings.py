"""Megatron's tensor- and sequence-parallel region mappings.

Inside a tensor-parallel region every rank holds a shard; outside it, activations are replicated
(or, with sequence parallelism, split along the sequence). Because every rank of a tensor-parallel
group computes the same loss from replicated activations, the backward passes are not the
mathematical adjoints of the collectives (see ``communication.autograd`` for those) but the ones
that keep replicated gradients replicated:

=============================================  ==========================  ===========================
mapping                                        forward                     backward
=============================================  ==========================  ===========================
copy_to_tensor_model_parallel_region           identity                    all-reduce
reduce_from_tensor_model_parallel_region       all-reduce                  identity
scatter_to_tensor_model_parallel_region        keep own chunk (last dim)   all-gather (last dim)
gather_from_tensor_model_parallel_region       all-gather (last dim)       keep own chunk (last dim)
scatter_to_sequence_parallel_region            keep own chunk (seq dim)    all-gather (seq dim)
gather_from_sequence_parallel_region           all-gather (seq dim)        reduce-scatter (seq dim)*
reduce_scatter_to_sequence_parallel_region     reduce-scatter (seq dim)    all-gather (seq dim)
=============================================  ==========================  ===========================

(*) or keep own chunk when the consumer's output gradient is not tensor-parallel.

All are ``nn.Cell`` objects with a ``bprop`` (MindSpore's custom backward), cached per group and
dimension, and built only on :mod:`mindspeed_ms.core.communication`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "split_along_dim",
]


def split_along_dim(x: Tensor, group: comm.ProcessGroup, dim: int) -> Tensor:
    """This rank's equal chunk of ``x`` along ``dim`` (ValueError if not divisible)."""
    if group.size == 1:
        return x
    dim = dim % len(x.shape)
    if x.shape[dim] % group.size:
        raise ValueError(
            f"cannot split dimension {dim} of size {x.shape[dim]} over the {group.kind} group of size {group.size}")
    return ops.chunk(x, group.size, axis=dim)[group.rank]


class _CopyToRegion(nn.Cell):
    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (comm.all_reduce(dout, self.group),)


class _ReduceFromRegion(nn.Cell):
    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return comm.all_reduce(x, self.group)

    def bprop(self, x, out, dout):
        return (dout,)


class _ScatterToRegion(nn.Cell):
    def __init__(self, group, dim):
        super().__init__()
        self.group = group
        self.dim = dim

    def construct(self, x):
        return split_along_dim(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (comm.all_gather(dout, self.group, self.dim),)


class _GatherFromRegion(nn.Cell):
    def __init__(self, group, dim, grad_mode):
        super().__init__()
        self.group = group
        self.dim = dim
        self.grad_mode = grad_mode  # 'split' or 'reduce_scatter'

    def construct(self, x):
        return comm.all_gather(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        if self.grad_mode == "reduce_scatter":
            return (comm.reduce_scatter(dout, self.group, self.dim),)
        return (split_along_dim(dout, self.group, self.dim),)


class _ReduceScatterToRegion(nn.Cell):
    def __init__(self, group, dim):
        super().__init__()
        self.group = group
        self.dim = dim

    def construct(self, x):
        return comm.reduce_scatter(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (comm.all_gather(dout, self.group, self.dim),)


_cache: Dict[Tuple, nn.Cell] = {}


def _cell(key, factory):
    cell = _cache.get(key)
    if cell is None:
        cell = factory()
        _cache[key] = cell
    return cell


def _tp_group(group: Optional[comm.ProcessGroup]) -> comm.ProcessGroup:
    return group if group is not None else ps.get_tensor_model_parallel_group()


def copy_to_tensor_model_parallel_region(x: Tensor, group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """Identity forward; all-reduce of the gradient backward."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    return _cell(("copy", group), lambda: _CopyToRegion(group))(x)


def reduce_from_tensor_model_parallel_region(x: Tensor, group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """All-reduce forward; identity backward."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    return _cell(("reduce", group), lambda: _ReduceFromRegion(group))(x)


def scatter_to_tensor_model_parallel_region(x: Tensor, group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """Keep this rank's chunk of the last dimension; all-gather the gradient."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    dim = len(x.shape) - 1
    return _cell(("scatter", group, dim), lambda: _ScatterToRegion(group, dim))(x)


def gather_from_tensor_model_parallel_region(x: Tensor, group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """All-gather the last dimension; keep this rank's chunk of the gradient."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    dim = len(x.shape) - 1
    return _cell(("gather", group, dim, "split"), lambda: _GatherFromRegion(group, dim, "split"))(x)


def scatter_to_sequence_parallel_region(x: Tensor, seq_dim: int = 0,
                                        group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """Keep this rank's chunk of the sequence dimension; all-gather the gradient."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    seq_dim = seq_dim % len(x.shape)
    return _cell(("scatter", group, seq_dim), lambda: _ScatterToRegion(group, seq_dim))(x)


def gather_from_sequence_parallel_region(x: Tensor, seq_dim: int = 0, tensor_parallel_output_grad: bool = True,
                                         group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """All-gather the sequence dimension.

    Backward: reduce-scatter when the consumer is tensor-parallel (each rank holds a partial
    gradient of the full sequence), otherwise keep this rank's chunk.
    """
    group = _tp_group(group)
    if group.size == 1:
        return x
    seq_dim = seq_dim % len(x.shape)
    mode = "reduce_scatter" if tensor_parallel_output_grad else "split"
    return _cell(("gather", group, seq_dim, mode), lambda: _GatherFromRegion(group, seq_dim, mode))(x)


def reduce_scatter_to_sequence_parallel_region(x: Tensor, seq_dim: int = 0,
                                               group: Optional[comm.ProcessGroup] = None) -> Tensor:
    """Reduce-scatter along the sequence dimension; all-gather the gradient."""
    group = _tp_group(group)
    if group.size == 1:
        return x
    seq_dim = seq_dim % len(x.shape)
    return _cell(("rs", group, seq_dim), lambda: _ReduceScatterToRegion(group, seq_dim))(x)
