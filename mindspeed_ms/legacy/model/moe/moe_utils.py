"""Helpers shared by the MoE router, dispatcher and layer, and the per-step API of the training loop.

Three groups of things live here:

* **Auxiliary losses in the backward pass.** The router's load-balancing and z-losses are not
  added to the model's loss; instead :class:`MoEAuxLossAutoScaler` is an identity on an
  activation whose backward pass also sends ``aux_loss_scale`` into the auxiliary loss, so its
  gradient reaches the router as if ``aux_loss * aux_loss_scale`` had been added to the (scaled)
  main loss. The training loop sets the scale once per step with :func:`set_aux_loss_scale`
  (and the number of micro-batches once, :func:`set_aux_loss_micro_batches`).
* **Capacity and routing arithmetic** on the host (token dropping needs sorted per-expert ranks,
  which is cheap and exact in numpy; the dispatcher needs the counts on the host anyway to size
  its all-to-all).
* **The per-step collection API**: :func:`collect_token_counts`, :func:`collect_aux_losses`,
  :func:`record_token_distribution`. Every MoE layer accumulates, during training forward passes,
  the number of tokens its router sent to each expert and the values of its auxiliary losses;
  these functions reduce them over the ranks that hold the same layers and clear them.

Layers are identified by their **0-based** global layer index (``layer_number - 1``), as in the
``layer-<L>_<step>.npy`` files and the ``moe_tokens`` events.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps

__all__ = [
    "MoEAuxLossAutoScaler",
    "apply_aux_loss",
    "set_aux_loss_scale",
    "set_aux_loss_micro_batches",
    "get_aux_loss_scale",
    "recomputation",
    "in_recomputation",
    "get_capacity",
    "expert_capacities",
    "capacity_keep_mask",
    "sequence_major_order",
    "switch_load_balancing_loss",
    "z_loss",
    "moe_layers",
    "collect_token_counts",
    "collect_aux_losses",
    "is_token_count_writer",
    "record_token_distribution",
    "get_moe_layer_wise_logging_tracker",
    "clear_moe_layer_wise_logging_tracker",
]

# ---------------------------------------------------------------------------------------------
# Auxiliary losses reach the gradients through an identity op with a custom backward
# ---------------------------------------------------------------------------------------------

_AUX_LOSS_SCALE = [1.0]
_AUX_MICRO_BATCHES = [1]


def set_aux_loss_scale(scale: float) -> None:
    """Set the loss scale the auxiliary losses' gradients are multiplied with.

    The training loop multiplies each micro-batch's loss by ``loss_scale / num_micro_batches``
    before differentiating; the auxiliary losses get the same factor: ``scale`` set here each
    step (the loss scale, 1.0 without loss scaling) divided by the number of micro-batches set
    once with :func:`set_aux_loss_micro_batches` (the MoE training hooks do that from
    ``dataset_config.micro_batch_num``). The factor is read when the backward pass runs.

    Raises:
        ValueError: ``scale`` is not a finite number.
    """
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"aux loss scale must be a finite number, got {scale!r}")
    _AUX_LOSS_SCALE[0] = value


def set_aux_loss_micro_batches(num_micro_batches: int) -> None:
    """Set the number of micro-batches per step the auxiliary-loss gradients are averaged over.

    Raises:
        ValueError: ``num_micro_batches`` is not an integer >= 1.
    """
    if isinstance(num_micro_batches, bool) or int(num_micro_batches) != num_micro_batches or num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be an integer >= 1, got {num_micro_batches!r}")
    _AUX_MICRO_BATCHES[0] = int(num_micro_batches)


def get_aux_loss_scale() -> float:
    """The factor the auxiliary losses' gradients get: loss scale / micro-batches (default 1.0)."""
    return _AUX_LOSS_SCALE[0] / _AUX_MICRO_BATCHES[0]


