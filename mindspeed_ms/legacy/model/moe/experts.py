"""The experts of a MoE layer: SequentialMLP (one MLP after the other) and GroupedMLP (one batch).

Both hold the same weights: expert ``g`` (global index) is a :class:`ParallelMLP` whose master
initialisation keys are ``<prefix>.<g>.dense_h_to_4h`` / ``.dense_4h_to_h``, so with
``use_cpu_initialization`` an expert starts from the same weights whichever rank holds it, under
any expert- or tensor-parallel layout, and in either variant.

Expert weights are split over tensor-parallel ranks like a dense MLP's, but the linear layers do
no tensor-parallel communication: the token dispatcher gathers the tensor-parallel group's rows
before the experts and reduce-scatters their partial outputs after them. The second bias is
replicated and must be counted once in that sum, so only tensor-parallel rank 0 adds it; its
gradient is then complete on rank 0 and zero elsewhere, and the parameter is marked
``sequence_parallel`` so that the training loop all-reduces it over the tensor-parallel group
(as it does for the norms under sequence parallelism).

Gradient reduction (what the training loop does, as Megatron): owner experts' parameters carry
``allreduce = False`` and ``expert_parallel = True``: their gradients are summed over
``get_data_modulo_expert_parallel_group()`` and scaled by ``1 / data_parallel_size``. Replicas of
hot experts (cold/hot optimisation) carry ``allreduce = True`` and ``expert_replica = True``:
every data-parallel rank holds one, so they are reduced like dense parameters.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.precision import add_bias, batch_matmul, resolve_dtype
from mindspeed_ms.legacy.model.moe import moe_utils

__all__ = ["SequentialMLP", "GroupedMLP"]


def _mlp_class():
    from mindspeed_ms.legacy.model.transformer import ParallelMLP  # pylint: disable=import-outside-toplevel

    return ParallelMLP


def _activation(config):
    from mindspeed_ms.legacy.model.transformer import _activation as act  # pylint: disable=import-outside-toplevel

    return act(config.hidden_act)


def _check_common(num_local_experts, submodules, expert_indices, cls_name):
    if submodules is not None:
        raise NotImplementedError(f"{cls_name}: `submodules` is not supported for now (must be None), got "
                                  f"{submodules!r}")
    if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, (int, np.integer)) \
            or num_local_experts <= 0:
        raise ValueError(f"{cls_name}: num_local_experts must be an integer > 0, got {num_local_experts!r}")
    if expert_indices is None:
        first = ps.get_expert_model_parallel_rank() * int(num_local_experts)
        expert_indices = range(first, first + int(num_local_experts))
    expert_indices = [int(i) for i in expert_indices]
    if len(expert_indices) != num_local_experts:
        raise ValueError(f"{cls_name}: expert_indices must have num_local_experts={num_local_experts} elements, got "
                         f"{expert_indices}")
    return expert_indices


def _mark(params, replica: bool, local_index: Optional[int], expert_indices: Sequence[int]):
    for param in params:
        param.allreduce = bool(replica)
        param.expert_parallel = not replica
        param.expert_replica = bool(replica)
        if local_index is not None:
            param.expert_global_index = int(expert_indices[local_index])
        else:
            param.expert_global_indices = list(expert_indices)


class _ExpertBase(nn.Cell):
    """What both variants share: the tensor-parallel bias handling and argument checks."""

    def __init__(self, num_local_experts, config, expert_indices):
        super().__init__()
        self.config = config
        self.num_local_experts = int(num_local_experts)
        self.expert_indices = list(expert_indices)
        self.hidden_size = int(config.hidden_size)
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        # Partial outputs are summed over tensor-parallel ranks: only rank 0 contributes the bias.
        self.bias_share = 1.0 if ps.get_tensor_model_parallel_rank() == 0 else 0.0

    def _add_bias(self, output: Tensor, bias: Tensor) -> Tensor:
        if self.tp_size > 1:
            bias = bias * self.bias_share
        return add_bias(output, bias)

    def _mark_output_bias(self, bias) -> None:
        # Rank 0 holds the whole gradient, the others zero: summed over tensor-parallel ranks
        # by the training loop, like the other `sequence_parallel` parameters.
        if bias is not None:
            bias.sequence_parallel = self.tp_size > 1

    def _counts(self, rows: Tensor, tokens_per_expert) -> np.ndarray:
        counts = moe_utils.host_ints(tokens_per_expert)
        if counts.size != self.num_local_experts:
            raise ValueError(f"{type(self).__name__}: tokens_per_expert must have num_local_experts="
                             f"{self.num_local_experts} entries, got {counts.tolist()}")
        if np.any(counts < 0) or int(counts.sum()) != int(rows.shape[0]):
            raise ValueError(f"{type(self).__name__}: tokens_per_expert {counts.tolist()} must be non-negative and "
                             f"sum to the {rows.shape[0]} input rows")
        return counts

    def expert_parameters(self, local_index: int) -> List[Tuple[Parameter, Optional[int]]]:
        """The parameters of local expert ``local_index`` as ``(parameter, index)`` pairs.

        ``index`` is None when the parameter belongs to that expert alone, else the position
        along the first axis of a parameter stacked over experts. The order is the same in both
        variants (fc1 weight, fc1 bias, fc2 weight, fc2 bias; absent biases skipped).
        """
        raise NotImplementedError


class SequentialMLP(_ExpertBase):
    """The local experts of a MoE layer, computed one after the other.

    Args:
        num_local_experts (int): Experts held by this rank.
        config (TransformerConfig): The model configuration.
        submodules (MLPSubmodules): Reserved; must be None.
        expert_indices (List[int], optional): Global indices of the local experts (default: this
            expert-parallel rank's block). They name the experts' master-initialisation keys.
        init_key_prefix (str, optional): Prefix of those keys (default ``'experts'``).
        replica (bool): The experts are replicas of hot experts (cold/hot optimisation).

    Inputs:
        - **permuted_local_hidden_states** (Tensor) - ``(N, H)`` rows grouped by local expert.
        - **tokens_per_expert** (Union[Tensor, list]) - rows of each local expert.

    Outputs:
        Tuple of ``output_local`` ``(N, H)`` and ``output_bias_local`` (None: the biases are added).

    Raises:
        NotImplementedError: If ``submodules`` is not None.
        ValueError: ``tokens_per_expert`` does not match the experts or the rows.

    Examples:
        >>> expert = SequentialMLP(num_local_experts=2, config=config)
        >>> output_local, output_bias_local = expert(permuted_local_hidden_states, [20, 12])
        >>> print(output_local.shape)
        (32, 64)
    """

    def __init__(self, num_local_experts: int, config, submodules=None, *, expert_indices=None,
                 init_key_prefix: Optional[str] = None, replica: bool = False):
        expert_indices = _check_common(num_local_experts, submodules, expert_indices, "SequentialMLP")
        super().__init__(num_local_experts, config, expert_indices)
        prefix = init_key_prefix or "experts"
        mlp = _mlp_class()
        self.local_experts = nn.CellList([mlp(config, is_expert=True, init_key=f"{prefix}.{g}")
                                          for g in expert_indices])
        for i, expert in enumerate(self.local_experts):
            _mark(expert.get_parameters(), replica, i, expert_indices)
            self._mark_output_bias(expert.dense_4h_to_h.bias)

    def expert_parameters(self, local_index):
        expert = self.local_experts[local_index]
        out = []
        for linear in (expert.dense_h_to_4h, expert.dense_4h_to_h):
            out.append((linear.weight, None))
            if linear.bias is not None:
                out.append((linear.bias, None))
        return out

    def construct(self, permuted_local_hidden_states, tokens_per_expert):
        rows = permuted_local_hidden_states
        counts = self._counts(rows, tokens_per_expert)
        outputs = []
        start = 0
        for i, count in enumerate(counts):
            count = int(count)
            if count == 0:  # an expert without tokens is skipped (empty tensors break CPU kernels)
                continue
            output, bias = self.local_experts[i](rows[start:start + count])
            if bias is not None:
                output = self._add_bias(output, bias)
            outputs.append(output)
            start += count
        if not outputs:
            return ops.zeros((0, self.hidden_size), rows.dtype), None
        return (ops.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]), None


class GroupedMLP(_ExpertBase):
    """The local experts computed as one batched product (``moe_grouped_gemm``).

    The rows of each expert are padded with zero rows to the largest expert's count, the
    ``(experts, rows, H)`` batch goes through stacked weights with two batched matmuls, and the
    padding is dropped. The weights are the :class:`SequentialMLP` weights stacked along a new
    first axis (same initialisation keys), so both variants compute the same function.

    Args, inputs, outputs and exceptions: as :class:`SequentialMLP`.

    Parameters: ``weight1`` ``(n, F1 / tp, H)`` (``F1 = 2 F`` for a gated MLP), ``bias1``
    ``(n, F1 / tp)``, ``weight2`` ``(n, H, F / tp)``, ``bias2`` ``(n, H)``.
    """

    def __init__(self, num_local_experts: int, config, submodules=None, *, expert_indices=None,
                 init_key_prefix: Optional[str] = None, replica: bool = False):
        expert_indices = _check_common(num_local_experts, submodules, expert_indices, "GroupedMLP")
        super().__init__(num_local_experts, config, expert_indices)
        prefix = init_key_prefix or "experts"
        mlp = _mlp_class()
        # Build each expert as the sequential variant would (same keys, same tensor-parallel
        # split), then stack: the two variants start from identical weights by construction.
        built = [mlp(config, is_expert=True, init_key=f"{prefix}.{g}") for g in expert_indices]
        self.gated = built[0].gated
        self.activation = built[0].activation
        self.compute_dtype = resolve_dtype(config.compute_dtype)
        first, second = built[0].dense_h_to_4h, built[0].dense_4h_to_h

        def stack(getter, name, partition_dim, segments=None):
            arrays = [getter(mlp_) for mlp_ in built]
            if arrays[0] is None:
                return None
            param = Parameter(Tensor(np.stack([a.asnumpy() for a in arrays])).astype(arrays[0].dtype), name=name)
            param.tensor_model_parallel = bool(partition_dim is not None and self.tp_size > 1)
            param.partition_dim = partition_dim if partition_dim is not None else -1
            param.partition_segments = segments
            return param

        segments = getattr(first.weight, "partition_segments", None)
        self.weight1 = stack(lambda m: m.dense_h_to_4h.weight, "weight1", 1, segments)
        self.bias1 = stack(lambda m: m.dense_h_to_4h.bias, "bias1", 1, segments)
        self.weight2 = stack(lambda m: m.dense_4h_to_h.weight, "weight2", 2)
        self.bias2 = stack(lambda m: m.dense_4h_to_h.bias, "bias2", None)
        del first, second, built
        _mark([p for p in (self.weight1, self.bias1, self.weight2, self.bias2) if p is not None], replica, None,
              expert_indices)
        self._mark_output_bias(self.bias2)

    def expert_parameters(self, local_index):
        return [(p, local_index) for p in (self.weight1, self.bias1, self.weight2, self.bias2) if p is not None]

    def construct(self, permuted_local_hidden_states, tokens_per_expert):
        rows = permuted_local_hidden_states
        counts = self._counts(rows, tokens_per_expert)
        longest = int(counts.max()) if counts.size else 0
        if longest == 0:
            return ops.zeros((0, self.hidden_size), rows.dtype), None
        n = self.num_local_experts
        total = int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # (expert, position) -> input row, or the appended zero row for padding.
        grid = np.full((n, longest), total, np.int64)
        for i in range(n):
            grid[i, :counts[i]] = np.arange(starts[i], starts[i] + counts[i])
        padded_rows = ops.concat([rows, ops.zeros((1, self.hidden_size), rows.dtype)], axis=0)
        batch = ops.gather(padded_rows, Tensor(grid.reshape(-1).astype(np.int32)), 0)
        batch = batch.reshape(n, longest, self.hidden_size)
        hidden = batch_matmul(batch, self.weight1, transpose_b=True, compute_dtype=self.compute_dtype)
        if self.bias1 is not None:
            hidden = hidden + self.bias1.astype(hidden.dtype).reshape(n, 1, -1)
        if self.gated:
            gate, value = ops.chunk(hidden, 2, axis=-1)
            hidden = self.activation(gate) * value
        else:
            hidden = self.activation(hidden)
        output = batch_matmul(hidden, self.weight2, transpose_b=True, compute_dtype=self.compute_dtype)
        if self.bias2 is not None:
            output = self._add_bias(output, self.bias2.reshape(n, 1, -1))
        # Back to the rows' order: expert i's real rows are grid positions i * longest + 0..count-1.
        positions = np.concatenate([i * longest + np.arange(counts[i]) for i in range(n)])
        output = ops.gather(output.reshape(n * longest, self.hidden_size), Tensor(positions.astype(np.int32)), 0)
        return output, None
