"""Compiled execution (mindspore.jit) gives the PyNative results; when it is used; what falls back;
the fused optimizer update; the profiler and its operator table; the communication timer."""

import json
import logging

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor

import training_configs as T
from _logs import LogLines
from mindspeed_ms.training import compilation

ms.set_device("CPU")

ROPE = {"position_embedding_type": "rope", "normalization": "RMSNorm", "hidden_act": "swiglu",
        "group_query_attention": True, "num_query_groups": 2, "untie_embeddings_and_output_weights": True}


def _assert_compiled(lines, what):
    """The trainer's log says the model chunk compiled and no mode fell back to PyNative."""
    assert any("model chunk and optimizer compiled with mindspore.jit" in line for line in lines), (what, lines)
    assert not any("does not compile" in line for line in lines), (what, lines)


def _compiled_job(msrun, tmp_path, cases, nprocs, timeout=900):
    """Train ``cases`` ([name, config] pairs) in one msrun job with MINDSPEED_JIT=1; every rank's
    chunks must have compiled. Returns ``{rank: {name: {"loss", "grad_norm", "log"}}}``."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg in cases]))
    values = msrun("compiled_cases.py", nprocs=nprocs, args=[spec], timeout=timeout, env={compilation.JIT_ENV: "1"},
                   expected_cases=[name for name, _ in cases])
    for name, _ in cases:
        for rank in range(nprocs):
            _assert_compiled(values[rank][name]["log"], f"{name} rank {rank}")
    return values


def _runs(monkeypatch, tmp_path, name, steps=4, **sections):
    """The PyNative and the compiled run of one config; the compiled one must really compile."""
    out = {}
    logger = logging.getLogger("mindspeed_ms")
    for mode in ("0", "1"):
        monkeypatch.setenv(compilation.JIT_ENV, mode)
        sections.setdefault("training_config", {})["training_iters"] = steps
        lines = LogLines(logging.INFO)
        level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(lines)
        try:
            out[mode] = T.run(T.make(tmp_path / f"{name}_{mode}", **sections))
        finally:
            logger.removeHandler(lines)
            logger.setLevel(level)
        if mode == "1":
            _assert_compiled([line for line in lines.lines if "compil" in line], name)
    return out["0"], out["1"]


FP32_RTOL = (1e-6, 1e-5)  # (loss, grad norm)
# Emulated half precision: the compiled chunk's CPU kernel forms (core/fusions.py) round some float16
# intermediates differently from the PyNative kernels (the PyNative model with those forms gives the
# compiled loss exactly, measured), and four steps of bfloat16/float16 updates carry that on: a few
# units of the 6th digit, far below the formats' own rounding (2**-11, 2**-8).
HALF_RTOL = (2e-5, 1e-4)


@pytest.mark.parametrize("name,sections,rtol", [
    ("gpt", {}, FP32_RTOL),
    ("rope_rms_swiglu_gqa_untied_accumulation", {"model_config": ROPE,
                                                  "dataset_config": {"batch_size": 2, "micro_batch_num": 2}},
     FP32_RTOL),
    ("fp16_dynamic_loss_scale", {"training_config": {"fp16": True, "loss_scale_value": 1024, "loss_scale_factor": 2,
                                                     "loss_scale_window": 1000}}, HALF_RTOL),
    ("bf16", {"training_config": {"bf16": True}}, HALF_RTOL),
])
def test_compiled_training_matches_pynative(monkeypatch, tmp_path, name, sections, rtol):
    eager, compiled = _runs(monkeypatch, tmp_path, name, **sections)
    np.testing.assert_allclose([s["loss"] for s in compiled], [s["loss"] for s in eager], rtol=rtol[0])
    np.testing.assert_allclose([s["grad_norm"] for s in compiled], [s["grad_norm"] for s in eager], rtol=rtol[1])
    assert compiled[-1]["loss"] < compiled[0]["loss"]


def test_compiled_float16_overflows_and_skips_the_same_steps(monkeypatch, tmp_path):
    """Dynamic loss scaling from 2**32 overflows the emulated float16 gradients at first: the
    compiled chunk overflows, skips and halves the scale at exactly the PyNative steps (the
    rounding casts that make float16 overflow on CPU survive graph compilation)."""
    eager, compiled = _runs(monkeypatch, tmp_path, "fp16_overflow", steps=6, training_config={"fp16": True})
    assert [s["overflow"] for s in compiled] == [s["overflow"] for s in eager]
    assert [s["loss_scale_used"] for s in compiled] == [s["loss_scale_used"] for s in eager]
    assert any(s["overflow"] for s in eager)
    np.testing.assert_allclose([s["loss"] for s in compiled], [s["loss"] for s in eager], rtol=HALF_RTOL[0])


def test_compile_decision_and_switch(monkeypatch):
    monkeypatch.delenv(compilation.JIT_ENV, raising=False)
    monkeypatch.delenv(compilation.JIT_MIN_STEPS_ENV, raising=False)
    assert compilation.jit_setting() == "auto"
    assert compilation.compile_decision(6)[0] is False  # short runs: compiling costs more than it saves
    assert compilation.compile_decision(2000)[0] is True
    monkeypatch.setenv(compilation.JIT_MIN_STEPS_ENV, "3")
    assert compilation.compile_decision(6)[0] is True
    for value, expected in (("0", False), ("pynative", False), ("off", False), ("1", True), ("on", True)):
        monkeypatch.setenv(compilation.JIT_ENV, value)
        assert compilation.compile_decision(6)[0] is expected
    monkeypatch.setenv(compilation.JIT_ENV, "sometimes")
    with pytest.raises(ValueError, match="MINDSPEED_JIT"):
        compilation.compile_decision(6)


@pytest.mark.parametrize("sections,reason", [
    ({"model_config": {"hidden_dropout": 0.1}}, "dropout"),
    ({"model_config": {"recompute_granularity": "full", "recompute_method": "uniform",
                       "recompute_num_layers": 1}}, "recomputation"),
    ({"parallel_config": {"recompute_config": {"select_recompute": True}}}, "recomputation"),
    ({"model_config": {"params_dtype": "bfloat16"}}, "bfloat16 parameters on CPU"),
])
def test_features_that_cannot_compile_fall_back_and_say_so(monkeypatch, tmp_path, sections, reason):
    monkeypatch.setenv(compilation.JIT_ENV, "1")
    handler = LogLines()
    logger = logging.getLogger("mindspeed_ms")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        forced = T.run(T.make(tmp_path / "forced", training_config={"training_iters": 3}, **sections))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [line for line in handler.lines if "PyNative mode" in line]
    assert len(lines) == 1 and reason in lines[0], lines  # said once
    monkeypatch.setenv(compilation.JIT_ENV, "0")
    eager = T.run(T.make(tmp_path / "eager", training_config={"training_iters": 3}, **sections))
    assert [s["loss"] for s in forced] == [s["loss"] for s in eager]  # the same (PyNative) path


def test_fused_adamw_update_equals_the_per_parameter_kernel():
    from mindspeed_ms.core.optimizer import MegatronOptimizer

    rng = np.random.default_rng(0)
    shapes = [(8, 4), (4,), (3, 5, 2)]
    names = ["w.weight", "w.bias", "z.weight"]

    def make():
        params = [Parameter(Tensor(rng_init[i]), name=n) for i, n in enumerate(names)]
        return params, MegatronOptimizer(params, "AdamW", learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.99),
                                         clip=("norm", 0.5))

    rng_init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [{n: Tensor(rng.standard_normal(s).astype(np.float32) * 3) for n, s in zip(names, shapes)}
             for _ in range(3)]
    results = []
    for fused in (False, True):
        params, opt = make()
        if fused:
            assert opt.enable_compiled_update()
        norms = []
        for g in grads:
            clipped, norm = opt.clip_and_norm(dict(g))
            norms.append(norm)
            opt.step(clipped)
        results.append(([p.asnumpy() for p in params], norms,
                        [opt.state[f"exp_avg_sq.{n}"].asnumpy() for n in names]))
    (p0, n0, v0), (p1, n1, v1) = results
    assert n0 == n1
    for a, b in zip(p0 + v0, p1 + v1):
        np.testing.assert_array_equal(a, b)


def test_profiler_writes_operator_statistics(tmp_path):
    from mindspeed_ms.training.profiling import profile_runs, top_operators

    out = tmp_path / "prof"
    T.run(T.make(out, training_config={"training_iters": 3, "profile": True, "profile_step_start": 2,
                                       "profile_step_end": 3, "profile_memory": True}))
    runs = profile_runs(out / "profile")
    assert len(runs) == 1 and "rank_0" in runs[0]
    table = top_operators(out / "profile", n=5)
    assert list(table.columns) == ["op_type", "calls", "total_ms", "avg_ms", "percent", "device"]
    assert len(table) == 5 and "MatMul" in set(top_operators(out / "profile", n=50)["op_type"])
    assert (table["total_ms"].diff().dropna() <= 0).all()  # slowest first
    with pytest.raises(FileNotFoundError):
        top_operators(tmp_path / "nothing")


def test_profiler_options_map_to_the_device():
    from types import SimpleNamespace

    from mindspeed_ms.training.profiling import profiler_options

    tc = SimpleNamespace(profile_level="level1", profile_with_stack=True, profile_memory=True,
                         profile_communication=True, profile_aicore_metrics=1, profile_l2_cache=False,
                         profile_hbm_ddr=False, profile_pcie=False, profile_framework=None,
                         profile_parallel_strategy=False, profile_data_process=False,
                         profile_data_simplification=False, profile_dynamic_profiler_config_path="")
    kwargs, ignored = profiler_options(tc, "CPU")
    assert kwargs["with_stack"] is True and kwargs["profile_memory"] is False
    assert set(ignored) == {"profile_level", "profile_memory", "profile_communication", "profile_aicore_metrics"}
    kwargs, ignored = profiler_options(tc, "Ascend")
    assert kwargs["profile_memory"] is True and ignored == []


def test_communication_timer_records_collectives():
    from mindspeed_ms.core.communication import comm_timer_summary, enable_comm_timer, reset_comm_timer
    from mindspeed_ms.core.communication.groups import ProcessGroup
    from mindspeed_ms.core.communication.timing import timed

    reset_comm_timer()
    group = ProcessGroup((0, 1), "g", "dp")
    with timed("all_reduce", group, Tensor(np.ones(4, np.float32))):
        pass
    assert comm_timer_summary()["by_collective"] == {}  # off by default
    enable_comm_timer(True)
    try:
        for _ in range(2):
            with timed("all_reduce", group, Tensor(np.ones(4, np.float32))):
                pass
    finally:
        enable_comm_timer(False)
    summary = comm_timer_summary()
    entry = summary["by_collective"]["all_reduce/dp"]
    assert entry["calls"] == 2 and entry["bytes"] == 32 and summary["total_s"] >= 0
    json.dumps(summary)
    reset_comm_timer()
    assert comm_timer_summary()["by_collective"] == {}


@pytest.mark.multiprocess
def test_compiled_data_parallel_matches_one_process(msrun, tmp_path):
    """DDP buckets and the distributed optimizer with the model compiled, against PyNative in one process."""
    cases = [("dp2_ddp_buckets_jit", T.make(tmp_path / "dp2_ddp", training_config={"bucket_size": 4000})),
             ("dp2_distributed_optimizer_jit", T.make(tmp_path / "dp2_do",
                                                      training_config={"use_distributed_optimizer": True}))]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg in cases]))
    values = msrun("train_cases.py", nprocs=2, args=[spec], timeout=900, env={compilation.JIT_ENV: "1"},
                   expected_cases=[name for name, _ in cases])
    reference = [s["loss"] for s in T.run(T.make(tmp_path / "ref", dataset_config={"batch_size": 8}))]
    for name, _ in cases:
        for rank in range(2):
            np.testing.assert_allclose([s["loss"] for s in values[rank][name]], reference, rtol=2e-5,
                                       err_msg=f"{name} rank {rank}")


@pytest.mark.multiprocess
def test_compiled_tensor_parallel_matches_one_process(msrun, tmp_path):
    """Tensor parallelism, with and without sequence parallelism, with the model chunk compiled
    (the region mappings as graph collectives): the losses and gradient norms of the
    single-process PyNative run, and the trainer says the chunk compiled (no fallback)."""
    tp2 = {"tensor_model_parallel_size": 2}
    cases = [("tp2_jit", T.make(tmp_path / "tp2", dataset_config={"batch_size": 8}, parallel_config=tp2)),
             ("tp2_sp_jit", T.make(tmp_path / "tp2sp", dataset_config={"batch_size": 8},
                                   parallel_config={**tp2, "sequence_parallel": True}))]
    values = _compiled_job(msrun, tmp_path, cases, 2)
    reference = T.run(T.make(tmp_path / "ref", dataset_config={"batch_size": 8}))
    for name, _ in cases:
        for rank in range(2):
            got = values[rank][name]
            np.testing.assert_allclose(got["loss"], [s["loss"] for s in reference], rtol=2e-5,
                                       err_msg=f"{name} rank {rank}")
            np.testing.assert_allclose(got["grad_norm"], [s["grad_norm"] for s in reference], rtol=1e-4,
                                       err_msg=f"{name} rank {rank}")


@pytest.mark.multiprocess
def test_compiled_pipeline_stages_match_one_process(msrun, tmp_path):
    """Pipelining with every stage's chunk compiled (its input hidden states a graph argument):
    1F1B and interleaved 1F1B (two virtual chunks per stage), against the single-process PyNative
    run of the same model and micro-batches."""
    micro = {"batch_size": 2, "micro_batch_num": 4}
    cases = [("pp2_jit", T.make(tmp_path / "pp2", dataset_config=micro,
                                parallel_config={"pipeline_model_parallel_size": 2})),
             ("pp2_vpp2_jit", T.make(tmp_path / "pp2vpp2", dataset_config=micro, model_config={"num_layers": 4},
                                     parallel_config={"pipeline_model_parallel_size": 2,
                                                      "virtual_pipeline_model_parallel_size": 2}))]
    values = _compiled_job(msrun, tmp_path, cases, 2)
    references = {"pp2_jit": T.run(T.make(tmp_path / "ref", dataset_config=micro)),
                  "pp2_vpp2_jit": T.run(T.make(tmp_path / "ref4", dataset_config=micro, model_config={"num_layers": 4}))}
    for name, _ in cases:
        # the losses are the last stage's (the first stage reports what the schedule returns there)
        np.testing.assert_allclose(values[1][name]["loss"], [s["loss"] for s in references[name]], rtol=2e-5,
                                   err_msg=name)
        np.testing.assert_allclose(values[1][name]["grad_norm"], [s["grad_norm"] for s in references[name]],
                                   rtol=1e-4, err_msg=name)


@pytest.mark.multiprocess
def test_compiled_pipeline_with_tensor_and_sequence_parallelism_on_four_processes(msrun, tmp_path):
    """pp2 x tp2 with sequence parallelism and two virtual chunks per stage, every chunk compiled,
    against the single-process PyNative run."""
    micro = {"batch_size": 2, "micro_batch_num": 4}
    layers = {"num_layers": 4}
    cases = [("pp2_tp2_sp_vpp2_jit", T.make(tmp_path / "pp2tp2", dataset_config=micro, model_config=layers,
                                            parallel_config={"pipeline_model_parallel_size": 2,
                                                             "virtual_pipeline_model_parallel_size": 2,
                                                             "tensor_model_parallel_size": 2,
                                                             "sequence_parallel": True}))]
    values = _compiled_job(msrun, tmp_path, cases, 4, timeout=1200)
    reference = T.run(T.make(tmp_path / "ref", dataset_config=micro, model_config=layers))
    name = cases[0][0]
    # ranks 2 and 3 are the last pipeline stage (the tensor-parallel pair of pipeline rank 1)
    for rank in (2, 3):
        np.testing.assert_allclose(values[rank][name]["loss"], [s["loss"] for s in reference], rtol=2e-5,
                                   err_msg=f"rank {rank}")
        np.testing.assert_allclose(values[rank][name]["grad_norm"], [s["grad_norm"] for s in reference],
                                   rtol=1e-4, err_msg=f"rank {rank}")


# measured: 3e-5 (tp2 and pp2, six steps); bfloat16's own rounding step is 2**-8 = 4e-3
BF16_PARALLEL_RTOL = 2e-4


@pytest.mark.multiprocess
def test_compiled_bfloat16_under_tensor_and_pipeline_parallelism_matches_one_process(msrun, tmp_path):
    """Emulated bfloat16 compute (values rounded to bfloat16, carried in float32 on CPU) with the
    chunks compiled, under tp2 and pp2, against the single-process PyNative bfloat16 run. The
    tolerance is bfloat16's: tensor parallelism sums partial products in another order and
    rounds them to bfloat16 (8 significant bits) at other points than one process does."""
    bf16 = {"bf16": True}
    micro = {"batch_size": 2, "micro_batch_num": 4}
    cases = [("tp2_bf16_jit", T.make(tmp_path / "tp2", training_config=bf16, dataset_config=micro,
                                     parallel_config={"tensor_model_parallel_size": 2})),
             ("pp2_bf16_jit", T.make(tmp_path / "pp2", training_config=bf16, dataset_config=micro,
                                     parallel_config={"pipeline_model_parallel_size": 2}))]
    values = _compiled_job(msrun, tmp_path, cases, 2)
    reference = [s["loss"] for s in T.run(T.make(tmp_path / "ref", training_config=bf16, dataset_config=micro))]
    for name, _ in cases:
        last = 1  # tp2: both ranks hold the loss; pp2: the last stage
        np.testing.assert_allclose(values[last][name]["loss"], reference, rtol=BF16_PARALLEL_RTOL, err_msg=name)
