"""Differentiable collectives.

Each function here is a collective whose backward pass is the adjoint collective, so that
``mindspore.grad`` through it gives the gradient of the sum of all ranks' objectives:

==================  ==========================================
forward             backward
==================  ==========================================
all_reduce (sum)    all_reduce (sum)
all_gather          reduce_scatter
reduce_scatter      all_gather
all_to_all          all_to_all with split/concat dims swapped
all_to_all_v        all_to_all_v with send/recv splits swapped
broadcast           sum of gradients, kept on the source rank
==================  ==========================================

They are built as ``nn.Cell`` objects with a ``bprop`` method (MindSpore's custom-backward
mechanism), cached per group and arguments. The Megatron region mappings (copy-to, reduce-from,
...) have different, replication-aware backward passes and live in ``tensor_parallel.mappings``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from mindspore import Tensor, nn, ops

from . import collectives as C
from .groups import ProcessGroup, get_rank, world_group

__all__ = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_v", "broadcast"]


class _AllReduceSum(nn.Cell):
    def __init__(self, group):
        super().__init__()
        self.group = group

    def construct(self, x):
        return C.all_reduce(x, self.group)

    def bprop(self, x, out, dout):
        return (C.all_reduce(dout, self.group),)


class _AllGather(nn.Cell):
    def __init__(self, group, dim):
        super().__init__()
        self.group = group
        self.dim = dim

    def construct(self, x):
        return C.all_gather(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (C.reduce_scatter(dout, self.group, self.dim),)


class _ReduceScatter(nn.Cell):
    def __init__(self, group, dim):
        super().__init__()
        self.group = group
        self.dim = dim

    def construct(self, x):
        return C.reduce_scatter(x, self.group, self.dim)

    def bprop(self, x, out, dout):
        return (C.all_gather(dout, self.group, self.dim),)


class _AllToAll(nn.Cell):
    def __init__(self, group, split_dim, concat_dim):
        super().__init__()
        self.group = group
        self.split_dim = split_dim
        self.concat_dim = concat_dim

    def construct(self, x):
        return C.all_to_all(x, self.group, self.split_dim, self.concat_dim)

    def bprop(self, x, out, dout):
        return (C.all_to_all(dout, self.group, self.concat_dim, self.split_dim),)


class _AllToAllV(nn.Cell):
    def __init__(self, group, send_splits, recv_splits):
        super().__init__()
        self.group = group
        self.send_splits = list(send_splits)
        self.recv_splits = list(recv_splits)

    def construct(self, x):
        return C.all_to_all_v(x, self.send_splits, self.recv_splits, self.group)

    def bprop(self, x, out, dout):
        return (C.all_to_all_v(dout, self.recv_splits, self.send_splits, self.group),)


class _Broadcast(nn.Cell):
    def __init__(self, group, src):
        super().__init__()
        self.group = group
        self.src = src

    def construct(self, x):
        return C.broadcast(x, self.src, self.group)

    def bprop(self, x, out, dout):
        total = C.all_reduce(dout, self.group)
        if get_rank() != self.src:
            total = ops.zeros_like(total)
        return (total,)


_cells: Dict[Tuple, nn.Cell] = {}


def _cached(key, factory):
    cell = _cells.get(key)
    if cell is None:
        cell = factory()
        _cells[key] = cell
    return cell


def all_reduce(x: Tensor, group: Optional[ProcessGroup] = None) -> Tensor:
    """Differentiable sum all-reduce."""
    group = group or world_group()
    if group.size == 1:
        return x
    return _cached(("ar", group), lambda: _AllReduceSum(group))(x)


def all_gather(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Differentiable all-gather along ``dim`` (backward: reduce-scatter)."""
    group = group or world_group()
    if group.size == 1:
        return x
    dim = dim % len(x.shape)
    return _cached(("ag", group, dim), lambda: _AllGather(group, dim))(x)


def reduce_scatter(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Differentiable reduce-scatter along ``dim`` (backward: all-gather)."""
    group = group or world_group()
    if group.size == 1:
        return x
    dim = dim % len(x.shape)
    return _cached(("rs", group, dim), lambda: _ReduceScatter(group, dim))(x)


def all_to_all(x: Tensor, group: Optional[ProcessGroup] = None, split_dim: int = 0,
               concat_dim: int = 0) -> Tensor:
    """Differentiable even all-to-all (backward: the reverse all-to-all)."""
    group = group or world_group()
    if group.size == 1:
        return x
    nd = len(x.shape)
    split_dim, concat_dim = split_dim % nd, concat_dim % nd
    return _cached(("a2a", group, split_dim, concat_dim), lambda: _AllToAll(group, split_dim, concat_dim))(x)


def all_to_all_v(x: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                 group: Optional[ProcessGroup] = None) -> Tensor:
    """Differentiable uneven all-to-all along dim 0 (backward: splits swapped).

    Both split lists are required: the backward pass needs them, and the token dispatcher
    knows them after exchanging counts.
    """
    group = group or world_group()
    if group.size == 1:
        return x
    # Splits change every step: a fresh cell per call, not cached.
    return _AllToAllV(group, send_splits, recv_splits)(x)


def broadcast(x: Tensor, src: int, group: Optional[ProcessGroup] = None) -> Tensor:
    """Differentiable broadcast from global rank ``src`` (backward: sum onto the source)."""
    group = group or world_group()
    if group.size == 1:
        return x
    return _cached(("bc", group, src), lambda: _Broadcast(group, src))(x)
