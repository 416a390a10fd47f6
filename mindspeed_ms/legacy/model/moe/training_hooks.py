"""What the training loop does for MoE models, behind three calls.

``mindspeed_ms.training.training`` builds the hooks with :func:`build` (None for a dense model)
and calls, on every rank:

* ``on_step_end(step, events)`` after each optimizer step: collects the step's token counts
  (global over the data-parallel ranks of the stage), writes one ``moe_tokens`` event per MoE layer
  (one rank per pipeline stage writes) and, with ``moe_config.save_token_distribution``, the
  ``<output_dir>/token_distribution/layer-<L>_<step>.npy`` files; collects the auxiliary-loss
  values; drives the cold/hot monitor. Returns extra fields for the ``step`` event:
  ``moe_aux_losses`` (``{loss name: {layer: value}}``) and, with cold/hot experts,
  ``moe_hot_experts`` (``{layer: [experts]}``).
* ``before_checkpoint()`` before each save (cold/hot: replicas copied back, hot set re-decided).
* ``on_train_end()`` after the last step (cold/hot: replicas copied back).

:func:`build` also tells the auxiliary-loss scaler the number of micro-batches per step (the loop
sets the loss scale itself every step with ``moe_utils.set_aux_loss_scale``).

Checkpoints need nothing more: each cold/hot layer keeps its hot set in the non-trainable
parameter ``hot_expert_table``, saved and loaded with the other parameters, and adopts a loaded
table at its next forward pass.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from mindspeed_ms.legacy.model.moe import moe_utils
from mindspeed_ms.legacy.model.moe.cold_hot import ColdHotExpertMonitor

__all__ = ["MoETrainingHooks", "build", "optimizer_state_fn"]


def _modules(model) -> List[Any]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    # The loop holds DistributedDataParallel wrappers; the cells are their `.module`.
    return [getattr(chunk, "module", chunk) for chunk in chunks]


def optimizer_state_fn(optimizer):
    """``f(parameter) -> [its optimizer state tensors]`` for a MegatronOptimizer-like object.

    Per-parameter states named ``<slot>.<parameter name>`` (Adam's moments, SGD's momentum) move
    with the expert's weights. Sharded states (the distributed optimizer's flat shards) are not
    per parameter and stay in place.
    """
    state = getattr(optimizer, "state", None)
    slots = getattr(optimizer, "_slots", None)
    if not isinstance(state, dict) or slots is None:
        return None

    def states(param):
        found = []
        for slot in slots():
            tensor = state.get(f"{slot}.{param.name}")
            if tensor is not None and tuple(tensor.shape) == tuple(param.shape):
                found.append(tensor)
        return found

    return states


class MoETrainingHooks:
    """Per-step MoE work of the training loop (see the module docstring).

    Args:
        model: The model, its chunks, or the loop's DDP wrappers.
        output_dir (str, optional): The run's output directory (for the npy files).
        num_micro_batches (int): Micro-batches per step.
        optimizer (optional): The optimizer, whose per-parameter states move with cold/hot swaps.
    """

    def __init__(self, model, output_dir: Optional[str] = None, num_micro_batches: int = 1, optimizer=None):
        self.modules = _modules(model)
        self.layers = moe_utils.moe_layers(self.modules)
        if not self.layers:
            raise ValueError("MoETrainingHooks: the model has no MoE layer")
        self.moe_config = self.layers[0].moe_config
        self.output_dir = output_dir
        moe_utils.set_aux_loss_micro_batches(int(num_micro_batches))
        self.monitor = None
        self.optimizer = optimizer
        if any(getattr(layer, "cold_hot", False) for layer in self.layers):
            self.monitor = ColdHotExpertMonitor(self.modules, optimizer_state_fn=optimizer_state_fn(optimizer))

    def on_step_end(self, step: int, events=None) -> Dict[str, Any]:
        """Token counts, loss values and cold/hot decisions of the step just finished.

        Returns:
            Extra fields for the ``step`` event.
        """
        save_npy = bool(self.moe_config.save_token_distribution) and self.output_dir is not None
        counts = moe_utils.record_token_distribution(self.modules, step, self.output_dir, events=events,
                                                     save_npy=save_npy)
        losses = moe_utils.collect_aux_losses(self.modules)
        extra: Dict[str, Any] = {}
        if losses:
            extra["moe_aux_losses"] = {name: {str(layer): value for layer, value in values.items()}
                                       for name, values in losses.items()}
        if self.monitor is not None:
            self.monitor.on_step_end(step, counts)
            extra["moe_hot_experts"] = {str(k): v for k, v in self.monitor.hot_experts().items()}
            self._sync_sharded_optimizer()
        return extra

    def _sync_sharded_optimizer(self) -> None:
        # A sharded (distributed) optimizer keeps float32 master copies of the weights; after a
        # swap moved weights between owners and replicas those copies must follow, or the next
        # update would write the old weights back.
        sync = getattr(self.optimizer, "sync_master_from_params", None)
        if sync is not None:
            sync()

    def before_checkpoint(self) -> None:
        """Make the owners' weights current before the parameters are saved."""
        if self.monitor is not None:
            self.monitor.before_checkpoint()
            self._sync_sharded_optimizer()

    def on_train_end(self) -> None:
        """Copy hot replicas back into their owners at the end of training."""
        if self.monitor is not None:
            self.monitor.on_train_end()


def build(model, trainer=None) -> Optional[MoETrainingHooks]:
    """The hooks for ``model``, or None when it has no MoE layer.

    Args:
        model: The model, its chunks, or the loop's DDP wrappers.
        trainer: The training loop object; its ``output_dir``, ``dc.micro_batch_num`` and
            ``optimizer`` are used when present.
    """
    if not moe_utils.moe_layers(_modules(model)):
        return None
    output_dir = getattr(trainer, "output_dir", None)
    dataset_config = getattr(trainer, "dc", None)
    # without a trainer (or one without a dataset config) each step is one micro batch
    micro = 1 if dataset_config is None else int(dataset_config.micro_batch_num)
    return MoETrainingHooks(model, output_dir=output_dir, num_micro_batches=micro,
                            optimizer=getattr(trainer, "optimizer", None))
