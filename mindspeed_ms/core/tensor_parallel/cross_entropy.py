"""Cross entropy over vocabulary-parallel logits (Megatron's vocab_parallel_cross_entropy).

Each tensor-parallel rank holds the logits of a contiguous slice of the vocabulary. The loss
needs three reductions over the full vocabulary, each an all-reduce of one number per token:
the maximum (for numerical stability), the logit of the target (only the rank owning the target
contributes), and the sum of exponentials. The gradient is ``softmax - onehot(target)`` on the
local slice (with label smoothing, ``softmax - (1 - s) * onehot - s / V``), computed in a custom
backward so that nothing of size ``tokens x vocab`` crosses ranks.

Precision: MindSpore's float32 ``exp`` kernel on CPU is a fast approximation (relative error up to
~6e-6, measured), which shows in the loss's sixth digit. On CPU the softmax statistics are therefore
computed in float64 (exact there, ~7x slower than the fast float32 kernel, which is negligible
for the vocabulary sizes CPU runs use); on Ascend/GPU in float32.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.communication.graph_collectives import GraphAllReduce

__all__ = ["VocabParallelCrossEntropy", "vocab_parallel_cross_entropy", "vocab_range"]


def vocab_range(vocab_per_rank: int, rank: int):
    """``[start, end)`` of the vocabulary slice held by ``rank``."""
    return rank * vocab_per_rank, (rank + 1) * vocab_per_rank


class _GroupAllReduce(nn.Cell):
    """All-reduce over a group of several ranks: eager collectives, or graph collectives when the
    model runs compiled (``graph_comm``, see ``mappings.use_graph_collectives``)."""

    def __init__(self, group, op):
        super().__init__()
        self.group = group
        self.op = op
        self.graph_comm = False
        self.graph_reduce = GraphAllReduce(group, op)

    def construct(self, x):
        if self.graph_comm:
            return self.graph_reduce(x)
        return comm.all_reduce(x, self.group, op=self.op)


class _Identity(nn.Cell):
    """The reduction over a group of one rank."""

    def construct(self, x):
        return x


def _group_reduction(group, op) -> nn.Cell:
    return _GroupAllReduce(group, op) if group.size > 1 else _Identity()


class _Statistics(nn.Cell):
    """Shifted logits, this rank's target mask and index, global log-sum-exp pieces.

    A cell (not a function) because both the forward pass and the custom backward pass use it:
    under ``ms.jit`` a bprop must not call a Python function that its construct calls as well
    (compilation fails with "The pointer[func_graph->get_return()] is null", MindSpore 2.10; so
    does ``ops.select`` with ``ops.zeros_like`` here, hence ``ops.where``), while shared cells
    compile. The reductions are cells too, so that a single-rank group has no reference to the
    (eager-only) collectives and the whole loss compiles.
    """

    def __init__(self, group):
        super().__init__()
        self.rank = int(group.rank)
        self.group_max = _group_reduction(group, "max")
        self.group_sum = _group_reduction(group, "sum")

    def construct(self, logits, target):
        vocab_local = logits.shape[-1]
        # vocab_range() inlined: a Python function called here would be shared by construct and bprop
        start, end = self.rank * vocab_local, (self.rank + 1) * vocab_local
        logits_max = self.group_max(ops.stop_gradient(logits.max(axis=-1)))
        shifted = logits - ops.expand_dims(logits_max, -1)
        target = target.astype(ms.int32)
        outside = ops.logical_or(target < start, target >= end)
        local_target = ops.where(outside, 0, target - start)
        exp = ops.exp(shifted)
        sum_exp = self.group_sum(exp.sum(axis=-1))
        return shifted, outside, local_target, exp, sum_exp


class _VocabParallelCrossEntropyFn(nn.Cell):
    """Per-token loss with a custom backward (see module docstring)."""

    def __init__(self, group, label_smoothing):
        super().__init__()
        self.group_size = int(group.size)
        self.label_smoothing = float(label_smoothing)
        self.statistics = _Statistics(group)
        # the backward recomputes the statistics with cells of its own: under ms.jit a bprop that
        # calls the forward's cells fails to compile once they hold collectives ("The
        # pointer[func_graph->get_return()] is null", MindSpore 2.10)
        self.backward_statistics = _Statistics(group)

    def construct(self, logits, target):
        shifted, outside, local_target, _, sum_exp = self.statistics(logits, target)
        picked = ops.gather_elements(shifted, -1, ops.expand_dims(local_target, -1)).squeeze(-1)
        picked = ops.where(outside, 0.0, picked)
        picked = self.statistics.group_sum(picked)
        log_sum_exp = ops.log(sum_exp)
        loss = log_sum_exp - picked
        if self.label_smoothing > 0:
            vocab_size = logits.shape[-1] * self.group_size
            smoothing = self.label_smoothing * vocab_size / (vocab_size - 1)
            sum_log_probs = self.statistics.group_sum((shifted - ops.expand_dims(log_sum_exp, -1)).sum(axis=-1))
            loss = (1.0 - smoothing) * loss - smoothing * sum_log_probs / vocab_size
        return loss

    def bprop(self, logits, target, out, dout):
        _, outside, local_target, exp, sum_exp = self.backward_statistics(logits, target)
        softmax = exp / ops.expand_dims(sum_exp, -1)
        onehot = _ONE_HOT(local_target, logits.shape[-1], _ONE, _ZERO)
        onehot = onehot.astype(softmax.dtype) * ops.expand_dims(ops.logical_not(outside).astype(softmax.dtype), -1)
        if self.label_smoothing > 0:
            vocab_size = logits.shape[-1] * self.group_size
            smoothing = self.label_smoothing * vocab_size / (vocab_size - 1)
            grad = softmax - (1.0 - smoothing) * onehot - smoothing / vocab_size
        else:
            grad = softmax - onehot
        grad = grad * ops.expand_dims(dout.astype(grad.dtype), -1)
        return grad.astype(logits.dtype), ops.zeros_like(target)


# The OneHot primitive and module-level constants rather than ops.one_hot(..., Tensor(1.0), ...):
# the function's isinstance checks and a Tensor built inside the graph keep a compiled graph out
# of MindSpore's compile cache (it cannot be saved as MindIR).
_ONE_HOT = ops.OneHot()
_ONE = Tensor(1.0, ms.float32)
_ZERO = Tensor(0.0, ms.float32)


def _statistics_dtype():
    return ms.float64 if comm.device_target() == "CPU" else ms.float32


class VocabParallelCrossEntropy(nn.Cell):
    """Parallel cross entropy over vocabulary-sharded logits.

    Inputs:
        - **vocab_parallel_logits** (Tensor) - logits of this rank's vocabulary slice, shape
          ``(N, C)`` (or ``(..., C)``), float16 or float32 (computed in float32).
        - **target** (Tensor) - target ids over the full vocabulary, shape ``(N,)``.
        - **label_smoothing** (float, optional) - in ``[0.0, 1.0)``. Default: 0.0.

    Outputs:
        The per-token loss, shape ``(N,)``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__()
        del args, kwargs
        self._fns = {}
        # The group and the statistics dtype are fixed when the parallel layout already exists,
        # so that construct needs no parallel_state look-up (it then compiles under ms.jit);
        # a loss built before initialize_model_parallel resolves them per call instead.
        self._fixed_fn = None
        if ps.model_parallel_is_initialized():
            self._fixed_fn = _VocabParallelCrossEntropyFn(ps.get_tensor_model_parallel_group(), 0.0)
        self.compute_dtype = _statistics_dtype()

    def construct(self, vocab_parallel_logits, target, label_smoothing=0.0):
        if label_smoothing == 0.0 and self._fixed_fn is not None:
            fn = self._fixed_fn
        else:
            fn = self._fn_for(label_smoothing)
        logits = vocab_parallel_logits
        if logits.dtype != self.compute_dtype:
            logits = logits.astype(self.compute_dtype)
        return fn(logits, target).astype(ms.float32)

    def _fn_for(self, label_smoothing):
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0.0, 1.0), got {label_smoothing}")
        group = ps.get_tensor_model_parallel_group()
        key = (group, float(label_smoothing))
        fn = self._fns.get(key)
        if fn is None:
            fn = _VocabParallelCrossEntropyFn(group, label_smoothing)
            self._fns[key] = fn
        return fn


_default = None


def vocab_parallel_cross_entropy(vocab_parallel_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Functional form of :class:`VocabParallelCrossEntropy`."""
    global _default  # pylint: disable=global-statement
    if _default is None:
        _default = VocabParallelCrossEntropy()
    return _default(vocab_parallel_logits, target, label_smoothing)
