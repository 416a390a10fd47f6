"""Ulysses context parallelism: trade the sequence split for a head split around attention.

Before attention an all-to-all over the Ulysses group scatters the heads and gathers the
sequence: ``(B, N, L, D)`` on each of ``u`` ranks becomes ``(B, N / u, u * L, D)``, so each rank
holds every token of the group for ``1 / u`` of the heads and can run ordinary attention (the
fused flash-attention kernel on Ascend, the blockwise or plain attention on CPU). A second
all-to-all brings the output back to the sequence split. Both all-to-alls are the differentiable
ones of :mod:`mindspeed_ms.core.communication.autograd`, whose backward is the reverse
all-to-all, so autodiff through the attention in between gives the exact gradients.

The gathered sequence comes in rank order (rank 0's two load-balanced chunks, then rank 1's,
...); it is reordered by global position before the attention and back after, so that the
attention sees its tokens in their natural order and can apply the causal mask by index.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from mindspore import Tensor, ops

from mindspeed_ms.core import communication as comm

from .layout import check_ulysses_heads, position_runs, take_runs

__all__ = ["ulysses_scatter_heads", "ulysses_gather_heads", "ulysses_attention"]


def ulysses_scatter_heads(x: Tensor, group) -> Tensor:
    """``(B, N, L, D) -> (B, N / u, u * L, D)``: heads scattered, sequence gathered in group order.

    Differentiable (backward: :func:`ulysses_gather_heads` of the gradient).
    """
    return comm.autograd.all_to_all(x, group, split_dim=1, concat_dim=2)


def ulysses_gather_heads(x: Tensor, group) -> Tensor:
    """``(B, N / u, u * L, D) -> (B, N, L, D)``: the inverse of :func:`ulysses_scatter_heads`."""
    return comm.autograd.all_to_all(x, group, split_dim=2, concat_dim=1)


def _index_runs(order: np.ndarray):
    """``order`` (a permutation) as runs of consecutive source indices ``(start, stop)``."""
    return [(int(order[a]), int(order[b - 1]) + 1) for a, b in position_runs(order)]


def _expand_kv_heads(k: Tensor, v: Tensor, heads: int, degree: int):
    """Repeat K/V heads so their number divides by the Ulysses degree, keeping the GQA grouping.

    Query head ``h`` uses K/V head ``h // (N / Nk)``. Repeating each K/V head ``f`` times (with
    ``Nk * f = lcm(Nk, degree)``, which divides ``N``) keeps that mapping and lets every Ulysses
    rank receive whole groups.
    """
    kv_heads = int(k.shape[1])
    if kv_heads % degree == 0:
        return k, v
    factor = degree // math.gcd(kv_heads, degree)
    if heads % (kv_heads * factor):
        raise ValueError(f"Ulysses: cannot split {kv_heads} key/value heads for {heads} query heads over "
                         f"{degree} ranks")
    return ops.repeat_interleave(k, factor, 1), ops.repeat_interleave(v, factor, 1)


def _scatter_qkv(q: Tensor, k: Tensor, v: Tensor, group):
    """:func:`ulysses_scatter_heads` of q, k and v in one all-to-all (one collective instead of three).

    Each tensor's heads are viewed as ``(u, heads / u)`` and the three are concatenated on the
    inner axis, so that the ``j``-th of ``u`` equal head chunks of the result is exactly
    ``[q_j, k_j, v_j]``: the all-to-all then delivers every rank its three pieces together.
    """
    degree = group.size
    b, _, length, d = q.shape
    nq, nk = int(q.shape[1]) // degree, int(k.shape[1]) // degree
    if q.dtype != k.dtype or k.dtype != v.dtype:
        return tuple(ulysses_scatter_heads(x, group) for x in (q, k, v))
    packed = ops.concat([x.reshape(b, degree, x.shape[1] // degree, length, d) for x in (q, k, v)], axis=2)
    mixed = ulysses_scatter_heads(packed.reshape(b, degree * (nq + 2 * nk), length, d), group)
    return tuple(ops.split(mixed, [nq, nk, nk], axis=1))


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, attention_fn: Callable[..., Tensor], group,
                      member_positions: Sequence[np.ndarray]) -> Tensor:
    """Attention with the sequence gathered and the heads scattered over ``group``.

    Args:
        q: This rank's queries ``(B, N, L, D)`` (``N``: heads of this tensor-parallel rank).
        k: Keys ``(B, Nk, L, D)``.
        v: Values ``(B, Nk, L, D)``.
        attention_fn: ``attention_fn(q, k, v, positions) -> out`` on ``(B, N / u, u * L, D)``
            tensors whose sequence is sorted by global position; ``positions`` are those sorted
            global positions (``arange(S)`` when the group holds the whole sequence).
        group: The Ulysses group (size ``u``).
        member_positions: Global positions of each member's ``L`` tokens, in group order.

    Returns:
        ``(B, N, L, D)``: this rank's tokens, all heads.

    Raises:
        ValueError: ``N`` is not divisible by ``u``.
    """
    degree = group.size
    heads = int(q.shape[1])
    check_ulysses_heads(heads, degree)
    if degree == 1:
        pos = np.asarray(member_positions[0], dtype=np.int64)
        order = np.argsort(pos, kind="stable")
        runs, back = _index_runs(order), _index_runs(np.argsort(order, kind="stable"))
        out = attention_fn(take_runs(q, 2, runs), take_runs(k, 2, runs), take_runs(v, 2, runs), pos[order])
        return take_runs(out, 2, back)
    k, v = _expand_kv_heads(k, v, heads, degree)
    positions = np.concatenate([np.asarray(p, dtype=np.int64) for p in member_positions])
    order = np.argsort(positions, kind="stable")
    to_sorted = _index_runs(order)
    from_sorted = _index_runs(np.argsort(order, kind="stable"))
    qs, ks, vs = (take_runs(x, 2, to_sorted) for x in _scatter_qkv(q, k, v, group))
    out = attention_fn(qs, ks, vs, positions[order])
    return ulysses_gather_heads(take_runs(out, 2, from_sorted), group)
