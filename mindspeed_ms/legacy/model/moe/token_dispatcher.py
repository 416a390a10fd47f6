"""MoEAlltoAllTokenDispatcher: sends each token to the ranks holding its experts and brings it back.

Token flow for one MoE layer on a rank with expert-parallel rank ``a`` and tensor-parallel rank
``b`` (``E`` experts, ``ep`` expert-parallel ranks, ``n = E / ep`` local experts):

1. **Local permutation.** The ``(token, k)`` slots chosen by the router (dropped slots excluded)
   are sorted by expert, stably, so the rows for the experts of expert-parallel rank ``j`` are
   contiguous and in expert order.
2. **Counts.** Every rank of the tensor-and-expert-parallel group shares its per-expert counts,
   so each rank knows how many rows it will receive from whom (the all-to-all split sizes).
3. **All-to-all over the expert-parallel group** (uneven splits): rank ``a`` receives the rows of
   its ``n`` experts from every expert-parallel rank.
4. **With tensor parallelism**, the experts' weights are split over the tensor-parallel ranks,
   so every tensor-parallel rank needs all rows the group received: an uneven all-gather over
   the tensor-parallel group (with sequence parallelism the group's ranks routed different
   tokens). The rows are then sorted by local expert.
5. The experts run (``tokens_per_expert`` rows each, in order).
6. **Back**: the sort is undone, the tensor-parallel partial results are summed and scattered
   back (uneven reduce-scatter), the reverse all-to-all returns the rows to their source ranks,
   and each token's output is the sum of its slots' rows weighted by the router probabilities.

Every step is differentiable (the collectives' backward passes are their adjoints). When any
collective is involved, each rank adds one zero row per destination, assigned to the first local
expert and discarded on the way back, so no rank ever sends or computes an empty buffer (empty
tensors break CPU kernels, and a collective skipped on one rank would hang the others); the
returned ``tokens_per_expert`` counts those rows (``real_tokens_per_expert`` does not).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.communication import autograd as comm_autograd
from mindspeed_ms.legacy.model.moe import moe_utils

__all__ = ["MoEAlltoAllTokenDispatcher", "all_gather_v", "reduce_scatter_v"]


def _gather_v(x: Tensor, group: comm.ProcessGroup, sizes: Sequence[int]) -> Tensor:
    longest = max(sizes)
    pad = longest - int(x.shape[0])
    if pad:
        x = ops.concat([x, ops.zeros((pad,) + tuple(x.shape[1:]), x.dtype)], axis=0)
    gathered = comm.all_gather(x, group, 0)
    pieces = [gathered[i * longest:i * longest + size] for i, size in enumerate(sizes) if size]
    return ops.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]


def _reduce_scatter_v(x: Tensor, group: comm.ProcessGroup, sizes: Sequence[int]) -> Tensor:
    total = comm.all_reduce(x, group)
    start = int(sum(sizes[:group.rank]))
    return total[start:start + int(sizes[group.rank])]


class _AllGatherV(nn.Cell):
    """Uneven all-gather along dim 0; backward: uneven reduce-scatter (its adjoint)."""

    def __init__(self, group, sizes):
        super().__init__()
        self.group = group
        self.sizes = [int(s) for s in sizes]

    def construct(self, x):
        return _gather_v(x, self.group, self.sizes)

    def bprop(self, x, out, dout):
        return (_reduce_scatter_v(dout, self.group, self.sizes),)


class _ReduceScatterV(nn.Cell):
    """Uneven reduce-scatter along dim 0; backward: uneven all-gather (its adjoint)."""

    def __init__(self, group, sizes):
        super().__init__()
        self.group = group
        self.sizes = [int(s) for s in sizes]

    def construct(self, x):
        return _reduce_scatter_v(x, self.group, self.sizes)

    def bprop(self, x, out, dout):
        return (_gather_v(dout, self.group, self.sizes),)


def all_gather_v(x: Tensor, group: comm.ProcessGroup, sizes: Sequence[int]) -> Tensor:
    """Differentiable uneven all-gather: member ``i`` contributes ``sizes[i]`` (>= 1) rows."""
    if group.size == 1:
        return x
    # Sizes change every call: a fresh cell, not a cached one.
    return _AllGatherV(group, sizes)(x)


def reduce_scatter_v(x: Tensor, group: comm.ProcessGroup, sizes: Sequence[int]) -> Tensor:
    """Differentiable uneven reduce-scatter: member ``i`` keeps its ``sizes[i]`` rows of the sum."""
    if group.size == 1:
        return x
    return _ReduceScatterV(group, sizes)(x)


class MoEAlltoAllTokenDispatcher:
    """Dispatches tokens to experts with an all-to-all over the expert-parallel group.

    Args:
        num_local_experts (int): Experts held by this rank.
        local_expert_indices (List[int]): Global indices of those experts; they must be the
            contiguous block ``ep_rank * num_local_experts, ...`` that expert parallelism assigns.
        config (TransformerConfig): The model configuration.
        num_experts (int, optional): Experts in all (default ``moe_config.num_experts``). The
            cold/hot MoE layer uses a second dispatcher over the hot-expert replicas.
        ep_group (ProcessGroup, optional): Expert-parallel group (default: parallel_state's).
        tp_group (ProcessGroup, optional): Tensor-parallel group (default: parallel_state's).

    Raises:
        ValueError: If ``num_local_experts`` is not greater than 0.
        ValueError: If the number of elements of ``local_expert_indices`` is not equal to
            ``num_local_experts``.
        ValueError: If ``num_experts`` is not ``num_local_experts`` times the expert-parallel size,
            or ``local_expert_indices`` is not this rank's block of experts.

    Examples:
        >>> dispatcher = MoEAlltoAllTokenDispatcher(num_local_experts=4, local_expert_indices=range(4),
        ...                                         config=config)
        >>> dispatched_input, tokens_per_expert = dispatcher.token_permutation(hidden_states, scores, indices)
        >>> print(dispatched_input.shape)
        (32, 64)
        >>> output, _ = dispatcher.token_unpermutation(expert_output, bias=None)
        >>> print(output.shape)
        (16, 64)
    """

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config, *,
                 num_experts: Optional[int] = None, ep_group: Optional[comm.ProcessGroup] = None,
                 tp_group: Optional[comm.ProcessGroup] = None):
        if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, (int, np.integer)) \
                or num_local_experts <= 0:
            raise ValueError(f"num_local_experts must be an integer > 0, got {num_local_experts!r}")
        local = [int(i) for i in local_expert_indices]
        if len(local) != num_local_experts:
            raise ValueError(f"local_expert_indices must have num_local_experts={num_local_experts} elements, got "
                             f"{len(local)}: {local}")
        self.config = config
        moe = config.moe_config
        self.num_local_experts = int(num_local_experts)
        self.local_expert_indices = local
        self.num_experts = int(num_experts if num_experts is not None else moe.num_experts)
        self.ep_group = ep_group if ep_group is not None else ps.get_expert_model_parallel_group()
        self.tp_group = tp_group if tp_group is not None else ps.get_tensor_model_parallel_group()
        self.ep_size = self.ep_group.size
        self.tp_size = self.tp_group.size
        if self.num_experts != self.num_local_experts * self.ep_size:
            raise ValueError(f"num_experts={self.num_experts} must equal num_local_experts={self.num_local_experts} "
                             f"x expert-parallel size {self.ep_size}")
        first = self.ep_group.rank * self.num_local_experts if self.ep_size > 1 else 0
        if local != list(range(first, first + self.num_local_experts)):
            raise ValueError(f"local_expert_indices must be this rank's experts "
                             f"{list(range(first, first + self.num_local_experts))}, got {local}")
        self.first_local_expert = first
        self.router_topk = int(moe.moe_router_topk)
        self.pad_to_capacity = bool(moe.moe_pad_expert_input_to_capacity)
        # Per-expert capacities (set by the MoE layer from the router) for padding to capacity.
        self.expert_capacity: Optional[np.ndarray] = None
        self.collective = self.ep_size > 1 or self.tp_size > 1
        self.real_tokens_per_expert: Optional[np.ndarray] = None
        self._state = None

    def _count_group(self) -> comm.ProcessGroup:
        if self.ep_size > 1 and self.tp_size > 1:
            group = ps.get_tensor_and_expert_parallel_group()
            if set(self.ep_group.ranks) <= set(group.ranks) and set(self.tp_group.ranks) <= set(group.ranks):
                return group
            raise ValueError("the tensor-and-expert-parallel group does not contain the dispatcher's groups")
        return self.ep_group if self.ep_size > 1 else self.tp_group

    def _local_layout(self, indices: np.ndarray):
        """Slot order of the send buffer (-1 = a zero row) and the per-expert counts."""
        num_tokens, topk = indices.shape
        flat = indices.reshape(-1)
        valid = (flat >= 0) & (flat < self.num_experts)
        slots = np.arange(flat.size)[valid]
        experts = flat[valid]
        slots = slots[np.argsort(experts, kind="stable")]
        counts = np.bincount(experts, minlength=self.num_experts).astype(np.int64)
        per_expert = np.split(slots, np.cumsum(counts)[:-1])
        if self.pad_to_capacity and self.expert_capacity is not None:
            cap = np.asarray(self.expert_capacity, np.int64)
            if np.any(counts > cap):
                raise ValueError(f"moe_pad_expert_input_to_capacity: the router kept {counts.tolist()} tokens per "
                                 f"expert, more than the capacities {cap.tolist()}")
            per_expert = [np.concatenate([s, np.full(int(c) - s.size, -1, np.int64)]) for s, c in zip(per_expert, cap)]
            counts = cap.copy()
        layout = []
        n = self.num_local_experts
        for rank in range(self.ep_size):
            layout.extend(per_expert[rank * n:(rank + 1) * n])
            if self.collective:
                layout.append(np.full(1, -1, np.int64))
        order = np.concatenate(layout) if layout else np.zeros((0,), np.int64)
        return order.astype(np.int64), counts, num_tokens * topk

    def token_permutation(self, hidden_states: Tensor, scores: Tensor, indices: Tensor):
        """Route the tokens to their experts.

        Args:
            hidden_states (Tensor): ``(..., H)`` tokens.
            scores (Tensor): ``(T, k)`` router probabilities.
            indices (Tensor): ``(T, k)`` expert of each slot (out of range = dropped).

        Returns:
            Tuple of ``dispatched_input`` (rows for this rank's experts, grouped by local expert)
            and ``tokens_per_expert`` (an int64 Tensor, one count per local expert).

        Raises:
            ValueError: The shapes of ``scores``, ``indices`` and the tokens disagree.
        """
        hidden = int(hidden_states.shape[-1])
        self.hidden_shape = tuple(hidden_states.shape)
        tokens = hidden_states.reshape(-1, hidden)
        num_tokens = int(tokens.shape[0])
        idx = moe_utils.host_ints(indices).reshape(tuple(indices.shape))
        if len(idx.shape) != 2 or idx.shape[0] != num_tokens or tuple(scores.shape) != tuple(idx.shape):
            raise ValueError(f"token_permutation: scores {tuple(scores.shape)} and indices {tuple(indices.shape)} "
                             f"must both be (num_tokens={num_tokens}, topk)")
        order, counts, num_slots = self._local_layout(idx)
        probs = scores.astype(tokens.dtype).reshape(-1)
        state = {"order": order, "num_tokens": num_tokens, "num_slots": num_slots, "probs": probs,
                 "hidden": hidden, "perm": None, "topk": int(idx.shape[1])}
        self._state = state
        if order.size == 0:  # nothing routed and nobody to talk to
            self.real_tokens_per_expert = np.zeros((self.num_local_experts,), np.int64)
            return ops.zeros((0, hidden), tokens.dtype), Tensor(self.real_tokens_per_expert)
        source_rows = np.where(order >= 0, order // idx.shape[1], num_tokens)
        if np.any(order < 0):
            tokens = ops.concat([tokens, ops.zeros((1, hidden), tokens.dtype)], axis=0)
        rows = ops.gather(tokens, Tensor(source_rows.astype(np.int32)), 0)
        if not self.collective:
            self.real_tokens_per_expert = counts.copy()
            return rows, Tensor(counts)

        # Everybody's counts: row = (expert-parallel rank, tensor-parallel rank, counts...).
        info = np.concatenate([[self.ep_group.rank if self.ep_size > 1 else 0,
                                self.tp_group.rank if self.tp_size > 1 else 0], counts]).astype(np.int32)
        table = comm.all_gather(Tensor(info.reshape(1, -1)), self._count_group(), 0).asnumpy().astype(np.int64)
        matrix = np.zeros((self.ep_size, self.tp_size, self.num_experts), np.int64)
        for row in table:
            matrix[row[0], row[1]] = row[2:]
        lo = self.first_local_expert
        mine = matrix[:, :, lo:lo + self.num_local_experts]  # (ep, tp, n): rows for my experts
        tp_rank = self.tp_group.rank if self.tp_size > 1 else 0
        n = self.num_local_experts
        send_splits = [int(counts[j * n:(j + 1) * n].sum()) + 1 for j in range(self.ep_size)]
        recv_splits = [int(mine[j, tp_rank].sum()) + 1 for j in range(self.ep_size)]
        state.update(send_splits=send_splits, recv_splits=recv_splits)
        if self.ep_size > 1:
            rows = comm_autograd.all_to_all_v(rows, send_splits, recv_splits, self.ep_group)
        tp_ranks = range(self.tp_size)
        if self.tp_size > 1:
            tp_sizes = [int(mine[:, b].sum()) + self.ep_size for b in tp_ranks]
            state["tp_sizes"] = tp_sizes
            rows = all_gather_v(rows, self.tp_group, tp_sizes)
        else:
            tp_ranks = [tp_rank]
        # Received layout: for each tensor-parallel rank b, for each source j: n expert chunks, a pad row.
        chunks = {}
        offset = 0
        for b in tp_ranks:
            for j in range(self.ep_size):
                for i in range(n):
                    size = int(mine[j, b, i])
                    chunks[(i, b, j)] = np.arange(offset, offset + size)
                    offset += size
                chunks[("pad", b, j)] = np.arange(offset, offset + 1)
                offset += 1
        ordered = []
        for i in range(n):
            ordered.extend(chunks[(i, b, j)] for b in tp_ranks for j in range(self.ep_size))
            if i == 0:  # the zero rows ride with the first expert
                ordered.extend(chunks[("pad", b, j)] for b in tp_ranks for j in range(self.ep_size))
        perm = np.concatenate(ordered)
        if not np.array_equal(perm, np.arange(perm.size)):
            state["perm"] = perm
            rows = ops.gather(rows, Tensor(perm.astype(np.int32)), 0)
        real = mine[:, list(tp_ranks)].sum(axis=(0, 1)).astype(np.int64)
        self.real_tokens_per_expert = real
        tokens_per_expert = real.copy()
        tokens_per_expert[0] += len(tp_ranks) * self.ep_size
        return rows, Tensor(tokens_per_expert)

    def token_unpermutation(self, hidden_states: Tensor, bias: Optional[Tensor] = None):
        """Bring the experts' outputs back to the tokens, weighted by the router probabilities.

        Args:
            hidden_states (Tensor): The experts' output rows, in the order of ``dispatched_input``.
            bias (Tensor, optional): Must be None (the experts add their own biases).

        Returns:
            Tuple of the output (the shape of the ``hidden_states`` given to
            :meth:`token_permutation`) and None.

        Raises:
            NotImplementedError: ``bias`` is not None.
            RuntimeError: :meth:`token_permutation` was not called first.
            ValueError: The number of rows differs from what was dispatched.
        """
        if bias is not None:
            raise NotImplementedError("token_unpermutation: bias is not supported (the experts add their biases); "
                                      "pass bias=None")
        state = self._state
        if state is None:
            raise RuntimeError("token_unpermutation called before token_permutation")
        num_tokens, hidden = state["num_tokens"], state["hidden"]
        order = state["order"]
        if order.size == 0:
            return ops.zeros(self.hidden_shape, hidden_states.dtype), None
        rows = hidden_states
        if state["perm"] is not None:
            if int(rows.shape[0]) != state["perm"].size:
                raise ValueError(f"token_unpermutation: expected {state['perm'].size} rows, got {rows.shape[0]}")
            inverse = np.empty_like(state["perm"])
            inverse[state["perm"]] = np.arange(state["perm"].size)
            rows = ops.gather(rows, Tensor(inverse.astype(np.int32)), 0)
        if self.tp_size > 1:
            rows = reduce_scatter_v(rows, self.tp_group, state["tp_sizes"])
        if self.ep_size > 1:
            rows = comm_autograd.all_to_all_v(rows, state["recv_splits"], state["send_splits"], self.ep_group)
        if int(rows.shape[0]) != order.size:
            raise ValueError(f"token_unpermutation: expected {order.size} rows back, got {rows.shape[0]}")
        probs = state["probs"].astype(rows.dtype)
        slot_index = np.where(order >= 0, order, state["num_slots"])
        if np.any(order < 0):
            probs = ops.concat([probs, ops.zeros((1,), probs.dtype)], axis=0)
        weights = ops.gather(probs, Tensor(slot_index.astype(np.int32)), 0)
        targets = np.where(order >= 0, order // state["topk"], num_tokens)
        weighted = rows * weights.reshape(-1, 1)
        output = ops.unsorted_segment_sum(weighted, Tensor(targets.astype(np.int32)), num_tokens + 1)
        output = output[:num_tokens]
        return output.reshape(self.hidden_shape), None
