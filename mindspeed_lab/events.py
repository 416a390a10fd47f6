"""Read a run's event stream into pandas DataFrames while it is being written.

Every rank of a run appends JSON lines to ``<output_dir>/events/rank_<r>.jsonl`` (see
docs/architecture.md, "The event stream"). :class:`EventReader` follows those files
incrementally: it remembers how far it read each file, reads only complete lines (a half-written
last line is left for the next :meth:`EventReader.poll`), picks up files that appear later, and
skips lines that are not valid JSON objects (counted in :attr:`EventReader.bad_lines`)::

    reader = EventReader(job.events_dir)
    reader.poll()
    reader.steps          # one row per step per rank
    step_summary(reader.steps)   # one row per step

Kinds and their frames: ``step`` -> :attr:`~EventReader.steps`, ``eval`` -> :attr:`~EventReader.evals`,
``moe_tokens`` -> :attr:`~EventReader.moe_tokens` (long format: one row per rank, step, layer,
expert), ``checkpoint`` -> :attr:`~EventReader.checkpoints`, ``run_start``/``run_end`` ->
:attr:`~EventReader.run_starts`/:attr:`~EventReader.run_ends` and :meth:`EventReader.run_info`.
Other kinds are kept in :attr:`~EventReader.other`. Fields beyond the documented ones become extra
columns. Values the writer had to store as null because JSON has no NaN/infinity (listed in the
record's ``nonfinite`` field, see :mod:`mindspeed_ms.training.events`) are restored.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy as np
import pandas as pd

__all__ = [
    "EventReader",
    "STEP_COLUMNS",
    "EVAL_COLUMNS",
    "MOE_COLUMNS",
    "CHECKPOINT_COLUMNS",
    "find_events_dir",
    "read_events",
    "step_summary",
    "eval_summary",
    "moe_pivot",
    "moe_layer_matrix",
    "hot_experts",
    "moe_imbalance",
]

STEP_COLUMNS = ["rank", "epoch", "step", "time", "loss", "lr", "grad_norm", "loss_scale", "scale_window",
                "overflow", "step_time_ms", "tokens_per_s"]
EVAL_COLUMNS = ["rank", "step", "time", "val_loss"]
MOE_COLUMNS = ["rank", "step", "layer", "expert", "tokens", "time"]
CHECKPOINT_COLUMNS = ["rank", "step", "time", "path"]
RUN_START_COLUMNS = ["rank", "time", "world_size", "parallel", "config"]
RUN_END_COLUMNS = ["rank", "time", "status", "error"]

_RANK_FILE = re.compile(r"rank_(\d+)\.jsonl")
_FLOAT_COLUMNS = ("loss", "lr", "grad_norm", "loss_scale", "step_time_ms", "tokens_per_s", "val_loss", "time")


def find_events_dir(path: Union[str, os.PathLike]) -> Path:
    """The events directory for a run directory, an output directory or an events directory.

    Tries ``path``, ``path/events`` and ``path/output/events``, in that order, and returns the
    first that holds ``rank_*.jsonl`` files (or ``path/output/events`` / ``path/events`` when
    none has files yet, the first that exists, else ``path`` itself).
    """
    path = Path(path)
    candidates = [path, path / "events", path / "output" / "events"]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob("rank_*.jsonl")):
            return cand
    for cand in candidates[::-1]:
        if cand.is_dir():
            return cand
    return path


class _FileCursor:
    __slots__ = ("path", "rank", "offset", "inode", "records")

    def __init__(self, path: Path, rank: int):
        self.path = path
        self.rank = rank
        self.offset = 0
        self.inode: Optional[int] = None
        self.records: List[Dict[str, Any]] = []


class EventReader:
    """Incremental reader of ``events/rank_*.jsonl``.

    Args:
        events_dir: The events directory; a run directory or output directory also works
            (see :func:`find_events_dir`). It may not exist yet.
        chunk_bytes: Largest amount read from one file per :meth:`poll` (keeps a poll short
            on huge files; the rest is read by the next polls).

    The DataFrame properties are rebuilt only when new records arrived. Thread-safe: a
    dashboard thread may poll while another thread reads the frames.
    """

    def __init__(self, events_dir: Union[str, os.PathLike], chunk_bytes: int = 64 << 20):
        self._root = Path(events_dir)
        self.chunk_bytes = int(chunk_bytes)
        self._cursors: Dict[Path, _FileCursor] = {}
        self._lock = threading.RLock()
        self._cache: Dict[str, pd.DataFrame] = {}
        self._version = 0
        self._cache_version = -1
        #: Complete lines that were not JSON objects (skipped).
        self.bad_lines = 0
        self._kind_counts: Dict[Any, int] = {}
        self._resets = 0

    @property
    def events_dir(self) -> Path:
        """The directory that is read (resolved lazily: it may appear after the reader)."""
        return find_events_dir(self._root)

    def poll(self) -> int:
        """Read what was appended since the last poll.

        Returns:
            The number of new records.
        """
        new = 0
        with self._lock:
            directory = self.events_dir
            try:
                paths = sorted(directory.glob("rank_*.jsonl"))
            except OSError:
                paths = []
            for path in paths:
                match = _RANK_FILE.fullmatch(path.name)
                if not match:
                    continue
                cursor = self._cursors.get(path)
                if cursor is None:
                    cursor = self._cursors[path] = _FileCursor(path, int(match.group(1)))
                new += self._read(cursor)
            if new:
                self._version += 1
        return new

    def _read(self, cursor: _FileCursor) -> int:
        try:
            stat = cursor.path.stat()
        except OSError:
            return 0
        if cursor.inode is not None and (stat.st_ino != cursor.inode or stat.st_size < cursor.offset):
            # The file was replaced or truncated (the stream is append-only, so this means a
            # new run in the same place): start over for this rank.
            cursor.offset = 0
            for rec in cursor.records:
                self._kind_counts[rec.get("kind")] -= 1
            cursor.records = []
            self._version += 1
            self._resets += 1
        cursor.inode = stat.st_ino
        if stat.st_size <= cursor.offset:
            return 0
        try:
            with open(cursor.path, "rb") as f:
                f.seek(cursor.offset)
                data = f.read(min(stat.st_size - cursor.offset, self.chunk_bytes))
        except OSError:
            return 0
        end = data.rfind(b"\n")
        if end < 0:
            return 0  # only a partial line so far
        complete = data[: end + 1]
        cursor.offset += len(complete)
        count = 0
        for raw in complete.split(b"\n"):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                self.bad_lines += 1
                continue
            if not isinstance(record, dict) or "kind" not in record:
                self.bad_lines += 1
                continue
            record.setdefault("rank", cursor.rank)
            if isinstance(record.get("nonfinite"), dict):
                _restore_nonfinite(record)
            cursor.records.append(record)
            kind = record.get("kind")
            self._kind_counts[kind] = self._kind_counts.get(kind, 0) + 1
            count += 1
        return count

    def counts(self) -> Dict[str, int]:
        """Number of records read so far, by kind (a cheap way to see what changed)."""
        with self._lock:
            return {k: v for k, v in self._kind_counts.items() if v}

    def change_key(self, kinds: Optional[Iterable[str]] = None) -> tuple:
        """A value that changes whenever records of ``kinds`` (default: any) were added or a file was reset."""
        with self._lock:
            if kinds is None:
                return (self._version,)
            return (self._resets,) + tuple(self._kind_counts.get(k, 0) for k in kinds)

    # -- frames ---------------------------------------------------------------------------------
    def records(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        """All records read so far (of one kind), in file order per rank, ranks in order."""
        with self._lock:
            out = []
            for cursor in sorted(self._cursors.values(), key=lambda c: c.rank):
                out.extend(r for r in cursor.records if kind is None or r.get("kind") == kind)
            return out

    def _frames(self) -> Dict[str, pd.DataFrame]:
        with self._lock:
            if self._cache_version == self._version:
                return self._cache
            by_kind: Dict[str, List[Dict[str, Any]]] = {}
            for rec in self.records():
                by_kind.setdefault(rec.get("kind"), []).append(rec)
            cache = {
                "steps": _frame(by_kind.get("step", []), STEP_COLUMNS, sort=["step", "rank"]),
                "evals": _frame(by_kind.get("eval", []), EVAL_COLUMNS, sort=["step", "rank"]),
                "checkpoints": _frame(by_kind.get("checkpoint", []), CHECKPOINT_COLUMNS, sort=["step", "rank"]),
                "run_starts": _frame(by_kind.get("run_start", []), RUN_START_COLUMNS, sort=["rank"]),
                "run_ends": _frame(by_kind.get("run_end", []), RUN_END_COLUMNS, sort=["rank"]),
                "moe_tokens": _moe_frame(by_kind.get("moe_tokens", [])),
            }
            known = {"step", "eval", "checkpoint", "run_start", "run_end", "moe_tokens"}
            other = [r for k, rs in by_kind.items() if k not in known for r in rs]
            cache["other"] = pd.DataFrame(other) if other else pd.DataFrame(columns=["kind", "rank", "time"])
            self._cache = cache
            self._cache_version = self._version
            return cache

    def step_summary(self) -> pd.DataFrame:
        """:func:`step_summary` of :attr:`steps`, computed once per change of the records."""
        with self._lock:
            frames = self._frames()
            if "step_summary" not in frames:
                frames["step_summary"] = step_summary(frames["steps"])
            return frames["step_summary"]

    @property
    def steps(self) -> pd.DataFrame:
        """One row per step per rank: :data:`STEP_COLUMNS` plus any extra fields."""
        return self._frames()["steps"]

    @property
    def evals(self) -> pd.DataFrame:
        """One row per evaluation per rank: :data:`EVAL_COLUMNS` plus extras."""
        return self._frames()["evals"]

    @property
    def moe_tokens(self) -> pd.DataFrame:
        """MoE routing counts in long format: one row per (rank, step, layer, expert)."""
        return self._frames()["moe_tokens"]

    @property
    def checkpoints(self) -> pd.DataFrame:
        """One row per saved checkpoint per rank."""
        return self._frames()["checkpoints"]

    @property
    def run_starts(self) -> pd.DataFrame:
        """The ``run_start`` records (one per rank)."""
        return self._frames()["run_starts"]

    @property
    def run_ends(self) -> pd.DataFrame:
        """The ``run_end`` records (one per rank that finished)."""
        return self._frames()["run_ends"]

    @property
    def other(self) -> pd.DataFrame:
        """Records of kinds this reader does not know."""
        return self._frames()["other"]

    @property
    def ranks(self) -> List[int]:
        """Ranks whose event file exists."""
        with self._lock:
            return sorted(c.rank for c in self._cursors.values())

    def run_info(self) -> Dict[str, Any]:
        """What the run_start/run_end records say about the run.

        Returns:
            A dict with ``world_size``, ``parallel``, ``config`` (from the lowest rank's
            run_start), ``start_time``, ``end_time`` (last run_end), ``ranks_started``,
            ``ranks_ended``, ``errors`` (``{rank: error}``) and ``status``: 'not started',
            'running' (not every started rank ended), or 'failed' / 'stopped' / 'success'
            (the worst over ranks).
        """
        starts = self.records("run_start")
        ends = self.records("run_end")
        first = min(starts, key=lambda r: r.get("rank", 0)) if starts else {}
        world = first.get("world_size")
        started = sorted({r.get("rank") for r in starts})
        ended = sorted({r.get("rank") for r in ends})
        statuses = {r.get("status") for r in ends}
        expected = world if isinstance(world, int) else len(started)
        if not starts and not ends:
            status = "not started"
        elif "failed" in statuses:
            status = "failed"
        elif "stopped" in statuses:
            status = "stopped"
        elif len(ended) < max(expected, len(started)):
            status = "running"
        else:
            status = "success"
        return {
            "world_size": world,
            "parallel": first.get("parallel"),
            "config": first.get("config"),
            "start_time": min((r.get("time") for r in starts if r.get("time") is not None), default=None),
            "end_time": max((r.get("time") for r in ends if r.get("time") is not None), default=None),
            "ranks_started": started,
            "ranks_ended": ended,
            "errors": {r.get("rank"): r.get("error") for r in ends if r.get("error")},
            "status": status,
        }


_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _restore_nonfinite(record: Dict[str, Any]) -> None:
    """Put back NaN/inf values the writer stored as null (listed under ``nonfinite``, dotted paths)."""
    for path, what in record["nonfinite"].items():
        value = _NONFINITE.get(what)
        if value is None or not isinstance(path, str):
            continue
        parts = path.split(".")
        target: Any = record
        try:
            for part in parts[:-1]:
                target = target[int(part)] if isinstance(target, list) else target[part]
            last = parts[-1]
            if isinstance(target, list):
                if target[int(last)] is None:
                    target[int(last)] = value
            elif isinstance(target, dict) and target.get(last) is None:
                target[last] = value
        except (KeyError, IndexError, ValueError, TypeError):
            continue


def _frame(records: List[Dict[str, Any]], columns: List[str], sort: List[str]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=_empty_dtype(c)) for c in columns})
    df = pd.DataFrame.from_records(records)
    df = df.drop(columns=[c for c in ("kind",) if c in df.columns])
    for col in columns:
        if col not in df.columns:
            df[col] = None
    extra = [c for c in df.columns if c not in columns]
    df = df[columns + extra]
    for col in _FLOAT_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in ("rank", "step", "epoch", "scale_window"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
            if df[col].notna().all():
                df[col] = df[col].astype("int64")
    if "overflow" in df.columns:
        df["overflow"] = df["overflow"].map(lambda v: bool(v) if v is not None and v == v else False).astype(bool)
    keys = [c for c in sort if c in df.columns]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def _empty_dtype(column: str) -> str:
    if column in _FLOAT_COLUMNS:
        return "float64"
    if column in ("rank", "step", "epoch", "scale_window", "world_size"):
        return "int64"
    if column == "overflow":
        return "bool"
    return "object"


def _moe_frame(records: List[Dict[str, Any]]) -> pd.DataFrame:
    rows = {c: [] for c in MOE_COLUMNS}
    for rec in records:
        counts = rec.get("counts")
        if not isinstance(counts, (list, tuple)):
            continue
        for expert, tokens in enumerate(counts):
            rows["rank"].append(rec.get("rank"))
            rows["step"].append(rec.get("step"))
            rows["layer"].append(rec.get("layer"))
            rows["expert"].append(expert)
            rows["tokens"].append(tokens)
            rows["time"].append(rec.get("time"))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame({"rank": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                             "layer": pd.Series(dtype="int64"), "expert": pd.Series(dtype="int64"),
                             "tokens": pd.Series(dtype="float64"), "time": pd.Series(dtype="float64")})
    for col in ("rank", "step", "layer", "expert"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("int64")
    df["tokens"] = pd.to_numeric(df["tokens"], errors="coerce").astype("float64")
    df["time"] = pd.to_numeric(df["time"], errors="coerce").astype("float64")
    return df.sort_values(["step", "layer", "rank", "expert"], kind="stable").reset_index(drop=True)


def read_events(path: Union[str, os.PathLike]) -> EventReader:
    """Read everything that is there now: an :class:`EventReader` after one :meth:`~EventReader.poll`."""
    reader = EventReader(path)
    reader.poll()
    return reader


# ------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------

def step_summary(steps: pd.DataFrame) -> pd.DataFrame:
    """One row per step from the per-rank step frame.

    * ``loss``: mean over the ranks that report one (non-last pipeline stages report null).
    * ``lr``, ``loss_scale``, ``scale_window``, ``tokens_per_s``, ``epoch``, ``time``: the value of
      the lowest rank that reports it (rank 0 is what Megatron-style logs print).
    * ``grad_norm``: the lowest rank's non-null value.
    * ``overflow``: True if any rank overflowed (the step was skipped).
    * ``step_time_ms``: the slowest rank.
    * ``ranks``: how many ranks reported the step.

    Returns:
        A frame indexed 0..n-1 with a ``step`` column, sorted by step.
    """
    cols = ["step", "epoch", "time", "loss", "lr", "grad_norm", "loss_scale", "scale_window", "overflow",
            "step_time_ms", "tokens_per_s", "ranks"]
    if steps.empty:
        return pd.DataFrame({c: pd.Series(dtype="bool" if c == "overflow" else "float64") for c in cols})
    df = steps.sort_values(["step", "rank"], kind="stable")
    grouped = df.groupby("step", sort=True)
    first = grouped.first()  # first non-null per column, ranks in order
    # the group keys from the aggregate's index: ``grouped.groups`` builds one index per step,
    # which is most of this function's time on a long run (it is called on every redraw)
    out = pd.DataFrame({"step": first.index.to_numpy()})
    out["epoch"] = first["epoch"].to_numpy() if "epoch" in first else np.nan
    out["time"] = first["time"].to_numpy()
    out["loss"] = grouped["loss"].mean().to_numpy()
    for col in ("lr", "grad_norm", "loss_scale", "scale_window", "tokens_per_s"):
        out[col] = pd.to_numeric(first[col], errors="coerce").to_numpy(dtype="float64")
    out["overflow"] = grouped["overflow"].any().to_numpy().astype(bool)
    out["step_time_ms"] = grouped["step_time_ms"].max().to_numpy()
    out["ranks"] = grouped["rank"].nunique().to_numpy()
    return out


def eval_summary(evals: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation step: the mean ``val_loss`` over ranks."""
    if evals.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "val_loss": pd.Series(dtype="float64")})
    out = evals.groupby("step", sort=True)["val_loss"].mean().reset_index()
    return out


