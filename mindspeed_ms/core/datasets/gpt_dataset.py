"""Megatron-style GPT dataset over an :class:`IndexedDataset`.

Samples are ``seq_length + 1`` consecutive tokens of the concatenated document stream; a sample
may span documents (which carry their end-of-document token when the dataset was built with
``append_eod``), and consecutive samples share one boundary token, as in Megatron. Three indices,
all deterministic functions of ``seed``:

* document index: the order in which documents are concatenated. One pass over the selected
  documents is an epoch; as many epochs are laid out as ``num_samples`` needs, each epoch in its
  own random order (``shuffle=False``: the original order every epoch).
* sample index: ``int64[num_samples + 1, 2]``, for each sample boundary the position in the
  document index and the token offset in that document; sample ``j`` runs from boundary ``j`` to
  boundary ``j + 1`` inclusive. Built with vectorised numpy (a cumulative sum and a search).
* shuffle index: a permutation of the samples (identity with ``shuffle=False``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from mindspeed_ms.core.datasets.indexed_dataset import IndexedDataset

__all__ = ["GPTDataset", "split_documents", "parse_split"]


def parse_split(split: Union[str, Sequence[float]]) -> List[float]:
    """Normalised split weights from ``"969,30,1"``/``"90,10"`` or a sequence; padded to three."""
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError as exc:
            raise ValueError(f"split={split!r} must be comma-separated numbers, e.g. '969,30,1'") from exc
    else:
        weights = [float(w) for w in split]
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split={split!r} must be 1 to 3 non-negative weights with a positive sum")
    weights = weights + [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_documents(num_documents: int, split: Union[str, Sequence[float]] = "969,30,1") -> List[np.ndarray]:
    """Document ids of the train/validation/test parts (contiguous ranges, in order, as in Megatron)."""
    weights = parse_split(split)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [b - diff if i else b for i, b in enumerate(bounds)]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(3)]


class GPTDataset:
    """Fixed-length samples over a memory-mapped token dataset (Megatron's GPT dataset).

    Args:
        indexed_dataset: The documents (an :class:`IndexedDataset`, or a prefix to open).
        seq_length: Tokens per model input; items have ``seq_length + 1`` tokens.
        num_samples: Samples to provide (epochs are added as needed); default: one epoch,
            ``(tokens - 1) // seq_length``.
        seed: Seed of the document and sample shuffles. Default: 1234.
        document_ids: The documents of this split (e.g. from :func:`split_documents`); default: all.
        shuffle: Shuffle documents per epoch and samples. Default: True.

    Items are ``np.int32`` arrays of length ``seq_length + 1``.

    Raises:
        ValueError: ``seq_length``/``num_samples`` out of range, or the selected documents hold
            fewer than ``seq_length + 1`` tokens.
    """

    def __init__(self, indexed_dataset: Union[IndexedDataset, str], seq_length: int,
                 num_samples: Optional[int] = None, seed: int = 1234,
                 document_ids: Optional[Sequence[int]] = None, shuffle: bool = True):
        if not isinstance(indexed_dataset, IndexedDataset):
            indexed_dataset = IndexedDataset(indexed_dataset)
        self.indexed = indexed_dataset
        if int(seq_length) != seq_length or seq_length < 1:
            raise ValueError(f"seq_length must be an int >= 1, got {seq_length!r}")
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if document_ids is None:
            document_ids = np.arange(len(indexed_dataset), dtype=np.int64)
        self.document_ids = np.asarray(document_ids, dtype=np.int64)
        if self.document_ids.size and (self.document_ids.min() < 0 or
                                       self.document_ids.max() >= len(indexed_dataset)):
            raise ValueError(f"document_ids must be in [0, {len(indexed_dataset)})")
        sizes = indexed_dataset.sizes
        self.tokens_per_epoch = int(sizes[self.document_ids].sum()) if self.document_ids.size else 0
        if self.tokens_per_epoch < self.seq_length + 1:
            raise ValueError(f"the selected documents hold {self.tokens_per_epoch} tokens, fewer than seq_length + 1 "
                             f"= {self.seq_length + 1}")
        if num_samples is None:
            num_samples = (self.tokens_per_epoch - 1) // self.seq_length
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        self.num_samples = int(num_samples)
        # smallest number of epochs whose tokens cover every sample boundary
        needed = self.num_samples * self.seq_length + 1
        self.num_epochs = -(-needed // self.tokens_per_epoch)
        self.document_index = self._build_document_index()
        self.sample_index = self._build_sample_index(sizes)
        self.shuffle_index = self._build_shuffle_index()

    def _build_document_index(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        epochs = []
        for _ in range(self.num_epochs):
            order = self.document_ids.copy()
            if self.shuffle:
                rng.shuffle(order)
            epochs.append(order)
        return np.concatenate(epochs)

    def _build_sample_index(self, sizes: np.ndarray) -> np.ndarray:
        lengths = sizes[self.document_index]
        ends = np.cumsum(lengths)
        boundaries = np.arange(self.num_samples + 1, dtype=np.int64) * self.seq_length
        position = np.searchsorted(ends, boundaries, side="right")
        offset = boundaries - (ends[position] - lengths[position])
        return np.stack([position, offset], axis=1).astype(np.int64)

    def _build_shuffle_index(self) -> np.ndarray:
        index = np.arange(self.num_samples, dtype=np.int64)
        if self.shuffle:
            np.random.default_rng([self.seed, 1]).shuffle(index)
        return index

    def __len__(self) -> int:
        return self.num_samples

    def sample_location(self, index: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """``((doc_position, offset), (doc_position, offset))`` of a sample's first and last token."""
        j = int(self.shuffle_index[index])
        first, last = self.sample_index[j], self.sample_index[j + 1]
        return (int(first[0]), int(first[1])), (int(last[0]), int(last[1]))

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        (p0, o0), (p1, o1) = self.sample_location(index)
        doc = self.indexed
        if p0 == p1:
            sample = doc.get(int(self.document_index[p0]), o0, o1 - o0 + 1)
        else:
            parts = [doc.get(int(self.document_index[p0]), o0)]
            parts.extend(doc[int(self.document_index[p])] for p in range(p0 + 1, p1))
            parts.append(doc.get(int(self.document_index[p1]), 0, o1 + 1))
            sample = np.concatenate(parts)
        return np.asarray(sample, dtype=np.int32)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples ``indices`` stacked: ``[len(indices), seq_length + 1]`` int32."""
        return np.stack([self[i] for i in indices]) if len(indices) else \
            np.empty((0, self.seq_length + 1), np.int32)
