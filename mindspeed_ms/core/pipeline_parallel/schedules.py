"""Forward/backward schedules over micro-batches.

``get_forward_backward_func()`` picks the schedule from parallel_state: no pipelining (a loop over
micro-batches with gradient accumulation), 1F1B, or interleaved 1F1B with virtual stages.

Calling convention (Megatron's): ``forward_step_func(data_iterator, model) -> (output, loss_func)``
where ``loss_func(output)`` returns the loss (or ``(loss, info)``) and may be None when the model
already returns the loss. The schedule differentiates through it with ``mindspore.value_and_grad``
(or ``mindspore.vjp`` between pipeline stages), multiplies the loss by ``loss_scale /
num_microbatches`` before differentiating, and adds every micro-batch's parameter gradients into
the model chunk's data-parallel storage (``DistributedDataParallel.accumulate``).

It returns the list of unscaled per-micro-batch losses (on the last pipeline stage; an empty list
elsewhere).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import mindspore as ms
from mindspore import Tensor

from mindspeed_ms.core import parallel_state as ps

__all__ = ["get_forward_backward_func", "forward_backward_no_pipelining", "loss_from_output",
           "micro_batch_factors"]


def micro_batch_factors(loss_scale: float, num_microbatches: int,
                        loss_weights: Optional[Sequence[float]] = None) -> List[float]:
    """What each micro-batch's loss is multiplied by before differentiation.

    ``loss_scale * weight``, the weight ``1 / num_microbatches`` unless ``loss_weights`` gives one
    per micro-batch.

    Raises:
        ValueError: ``loss_weights`` does not have ``num_microbatches`` entries.
    """
    if loss_weights is None:
        return [float(loss_scale) / num_microbatches] * num_microbatches
    weights = [float(w) for w in loss_weights]
    if len(weights) != num_microbatches:
        raise ValueError(f"loss_weights needs one weight per micro-batch ({num_microbatches}), got {len(weights)}")
    return [float(loss_scale) * w for w in weights]


def loss_from_output(output, loss_func: Optional[Callable]):
    """The scalar loss of a forward step's output."""
    loss = loss_func(output) if loss_func is not None else output
    if isinstance(loss, (tuple, list)):
        loss = loss[0]
    return loss


def _chunk_params(chunk):
    params = getattr(chunk, "params", None)
    return list(params) if params is not None else list(chunk.trainable_params())


def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
                                   decoder_seq_length=None, forward_only: bool = False,
                                   collect_non_loss_data: bool = False, first_val_step=None,
                                   loss_scale: float = 1.0,
                                   loss_weights: Optional[Sequence[float]] = None) -> List[Tensor]:
    """Run every micro-batch through the model and accumulate gradients (no pipeline parallelism).

    Args:
        forward_step_func: ``(data_iterator, model) -> (output, loss_func)``.
        data_iterator: Iterator of micro-batches (or a one-element list of it).
        model: The model chunk (or a one-element list of it), usually a DistributedDataParallel.
        num_microbatches: Micro-batches per step.
        seq_length, micro_batch_size, decoder_seq_length, collect_non_loss_data, first_val_step:
            Accepted for Megatron compatibility.
        forward_only: Evaluate only (no gradients).
        loss_scale: The loss-scale value the loss is multiplied by before differentiation.
        loss_weights: Weight of each micro-batch's loss in the step's loss (default
            ``1 / num_microbatches`` each, Megatron's mean over micro-batches; the trainer passes
            other weights for ``loss_reduction: sum`` and ``calculate_per_token_loss``).

    Returns:
        The unscaled loss of every micro-batch.
    """
    del seq_length, micro_batch_size, decoder_seq_length, collect_non_loss_data, first_val_step
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"non-pipelined schedule expects one model chunk, got {len(model)}")
        model = model[0]
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = data_iterator[0]
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be positive, got {num_microbatches}")
    losses = []
    factors = micro_batch_factors(loss_scale, num_microbatches, loss_weights)
    params = None if forward_only else _chunk_params(model)
    for i in range(num_microbatches):
        factor = factors[i]
        if forward_only:
            output, loss_func = forward_step_func(data_iterator, model)
            losses.append(loss_from_output(output, loss_func))
            continue

        def scaled_loss(factor=factor):
            output, loss_func = forward_step_func(data_iterator, model)
            loss = loss_from_output(output, loss_func)
            return loss * factor, loss

        (_, loss), grads = ms.value_and_grad(scaled_loss, None, params, has_aux=True)()
        model.accumulate(grads)
        losses.append(loss)
    return losses


def get_forward_backward_func() -> Callable:
    """The schedule for the current pipeline layout."""
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return forward_backward_no_pipelining
    try:
        from mindspeed_ms.core.pipeline_parallel import pipelined  # pylint: disable=import-outside-toplevel
    except ImportError as err:  # pragma: no cover - until the pipelined schedules exist
        raise NotImplementedError("pipeline_model_parallel_size > 1 needs the pipelined schedules") from err
    if ps.get_virtual_pipeline_model_parallel_world_size() is not None:
        return pipelined.forward_backward_pipelining_with_interleaving
    return pipelined.forward_backward_pipelining_without_interleaving

