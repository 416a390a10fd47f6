"""Recomputation under tensor + sequence parallelism (2 processes) against the models without."""

import pytest

from mp.recompute_cases import CASES


@pytest.mark.multiprocess
def test_comm_recompute_matches_and_keeps_less(msrun):
    values = msrun("recompute_cases.py", nprocs=2, timeout=900, expected_cases=list(CASES))
    for rank in range(2):
        for name in CASES:
            got = values[rank][name]
            assert got["kept_bytes"] < got["sp_kept_bytes"], (rank, name, got)
            assert got["max_grad_diff_vs_sp"] < 1e-5, (rank, name, got)
            print(f"rank {rank} {name}: kept {got['kept_bytes']} bytes, {got['sp_kept_bytes']} without")


def _pipeline_case(tmp_path, name, model, parallel):
    """A pipeline case whose single-process reference has neither pipelining nor recomputation."""
    from test_pipeline_mp import COMMON, PIPELINE_KEYS  # pylint: disable=import-outside-toplevel
    import training_configs as T  # pylint: disable=import-outside-toplevel

    sections = {"model_config": dict(model), "parallel_config": dict(parallel),
                "dataset_config": dict(COMMON["dataset_config"]),
                "training_config": dict(COMMON["training_config"])}
    cfg = T.make(tmp_path / name, **sections)
    ref_sections = {k: dict(v) for k, v in sections.items()}
    for key in PIPELINE_KEYS + ("recompute", "select_recompute", "recompute_config"):
        ref_sections["parallel_config"].pop(key, None)
    return name, cfg, T.make(tmp_path / f"ref_{name}", **ref_sections)


@pytest.mark.multiprocess
def test_pipeline_per_stage_and_per_chunk_lists_match_one_process(msrun, tmp_path):
    from test_pipeline_mp import run_job  # pylint: disable=import-outside-toplevel

    cases = [
        # stage 0: layer 0 recomputed whole, layer 1 its core attention; stage 1: both whole
        _pipeline_case(tmp_path, "pp2_recompute_per_stage", {"num_layers": 4},
                       {"pipeline_model_parallel_size": 2, "recompute": [1, 2],
                        "select_recompute": [2, 0]}),
        # rows by virtual chunk (num_layer_list's layout), as the guide's recompute_config
        _pipeline_case(tmp_path, "pp2_vpp2_recompute_rows", {"num_layers": 4},
                       {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
                        "recompute_config": {"recompute": "[[1,0],[0,1]]", "select_recompute": True}}),
    ]
    run_job(msrun, tmp_path, cases, 2)
