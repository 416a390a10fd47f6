"""Synthetic token dataset: reproducible random tokens, for tests and benchmarks."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SyntheticDataset"]


class SyntheticDataset:
    """``num_samples`` samples of ``seq_length + 1`` uniform random tokens in ``[0, vocab_size)``.

    Sample ``i`` depends only on ``(seed, i)``, so any subset can be read in any order, on any rank.

    Args:
        vocab_size: Tokens are drawn from ``[0, vocab_size)`` (>= 1).
        seq_length: Tokens per model input (>= 1).
        num_samples: Dataset length (>= 1).
        seed: The seed. Default: 0.

    Items are ``np.int32`` arrays of length ``seq_length + 1``.
    """

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 0):
        for name, value in (("vocab_size", vocab_size), ("seq_length", seq_length), ("num_samples", num_samples)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.vocab_size = int(vocab_size)
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        return rng.integers(0, self.vocab_size, size=self.seq_length + 1).astype(np.int32)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples ``indices`` stacked: ``[len(indices), seq_length + 1]`` int32."""
        return np.stack([self[i] for i in indices]) if len(indices) else \
            np.empty((0, self.seq_length + 1), np.int32)
