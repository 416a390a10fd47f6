"""Config contradictions and layout rules (issue 16, items 3 and 4).

One owner of the layout rules (``mindspeed_ms.core.config.layout_rules``): the config's
``validate_for_world_size`` (trainer, builder, CLI), the model's context-parallel check and the
lab's tuner all use it. Here a few hundred layouts for 1-8 workers get the same verdict from the
tuner and from the config; a sample of accepted ones trains under msrun (the losses of the
single-process run), refused ones are refused before anything starts.
"""
import itertools

import numpy as np
import pytest

from mindspeed_ms.core.config import TransformerConfig, init_configs_from_dict, validate_for_world_size
from mindspeed_ms.core.config.fields import ConfigValueError
from mindspeed_lab.tuner import Layout, enumerate_layouts, layout_config, layout_errors, model_spec_from_config


def _tiny(normalization):
    return TransformerConfig(vocab_size=32, num_layers=1, num_attention_heads=2, hidden_size=8,
                             ffn_hidden_size=16, normalization=normalization)


def test_fused_rmsnorm_is_accepted_and_builds_the_rmsnorm_layer():
    import mindspore as ms
    from mindspeed_ms.legacy.model.norm import get_norm, RMSNorm
    fused, plain = _tiny("FusedRMSNorm"), _tiny("RMSNorm")
    a, b = get_norm(fused), get_norm(plain)
    assert isinstance(a, RMSNorm)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32))
    np.testing.assert_allclose(a(x).asnumpy(), b(x).asnumpy(), rtol=1e-6)
    # RMS normalisation: each output row has unit root-mean-square (weights start at one).
    rms = np.sqrt((a(x).asnumpy() ** 2).mean(-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


def test_unknown_normalization_is_still_refused_naming_the_field():
    with pytest.raises(ConfigValueError, match="normalization"):
        _tiny("GroupNorm")


# ---- one verdict for the tuner and the config ----------------------------------------------------

def _sections(model, parallel=None, moe=None, optimizer=None, dataset=None):
    return {"model_config": {"vocab_size": 64, "num_layers": 4, "num_attention_heads": 4, "hidden_size": 32,
                             "ffn_hidden_size": 64, "seq_length": 16, **model},
            "dataset_config": {"dataset_type": "synthetic", "batch_size": 1, "micro_batch_num": 2,
                               **(dataset or {})},
            "parallel_config": dict(parallel or {}), "moe_config": dict(moe or {}),
            "optimizer_config": {"optimizer_type": "AdamW", **(optimizer or {})}}


# Models whose sizes make different rules bite: odd sequence lengths for context parallelism, an
# unpadded vocabulary and 3 key/value groups for tensor parallelism, 3 layers for pipelining, MoE
# (expert parallelism, MoE x TP x SP), SGD (distributed optimizer), the three cp algorithms.
MODELS = {
    "dense_ulysses": _sections({}),
    "moe_seq24": _sections({"seq_length": 24}, moe={"num_experts": 4, "moe_router_topk": 2},
                           dataset={"micro_batch_num": 4}),
    "gqa_ring_sgd": _sections({"num_layers": 3, "num_attention_heads": 6, "hidden_size": 48, "vocab_size": 66,
                               "group_query_attention": True, "num_query_groups": 3, "seq_length": 12},
                              parallel={"context_parallel_algo": "megatron_cp_algo"},
                              optimizer={"optimizer_type": "SGD"}, dataset={"micro_batch_num": 3}),
    "hybrid": _sections({"num_attention_heads": 8, "hidden_size": 64, "seq_length": 32},
                        parallel={"context_parallel_algo": "hybrid_cp_algo", "ulysses_degree_in_cp": 2,
                                  "context_parallel_size": 2}),
}


def _divisors(n):
    return [i for i in range(1, n + 1) if n % i == 0]


def candidate_layouts(workers):
    """Every tp*pp*cp*dp split of ``workers`` with ep, vpp in {1, 2}, with and without sequence
    parallelism and the distributed optimizer (valid or not)."""
    for t in _divisors(workers):
        for p in _divisors(workers // t):
            for c in _divisors(workers // (t * p)):
                d = workers // (t * p * c)
                for e, v, sp, do in itertools.product((1, 2), (1, 2), (False, True), (False, True)):
                    yield Layout(tp=t, pp=p, dp=d, cp=c, ep=e, vpp=v, sequence_parallel=sp, distributed_optimizer=do)


def config_verdict(base, layout, workers):
    """The config's verdict: '' when validate_for_world_size accepts the layout, else its message."""
    try:
        validate_for_world_size(layout_config(base, layout), workers)
    except ValueError as exc:  # includes ConfigValueError from the parallel config itself
        return str(exc) or "refused"
    return ""


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tuner_and_config_give_every_layout_the_same_verdict(name):
    base = init_configs_from_dict(MODELS[name])
    spec = model_spec_from_config(base)
    checked = accepted = 0
    for workers in range(1, 9):
        accepted_here = set()
        for layout in candidate_layouts(workers):
            tuner = layout_errors(spec, workers, layout)
            config = config_verdict(base, layout, workers)
            assert bool(tuner) == bool(config), (f"{name} on {workers} workers, {layout.name}: tuner says "
                                                 f"{tuner or 'valid'}, config says {config or 'valid'}")
            checked += 1
            if not config:
                accepted += 1
                accepted_here.add(layout)
        # the tuner's enumeration lists exactly the accepted layouts (without the repeats it skips:
        # sequence parallelism without tp, the distributed optimizer without a data-parallel group)
        listed = {lay for lay in enumerate_layouts(spec, workers, recompute=("none",), max_vpp=2) if lay.ep <= 2}
        expected = {lay for lay in accepted_here if not (lay.sequence_parallel and lay.tp == 1)
                    and not (lay.distributed_optimizer and lay.dp * lay.cp == 1)}
        assert listed == expected, (name, workers, sorted(x.name for x in listed ^ expected))
    assert checked >= 200 and 0 < accepted < checked, (checked, accepted)


def test_rules_that_used_to_disagree_now_have_one_answer():
    # seq % (2 cp), not seq % cp: 18 tokens split into 2 * 2 chunks does not go
    base = init_configs_from_dict(_sections({"seq_length": 18}))
    spec = model_spec_from_config(base)
    layout = Layout(cp=2)
    assert "2 * context_parallel_size" in config_verdict(base, layout, 2)
    assert any("2 * context_parallel_size" in e for e in layout_errors(spec, 2, layout))
    # ep x cp, MoE x TP without SP, distributed optimizer with SGD: refused by both, naming the fields
    moe = init_configs_from_dict(MODELS["moe_seq24"])
    for layout, workers, text in ((Layout(cp=2, dp=2, ep=2), 4, "expert_model_parallel_size (2) > 1 together with"),
                                  (Layout(tp=2), 2, "sequence_parallel=True"),):
        assert text in config_verdict(moe, layout, workers)
        assert any(text in e for e in layout_errors(model_spec_from_config(moe), workers, layout))
    sgd = init_configs_from_dict(MODELS["gqa_ring_sgd"])
    assert "optimizer_type='SGD'" in config_verdict(sgd, Layout(dp=2, distributed_optimizer=True), 2)


def test_context_parallel_check_of_the_model_is_the_same_rule():
    from mindspeed_ms.core.context_parallel import check_context_parallel_config
    config = init_configs_from_dict(_sections({"seq_length": 18}, parallel={"context_parallel_size": 2}))
    with pytest.raises(ValueError) as runtime:
        check_context_parallel_config(config.model_config)
    with pytest.raises(ValueError) as before_launch:
        validate_for_world_size(config, 2)
    assert str(runtime.value) in str(before_launch.value)


# ---- refused before launch, accepted ones train under msrun -------------------------------------

REFUSED = [  # (sections, workers, text naming the rule)
    (_sections({"seq_length": 24}, parallel={"context_parallel_size": 2, "expert_model_parallel_size": 2},
               moe={"num_experts": 4}), 4, "together with context_parallel_size"),
    (_sections({"seq_length": 18}, parallel={"context_parallel_size": 2}), 2, "2 * context_parallel_size"),
    (_sections({}, optimizer={"optimizer_type": "SGD"}, parallel={})
     | {"training_config": {"use_distributed_optimizer": True}}, 2, "optimizer_type='SGD'"),
]


REFUSED_FIELDS = {
    "together with context_parallel_size": {"parallel_config.context_parallel_size",
                                            "parallel_config.expert_model_parallel_size"},
    "2 * context_parallel_size": {"model_config.seq_length", "parallel_config.context_parallel_algo",
                                  "parallel_config.context_parallel_size"},
    "optimizer_type='SGD'": {"optimizer_config.optimizer_type", "training_config.use_distributed_optimizer"},
}


@pytest.mark.parametrize("sections, workers, text", REFUSED, ids=[r[2][:24] for r in REFUSED])
def test_refused_layouts_are_refused_by_the_builder_and_the_cli_before_anything_starts(tmp_path, capsys, sections,
                                                                                       workers, text):
    import yaml
    from mindspeed_lab.__main__ import main
    from mindspeed_lab.builder import ConfigBuilder
    builder = ConfigBuilder(sections, workers=workers)
    assert not builder.ok and any(text in p for p in builder.problems())
    # the builder shows the problem at every field it names
    named = {key for key in builder.fields() if text in builder.message(key)}
    assert named == REFUSED_FIELDS[text], named
    with pytest.raises(ValueError, match="the config has problems"):
        builder.job(runs_root=tmp_path / "runs")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(sections))
    assert main(["run", str(cfg), "--workers", str(workers), "--output", str(tmp_path / "run")]) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()


def test_moe_with_tensor_parallelism_and_no_sequence_parallelism_is_refused_when_the_config_loads(tmp_path, capsys):
    """A training config (AllConfig) refuses MoE x TP without SP at load time, naming the three fields;
    the CLI stops before anything starts; the builder keeps the value that breaks the rule pending
    until sequence parallelism makes it valid."""
    import yaml
    from mindspeed_lab.__main__ import main
    from mindspeed_lab.builder import ConfigBuilder
    fields = ("moe_config.num_experts=4", "tensor_model_parallel_size=2", "sequence_parallel=True")
    sections = _sections({}, parallel={"tensor_model_parallel_size": 2}, moe={"num_experts": 4})
    with pytest.raises(ConfigValueError) as refused:
        init_configs_from_dict(sections)
    assert refused.value.field == "sequence_parallel" and all(f in str(refused.value) for f in fields)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(sections))
    assert main(["run", str(cfg), "--workers", "2", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fields), err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="sequence_parallel"):
        ConfigBuilder(sections, workers=2)
    builder = ConfigBuilder(_sections({}, moe={"num_experts": 4}), workers=2)
    builder.set("parallel_config.tensor_model_parallel_size", 2)
    assert "sequence_parallel" in builder.message("parallel_config.tensor_model_parallel_size")
    assert not builder.ok
    builder.set("parallel_config.sequence_parallel", True)
    assert builder.ok, builder.problems()
    assert builder.config.parallel_config.tensor_model_parallel_size == 2
    # evaluation-only models (no training config) still build with MoE x TP and no SP
    from mindspeed_ms.core.config import ModelParallelConfig, MoEConfig
    TransformerConfig(vocab_size=32, num_layers=1, num_attention_heads=2, hidden_size=8, ffn_hidden_size=16,
                      parallel_config=ModelParallelConfig(tensor_model_parallel_size=2),
                      moe_config=MoEConfig(num_experts=4))


@pytest.mark.multiprocess
def test_accepted_layouts_start_under_msrun_and_train_like_one_process(tmp_path):
    """Two accepted layouts the old rules got wrong, each a 2-worker msrun job started by the lab's
    builder: pipelining whose interleaving comes from num_layers_per_virtual_pipeline_stage alone
    (the runtime now builds the 2 chunks validation derives), and ring-attention context parallelism.
    Their losses are those of the single-process run of the same model and batches."""
    import training_configs as T
    from lab_scripts.cleanup import stop_jobs_under
    from mindspeed_lab.builder import ConfigBuilder
    from mindspeed_ms.training.events import read_events

    steps = 2
    common = {"training_config": {"training_iters": steps, "eval_interval": None},
              "dataset_config": {"batch_size": 2, "micro_batch_num": 2},
              "optimizer_config": {**T.BASE["optimizer_config"], "lr_warmup_iters": 1}}
    cases = {
        "pp2_layers_per_chunk": ({"num_layers": 4}, {"pipeline_model_parallel_size": 2,
                                                     "num_layers_per_virtual_pipeline_stage": 1}, 2),
        "cp2_ring": ({}, {"context_parallel_size": 2, "context_parallel_algo": "megatron_cp_algo"}, None),
    }
    jobs = {}
    try:
        for name, (model, parallel, _) in cases.items():
            data = T.make(tmp_path / name, model_config=model, parallel_config=parallel, **common)
            builder = ConfigBuilder(data, workers=2)
            assert builder.ok, builder.problems()
            jobs[name] = builder.job(runs_root=tmp_path / "runs", name=name).start()
        for name, job in jobs.items():
            assert job.wait(timeout=600) == "succeeded", f"{name}: {job.error_summary}"
    finally:
        for job in jobs.values():
            if not job.done:
                job.stop()
        leftovers = stop_jobs_under(tmp_path)
    assert not leftovers, leftovers
    for name, (model, parallel, vpp) in cases.items():
        ref = T.run(T.make(tmp_path / f"ref_{name}", model_config=model, **common))
        ref_losses = [s["loss"] for s in ref]
        assert len(ref_losses) == steps
        starts = read_events(jobs[name].output_dir, kind="run_start")
        assert len(starts) == 2 and all(e["parallel"]["vpp"] == vpp for e in starts), (name, starts)
        events = read_events(jobs[name].output_dir, kind="step")
        losses = {}
        for event in events:
            if event["loss"] is not None:
                losses.setdefault(event["rank"], []).append(event["loss"])
        assert losses, name
        for rank, got in losses.items():
            np.testing.assert_allclose(got, ref_losses, rtol=1e-4, err_msg=f"{name} rank {rank}")


def test_sequence_parallel_without_tensor_parallelism_is_accepted_and_changes_nothing(tmp_path):
    """Megatron turns sequence parallelism off when tp is 1; here it is accepted by every rule and
    trains exactly as without it."""
    import training_configs as T
    sections = _sections({}, parallel={"sequence_parallel": True})
    assert not layout_errors(model_spec_from_config(init_configs_from_dict(sections)), 1,
                             Layout(sequence_parallel=True))
    plain = T.run(T.make(tmp_path / "plain", training_config={"training_iters": 3}))
    sp = T.run(T.make(tmp_path / "sp", training_config={"training_iters": 3}, parallel_config={"sequence_parallel": True}))
    assert [s["loss"] for s in sp] == [s["loss"] for s in plain]
