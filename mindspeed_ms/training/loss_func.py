"""Loss functions of the training layer."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.tensor_parallel.mappings import ReduceFromRegion

__all__ = ["LossWithMask"]


class LossWithMask(nn.Cell):
    """Mean of a per-token loss over the tokens whose mask is 1.

    With context parallelism each rank holds a slice of the sequence: the masked sum and the token
    count are summed over the context-parallel group, so every rank reports the loss of the whole
    sequence. The sum's backward is the identity: each rank's gradient covers its own tokens, and
    the gradient reduction sums (not averages) over context-parallel ranks.

    Args:
        loss_func: Callable ``(logits, labels) -> loss`` (per token, or already reduced).

    Inputs:
        - **logits** (Tensor) - ``(N, C)`` (or ``(..., C)``, flattened), float16 or float32.
        - **label** (Tensor) - ``(N,)`` (or the leading shape of logits).
        - **input_mask** (Tensor) - ``(N,)``: 1 for tokens that count, 0 for padding.

    Outputs:
        The masked mean (a scalar); 0 when no token counts.
    """

    def __init__(self, loss_func, *args, **kwargs):
        super().__init__()
        del args, kwargs
        self.loss_func = loss_func
        # resolved once here: construct must not consult parallel_state so that it compiles
        self.cp_group = ps.get_context_parallel_group()
        self.context_parallel = self.cp_group.size > 1
        self.cp_reduce = ReduceFromRegion(self.cp_group) if self.context_parallel else None

    def construct(self, logits, label, input_mask):
        if len(logits.shape) > 2:
            logits = logits.reshape(-1, logits.shape[-1])
        label = label.reshape(-1)
        mask = input_mask.reshape(-1).astype(ms.float32)
        losses = self.loss_func(logits, label).astype(ms.float32)
        masked_sum = (losses * mask).sum()
        count = mask.sum()
        if self.context_parallel:
            both = self.cp_reduce(ops.stack([masked_sum, ops.stop_gradient(count)]))
            masked_sum, count = both[0], ops.stop_gradient(both[1])
        # a micro-batch without a counted token (all padding) has loss 0, not 0/0: under
        # calculate_per_token_loss its weight is 0 and it must not turn the step's gradients to NaN
        return masked_sum / ops.maximum(count, 1.0)
