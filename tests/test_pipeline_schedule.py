"""The pipeline schedules as data (no processes): orders against the textbook 1F1B and interleaved
orders, the tick plan's transfers, deadlock freedom under blocking pairwise exchanges, and the
errors for impossible layouts."""

import itertools

import pytest

from mindspeed_ms.core.pipeline_parallel.schedule_plan import (
    ScheduleError,
    Transfer,
    build_plan,
    check_order,
    interleaved_order,
    one_f_one_b_order,
    render_orders,
    render_timeline,
    schedule_order,
    simulate_blocking_exchanges,
)


def parse(text, chunked=False):
    """``"F0 F1 B0"`` -> steps; with chunk letters ``"F0a F0b B0b"``."""
    steps = []
    for token in text.split():
        kind, rest = token[0], token[1:]
        chunk = 0
        if chunked:
            chunk = "abcdefgh".index(rest[-1])
            rest = rest[:-1]
        steps.append((kind, int(rest), chunk))
    return steps


# PipeDream-Flush / Megatron 1F1B, 4 stages, 8 micro-batches (Narayanan et al. 2021, figure 4 top,
# 0-based): stage r warms up with 3 - r forwards, then alternates, then drains.
TEXTBOOK_1F1B_4x8 = [
    "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
    "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
    "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
    "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
]

# Interleaved 1F1B, 4 stages, 2 chunks per stage, 8 micro-batches (figure 4 bottom): micro-batches
# enter the chunks in groups of 4 (chunk a = first half of the model, b = second half); stage r
# warms up with 2 * (3 - r) + 4 forwards; backwards walk the chunks in reverse.
TEXTBOOK_INTERLEAVED_4x2x8 = [
    "F0a F1a F2a F3a F0b F1b F2b F3b F4a F5a "
    "F6a B0b F7a B1b F4b B2b F5b B3b F6b B0a F7b B1a "
    "B2a B3a B4b B5b B6b B7b B4a B5a B6a B7a",
    "F0a F1a F2a F3a F0b F1b F2b F3b "
    "F4a B0b F5a B1b F6a B2b F7a B3b F4b B0a F5b B1a F6b B2a F7b B3a "
    "B4b B5b B6b B7b B4a B5a B6a B7a",
    "F0a F1a F2a F3a F0b F1b "
    "F2b B0b F3b B1b F4a B2b F5a B3b F6a B0a F7a B1a F4b B2a F5b B3a F6b B4b F7b B5b "
    "B6b B7b B4a B5a B6a B7a",
    "F0a F1a F2a F3a "
    "F0b B0b F1b B1b F2b B2b F3b B3b F4a B0a F5a B1a F6a B2a F7a B3a F4b B4b F5b B5b F6b B6b F7b B7b "
    "B4a B5a B6a B7a",
]


@pytest.mark.parametrize("rank", range(4))
def test_1f1b_matches_the_textbook_order(rank):
    assert one_f_one_b_order(8, 4, rank) == parse(TEXTBOOK_1F1B_4x8[rank])


@pytest.mark.parametrize("rank", range(4))
def test_interleaved_matches_the_textbook_order(rank):
    assert interleaved_order(8, 4, rank, 2) == parse(TEXTBOOK_INTERLEAVED_4x2x8[rank], chunked=True)


def test_1f1b_with_fewer_microbatches_than_stages():
    # the warm-up is cut to the micro-batches there are: all forwards, then all backwards
    assert one_f_one_b_order(2, 4, 0) == parse("F0 F1 B0 B1")
    assert one_f_one_b_order(2, 4, 3) == parse("F0 B0 F1 B1")


def test_interleaved_with_one_group_runs_all_forwards_first():
    assert interleaved_order(2, 2, 1, 2) == parse("F0a F1a F0b F1b B0b B1b B0a B1a", chunked=True)


def test_forward_only_orders():
    assert one_f_one_b_order(3, 2, 1, forward_only=True) == parse("F0 F1 F2")
    assert interleaved_order(4, 2, 0, 2, forward_only=True) == parse("F0a F1a F0b F1b F2a F3a F2b F3b",
                                                                      chunked=True)


def test_schedule_order_dispatches():
    assert schedule_order(8, 4, 1) == one_f_one_b_order(8, 4, 1)
    assert schedule_order(8, 4, 1, num_chunks=2) == interleaved_order(8, 4, 1, 2)


@pytest.mark.parametrize("pp,m,v", [(p, m, v) for p in (2, 3, 4, 5) for m in (1, 2, 3, 4, 5, 8, 12)
                                    for v in (None, 1, 2, 3) if v is None or m % p == 0])
