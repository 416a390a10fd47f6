"""MoE with expert parallelism against one process: 2 workers (EP=2, the reference's examples,
five training steps with and without cold/hot experts, pretrain() with cold/hot experts, a
checkpoint and a bit-exact resume) and 4 (EP=4, EP=2 x DP=4, EP=2 x TP=2 with
sequence parallelism). The cases are in tests/mp/moe_cases.py; each job runs them all."""

import pytest

from mp.moe_cases import CASES_2, CASES_4

SEED_PRINTS = {
    "seed_sequential_mlp": ["(32, 64)"],
    "seed_moe_layer": ["(8, 2, 64)"],
    "seed_topk_router": ["(32, 2)"],
    "seed_token_dispatcher": ["(32, 64)", "[7 9 7 9]", "(16, 64)"],
}


@pytest.mark.multiprocess
def test_moe_expert_parallel_2_processes(msrun):
    values = msrun("moe_cases.py", nprocs=2, timeout=1200, expected_cases=list(CASES_2))
    for rank in (0, 1):
        for name, printed in SEED_PRINTS.items():
            assert values[rank][name] == printed, (rank, name, values[rank][name])
        for case in ("gpt_ep2_five_steps", "gpt_ep2_cold_hot_five_steps"):
            result = values[rank][case]
            assert max(abs(a - b) for a, b in zip(result["losses"], result["ref_losses"])) < 5e-5, (rank, result)
        assert values[rank]["gpt_ep2_cold_hot_five_steps"]["decided"] == [1, 2, 4]
    assert values[0]["pretrain_ep2_cold_hot_resume"] == values[1]["pretrain_ep2_cold_hot_resume"]
    # Token counts are global: identical on both ranks, written by rank 0 only.
    assert values[0]["token_counts_ep2"]["counts"] == values[1]["token_counts_ep2"]["counts"]
    assert [values[r]["token_counts_ep2"]["writer"] for r in (0, 1)] == [True, False]


@pytest.mark.multiprocess
def test_moe_expert_parallel_4_processes(msrun):
    values = msrun("moe_cases.py", nprocs=4, timeout=1800, expected_cases=list(CASES_4))
    for case in ("gpt_ep4", "gpt_ep2_dp4", "gpt_ep2_tp2_sp"):
        for rank in range(4):
            result = values[rank][case]
            assert abs(result["loss"] - result["ref_loss"]) < 2e-5, (rank, case, result)
    counts = [values[r]["token_counts_ep2_tp2_sp"]["counts"] for r in range(4)]
    assert all(c == counts[0] for c in counts)
