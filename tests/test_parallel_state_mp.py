"""parallel_state with 4 processes: every group exists and communicates."""

import pytest


@pytest.mark.multiprocess
def test_groups_communicate_with_four_processes(msrun):
    values = msrun("parallel_state_cases.py", nprocs=4, timeout=600)
    for rank, cases in values.items():
        assert cases["seed_examples"] == [0, 1]
        tp2pp2 = cases["tp2_pp2"]
        assert tp2pp2["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert tp2pp2["pp"] == [rank % 2, rank % 2 + 2]
        assert tp2pp2["dp"] == [rank]
        assert cases["tp2_dp2_ep2"]["ep2"]["ep"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert cases["cp4_hybrid"]["cp"] == [0, 1, 2, 3]
        assert cases["cp4_hybrid"]["ulysses"] == ([0, 1] if rank < 2 else [2, 3])
        assert cases["cp4_hybrid"]["ring"] == [rank % 2, rank % 2 + 2]
        assert cases["pp4_vpp"]["pp"] == [0, 1, 2, 3]
        assert cases["pp4_vpp"]["emb"] == ([0, 3] if rank in (0, 3) else [rank])
