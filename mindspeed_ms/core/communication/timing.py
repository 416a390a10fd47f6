"""An optional timer of the collectives: how much of a step is communication.

Off by default (one flag test per collective). When on, every collective of
:mod:`mindspeed_ms.core.communication` that really communicates (groups of more than one rank)
waits for the device before it starts and after it ends (``mindspore.runtime.synchronize``), so
that its wall time is the collective's alone and not the queued computation before it; the time
therefore includes waiting for the slowest peer. Timed runs are slightly slower than untimed ones
(the synchronisation prevents overlap), so compare the communication time with the step time of
the same timed run.

Turn it on with ``MINDSPEED_COMM_TIMER=1`` (read at import) or :func:`enable_comm_timer`; read
it with :func:`comm_timer_summary`, reset it with :func:`reset_comm_timer`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Dict, Iterator, Optional

__all__ = ["enable_comm_timer", "comm_timer_enabled", "reset_comm_timer", "comm_timer_summary", "timed"]

_LOCK = threading.Lock()
_ENABLED = os.environ.get("MINDSPEED_COMM_TIMER", "").strip().lower() in ("1", "on", "true", "yes")
_TOTALS: Dict[str, Dict[str, float]] = {}


def enable_comm_timer(enabled: bool = True) -> None:
    """Turn the timer on (or off)."""
    global _ENABLED  # pylint: disable=global-statement
    _ENABLED = bool(enabled)


def comm_timer_enabled() -> bool:
    """Whether collectives are being timed."""
    return _ENABLED


def reset_comm_timer() -> None:
    """Forget everything recorded so far."""
    with _LOCK:
        _TOTALS.clear()


def comm_timer_summary() -> Dict[str, Any]:
    """Seconds, calls and bytes per ``"<collective>/<group kind>"``, and the total seconds."""
    with _LOCK:
        per = {key: dict(value) for key, value in _TOTALS.items()}
    return {"total_s": sum(v["seconds"] for v in per.values()), "by_collective": per}


def _synchronize() -> None:
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms.runtime.synchronize()


def _nbytes(x) -> int:
    try:
        return int(x.nbytes)
    except (AttributeError, TypeError, RuntimeError):
        return 0


@contextlib.contextmanager
def timed(name: str, group, x=None) -> Iterator[None]:
    """Time the collective ``name`` on ``group`` (a no-op while the timer is off)."""
    if not _ENABLED:
        yield
        return
    _synchronize()
    start = time.perf_counter()
    try:
        yield
        _synchronize()
    finally:
        elapsed = time.perf_counter() - start
        key = f"{name}/{getattr(group, 'kind', 'group')}"
        with _LOCK:
            entry = _TOTALS.setdefault(key, {"seconds": 0.0, "calls": 0, "bytes": 0})
            entry["seconds"] += elapsed
            entry["calls"] += 1
            entry["bytes"] += _nbytes(x) if x is not None else 0


def timed_call(name: str, group, x, fn, *args) -> Optional[Any]:
    """``fn(*args)`` under :func:`timed` (the collectives' one-line form)."""
    if not _ENABLED:
        return fn(*args)
    with timed(name, group, x):
        out = fn(*args)
    return out
