"""Context parallelism (Ulysses, ring attention, hybrid) against one process, under msrun."""

import pytest

from mp.cp_attention_cases import CASES_2, CASES_4
from mp.cp_model_cases import CASES_2 as MODEL_CASES_2, CASES_4 as MODEL_CASES_4


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [2, 4])
def test_context_parallel_attention_matches_single_process(msrun, nprocs):
    """Ulysses, ring and hybrid attention: output, dQ, dK, dV (and ring dropout's backward)."""
    cases = CASES_4 if nprocs == 4 else CASES_2
    values = msrun("cp_attention_cases.py", nprocs=nprocs, args=[str(nprocs)], timeout=900,
                   expected_cases=list(cases))
    assert set(values) == set(range(nprocs))


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [2, 4])
def test_gpt_context_parallel_matches_single_process(msrun, nprocs):
    """CP=2 (2 processes); CP=2 x TP=2 and a CP=4 hybrid (4 processes): loss and summed gradients."""
    cases = MODEL_CASES_4 if nprocs == 4 else MODEL_CASES_2
    values = msrun("cp_model_cases.py", nprocs=nprocs, args=[str(nprocs)], timeout=1200,
                   expected_cases=list(cases))
    for rank in range(nprocs):
        for case, result in values[rank].items():
            assert abs(result["loss"] - result["ref_loss"]) < 2e-5, (rank, case, result)
