"""Ring attention (``megatron_cp_algo``): K/V blocks travel around the context-parallel ring.

Every rank keeps its queries and, in ``n`` steps (``n`` = ring size), sees the keys and values of
every rank: at step ``t`` it holds the K/V block of ring member ``(me - t) mod n``, computes the
attention of its queries over that block with the flash-attention block kernel
(:func:`~mindspeed_ms.core.flash_attention.attention_block_forward`), merges it into its running
result with the online softmax (:func:`~mindspeed_ms.core.flash_attention.merge_attention_blocks`),
and passes the block on to the next member (point-to-point, :func:`communication.exchange`).

Causal masking uses the tokens' global positions (the load-balanced layout of
:mod:`.layout`): each rank's sequence is a few runs of consecutive positions, and for each
(query run, key run) pair the mask is known on the host to be empty, full (the pair is skipped)
or a diagonal (a partial mask). With the load-balanced layout every step does the same work on
every rank: half of the (query, key) pairs of a block, except the local step's two diagonals.

The backward pass is a custom ``bprop`` (as in FlashAttention-2 and the ring-attention papers):
the K/V blocks travel around the ring again, now together with accumulators for their gradients.
At each step a rank adds its queries' contribution to the travelling dK/dV
(:func:`~mindspeed_ms.core.flash_attention.attention_block_backward`, which recomputes the
probabilities from the saved final ``lse``) and its own dQ; after ``n`` steps one more transfer
brings every block's dK/dV home. Nothing of size ``S x S`` is kept between the passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.flash_attention import (attention_block_backward, attention_block_forward,
                                               merge_attention_blocks)

from .layout import local_positions, position_runs, take_runs

__all__ = ["ring_attention", "RingPlan"]

Runs = Tuple[Tuple[int, int], ...]


def _value_runs(values: np.ndarray) -> Runs:
    """Runs of consecutive values as ``(first_value, last_value + 1)`` (slices of a global axis)."""
    return tuple((int(values[a]), int(values[b - 1]) + 1) for a, b in position_runs(values))


@dataclass(frozen=True)
class _Call:
    """One block-kernel call of a ring step: some of this rank's query runs against some key runs."""

    rows: Tuple[int, ...]       # indices of this rank's query runs (segments)
    cols: Tuple[int, ...]       # indices of the source's key runs
    row_index: Runs             # index runs into the local query sequence
    col_index: Runs             # index runs into the received key sequence
    row_pos: Runs               # runs of global query positions (rows of a full mask)
    col_pos: Runs               # runs of global key positions (columns of a full mask)
    causal_mask: Optional[np.ndarray]   # (rows, cols) bool, True = masked; None: nothing masked


