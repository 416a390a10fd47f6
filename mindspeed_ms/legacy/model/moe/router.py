"""TopKRouter: scores tokens against experts and picks the top k for each token."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.precision import matmul
from mindspeed_ms.core.tensor_parallel.layers import init_partitioned_parameter
from mindspeed_ms.core.tensor_parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker
from mindspeed_ms.legacy.model.moe import moe_utils

__all__ = ["TopKRouter", "LOAD_BALANCING_TYPES"]

LOAD_BALANCING_TYPES = ("aux_loss", "none")


def _init_method(config):
    # The same initialisation as the dense layers' (transformer._init_method); imported lazily
    # because transformer.py imports the MoE layer.
    from mindspeed_ms.legacy.model.transformer import _init_method as init  # pylint: disable=import-outside-toplevel

    return init(config)


class TopKRouter(nn.Cell):
    """Top-K router: computes a score per expert for each token and selects the ``k`` best.

    The gating linear layer (``hidden_size -> num_experts``, no bias) is replicated on every
    tensor-parallel rank; with sequence parallelism each rank routes its own slice of the
    sequence, so the weight is marked ``sequence_parallel`` (its gradient is all-reduced over the
    tensor-parallel group like the norms'). Routing runs in float32.

    For each token the ``k`` experts with the largest logits are chosen and their probabilities
    are the softmax over those ``k`` logits. Options (``config.moe_config``):

    * ``moe_router_load_balancing_type='aux_loss'``: the Switch-Transformer load-balancing loss
      ``moe_aux_loss_coeff * E / k * sum_e mean_t(p_te) * f_e / T`` (``p``: softmax over all
      experts, ``f_e``: slots routed to expert ``e``) enters the gradients through
      :class:`~mindspeed_ms.legacy.model.moe.moe_utils.MoEAuxLossAutoScaler`.
    * ``moe_z_loss_coeff``: the z-loss ``coeff * mean_t logsumexp(logits_t)^2``, the same way.
    * ``moe_input_jitter_eps``: in training, the input is multiplied by noise uniform in
      ``[1 - eps, 1 + eps]`` (drawn from the RNG tracker, so recomputation replays it).
    * ``moe_expert_capacity_factor``: every expert takes at most
      ``ceil(k * T * factor / E)`` slots of this rank's ``T`` tokens (cold experts of the cold/hot
      optimisation ``floor(C * cold_token_percent)``); the others are dropped by
      ``moe_token_drop_policy`` ('probs': lowest probability first, 'position': latest tokens
      first; the MoE layer tells the router the tokens' sequence positions). A dropped slot has
      probability 0 and expert index ``num_experts``.

    With sequence parallelism the losses are computed over the tensor-parallel group's tokens
    (each rank contributes its share), so they equal the single-process losses.

    During training forward passes the router records the tokens sent to each expert (before
    dropping; each token counts k times) and the auxiliary-loss values; see
    :func:`~mindspeed_ms.legacy.model.moe.moe_utils.collect_token_counts`.

    Args:
        config (TransformerConfig): The model configuration (``moe_config`` holds the options).
        init_key (str, optional): Layout-independent key of the weight's master initialisation.

    Inputs:
        - **input** (Tensor) - ``(..., hidden_size)``; all leading dimensions are tokens.

    Outputs:
        Tuple of 2 tensors:

        - **scores** (Tensor) - ``(T, k)`` float32 probabilities of the selected experts (0 for
          dropped slots).
        - **indices** (Tensor) - ``(T, k)`` int32 selected experts (``num_experts`` for dropped
          slots).

    Raises:
        NotImplementedError: ``moe_router_load_balancing_type`` is 'sinkhorn'.
        ValueError: ``moe_router_load_balancing_type`` is not 'sinkhorn', 'aux_loss' or 'none'.
        ValueError: ``moe_router_topk`` is not in ``1..num_experts``.

    Examples:
        >>> router = TopKRouter(model_cfg)
        >>> scores, indices = router(ms.Tensor(np.random.random((32, 16)).astype(np.float32)))
        >>> print(scores.shape)
        (32, 2)
    """

    def __init__(self, config, init_key: Optional[str] = None):
        super().__init__()
        moe = config.moe_config
        self.config = config
        self.moe_config = moe
        balancing = moe.moe_router_load_balancing_type
        if balancing == "sinkhorn":
            raise NotImplementedError("moe_config.moe_router_load_balancing_type 'sinkhorn' is not supported for "
                                      "now; use 'aux_loss' or 'none'")
        if balancing not in LOAD_BALANCING_TYPES:
            raise ValueError(f"moe_config.moe_router_load_balancing_type must be one of 'aux_loss', 'none' "
                             f"('sinkhorn' is not implemented), got {balancing!r}")
        self.routing_type = balancing
        self.num_experts = int(moe.num_experts)
        self.topk = int(moe.moe_router_topk)
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"moe_config.moe_router_topk must be in 1..num_experts={self.num_experts}, "
                             f"got {self.topk}")
        self.hidden_size = int(config.hidden_size)
        self.aux_loss_coeff = float(moe.moe_aux_loss_coeff or 0.0)
        self.z_loss_coeff = moe.moe_z_loss_coeff
        self.input_jitter_eps = moe.moe_input_jitter_eps
        self.capacity_factor = moe.moe_expert_capacity_factor
        self.drop_policy = moe.moe_token_drop_policy
        parallel_config = config.parallel_config
        self.sequence_parallel = bool(parallel_config.sequence_parallel)
        self.weight = init_partitioned_parameter(
            (self.num_experts, self.hidden_size), None, _init_method(config), config=config, dtype=ms.float32,
            name="weight", key=(init_key or "router") + ".weight")
        # Replicated over tensor-parallel ranks that route different tokens: partial gradients.
        self.weight.sequence_parallel = self.sequence_parallel
        # Set by the MoE layer when cold/hot experts change the capacities.
        self.hot_experts: Optional[List[int]] = None
        # Set by the MoE layer for (B, S, H) inputs: tokens' order by sequence position (for the
        # 'position' drop policy); None = the flattened order.
        self.token_order: Optional[np.ndarray] = None
        self.last_capacity: Optional[np.ndarray] = None
        self.last_token_counts: Optional[np.ndarray] = None
        self._pending_counts = np.zeros((self.num_experts,), np.int64)
        self._pending_losses: Dict[str, List[float]] = {}

    # -- bookkeeping used by moe_utils.collect_* -----------------------------------------------

    def pending_token_counts(self) -> np.ndarray:
        """This rank's counts since the last reset (int64, one per expert)."""
        return self._pending_counts.copy()

    def reset_token_counts(self) -> None:
        """Clear this rank's accumulated counts."""
        self._pending_counts = np.zeros((self.num_experts,), np.int64)

    def pending_aux_losses(self) -> Dict[str, List[float]]:
        """This rank's auxiliary-loss values since the last reset, per loss name."""
        return {name: list(values) for name, values in self._pending_losses.items()}

    def reset_aux_losses(self) -> None:
        """Clear this rank's recorded auxiliary-loss values."""
        self._pending_losses = {}

    def _recording(self) -> bool:
        return bool(self.training) and not moe_utils.in_recomputation()

    def _record_loss(self, name: str, value: Tensor) -> None:
        if self._recording():
            self._pending_losses.setdefault(name, []).append(float(value.asnumpy()))

    # -- computation -----------------------------------------------------------------------------

    def _tp_split(self) -> bool:
        """Whether the tensor-parallel ranks hold different tokens (sequence parallelism)."""
        return self.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1

    def _group_totals(self, counts: np.ndarray, num_tokens: int):
        """Counts and token number of the group the losses are defined over."""
        if not self._tp_split():
            return counts, num_tokens
        group = ps.get_tensor_model_parallel_group()
        summed = comm.all_reduce(Tensor(counts.astype(np.int32)), group).asnumpy().astype(np.int64)
        return summed, num_tokens * group.size

    def apply_input_jitter(self, input_: Tensor) -> Tensor:
        """Multiply by uniform noise in ``[1 - eps, 1 + eps]`` (training only)."""
        eps = self.input_jitter_eps
        if not eps or not self.training:
            return input_
        tracker = get_rng_tracker()
        # With sequence parallelism the ranks hold different tokens, so they draw different noise.
        stream = MODEL_PARALLEL_RNG if self._tp_split() and MODEL_PARALLEL_RNG in tracker.names() else None
        if stream is not None:
            with tracker.fork(stream):
                noise = tracker.uniform(input_.shape)
        else:
            noise = tracker.uniform(input_.shape)
        factor = Tensor((1.0 - eps + 2.0 * eps * noise).astype(np.float32)).astype(input_.dtype)
        return input_ * factor

    def gating(self, input_: Tensor) -> Tensor:
        """Router logits ``(T, E)`` in float32."""
        return matmul(moe_utils.float32(input_), self.weight, transpose_b=True, compute_dtype=ms.float32)

    def construct(self, input_):
        if input_.shape[-1] != self.hidden_size:
            raise ValueError(f"TopKRouter: the input's last dimension must be hidden_size={self.hidden_size}, got "
                             f"shape {tuple(input_.shape)}")
        tokens = input_.reshape(-1, self.hidden_size)
        num_tokens = int(tokens.shape[0])
        tokens = self.apply_input_jitter(tokens)
        logits = self.gating(tokens)

        top_logits, top_indices = ops.topk(logits, self.topk)
        indices_np = top_indices.asnumpy().astype(np.int64)
        # Gather the selected logits again so the gradient flows through a plain gather.
        top_logits = ops.gather_elements(logits, 1, Tensor(indices_np.astype(np.int32)))
        probs = ops.softmax(top_logits, axis=-1)

        counts = np.bincount(indices_np.reshape(-1), minlength=self.num_experts).astype(np.int64)
        if self._recording():
            self._pending_counts += counts
        if self.training and (self.routing_type == "aux_loss" or self.z_loss_coeff):
            group_counts, group_tokens = self._group_totals(counts, num_tokens)
            if self.z_loss_coeff:
                zloss = moe_utils.z_loss(logits, self.z_loss_coeff, group_tokens)
                self._record_loss("z_loss", zloss)
                probs = moe_utils.apply_aux_loss(probs, zloss)
            if self.routing_type == "aux_loss":
                full_probs = ops.softmax(logits, axis=-1)
                aux = moe_utils.switch_load_balancing_loss(full_probs, group_counts, self.topk,
                                                           self.aux_loss_coeff, group_tokens)
                self._record_loss("load_balancing_loss", aux)
                probs = moe_utils.apply_aux_loss(probs, aux)

        self.last_capacity = moe_utils.expert_capacities(self.moe_config, num_tokens, self.hot_experts)
        if self.last_capacity is not None:
            order = self.token_order if self.token_order is not None and len(self.token_order) == num_tokens \
                else None
            keep = moe_utils.capacity_keep_mask(indices_np, probs.asnumpy(), self.last_capacity, self.drop_policy,
                                                token_order=order)
            if not keep.all():
                probs = probs * Tensor(keep.astype(np.float32))
                indices_np = np.where(keep, indices_np, self.num_experts)
        return probs, Tensor(indices_np.astype(np.int32))
