"""The communication layer with 2 and 4 processes: every collective against numpy."""

import pytest

CASES = ["all_reduce", "all_reduce_dtypes", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_v",
         "broadcast", "barrier", "point_to_point", "errors"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [2, 4])
def test_collectives_against_numpy(msrun, nprocs):
    values = msrun("comm_cases.py", nprocs=nprocs, timeout=600, expected_cases=CASES)
    assert sorted(values) == list(range(nprocs))
