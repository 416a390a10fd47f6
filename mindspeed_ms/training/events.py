"""The event stream (the contract between the engine and the lab) and the guide's log line.

Every rank appends JSON lines to ``<output_dir>/events/rank_<rank>.jsonl``: one event per line,
each written with a single ``write`` on a file opened in append mode (flushed per line, optionally
``fsync``-ed), never rewritten. If a previous run was killed mid-line, the writer first terminates
that partial line, so the damage stays one unreadable line. Readers (:func:`read_events`) skip
unreadable lines and missing files.

Fields common to every event:

* ``kind`` (str): one of ``run_start``, ``step``, ``eval``, ``moe_tokens``, ``checkpoint``,
  ``run_end``.
* ``time`` (float): Unix time in seconds when the event was written.
* ``rank`` (int): the global rank of the writer.
* ``nonfinite`` (dict, only when needed): values that were NaN or infinite. JSON has no NaN or
  Infinity, so such a value is written as ``null`` and listed here as ``{"<path>": "nan" | "inf" |
  "-inf"}``; ``<path>`` is the field name, dotted for nested values (``"config.lr"``, ``"counts.3"``).

Per kind (extra keyword arguments given to a method are written as additional fields, converted
the same way):

* ``run_start``: ``world_size`` (int); ``parallel`` (dict: ``tp``, ``pp``, ``dp``, ``cp``, ``ep``,
  ``vpp`` as given by the caller); ``config`` (dict: the resolved config, converted to JSON
  values; objects with ``to_dict()`` or dataclasses become dicts, tuples lists, anything else its
  ``str``); ``pid`` (int): the writer's process id.
* ``step``: ``epoch`` (int); ``step`` (int, the optimizer step just finished, 1-based as in the
  log line); ``loss`` (float | null: the mean loss over the step's micro-batches, null on ranks
  that do not compute it, e.g. non-last pipeline stages); ``lr`` (float: the learning rate used by
  the step); ``grad_norm`` (float | null: the global gradient norm before clipping, null when not
  computed); ``loss_scale`` (float | null: the loss scale after this step's update, null without
  loss scaling); ``scale_window`` (int | null: the current scale window, null for a fixed scale or
  none); ``overflow`` (bool: the step overflowed and its update was skipped); ``step_time_ms``
  (float: wall time of the step); ``tokens_per_s`` (float: global tokens processed per second).
* ``eval``: ``step`` (int); ``val_loss`` (float | null).
* ``moe_tokens``: ``step`` (int); ``layer`` (int: the MoE layer's index, as in the
  ``layer-<L>_<step>.npy`` files); ``counts`` (list of int: tokens routed to each expert before
  capacity dropping, one per expert).
* ``checkpoint``: ``step`` (int); ``path`` (str: the checkpoint directory or file written).
* ``run_end``: ``status`` (``"success"`` | ``"failed"`` | ``"stopped"``); ``error`` (str | null:
  ``"<ExceptionType>: <message>"`` for an exception, the given string otherwise).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

__all__ = ["EventWriter", "read_events", "event_file", "format_log_line", "to_json_value", "EVENT_KINDS",
           "RUN_STATUSES"]

EVENT_KINDS = ("run_start", "step", "eval", "moe_tokens", "checkpoint", "run_end")
RUN_STATUSES = ("success", "failed", "stopped")


def event_file(output_dir: Union[str, os.PathLike], rank: int) -> Path:
    """The event file of ``rank``: ``<output_dir>/events/rank_<rank>.jsonl``."""
    return Path(output_dir) / "events" / f"rank_{int(rank)}.jsonl"


def to_json_value(value: Any, path: str = "", nonfinite: Optional[Dict[str, str]] = None) -> Any:
    """Convert ``value`` to JSON-serialisable Python values.

    NaN and infinities become ``None`` and are recorded in ``nonfinite`` under ``path``. numpy
    scalars/arrays and MindSpore Tensors (anything with ``asnumpy()``/``tolist()``) become numbers
    or lists; dicts keep their (stringified) keys; tuples and sets become lists; dataclasses and
    objects with ``to_dict()`` become dicts; enums their value; anything else its ``str``.
    """
    if nonfinite is None:
        nonfinite = {}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isfinite(value):
            return value
        nonfinite[path or "value"] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {str(k): to_json_value(v, f"{path}.{k}" if path else str(k), nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_json_value(v, f"{path}.{i}" if path else str(i), nonfinite) for i, v in enumerate(items)]
    if isinstance(value, enum.Enum):
        return to_json_value(value.value, path, nonfinite)
    if hasattr(value, "asnumpy"):  # mindspore Tensor / Parameter
        return to_json_value(value.asnumpy(), path, nonfinite)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array or scalar
        return to_json_value(value.tolist(), path, nonfinite)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, path, nonfinite)
    if callable(getattr(value, "to_dict", None)):
        return to_json_value(value.to_dict(), path, nonfinite)
    if isinstance(value, (os.PathLike, bytes)):
        return os.fsdecode(value) if isinstance(value, os.PathLike) else value.decode("utf-8", "replace")
    return str(value)


def _opt_float(name: str, value: Any) -> Optional[float]:
    """A float field (None stays None); NaN/inf are kept here and handled by to_json_value."""
    if value is None:
        return None
    if hasattr(value, "asnumpy"):
        value = value.asnumpy()
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"event field {name} must be a number or None, got {value!r}") from exc


def _opt_int(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if hasattr(value, "asnumpy"):
        value = value.asnumpy()
    try:
        as_float = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"event field {name} must be an int or None, got {value!r}") from exc
    if not as_float.is_integer():
        raise ValueError(f"event field {name} must be an integer, got {value!r}")
    return int(as_float)


class EventWriter:
    """Appends this rank's events to ``<output_dir>/events/rank_<rank>.jsonl``.

    Args:
        output_dir: The run's output directory (created if needed).
        rank: The writer's global rank.
        fsync: ``os.fsync`` after every line (durable across machine crashes; slower). Default: False.

    Each method writes one line and returns the event dict as written. The writer can be used as
    a context manager; :meth:`close` is idempotent. See the module docstring for every field.

    Example:
        >>> with EventWriter("out", rank=0) as ev:
        ...     ev.run_start(world_size=1, parallel={"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "vpp": None},
        ...                  config={"seed": 1})
        ...     ev.step(0, 1, loss=4.2, lr=1e-3, grad_norm=1.0, loss_scale=None, scale_window=None,
        ...             overflow=False, step_time_ms=40.0, tokens_per_s=19000.0)
        ...     ev.run_end("success")
    """

    def __init__(self, output_dir: Union[str, os.PathLike], rank: int, fsync: bool = False):
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.rank = int(rank)
        self.path = event_file(output_dir, rank)
        self.fsync = bool(fsync)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: Optional[int] = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._terminate_partial_line()

    def _terminate_partial_line(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            last = f.read(1)
        if last != b"\n":
            self._write_bytes(b"\n")

    def _write_bytes(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"EventWriter for {self.path} is closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def write(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Write one event of ``kind`` with ``fields`` (converted to JSON values)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"event kind {kind!r} is not one of {list(EVENT_KINDS)}")
        nonfinite: Dict[str, str] = {}
        event = {"kind": kind, "time": time.time(), "rank": self.rank}
        for key, value in fields.items():
            if key in ("kind", "time", "rank", "nonfinite"):
                raise ValueError(f"event field {key!r} is reserved")
            event[key] = to_json_value(value, key, nonfinite)
        if nonfinite:
            event["nonfinite"] = nonfinite
        line = json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"
        self._write_bytes(line.encode("utf-8"))
        return event

    # -- the event kinds -----------------------------------------------------------------------
    def run_start(self, world_size: int, parallel: Dict[str, Any], config: Dict[str, Any],
                  **extra: Any) -> Dict[str, Any]:
        """The first event of a run: world size, parallel sizes and the resolved config."""
        if not isinstance(parallel, dict):
            raise TypeError(f"parallel must be a dict of sizes (tp, pp, dp, cp, ep, vpp), got {type(parallel).__name__}")
        return self.write("run_start", world_size=_opt_int("world_size", world_size), parallel=parallel,
                          config=config, pid=os.getpid(), **extra)

    def step(self, epoch: int, step: int, loss: Optional[float], lr: float, grad_norm: Optional[float],
             loss_scale: Optional[float], scale_window: Optional[int], overflow: bool, step_time_ms: float,
             tokens_per_s: float, **extra: Any) -> Dict[str, Any]:
        """One optimizer step."""
        if hasattr(overflow, "asnumpy"):
            overflow = overflow.asnumpy()
        return self.write("step", epoch=_opt_int("epoch", epoch), step=_opt_int("step", step),
                          loss=_opt_float("loss", loss), lr=_opt_float("lr", lr),
                          grad_norm=_opt_float("grad_norm", grad_norm),
                          loss_scale=_opt_float("loss_scale", loss_scale),
                          scale_window=_opt_int("scale_window", scale_window), overflow=bool(overflow),
                          step_time_ms=_opt_float("step_time_ms", step_time_ms),
                          tokens_per_s=_opt_float("tokens_per_s", tokens_per_s), **extra)

    def eval(self, step: int, val_loss: Optional[float], **extra: Any) -> Dict[str, Any]:
        """A validation result after ``step``."""
        return self.write("eval", step=_opt_int("step", step), val_loss=_opt_float("val_loss", val_loss), **extra)

    def moe_tokens(self, step: int, layer: int, counts: Sequence[int], **extra: Any) -> Dict[str, Any]:
        """Tokens routed to each expert of MoE layer ``layer`` in ``step``."""
        if hasattr(counts, "asnumpy"):
            counts = counts.asnumpy()
        if hasattr(counts, "tolist"):
            counts = counts.tolist()
        counts = [_opt_int(f"counts[{i}]", c) for i, c in enumerate(counts)]
        return self.write("moe_tokens", step=_opt_int("step", step), layer=_opt_int("layer", layer),
                          counts=counts, **extra)

    def checkpoint(self, step: int, path: Union[str, os.PathLike], **extra: Any) -> Dict[str, Any]:
        """A checkpoint written after ``step`` at ``path``."""
        return self.write("checkpoint", step=_opt_int("step", step), path=os.fspath(path), **extra)

    def run_end(self, status: str, error: Union[None, str, BaseException] = None, **extra: Any) -> Dict[str, Any]:
        """The last event of a run (also written when the run fails or is stopped)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {list(RUN_STATUSES)}, got {status!r}")
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        elif error is not None:
            error = str(error)
        return self.write("run_end", status=status, error=error, **extra)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass


def _event_paths(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files = sorted(path.glob("rank_*.jsonl"))
    if not files and (path / "events").is_dir():
        files = sorted((path / "events").glob("rank_*.jsonl"))

    def rank_of(p: Path) -> int:
        try:
            return int(p.stem.split("_", 1)[1])
        except ValueError:
            return 1 << 30
    return sorted(files, key=lambda p: (rank_of(p), p.name))


def read_events(path_or_dir: Union[str, os.PathLike], kind: Union[None, str, Iterable[str]] = None,
                rank: Optional[int] = None) -> List[Dict[str, Any]]:
    """Read events from a file, an ``events/`` directory or a run's output directory.

    Tolerant by design: a missing path gives ``[]``; unreadable lines (a half-written last line,
    or a partial line left by a killed earlier run) are skipped.

    Args:
        path_or_dir: A ``rank_<r>.jsonl`` file, a directory holding such files, or an output
            directory holding ``events/``.
        kind: Keep only this kind (or these kinds).
        rank: Keep only this rank's events.

    Returns:
        The events in file order, files ordered by rank.
    """
    kinds = None
    if kind is not None:
        kinds = {kind} if isinstance(kind, str) else set(kind)
    events: List[Dict[str, Any]] = []
    for file in _event_paths(Path(path_or_dir)):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            try:
                event = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if not isinstance(event, dict) or "kind" not in event:
                continue
            if kinds is not None and event["kind"] not in kinds:
                continue
            if rank is not None and event.get("rank") != rank:
                continue
            events.append(event)
    return events


def _format_lr(lr: float) -> str:
    """``1.0e-03`` style: up to 6 significant digits, at least one decimal, 2-digit exponent."""
    text = f"{lr:.5e}"
    if "e" not in text:  # nan / inf
        return text
    mantissa, exponent = text.split("e")
    mantissa = mantissa.rstrip("0")
    if mantissa.endswith("."):
        mantissa += "0"
    return f"{mantissa}e{exponent}"


def format_log_line(epoch: int, step: int, loss: Optional[float], time_ms: float, *,
                    finite_grads: Optional[bool] = None, loss_scale: Optional[float] = None,
                    learning_rate: Optional[float] = None, grad_norm: Optional[float] = None) -> str:
    """The guide's log line.

    ``Epoch: 0, Step: 13, Loss: 12.0177145004272461, Finite_grads: True, Loss_scale: 65536.0,
    Learning_rate: 1.0e-03, Grad_norm: 0.123, Time: 15742.81 ms``

    Epoch, Step and Loss come first (Loss with 16 decimals; ``None`` when this rank has no loss),
    Time last (2 decimals, in ms); the optional fields between them are left out when ``None``.
    """
    parts = [f"Epoch: {int(epoch)}", f"Step: {int(step)}",
             f"Loss: {'None' if loss is None else format(float(loss), '.16f')}"]
    if finite_grads is not None:
        parts.append(f"Finite_grads: {bool(finite_grads)}")
    if loss_scale is not None:
        parts.append(f"Loss_scale: {float(loss_scale)}")
    if learning_rate is not None:
        parts.append(f"Learning_rate: {_format_lr(float(learning_rate))}")
    if grad_norm is not None:
        parts.append(f"Grad_norm: {float(grad_norm):.6g}")
    parts.append(f"Time: {float(time_ms):.2f} ms")
    return ", ".join(parts)
