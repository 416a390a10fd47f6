"""Cold/hot experts: replicas of the most used experts on every expert-parallel rank.

Each MoE layer with ``moe_config.enable_cold_hot_expert`` holds, besides its own (owner) experts,
``hot_expert_num`` replica slots. The experts currently hot have their weights in those slots on
every rank of the expert-parallel group, so their tokens are computed where they were routed
(no all-to-all); their owners' slots receive no tokens meanwhile. The replicas' gradients are
reduced over all data-parallel ranks, like a dense layer's, which gives exactly the gradient the
owner would have got.

:class:`ColdHotExpertMonitor` re-decides the hot set at steps ``1, 2, 4, 8, ...`` below
``update_step``, at every multiple of ``update_step``, and before every checkpoint save:

1. each replica's weights are copied back into its owner's slot (the replica is the trained
   copy), so owners are always up to date after a decision;
2. the ``hot_expert_num`` experts with the most tokens in the latest step's global counts become
   hot (ties: lower index), listed in increasing order;
3. their owners broadcast the weights over the expert-parallel group into the replica slots, and
   the expert -> slot mapping is updated.

At the end of training only step 1 runs. Because step 1 runs before every save, a checkpoint
always holds up-to-date weights in the owners' slots (and the replicas equal their owners), so a
model built from it, with the monitor's :meth:`~ColdHotExpertMonitor.state_dict` restored,
computes exactly what the saved one did.

Optimizer states: when given ``optimizer_state_fn(parameter) -> [state tensors]`` (e.g. Adam's
two moments, each shaped like the parameter), those are copied and broadcast along with the
weights, so moving an expert between its owner and a replica does not reset its optimizer.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Parameter, Tensor

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.legacy.model.moe import moe_utils

__all__ = ["ColdHotExpertMonitor", "is_update_step", "broadcast_owner_to_replicas", "copy_replicas_to_owners",
           "choose_hot_experts"]

StateFn = Optional[Callable[[Parameter], Sequence[Parameter]]]


def is_update_step(step: int, update_step: int) -> bool:
    """Whether the hot set is re-decided after ``step`` (1-based): powers of two below
    ``update_step``, then multiples of it."""
    step, update_step = int(step), int(update_step)
    if step < 1:
        return False
    if step < update_step:
        return step & (step - 1) == 0
    return step % update_step == 0


def _read(param, index: Optional[int]) -> np.ndarray:
    value = param.asnumpy()
    return value if index is None else value[index]


def _write(param, index: Optional[int], value: np.ndarray) -> None:
    if index is None:
        full = np.asarray(value, dtype=param.asnumpy().dtype).reshape(param.shape)
    else:
        full = param.asnumpy().copy()
        full[index] = value
    param.set_data(Tensor(full).astype(param.dtype))


def _tensors_of(pairs, state_fn: StateFn) -> List[Tuple[object, Optional[int]]]:
    """The parameters and, after each, its optimizer states (same slicing)."""
    out = []
    for param, index in pairs:
        out.append((param, index))
        if state_fn is not None:
            out.extend((state, index) for state in state_fn(param))
    return out


def copy_replicas_to_owners(layer, state_fn: StateFn = None) -> None:
    """On each expert's owner rank, overwrite the owner's slot with its replica's weights."""
    ep_rank = ps.get_expert_model_parallel_rank()
    for slot, expert in enumerate(layer.hot_expert_ids):
        if layer.owner_ep_rank(expert) != ep_rank:
            continue
        local = expert - ep_rank * layer.num_local_experts
        source = _tensors_of(layer.hot_experts.expert_parameters(slot), state_fn)
        target = _tensors_of(layer.experts.expert_parameters(local), state_fn)
        for (src, src_index), (dst, dst_index) in zip(source, target):
            _write(dst, dst_index, _read(src, src_index))


def broadcast_owner_to_replicas(layer, state_fn: StateFn = None) -> None:
    """Fill every replica slot with its hot expert's weights, sent by the owner rank.

    One broadcast per slot over the expert-parallel group carries all of the expert's tensors
    (the owner's tensor-parallel shard goes to the replicas of the same tensor-parallel rank).
    """
    group = ps.get_expert_model_parallel_group()
    ep_rank = ps.get_expert_model_parallel_rank()
    for slot, expert in enumerate(layer.hot_expert_ids):
        owner = layer.owner_ep_rank(expert)
        target = _tensors_of(layer.hot_experts.expert_parameters(slot), state_fn)
        shapes = [_read(t, i).shape for t, i in target]
        if owner == ep_rank:
            local = expert - ep_rank * layer.num_local_experts
            source = _tensors_of(layer.experts.expert_parameters(local), state_fn)
            values = [_read(t, i) for t, i in source]
        else:
            values = [np.zeros(shape, np.float32) for shape in shapes]
        flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])
        if group.size > 1:
            flat = comm.broadcast(Tensor(flat), group.global_rank(owner), group).asnumpy()
        offset = 0
        for (param, index), shape in zip(target, shapes):
            size = int(np.prod(shape))
            _write(param, index, flat[offset:offset + size].reshape(shape))
            offset += size


