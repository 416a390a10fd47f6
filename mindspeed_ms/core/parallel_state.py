"""Model- and data-parallel process groups, in Megatron's layout.

The world is a grid of ``tp x cp x dp x pp`` ranks (expert parallelism splits the data-parallel
axis into ``ep x dp/ep`` for expert layers). ``order`` says which axis varies fastest: with the
default ``'tp-cp-ep-dp-pp'`` consecutive ranks form a tensor-parallel group, and pipeline stages
are the slowest axis. The rank grid is pure Python (:class:`RankGenerator`) so it can be tested
for any world size without starting processes; :func:`initialize_model_parallel` then creates a
communicator for every group this rank belongs to.

Without a distributed launch (no msrun), everything works as a world of size one and no
communicator is created.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from mindspeed_ms.core.communication import (
    ProcessGroup,
    get_rank,
    get_world_size,
    is_initialized,
    launched_by_msrun,
    new_group,
)

__all__ = [
    "RankGenerator",
    "generate_masked_orthogonal_rank_groups",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
]

_AXES = ("tp", "cp", "ep", "dp", "pp")


# ----------------------------------------------------------------------------------------------
# The pure rank grid
# ----------------------------------------------------------------------------------------------

def _prefix_products(sizes: Sequence[int]) -> List[int]:
    out = [1]
    for s in sizes:
        out.append(out[-1] * s)
    return out


def _unravel(index: int, shape: Sequence[int]) -> List[int]:
    coords = []
    for s in shape:
        coords.append(index % s)
        index //= s
    return coords


def generate_masked_orthogonal_rank_groups(world_size: int, parallel_size: Sequence[int],
                                           mask: Sequence[bool]) -> List[List[int]]:
    """All groups spanned by the masked axes of a rank grid.

    The grid has axis sizes ``parallel_size`` (the first axis varies fastest across global
    ranks). A group holds the ranks that share their coordinates on the unmasked axes; within a
    group, ranks are ordered by their masked coordinates (first masked axis fastest).

    Args:
        world_size: Product of ``parallel_size``.
        parallel_size: Axis sizes, fastest first.
        mask: Which axes the groups span.

    Returns:
        The list of groups, each a list of global ranks.
    """
    if len(parallel_size) != len(mask):
        raise ValueError("parallel_size and mask must have the same length")
    total = 1
    for s in parallel_size:
        total *= s
    if total != world_size:
        raise ValueError(f"the grid {list(parallel_size)} has {total} ranks, not {world_size}")
    strides = _prefix_products(parallel_size)[:-1]
    in_shape = [s for s, m in zip(parallel_size, mask) if m]
    in_stride = [d for d, m in zip(strides, mask) if m]
    out_shape = [s for s, m in zip(parallel_size, mask) if not m]
    out_stride = [d for d, m in zip(strides, mask) if not m]
    group_size = _prefix_products(in_shape)[-1]
    groups = []
    for g in range(world_size // group_size):
        base = sum(c * d for c, d in zip(_unravel(g, out_shape), out_stride))
        groups.append([base + sum(c * d for c, d in zip(_unravel(i, in_shape), in_stride))
                       for i in range(group_size)])
    return groups


class RankGenerator:
    """Rank groups of a ``tp x cp x ep x dp x pp`` grid laid out in a given order.

    ``dp`` is the full data-parallel size; for expert layers it splits into ``ep`` (inside the
    dense data-parallel axis) and ``dp // ep``.

    Raises:
        RuntimeError: for a malformed order (None, duplicates, unknown names, ep not adjacent to
            dp, an axis of size > 1 missing from the order).
    """

    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, order: str):
        if order is None:
            raise RuntimeError("order must not be None; use e.g. 'tp-cp-ep-dp-pp'")
        tokens = [t for t in str(order).lower().split("-")]
        unknown = [t for t in tokens if t not in _AXES]
        if unknown:
            raise RuntimeError(f"order {order!r} contains unknown parallel dimensions {unknown}; allowed: {list(_AXES)}")
        if len(set(tokens)) != len(tokens):
            raise RuntimeError(f"order {order!r} contains duplicate elements")
        if "ep" in tokens and "ep-dp" not in "-".join(tokens) and "dp-ep" not in "-".join(tokens):
            raise RuntimeError(f"order {order!r}: 'ep' must be adjacent to 'dp' ('ep-dp' or 'dp-ep')")
        sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
        for name, size in sizes.items():
            if name not in tokens:
                if size != 1:
                    raise RuntimeError(f"order {order!r} does not name '{name}', whose size is {size}")
                tokens.append(name)
        if dp % ep:
            raise RuntimeError(f"data_parallel_size {dp} is not divisible by expert_model_parallel_size {ep}")
        self.tp, self.ep, self.dp, self.pp, self.cp = tp, ep, dp, pp, cp
        self.world_size = tp * dp * pp * cp
        self.order = "-".join(tokens)
        self._dense_tokens = [t for t in tokens if t != "ep"]
        self._dense_sizes = [sizes[t] for t in self._dense_tokens]
        self._expert_tokens = list(tokens)
        self._expert_sizes = [dp // ep if t == "dp" else sizes[t] for t in tokens]

    def get_ranks(self, token: str, independent_ep: bool = False) -> List[List[int]]:
        """Groups spanning the axes in ``token`` (e.g. ``'tp'``, ``'tp-pp'``, ``'dp-cp'``).

        Args:
            token: Axis names joined by '-'.
            independent_ep: Use the expert grid (dp split into ep and dp/ep).
        """
        tokens = self._expert_tokens if independent_ep else self._dense_tokens
        sizes = self._expert_sizes if independent_ep else self._dense_sizes
        wanted = token.split("-")
        for t in wanted:
            if t not in tokens:
                raise ValueError(f"'{t}' is not an axis of the {'expert' if independent_ep else 'dense'} grid {tokens}")
        mask = [t in wanted for t in tokens]
        return generate_masked_orthogonal_rank_groups(self.world_size, sizes, mask)


# ----------------------------------------------------------------------------------------------
# Process-wide state
# ----------------------------------------------------------------------------------------------

@dataclass
class _ParallelState:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    order: str = "tp-cp-ep-dp-pp"
    split_rank: Optional[int] = None
    groups: Dict[str, ProcessGroup] = field(default_factory=dict)
    virtual_rank: Optional[int] = None
    pp_group_ranks: List[int] = field(default_factory=list)
    embedding_ranks: List[int] = field(default_factory=list)
    position_embedding_ranks: List[int] = field(default_factory=list)
    ulysses_degree: Optional[int] = None
    rank_generator: Optional[RankGenerator] = None


_STATE: Optional[_ParallelState] = None
# Megatron-style overrides used by tests and by the pipeline schedule.
_OVERRIDES: Dict[str, Optional[int]] = {}


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RuntimeError(f"{name} must be a positive integer, got {value!r}")


def initialize_model_parallel(tensor_model_parallel_size: int = 1,
                              pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: Optional[int] = None,
                              pipeline_model_parallel_split_rank: Optional[int] = None,
                              context_parallel_size: int = 1,
                              expert_model_parallel_size: int = 1,
                              order: str = "tp-cp-ep-dp-pp",
                              communicator_config_path: Optional[str] = None,
                              **kwargs) -> None:
    """Initialise the model- and data-parallel groups.

    Args:
        tensor_model_parallel_size: Ranks a tensor is split over.
        pipeline_model_parallel_size: Pipeline stages.
        virtual_pipeline_model_parallel_size: Model chunks per pipeline rank (interleaving), or None.
        pipeline_model_parallel_split_rank: First decoder rank for encoder-decoder models (kept
            for API compatibility; decoder-only models ignore it).
        context_parallel_size: Ranks the sequence is split over.
        expert_model_parallel_size: Ranks the experts are split over (inside data parallelism).
        order: Layout of the grid, fastest-varying axis first.
        communicator_config_path: HCCL communicator config (unused, as in the reference).
        **kwargs: ``ulysses_degree_in_cp`` creates the hybrid context-parallel sub-groups.

    Raises:
        RuntimeError: communication is not initialised under a distributed launch; the world
            size is not divisible by tp*pp*cp; dp is not divisible by ep; ep > 1 together with
            cp > 1; a virtual pipeline size with pp < 2; order is None, has duplicates, or names
            ep away from dp; the groups are already initialised.
    """
    del communicator_config_path
    global _STATE  # pylint: disable=global-statement
    if launched_by_msrun() and not is_initialized():
        raise RuntimeError(
            "mindspore.communication._comm_helper is not initialized: call "
            "mindspore.communication.init() before initialize_model_parallel()")
    if _STATE is not None:
        raise RuntimeError(
            "_GLOBAL_STREAM is already initialized: initialize_model_parallel() was called twice; "
            "call destroy_model_parallel() first")
    tp, pp, cp, ep = (tensor_model_parallel_size, pipeline_model_parallel_size,
                      context_parallel_size, expert_model_parallel_size)
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp), ("expert_model_parallel_size", ep)):
        _check_positive(name, value)
    world = get_world_size()
    if world % (tp * pp * cp):
        raise RuntimeError(
            f"world_size ({world}) is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp})")
    dp = world // (tp * pp * cp)
    if dp % ep:
        raise RuntimeError(f"data_parallel_size ({dp}) is not divisible by expert_model_parallel_size ({ep})")
    if ep > 1 and cp > 1:
        raise RuntimeError(
            f"combining expert_model_parallel_size ({ep}) > 1 with context_parallel_size ({cp}) > 1 "
            "is not supported")
    if virtual_pipeline_model_parallel_size is not None:
        _check_positive("virtual_pipeline_model_parallel_size", virtual_pipeline_model_parallel_size)
        if pp < 2:
            raise RuntimeError(
                "virtual_pipeline_model_parallel_size is set "
                f"({virtual_pipeline_model_parallel_size}) but pipeline_model_parallel_size is {pp} "
                "(it must be at least 2 for interleaving)")
    gen = RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order)
    ulysses = kwargs.get("ulysses_degree_in_cp")
    if ulysses is not None:
        _check_positive("ulysses_degree_in_cp", ulysses)
        if cp % ulysses:
            raise RuntimeError(f"context_parallel_size ({cp}) is not divisible by ulysses_degree_in_cp ({ulysses})")

    state = _ParallelState(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp, vpp=virtual_pipeline_model_parallel_size,
                           order=gen.order, split_rank=pipeline_model_parallel_split_rank,
                           ulysses_degree=ulysses, rank_generator=gen)
    me = get_rank()

    def make(key, all_groups, kind):
        # Every rank walks the same list in the same order, creating the communicators it is in.
        mine = None
        for ranks in all_groups:
            grp = new_group(ranks, kind=kind)
            if me in ranks:
                mine = grp
        if mine is None:
            raise RuntimeError(f"internal error: rank {me} is in no {kind} group")
        state.groups[key] = mine

    make("dp", gen.get_ranks("dp"), "dp")
    make("dp_cp", gen.get_ranks("dp-cp"), "dpcp")
    make("cp", gen.get_ranks("cp"), "cp")
    make("mp", gen.get_ranks("tp-pp"), "mp")
    make("tp", gen.get_ranks("tp"), "tp")
    make("pp", gen.get_ranks("pp"), "pp")
    make("tp_dp_cp", gen.get_ranks("tp-dp-cp"), "tpdpcp")
    make("tp_dp", gen.get_ranks("tp-dp"), "tpdp")
    make("ep", gen.get_ranks("ep", independent_ep=True), "ep")
    make("tp_ep", gen.get_ranks("tp-ep", independent_ep=True), "tpep")
    make("dp_mod_ep", gen.get_ranks("dp", independent_ep=True), "edp")

    # Embedding groups: first and last pipeline stage (plus the split rank for enc-dec).
    for ranks in gen.get_ranks("pp"):
        if len(ranks) > 1:
            emb = [ranks[0], ranks[-1]]
            pos = [ranks[0]]
            if pipeline_model_parallel_split_rank is not None:
                split = ranks[pipeline_model_parallel_split_rank]
                if split not in emb:
                    emb = [ranks[0], split, ranks[-1]]
                if split not in pos:
                    pos = [ranks[0], split]
        else:
            emb = pos = list(ranks)
        emb_group = new_group(emb, kind="emb")
        pos_group = new_group(pos, kind="posemb")
        if me in ranks:
            state.pp_group_ranks = list(ranks)
            state.embedding_ranks = emb
            state.position_embedding_ranks = pos
            state.groups["emb"] = emb_group if me in emb else ProcessGroup((me,), None, "emb")
            state.groups["posemb"] = pos_group if me in pos else ProcessGroup((me,), None, "posemb")

    if ulysses is not None and cp > 1:
        ring = cp // ulysses
        for cp_ranks in gen.get_ranks("cp"):
            ulysses_groups = [cp_ranks[i * ulysses:(i + 1) * ulysses] for i in range(ring)]
            ring_groups = [cp_ranks[j::ulysses] for j in range(ulysses)]
            for ranks in ulysses_groups:
                grp = new_group(ranks, kind="cpu")
                if me in ranks:
                    state.groups["cp_ulysses"] = grp
            for ranks in ring_groups:
                grp = new_group(ranks, kind="cpr")
                if me in ranks:
                    state.groups["cp_ring"] = grp

    if virtual_pipeline_model_parallel_size is not None:
        state.virtual_rank = 0
    _STATE = state
    _OVERRIDES.clear()


def model_parallel_is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Forget all parallel groups (communicators stay cached for reuse by an equal layout)."""
    global _STATE  # pylint: disable=global-statement
    _STATE = None
    _OVERRIDES.clear()


