"""Stops a job whose owner (a notebook kernel, a test) died without cleaning up.

Started by the launcher next to msrun, in a session of its own so that it survives the owner:
``python -m mindspeed_lab._guard OWNER_PID TAG MSRUN_PID [MSRUN_PID ...]``. Every half second it
checks the owner pid; when the owner is gone it terminates msrun's process groups and every
process whose environment carries ``MINDSPEED_JOB_TAG=TAG``, waits, and kills what is left. It
exits by itself once msrun has exited and no tagged process remains.

Why a process and not only the workers' owner watchdog: the workers exit on their own when the
owner disappears, but msrun's scheduler process blocks inside ``init()`` where a Python
watchdog thread cannot run; it used to linger ~30 s (until its heartbeat timeout) and msrun with it.

Only psutil is imported, so the guard starts in a fraction of a second.
"""

import os
import signal
import sys
import time

import psutil

TAG_ENV = "MINDSPEED_JOB_TAG"


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tagged(tag: str):
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_ENV) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _stop(tag: str, msrun_pids, grace_s: float = 3.0) -> None:
    for pid in msrun_pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    procs = _tagged(tag)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive + _tagged(tag):
        try:
            proc.kill()
        except psutil.Error:
            pass
    for pid in msrun_pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv) -> int:
    """Entry point; returns the exit status."""
    if len(argv) < 3:
        sys.stderr.write("usage: python -m mindspeed_lab._guard OWNER_PID TAG MSRUN_PID [MSRUN_PID ...]\n")
        return 2
    owner, tag, msrun_pids = int(argv[0]), argv[1], [int(a) for a in argv[2:]]
    last_scan = 0.0
    while True:
        if not _alive(owner):
            _stop(tag, msrun_pids)
            return 0
        if not any(_alive(pid) for pid in msrun_pids):
            now = time.monotonic()
            if now - last_scan > 2.0:
                last_scan = now
                if not _tagged(tag):
                    return 0
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
