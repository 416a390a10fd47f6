"""Checkpoints: per-rank tensors in MindSpore's ckpt or safetensors format plus JSON metadata.

Layout under ``<output_dir>/checkpoint/rank_<r>/``:

* ``<prefix>-<step>.ckpt`` (or ``.safetensors``): the model parameters by name, and the optimizer
  state under ``optimizer.<state name>``.
* ``<prefix>-<step>.json``: step, consumed samples, scheduler / loss-scale / sampler / RNG states,
  optimizer metadata, the tensor file's name and (with ``crc_check``) its CRC-32.
* ``latest.json``: ``{"step": s, ...}`` of the newest complete checkpoint of this rank.

Every file is written to a temporary name and renamed into place, the metadata after the tensors
and ``latest.json`` last, so a run killed in the middle of a save leaves the previous checkpoint
usable. No pickle is used anywhere: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

__all__ = ["checkpoint_dir", "save_checkpoint", "load_checkpoint", "latest_step", "list_steps",
           "CheckpointError"]

_FORMATS = {"ckpt": "ckpt", "safetensors": "safetensors"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def checkpoint_dir(output_dir, rank: int) -> Path:
    """``<output_dir>/checkpoint/rank_<rank>``."""
    return Path(output_dir) / "checkpoint" / f"rank_{int(rank)}"


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def list_steps(directory, prefix: str) -> List[int]:
    """Steps with complete metadata in ``directory``, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.json$")
    return sorted(int(m.group(1)) for m in (pattern.match(p.name) for p in directory.iterdir()) if m)


def latest_step(output_dir, rank: int) -> Optional[int]:
    """The newest complete checkpoint step of ``rank`` (None when there is none)."""
    path = checkpoint_dir(output_dir, rank) / "latest.json"
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"unreadable {path}: {err}") from err


def save_checkpoint(output_dir, rank: int, step: int, tensors: Dict[str, np.ndarray], meta: dict, *,
                    prefix: str = "network", ckpt_format: str = "ckpt", crc_check: bool = False,
                    keep_checkpoint_max: int = 5) -> Path:
    """Write one checkpoint atomically and prune old ones.

    Args:
        output_dir: Run output directory.
        rank: Global rank.
        step: Training step the checkpoint is taken after.
        tensors: ``{name: array}`` (model parameters and ``optimizer.*`` state).
        meta: JSON-serialisable metadata.
        prefix: File prefix.
        ckpt_format: 'ckpt' or 'safetensors'.
        crc_check: Record the file's CRC-32 (checked on load) and use MindSpore's own check.
        keep_checkpoint_max: Checkpoints kept per rank (older ones are deleted).

    Returns:
        Path of the tensor file.
    """
    if ckpt_format not in _FORMATS:
        raise ValueError(f"ckpt_format must be one of {sorted(_FORMATS)}, got {ckpt_format!r}")
    if keep_checkpoint_max < 1:
        raise ValueError(f"keep_checkpoint_max must be at least 1, got {keep_checkpoint_max}")
    directory = checkpoint_dir(output_dir, rank)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{int(step)}.{ckpt_format}"
    final = directory / name
    staging = Path(tempfile.mkdtemp(dir=str(directory), prefix=".staging-"))
    try:
        save_list = [{"name": k, "data": Tensor(np.ascontiguousarray(v))} for k, v in tensors.items()]
        ms.save_checkpoint(save_list, str(staging / name), crc_check=crc_check, format=_FORMATS[ckpt_format])
        os.replace(staging / name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = dict(meta)
    meta.update({"step": int(step), "file": name, "format": ckpt_format, "crc_check": bool(crc_check),
                 "tensor_names": sorted(tensors)})
    if crc_check:
        meta["crc32"] = _crc32(final)
    _atomic_write_text(directory / f"{prefix}-{int(step)}.json", json.dumps(meta, indent=1, sort_keys=True))
    _atomic_write_text(directory / "latest.json", json.dumps({"step": int(step), "file": name}))
    for old in list_steps(directory, prefix)[:-keep_checkpoint_max]:
        for suffix in (f".{ckpt_format}", ".json"):
            path = directory / f"{prefix}-{old}{suffix}"
            if path.exists():
                path.unlink()
    return final


def load_checkpoint(output_dir, rank: int, step: Optional[int] = None, *,
                    prefix: str = "network") -> Tuple[Dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        output_dir: Run output directory (or the ``load_checkpoint`` directory of a previous run).
        rank: Global rank.
        step: Step to load (default: the latest).
        prefix: File prefix.

    Returns:
        ``(tensors, meta)``.

    Raises:
        CheckpointError: no checkpoint, missing files or a CRC mismatch.
    """
    directory = checkpoint_dir(output_dir, rank)
    if step is None:
        step = latest_step(output_dir, rank)
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
    meta_path = directory / f"{prefix}-{int(step)}.json"
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint metadata {meta_path} does not exist (available steps: "
                              f"{list_steps(directory, prefix)})")
    meta = json.loads(meta_path.read_text())
    path = directory / meta["file"]
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if meta.get("crc_check"):
        actual = _crc32(path)
        if actual != int(meta["crc32"]):
            raise CheckpointError(f"CRC mismatch in {path}: recorded {meta['crc32']}, found {actual}")
    params = ms.load_checkpoint(str(path), crc_check=bool(meta.get("crc_check")), format=meta["format"])
    tensors = {k: v.asnumpy() for k, v in params.items()}
    missing = sorted(set(meta.get("tensor_names", [])) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors {missing[:5]}")
    return tensors, meta