def _state() -> _ParallelState:
    if _STATE is not None:
        return _STATE
    if get_world_size() == 1:
        # A single process needs no set-up: every group is this rank alone.
        return _SINGLE
    raise RuntimeError("parallel groups are not initialized: call initialize_model_parallel() first")


_SINGLE = _ParallelState(groups={k: ProcessGroup((0,), None, k) for k in (
    "dp", "dp_cp", "cp", "mp", "tp", "pp", "tp_dp_cp", "tp_dp", "ep", "tp_ep", "dp_mod_ep", "emb", "posemb")},
    pp_group_ranks=[0], embedding_ranks=[0], position_embedding_ranks=[0])


def _group(key: str) -> ProcessGroup:
    st = _state()
    try:
        return st.groups[key]
    except KeyError:
        raise RuntimeError(f"the {key} group was not created by initialize_model_parallel()") from None


# ---- tensor parallel ----
def get_tensor_model_parallel_group(check_initialized: bool = True) -> ProcessGroup:
    """The tensor-parallel group of this rank."""
    del check_initialized
    return _group("tp")


def get_tensor_model_parallel_world_size() -> int:
    """Size of the tensor-parallel group."""
    if _OVERRIDES.get("tp_world") is not None:
        return _OVERRIDES["tp_world"]
    return _group("tp").size


