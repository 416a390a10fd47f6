"""Process-level helpers for scripts that msrun starts.

* :func:`setup_worker` sets the device and execution mode and initialises communication when the
  process was launched by msrun (single processes run as a world of one).
* :func:`start_owner_watchdog` ends the worker when the process that owns the job (a notebook
  kernel, a test) disappears, so that a crashed owner never leaves training processes behind.
  msrun starts workers in their own session, so killing the owner's process group does not reach
  them; this watchdog does.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

__all__ = ["OWNER_PID_ENV", "JOB_TAG_ENV", "setup_worker", "start_owner_watchdog"]

OWNER_PID_ENV = "MINDSPEED_OWNER_PID"
JOB_TAG_ENV = "MINDSPEED_JOB_TAG"

_watchdog_started = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_owner_watchdog(owner_pid: Optional[int] = None, interval_s: float = 1.0) -> bool:
    """Exit this process (status 143) as soon as ``owner_pid`` no longer exists.

    Args:
        owner_pid: The pid to watch; default: ``$MINDSPEED_OWNER_PID`` (nothing to do if unset).
        interval_s: Polling interval.

    Returns:
        Whether a watchdog is running.
    """
    global _watchdog_started  # pylint: disable=global-statement
    if owner_pid is None:
        value = os.environ.get(OWNER_PID_ENV, "").strip()
        if not value:
            return False
        owner_pid = int(value)
    if _watchdog_started:
        return True

    def watch():
        while True:
            if not _pid_alive(owner_pid):
                os._exit(143)  # pylint: disable=protected-access
            time.sleep(interval_s)

    threading.Thread(target=watch, name="owner-watchdog", daemon=True).start()
    _watchdog_started = True
    return True


def apply_deterministic(enabled: bool, logger=None) -> bool:
    """Switch on MindSpore's deterministic computation (``parallel_config.deterministic_mode``).

    ``mindspore.set_deterministic(True)`` (MindSpore 2.10; it sets the context's ``deterministic``
    to ``'ON'``): kernels give the same output for the same inputs on the same hardware, and
    reductions (communication included) run in a fixed order, at some cost in speed. MindSpore
    allows it to be set once per process, so a switch already on is left as it is; it cannot be
    switched off again once on. MindSpore advises setting it before
    ``mindspore.communication.init()`` (:func:`setup_worker` does) so that the global group's
    collectives are deterministic too; set later, a warning says so.

    Args:
        enabled: Whether deterministic computation is asked for (False changes nothing).
        logger: Where the warning goes (default: this module's logger).

    Returns:
        Whether deterministic computation is on after the call.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    if ms.get_context("deterministic") == "ON":
        return True
    if not enabled:
        return False
    from mindspeed_ms.core.communication.groups import is_initialized  # pylint: disable=import-outside-toplevel

    if is_initialized():
        (logger or logging.getLogger(__name__)).warning(
            "deterministic_mode is switched on after mindspore.communication.init(): collectives of the "
            "global group may not be deterministic (pass deterministic=True to setup_worker)")
    ms.set_deterministic(True)
    return True


def setup_worker(device_target: Optional[str] = None, mode: str = "pynative",
                 deterministic: bool = False) -> int:
    """Prepare a training or test worker.

    Sets the MindSpore device (default: ``$MINDSPEED_DEVICE_TARGET`` or CPU) and execution mode
    (on CPU PyNative runs synchronously, which is faster there; ``MINDSPEED_PYNATIVE_ASYNC=1``
    keeps the asynchronous launcher), starts the owner watchdog, and calls
    ``mindspore.communication.init()`` when launched by msrun.

    Args:
        device_target: 'CPU', 'Ascend' or 'GPU'.
        mode: 'pynative' or 'graph'.
        deterministic: Deterministic computation (:func:`apply_deterministic`), before the
            communication is initialised.

    Returns:
        The global rank of this process.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    from mindspeed_ms.core.communication import get_rank, init_distributed  # pylint: disable=import-outside-toplevel

    target = device_target or os.environ.get("MINDSPEED_DEVICE_TARGET", "CPU")
    allowed = ("CPU", "Ascend", "GPU")
    if target not in allowed:
        raise ValueError(f"device_target must be one of {allowed}, got {target!r}")
    modes = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}
    if mode not in modes:
        raise ValueError(f"mode must be one of {tuple(modes)}, got {mode!r}")
    ms.set_device(target)
    ms.set_context(mode=modes[mode])
    if target == "CPU" and os.environ.get("MINDSPEED_PYNATIVE_ASYNC", "0") != "1":
        # Measured on 2-core machines: PyNative's asynchronous launch threads compete with the
        # kernels for the cores, and synchronous execution runs a training step 2.5-3x faster.
        ms.set_context(pynative_synchronize=True)
    apply_deterministic(deterministic)
    start_owner_watchdog()
    init_distributed()
    return get_rank()
