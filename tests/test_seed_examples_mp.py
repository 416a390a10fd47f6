"""The API reference's examples (parallel layers, GPT model family) print the documented values."""

import pytest

EXPECTED = {
    "column_parallel_linear": [1, 2, 4],
    "row_parallel_linear": [2, 1, 4],
    "vocab_parallel_cross_entropy": [[2], "[1.4273429 1.4273429]"],
    "eos_mask": [[2, 4], [2, 4, 4]],
    "gpt_model": [32, 8, 128],
    "embedding": [2, 64, 256],
    "get_language_model": [8, 32, 64],
    "module": [3, 2],
    "parallel_attention": [32, 1024, 256],
    "parallel_lm_logits": [2, 3, 6],
    "parallel_mlp": [4, 1, 8],
    "parallel_transformer": [32, 1024, 256],
    "parallel_transformer_layer": [32, 1024, 256],
    "rotary_embedding": [16, 1, 1, 16],
    "core_attention": [1024, 1, 128],
    "transformer_language_model": [8, 32, 64],
    "loss_with_mask": "67.0",
}


@pytest.mark.multiprocess
def test_reference_examples_print_documented_values(msrun):
    values = msrun("seed_model_examples.py", nprocs=2, timeout=900, expected_cases=list(EXPECTED))
    for rank in (0, 1):
        for name, expected in EXPECTED.items():
            assert values[rank][name] == expected, (rank, name, values[rank][name])