def moe_pivot(moe: pd.DataFrame, agg: str = "auto", ranks: Optional[List[int]] = None) -> pd.DataFrame:
    """Token counts as a (layer, expert) x step table.

    Args:
        moe: The long frame (:attr:`EventReader.moe_tokens`).
        agg: How ranks are combined: 'sum' (each rank reported the tokens it routed itself, so
            the sum is the global count), 'mean', or 'auto' (the default): per layer and step,
            one copy when every reporting rank wrote the same counts (the engine all-reduces the
            counts before writing them, so every rank holds the global count), else the sum.
        ranks: Only these ranks (default: all).

    Returns:
        A frame with a (layer, expert) MultiIndex and one column per step;
        ``moe_pivot(df).loc[layer]`` is that layer's experts x steps matrix.

    Raises:
        ValueError: For an unknown ``agg``.
    """
    if agg not in ("auto", "sum", "mean"):
        raise ValueError(f"agg: got {agg!r}; allowed: 'auto', 'sum' or 'mean'")
    if ranks is not None:
        moe = moe[moe["rank"].isin(list(ranks))]
    if moe.empty:
        index = pd.MultiIndex.from_arrays([[], []], names=["layer", "expert"])
        return pd.DataFrame(index=index, dtype="float64")
    if agg != "auto":
        table = moe.pivot_table(index=["layer", "expert"], columns="step", values="tokens", aggfunc=agg,
                                fill_value=0)
    else:
        wide = moe.pivot_table(index=["layer", "step", "rank"], columns="expert", values="tokens", aggfunc="sum",
                               fill_value=0)
        groups = wide.groupby(level=["layer", "step"], sort=True)
        top, bottom, total = groups.max(), groups.min(), groups.sum()
        same = (top.to_numpy() == bottom.to_numpy()).all(axis=1)
        chosen = pd.DataFrame(np.where(same[:, None], top.to_numpy(), total.to_numpy()), index=total.index,
                              columns=total.columns)
        table = chosen.stack().unstack("step", fill_value=0).reorder_levels(["layer", "expert"])
    table.columns.name = "step"
    return table.astype("float64").sort_index()


