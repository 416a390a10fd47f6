"""Pipeline parallelism against one process on the same weights and global batch.

Every case trains 5 steps (validation after step 3 and at the end); the losses of the last stage, the validation loss (forward-only
schedule) and the final weights (per-parameter sum of squares, sum and sum of magnitudes, keyed
by global layer index) must match a single-process run in the test process. Weights are identical
under every layout because use_cpu_initialization keys each weight by a layout-independent name.

Job 1 (2 processes): 1F1B with tied and untied embeddings (the untied one with the SBH layout),
interleaved with 2 virtual stages (shapes exchanged before every transfer), custom layer lists (flat with a noop layer; per virtual chunk),
a standalone embedding stage, and the point-to-point primitives. Job 2 (4 processes): PP=4,
PP=2 x TP=2 (with and without sequence parallelism), PP=2 x DP=2.
"""

import json

import numpy as np
import pytest

import training_configs as T
import pipeline_training as P
from mindspeed_ms.training.events import read_events

LOSS_RTOL = 2e-5
WEIGHT_RTOL = 1e-5
WEIGHT_ATOL = 1e-5  # on sums that are near zero (the sum of a centred weight)
STEPS = 5
COMMON = {"dataset_config": {"batch_size": 2, "micro_batch_num": 4},
          "training_config": {"training_iters": STEPS, "eval_interval": 3, "eval_iters": 1}}
PIPELINE_KEYS = ("pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size", "num_layer_list",
                 "standalone_embedding_stage", "tensor_model_parallel_size", "sequence_parallel",
                 "variable_seq_lengths")


def case(tmp_path, name, model=None, parallel=None, dataset=None):
    """(name, parallel config, single-process reference config) for one case."""
    sections = {"model_config": dict(model or {}), "parallel_config": dict(parallel or {}),
                "dataset_config": {**COMMON["dataset_config"], **(dataset or {})},
                "training_config": dict(COMMON["training_config"])}
    cfg = T.make(tmp_path / name, **sections)
    ref_sections = {k: dict(v) for k, v in sections.items()}
    for key in PIPELINE_KEYS:
        ref_sections["parallel_config"].pop(key, None)
    if "micro_batch_num" in (dataset or {}):  # data parallel: the reference takes the same global batch
        ref_sections["dataset_config"]["micro_batch_num"] = COMMON["dataset_config"]["micro_batch_num"]
    ref = T.make(tmp_path / f"ref_{name}", **ref_sections)
    return name, cfg, ref