def get_tensor_model_parallel_rank() -> int:
    """Rank in the tensor-parallel group."""
    if _OVERRIDES.get("tp_rank") is not None:
        return _OVERRIDES["tp_rank"]
    return _group("tp").rank


def set_tensor_model_parallel_world_size(size: Optional[int]) -> None:
    """Override the tensor-parallel size (tests; None removes the override)."""
    _OVERRIDES["tp_world"] = size


def set_tensor_model_parallel_rank(rank: Optional[int]) -> None:
    """Override the tensor-parallel rank (tests; None removes the override)."""
    _OVERRIDES["tp_rank"] = rank


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of the first member of this rank's tensor-parallel group."""
    return _group("tp").ranks[0]


# ---- pipeline parallel ----
def get_pipeline_model_parallel_group() -> ProcessGroup:
    """The pipeline group of this rank (one rank per stage)."""
    return _group("pp")


def get_pipeline_model_parallel_world_size() -> int:
    """Number of pipeline stages."""
    if _OVERRIDES.get("pp_world") is not None:
        return _OVERRIDES["pp_world"]
    return _group("pp").size


def get_pipeline_model_parallel_rank() -> int:
    """This rank's pipeline stage."""
    if _OVERRIDES.get("pp_rank") is not None:
        return _OVERRIDES["pp_rank"]
    return _group("pp").rank


