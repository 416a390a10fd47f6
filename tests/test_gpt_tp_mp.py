"""GPTModel under TP=2, TP=2+SP (2 processes) and TP=4 (4 processes) against one process."""

import pytest

from mp.gpt_tp_cases import CASES


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [2, 4])
def test_gpt_tensor_parallel_matches_single_process(msrun, nprocs):
    values = msrun("gpt_tp_cases.py", nprocs=nprocs, timeout=900, expected_cases=list(CASES))
    for rank in range(nprocs):
        for case, result in values[rank].items():
            assert abs(result["loss"] - result["ref_loss"]) < 2e-5, (rank, case, result)