def two_process_cases(tmp_path):
    return [
        case(tmp_path, "pp2_1f1b", parallel={"pipeline_model_parallel_size": 2}),  # tied embeddings
        case(tmp_path, "pp2_untied_sbh", model={"untie_embeddings_and_output_weights": True},
             parallel={"pipeline_model_parallel_size": 2}, dataset={"data_layout": "SBH"}),
        case(tmp_path, "pp2_vpp2_variable_seq", model={"num_layers": 4},
             parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                       "variable_seq_lengths": True}),
        case(tmp_path, "pp2_layer_list_noop", model={"num_layers": 4},
             parallel={"pipeline_model_parallel_size": 2, "num_layer_list": [1, 3], "noop_layers": [2]}),
        case(tmp_path, "pp2_vpp2_layer_list", model={"num_layers": 5},
             parallel={"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                       "num_layer_list": [[1, 2], [1, 1]]}),
        case(tmp_path, "pp2_standalone_embedding",
             parallel={"pipeline_model_parallel_size": 2, "standalone_embedding_stage": True}),
    ]


def four_process_cases(tmp_path):
    return [
        case(tmp_path, "pp4", model={"num_layers": 4}, parallel={"pipeline_model_parallel_size": 4}),
        case(tmp_path, "pp2_tp2", parallel={"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2}),
        case(tmp_path, "pp2_tp2_sp", parallel={"pipeline_model_parallel_size": 2, "tensor_model_parallel_size": 2,
                                               "sequence_parallel": True}),
        case(tmp_path, "pp2_dp2", parallel={"pipeline_model_parallel_size": 2}, dataset={"micro_batch_num": 2}),
    ]


# single-process references by config (without the output directory), shared by the cases and
# tests of this module that train the same model on the same batches
_REFERENCES = {}


def references(cases):
    """Single-process runs (in this process), one per distinct reference config."""
    refs = {}
    for name, _, ref in cases:
        key = json.dumps({section: {k: v for k, v in values.items() if k != "output_dir"}
                          for section, values in ref.items()}, sort_keys=True)
        if key not in _REFERENCES:
            _REFERENCES[key] = (P.train(ref), ref["training_config"]["output_dir"])
        refs[name] = _REFERENCES[key]
    return refs


def check_case(name, cfg, ref, ref_dir, values, nprocs):
    ref_losses = [s["loss"] for s in ref["steps"]]
    assert ref_losses[-1] < ref_losses[0] - 0.2, f"{name}: the reference does not learn: {ref_losses}"
    ref_val = [e["val_loss"] for e in read_events(ref_dir, kind="eval")]
    assert len(ref_val) == 2  # after step 3 and at the end
    out_dir = cfg["training_config"]["output_dir"]
    last_ranks = [r for r in range(nprocs) if values[r][name]["last_stage"]]
    assert last_ranks, name
    for rank in range(nprocs):
        got = values[rank][name]
        losses = [s["loss"] for s in got["steps"]]
        assert not any(s["overflow"] for s in got["steps"]), f"{name} rank {rank}"
        np.testing.assert_allclose([s["grad_norm"] for s in got["steps"]], [s["grad_norm"] for s in ref["steps"]],
                                   rtol=1e-4, err_msg=f"{name} rank {rank}: grad norms")
        events = read_events(out_dir, kind="step", rank=rank)
        assert len(events) == len(ref_losses), f"{name} rank {rank}: {len(events)} step events"
        assert len(got["log_losses"]) == len(ref_losses), f"{name} rank {rank}: log lines {got['log_losses']}"
        if got["last_stage"]:
            np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, err_msg=f"{name} rank {rank}")
            np.testing.assert_allclose([float(v) for v in got["log_losses"]], ref_losses, rtol=LOSS_RTOL,
                                       err_msg=f"{name} rank {rank}: the log lines' Loss")
            assert all(e["loss"] is not None for e in events), f"{name} rank {rank}"
            val = [e["val_loss"] for e in read_events(out_dir, kind="eval", rank=rank)]
            np.testing.assert_allclose(val, ref_val, rtol=LOSS_RTOL, err_msg=f"{name} rank {rank}: validation loss")
        else:
            assert losses == [None] * len(ref_losses), f"{name} rank {rank}: {losses}"
            assert all(e["loss"] is None for e in events), f"{name} rank {rank}: step events must write loss null"
            assert got["log_losses"] == ["None"] * len(ref_losses), f"{name} rank {rank}: log lines must say Loss: None"
        for key, stats in got["weights"].items():
            expected = ref["weights"]["word_embeddings" if key == "word_embeddings_copy" else key]
            np.testing.assert_allclose(stats, expected, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       err_msg=f"{name} rank {rank}: final {key} ({P.STAT_NAMES})")
    # every weight of the reference lives on some rank
    held = set().union(*(values[r][name]["weights"] for r in range(nprocs)))
    assert set(ref["weights"]) <= held, f"{name}: weights on no rank: {sorted(set(ref['weights']) - held)}"


def run_job(msrun, tmp_path, cases, nprocs, extra_args=()):
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg, _ in cases]))
    expected = [c[0] for c in cases] + (["p2p_primitives"] if extra_args else [])
    values = msrun("pipeline_cases.py", nprocs=nprocs, args=[spec, *extra_args], timeout=1500,
                   expected_cases=expected)
    refs = references(cases)
    for name, cfg, _ in cases:
        check_case(name, cfg, refs[name][0], refs[name][1], values, nprocs)
    return values


@pytest.mark.multiprocess
def test_pipeline_two_stages_match_one_process(msrun, tmp_path):
    values = run_job(msrun, tmp_path, two_process_cases(tmp_path), 2, extra_args=["--p2p"])
    # tied embeddings (the default): the last stage holds the output layer's copy of the word
    # embedding, and run_job found it equal to the reference's embedding after training
    assert set(values[1]["pp2_1f1b"]["weights"]) >= {"word_embeddings_copy"}
    assert "word_embeddings" in values[0]["pp2_1f1b"]["weights"]
    assert "word_embeddings_copy" not in values[1]["pp2_untied_sbh"]["weights"]
    p2p = values
    assert p2p[1]["p2p_primitives"]["act"] == np.arange(6, dtype=np.float32).reshape(1, 2, 3).tolist()
    assert p2p[0]["p2p_primitives"]["grad"] == (2 * (np.arange(6).reshape(1, 2, 3) + 10)).tolist()
    assert p2p[0]["p2p_primitives"]["recv_forward_first_stage"] is None
    assert p2p[1]["p2p_primitives"]["send_forward_last_stage"] is None
    assert p2p[0]["p2p_primitives"]["variable_shape"] == [1, 7, 3]
    assert p2p[0]["p2p_primitives"]["variable_value"] == 2.0
    assert p2p[1]["p2p_primitives"]["variable_shape"] == [1, 5, 3]
    assert p2p[1]["p2p_primitives"]["variable_value"] == 1.0
    assert p2p[0]["p2p_primitives"]["packed"] == [[2.0, 3.0], [[4.0]]]
    assert p2p[1]["p2p_primitives"]["packed"] == [[1.0, 2.0], [[3.0]]]


@pytest.mark.multiprocess
def test_pipeline_four_processes_match_one_process(msrun, tmp_path):
    run_job(msrun, tmp_path, four_process_cases(tmp_path), 4)
