"""The float collectives as cells that ``ms.jit`` compiles: static shapes, no host round trips.

:mod:`.collectives` runs eagerly (it checks its arguments, converts dtypes on the host, times the
call); none of that can be graph code. The cells here carry the same semantics for the float
tensors that flow through a model's forward and backward pass (float32, float16, bfloat16 and,
for the cross entropy's statistics on CPU, float64), so that a model chunk whose layers
communicate can be one compiled graph. Each cell is built for one group (and dimension); the
group's size and this rank's position in it are Python constants of the graph.

On the composed backend (CPU, :class:`~.backends.ComposedBackend`) every collective is a
sum-AllReduce, which MindSpore's CPU backend runs inside compiled graphs on the world group and
on sub-groups: an all-gather places this rank's tensor at its offset in a zero buffer and sums,
a reduce-scatter sums and keeps its slice. The values equal the eager composed collectives' bit
for bit (sums with zeros are exact; float64 travels as a float32 head and remainder, as there).
On the native backend (HCCL, NCCL) the cells call MindSpore's AllGather / ReduceScatter
primitives. Which one runs is :func:`~.backends.get_backend`'s choice, read once when a cell is
built.

The cells have no custom backward: MindSpore's automatic differentiation gives each the adjoint
collective (a sum-AllReduce's gradient is a sum-AllReduce, so the composed all-gather's gradient
is a reduce-scatter and the reverse; the native primitives have the same pairs built in).
Megatron's region mappings, whose backward passes differ from the adjoints, are composed from
these in :mod:`mindspeed_ms.core.tensor_parallel.mappings`.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .backends import get_backend
from .groups import ProcessGroup

__all__ = ["GraphAllReduce", "GraphAllGather", "GraphReduceScatter", "GroupSlot"]


def _composed() -> bool:
    return get_backend().name == "composed"


class _WireSum(nn.Cell):
    """Sum-AllReduce in the dtypes the CPU AllReduce takes (float32/float16): bfloat16 widens
    exactly, float64 goes as a float32 head plus the float32 remainder (as the eager composed
    backend sends it)."""

    def __init__(self, group_name: str):
        super().__init__()
        self.sum = ops.AllReduce(op=ops.ReduceOp.SUM, group=group_name)

    def construct(self, x):
        if x.dtype == ms.float64:
            head = x.astype(ms.float32)
            tail = (x - head.astype(ms.float64)).astype(ms.float32)
            both = self.sum(ops.stack((head, tail)))
            return both[0].astype(ms.float64) + both[1].astype(ms.float64)
        if x.dtype == ms.bfloat16:
            return self.sum(x.astype(ms.float32)).astype(ms.bfloat16)
        return self.sum(x)


# Chunks are cut with ops.narrow, not ops.split: a split inside a cell with a custom bprop (the
# region mappings') breaks the backward's compilation ("The pointer[func_graph->get_return()] is
# null", MindSpore 2.10).

class GroupSlot(nn.Cell):
    """``x`` placed at this member's slot along ``dim`` of a zero tensor ``size`` times as long
    there (group order): what a sum over the group turns into the all-gather, exactly.

    Args:
        group: The group.
        dim: The dimension (negative counts from the end).
    """

    def __init__(self, group: ProcessGroup, dim: int):
        super().__init__()
        self.size = int(group.size)
        self.rank = int(group.rank)
        self.dim = int(dim)

    def construct(self, x):
        dim = self.dim
        if dim < 0:
            dim = dim + len(x.shape)
        shape = x.shape
        parts = ()
        if self.rank > 0:
            parts = parts + (ops.zeros(shape[:dim] + (self.rank * shape[dim],) + shape[dim + 1:], x.dtype),)
        parts = parts + (x,)
        if self.rank < self.size - 1:
            after = (self.size - 1 - self.rank) * shape[dim]
            parts = parts + (ops.zeros(shape[:dim] + (after,) + shape[dim + 1:], x.dtype),)
        return ops.concat(parts, dim)


class _GroupCell(nn.Cell):
    """A cell bound to one group of more than one rank."""

    def __init__(self, group: ProcessGroup):
        super().__init__()
        if group.size < 2:
            raise ValueError(f"graph collectives need a group of more than one rank, got {group.kind} "
                             f"group {list(group.ranks)}")
        self.size = int(group.size)
        self.rank = int(group.rank)
        self.composed = _composed()
        self.wire_sum = _WireSum(group.name)
        self.sum = ops.AllReduce(op=ops.ReduceOp.SUM, group=group.name)


class GraphAllReduce(_GroupCell):
    """Reduce over the group (``op``: ``'sum'`` or ``'max'``); every member gets the result.

    Args:
        group: The group (more than one rank).
        op: ``'sum'`` or ``'max'``.
    """

    def __init__(self, group: ProcessGroup, op: str = "sum"):
        super().__init__(group)
        if op not in ("sum", "max"):
            raise ValueError(f"GraphAllReduce: op must be 'sum' or 'max', got {op!r}")
        self.use_max = op == "max"
        # the composed backend gathers and takes the maximum itself (no MAX kernel on sub-groups)
        self.max = None if self.composed else ops.AllReduce(op=ops.ReduceOp.MAX, group=group.name)
        self.stack_slot = GroupSlot(group, 0)

    def construct(self, x):
        if not self.composed:
            if self.use_max:
                return self.max(x)
            return self.sum(x)
        if not self.use_max:
            return self.wire_sum(x)
        # every member's x on a new leading axis in group order (exact: one value per slot)
        return self.wire_sum(self.stack_slot(ops.expand_dims(x, 0))).max(axis=0)


class GraphAllGather(_GroupCell):
    """Concatenate every member's ``x`` along ``dim`` (group order).

    Args:
        group: The group (more than one rank).
        dim: The dimension (negative counts from the end).
    """

    def __init__(self, group: ProcessGroup, dim: int):
        super().__init__(group)
        self.dim = int(dim)
        self.gather = None if self.composed else ops.AllGather(group=group.name)
        self.slot = GroupSlot(group, dim)

    def construct(self, x):
        if self.composed:
            return self.wire_sum(self.slot(x))
        dim = self.dim
        if dim < 0:
            dim = dim + len(x.shape)
        if dim == 0:
            return self.gather(x)
        return ops.swapaxes(self.gather(ops.swapaxes(x, 0, dim)), 0, dim)


class GraphReduceScatter(_GroupCell):
    """Sum over the group and keep this member's equal chunk along ``dim``.

    Args:
        group: The group (more than one rank).
        dim: The dimension (negative counts from the end); its size must be divisible by the
            group size.
    """

    def __init__(self, group: ProcessGroup, dim: int):
        super().__init__(group)
        self.dim = int(dim)
        self.scatter = None if self.composed else ops.ReduceScatter(op=ops.ReduceOp.SUM, group=group.name)

    def construct(self, x):
        dim = self.dim
        if dim < 0:
            dim = dim + len(x.shape)
        if not self.composed:
            if dim == 0:
                return self.scatter(x)
            return ops.swapaxes(self.scatter(ops.swapaxes(x, 0, dim)), 0, dim)
        total = self.wire_sum(x)
        length = x.shape[dim] // self.size
        return ops.narrow(total, dim, self.rank * length, length)
