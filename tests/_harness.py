"""Run a script under msrun with N CPU workers and collect what each rank reports.

Every job gets a free port, its own log directory and results directory, a timeout, and a unique
tag in its environment. Whatever happens (success, failure, timeout, an interrupted test), the
whole process tree is cleaned up by pid: msrun's own process group, then every process carrying
the job's tag (msrun starts workers in sessions of their own, so the group alone misses them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
JOB_TAG_ENV = "MINDSPEED_JOB_TAG"
OWNER_PID_ENV = "MINDSPEED_OWNER_PID"
RESULTS_ENV = "MINDSPEED_TEST_RESULTS"


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def msrun_executable() -> str:
    """msrun next to this interpreter (a notebook or test may not have the venv on PATH)."""
    candidate = Path(sys.executable).parent / "msrun"
    return str(candidate) if candidate.exists() else "msrun"


def tagged_processes(tag: str) -> List[psutil.Process]:
    """Processes whose environment carries ``MINDSPEED_JOB_TAG=tag``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(JOB_TAG_ENV) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_job(popen: Optional[subprocess.Popen], tag: str, grace_s: float = 5.0) -> None:
    """Terminate msrun's process group and every tagged process, then kill what remains."""
    if popen is not None and popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    procs = tagged_processes(tag)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    if popen is not None:
        if popen.poll() is None:
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        popen.wait(timeout=grace_s)


@dataclass
class MsrunResult:
    """What a finished job left behind."""

    returncode: Optional[int]
    timed_out: bool
    log_dir: Path
    results_dir: Path
    nprocs: int
    results: Dict[int, Any] = field(default_factory=dict)

    def log(self, rank: int) -> str:
        path = self.log_dir / f"worker_{rank}.log"
        return path.read_text(errors="replace") if path.exists() else f"<no log for rank {rank}>"

    def log_tails(self, lines: int = 60) -> str:
        parts = []
        for rank in range(self.nprocs):
            text = [ln for ln in self.log(rank).splitlines()
                    if not ln.startswith(("[WARNING]", "[INFO]"))]
            parts.append(f"----- worker {rank} (last {lines} lines) -----\n" + "\n".join(text[-lines:]))
        sched = self.log_dir / "scheduler.log"
        if sched.exists():
            text = [ln for ln in sched.read_text(errors="replace").splitlines() if "ERROR" in ln]
            if text:
                parts.append("----- scheduler errors -----\n" + "\n".join(text[-20:]))
        return "\n".join(parts)


def run_msrun(script: os.PathLike, nprocs: int, args: Sequence[str] = (), *, workdir: os.PathLike,
              timeout: float = 600, env: Optional[Dict[str, str]] = None,
              retries_on_port_clash: int = 3) -> MsrunResult:
    """Run ``script`` under msrun with ``nprocs`` CPU workers.

    Workers write their results to ``$MINDSPEED_TEST_RESULTS/rank_<r>.json`` (see
    ``tests/_worker.py``); they are returned by rank.

    Args:
        script: Path of the Python script.
        nprocs: Number of workers.
        args: Extra command-line arguments for the script.
        workdir: Directory for logs and results (a pytest tmp dir).
        timeout: Seconds before the whole job is killed.
        env: Extra environment variables.
        retries_on_port_clash: New ports to try when the scheduler cannot bind its port.

    Returns:
        The :class:`MsrunResult`.
    """
    workdir = Path(workdir)
    for attempt in range(retries_on_port_clash + 1):
        log_dir = workdir / f"msrun_logs_{attempt}"
        results_dir = workdir / f"results_{attempt}"
        results_dir.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env.update({
            JOB_TAG_ENV: tag,
            OWNER_PID_ENV: str(os.getpid()),
            RESULTS_ENV: str(results_dir),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), child_env.get("PYTHONPATH", "")]),
            # msrun starts workers with the `python` it finds on PATH: make it this interpreter.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), child_env.get("PATH", "")]),
            "GLOG_v": child_env.get("GLOG_v", "3"),
            "PYTHONUNBUFFERED": "1",
        })
        port = free_port()
        cmd = [msrun_executable(), f"--worker_num={nprocs}", f"--local_worker_num={nprocs}",
               f"--master_port={port}", f"--log_dir={log_dir}", "--join=True",
               "--cluster_time_out=120", str(script), *map(str, args)]
        out_path = workdir / f"msrun_{attempt}.out"
        popen = None
        timed_out = False
        try:
            with open(out_path, "wb") as out:
                popen = subprocess.Popen(cmd, cwd=str(workdir), env=child_env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
                deadline = time.monotonic() + timeout
                clash = False
                while popen.poll() is None:
                    if time.monotonic() > deadline:
                        timed_out = True
                        break
                    sched = log_dir / "scheduler.log"
                    if sched.exists() and "Address already in use" in sched.read_text(errors="replace"):
                        clash = True
                        break
                    time.sleep(0.2)
        finally:
            kill_job(popen, tag)
        if clash and attempt < retries_on_port_clash:
            continue
        result = MsrunResult(returncode=None if timed_out else popen.returncode, timed_out=timed_out,
                             log_dir=log_dir, results_dir=results_dir, nprocs=nprocs)
        for rank in range(nprocs):
            path = results_dir / f"rank_{rank}.json"
            if path.exists():
                result.results[rank] = json.loads(path.read_text())
        return result
    raise RuntimeError("unreachable")


def assert_cases_passed(result: MsrunResult, expected_cases: Optional[Sequence[str]] = None) -> Dict[int, Dict[str, Any]]:
    """Fail the test, with per-case errors and worker logs, unless every rank passed every case.

    Returns:
        ``{rank: {case: value}}`` for the test to compare across ranks.
    """
    problems = []
    if result.timed_out:
        problems.append("the job timed out")
    elif result.returncode != 0:
        problems.append(f"msrun exited with {result.returncode}")
    values: Dict[int, Dict[str, Any]] = {}
    for rank in range(result.nprocs):
        report = result.results.get(rank)
        if report is None:
            problems.append(f"rank {rank} wrote no results")
            continue
        values[rank] = {}
        for name, case in report["cases"].items():
            if case["ok"]:
                values[rank][name] = case.get("value")
            else:
                problems.append(f"rank {rank} case {name} failed:\n{case['error']}")
        if expected_cases is not None:
            missing = sorted(set(expected_cases) - set(report["cases"]))
            if missing:
                problems.append(f"rank {rank} did not run cases {missing}")
    if problems:
        raise AssertionError("\n".join(problems) + "\n" + result.log_tails())
    return values