def test_every_order_is_complete_and_bounded(pp, m, v):
    chunks = v or 1
    for rank in range(pp):
        order = schedule_order(m, pp, rank, v)
        check_order(order, m, chunks)
        # micro-batches holding activations at once: at most the warm-up plus one
        in_flight, peak = 0, 0
        for kind, _, _ in order:
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        if v is None:
            assert peak == min(pp - rank, m)
        else:
            warmup = m * chunks if m == pp else min((pp - rank - 1) * 2 + (chunks - 1) * pp, m * chunks)
            assert peak == min(warmup + 1, m * chunks)


@pytest.mark.parametrize("pp,m,v,forward_only", [
    (p, m, v, fo) for p in (2, 3, 4, 6) for m in (1, 2, 3, 4, 6, 8, 12) for v in (None, 2, 3)
    for fo in (False, True) if v is None or m % p == 0])
def test_plans_run_with_blocking_pairwise_exchanges(pp, m, v, forward_only):
    plan = build_plan(m, pp, v, forward_only)
    exchanges = simulate_blocking_exchanges(plan)
    stages = pp * (v or 1)
    transfers = m * (stages - 1) * (1 if forward_only else 2)
    sent = [t for ticks in plan for tick in ticks for t in tick.sends]
    received = [t for ticks in plan for tick in ticks for t in tick.recvs]
    assert len(sent) == len(set(sent)) == transfers
    assert sorted(sent, key=repr) == sorted(received, key=repr)
    assert transfers <= exchanges * 2  # one exchange carries at most one tensor each way
    for rank, ticks in enumerate(plan):
        # the plan keeps the rank's order, and each tick sends at most one tensor: its step's output
        assert [t.step for t in ticks if t.step is not None] == schedule_order(m, pp, rank, v, forward_only)
        for tick in ticks:
            assert len(tick.sends) <= 1
            for t in tick.sends:
                assert t.src == rank and t.producer == tick.step
        # every tensor arrives before the step that uses it
        arrived = {}
        for tick in ticks:
            if tick.step is not None:
                for t, when in arrived.items():
                    if t.consumer == tick.step:
                        assert when < tick.index
            for t in tick.recvs:
                arrived[t] = tick.index


def test_plan_transfers_follow_virtual_stages():
    plan = build_plan(2, 2, 2)
    sends = {t for ticks in plan for tick in ticks for t in tick.sends}
    # chunk 0 of rank 1 feeds chunk 1 of rank 0 (wrap-around), and the gradient goes back the same way
    assert Transfer("activation", 0, 1, 0, 0, 1) in sends
    assert Transfer("gradient", 0, 0, 1, 1, 0) in sends
    # nothing leaves the first virtual stage backwards or the last one forwards
    assert not any(t.kind == "gradient" and t.src == 0 and t.src_chunk == 0 for t in sends)
    assert not any(t.kind == "activation" and t.src == 1 and t.src_chunk == 1 for t in sends)


def test_two_stage_ticks_pair_both_directions_in_one_exchange():
    # with two stages, a rank sends an activation while receiving a gradient from the same peer
    plan = build_plan(4, 2)
    both = [tick for tick in plan[0] if tick.sends and tick.recvs]
    assert both and all(tick.sends[0].dst == tick.recvs[0].src == 1 for tick in both)


def test_a_broken_order_is_refused_by_the_planner():
    orders = [one_f_one_b_order(2, 2, 0), one_f_one_b_order(2, 2, 1)]
    orders[0] = parse("F0 B0 F1 B1")  # stage 0 waits for the gradient of micro-batch 0 before F1 ...
    orders[1] = parse("F0 F1 B0 B1")  # ... which stage 1 sends only after F1, which needs F1 of stage 0
    with pytest.raises(ScheduleError, match="cannot run"):
        build_plan(2, 2, orders=orders)


def test_the_simulator_detects_deadlock_and_mismatch():
    plan = build_plan(2, 2)
    # swap two exchanges of rank 0: it now waits for a tensor its peer sends later
    ticks = plan[0]
    first, second = [i for i, t in enumerate(ticks) if t.sends or t.recvs][:2]
    ticks[first].sends, ticks[second].sends = ticks[second].sends, ticks[first].sends
    with pytest.raises(ScheduleError, match="disagree|deadlock"):
        simulate_blocking_exchanges(plan)
    # a rank that exchanges with a peer which never comes
    plan = build_plan(2, 2)
    plan[1] = []
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate_blocking_exchanges(plan)


@pytest.mark.parametrize("bad", [
    parse("F0 B0 B0 F1 B1"), parse("B0 F0 F1 B1"), parse("F0 F1 B0"), parse("F0 F0 B0 B1")])
