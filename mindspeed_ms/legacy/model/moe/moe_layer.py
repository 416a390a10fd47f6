"""MoELayer: router, token dispatcher and experts in place of a transformer layer's MLP."""

from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import numpy as np
from mindspore import Parameter, Tensor

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.tensor_parallel.layers import sequence_dim
from mindspeed_ms.legacy.model.moe import moe_utils
from mindspeed_ms.legacy.model.module import Module
from mindspeed_ms.legacy.model.moe.experts import GroupedMLP, SequentialMLP
from mindspeed_ms.legacy.model.moe.router import TopKRouter
from mindspeed_ms.legacy.model.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

__all__ = ["MoELayer"]

# Initialisation keys of layers built without a layer number follow the creation order, which is
# the same on every rank (as for the tensor-parallel layers' automatic keys).
_unnumbered = itertools.count()


class MoELayer(Module):
    """Mixture-of-experts layer.

    The router picks ``moe_router_topk`` experts per token, the all-to-all dispatcher sends the
    tokens to the expert-parallel ranks that hold those experts, the local experts
    (:class:`SequentialMLP`, or :class:`GroupedMLP` with ``moe_grouped_gemm``) compute, and the
    dispatcher brings the results back weighted by the router probabilities.

    With ``moe_config.enable_cold_hot_expert`` the ``hot_expert_num`` hot experts also have a
    replica on every expert-parallel rank (``hot_experts``): their tokens are computed locally,
    without the all-to-all, and they get the capacity ``C`` while cold experts get
    ``floor(C * cold_token_percent)``. Which experts are hot is decided by
    :class:`~mindspeed_ms.legacy.model.moe.cold_hot.ColdHotExpertMonitor` (initially experts
    ``0 .. hot_expert_num - 1``).

    Args:
        config (TransformerConfig): The model configuration.
        submodules (MLPSubmodules, optional): Reserved, not used. Default: None.
        layer_number (int, optional): 1-based global index of the transformer layer. It names the
            weights' master-initialisation keys and the layer in token statistics (as the 0-based
            ``layer_index = layer_number - 1``). Default: None.

    Inputs:
        - **hidden_states** (Tensor) - ``(B, S, H)`` or ``(S, B, H)`` (sequence-parallel: this
          rank's slice).

    Outputs:
        Tuple of 2 tensors:

        - **output** (Tensor) - the shape of ``hidden_states``.
        - **mlp_bias** (Tensor) - None (the experts add their biases).

    Raises:
        ValueError: If ``ep_world_size`` is less than or equal to 0.
        ValueError: If ``num_experts`` is not divisible by ``ep_world_size``.
        ValueError: If an element of ``local_expert_indices`` is greater than or equal to
            ``num_experts``.
        ValueError: If ``moe_config.moe_token_dispatcher_type`` is not 'alltoall'.
        ValueError: If ``self.training`` is True, ``get_tensor_model_parallel_world_size()`` is
            greater than 1 and ``self.sp`` is not True (checked in the forward pass, where the
            cell's training flag is known).

    Examples:
        >>> mlp = MoELayer(config)
        >>> output, mlp_bias = mlp(ms.Tensor(np.random.standard_normal((8, 2, 64)).astype(np.float32)))
        >>> print(output.shape)
        (8, 2, 64)
    """

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None):
        super().__init__(config=None)
        del submodules  # reserved by the reference API
        self.config = config
        moe = config.moe_config
        self.moe_config = moe
        self.ep_world_size = ps.get_expert_model_parallel_world_size()
        if self.ep_world_size <= 0:
            raise ValueError(f"the expert-parallel world size must be > 0, got {self.ep_world_size}")
        self.num_experts = int(moe.num_experts)
        if self.num_experts % self.ep_world_size:
            raise ValueError(f"moe_config.num_experts={self.num_experts} must be divisible by the expert-parallel "
                             f"world size {self.ep_world_size}")
        self.num_local_experts = self.num_experts // self.ep_world_size
        offset = ps.get_expert_model_parallel_rank() * self.num_local_experts
        self.local_expert_indices = [offset + i for i in range(self.num_local_experts)]
        bad = [i for i in self.local_expert_indices if i >= self.num_experts]
        if bad:
            raise ValueError(f"local_expert_indices {self.local_expert_indices} contain experts >= num_experts="
                             f"{self.num_experts}")
        if moe.moe_token_dispatcher_type != "alltoall":
            raise ValueError(f"moe_config.moe_token_dispatcher_type must be 'alltoall', got "
                             f"{moe.moe_token_dispatcher_type!r}")
        self.sp = bool(config.parallel_config.sequence_parallel)
        self.seq_dim = sequence_dim(config)
        self.layer_number = layer_number
        self.layer_index: Optional[int] = None if layer_number is None else int(layer_number) - 1
        self.last_token_counts: Optional[np.ndarray] = None
        prefix = f"layer{int(layer_number)}.mlp" if layer_number is not None else f"moe{next(_unnumbered)}"
        self.router = TopKRouter(config, init_key=prefix + ".router")
        experts_cls = GroupedMLP if moe.moe_grouped_gemm else SequentialMLP
        self.experts = experts_cls(self.num_local_experts, config, expert_indices=self.local_expert_indices,
                                   init_key_prefix=prefix + ".experts")
        self.token_dispatcher = MoEAlltoAllTokenDispatcher(self.num_local_experts, self.local_expert_indices, config)
        self.cold_hot = bool(moe.enable_cold_hot_expert)
        if self.cold_hot:
            self.hot_expert_num = int(moe.hot_expert_num)
            initial = list(range(self.hot_expert_num))
            self.hot_experts = experts_cls(self.hot_expert_num, config, expert_indices=initial,
                                           init_key_prefix=prefix + ".experts", replica=True)
            # A group of one: the replicas' tokens never leave the rank (but are still gathered
            # over tensor-parallel ranks, whose weights are shards).
            alone = comm.ProcessGroup((comm.get_rank(),), None, "hot")
            self.hot_dispatcher = MoEAlltoAllTokenDispatcher(self.hot_expert_num, list(range(self.hot_expert_num)),
                                                             config, num_experts=self.hot_expert_num, ep_group=alone)
            self.hot_expert_ids: List[int] = []
            # The hot set as a (non-trainable) parameter: a checkpoint of the parameters carries
            # it, and a model that loads one adopts it at its next forward pass.
            self.hot_expert_table = Parameter(Tensor(np.asarray(initial, np.int32)), name="hot_expert_table",
                                              requires_grad=False)
            self.set_hot_experts(initial, copy_weights=True)

    # -- cold/hot experts --------------------------------------------------------------------------

    def owner_ep_rank(self, expert: int) -> int:
        """Expert-parallel rank that owns global expert ``expert``."""
        return int(expert) // self.num_local_experts

    def set_hot_experts(self, experts: Sequence[int], copy_weights: bool = True, state_fn=None) -> None:
        """Make ``experts`` the hot set; with ``copy_weights``, the replicas get the owners' weights.

        Every rank of the expert-parallel group must call this with the same list. The caller
        copies the old replicas back to their owners first
        (:meth:`copy_replicas_to_owners`) when the replicas were trained.

        Args:
            experts: ``hot_expert_num`` distinct global expert indices.
            copy_weights: Broadcast each owner's weights into the replica slot.
            state_fn: ``f(parameter) -> list of same-shape Parameters`` (e.g. optimizer moments)
                that are copied along with each parameter.
        """
        from mindspeed_ms.legacy.model.moe.cold_hot import broadcast_owner_to_replicas  # pylint: disable=import-outside-toplevel

        experts = [int(e) for e in experts]
        if len(experts) != self.hot_expert_num or len(set(experts)) != len(experts) or \
                any(not 0 <= e < self.num_experts for e in experts):
            raise ValueError(f"hot experts must be {self.hot_expert_num} distinct indices in 0..{self.num_experts - 1}, "
                             f"got {experts}")
        self.hot_expert_ids = experts
        self.hot_slot_of_expert = np.full((self.num_experts,), -1, np.int64)
        self.hot_slot_of_expert[experts] = np.arange(len(experts))
        self.router.hot_experts = list(experts)
        self.hot_expert_table.set_data(Tensor(np.asarray(experts, np.int32)))
        if copy_weights:
            broadcast_owner_to_replicas(self, state_fn)

    def sync_hot_experts_from_table(self) -> bool:
        """Adopt the hot set stored in ``hot_expert_table`` if parameters were loaded into it.

        The replicas are refilled from the owners (a checkpoint's owners are current). Every rank
        of the expert-parallel group loads the same table, so they all do this at the same forward
        pass. Returns whether the set changed.
        """
        table = [int(e) for e in self.hot_expert_table.asnumpy().reshape(-1)]
        if table == self.hot_expert_ids:
            return False
        self.set_hot_experts(table, copy_weights=True)
        return True

    def copy_replicas_to_owners(self, state_fn=None) -> None:
        """Write each hot replica's weights into its owner's slot (on the owning rank)."""
        from mindspeed_ms.legacy.model.moe.cold_hot import copy_replicas_to_owners  # pylint: disable=import-outside-toplevel

        copy_replicas_to_owners(self, state_fn)

    # -- forward -----------------------------------------------------------------------------------

    def _experts_path(self, dispatcher, experts, tokens, scores, indices):
        dispatcher.expert_capacity = None
        if dispatcher.pad_to_capacity and self.router.last_capacity is not None:
            caps = self.router.last_capacity
            if not self.cold_hot:
                dispatcher.expert_capacity = caps
            elif dispatcher is self.token_dispatcher:
                # Hot experts' slots all go to the replicas: their owners get no rows at all.
                caps = caps.copy()
                caps[self.hot_expert_ids] = 0
                dispatcher.expert_capacity = caps
            else:
                dispatcher.expert_capacity = caps[self.hot_expert_ids]
        dispatched, tokens_per_expert = dispatcher.token_permutation(tokens, scores, indices)
        expert_output, _ = experts(dispatched, tokens_per_expert)
        output, _ = dispatcher.token_unpermutation(expert_output, bias=None)
        return output

    def construct(self, hidden_states):
        if self.training and ps.get_tensor_model_parallel_world_size() > 1 and not self.sp:
            raise ValueError("MoELayer: training with tensor parallelism (size "
                             f"{ps.get_tensor_model_parallel_world_size()}) needs "
                             "parallel_config.sequence_parallel=True (self.sp is False)")
        shape = tuple(hidden_states.shape)
        tokens = hidden_states.reshape(-1, shape[-1])
        if self.cold_hot:
            self.sync_hot_experts_from_table()  # before routing: capacities depend on the hot set
        self.router.token_order = moe_utils.sequence_major_order(shape, self.seq_dim)
        scores, indices = self.router(tokens)
        if not self.cold_hot:
            output = self._experts_path(self.token_dispatcher, self.experts, tokens, scores, indices)
            return output.reshape(shape), None
        chosen = indices.asnumpy().astype(np.int64)
        valid = (chosen >= 0) & (chosen < self.num_experts)
        slot = np.where(valid, self.hot_slot_of_expert[np.clip(chosen, 0, self.num_experts - 1)], -1)
        is_hot = slot >= 0
        # Each slot goes one way: to the owner's expert (cold) or to the local replica (hot); the
        # other path sees it as dropped.
        cold_indices = Tensor(np.where(is_hot, self.num_experts, chosen).astype(np.int32))
        hot_indices = Tensor(np.where(is_hot, slot, self.hot_expert_num).astype(np.int32))
        cold = self._experts_path(self.token_dispatcher, self.experts, tokens, scores, cold_indices)
        hot = self._experts_path(self.hot_dispatcher, self.hot_experts, tokens, scores, hot_indices)
        return (cold + hot).reshape(shape), None
