"""Worker side of the msrun test harness.

A multi-process test script defines cases (functions) and calls :func:`run_cases`. Each case runs
on every rank; its return value (JSON-serialisable) or its traceback goes to
``$MINDSPEED_TEST_RESULTS/rank_<r>.json``. Grouping many cases in one job keeps the suite fast:
starting an msrun job costs ~15 s on two cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, Optional

import numpy as np


def to_jsonable(value):
    """Convert numpy/MindSpore values to JSON types."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "asnumpy"):
        value = value.asnumpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot report a value of type {type(value)}")


def run_cases(cases: Dict[str, Callable[[], object]], setup: Optional[Callable[[], None]] = None,
              stop_on_failure: bool = True) -> None:
    """Run every case on this rank and write the report.

    Args:
        cases: ``{name: function}``; each function may return a JSON-serialisable value.
        setup: Called once after the worker is set up (e.g. ``initialize_model_parallel``).
        stop_on_failure: Stop after the first failing case: later collectives would otherwise
            pair up with the wrong calls on other ranks and hang.
    """
    from mindspeed_ms.runtime import setup_worker  # pylint: disable=import-outside-toplevel

    rank = setup_worker()
    report = {"rank": rank, "cases": {}}
    results_dir = os.environ.get("MINDSPEED_TEST_RESULTS", ".")
    path = os.path.join(results_dir, f"rank_{rank}.json")

    def flush():
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(tmp, path)

    if setup is not None:
        setup()
    for name, fn in cases.items():
        start = time.time()
        try:
            value = to_jsonable(fn())
            report["cases"][name] = {"ok": True, "value": value, "seconds": time.time() - start}
        except Exception:  # pylint: disable=broad-except
            report["cases"][name] = {"ok": False, "error": traceback.format_exc(), "seconds": time.time() - start}
            print(f"[rank {rank}] case {name} FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            flush()
            if stop_on_failure:
                sys.exit(1)
        flush()
        print(f"[rank {rank}] case {name} ok ({time.time() - start:.2f}s)", flush=True)
    flush()