def test_check_order_rejects(bad):
    with pytest.raises(ScheduleError):
        check_order(bad, 2)


def test_errors_name_the_fields():
    with pytest.raises(ScheduleError, match=r"micro_batch_num\) to be a multiple of pipeline_model_parallel_size=4"):
        interleaved_order(6, 4, 0, 2)
    with pytest.raises(ScheduleError, match="num_microbatches must be a positive integer"):
        one_f_one_b_order(0, 2, 0)
    with pytest.raises(ScheduleError, match="virtual_pipeline_model_parallel_size"):
        build_plan(4, 2, 0)
    with pytest.raises(ScheduleError, match="pipeline rank 2 is outside 0..1"):
        one_f_one_b_order(4, 2, 2)


def test_rendering():
    table = render_timeline(build_plan(4, 2))
    lines = table.splitlines()
    assert lines[0].split()[0] == "tick" and lines[1].startswith("rank 0") and len(lines) == 3
    assert lines[1].split()[2:4] == ["F0", "F1"] and lines[2].split()[2:4] == [".", "F0"]
    chunked = render_timeline(build_plan(4, 2, 2), chunked=True)
    assert "F0a" in chunked and "B3b" in chunked
    assert render_orders(4, 2).splitlines()[1] == "rank 1: F0 B0 F1 B1 F2 B2 F3 B3"


def test_docs_picture_is_the_scheduler_output():
    """docs/pipeline.md shows the tables the scheduler draws (python -m mindspeed_ms.tools.pipeline_schedule)."""
    from pathlib import Path

    from mindspeed_ms.tools.pipeline_schedule import pictures

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pipeline.md").read_text(encoding="utf-8")
    for name, block in pictures().items():
        assert f"<!-- schedule:{name} -->\n{block}\n<!-- /schedule:{name} -->" in doc, \
            "docs/pipeline.md is out of date: run " \
            "python -m mindspeed_ms.tools.pipeline_schedule --write docs/pipeline.md"


def test_the_order_is_deterministic_and_pure():
    # the same arguments give the same plan on every rank (each rank computes the whole plan)
    for pp, v in itertools.product((2, 4), (None, 2)):
        a = build_plan(8, pp, v)
        b = build_plan(8, pp, v)
        assert [[(t.index, t.step, t.sends, t.recvs) for t in r] for r in a] == \
               [[(t.index, t.step, t.sends, t.recvs) for t in r] for r in b]


# ------------------------------------------------------------------------------------------------
# the layer split and the configuration errors (single process, parallel_state overrides)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def pipeline_layout():
    """Pretend to be pipeline rank ``r`` of ``pp`` (virtual size ``vpp``, chunk ``v``) in one process."""
    from mindspeed_ms.core import parallel_state as ps

    saved_vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    saved_rank = ps.get_virtual_pipeline_model_parallel_rank()

    def set_layout(pp, rank, vpp=None, chunk=None):
        ps.set_pipeline_model_parallel_world_size(pp)
        ps.set_pipeline_model_parallel_rank(rank)
        ps.set_virtual_pipeline_model_parallel_world_size(vpp)
        ps.set_virtual_pipeline_model_parallel_rank(chunk)

    yield set_layout
    ps.set_pipeline_model_parallel_world_size(None)
    ps.set_pipeline_model_parallel_rank(None)
    ps.set_virtual_pipeline_model_parallel_world_size(saved_vpp)
    ps.set_virtual_pipeline_model_parallel_rank(saved_rank)


def model_config(layers, **parallel):
    import training_configs as T
    from mindspeed_ms.core.config import init_configs_from_dict

    return init_configs_from_dict(T.make("/tmp/unused", model_config={"num_layers": layers},
                                         parallel_config=parallel)).model_config


def split_of(config, pp, vpp, set_layout):
    from mindspeed_ms.legacy.model.transformer import get_num_layers_and_offset

    out = {}
    for chunk in range(vpp or 1):
        for rank in range(pp):
            set_layout(pp, rank, vpp, chunk if vpp else None)
            count, offset, _ = get_num_layers_and_offset(config)
            out[(chunk, rank)] = list(range(offset, offset + count))
    return out