class MoEAuxLossAutoScaler(nn.Cell):
    """Identity on ``output``; its backward adds ``aux_loss_scale`` as the gradient of ``aux_loss``.

    Inputs:
        - **output** (Tensor) - an activation that reaches the loss (the router's probabilities).
        - **aux_loss** (Tensor) - a scalar auxiliary loss computed from the router's logits.

    Outputs:
        ``output`` unchanged.
    """

    def construct(self, output, aux_loss):
        return output

    def bprop(self, output, aux_loss, out, dout):
        # The gradient of the auxiliary loss is d(aux * scale)/d(aux) = scale, whatever the
        # activation's gradient is: that is how the loss reaches the router's weights.
        return dout, ops.ones_like(aux_loss) * get_aux_loss_scale()


_SCALER = MoEAuxLossAutoScaler()


def apply_aux_loss(output: Tensor, aux_loss: Tensor) -> Tensor:
    """``output`` with ``aux_loss`` attached to its backward pass (see :class:`MoEAuxLossAutoScaler`)."""
    return _SCALER(output, aux_loss)


# ---------------------------------------------------------------------------------------------
# Recomputation: the second forward pass must not be recorded twice
# ---------------------------------------------------------------------------------------------

_RECOMPUTING = [0]


@contextlib.contextmanager
def recomputation():
    """Mark the enclosed forward pass as a recomputation (activation checkpointing).

    Full recomputation runs a layer's forward pass again during the backward pass; routing is
    deterministic, so the counts and loss values would only be recorded twice. The transformer's
    recompute wrapper enters this context around the second run.
    """
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


def in_recomputation() -> bool:
    """Whether a recomputation forward pass is running."""
    return _RECOMPUTING[0] > 0


# ---------------------------------------------------------------------------------------------
# Capacity and routing arithmetic
# ---------------------------------------------------------------------------------------------

def get_capacity(num_tokens: int, num_experts: int, capacity_factor: float, topk: int = 1) -> int:
    """Tokens one expert may take: ``ceil(topk * num_tokens * capacity_factor / num_experts)``.

    Args:
        num_tokens: Tokens routed by this rank (``tokens_per_group``).
        num_experts: Number of experts.
        capacity_factor: ``moe_expert_capacity_factor`` (> 0).
        topk: Experts per token.
    """
    if capacity_factor is None or capacity_factor <= 0:
        raise ValueError(f"moe_expert_capacity_factor must be a number > 0 to compute a capacity, got "
                         f"{capacity_factor!r}")
    # The product is formed in one place so every rank and both code paths round identically.
    return int(math.ceil(topk * num_tokens * float(capacity_factor) / num_experts))


