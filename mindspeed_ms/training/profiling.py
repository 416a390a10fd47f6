"""MindSpore's profiler driven by TrainingConfig's ``profile*`` options, and its top-operator table.

The training loop calls :func:`start_profiler` before step ``profile_step_start`` and
:func:`stop_profiler` after step ``profile_step_end`` (``Trainer.run``). Each rank writes to
``<profile_save_path>/rank_<global rank>/`` (``profile_save_path`` defaults to
``<output_dir>/profile``); MindSpore puts one ``<host>_<pid>_<time>_ascend_ms`` directory there
per profiled run (the suffix is MindSpore's, also on CPU).

What the CPU backend records (MindSpore 2.10): the host operators with their durations, those run
inside ``ms.jit`` graphs included (``FRAMEWORK/cpu_op_type_info_0.csv``: per operator type;
``cpu_op_detail_info_0.csv``: per operator; ``cpu_op_execute_timestamp_0.txt``: every launch) and
a Chrome trace (``ASCEND_PROFILER_OUTPUT/trace_view.json``, open it in chrome://tracing or
Perfetto). :func:`top_operators` turns a run into a table.

Options and where they apply:

====================================  =====================================================
option                                effect
====================================  =====================================================
profile, profile_step_start/_end      which steps are recorded (all devices)
profile_save_path                     output directory (all devices)
profile_op_time                       operator timing (always on: it is what the CPU records)
profile_with_stack                    Python call stacks of framework operators (all devices)
profile_offline_analyse               skip the analysis at stop (run it later: MindSpore's
                                      ``mindspore.profiler.profiler.analyse(path)``)
profile_data_simplification           drop intermediate files after analysis (all devices)
profile_level                         Ascend only: level0/1/2 add CANN layers
profile_memory                        Ascend only: tensor memory
profile_communication                 Ascend only: HCCL operators
profile_parallel_strategy             Ascend only (graph mode)
profile_aicore_metrics                Ascend only: AI Core metrics
profile_l2_cache, profile_hbm_ddr,    Ascend only: hardware counters
profile_pcie
profile_framework                     Ascend only: host CPU/memory sampling
profile_data_process                  MindSpore dataset pipelines (this project feeds Python
                                      iterables: nothing to record)
profile_dynamic_profiler_config_path  not supported (MindSpore's DynamicProfilerMonitor)
====================================  =====================================================

Options that do not apply to the device are reported once in the log and otherwise ignored.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ASCEND_ONLY_OPTIONS", "profiler_options", "start_profiler", "stop_profiler", "profile_runs",
           "top_operators"]

# TrainingConfig options that only the Ascend backend records, with the value that means "off"
ASCEND_ONLY_OPTIONS = {
    "profile_memory": False,
    "profile_communication": False,
    "profile_parallel_strategy": False,
    "profile_aicore_metrics": 0,
    "profile_l2_cache": False,
    "profile_hbm_ddr": False,
    "profile_pcie": False,
    "profile_framework": None,
}

_LEVELS = {"level0": "Level0", "level1": "Level1", "level2": "Level2"}


def _logger() -> logging.Logger:
    return logging.getLogger("mindspeed_ms")


def _device_target() -> str:
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    try:
        return str(ms.get_context("device_target"))
    except Exception:  # pylint: disable=broad-except  # pragma: no cover
        return "CPU"


def _rank() -> int:
    from mindspeed_ms.core import communication as comm  # pylint: disable=import-outside-toplevel

    return int(comm.get_rank())


def profiler_options(training_config, device_target: Optional[str] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The profiler's keyword arguments for this device, and the options it ignores here.

    Args:
        training_config: A TrainingConfig (or any object with the ``profile*`` attributes).
        device_target: 'CPU', 'Ascend' or 'GPU' (default: MindSpore's context).

    Returns:
        ``(kwargs, ignored)``: keyword arguments for ``mindspore.profiler.profile`` (without the
        trace handler), and the names of set options that do not apply to this device.
    """
    from mindspore.profiler import ProfilerActivity, ProfilerLevel  # pylint: disable=import-outside-toplevel
    from mindspore.profiler.experimental_config import _ExperimentalConfig  # pylint: disable=import-outside-toplevel

    device = device_target or _device_target()
    ascend = device == "Ascend"
    activities = [ProfilerActivity.CPU]
    if ascend:
        activities.append(ProfilerActivity.NPU)
    elif device == "GPU":
        activities.append(ProfilerActivity.GPU)
    ignored = []
    for name, off in ASCEND_ONLY_OPTIONS.items():
        value = getattr(training_config, name)  # the names of the table above
        if value not in (off, None, False, 0, -1) and not ascend:
            ignored.append(name)
    level = _LEVELS.get(str(training_config.profile_level).lower(), "Level0")
    if level != "Level0" and not ascend:
        ignored.append("profile_level")
    if training_config.profile_dynamic_profiler_config_path:
        ignored.append("profile_dynamic_profiler_config_path")
    experimental: Dict[str, Any] = {
        "profiler_level": getattr(ProfilerLevel, level) if ascend else ProfilerLevel.Level0,
        "data_simplification": bool(training_config.profile_data_simplification),
    }
    if ascend:
        from mindspore.profiler import AicoreMetrics  # pylint: disable=import-outside-toplevel

        metrics = int(training_config.profile_aicore_metrics)
        names = ["AiCoreNone", "PipeUtilization", "ArithmeticUtilization", "Memory", "MemoryL0",
                 "ResourceConflictRatio"]
        if 0 < metrics < len(names):
            experimental["aic_metrics"] = getattr(AicoreMetrics, names[metrics])
        experimental["l2_cache"] = bool(training_config.profile_l2_cache)
    kwargs = {
        "activities": activities,
        "with_stack": bool(training_config.profile_with_stack),
        "profile_memory": bool(training_config.profile_memory) and ascend,
        "parallel_strategy": bool(training_config.profile_parallel_strategy) and ascend,
        "hbm_ddr": bool(training_config.profile_hbm_ddr) and ascend,
        "pcie": bool(training_config.profile_pcie) and ascend,
        "data_process": bool(training_config.profile_data_process),
        "experimental_config": _ExperimentalConfig(**experimental),
    }
    return kwargs, ignored


