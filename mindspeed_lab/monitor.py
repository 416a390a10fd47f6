"""Peak memory (RSS) of a job's workers, sampled from outside with psutil.

The workers are found by the job's tag (``MINDSPEED_JOB_TAG`` in their environment) and told
apart from msrun and its scheduler by msrun's own ``MS_ROLE=MS_WORKER``; their rank is msrun's
``RANK_ID`` (or ``MS_NODE_ID``). Once all workers are found only their pids are sampled, which costs
a few system calls per sample instead of a scan of every process.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Optional

import psutil

from .launcher import tagged_processes

__all__ = ["WorkerMemoryMonitor"]


def _rank_of(environ: Dict[str, str], fallback: int) -> int:
    for key in ("RANK_ID", "MS_NODE_ID"):
        value = environ.get(key)
        if value is not None and value.isdigit():
            return int(value)
    return fallback


class WorkerMemoryMonitor:
    """Samples the resident memory of a job's workers from a daemon thread.

    Args:
        job: A started (or about to start) :class:`~mindspeed_lab.launcher.Job`: its ``tag``,
            ``workers`` and ``done`` are used.
        interval_s: Time between samples.

    Attributes:
        peak_rss: ``{rank: bytes}``, the largest RSS seen per worker.
        samples: Number of samples taken.

    Use as a context manager, or :meth:`start` / :meth:`stop`; the thread also ends when the job does.
    """

    def __init__(self, job, interval_s: float = 0.25):
        if not interval_s > 0:
            raise ValueError(f"interval_s: got {interval_s!r}; allowed: a number > 0")
        self.job = job
        self.interval_s = float(interval_s)
        self.peak_rss: Dict[int, int] = {}
        self.samples = 0
        self._procs: Dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_scan = 0.0

    def _discover(self) -> None:
        expected = int(getattr(self.job, "workers", 0) or 0)
        if expected and len(self._procs) >= expected:
            return
        now = time.monotonic()
        if now - self._last_scan < 1.0:  # a scan reads every process's environment: not too often
            return
        self._last_scan = now
        for proc in tagged_processes(self.job.tag):
            try:
                environ = proc.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if environ.get("MS_ROLE") != "MS_WORKER":
                continue
            rank = _rank_of(environ, len(self._procs))
            self._procs.setdefault(rank, proc)

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        self._discover()
        for rank, proc in list(self._procs.items()):
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if rss > self.peak_rss.get(rank, 0):
                self.peak_rss[rank] = rss
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            if getattr(self.job, "done", False):
                break
            self._stop.wait(self.interval_s)

    def start(self) -> "WorkerMemoryMonitor":
        """Start sampling in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="mindspeed-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def peak_rss_bytes(self) -> Optional[int]:
        """The largest per-worker peak (what one rank needed), or None before any sample."""
        return max(self.peak_rss.values()) if self.peak_rss else None

    def __enter__(self) -> "WorkerMemoryMonitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