def expert_capacities(moe_config, num_tokens: int, hot_experts: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """Per-expert capacities, or None when there is no capacity limit.

    Without cold/hot experts every expert gets :func:`get_capacity`. With them (``hot_experts``
    given), hot experts get that capacity ``C`` and cold experts ``floor(C * cold_token_percent)``.
    """
    factor = moe_config.moe_expert_capacity_factor
    if factor is None:
        return None
    num_experts = int(moe_config.num_experts)
    cap = get_capacity(num_tokens, num_experts, factor, int(moe_config.moe_router_topk))
    caps = np.full((num_experts,), cap, np.int64)
    if hot_experts is not None:
        cold = int(math.floor(cap * float(moe_config.cold_token_percent)))
        hot = np.zeros((num_experts,), bool)
        hot[list(hot_experts)] = True
        caps[~hot] = cold
    return caps


def capacity_keep_mask(indices: np.ndarray, probs: np.ndarray, capacities: np.ndarray, policy: str,
                       token_order: Optional[np.ndarray] = None) -> np.ndarray:
    """Which routing slots survive the experts' capacities.

    A slot is one (token, k) choice. Each expert keeps at most ``capacities[e]`` of its slots:
    with ``policy='probs'`` those with the highest router probability (ties: earlier token first),
    with ``'position'`` the earliest tokens, so the latest positions of the sequence are dropped
    first.

    Args:
        indices: ``(T, k)`` expert of each slot.
        probs: ``(T, k)`` router probability of each slot.
        capacities: ``(E,)`` capacity of each expert.
        policy: ``'probs'`` or ``'position'``.
        token_order: ``(T,)`` rank of each token in "earliest first" order (default: the given
            order). For ``(B, S, H)`` hidden states that is sequence position first, then batch.

    Returns:
        ``(T, k)`` boolean mask, True = kept.
    """
    if policy not in ("probs", "position"):
        raise ValueError(f"moe_token_drop_policy must be 'probs' or 'position', got {policy!r}")
    flat = indices.reshape(-1).astype(np.int64)
    topk = indices.shape[1] if indices.ndim == 2 else 1
    if token_order is None:
        slots = np.arange(flat.size)
    else:
        order = np.asarray(token_order, np.int64).reshape(-1)
        slots = (order[:, None] * topk + np.arange(topk)[None, :]).reshape(-1)
    if policy == "probs":
        order = np.lexsort((slots, -probs.reshape(-1).astype(np.float64), flat))
    else:
        order = np.lexsort((slots, flat))
    sorted_experts = flat[order]
    # Rank of each slot within its expert's group = position minus where the group starts.
    starts = np.searchsorted(sorted_experts, sorted_experts, side="left")
    rank_in_expert = np.arange(flat.size) - starts
    keep_sorted = rank_in_expert < capacities[sorted_experts]
    keep = np.empty(flat.size, bool)
    keep[order] = keep_sorted
    return keep.reshape(indices.shape)


def sequence_major_order(shape: Sequence[int], seq_dim: int) -> Optional[np.ndarray]:
    """Rank of each flattened token when tokens are ordered by sequence position, then batch.

    ``shape`` is the hidden states' shape ``(B, S, H)`` (``seq_dim`` 1) or ``(S, B, H)``
    (``seq_dim`` 0); None when the flattened order already is sequence-major (or no sequence).
    """
    if len(shape) != 3 or seq_dim != 1:
        return None
    batch, seq = int(shape[0]), int(shape[1])
    b, s = np.meshgrid(np.arange(batch), np.arange(seq), indexing="ij")
    return (s * batch + b).reshape(-1)


def switch_load_balancing_loss(probs: Tensor, tokens_per_expert: np.ndarray, topk: int, coeff: float,
                               total_tokens: int) -> Tensor:
    """Switch-Transformer load-balancing loss, possibly as this rank's share of a larger group.

    ``loss = coeff * E / (k * N^2) * sum_e (sum_t p_te) * f_e`` where ``p`` are the softmax
    probabilities over all experts, ``f_e`` the number of slots routed to expert ``e`` (before
    dropping) and ``N`` the tokens of the group. When the tokens of a group are spread over
    ranks (sequence parallelism), each rank passes its own ``probs``, the group's
    ``tokens_per_expert`` and the group's ``total_tokens``: the ranks' values then sum to the
    group's loss and so do their gradients.

    Args:
        probs: ``(T, E)`` float32 probabilities of this rank's tokens.
        tokens_per_expert: ``(E,)`` counts of the group.
        topk: Experts per token.
        coeff: ``moe_aux_loss_coeff``.
        total_tokens: Tokens of the group.
    """
    num_experts = probs.shape[-1]
    counts = Tensor(np.asarray(tokens_per_expert, np.float32))
    scale = float(coeff) * num_experts / (float(topk) * float(total_tokens) ** 2)
    return (probs.sum(axis=0) * counts).sum() * scale


def z_loss(logits: Tensor, coeff: float, total_tokens: int) -> Tensor:
    """Router z-loss ``coeff * mean_t logsumexp(logits_t)^2`` (this rank's share of the group).

    Args:
        logits: ``(T, E)`` float32 router logits of this rank's tokens.
        coeff: ``moe_z_loss_coeff``.
        total_tokens: Tokens of the group the mean is over.
    """
    # Stable log-sum-exp; the maximum is a constant for the gradient (it cancels exactly).
    peak = ops.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = ops.log(ops.exp(logits - peak).sum(axis=-1)) + peak.squeeze(-1)
    return (lse * lse).sum() * (float(coeff) / float(total_tokens))


# ---------------------------------------------------------------------------------------------
# The per-step collection API used by the training loop
# ---------------------------------------------------------------------------------------------

ModelLike = Union[nn.Cell, Sequence[nn.Cell]]


def moe_layers(model: ModelLike) -> List[nn.Cell]:
    """The MoE layers of ``model`` (a cell or a list of model chunks), ordered by layer index.

    Layers built without a ``layer_number`` are numbered after the numbered ones, in the
    order they appear in the model, and that number is stored on the layer.
    """
    from mindspeed_ms.legacy.model.moe.moe_layer import MoELayer  # pylint: disable=import-outside-toplevel

    chunks = [model] if isinstance(model, nn.Cell) else list(model)
    found: List[nn.Cell] = []
    seen = set()
    for chunk in chunks:
        for _, cell in chunk.cells_and_names():
            if isinstance(cell, MoELayer) and id(cell) not in seen:
                seen.add(id(cell))
                found.append(cell)
    numbered = [layer.layer_index for layer in found if layer.layer_index is not None]
    nxt = max(numbered) + 1 if numbered else 0
    for layer in found:
        if layer.layer_index is None:
            layer.layer_index = nxt
            nxt += 1
    return sorted(found, key=lambda layer: layer.layer_index)


def _token_reduce_group() -> comm.ProcessGroup:
    # Every rank of a pipeline stage routes its own tokens through the stage's MoE layers:
    # tensor-parallel ranks (different sequence slices with sequence parallelism), context-
    # and data-parallel ranks (expert parallelism is a split of data parallelism).
    return ps.get_tensor_and_data_parallel_group(with_context_parallel=True)


def _tokens_are_split_over_tp(layer) -> bool:
    return bool(layer.sp) and ps.get_tensor_model_parallel_world_size() > 1


def collect_token_counts(model: ModelLike, reset: bool = True) -> Dict[int, np.ndarray]:
    """Tokens routed to each expert, per MoE layer, since the last collection (normally one step).

    Counts are taken before capacity dropping, each token counting ``moe_router_topk`` times,
    summed over the micro-batches of the step and over every rank that routes tokens through the
    layer, so they describe the whole global batch and are identical on every rank of a pipeline
    stage. Only training forward passes are counted (not evaluation, not recomputation).

    Every rank of the stage must call this together (it all-reduces over the tensor-, context-
    and data-parallel ranks).

    Args:
        model: The model or its list of chunks.
        reset: Clear the accumulated counts (the normal per-step use).

    Returns:
        ``{layer_index (0-based): int64 array of num_experts counts}``; empty without MoE layers.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    tp = ps.get_tensor_model_parallel_world_size()
    local = []
    for layer in layers:
        counts = layer.router.pending_token_counts()
        if not _tokens_are_split_over_tp(layer) and tp > 1 and ps.get_tensor_model_parallel_rank() != 0:
            counts = np.zeros_like(counts)  # tensor-parallel ranks routed the same tokens: count once
        local.append(counts)
    sizes = [c.size for c in local]
    stacked = Tensor(np.concatenate(local).astype(np.int32))
    total = comm.all_reduce(stacked, _token_reduce_group()).asnumpy().astype(np.int64)
    result = {}
    offset = 0
    for layer, size in zip(layers, sizes):
        counts = total[offset:offset + size]
        offset += size
        result[layer.layer_index] = counts
        layer.last_token_counts = counts.copy()
        if reset:
            layer.router.reset_token_counts()
    return result


def collect_aux_losses(model: ModelLike, reset: bool = True) -> Dict[str, Dict[int, float]]:
    """Values of the routers' auxiliary losses since the last collection, per loss and layer.

    Each value is the mean over the step's micro-batches and the data-parallel ranks of the loss
    as it entered the gradients (already multiplied by its coefficient); with sequence
    parallelism the tensor-parallel ranks' shares are summed first. Every rank of the stage must
    call this together.

    Returns:
        ``{"load_balancing_loss": {layer: value}, "z_loss": {layer: value}}``, only the losses
        that are switched on, only layers that ran a training forward pass since the last call.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    names = ("load_balancing_loss", "z_loss")
    tp = ps.get_tensor_model_parallel_world_size()
    rows = []
    for layer in layers:
        values = layer.router.pending_aux_losses()
        for name in names:
            vals = values.get(name, [])
            rows.append([float(np.sum(vals)) if vals else 0.0, float(len(vals))])
    group = _token_reduce_group()
    table = comm.all_reduce(Tensor(np.asarray(rows, np.float32).reshape(-1, 2)), group).asnumpy()
    result: Dict[str, Dict[int, float]] = {}
    row = 0
    for layer in layers:
        # With sequence parallelism each tensor-parallel rank holds a share of one loss (sum the
        # shares); without it every tensor-parallel rank holds the whole loss (average).
        split = _tokens_are_split_over_tp(layer)
        for name in names:
            total, calls = table[row]
            row += 1
            if calls > 0:
                per_call = total / calls  # calls were summed over ranks too
                if split:
                    per_call *= tp
                result.setdefault(name, {})[layer.layer_index] = float(per_call)
        if reset:
            layer.router.reset_aux_losses()
    return result


def get_moe_layer_wise_logging_tracker(model: ModelLike) -> Dict[str, Dict[int, List[float]]]:
    """This rank's recorded auxiliary-loss values (not reduced), per loss name and layer index."""
    out: Dict[str, Dict[int, List[float]]] = {}
    for layer in moe_layers(model):
        for name, values in layer.router.pending_aux_losses().items():
            out.setdefault(name, {})[layer.layer_index] = list(values)
    return out


def clear_moe_layer_wise_logging_tracker(model: ModelLike) -> None:
    """Forget this rank's recorded auxiliary-loss values and token counts."""
    for layer in moe_layers(model):
        layer.router.reset_aux_losses()
        layer.router.reset_token_counts()


def is_token_count_writer() -> bool:
    """Whether this rank writes the token counts of its pipeline stage (events and npy files).

    The counts from :func:`collect_token_counts` are identical on every rank of a stage, so one
    rank per stage writes them: tensor-, context- and data-parallel rank 0.
    """
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def record_token_distribution(model: ModelLike, step: int, output_dir=None, events=None,
                              save_npy: bool = True, token_counts: Optional[Dict[int, np.ndarray]] = None
                              ) -> Dict[int, np.ndarray]:
    """Collect this step's token counts and write them where they belong (one call per step).

    On the writing rank of each pipeline stage (:func:`is_token_count_writer`) every MoE layer's
    counts become a ``moe_tokens`` event (when ``events`` is given) and, with ``save_npy``, the
    file ``<output_dir>/token_distribution/layer-<L>_<step>.npy``.

    Args:
        model: The model or its chunks.
        step: The optimizer step just finished (1-based, as in the ``step`` event).
        output_dir: The run's output directory (needed for the npy files).
        events: An :class:`~mindspeed_ms.training.events.EventWriter`, or None.
        save_npy: Write the npy files (``moe_config.save_token_distribution``).
        token_counts: Counts already collected this step (else :func:`collect_token_counts` runs).

    Returns:
        The counts, ``{layer_index: counts}`` (on every rank).
    """
    counts = collect_token_counts(model) if token_counts is None else token_counts
    if not counts or not is_token_count_writer():
        return counts
    if save_npy:
        if output_dir is None:
            raise ValueError("record_token_distribution: output_dir is None but save_npy is True; "
                             "give the run's output directory")
        from mindspeed_ms.tools.moe_token_distribution import save_token_distribution  # pylint: disable=import-outside-toplevel

        directory = os.path.join(os.fspath(output_dir), "token_distribution")
        for layer, vec in counts.items():
            save_token_distribution(directory, layer, step, vec)
    if events is not None:
        for layer, vec in counts.items():
            events.moe_tokens(step, layer, [int(v) for v in vec])
    return counts


def host_ints(value) -> np.ndarray:
    """A 1-D int64 numpy array from a list, numpy array or Tensor."""
    if isinstance(value, Tensor):
        value = value.asnumpy()
    return np.asarray(value, dtype=np.int64).reshape(-1)


def float32(value: Tensor) -> Tensor:
    """``value`` as float32 (the router computes in float32)."""
    return value if value.dtype == ms.float32 else value.astype(ms.float32)