def test_layer_split_even_interleaved(pipeline_layout):
    config = model_config(8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    assert split_of(config, 2, 2, pipeline_layout) == {
        (0, 0): [0, 1], (0, 1): [2, 3], (1, 0): [4, 5], (1, 1): [6, 7]}


def test_layer_list_rows_are_virtual_chunks(pipeline_layout):
    # MindSpeed-Core-MS's (vpp, pp) layout: row = chunk, column = stage
    config = model_config(5, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                          num_layer_list=[[1, 2], [1, 1]])
    assert split_of(config, 2, 2, pipeline_layout) == {
        (0, 0): [0], (0, 1): [1, 2], (1, 0): [3], (1, 1): [4]}
    flat = model_config(4, pipeline_model_parallel_size=2, num_layer_list=[1, 3])
    assert split_of(flat, 2, None, pipeline_layout) == {(0, 0): [0], (0, 1): [1, 2, 3]}


def test_standalone_embedding_stage_and_noop_layers(pipeline_layout):
    from mindspeed_ms.core.config import layers_per_pipeline_stage

    config = model_config(4, pipeline_model_parallel_size=3, standalone_embedding_stage=True, noop_layers=[0, 3])
    assert split_of(config, 3, None, pipeline_layout) == {(0, 0): [], (0, 1): [0, 1], (0, 2): [2, 3]}
    assert layers_per_pipeline_stage(config) == [0, 2, 2]
    from mindspeed_ms.legacy.model.transformer import NoopTransformerLayer, ParallelTransformer
    from mindspeed_ms.legacy.model.enums import ModelType

    pipeline_layout(3, 2)
    stack = ParallelTransformer(config, ModelType.encoder_or_decoder)
    kinds = [(layer.layer_number, isinstance(layer, NoopTransformerLayer)) for layer in stack.iter_layers()]
    assert kinds == [(3, False), (4, True)]  # noop_layers are 0-based: index 3 is layer number 4


def test_split_errors_name_the_fields(pipeline_layout):
    from mindspeed_ms.legacy.model.transformer import get_num_layers_and_offset

    pipeline_layout(2, 0)
    with pytest.raises(ValueError, match=r"num_layers \(3\) is not divisible .*pipeline_model_parallel_size=2.*"
                                         r"num_layer_list"):
        get_num_layers_and_offset(model_config(3, pipeline_model_parallel_size=2))
    bad_sum = model_config(4, pipeline_model_parallel_size=2, num_layer_list=[1, 2])
    bad_sum.num_layers = 5  # past the config check, as a model built directly could be
    with pytest.raises(ValueError, match=r"num_layer_list=\[1, 2\] sums to 3 layers, but model_config.num_layers is 5"):
        get_num_layers_and_offset(bad_sum)
    pipeline_layout(2, 0, 2, 0)
    with pytest.raises(ValueError, match=r"must have 2 row\(s\) \(one per virtual chunk"):
        get_num_layers_and_offset(model_config(4, pipeline_model_parallel_size=2, num_layer_list=[2, 2]))


@pytest.mark.parametrize("sections,world,message", [
    (dict(model_config={"num_layers": 3}, parallel_config={"pipeline_model_parallel_size": 2}), 2,
     r"num_layers=3 must be divisible by the 2 pipeline stages .*pipeline_model_parallel_size=2"),
    (dict(model_config={"num_layers": 4}, parallel_config={"pipeline_model_parallel_size": 2,
                                                           "num_layer_list": [1, 2]}), 2,
     "num_layer_list sums to 3 layers but num_layers is 4"),
    (dict(model_config={"num_layers": 4}, parallel_config={"pipeline_model_parallel_size": 2,
                                                           "virtual_pipeline_model_parallel_size": 2},
          dataset_config={"micro_batch_num": 3}), 2,
     r"micro_batch_num \(3\) to be a multiple of pipeline_model_parallel_size=2"),
])
def test_configuration_errors(sections, world, message):
    import training_configs as T
    from mindspeed_ms.core.config import init_configs_from_dict, validate_for_world_size

    with pytest.raises(ValueError, match=message):
        validate_for_world_size(init_configs_from_dict(T.make("/tmp/unused", **sections)), world)


@pytest.mark.parametrize("parallel,message", [
    ({"virtual_pipeline_model_parallel_size": 2}, "virtual_pipeline_model_parallel_size"),
    ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
      "num_layer_list": [[1, 1, 1], [1, 1, 1]]}, r"one row per virtual chunk \(2\), each with one count per "
                                                  r"pipeline stage \(2\)"),
    ({"pipeline_model_parallel_size": 3, "num_layer_list": [[1, 1], [1, 1]]}, r"one count per pipeline stage \(3\)"),
])
def test_parallel_config_errors(parallel, message):
    from mindspeed_ms.core.config import ModelParallelConfig

    with pytest.raises(ValueError, match=message):
        ModelParallelConfig(**parallel)