class RingPlan:
    """Which query rows meet which key columns at every ring step (pure host-side bookkeeping).

    Args:
        positions: Global positions of every ring member's sequence, in member order (each a 1-D
            integer array, all of the same length).
        me: This rank's position in the ring.
        causal: Mask keys whose position is after the query's.
    """

    def __init__(self, positions: Sequence[np.ndarray], me: int, causal: bool):
        self.positions = [np.asarray(p, dtype=np.int64) for p in positions]
        lengths = {p.shape[0] for p in self.positions}
        if len(lengths) != 1:
            raise ValueError(f"ring attention needs equal sequence lengths on every ring member, got {sorted(lengths)}")
        self.n = len(self.positions)
        self.me = int(me)
        self.causal = bool(causal)
        self.length = lengths.pop()
        # Segments of at most half a member's sequence: the two chunks of the load-balanced layout
        # stay separate even where they are adjacent (the middle rank), so that the causal
        # structure of every (query, key) segment pair is all-or-nothing or a diagonal.
        self.max_segment = max(1, (self.length + 1) // 2)
        q_pos = self.positions[self.me]
        self.q_runs = self.segments(q_pos)
        self.steps: List[Tuple[int, List[_Call]]] = []
        for t in range(self.n):
            src = (self.me - t) % self.n
            self.steps.append((src, self._calls(q_pos, self.positions[src])))

    def segments(self, pos: np.ndarray) -> List[Tuple[int, int]]:
        """Index runs of consecutive positions, cut into pieces of at most ``max_segment``."""
        out = []
        for a, b in position_runs(pos):
            out.extend((i, min(i + self.max_segment, b)) for i in range(a, b, self.max_segment))
        return out

    def _calls(self, q_pos: np.ndarray, k_pos: np.ndarray) -> List[_Call]:
        k_runs = self.segments(k_pos)
        visible = []
        for a, b in self.q_runs:
            qp = q_pos[a:b]
            cols = []
            for j, (c, d) in enumerate(k_runs):
                kp = k_pos[c:d]
                if self.causal and kp.min() > qp.max():
                    continue  # every key is after every query: fully masked, skipped
                cols.append(j)
            visible.append(tuple(cols))
        # One kernel call when all query runs see the same key runs (the common case); otherwise
        # one call per query run, so that no fully masked (query, key) pair is computed.
        if all(cols == visible[0] for cols in visible):
            groups = [(tuple(range(len(self.q_runs))), visible[0])]
        else:
            groups = [((i,), cols) for i, cols in enumerate(visible)]
        calls = []
        for rows, cols in groups:
            if not cols:
                continue
            row_index = tuple(self.q_runs[i] for i in rows)
            col_index = tuple(k_runs[j] for j in cols)
            qp = np.concatenate([q_pos[a:b] for a, b in row_index])
            kp = np.concatenate([k_pos[c:d] for c, d in col_index])
            mask = None
            if self.causal and kp.max() > qp.min():
                mask = kp[None, :] > qp[:, None]
            calls.append(_Call(rows, cols, _merge_runs(row_index), _merge_runs(col_index), _value_runs(qp),
                               _value_runs(kp), mask))
        return calls


def _merge_runs(runs: Sequence[Tuple[int, int]]) -> Runs:
    merged: List[Tuple[int, int]] = []
    for a, b in runs:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


def _normalize_full_mask(mask, total: int) -> Optional[Tensor]:
    """A 4-D bool mask ``(B|1, N|1, S|1, S|1)`` over global positions (True = masked), or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        mask = Tensor(np.asarray(mask))
    if mask.ndim < 2 or mask.ndim > 4:
        raise ValueError(f"attention_mask must have 2 to 4 dims (..., S, S), got shape {tuple(mask.shape)}")
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[2] not in (1, total) or shape[3] not in (1, total):
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} must cover the whole sequence: its last two "
                         f"dims must be {total} (or 1), since context parallelism selects rows and columns by "
                         "global position")
    if mask.ndim != 4:
        mask = mask.reshape(shape)
    if mask.dtype != ms.bool_:
        mask = mask != 0
    return mask


def _mask_block(full: Optional[Tensor], call: _Call) -> Optional[Tensor]:
    """The call's tile of the user mask (rows and columns picked by global position) OR its causal mask."""
    block = None
    if full is not None:
        block = full
        if block.shape[2] != 1:
            block = take_runs(block, 2, call.row_pos)
        if block.shape[3] != 1:
            block = take_runs(block, 3, call.col_pos)
    if call.causal_mask is not None:
        causal = Tensor(call.causal_mask[None, None])
        block = causal if block is None else ops.logical_or(block, causal)
    return block


def _dropout_multiplier(seed: int, me: int, step: int, call: int, shape, p: float) -> Optional[Tensor]:
    """Dropout multiplier ``keep / (1 - p)`` of one call, regenerated identically in the backward."""
    if p <= 0.0:
        return None
    rng = np.random.default_rng([seed, me, step, call])
    keep = rng.random(tuple(shape), dtype=np.float32) >= p
    return Tensor(keep.astype(np.float32) * np.float32(1.0 / (1.0 - p)))


def _carrier(x: Tensor) -> Tensor:
    """``x`` in a dtype that every CPU kernel used here takes (bfloat16 widened to float32, exactly).

    CPU Stack/Gather have no bfloat16 kernels; slices are cast back to the input type before the
    block kernels, so their low-precision numerics are those of the input.
    """
    return x.astype(ms.float32) if x.dtype == ms.bfloat16 else x


def _operand(x: Tensor, dtype) -> Tensor:
    return x if x.dtype == dtype else x.astype(dtype)


def _split_rows(x: Tensor, lengths: Sequence[int]) -> List[Tensor]:
    if len(lengths) == 1:
        return [x]
    return list(ops.split(x, list(lengths), axis=2))


class _RingAttention(nn.Cell):
    """The ring forward and its ring backward; one cell per (group, layout, settings), cached."""

    def __init__(self, ranks: Tuple[int, ...], plan: RingPlan, scale: float, dropout_p: float):
        super().__init__()
        self.ranks = ranks
        self.plan = plan
        self.scale = float(scale)
        self.dropout_p = float(dropout_p)
        n, me = plan.n, plan.me
        self.next_rank = ranks[(me + 1) % n]
        self.prev_rank = ranks[(me - 1) % n]

    def _pass_on(self, x: Tensor) -> Tensor:
        """Send ``x`` to the next ring member and receive the previous member's tensor of that shape."""
        got = comm.exchange(sends={self.next_rank: x}, recvs={self.prev_rank: (tuple(x.shape), x.dtype)})
        return got[self.prev_rank]

    def _seg_lengths(self, rows):
        return [self.plan.q_runs[i][1] - self.plan.q_runs[i][0] for i in rows]

    def construct(self, q, k, v, mask, seed):
        plan = self.plan
        b, n_heads, _, d = q.shape
        n_runs = len(plan.q_runs)
        outs: List[Optional[Tensor]] = [None] * n_runs
        lses: List[Optional[Tensor]] = [None] * n_runs
        qw = _carrier(q)
        kv = ops.stack([_carrier(k), _carrier(v)])
        for t, (_, calls) in enumerate(plan.steps):
            for c, call in enumerate(calls):
                qc = _operand(take_runs(qw, 2, call.row_index), q.dtype)
                kc = _operand(take_runs(kv[0], 2, call.col_index), k.dtype)
                vc = _operand(take_runs(kv[1], 2, call.col_index), v.dtype)
                drop = _dropout_multiplier(seed, plan.me, t, c, (b, n_heads, qc.shape[2], kc.shape[2]), self.dropout_p)
                o_c, lse_c = attention_block_forward(qc, kc, vc, self.scale, _mask_block(mask, call), drop)
                lengths = self._seg_lengths(call.rows)
                for seg, o_s, l_s in zip(call.rows, _split_rows(o_c, lengths), _split_rows(lse_c, lengths)):
                    if outs[seg] is None:
                        outs[seg], lses[seg] = o_s, l_s
                    else:
                        outs[seg], lses[seg] = merge_attention_blocks(outs[seg], lses[seg], o_s, l_s)
            if t < plan.n - 1:
                kv = self._pass_on(kv)
        for seg, (a, z) in enumerate(plan.q_runs):
            if outs[seg] is None:  # no key visible to these queries (cannot happen with causal layouts)
                outs[seg] = ops.zeros((b, n_heads, z - a, d), ms.float32)
                lses[seg] = ops.full((b, n_heads, z - a), float("-inf"), dtype=ms.float32)
        o = outs[0] if n_runs == 1 else ops.concat(outs, axis=2)
        lse = lses[0] if n_runs == 1 else ops.concat(lses, axis=2)
        return o.astype(q.dtype), lse

    def bprop(self, q, k, v, mask, seed, out, dout):
        plan = self.plan
        b, n_heads, _, d = q.shape
        o, lse = out
        do = dout[0].astype(ms.float32)
        of = o.astype(ms.float32)
        delta = (do * of).sum(axis=-1)
        n_runs = len(plan.q_runs)
        dq_segs: List[Optional[Tensor]] = [None] * n_runs
        # The travelling buffer: K, V (widened to float32, exact) and the float32 dK, dV accumulators.
        travel = ops.stack([k.astype(ms.float32), v.astype(ms.float32), ops.zeros(k.shape, ms.float32),
                            ops.zeros(k.shape, ms.float32)])
        qw = _carrier(q)
        for t, (_, calls) in enumerate(plan.steps):
            k_runs = plan.segments(plan.positions[plan.steps[t][0]])
            dk_parts: Dict[int, Tensor] = {}
            dv_parts: Dict[int, Tensor] = {}
            for c, call in enumerate(calls):
                qc = _operand(take_runs(qw, 2, call.row_index), q.dtype)
                kc = _operand(take_runs(travel[0], 2, call.col_index), k.dtype)
                vc = _operand(take_runs(travel[1], 2, call.col_index), v.dtype)
                drop = _dropout_multiplier(seed, plan.me, t, c, (b, n_heads, qc.shape[2], kc.shape[2]), self.dropout_p)
                dq_c, dk_c, dv_c = attention_block_backward(
                    qc, kc, vc, take_runs(of, 2, call.row_index), take_runs(lse, 2, call.row_index),
                    take_runs(do, 2, call.row_index), self.scale, _mask_block(mask, call), drop,
                    take_runs(delta, 2, call.row_index))
                for seg, g in zip(call.rows, _split_rows(dq_c, self._seg_lengths(call.rows))):
                    dq_segs[seg] = g if dq_segs[seg] is None else dq_segs[seg] + g
                col_lengths = [k_runs[j][1] - k_runs[j][0] for j in call.cols]
                for j, gk, gv in zip(call.cols, _split_rows(dk_c, col_lengths), _split_rows(dv_c, col_lengths)):
                    dk_parts[j] = gk if j not in dk_parts else dk_parts[j] + gk
                    dv_parts[j] = gv if j not in dv_parts else dv_parts[j] + gv
            if dk_parts:
                zeros = {j: ops.zeros((b, k.shape[1], z - a, d), ms.float32) for j, (a, z) in enumerate(k_runs)
                         if j not in dk_parts}
                dk_step = ops.concat([dk_parts.get(j, zeros.get(j)) for j in range(len(k_runs))], axis=2)
                dv_step = ops.concat([dv_parts.get(j, zeros.get(j)) for j in range(len(k_runs))], axis=2)
                travel = ops.concat([travel[:2], travel[2:] + ops.stack([dk_step, dv_step])], axis=0)
            if t < plan.n - 1:
                travel = self._pass_on(travel)
        # After the last step this rank holds the next member's block: send its gradients home.
        grads = travel[2:] if plan.n == 1 else self._pass_on(travel[2:])
        for seg, (a, z) in enumerate(plan.q_runs):
            if dq_segs[seg] is None:
                dq_segs[seg] = ops.zeros((b, n_heads, z - a, d), ms.float32)
        dq = dq_segs[0] if n_runs == 1 else ops.concat(dq_segs, axis=2)
        return dq.astype(q.dtype), grads[0].astype(k.dtype), grads[1].astype(v.dtype), None, None


_CELLS: Dict[tuple, _RingAttention] = {}


def _ring_cell(ranks, positions, me, causal, scale, dropout_p) -> _RingAttention:
    key = (tuple(ranks), tuple(p.tobytes() for p in positions), me, bool(causal), float(scale), float(dropout_p))
    cell = _CELLS.get(key)
    if cell is None:
        cell = _RingAttention(tuple(ranks), RingPlan(positions, me, causal), scale, dropout_p)
        _CELLS[key] = cell
    return cell


def _draw_seed() -> int:
    """A 48-bit seed from the RNG tracker's current stream (same draws as the flash-attention path)."""
    from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker  # pylint: disable=import-outside-toplevel

    hi, lo = (int(x) for x in np.round(get_rng_tracker().uniform((2,)).astype(np.float64) * (1 << 24)))
    return (hi << 24) | lo


def ring_attention(q: Tensor, k: Tensor, v: Tensor, group=None, positions: Optional[Sequence[np.ndarray]] = None,
                   causal: bool = True, scale: Optional[float] = None, attn_mask=None,
                   dropout_p: float = 0.0) -> Tensor:
    """Exact attention over the sequence split across a ring of ranks.

    Args:
        q: This rank's queries ``(B, N, L, D)``.
        k: This rank's keys ``(B, Nk, L, D)`` (``N % Nk == 0``: grouped-query attention).
        v: This rank's values ``(B, Nk, L, D)``.
        group: The ring (a :class:`~mindspeed_ms.core.communication.ProcessGroup`); default: the
            context-parallel group.
        positions: Global positions of every member's ``L`` tokens, in group order; default: the
            load-balanced layout (:func:`~.layout.local_positions` of ``L * n`` tokens).
        causal: Mask keys after the query (by global position).
        scale: Softmax scale, default ``1 / sqrt(D)``.
        attn_mask: None, or a mask over the **whole** sequence, broadcastable to
            ``(B, N, S, S)`` with ``S`` the total length (nonzero = masked); each step uses the
            rows of this rank's queries and the columns of the visiting key block.
        dropout_p: Dropout on the attention probabilities (masks drawn from a seed of the RNG
            tracker's current stream; 0 in evaluation).

    Returns:
        The attention output for this rank's queries ``(B, N, L, D)`` in ``q``'s dtype. Rows with
        no unmasked key get zeros (as in :func:`~mindspeed_ms.core.flash_attention.flash_attention`).
    """
    group = group or ps.get_context_parallel_group()
    n = group.size
    me = group.rank if n > 1 else 0
    length = int(q.shape[2])
    if tuple(k.shape[2:]) != (length, q.shape[3]) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"ring_attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                         "the local sequence length and head dimension (and k, v their shape)")
    if positions is None:
        positions = [local_positions(length * n, n, r) for r in range(n)]
    positions = [np.asarray(p, dtype=np.int64) for p in positions]
    if len(positions) != n:
        raise ValueError(f"ring_attention: positions must have one entry per ring member ({n}), got {len(positions)}")
    if any(p.shape != (length,) for p in positions):
        raise ValueError(f"ring_attention: every member's positions must have the local length {length}")
    total = int(max(int(p.max()) for p in positions)) + 1
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"ring_attention: dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    mask = _normalize_full_mask(attn_mask, total)
    cell = _ring_cell(group.ranks, positions, me, causal, scale, dropout_p)
    seed = _draw_seed() if dropout_p > 0.0 else 0
    out, _ = cell(q, k, v, mask, seed)
    return out
