"""Memory-mapped token datasets: ``<prefix>.bin`` (tokens) + ``<prefix>.idx`` (document index).

The builder is tokenizer-agnostic: it takes documents as arrays of token ids.

File format (little-endian, no pickle anywhere):

* ``<prefix>.bin``: every document's tokens, concatenated, as ``dtype`` (``uint16`` or ``int32``).
* ``<prefix>.idx``: the 8-byte magic ``b"MSIDX\\x00\\x00\\x01"``, a ``uint32`` header length ``h``,
  ``h`` bytes of UTF-8 JSON ``{"version": 1, "dtype": "uint16", "num_documents": N,
  "num_tokens": T}``, zero padding to a multiple of 8 bytes, then ``N + 1`` ``int64`` token offsets
  (document ``i`` is ``bin[offsets[i]:offsets[i + 1]]``).

Both files are written to temporary names and renamed on :meth:`IndexedDatasetBuilder.finalize`,
so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

__all__ = ["IndexedDatasetBuilder", "IndexedDataset", "write_indexed_dataset", "best_token_dtype"]

MAGIC = b"MSIDX\x00\x00\x01"
VERSION = 1
_DTYPES = {"uint16": np.uint16, "int32": np.int32}


def best_token_dtype(vocab_size: Optional[int]) -> str:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``int32``."""
    return "uint16" if vocab_size is not None and vocab_size <= 65536 else "int32"


