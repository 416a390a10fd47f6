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

The functions above call ``nn.Cell`` objects with a ``bprop`` (MindSpore's custom backward),
cached per group and dimension, built on the eager collectives of
:mod:`mindspeed_ms.core.communication`. The parallel layers hold mapping cells of their own
(:class:`CopyToRegion`, :class:`ReduceFromRegion`, :class:`ScatterToRegion`,
:class:`GatherFromRegion`, :class:`ReduceScatterToRegion`), each with two forms of the same
mapping: the eager one, and a graph one for model chunks that run compiled
(:func:`use_graph_collectives`), made of the graph collectives of
:mod:`mindspeed_ms.core.communication.graph_collectives`, zero padding and ``narrow``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.communication.graph_collectives import (GraphAllGather, GraphAllReduce, GraphReduceScatter,
                                                                GroupSlot)

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "split_along_dim",
    "CopyToRegion",
    "ReduceFromRegion",
    "ScatterToRegion",
    "GatherFromRegion",
    "ReduceScatterToRegion",
    "use_graph_collectives",
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


# ---- eager forms: the collectives of core.communication, with Megatron's backward passes ----------

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


# ---- graph forms: compiled with the model chunk (communication.graph_collectives) -----------------
# Only the two mappings whose backward is no adjoint of their forward have a custom bprop; the
# sequence-parallel ones are composed from them, the graph collectives (differentiated
# automatically) and narrow/zero-padding, which is what MindSpore 2.10 compiles reliably (custom
# bprops around all-gathers and chunks fail in the backward's compilation).

class _GraphCopyToRegion(nn.Cell):
    def __init__(self, group):
        super().__init__()
        self.all_reduce = GraphAllReduce(group, "sum")

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class _GraphReduceFromRegion(nn.Cell):
    def __init__(self, group):
        super().__init__()
        self.all_reduce = GraphAllReduce(group, "sum")

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class _GraphScatterToRegion(nn.Cell):
    """This rank's chunk of a copy into the region: the chunk's zero-padded gradient is summed
    over the group, which is the all-gather of the gradient."""

    def __init__(self, group, dim):
        super().__init__()
        self.dim = dim
        self.size = int(group.size)
        self.rank = int(group.rank)
        self.copy = _GraphCopyToRegion(group)

    def construct(self, x):
        dim = self.dim
        if dim < 0:
            dim = dim + len(x.shape)
        length = x.shape[dim] // self.size
        return ops.narrow(self.copy(x), dim, self.rank * length, length)


class _GraphGatherFromRegion(nn.Cell):
    """All-gather; the backward is the reduce-scatter (the gather's adjoint) or, for ``'split'``,
    this rank's chunk of the gradient (the zero-padded tensor reduced from the region)."""

    def __init__(self, group, dim, grad_mode):
        super().__init__()
        self.reduce_scatter_grad = grad_mode == "reduce_scatter"
        self.gather = GraphAllGather(group, dim)
        self.slot = GroupSlot(group, dim)
        self.reduce = _GraphReduceFromRegion(group)

    def construct(self, x):
        if self.reduce_scatter_grad:
            return self.gather(x)
        return self.reduce(self.slot(x))


# ---- the mappings the layers hold ------------------------------------------------------------------

class _RegionMapping(nn.Cell):
    """A mapping bound to one group: its eager form in PyNative mode, its graph form compiled.

    ``graph_comm`` picks the form (a Python constant of the graph, so ``ms.jit`` never parses the
    eager one); :func:`use_graph_collectives` switches every mapping of a model chunk that runs
    compiled. Both forms give the same values and gradients.
    """

    def __init__(self, eager: nn.Cell, graph: nn.Cell):
        super().__init__()
        self.eager = eager
        self.graph = graph
        self.graph_comm = False

    def construct(self, x):
        if self.graph_comm:
            return self.graph(x)
        return self.eager(x)


class CopyToRegion(_RegionMapping):
    """Identity forward; all-reduce of the gradient backward (``copy_to_tensor_model_parallel_region``)."""

    def __init__(self, group):
        super().__init__(_CopyToRegion(group), _GraphCopyToRegion(group))


class ReduceFromRegion(_RegionMapping):
    """All-reduce forward; identity backward (``reduce_from_tensor_model_parallel_region``)."""

    def __init__(self, group):
        super().__init__(_ReduceFromRegion(group), _GraphReduceFromRegion(group))


class ScatterToRegion(_RegionMapping):
    """Keep this rank's chunk along ``dim``; all-gather the gradient."""

    def __init__(self, group, dim):
        super().__init__(_ScatterToRegion(group, dim), _GraphScatterToRegion(group, dim))


class GatherFromRegion(_RegionMapping):
    """All-gather along ``dim``; backward reduce-scatter (``grad_mode='reduce_scatter'``) or keep
    this rank's chunk (``'split'``)."""

    def __init__(self, group, dim, grad_mode):
        if grad_mode not in ("split", "reduce_scatter"):
            raise ValueError(f"GatherFromRegion: grad_mode must be 'split' or 'reduce_scatter', got {grad_mode!r}")
        super().__init__(_GatherFromRegion(group, dim, grad_mode), _GraphGatherFromRegion(group, dim, grad_mode))


class ReduceScatterToRegion(_RegionMapping):
    """Reduce-scatter along ``dim``; all-gather the gradient (the reduce-scatter's adjoint)."""

    def __init__(self, group, dim):
        super().__init__(_ReduceScatterToRegion(group, dim), GraphReduceScatter(group, dim))


def use_graph_collectives(module, enabled: bool = True) -> int:
    """Switch the region mappings (and other cells with a ``graph_comm`` form) inside ``module``
    to their graph collectives, for a model chunk that runs compiled (or back, ``enabled=False``).

    Returns:
        The number of cells switched.
    """
    count = 0
    for _, cell in module.cells_and_names():
        if hasattr(cell, "graph_comm"):
            cell.graph_comm = bool(enabled)
            count += 1
    return count


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