def _rank_dir(path: str) -> str:
    return os.path.join(str(path), f"rank_{_rank()}")


def start_profiler(training_config, path: str):
    """Start recording; returns the profiler object for :func:`stop_profiler`.

    Args:
        training_config: TrainingConfig with the ``profile*`` options.
        path: The profile directory (``profile_save_path``); this rank writes under
            ``<path>/rank_<global rank>``.
    """
    from mindspore.profiler import profile, tensorboard_trace_handler  # pylint: disable=import-outside-toplevel

    kwargs, ignored = profiler_options(training_config)
    if ignored:
        _logger().info("profiling on %s: %s ignored (Ascend-only or unsupported, see "
                       "mindspeed_ms.training.profiling)", _device_target(), ", ".join(sorted(ignored)))
    out = _rank_dir(path)
    os.makedirs(out, exist_ok=True)
    analyse = not bool(training_config.profile_offline_analyse)
    profiler = profile(start_profile=False, on_trace_ready=tensorboard_trace_handler(dir_name=out,
                                                                                     analyse_flag=analyse),
                       **kwargs)
    profiler.start()
    _logger().info("profiler started, writing to %s", out)
    return profiler


def stop_profiler(profiler, path: str) -> None:
    """Stop recording and write (and, unless offline analysis is asked for, analyse) the data."""
    profiler.stop()
    _logger().info("profiler stopped; data in %s", _rank_dir(path))


def profile_runs(path: str) -> List[str]:
    """The profiled-run directories under ``path`` (any depth), oldest first."""
    found = set()
    for pattern in ("*_ascend_ms", "*/*_ascend_ms", "*/*/*_ascend_ms"):
        found.update(p for p in glob.glob(os.path.join(str(path), pattern)) if os.path.isdir(p))
    return sorted(found, key=os.path.getmtime)


def _read_csv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def top_operators(path: str, n: int = 20, run: Optional[str] = None):
    """The operators that took the most time in a profiled run, as a pandas DataFrame.

    Args:
        path: A profile directory (``profile_save_path``, a rank's directory, or one run's
            ``*_ascend_ms`` directory).
        n: Rows to return (the slowest operator types first).
        run: A specific run directory (default: the newest run under ``path``).

    Returns:
        Columns ``op_type``, ``calls``, ``total_ms``, ``avg_ms``, ``percent`` (of the recorded
        operator time), ``device`` ('CPU' for host operators, 'NPU' for Ascend kernels).

    Raises:
        FileNotFoundError: no profiled run, or a run without operator statistics (for example
            one stopped with ``profile_offline_analyse`` and not analysed yet).
    """
    import pandas as pd  # pylint: disable=import-outside-toplevel

    if run is None:
        runs = [str(path)] if str(path).endswith("_ascend_ms") else profile_runs(path)
        if not runs:
            raise FileNotFoundError(f"no profiled run (a *_ascend_ms directory) under {path}")
        run = runs[-1]
    rows: List[Dict[str, Any]] = []
    for name in sorted(glob.glob(os.path.join(run, "ASCEND_PROFILER_OUTPUT", "op_statistic*.csv"))):
        for rec in _read_csv(name):  # Ascend kernels (times in microseconds)
            rows.append({"op_type": rec.get("OP Type", ""), "calls": _number(rec.get("Count")),
                         "total_ms": _number(rec.get("Total Time(us)")) / 1000.0, "device": "NPU"})
    for name in sorted(glob.glob(os.path.join(run, "FRAMEWORK", "cpu_op_type_info_*.csv"))):
        for rec in _read_csv(name):
            rows.append({"op_type": rec.get("op_type", ""), "calls": _number(rec.get("type_occurrences")),
                         "total_ms": _number(rec.get("total_compute_time")), "device": "CPU"})
    if not rows:
        raise FileNotFoundError(f"{run} holds no operator statistics (not analysed yet?)")
    frame = pd.DataFrame(rows).groupby(["op_type", "device"], as_index=False)[["calls", "total_ms"]].sum()
    frame["calls"] = frame["calls"].astype(int)
    frame["avg_ms"] = frame["total_ms"] / frame["calls"].clip(lower=1)
    total = float(frame["total_ms"].sum())
    frame["percent"] = 100.0 * frame["total_ms"] / total if total > 0 else 0.0
    frame = frame.sort_values("total_ms", ascending=False).head(int(n)).reset_index(drop=True)
    return frame[["op_type", "calls", "total_ms", "avg_ms", "percent", "device"]]
