"""Tensor and sequence parallelism with 2 and 4 processes against the single-process computation."""

import pytest

CASES = ["mappings", "graph_mappings", "cross_entropy", "column_parallel_linear", "row_parallel_linear", "vocab_parallel_embedding",
         "seed_examples_tp2", "rng_streams", "lora"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("nprocs", [2, 4])
def test_tensor_parallel_layers_match_single_process(msrun, nprocs):
    values = msrun("tp_cases.py", nprocs=nprocs, timeout=600, expected_cases=CASES)
    for rank in range(nprocs):
        assert values[rank]["seed_examples_tp2"] == [1, 1024 // nprocs, 2560]