def set_pipeline_model_parallel_world_size(size: Optional[int]) -> None:
    """Override the number of pipeline stages (tests; None removes the override)."""
    _OVERRIDES["pp_world"] = size


def set_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    """Override the pipeline stage (tests; None removes the override)."""
    _OVERRIDES["pp_rank"] = rank


def get_pipeline_model_parallel_split_rank() -> Optional[int]:
    """The encoder/decoder split rank given at initialisation."""
    return _state().split_rank


def get_pipeline_model_parallel_first_rank() -> int:
    """Global rank of the first stage in this rank's pipeline."""
    return _group("pp").ranks[0]


def get_pipeline_model_parallel_last_rank() -> int:
    """Global rank of the last stage in this rank's pipeline."""
    return _group("pp").ranks[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around)."""
    grp = _group("pp")
    return grp.ranks[(grp.rank + 1) % grp.size]


def get_pipeline_model_parallel_prev_rank() -> int:
    """Global rank of the previous stage (wrapping around)."""
    grp = _group("pp")
    return grp.ranks[(grp.rank - 1) % grp.size]


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    """Model chunks per pipeline rank, or None without interleaving."""
    return _state().vpp


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    """The model chunk currently running on this rank (interleaved schedule)."""
    return _state().virtual_rank


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    """Set the model chunk currently running (used by the interleaved schedule)."""
    _state().virtual_rank = rank


def set_virtual_pipeline_model_parallel_world_size(size: Optional[int]) -> None:
    """Set the number of model chunks per pipeline rank."""
    _state().vpp = size


def is_pipeline_first_stage(ignore_virtual: bool = False) -> bool:
    """Whether this rank (and, with interleaving, its current chunk) is the first stage."""
    st = _state()
    if not ignore_virtual and st.vpp is not None and st.virtual_rank not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False) -> bool:
    """Whether this rank (and, with interleaving, its current chunk) is the last stage."""
    st = _state()
    if not ignore_virtual and st.vpp is not None and st.virtual_rank not in (None, st.vpp - 1):
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# ---- data parallel ----
def get_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup:
    """The data-parallel group (with context parallelism folded in when asked)."""
    return _group("dp_cp" if with_context_parallel else "dp")


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    """Size of the data-parallel group."""
    return get_data_parallel_group(with_context_parallel).size


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    """Rank in the data-parallel group."""
    return get_data_parallel_group(with_context_parallel).rank


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    """Global rank of the first member of the data-parallel group."""
    return get_data_parallel_group(with_context_parallel).ranks[0]


# ---- context parallel ----
def get_context_parallel_group() -> ProcessGroup:
    """The context-parallel group of this rank."""
    return _group("cp")


def get_context_parallel_world_size() -> int:
    """Size of the context-parallel group."""
    return _group("cp").size


def get_context_parallel_rank() -> int:
    """Rank in the context-parallel group."""
    return _group("cp").rank


def get_context_parallel_global_ranks() -> List[int]:
    """Global ranks of this rank's context-parallel group."""
    return list(_group("cp").ranks)