def _paths(prefix: Union[str, os.PathLike]):
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedDatasetBuilder:
    """Writes documents to ``<prefix>.bin`` / ``<prefix>.idx``.

    Args:
        prefix: Output path without extension (its directory is created).
        dtype: ``"uint16"`` or ``"int32"``; default: chosen from ``vocab_size`` (``int32`` when
            unknown).
        vocab_size: Upper bound (exclusive) of the ids, checked for every document when given.
        append_eod: If not ``None``, this token is appended to every document (Megatron's
            ``--append-eod``), so that documents are separated by the end-of-document token.

    Use as a context manager or call :meth:`finalize`; an exception inside the ``with`` block
    leaves no output files.

    Raises:
        ValueError: Unknown dtype, or a token outside the dtype's range / ``[0, vocab_size)``.
    """

    def __init__(self, prefix: Union[str, os.PathLike], dtype: Optional[str] = None,
                 vocab_size: Optional[int] = None, append_eod: Optional[int] = None):
        dtype = best_token_dtype(vocab_size) if dtype is None else str(np.dtype(dtype))
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {list(_DTYPES)}")
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.append_eod = append_eod
        info = np.iinfo(_DTYPES[dtype])
        self._lo = 0
        self._hi = min(info.max + 1, vocab_size) if vocab_size is not None else info.max + 1
        if append_eod is not None and not self._lo <= append_eod < self._hi:
            raise ValueError(f"append_eod={append_eod} is outside [0, {self._hi})")
        self.bin_path, self.idx_path = _paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._bin = open(self._tmp_bin, "wb")  # pylint: disable=consider-using-with
        self._offsets = [0]
        self._finalized = False

    def add_document(self, tokens: Sequence[int]) -> None:
        """Append one document (a 1-D sequence of token ids; may be empty)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"document {len(self._offsets) - 1} must be 1-D, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"document {len(self._offsets) - 1} must hold integer token ids, got {arr.dtype}")
        if arr.size and (int(arr.min()) < self._lo or int(arr.max()) >= self._hi):
            raise ValueError(f"document {len(self._offsets) - 1} has token ids in [{int(arr.min())}, {int(arr.max())}], "
                             f"outside [0, {self._hi}) allowed by dtype={self.dtype}"
                             + (f", vocab_size={self.vocab_size}" if self.vocab_size is not None else ""))
        if self.append_eod is not None:
            arr = np.concatenate([arr.astype(np.int64), [self.append_eod]])
        self._bin.write(arr.astype(_DTYPES[self.dtype]).tobytes())
        self._offsets.append(self._offsets[-1] + int(arr.size))

    def add_documents(self, documents: Iterable[Sequence[int]]) -> None:
        for doc in documents:
            self.add_document(doc)

    def finalize(self) -> Path:
        """Write the index, move both files into place; return the prefix path."""
        if self._finalized:
            return Path(os.fspath(self.bin_path)[:-4])
        self._bin.close()
        header = json.dumps({"version": VERSION, "dtype": self.dtype, "num_documents": len(self._offsets) - 1,
                             "num_tokens": self._offsets[-1]}).encode("utf-8")
        head = MAGIC + struct.pack("<I", len(header)) + header
        head += b"\x00" * (-len(head) % 8)
        tmp_idx = self.idx_path.with_name(self.idx_path.name + ".tmp")
        with open(tmp_idx, "wb") as f:
            f.write(head)
            f.write(np.asarray(self._offsets, dtype="<i8").tobytes())
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(tmp_idx, self.idx_path)
        self._finalized = True
        return Path(os.fspath(self.bin_path)[:-4])

    def abort(self) -> None:
        """Discard everything written so far."""
        if not self._finalized:
            self._bin.close()
            self._tmp_bin.unlink(missing_ok=True)
            self._finalized = True

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_indexed_dataset(prefix: Union[str, os.PathLike], documents: Iterable[Sequence[int]],
                          dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                          append_eod: Optional[int] = None) -> Path:
    """Write ``documents`` (token-id arrays) to ``<prefix>.bin/.idx``; return the prefix.

    See :class:`IndexedDatasetBuilder` for the arguments.
    """
    with IndexedDatasetBuilder(prefix, dtype=dtype, vocab_size=vocab_size, append_eod=append_eod) as builder:
        builder.add_documents(documents)
    return builder.finalize()


class IndexedDataset:
    """Reads ``<prefix>.bin/.idx`` through ``np.memmap``.

    ``ds[i]`` is document ``i`` (a read-only memmap view); ``ds.get(i, offset, length)`` a part of it.

    Attributes:
        dtype (str): The token dtype.
        offsets (np.ndarray): ``int64[N + 1]`` token offsets of the documents.
        sizes (np.ndarray): ``int64[N]`` document lengths.
        num_tokens (int): Total tokens.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The index is not in this format or does not match the token file.
    """

    def __init__(self, prefix: Union[str, os.PathLike]):
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file {str(path)!r} does not exist")
        with open(self.idx_path, "rb") as f:
            magic = f.read(8)
            if magic != MAGIC:
                raise ValueError(f"{str(self.idx_path)!r} is not a mindspeed_ms index (magic {magic!r})")
            (hlen,) = struct.unpack("<I", f.read(4))
            header = json.loads(f.read(hlen).decode("utf-8"))
        if header.get("version") != VERSION or header.get("dtype") not in _DTYPES:
            raise ValueError(f"{str(self.idx_path)!r}: unsupported header {header}")
        self.dtype = header["dtype"]
        self.num_documents = int(header["num_documents"])
        start = 12 + hlen
        start += -start % 8
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=start, shape=(self.num_documents + 1,))
        self.num_tokens = int(self.offsets[-1])
        itemsize = np.dtype(_DTYPES[self.dtype]).itemsize
        if self.bin_path.stat().st_size != self.num_tokens * itemsize:
            raise ValueError(f"{str(self.bin_path)!r} holds {self.bin_path.stat().st_size} bytes, the index expects "
                             f"{self.num_tokens} tokens of {self.dtype}")
        if self.num_tokens:
            self.tokens = np.memmap(self.bin_path, dtype=_DTYPES[self.dtype], mode="r")
        else:
            self.tokens = np.empty((0,), dtype=_DTYPES[self.dtype])
        self.sizes = np.diff(np.asarray(self.offsets))

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self.num_documents
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range for {self.num_documents} documents")
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of document ``index`` (to its end by default)."""
        doc = self[index]
        end = len(doc) if length is None else offset + length
        return doc[offset:end]
