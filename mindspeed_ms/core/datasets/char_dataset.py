"""Character-level text dataset (as nanoGPT's ``shakespeare_char``).

The vocabulary is the sorted set of distinct characters of the whole text; the text is split
into a training part (the first ``1 - val_fraction``) and a validation part (the rest, 10% by
default). A sample is ``seq_length + 1`` consecutive tokens (inputs are ``sample[:-1]``, labels
``sample[1:]``), taken either at random positions (nanoGPT's ``get_batch``: uniform over all
valid start positions, with replacement, reproducible from ``seed``) or as consecutive
non-overlapping windows (``sampling="sequential"``).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

__all__ = ["CharTokenizer", "CharDataset", "tinyshakespeare_path", "load_text"]

_BLOCK = 4096  # random start positions are generated lazily, this many at a time


def tinyshakespeare_path() -> Path:
    """Path of the tiny Shakespeare corpus shipped with the package (``mindspeed_ms/data``)."""
    return Path(str(resources.files("mindspeed_ms") / "data" / "tinyshakespeare.txt"))


def load_text(path: Union[None, str, os.PathLike] = None, encoding: str = "utf-8") -> str:
    """Read a text file (default: the shipped tiny Shakespeare corpus)."""
    path = tinyshakespeare_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    return path.read_text(encoding=encoding)


class CharTokenizer:
    """Maps characters to ids 0..V-1 (sorted by code point) and back.

    Args:
        chars: The vocabulary's characters (duplicates are removed, order is sorted).
    """

    def __init__(self, chars: Iterable[str]):
        self.chars: List[str] = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be a non-empty collection of single characters")
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self.itos: Dict[int, str] = dict(enumerate(self.chars))
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of ``text``."""
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (uint16 when the vocabulary fits, else int32).

        Raises:
            ValueError: ``text`` holds a character outside the vocabulary.
        """
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids_clipped = np.minimum(ids, len(self._codes) - 1)
        bad = self._codes[ids_clipped] != codes
        if bad.any():
            first = int(np.argmax(bad))
            raise ValueError(f"character {text[first]!r} at position {first} is not in the vocabulary")
        return ids_clipped.astype(np.uint16 if self.vocab_size <= 65536 else np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``."""
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able form (nanoGPT's meta: ``vocab_size`` and the characters)."""
        return {"vocab_size": self.vocab_size, "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, state: Dict[str, Any]) -> "CharTokenizer":
        return cls(state["chars"])

    def save(self, path: Union[str, os.PathLike]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "CharTokenizer":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


_SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
           "val": "validation", "all": "all"}


class CharDataset:
    """Character-level samples of ``seq_length + 1`` tokens from one split of a text.

    Args:
        text: The text; if ``None``, ``path`` is read (default: the shipped tiny Shakespeare).
        seq_length: Tokens per model input; each sample has ``seq_length + 1`` tokens.
        split: ``"train"``, ``"validation"`` (also ``"val"``) or ``"all"``. Default: ``"train"``.
        val_fraction: Fraction at the end of the text used for validation (in [0, 1)). Default: 0.1.
        sampling: ``"random"`` (nanoGPT's get_batch) or ``"sequential"``. Default: ``"random"``.
        num_samples: Number of random samples (the dataset length) in ``random`` mode; default:
            as many as non-overlapping windows fit in the split. Ignored for ``sequential``.
        seed: Seed of the random start positions.
        path: Text file to read when ``text`` is None.
        tokenizer: A tokenizer to use instead of the text's own vocabulary (e.g. to share one
            between splits; every split built from the same text gets the same vocabulary anyway).

    Items are ``np.int32`` arrays of length ``seq_length + 1``.

    Raises:
        ValueError: An argument is out of range or the split is too short for one sample.
    """

    def __init__(self, text: Optional[str] = None, *, seq_length: int, split: str = "train",
                 val_fraction: float = 0.1, sampling: str = "random", num_samples: Optional[int] = None,
                 seed: int = 0, path: Union[None, str, os.PathLike] = None,
                 tokenizer: Optional[CharTokenizer] = None):
        if text is None:
            text = load_text(path)
        if int(seq_length) != seq_length or seq_length < 1:
            raise ValueError(f"seq_length must be an int >= 1, got {seq_length!r}")
        if str(split).lower() not in _SPLITS:
            raise ValueError(f"split={split!r} is not supported; allowed: ['train', 'validation', 'val', 'all']")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        if sampling not in ("random", "sequential"):
            raise ValueError(f"sampling={sampling!r} is not supported; allowed: ['random', 'sequential']")
        self.seq_length = int(seq_length)
        self.split = _SPLITS[str(split).lower()]
        self.val_fraction = float(val_fraction)
        self.sampling = sampling
        self.seed = int(seed)
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(text)
        data = self.tokenizer.encode(text)
        n_train = int(len(data) * (1.0 - self.val_fraction))
        if self.split == "train":
            data = data[:n_train]
        elif self.split == "validation":
            data = data[n_train:]
        self.data = data
        if len(data) < self.seq_length + 1:
            raise ValueError(f"the {self.split} split has {len(data)} tokens, fewer than seq_length + 1 = "
                             f"{self.seq_length + 1}")
        self._num_windows = (len(data) - 1) // self.seq_length
        if sampling == "random":
            if num_samples is None:
                num_samples = self._num_windows
            if int(num_samples) != num_samples or num_samples < 1:
                raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
            self._len = int(num_samples)
        else:
            self._len = self._num_windows
        self._high = len(data) - self.seq_length  # random starts are in [0, _high)
        self._blocks: Dict[int, np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __len__(self) -> int:
        return self._len

    def start_position(self, index: int) -> int:
        """The token offset where sample ``index`` starts."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for a dataset of {self._len} samples")
        if self.sampling == "sequential":
            return index * self.seq_length
        block, offset = divmod(index, _BLOCK)
        starts = self._blocks.get(block)
        if starts is None:
            if len(self._blocks) >= 16:
                self._blocks.clear()
            starts = np.random.default_rng([self.seed, block]).integers(0, self._high, size=_BLOCK)
            self._blocks[block] = starts
        return int(starts[offset])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self._len
        start = self.start_position(index)
        return self.data[start:start + self.seq_length + 1].astype(np.int32)

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        """Samples ``indices`` stacked: ``[len(indices), seq_length + 1]`` int32."""
        return np.stack([self[i] for i in indices]) if len(indices) else \
            np.empty((0, self.seq_length + 1), np.int32)
