"""The collectives every parallel layer uses, for any :class:`ProcessGroup`.

These functions are not differentiable by themselves; :mod:`.autograd` wraps them with the
mathematically correct backward passes, and :mod:`mindspeed_ms.core.tensor_parallel.mappings`
builds Megatron's region mappings on top of them.

Ranks in arguments (``src``, ``peer``) are global ranks, as in ``torch.distributed``.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, ops

from .backends import _REDUCE_OPS, _split_sizes_or_even, get_backend
from .groups import ProcessGroup, get_rank, world_group
from .timing import timed_call

__all__ = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "all_to_all_v",
    "broadcast",
    "barrier",
    "send",
    "recv",
    "exchange",
]


def _check_member(group: ProcessGroup, what: str) -> None:
    if group.size > 1 and get_rank() not in group:
        raise ValueError(f"{what}: rank {get_rank()} is not a member of the {group.kind} group {list(group.ranks)}")


def _norm_dim(x: Tensor, dim: int, what: str) -> int:
    nd = len(x.shape)
    if not -nd <= dim < nd:
        raise ValueError(f"{what}: dim {dim} is out of range for a tensor of rank {nd}")
    return dim % nd


def all_reduce(x: Tensor, group: Optional[ProcessGroup] = None, op: str = "sum") -> Tensor:
    """Reduce ``x`` over the group; every member gets the result.

    Args:
        x: The local tensor.
        group: The group (default: world).
        op: One of ``"sum"``, ``"max"``, ``"min"``, ``"avg"``.

    Returns:
        The reduced tensor (a new tensor; ``x`` is unchanged).
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {_REDUCE_OPS}, got {op!r}")
    group = group or world_group()
    if group.size == 1:
        return x
    _check_member(group, "all_reduce")
    return timed_call("all_reduce", group, x, get_backend().all_reduce, x, group, op)


def all_gather(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Concatenate every member's ``x`` along ``dim``, in group order."""
    group = group or world_group()
    if group.size == 1:
        return x
    _check_member(group, "all_gather")
    return timed_call("all_gather", group, x, get_backend().all_gather, x, group, _norm_dim(x, dim, "all_gather"))


def reduce_scatter(x: Tensor, group: Optional[ProcessGroup] = None, dim: int = 0) -> Tensor:
    """Sum ``x`` over the group and keep this member's equal chunk along ``dim``."""
    group = group or world_group()
    if group.size == 1:
        return x
    _check_member(group, "reduce_scatter")
    dim = _norm_dim(x, dim, "reduce_scatter")
    if x.shape[dim] % group.size:
        raise ValueError(
            f"reduce_scatter: dimension {dim} of size {x.shape[dim]} is not divisible by the "
            f"{group.kind} group size {group.size}")
    return timed_call("reduce_scatter", group, x, get_backend().reduce_scatter, x, group, dim)


def all_to_all(x: Tensor, group: Optional[ProcessGroup] = None, split_dim: int = 0,
               concat_dim: int = 0) -> Tensor:
    """Even all-to-all: split ``x`` into ``n`` chunks along ``split_dim``, send chunk ``j`` to
    member ``j``, and concatenate the received chunks along ``concat_dim`` in group order."""
    group = group or world_group()
    if group.size == 1:
        return x
    _check_member(group, "all_to_all")
    split_dim = _norm_dim(x, split_dim, "all_to_all")
    concat_dim = _norm_dim(x, concat_dim, "all_to_all")
    if x.shape[split_dim] % group.size:
        raise ValueError(
            f"all_to_all: split dimension {split_dim} of size {x.shape[split_dim]} is not divisible "
            f"by the {group.kind} group size {group.size}")
    return timed_call("all_to_all", group, x, get_backend().all_to_all, x, group, split_dim, concat_dim)


def all_to_all_v(x: Tensor, send_splits: Optional[Sequence[int]] = None,
                 recv_splits: Optional[Sequence[int]] = None,
                 group: Optional[ProcessGroup] = None) -> Tensor:
    """All-to-all along dim 0 with uneven split sizes.

    Args:
        x: Rows to send; ``send_splits[j]`` consecutive rows go to member ``j``.
        send_splits: Rows per destination (default: even split).
        recv_splits: Rows expected from each member. Optional: when omitted the sizes are
            exchanged first; when given they are checked against what the senders send.
        group: The group (default: world).

    Returns:
        The received rows, concatenated in group order.
    """
    group = group or world_group()
    sizes = _split_sizes_or_even(int(x.shape[0]), group.size, send_splits, "all_to_all_v send_splits")
    if group.size == 1:
        if recv_splits is not None and list(recv_splits) != sizes:
            raise ValueError(f"all_to_all_v: recv_splits {list(recv_splits)} differ from send_splits {sizes}")
        return x
    _check_member(group, "all_to_all_v")
    if recv_splits is not None:
        recv_splits = [int(s) for s in recv_splits]
        if len(recv_splits) != group.size:
            raise ValueError(f"all_to_all_v: expected {group.size} recv_splits, got {len(recv_splits)}")
    return timed_call("all_to_all_v", group, x, get_backend().all_to_all_v, x, group, sizes, recv_splits)


def broadcast(x: Tensor, src: int, group: Optional[ProcessGroup] = None) -> Tensor:
    """Every member receives the tensor of global rank ``src`` (all pass a same-shape tensor)."""
    group = group or world_group()
    if group.size == 1:
        return x
    _check_member(group, "broadcast")
    if src not in group:
        raise ValueError(f"broadcast: src rank {src} is not in the {group.kind} group {list(group.ranks)}")
    return timed_call("broadcast", group, x, get_backend().broadcast, x, group, int(src))


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Block until every member arrives."""
    group = group or world_group()
    if group.size == 1:
        return
    _check_member(group, "barrier")
    get_backend().all_reduce(ops.ones((1,), ms.float32), group, "sum").asnumpy()


def exchange(sends: Optional[Mapping[int, Tensor]] = None,
             recvs: Optional[Mapping[int, Tuple[Sequence[int], ms.dtype]]] = None) -> Dict[int, Tensor]:
    """Point-to-point transfers with pipeline neighbours, as one batch.

    Sends ``sends[peer]`` to each peer and receives, from each peer in ``recvs``, a tensor of
    the given ``(shape, dtype)``. Both ends of every pair must call this with matching entries
    (what one sends, the other receives, with equal shapes). Sending to one neighbour while
    receiving from the other, or to and from the same neighbour, are both one call.

    Args:
        sends: ``{global_peer_rank: tensor}``.
        recvs: ``{global_peer_rank: (shape, dtype)}``.

    Returns:
        ``{global_peer_rank: received_tensor}`` for every entry of ``recvs``.
    """
    sends = dict(sends or {})
    recvs = {int(p): (tuple(int(d) for d in s), dt) for p, (s, dt) in (recvs or {}).items()}
    me = get_rank()
    for peer in list(sends) + list(recvs):
        if peer == me:
            raise ValueError(f"exchange: rank {me} cannot send to or receive from itself")
    if not sends and not recvs:
        return {}
    group = world_group()
    return timed_call("exchange", group, None, get_backend().exchange, sends, recvs, group)


def send(x: Tensor, dst: int) -> None:
    """Send ``x`` to global rank ``dst`` (which must call :func:`recv` with the same shape)."""
    exchange(sends={dst: x})


def recv(shape: Sequence[int], dtype, src: int) -> Tensor:
    """Receive a tensor of ``shape`` and ``dtype`` from global rank ``src``."""
    return exchange(recvs={src: (shape, dtype)})[src]