class ColdHotExpertMonitor:
    """Decides which experts are hot and moves their weights; the training loop drives it.

    Calls, in the training loop:

    * ``on_step_end(step, token_counts)`` after every optimizer step (``step`` 1-based), with the
      dict from :func:`~mindspeed_ms.legacy.model.moe.moe_utils.collect_token_counts` (if None the
      monitor collects the counts itself, and the loop must not collect them again that step);
    * ``before_checkpoint()`` right before saving a checkpoint;
    * ``on_train_end()`` after the last step (before the final save, if any, call
      ``before_checkpoint()`` instead);
    * ``state_dict()`` into the checkpoint, ``load_state_dict()`` after the weights are loaded.

    Every rank of a pipeline stage must make the same calls (they communicate).

    Args:
        model: The model (a cell or a list of model chunks) with cold/hot MoE layers.
        update_step (int, optional): Default ``moe_config.update_step``.
        optimizer_state_fn (callable, optional): ``f(parameter) -> [same-shape state tensors]``.

    Raises:
        ValueError: The model has no MoE layer with ``enable_cold_hot_expert``.
    """

    def __init__(self, model, update_step: Optional[int] = None, optimizer_state_fn: StateFn = None):
        self.model = model
        self.layers = [layer for layer in moe_utils.moe_layers(model) if getattr(layer, "cold_hot", False)]
        if not self.layers:
            raise ValueError("ColdHotExpertMonitor: the model has no MoE layer with "
                             "moe_config.enable_cold_hot_expert=True")
        self.update_step = int(update_step if update_step is not None else self.layers[0].moe_config.update_step)
        if self.update_step < 1:
            raise ValueError(f"update_step must be >= 1, got {self.update_step}")
        self.optimizer_state_fn = optimizer_state_fn
        self.latest_counts: Dict[int, np.ndarray] = {}
        #: ``(step or None, reason, {layer_index: hot experts})`` for every decision, oldest first.
        self.history: List[Tuple[Optional[int], str, Dict[int, List[int]]]] = []
        self.last_step: Optional[int] = None

    def hot_experts(self) -> Dict[int, List[int]]:
        """The current hot experts per layer index."""
        return {layer.layer_index: list(layer.hot_expert_ids) for layer in self.layers}

    def on_step_end(self, step: int, token_counts: Optional[Dict[int, np.ndarray]] = None) -> bool:
        """Record the step's counts; re-decide the hot set on trigger steps.

        Returns:
            Whether the hot set was re-decided.
        """
        counts = moe_utils.collect_token_counts(self.model) if token_counts is None else token_counts
        for layer in self.layers:
            if layer.layer_index in counts:
                self.latest_counts[layer.layer_index] = np.asarray(counts[layer.layer_index], np.int64)
        self.last_step = int(step)
        if not is_update_step(step, self.update_step):
            return False
        self.update(step=int(step), reason="step")
        return True

    def update(self, step: Optional[int] = None, reason: str = "manual") -> Dict[int, List[int]]:
        """Copy replicas back, choose the new hot experts from the latest counts, broadcast them."""
        for layer in self.layers:
            layer.copy_replicas_to_owners(self.optimizer_state_fn)
            counts = self.latest_counts.get(layer.layer_index)
            if counts is None:
                # No counts yet: keep the set; the owners are current and the replicas equal them.
                continue
            chosen = sorted(choose_hot_experts(counts, layer.hot_expert_num))
            layer.set_hot_experts(chosen, copy_weights=True, state_fn=self.optimizer_state_fn)
        decided = self.hot_experts()
        self.history.append((step, reason, decided))
        return decided

    def before_checkpoint(self) -> Dict[int, List[int]]:
        """Re-decide before a save, so the checkpoint holds up-to-date owner weights."""
        return self.update(step=self.last_step, reason="checkpoint")

    def on_train_end(self) -> None:
        """Copy the replicas back into their owners' slots (no new decision)."""
        for layer in self.layers:
            layer.copy_replicas_to_owners(self.optimizer_state_fn)
        self.history.append((self.last_step, "train_end", self.hot_experts()))

    def state_dict(self) -> dict:
        """JSON-serialisable state: the hot experts and latest counts per layer."""
        return {
            "update_step": self.update_step,
            "last_step": self.last_step,
            "hot_experts": {str(k): v for k, v in self.hot_experts().items()},
            "latest_counts": {str(k): v.tolist() for k, v in self.latest_counts.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into a model whose owner weights were just loaded.

        The replica slots are refilled from the owners (loaded replica weights, if any, are
        overwritten by the equal owner weights).
        """
        hot = {int(k): v for k, v in state.get("hot_experts", {}).items()}
        self.latest_counts = {int(k): np.asarray(v, np.int64) for k, v in state.get("latest_counts", {}).items()}
        self.last_step = state.get("last_step")
        for layer in self.layers:
            experts = hot.get(layer.layer_index, layer.hot_expert_ids)
            layer.set_hot_experts(experts, copy_weights=True, state_fn=self.optimizer_state_fn)


def choose_hot_experts(counts: np.ndarray, num: int) -> List[int]:
    """The ``num`` experts with the most tokens (ties: lower index first)."""
    order = np.argsort(-np.asarray(counts, np.int64), kind="stable")
    return [int(i) for i in order[:num]]
