"""The rank grid and initialize_model_parallel, without processes (a simulated world)."""

import itertools

import pytest

import mindspeed_ms.core.communication.groups as comm_groups
import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core.communication import ProcessGroup
from mindspeed_ms.core.parallel_state import RankGenerator, generate_masked_orthogonal_rank_groups


@pytest.fixture
def world(monkeypatch):
    """Simulate a world of ``size`` ranks seen from ``rank``: no communicator is created."""

    def _make(size, rank=0):
        monkeypatch.setattr(ps, "get_world_size", lambda: size)
        monkeypatch.setattr(ps, "get_rank", lambda: rank)
        monkeypatch.setattr(comm_groups, "get_rank", lambda: rank)
        monkeypatch.setattr(ps, "new_group", lambda ranks, kind="group": ProcessGroup(tuple(ranks), f"sim_{kind}", kind))
        ps.destroy_model_parallel()

    yield _make
    ps.destroy_model_parallel()


def test_megatron_layout_default_order():
    gen = RankGenerator(tp=2, ep=1, dp=2, pp=2, cp=1, order="tp-cp-ep-dp-pp")
    assert gen.get_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert gen.get_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert gen.get_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert gen.get_ranks("tp-pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_expert_grid_splits_data_parallel():
    gen = RankGenerator(tp=2, ep=2, dp=4, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    assert gen.get_ranks("ep", independent_ep=True) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert gen.get_ranks("dp", independent_ep=True) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert gen.get_ranks("tp-ep", independent_ep=True) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_other_order_puts_pipeline_fastest():
    gen = RankGenerator(tp=2, ep=1, dp=1, pp=2, cp=1, order="pp-tp-cp-ep-dp")
    assert gen.get_ranks("pp") == [[0, 1], [2, 3]]
    assert gen.get_ranks("tp") == [[0, 2], [1, 3]]


SIZES = [1, 2, 3, 4, 6, 8, 12, 16]
ORDERS = ["tp-cp-ep-dp-pp", "tp-pp-dp", "pp-dp-tp", "tp-dp-cp-pp", "dp-ep-tp-pp-cp"]


def layouts(world_size):
    for tp, pp, cp in itertools.product([1, 2, 3, 4], repeat=3):
        if world_size % (tp * pp * cp):
            continue
        dp = world_size // (tp * pp * cp)
        for ep in [1, 2, 4]:
            if dp % ep or (ep > 1 and cp > 1):
                continue
            yield tp, pp, cp, dp, ep


@pytest.mark.parametrize("world_size", SIZES)
def test_groups_partition_the_world_and_are_orthogonal(world_size):
    for (tp, pp, cp, dp, ep), order in itertools.product(layouts(world_size), ORDERS):
        if ep > 1 and "ep" not in order:
            continue
        if cp > 1 and "cp" not in order:
            continue
        gen = RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order=order)
        sizes = {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "tp-pp": tp * pp, "dp-cp": dp * cp}
        by_token = {}
        for token, size in sizes.items():
            groups = gen.get_ranks(token)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world_size)), (token, order, groups)
            assert all(len(g) == size for g in groups)
            by_token[token] = groups
        # a tensor-parallel group meets a data-parallel (or pipeline) group in at most one rank
        for a, b in (("tp", "dp"), ("tp", "pp"), ("dp", "pp"), ("cp", "tp")):
            for ga in by_token[a]:
                for gb in by_token[b]:
                    assert len(set(ga) & set(gb)) <= 1
        # the tp x pp group is the union of its tp groups and its pp groups
        for mp in by_token["tp-pp"]:
            assert all(set(g) <= set(mp) or not set(g) & set(mp) for g in by_token["tp"] + by_token["pp"])
        for token, size in (("ep", ep), ("dp", dp // ep), ("tp-ep", tp * ep)):
            groups = gen.get_ranks(token, independent_ep=True)
            assert sorted(r for g in groups for r in g) == list(range(world_size))
            assert all(len(g) == size for g in groups)
        # every expert-parallel group lies inside one dense data-parallel group
        for eg in gen.get_ranks("ep", independent_ep=True):
            assert any(set(eg) <= set(g) for g in by_token["dp"])


def test_masked_groups_reject_wrong_world():
    with pytest.raises(ValueError, match="has 4 ranks, not 6"):
        generate_masked_orthogonal_rank_groups(6, [2, 2], [True, False])


@pytest.mark.parametrize("rank", range(8))
def test_initialize_assigns_this_ranks_groups(world, rank):
    world(8, rank)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert ps.get_tensor_model_parallel_world_size() == 2
    assert ps.get_pipeline_model_parallel_world_size() == 2
    assert ps.get_data_parallel_world_size() == 2
    assert ps.get_tensor_model_parallel_rank() == rank % 2
    assert ps.get_data_parallel_rank() == (rank // 2) % 2
    assert ps.get_pipeline_model_parallel_rank() == rank // 4
    assert ps.is_pipeline_first_stage() == (rank < 4)
    assert ps.is_pipeline_last_stage() == (rank >= 4)
    assert ps.get_pipeline_model_parallel_next_rank() == (rank + 4) % 8
    assert ps.get_pipeline_model_parallel_prev_rank() == (rank - 4) % 8
    assert ps.get_tensor_model_parallel_src_rank() == rank - rank % 2
    assert set(ps.get_embedding_group().ranks) == {rank % 4, rank % 4 + 4}
    assert ps.is_rank_in_embedding_group()
    assert ps.get_parallel_sizes() == {"tp": 2, "pp": 2, "dp": 2, "cp": 1, "ep": 1, "vpp": None}


def test_virtual_pipeline_stage_getters(world):
    world(4, 1)
    ps.initialize_model_parallel(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)
    assert ps.get_virtual_pipeline_model_parallel_world_size() == 2
    assert ps.get_virtual_pipeline_model_parallel_rank() == 0
    assert not ps.is_pipeline_first_stage()
    ps.destroy_model_parallel()
    world(4, 0)
    ps.initialize_model_parallel(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)
    assert ps.is_pipeline_first_stage()
    ps.set_virtual_pipeline_model_parallel_rank(1)
    assert not ps.is_pipeline_first_stage()
    assert ps.is_pipeline_first_stage(ignore_virtual=True)


def test_hybrid_context_parallel_subgroups(world):
    world(8, 5)
    ps.initialize_model_parallel(context_parallel_size=4, ulysses_degree_in_cp=2)
    assert ps.get_context_parallel_world_size() == 4
    # cp is the fastest axis when tp == 1: ranks 4..7 form one context-parallel group
    assert ps.get_context_parallel_group().ranks == (4, 5, 6, 7)
    assert ps.get_context_parallel_group_for_hybrid_ulysses().ranks == (4, 5)
    assert ps.get_context_parallel_group_for_hybrid_ring().ranks == (5, 7)
    assert ps.get_data_parallel_group(with_context_parallel=True).size == 8


def test_expert_getters(world):
    world(8, 3)
    ps.initialize_model_parallel(tensor_model_parallel_size=2, expert_model_parallel_size=2)
    assert ps.get_expert_model_parallel_world_size() == 2
    assert ps.get_expert_model_parallel_group().ranks == (1, 3)
    assert ps.get_expert_model_parallel_rank() == 1
    assert ps.get_data_modulo_expert_parallel_group().ranks == (3, 7)
    assert ps.get_tensor_and_expert_parallel_group().ranks == (0, 1, 2, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_model_parallel_size=3), r"world_size \(8\) is not divisible"),
    (dict(tensor_model_parallel_size=2, expert_model_parallel_size=3), r"data_parallel_size \(4\) is not divisible by expert"),
    (dict(context_parallel_size=2, expert_model_parallel_size=2), "not supported"),
    (dict(virtual_pipeline_model_parallel_size=2), "at least 2"),
    (dict(order=None), "must not be None"),
    (dict(order="tp-tp-dp-pp"), "duplicate"),
    (dict(order="tp-ep-cp-dp-pp", expert_model_parallel_size=2), "adjacent"),
    (dict(order="tp-xx-dp-pp"), "unknown"),
    (dict(order="tp-dp", pipeline_model_parallel_size=2), "does not name 'pp'"),
    (dict(tensor_model_parallel_size=0), "positive integer"),
    (dict(context_parallel_size=4, ulysses_degree_in_cp=3), "not divisible by ulysses"),
])
def test_initialize_errors(world, kwargs, message):
    world(8, 0)
    with pytest.raises(RuntimeError, match=message):
        ps.initialize_model_parallel(**kwargs)


def test_initialize_twice_is_an_error(world):
    world(2, 0)
    ps.initialize_model_parallel()
    with pytest.raises(RuntimeError, match="already initialized"):
        ps.initialize_model_parallel()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    assert ps.get_tensor_model_parallel_world_size() == 2


def test_uninitialized_multi_rank_world_is_an_error(world):
    world(2, 0)
    with pytest.raises(RuntimeError, match="call initialize_model_parallel"):
        ps.get_tensor_model_parallel_world_size()


def test_single_process_needs_no_setup():
    ps.destroy_model_parallel()
    assert ps.get_tensor_model_parallel_world_size() == 1
    assert ps.get_data_parallel_rank() == 0
    assert ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    assert ps.get_context_parallel_world_size() == 1
    ps.initialize_model_parallel()
    assert ps.model_parallel_is_initialized()
    assert ps.get_expert_model_parallel_world_size() == 1
    ps.destroy_model_parallel()


def test_launched_without_init_is_an_error(monkeypatch):
    ps.destroy_model_parallel()
    monkeypatch.setattr(ps, "launched_by_msrun", lambda: True)
    monkeypatch.setattr(ps, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="_comm_helper is not initialized"):
        ps.initialize_model_parallel()