def moe_layer_matrix(moe: pd.DataFrame, layer: int, agg: str = "auto") -> pd.DataFrame:
    """One layer's experts x steps token matrix (rows: experts, columns: steps).

    Raises:
        KeyError: When the layer has no records.
    """
    table = moe_pivot(moe, agg=agg)
    layers = sorted(set(table.index.get_level_values("layer"))) if len(table) else []
    if layer not in layers:
        raise KeyError(f"layer {layer!r} has no moe_tokens records; layers present: {layers}")
    return table.loc[layer]


def hot_experts(moe: pd.DataFrame, hot_expert_num: int = 1, step: Optional[int] = None,
                agg: str = "auto") -> Dict[int, List[int]]:
    """The ``hot_expert_num`` experts with the most tokens at ``step`` (default: the last step), per layer.

    Ties are broken by the lower expert index.

    Raises:
        ValueError: When ``hot_expert_num`` is not a positive integer.
    """
    if isinstance(hot_expert_num, bool) or not isinstance(hot_expert_num, int) or hot_expert_num < 1:
        raise ValueError(f"hot_expert_num must be an integer >= 1, got {hot_expert_num!r}")
    table = moe_pivot(moe, agg=agg)
    out: Dict[int, List[int]] = {}
    if table.empty:
        return out
    for layer in sorted(set(table.index.get_level_values("layer"))):
        matrix = table.loc[layer]
        col = matrix.columns.max() if step is None else step
        if col not in matrix.columns:
            continue
        counts = matrix[col].to_numpy()
        order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        out[int(layer)] = [int(matrix.index[e]) for e in order[:hot_expert_num]]
    return out


def moe_imbalance(moe: pd.DataFrame, agg: str = "auto") -> pd.DataFrame:
    """Load imbalance per layer and step.

    Returns:
        Columns ``layer``, ``step``, ``tokens`` (total), ``max_over_mean`` (the busiest expert's
        load over the mean load; 1.0 is perfect balance) and ``cv`` (coefficient of variation:
        population standard deviation over mean). Layers/steps with no tokens give NaN.
    """
    table = moe_pivot(moe, agg=agg)
    cols = ["layer", "step", "tokens", "max_over_mean", "cv"]
    if table.empty:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("layer", "step") else "float64") for c in cols})
    rows = []
    for layer in sorted(set(table.index.get_level_values("layer"))):
        matrix = table.loc[layer].to_numpy(dtype="float64")  # experts x steps
        mean = matrix.mean(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(mean > 0, matrix.max(axis=0) / mean, np.nan)
            cv = np.where(mean > 0, matrix.std(axis=0) / mean, np.nan)
        for j, step in enumerate(table.columns):
            rows.append((int(layer), int(step), float(matrix[:, j].sum()), float(ratio[j]), float(cv[j])))
    return pd.DataFrame(rows, columns=cols)