def get_ulysses_degree_in_cp() -> Optional[int]:
    """The Ulysses degree of hybrid context parallelism (None unless configured)."""
    return _state().ulysses_degree


def get_context_parallel_group_for_hybrid_ulysses() -> ProcessGroup:
    """Hybrid CP: the Ulysses (all-to-all) sub-group of the context-parallel group."""
    return _group("cp_ulysses")


def get_context_parallel_group_for_hybrid_ring() -> ProcessGroup:
    """Hybrid CP: the ring (K/V passing) sub-group of the context-parallel group."""
    return _group("cp_ring")


# ---- expert parallel ----
def get_expert_model_parallel_group() -> ProcessGroup:
    """The expert-parallel group."""
    return _group("ep")


def get_expert_model_parallel_world_size() -> int:
    """Size of the expert-parallel group."""
    return _group("ep").size


def get_expert_model_parallel_rank() -> int:
    """Rank in the expert-parallel group."""
    return _group("ep").rank


def get_tensor_and_expert_parallel_group() -> ProcessGroup:
    """Tensor- and expert-parallel ranks together (the all-to-all group with TP)."""
    return _group("tp_ep")


def get_tensor_and_expert_parallel_world_size() -> int:
    """Size of the tensor-and-expert-parallel group."""
    return _group("tp_ep").size


def get_data_modulo_expert_parallel_group() -> ProcessGroup:
    """Data parallelism of the expert weights (dp / ep replicas)."""
    return _group("dp_mod_ep")


def get_data_modulo_expert_parallel_world_size() -> int:
    """Size of the expert data-parallel group."""
    return _group("dp_mod_ep").size


def get_data_modulo_expert_parallel_rank() -> int:
    """Rank in the expert data-parallel group."""
    return _group("dp_mod_ep").rank


# ---- model parallel / combined ----
def get_model_parallel_group() -> ProcessGroup:
    """Tensor- and pipeline-parallel ranks together."""
    return _group("mp")


def get_tensor_and_data_parallel_group(with_context_parallel: bool = False) -> ProcessGroup:
    """Tensor- and data-parallel ranks together (with context parallel when asked)."""
    return _group("tp_dp_cp" if with_context_parallel else "tp_dp")


# ---- embeddings ----
def get_embedding_group() -> ProcessGroup:
    """First and last pipeline stage, which hold the tied word embedding."""
    return _group("emb")


def get_position_embedding_group() -> ProcessGroup:
    """Stages that hold the position embedding."""
    return _group("posemb")


def is_rank_in_embedding_group(ignore_virtual: bool = False) -> bool:
    """Whether this rank holds a copy of the tied word embedding."""
    me = get_rank()
    st = _state()
    if me not in st.embedding_ranks:
        return False
    if ignore_virtual:
        return True
    if me == st.embedding_ranks[0]:
        return is_pipeline_first_stage()
    if me == st.embedding_ranks[-1]:
        return is_pipeline_last_stage()
    return True


def is_rank_in_position_embedding_group() -> bool:
    """Whether this rank holds the position embedding."""
    return get_rank() in _state().position_embedding_ranks


def get_parallel_sizes() -> Dict[str, Optional[int]]:
    """All sizes at once: ``{'tp', 'pp', 'dp', 'cp', 'ep', 'vpp'}`` (for logs and the event stream)."""
    st = _state()
    return {"tp": st.tp, "pp": st.pp, "dp": st.dp, "cp": st.cp, "ep": st.ep, "vpp": st.vpp}