def test_vpp_needs_two_stages_at_initialisation():
    from mindspeed_ms.core import parallel_state as ps

    ps.destroy_model_parallel()
    with pytest.raises(RuntimeError, match=r"virtual_pipeline_model_parallel_size is set \(2\) but "
                                           r"pipeline_model_parallel_size is 1"):
        ps.initialize_model_parallel(virtual_pipeline_model_parallel_size=2)
    ps.destroy_model_parallel()


def test_interleaved_schedule_checks_its_arguments(pipeline_layout):
    from mindspeed_ms.core.pipeline_parallel import forward_backward_pipelining_with_interleaving

    pipeline_layout(2, 0, 2, 0)
    kwargs = dict(forward_step_func=None, data_iterator=iter([]), num_microbatches=4)
    with pytest.raises(ValueError, match=r"virtual_pipeline_model_parallel_size=2, got 3 chunk\(s\)"):
        forward_backward_pipelining_with_interleaving(model=[object()] * 3, **kwargs)
    with pytest.raises(ValueError, match=r"to be a multiple of pipeline_model_parallel_size=2, got 3"):
        forward_backward_pipelining_with_interleaving(model=[object()] * 2, **dict(kwargs, num_microbatches=3))


def test_guide_accelerate_config_pipeline_section():
    """The guide's accelerate_config.parallelization.pipeline maps onto parallel/dataset config."""
    import warnings

    import training_configs as T
    from mindspeed_ms.core.config import init_configs_from_dict, layers_per_pipeline_stage

    data = T.make("/tmp/unused", model_config={"num_layers": 62})
    data["dataset_config"].pop("batch_size")
    data["accelerate_config"] = {
        "parallelization": {"tensor_parallel": 1, "pipeline": {
            "num_stages": 4, "layer_list": "[[4,4,4,4],[4,4,4,4],[4,4,4,4],[4,4,4,2]]", "micro_batch_size": 1,
            "noop_layers": None, "num_layers_per_vpp": None, "virtual_pipeline_model_parallel_size": 4}},
        "precision": {"compute_dtype": "bfloat16"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = init_configs_from_dict(data)
    # accelerate_config.precision is read too (tests/test_config_guide_yaml.py has the rest)
    assert [str(w.message) for w in caught] == []
    assert config.model_config.compute_dtype == "bfloat16"
    parallel = config.parallel_config
    assert (parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size) == (4, 4)
    assert parallel.noop_layers is None and config.dataset_config.batch_size == 1
    # the guide's comment: this layer list gives the stages [16, 16, 16, 14] layers
    assert layers_per_pipeline_stage(config.model_config) == [16, 16, 16, 14]
    # the same setting given twice must agree
    data["parallel_config"]["pipeline_model_parallel_size"] = 2
    with pytest.raises(ValueError, match="pipeline_model_parallel_size is given twice with different values"):
        init_configs_from_dict(data)


def test_get_forward_backward_func_follows_parallel_state(pipeline_layout):
    from mindspeed_ms.core import pipeline_parallel as pp_mod

    pipeline_layout(1, 0)
    assert pp_mod.get_forward_backward_func() is pp_mod.forward_backward_no_pipelining
    pipeline_layout(2, 1)
    assert pp_mod.get_forward_backward_func() is pp_mod.forward_backward_pipelining_without_interleaving
    pipeline_layout(2, 1, 2, 0)
    assert pp_mod.get_forward_backward_func() is pp_mod.forward_backward_pipelining_with_interleaving


def test_transfer_shape_and_dtype_come_from_the_config():
    import mindspore as ms

    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.pipeline_parallel.p2p_communication import get_tensor_shape, pipeline_dtype

    def config(layout="BSH", **parallel):
        import training_configs as T
        from mindspeed_ms.core.config import init_configs_from_dict

        return init_configs_from_dict(T.make("/tmp/unused", parallel_config=parallel,
                                             dataset_config={"batch_size": 3, "data_layout": layout})).model_config

    assert get_tensor_shape(config()) == (3, 32, 64)
    assert get_tensor_shape(config("SBH")) == (32, 3, 64)
    assert get_tensor_shape(config(), seq_length=16, micro_batch_size=1) == (1, 16, 64)
    assert pipeline_dtype(config()) == ms.float32
    assert pipeline_dtype(config(recv_dtype="float16")) == ms.float16
    ps.set_tensor_model_parallel_world_size(2)
    try:
        # with sequence parallelism each tensor-parallel rank sends its slice of the sequence
        assert get_tensor_shape(config(sequence_parallel=True, tensor_model_parallel_size=2)) == (3, 16, 64)
        assert get_tensor_shape(config(tensor_model_parallel_size=2)) == (3, 32, 64)
    finally:
        ps.set_tensor_model_parallel_world_size(None)
