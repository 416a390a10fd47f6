"""Data parallelism (DDP with buckets, per-parameter reduction, distributed optimizer, gradient
accumulation), context parallelism (Ulysses, ring) and DP x TP against one process on the same
global batch: losses over 6 steps.

The single-process reference runs in the test process; the parallel runs in one msrun job per
world size. Weights are identical under every layout (use_cpu_initialization) and the data
sampler gives the data-parallel ranks the slices of the same global batch.
"""

import json

import numpy as np
import pytest

import training_configs as T

LOSS_RTOL = 2e-5
MOE = {"num_experts": 4, "moe_router_topk": 2}


def reference(tmp_path, name, **sections):
    steps = T.run(T.make(tmp_path / f"ref_{name}", **sections))
    return [s["loss"] for s in steps]


def parallel_cases(tmp_path):
    """(name, config, reference sections) for the 2-process job."""
    common_ref = {"dataset_config": {"batch_size": 8}}
    return [
        ("dp2_ddp_buckets", T.make(tmp_path / "dp2_ddp", training_config={"wrap_with_ddp": True, "bucket_size": 4000}),
         common_ref),
        ("dp2_per_parameter", T.make(tmp_path / "dp2_pp", training_config={"wrap_with_ddp": False}), common_ref),
        ("dp2_distributed_optimizer", T.make(tmp_path / "dp2_do", training_config={"use_distributed_optimizer": True}),
         common_ref),
        ("dp2_grad_accumulation", T.make(tmp_path / "dp2_ga", dataset_config={"batch_size": 2, "micro_batch_num": 2}),
         common_ref),
        # context parallelism: one replica over two ranks holds the whole batch (dp = 1)
        ("cp2_ulysses", T.make(tmp_path / "cp2u", dataset_config={"batch_size": 8}, parallel_config={
            "context_parallel_size": 2, "context_parallel_algo": "ulysses_cp_algo"}), common_ref),
        ("cp2_ring", T.make(tmp_path / "cp2r", dataset_config={"batch_size": 8}, parallel_config={
            "context_parallel_size": 2, "context_parallel_algo": "megatron_cp_algo"}), common_ref),
        # expert parallelism with the sharded optimizer: experts are sharded over the
        # expert-data-parallel group, dense weights over the data-parallel group
        ("ep2_moe_distributed_optimizer", T.make(tmp_path / "ep2do", moe_config=MOE,
                                                 parallel_config={"expert_model_parallel_size": 2},
                                                 training_config={"use_distributed_optimizer": True}),
         {"dataset_config": {"batch_size": 8}, "moe_config": MOE}),
    ]


def check(values, cases, refs, nprocs):
    for name, _, _ in cases:
        for rank in range(nprocs):
            losses = [s["loss"] for s in values[rank][name]]
            np.testing.assert_allclose(losses, refs[name], rtol=LOSS_RTOL, err_msg=f"{name} rank {rank}")
            assert not any(s["overflow"] for s in values[rank][name])
        # the loss falls over the six steps
        assert refs[name][-1] < refs[name][0] - 0.2


@pytest.mark.multiprocess
def test_data_parallel_variants_match_one_process(msrun, tmp_path):
    cases = parallel_cases(tmp_path)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg, _ in cases]))
    values = msrun("train_cases.py", nprocs=2, args=[spec], timeout=900, expected_cases=[c[0] for c in cases])
    refs = {}
    cache = {}
    for name, _, ref_sections in cases:
        key = json.dumps(ref_sections, sort_keys=True)
        if key not in cache:
            cache[key] = reference(tmp_path, name, **ref_sections)
        refs[name] = cache[key]
    check(values, cases, refs, 2)


@pytest.mark.multiprocess
def test_data_and_tensor_parallel_match_one_process(msrun, tmp_path):
    cases = [("dp2_tp2", T.make(tmp_path / "dp2tp2", parallel_config={"tensor_model_parallel_size": 2}),
              {"dataset_config": {"batch_size": 8}}),
             ("dp2_tp2_sp_distopt", T.make(tmp_path / "dp2tp2sp", parallel_config={
                 "tensor_model_parallel_size": 2, "sequence_parallel": True},
                 training_config={"use_distributed_optimizer": True}), {"dataset_config": {"batch_size": 8}})]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg, _ in cases]))
    values = msrun("train_cases.py", nprocs=4, args=[spec], timeout=900, expected_cases=[c[0] for c in cases])
    ref = reference(tmp_path, "dp2tp2", dataset_config={"batch_size": 8})
    check(values, cases, {name: ref for name, _, _ in cases}, 4)


@pytest.mark.multiprocess
def test_per_token_loss_counts_the_tokens_of_every_data_parallel_rank(msrun, tmp_path):
    """calculate_per_token_loss with padding (unequal token counts per micro-batch and rank): two
    data-parallel ranks with two micro-batches each give the one-process loss of the whole batch,
    because the token count is summed over micro-batches and ranks."""
    from mindspeed_ms.core.datasets import CharDataset

    space = int(CharDataset(seq_length=32, split="train", val_fraction=0.1).tokenizer.encode(" ")[0])
    per_token = {"calculate_per_token_loss": True}
    cases = [("dp2_per_token", T.make(tmp_path / "dp2pt", training_config=per_token,
                                      dataset_config={"batch_size": 2, "micro_batch_num": 2, "pad_token_id": space}),
              {"training_config": per_token, "dataset_config": {"batch_size": 8, "pad_token_id": space}})]
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps([[name, cfg] for name, cfg, _ in cases]))
    values = msrun("train_cases.py", nprocs=2, args=[spec], timeout=900, expected_cases=[c[0] for c in cases])
    ref = reference(tmp_path, "per_token", **cases[0][2])
    check(values, cases, {"dp2_per_token": ref}, 2)
    # a mean per micro-batch would weigh the micro-batches equally: not the same losses
    mean = reference(tmp_path, "mean_per_micro_batch", dataset_config={"batch_size": 2, "micro_batch_num": 4,
                                                                       "pad_token_id": space})
    assert not np.allclose(mean, ref, rtol=LOSS_RTOL)
