"""Start, watch and stop msrun training jobs from a notebook, a test or the CLI.

A :class:`Job` writes its config into a run directory of its own, starts ``msrun`` (found next to
``sys.executable``) as a subprocess with N workers on a free port and follows it::

    job = Job({"steps": 10}, workers=2, script="my_train.py")
    job.start()
    job.wait(timeout=600)       # -> 'succeeded' | 'failed' | 'stopped'
    print(job.status, job.returncode, job.error_summary)

Run directory layout (``job.run_dir``)::

    config.yaml        the config the script is given (``--config``)
    msrun.out          msrun's own output (and the worker logs it tails)
    logs/              msrun's log dir: scheduler.log, worker_<rank>.log
    output/            the script's output dir (``--output``); events/rank_<r>.jsonl inside
    job.json           what was started: command, port, tag, pids, final status

Process hygiene. msrun runs in a new session; its workers start sessions of their own and are
re-parented, so a job is stopped in two ways at once: msrun's process group (msrun, the scheduler,
its ``tail`` helpers) and every process whose environment carries the job's unique
``MINDSPEED_JOB_TAG`` (found with psutil). Nothing is ever matched by process name. Workers also get
``MINDSPEED_OWNER_PID`` (this process): :func:`mindspeed_ms.runtime.setup_worker` makes them exit
when the owner disappears, which covers a killed notebook kernel. msrun's scheduler cannot run
that watchdog (it blocks inside ``init()``), so a small guard process (``mindspeed_lab._guard``,
in its own session) watches the owner too and stops the whole job when the owner dies. A job that
is garbage-collected, or still running when the interpreter exits, is stopped by a
``weakref.finalize`` hook.

:class:`MultiNodeJob` starts one msrun per node (:func:`build_node_commands`) locally or over ssh.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import psutil
import yaml

__all__ = [
    "JOB_TAG_ENV",
    "OWNER_PID_ENV",
    "STATUSES",
    "DEFAULT_SCRIPT",
    "DEFAULT_SCRIPT_ARGS",
    "Job",
    "MultiNodeJob",
    "NodeCommand",
    "build_node_commands",
    "free_port",
    "msrun_executable",
    "tagged_processes",
    "kill_tagged",
    "last_exception_line",
    "is_this_machine",
]

JOB_TAG_ENV = "MINDSPEED_JOB_TAG"
OWNER_PID_ENV = "MINDSPEED_OWNER_PID"
DEVICE_TARGET_ENV = "MINDSPEED_DEVICE_TARGET"

#: Job states. 'created' until :meth:`Job.start`; 'starting' until the first event line appears;
#: 'running' until msrun exits; then 'succeeded', 'failed' or 'stopped' (by :meth:`Job.stop`).
STATUSES = ("created", "starting", "running", "succeeded", "failed", "stopped")
FINAL_STATUSES = ("succeeded", "failed", "stopped")

_LAB_DIR = Path(__file__).resolve().parent
REPO_ROOT = _LAB_DIR.parent
#: The training entry point used when no script is given.
DEFAULT_SCRIPT = REPO_ROOT / "examples" / "pretrain_gpt.py"
#: Arguments passed to the script; ``{config}``, ``{output_dir}``, ``{run_dir}``, ``{events_dir}``
#: and ``{log_dir}`` are replaced by the job's paths (only these exact placeholders).
DEFAULT_SCRIPT_ARGS = ("--config", "{config}", "--output", "{output_dir}")
_PLACEHOLDERS = ("{config}", "{output_dir}", "{run_dir}", "{events_dir}", "{log_dir}")

DEVICE_TARGETS = ("CPU", "Ascend", "GPU")
#: The Ascend environment of the GPT pretraining guide (buffer size in MB, timeout in s).
ASCEND_ENV_DEFAULTS = {"HCCL_BUFFSIZE": "200", "HCCL_EXEC_TIMEOUT": "600"}

# The scheduler cannot bind its port: the first pattern appears at log level WARNING and below,
# the others also at GLOG_v=3 (errors only).
_PORT_CLASH_PATTERNS = ("Address already in use", "Failed to create the TCP server",
                        "Failed to init the tcp server")
_WORKER_FAILED_RE = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")
_SCHED_FAILED_RE = re.compile(r"Scheduler process (\d+) exit with exception")

_ports_handed_out: set = set()
_ports_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` now and was not handed out before here.

    Args:
        host: The address to probe.

    Returns:
        A port number. Ports already given to a job in this process are skipped, so jobs
        started side by side never receive the same port.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        with _ports_lock:
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise RuntimeError("free_port: no unused port found after 200 attempts")


def msrun_executable() -> str:
    """Path of ``msrun`` next to this interpreter (a kernel may not have the venv on PATH).

    Raises:
        FileNotFoundError: When msrun is neither next to ``sys.executable`` nor on PATH.
    """
    candidate = Path(sys.executable).parent / "msrun"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("msrun")
    if found:
        return found
    raise FileNotFoundError(f"msrun not found next to {sys.executable} nor on PATH: install mindspore "
                            "into the environment that runs this kernel")


def _environ_of(proc: psutil.Process) -> Dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return {}


def tagged_processes(tag: str) -> List[psutil.Process]:
    """Live processes whose environment holds ``MINDSPEED_JOB_TAG=tag`` (never this process)."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        if _environ_of(proc).get(JOB_TAG_ENV) == tag:
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return found


def terminate_processes(procs: Sequence[psutil.Process], grace_s: float = 5.0) -> None:
    """SIGTERM the given processes, wait ``grace_s``, SIGKILL the rest and wait for them."""
    for proc in procs:
        try:
            proc.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(alive, timeout=grace_s)


def kill_tagged(tag: str, grace_s: float = 5.0) -> List[int]:
    """SIGTERM every process carrying ``tag``, wait ``grace_s``, SIGKILL the rest.

    Returns:
        The pids that were signalled.
    """
    procs = tagged_processes(tag)
    terminate_processes(procs, grace_s)
    return [p.pid for p in procs]


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def is_this_machine(host: str) -> bool:
    """Whether ``host`` resolves to an address of this machine (loopback or an interface's).

    Unresolvable names count as other machines.
    """
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    mine = {addr.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for addr in addrs}
    for info in infos:
        ip = info[4][0].split("%")[0]
        if ip in mine or ip.startswith("127.") or ip == "::1":
            return True
    return False


def last_exception_line(text: str) -> Optional[str]:
    """The exception line (``Type: message``) of the last Python traceback in ``text``.

    Tracebacks are recognised by ``Traceback (most recent call last):``; the exception line is
    the first non-indented line after the frames. Returns None when ``text`` has no traceback.
    """
    lines = text.splitlines()
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last):"):
            start = i
            break
    if start is None:
        return None
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith((" ", "\t")):
            continue
        return line.strip()
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _config_to_dict(config: Any) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    for method in ("to_dict", "as_dict", "to_yaml_dict"):
        fn = getattr(config, method, None)
        if callable(fn):
            value = fn()
            if isinstance(value, Mapping):
                return dict(value)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise TypeError(f"config must be a dict, a path to a YAML file, or an object with to_dict(); "
                    f"got {type(config).__name__}")


def _write_config(config: Any, path: Path) -> Optional[Path]:
    """Write ``config`` (None, dict, YAML path or config object) to ``path``."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        src = Path(config)
        if not src.is_file():
            raise FileNotFoundError(f"config: {str(src)!r} is not a file; pass a dict, a config object "
                                    "or the path of an existing YAML file")
        shutil.copyfile(src, path)
        return path
    to_yaml = getattr(config, "to_yaml", None)
    if callable(to_yaml) and not isinstance(config, Mapping):
        # mindspeed_ms.core.config.AllConfig: its own writer knows which values YAML can hold
        text = to_yaml(str(path))
        if not path.exists() and isinstance(text, str):
            path.write_text(text, encoding="utf-8")
        return path
    data = _config_to_dict(config)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _python_path_for_workers(existing: str) -> str:
    """PYTHONPATH that lets workers import mindspeed_ms from this checkout."""
    parts = [str(REPO_ROOT)] if (REPO_ROOT / "mindspeed_ms").is_dir() else []
    if existing:
        parts.append(existing)
    return os.pathsep.join(parts)


# ----------------------------------------------------------------------------------------------
# Per-node msrun commands
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NodeCommand:
    """The msrun invocation for one node of a job.

    Attributes:
        host: Where it runs.
        node_rank: ``--node_rank``.
        local_workers: ``--local_worker_num``.
        argv: The full argument list (msrun path first).
    """

    host: str
    node_rank: int
    local_workers: int
    argv: List[str]


def build_node_commands(hosts: Sequence[str], workers_per_node: Union[int, Sequence[int]], script: Union[str, os.PathLike],
                        script_args: Sequence[str] = (), *, master_port: int, master_addr: Optional[str] = None,
                        log_dirs: Optional[Sequence[Union[str, os.PathLike]]] = None, msrun: Optional[str] = None,
                        cluster_time_out: int = 300, join: bool = True,
                        extra_msrun_args: Sequence[str] = ()) -> List[NodeCommand]:
    """Build one msrun command per host for a multi-node job.

    Every node gets ``--worker_num`` (the total), its own ``--local_worker_num`` and
    ``--node_rank``, and the same ``--master_addr``/``--master_port`` (the first host unless
    given), so global ranks are ``node_rank * local_workers + local_rank``.

    Args:
        hosts: One entry per node (an address or host name); the first is the master by default.
        workers_per_node: Workers on every node (an int), or one count per host. msrun numbers
            ranks as if every node had the same count, so different counts are rejected.
        script: The training script.
        script_args: Its arguments.
        master_port: The scheduler's port.
        master_addr: The scheduler's address (default: ``hosts[0]``).
        log_dirs: One msrun ``--log_dir`` per node (default: ``msrun_log_node<i>``).
        msrun: The msrun executable (default: :func:`msrun_executable`).
        cluster_time_out: ``--cluster_time_out`` in seconds.
        join: ``--join``.
        extra_msrun_args: More msrun options, placed before the script.

    Returns:
        One :class:`NodeCommand` per host, in host order.

    Raises:
        ValueError: For an empty host list, worker counts that are not positive or differ
            between nodes, or a port outside 1024-65535.
    """
    hosts = list(hosts)
    if not hosts:
        raise ValueError("hosts must name at least one node, got an empty list")
    if isinstance(workers_per_node, int):
        counts = [workers_per_node] * len(hosts)
    else:
        counts = list(workers_per_node)
        if len(counts) != len(hosts):
            raise ValueError(f"workers_per_node has {len(counts)} entries but hosts has {len(hosts)}; "
                             "give one count per host or a single int")
    for i, count in enumerate(counts):
        _check_positive_int(f"workers_per_node[{i}]", count)
    if len(set(counts)) != 1:
        raise ValueError(f"workers_per_node must be the same on every node (msrun assigns rank = "
                         f"node_rank * local_worker_num + local_rank), got {counts}")
    if isinstance(master_port, bool) or not isinstance(master_port, int) or not 1024 <= master_port <= 65535:
        raise ValueError(f"master_port must be an integer in 1024..65535, got {master_port!r}")
    if log_dirs is not None and len(log_dirs) != len(hosts):
        raise ValueError(f"log_dirs has {len(log_dirs)} entries but hosts has {len(hosts)}")
    master_addr = master_addr or hosts[0]
    msrun = msrun or msrun_executable()
    total = sum(counts)
    commands = []
    for rank, (host, count) in enumerate(zip(hosts, counts)):
        log_dir = str(log_dirs[rank]) if log_dirs is not None else f"msrun_log_node{rank}"
        argv = [msrun, f"--worker_num={total}", f"--local_worker_num={count}", f"--node_rank={rank}",
                f"--master_addr={master_addr}", f"--master_port={master_port}", f"--log_dir={log_dir}",
                f"--join={join}", f"--cluster_time_out={cluster_time_out}", *map(str, extra_msrun_args),
                str(script), *map(str, script_args)]
        commands.append(NodeCommand(host=host, node_rank=rank, local_workers=count, argv=argv))
    return commands


# ----------------------------------------------------------------------------------------------
# Shared state of a running job (no reference to the Job object: the monitor thread and the
# finalizer hold this, so the Job itself can be garbage-collected)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Node:
    host: str
    node_rank: int
    argv: List[str]            # what is run locally (msrun argv, or ssh argv for remote nodes)
    log_dir: Path
    out_path: Path
    remote: bool = False
    remote_kill_argv: Optional[List[str]] = None
    co_located_master: bool = False  # a non-unique scheduler on the master's host is expected
    popen: Optional[subprocess.Popen] = None
    returncode: Optional[int] = None
    out_offset: int = 0
    worker_failure: Optional[str] = None  # msrun's "Worker process P exit with exception" line

    def scan_output(self) -> Optional[str]:
        """Read msrun's new output; remember whether it reported a failed worker."""
        if self.worker_failure is None:
            try:
                with open(self.out_path, "rb") as f:
                    f.seek(self.out_offset)
                    data = f.read()
            except OSError:
                return None
            end = data.rfind(b"\n")
            if end >= 0:
                self.out_offset += end + 1
                match = _WORKER_FAILED_RE.search(data[: end + 1].decode("utf-8", "replace"))
                if match:
                    self.worker_failure = match.group(0)
        return self.worker_failure


class _State:
    """Everything the monitor thread and the cleanup hook need."""

    def __init__(self, tag: str, nodes: List[_Node], env: Dict[str, str], cwd: Path, events_dir: Path,
                 time_limit_s: Optional[float], port_retries: int, auto_port: bool, grace_s: float,
                 master_port: int, rebuild_argv):
        self.tag = tag
        self.nodes = nodes
        self.env = env
        self.cwd = cwd
        self.events_dir = events_dir
        self.time_limit_s = time_limit_s
        self.port_retries = port_retries
        self.auto_port = auto_port
        self.grace_s = grace_s
        self.master_port = master_port
        self.rebuild_argv = rebuild_argv  # callable(port) -> list of argv per node
        self.owner_pid = os.getpid()
        self.guard: Optional[subprocess.Popen] = None
        self.info_path: Optional[Path] = None
        self.info: Dict[str, Any] = {}
        self.lock = threading.RLock()
        self.status = "created"
        self.returncode: Optional[int] = None
        self.reason: Optional[str] = None   # our own explanation (stop, time limit, port clash)
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.stop_requested = False
        self.done = threading.Event()
        self.cleaned = False
        self.monitor: Optional[threading.Thread] = None

    # -- launching ---------------------------------------------------------------------------
    def launch(self) -> None:
        for node in self.nodes:
            node.log_dir.mkdir(parents=True, exist_ok=True)
            with open(node.out_path, "ab") as out:
                node.popen = subprocess.Popen(  # pylint: disable=consider-using-with
                    node.argv, cwd=str(self.cwd), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
            node.returncode = None
        self._start_guard()

    def _start_guard(self) -> None:
        """Start the guard process that stops the job if this process dies (see ``_guard.py``)."""
        self._stop_guard()
        local = [str(n.popen.pid) for n in self.nodes if n.popen is not None]
        env = {k: v for k, v in os.environ.items() if k != JOB_TAG_ENV}
        env["PYTHONPATH"] = os.pathsep.join([str(_LAB_DIR.parent), env.get("PYTHONPATH", "")])
        self.guard = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "mindspeed_lab._guard", str(self.owner_pid), self.tag, *local],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def _stop_guard(self) -> None:
        guard = getattr(self, "guard", None)
        if guard is not None:
            if guard.poll() is None:
                guard.terminate()
            try:
                guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                guard.kill()
                guard.wait(timeout=5)
            self.guard = None

    def kill_all(self, grace_s: Optional[float] = None) -> None:
        """Graceful then forced stop of every process of the job; reaps msrun."""
        grace_s = self.grace_s if grace_s is None else grace_s
        for node in self.nodes:
            if node.popen is not None:
                _signal_group(node.popen, signal.SIGTERM)
        for node in self.nodes:
            if node.remote and node.remote_kill_argv:
                try:
                    subprocess.run(node.remote_kill_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=grace_s + 30, check=False)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        kill_tagged(self.tag, grace_s)
        deadline = time.monotonic() + grace_s
        for node in self.nodes:
            if node.popen is None:
                continue
            try:
                node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(node.popen, signal.SIGKILL)
                try:
                    node.popen.kill()
                except OSError:
                    pass
                node.popen.wait(timeout=30)
            node.returncode = node.popen.returncode
        # Anything the forced stop of msrun left behind (e.g. its tail helpers).
        kill_tagged(self.tag, grace_s)

    # -- watching ----------------------------------------------------------------------------
    def _has_events(self) -> bool:
        try:
            return any(p.stat().st_size > 0 for p in self.events_dir.glob("rank_*.jsonl"))
        except OSError:
            return False

    def _scheduler_failed_to_bind(self, node: _Node) -> bool:
        text = _read_text(node.log_dir / "scheduler.log")
        return any(pattern in text for pattern in _PORT_CLASH_PATTERNS)

    def _port_clash(self) -> bool:
        masters = [n for n in self.nodes if n.node_rank == 0 or n.co_located_master]
        if not masters:
            return False
        clashed = [n for n in masters if self._scheduler_failed_to_bind(n)]
        # Co-located nodes each start a scheduler and all but one lose the bind race; only when
        # every scheduler on the master host failed is the port taken by someone else.
        return len(clashed) == len(masters)

    def _node_ok(self, node: _Node) -> bool:
        if node.returncode == 0:
            return True
        if not node.co_located_master:
            return False
        out = _read_text(node.out_path)
        return (not _WORKER_FAILED_RE.search(out) and bool(_SCHED_FAILED_RE.search(out))
                and self._scheduler_failed_to_bind(node))

    def poll(self) -> None:
        """Advance the state machine (called by the monitor thread and by readers)."""
        with self.lock:
            if self.status in FINAL_STATUSES or self.status == "created":
                return
            starting = self.status == "starting"
            if starting and self._has_events():
                self.status = "running"
            for node in self.nodes:
                if node.popen is not None and node.returncode is None:
                    node.returncode = node.popen.poll()
            finished = all(n.returncode is not None for n in self.nodes)
            if not finished:
                if self.time_limit_s is not None and time.time() - self.started_at > self.time_limit_s:
                    self.kill_all()
                    self._finish("failed", 124, f"time limit of {self.time_limit_s:g} s exceeded; the job was stopped")
                    return
                any_failed = any(n.returncode is not None and not self._node_ok(n) for n in self.nodes)
                # msrun has seen a worker fail: it kills the other workers, but then waits ~30 s
                # for the scheduler to notice. Fail fast instead.
                worker_failed = any(n.scan_output() for n in self.nodes if not n.remote)
                if starting and self._port_clash():
                    self.kill_all()
                    if self.auto_port and self.port_retries > 0:
                        self.port_retries -= 1
                        self._relaunch_on_new_port()
                        return
                    self._finish("failed", 98, f"master_port {self.master_port} is already in use (the scheduler "
                                               "could not bind it); choose another port or leave master_port unset")
                    return
                if worker_failed or (any_failed and len(self.nodes) > 1):
                    # A worker or a node failed: the rest would wait for it until a timeout.
                    self.kill_all(grace_s=min(self.grace_s, 2.0))
                    for node in self.nodes:
                        if node.worker_failure:
                            node.returncode = 1  # what msrun itself exits with
                    finished = True
                else:
                    return
            # every node has exited
            ok = all(self._node_ok(n) for n in self.nodes)
            failed = sorted((n for n in self.nodes if not self._node_ok(n)), key=lambda n: n.worker_failure is None)
            code = 0 if ok else next((n.returncode for n in failed if n.returncode not in (None, 0)), 1)
            kill_tagged(self.tag, self.grace_s)
            self._finish("succeeded" if ok else "failed", code, None)

    def _relaunch_on_new_port(self) -> None:
        port = free_port()
        self.master_port = port
        for node, argv in zip(self.nodes, self.rebuild_argv(port)):
            node.argv = argv
            for stale in node.log_dir.glob("*.log"):
                stale.unlink()
        self.launch()

    def _finish(self, status: str, returncode: Optional[int], reason: Optional[str]) -> None:
        self.status = status
        self.returncode = returncode
        if reason and not self.reason:
            self.reason = reason
        self.ended_at = time.time()
        self.cleaned = True
        self._stop_guard()
        try:
            self.write_info()
        except OSError:
            pass
        self.done.set()

    def error_summary(self) -> str:
        """One line saying why the job failed (see :attr:`Job.error_summary`)."""
        if self.reason:
            return self.reason
        log_dirs = [n.log_dir for n in self.nodes]
        candidates = []
        for rank, path in _worker_log_paths(log_dirs).items():
            line = last_exception_line(_read_text(path))
            if line:
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    mtime = float("inf")
                candidates.append((mtime, rank, line))
        if candidates:
            _, rank, line = min(candidates)
            return _one_line(f"rank {rank}: {line}")
        ended = _failed_run_ends(self.events_dir)
        if ended:
            return _one_line(ended[0])
        for node in self.nodes:
            match = _WORKER_FAILED_RE.search(_read_text(node.out_path))
            if match:
                code = int(match.group(2))
                what = f"exited with code {code}"
                if code < 0:
                    try:
                        what += f" ({signal.Signals(-code).name})"
                    except ValueError:
                        pass
                # a native crash while the process shuts down reads differently from one mid-run
                if _all_ranks_succeeded(self.events_dir):
                    what += " after every rank had finished training (run_end success)"
                return _one_line(f"a worker (pid {match.group(1)}) {what}; see the logs in {node.log_dir}")
        sched = last_exception_line(_read_text(log_dirs[0] / "scheduler.log"))
        if sched:
            return _one_line(f"scheduler: {sched}")
        return f"msrun exited with code {self.returncode}; see the logs in {log_dirs[0]}"

    def write_info(self) -> None:
        """Write ``job.json``: what was started and, once over, how it ended."""
        if self.info_path is None:
            return
        info = dict(self.info)
        info.update({
            "status": self.status, "returncode": self.returncode,
            "error": self.error_summary() if self.status == "failed" else None,
            "master_port": self.master_port, "started_at": self.started_at, "ended_at": self.ended_at,
            "nodes": [{"host": n.host, "node_rank": n.node_rank, "argv": n.argv,
                       "pid": n.popen.pid if n.popen else None, "log_dir": str(n.log_dir)} for n in self.nodes],
        })
        tmp = self.info_path.with_name(self.info_path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.info_path)

    def request_stop(self, grace_s: Optional[float] = None) -> None:
        with self.lock:
            if self.status in FINAL_STATUSES or self.status == "created":
                return
            self.stop_requested = True
            self.kill_all(grace_s)
            for node in self.nodes:
                if node.popen is not None:
                    node.returncode = node.popen.returncode
            code = next((n.returncode for n in self.nodes if n.returncode not in (None, 0)), 0)
            self._finish("stopped", code, "stopped by the user")


def _monitor(state: _State, interval_s: float) -> None:
    while not state.done.is_set():
        try:
            state.poll()
        except Exception:  # pylint: disable=broad-except
            # The monitor must never die silently with processes running: stop them.
            state.kill_all()
            state._finish("failed", 1, "the launcher's monitor failed")  # pylint: disable=protected-access
            raise
        state.done.wait(interval_s)


def _cleanup(state: _State) -> None:
    """weakref.finalize / atexit hook: make sure nothing of the job survives its owner."""
    if state.status == "created":
        return
    if not state.done.is_set():
        try:
            state.request_stop(grace_s=2.0)
        except Exception:  # pylint: disable=broad-except
            pass
    try:
        kill_tagged(state.tag, grace_s=2.0)
    except Exception:  # pylint: disable=broad-except
        pass


# ----------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------

class _BaseJob:
    """What single- and multi-node jobs share: the run directory, status, logs, stop and wait."""

    _state: _State

    def __init__(self, config: Any, *, script: Optional[Union[str, os.PathLike]], script_args: Optional[Sequence[str]],
                 run_dir: Optional[Union[str, os.PathLike]], runs_root: Optional[Union[str, os.PathLike]],
                 name: str, device_target: str, devices: Optional[Sequence[int]], env: Optional[Mapping[str, str]],
                 cluster_time_out: int, time_limit_s: Optional[float], grace_s: float, poll_interval_s: float):
        if device_target not in DEVICE_TARGETS:
            raise ValueError(f"device_target must be one of {DEVICE_TARGETS}, got {device_target!r}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '-', got {name!r}")
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0 or None, got {time_limit_s!r}")
        if isinstance(cluster_time_out, bool) or not isinstance(cluster_time_out, int):
            raise ValueError(f"cluster_time_out must be an integer number of seconds, got {cluster_time_out!r}")
        self.script = Path(script if script is not None else DEFAULT_SCRIPT).resolve()
        if not self.script.is_file():
            hint = (" (the training entry point examples/pretrain_gpt.py is not there yet: pass script=...)"
                    if script is None else "")
            raise FileNotFoundError(f"script: {str(self.script)!r} does not exist{hint}")
        self.script_args_template = list(DEFAULT_SCRIPT_ARGS if script_args is None else script_args)
        for arg in self.script_args_template:
            if not isinstance(arg, (str, os.PathLike, int, float)):
                raise TypeError(f"script_args entries must be strings, got {arg!r}")
        if config is None and any("{config}" in str(a) for a in self.script_args_template):
            raise ValueError("config is None but script_args pass '{config}'; give a config or script_args "
                             "without the '{config}' placeholder")
        self.name = name
        self.device_target = device_target
        self.devices = list(devices) if devices is not None else None
        self.cluster_time_out = cluster_time_out
        self.time_limit_s = time_limit_s
        self.grace_s = grace_s
        self.poll_interval_s = poll_interval_s
        self.extra_env = {str(k): str(v) for k, v in (env or {}).items()}
        self.tag = f"{name}-{uuid.uuid4().hex}"
        self.owner_pid = os.getpid()

        if run_dir is None:
            root = Path(runs_root) if runs_root is not None else Path.cwd() / "runs"
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = root / f"{name}-{stamp}-{self.tag[-6:]}"
        self.run_dir = Path(run_dir).resolve()
        if (self.run_dir / "logs").exists() or (self.run_dir / "output").exists():
            raise FileExistsError(f"run_dir: {str(self.run_dir)!r} already holds a run (logs/ or output/); "
                                  "give a new directory or leave run_dir unset")
        created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_root = self.run_dir / "logs"
        self.output_dir = self.run_dir / "output"
        self.events_dir = self.output_dir / "events"
        try:
            self.config_path = _write_config(config, self.run_dir / "config.yaml")
        except BaseException:
            if created:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    # -- building ------------------------------------------------------------------------------
    def _script_args(self, log_dir: Path) -> List[str]:
        values = {"{config}": str(self.config_path) if self.config_path else "", "{output_dir}": str(self.output_dir),
                  "{run_dir}": str(self.run_dir), "{events_dir}": str(self.events_dir), "{log_dir}": str(log_dir)}
        out = []
        for arg in self.script_args_template:
            text = os.fspath(arg) if isinstance(arg, os.PathLike) else str(arg)
            for key in _PLACEHOLDERS:
                text = text.replace(key, values[key])
            out.append(text)
        return out

    def _worker_env(self, local_workers: int) -> Dict[str, str]:
        """The environment of msrun and (through it) of every worker."""
        env = dict(os.environ)
        env.update({
            # msrun starts workers with the `python` it finds on PATH: make it this interpreter.
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")]),
            "PYTHONPATH": _python_path_for_workers(env.get("PYTHONPATH", "")),
            "PYTHONUNBUFFERED": "1",
            "GLOG_v": env.get("GLOG_v", "3"),
            JOB_TAG_ENV: self.tag,
            OWNER_PID_ENV: str(self.owner_pid),
            DEVICE_TARGET_ENV: self.device_target,
            "MINDSPEED_RUN_DIR": str(self.run_dir),
            "MINDSPEED_OUTPUT_DIR": str(self.output_dir),
        })
        if self.device_target == "Ascend":
            for key, value in ASCEND_ENV_DEFAULTS.items():
                env.setdefault(key, value)
            devices = self.devices if self.devices is not None else list(range(local_workers))
            env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        elif self.device_target == "GPU" and self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.devices)
        env.update(self.extra_env)
        return env

    def _start_state(self, state: _State) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.events_dir.mkdir(parents=True, exist_ok=True)
        self._state = state
        with state.lock:
            state.status = "starting"
            state.started_at = time.time()
            try:
                state.launch()
            except BaseException:
                state.kill_all(grace_s=1.0)
                state._finish("failed", None, "msrun could not be started")  # pylint: disable=protected-access
                raise
        state.info_path = self.run_dir / "job.json"
        state.info = {"name": self.name, "tag": self.tag, "owner_pid": self.owner_pid,
                      "device_target": self.device_target, "script": str(self.script),
                      "config": str(self.config_path) if self.config_path else None}
        self._finalizer = weakref.finalize(self, _cleanup, state)
        state.monitor = threading.Thread(target=_monitor, args=(state, self.poll_interval_s),
                                         name=f"mindspeed-job-{self.name}", daemon=True)
        state.monitor.start()
        self._write_job_json()

    def _write_job_json(self) -> None:
        self._state.write_info()

    # -- public API ------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """One of :data:`STATUSES`."""
        state = getattr(self, "_state", None)
        if state is None:
            return "created"
        state.poll()
        return state.status

    @property
    def done(self) -> bool:
        """Whether the job has reached a final status."""
        return self.status in FINAL_STATUSES

    @property
    def returncode(self) -> Optional[int]:
        """msrun's exit code once the job is over (None before). 124: the time limit ran out; 98:
        the master port was taken."""
        self.status  # pylint: disable=pointless-statement
        state = getattr(self, "_state", None)
        return None if state is None else state.returncode

    @property
    def master_port(self) -> Optional[int]:
        """The scheduler's port (it changes when a port clash made the job retry)."""
        state = getattr(self, "_state", None)
        return None if state is None else state.master_port

    @property
    def pids(self) -> List[int]:
        """Pids of the job's live processes (msrun, scheduler, workers), found by the job tag."""
        return [p.pid for p in tagged_processes(self.tag)]

    @property
    def elapsed_s(self) -> Optional[float]:
        """Seconds since :meth:`start` (until the end once finished)."""
        state = getattr(self, "_state", None)
        if state is None or state.started_at is None:
            return None
        return (state.ended_at or time.time()) - state.started_at

    def start(self) -> "_BaseJob":
        """Start the job (returns at once; see :attr:`status`). Returns ``self``.

        Raises:
            RuntimeError: When the job was started before.
        """
        raise NotImplementedError

    def stop(self, grace_s: Optional[float] = None) -> str:
        """Stop the job: SIGTERM to msrun's process group and to every tagged process, then
        SIGKILL after ``grace_s``. Returns the final status ('stopped', or the status the job
        had already reached)."""
        state = getattr(self, "_state", None)
        if state is None:
            return "created"
        state.request_stop(grace_s)
        self._write_job_json()
        return state.status

    def wait(self, timeout: Optional[float] = None, *, stop_on_timeout: bool = False) -> str:
        """Block until the job ends and return its final status.

        Args:
            timeout: Seconds to wait (None: no limit).
            stop_on_timeout: Stop the job when the timeout expires.

        Raises:
            RuntimeError: When the job was never started.
            TimeoutError: When the job is still running after ``timeout`` seconds (it keeps
                running unless ``stop_on_timeout``; then it is 'stopped').
        """
        state = getattr(self, "_state", None)
        if state is None:
            raise RuntimeError("wait(): the job was not started; call start() first")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not state.done.is_set():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if stop_on_timeout:
                    self.stop()
                    raise TimeoutError(f"job {self.name!r} did not finish within {timeout:g} s; it was stopped")
                raise TimeoutError(f"job {self.name!r} did not finish within {timeout:g} s; it is still "
                                   f"{state.status} (call stop() or wait longer)")
            state.done.wait(0.5 if remaining is None else min(0.5, remaining))
            state.poll()
        self._write_job_json()
        return state.status

    def log_paths(self) -> Dict[int, Path]:
        """``{global rank: worker log path}`` for the logs that exist."""
        return _worker_log_paths(self._log_dirs())

    def worker_logs(self, tail: Optional[int] = None) -> Dict[int, str]:
        """``{global rank: log text}`` (the last ``tail`` lines only, when given)."""
        logs = {}
        for rank, path in self.log_paths().items():
            text = _read_text(path)
            if tail is not None:
                text = "\n".join(text.splitlines()[-tail:])
            logs[rank] = text
        return logs

    @property
    def scheduler_log_path(self) -> Path:
        """The scheduler log of the master node."""
        return self._log_dirs()[0] / "scheduler.log"

    @property
    def msrun_output_paths(self) -> List[Path]:
        """msrun's own output file(s), one per node."""
        state = getattr(self, "_state", None)
        return [n.out_path for n in state.nodes] if state is not None else []

    @property
    def error_summary(self) -> Optional[str]:
        """The error of a failed job in one line (None unless the status is 'failed').

        In order: the launcher's own reason (time limit, port clash); else the last exception
        line of the worker log whose traceback was written first (``rank R: Type: message``);
        else the error of the first ``run_end`` event with status 'failed'; else msrun's own
        error about an exited worker, or the scheduler's exception.
        """
        if self.status != "failed":
            return None
        return self._state.error_summary()

    def tail(self, rank: int = 0, lines: int = 20) -> str:
        """The last ``lines`` lines of one worker's log, without MindSpore's [INFO]/[WARNING] lines."""
        path = self.log_paths().get(rank)
        if path is None:
            return f"<no log for rank {rank} yet>"
        kept = [ln for ln in _read_text(path).splitlines() if not ln.startswith(("[INFO]", "[WARNING]"))]
        return "\n".join(kept[-lines:])

    def events(self):
        """An :class:`mindspeed_lab.events.EventReader` on this job's events directory."""
        from .events import EventReader  # pylint: disable=import-outside-toplevel
        return EventReader(self.events_dir)

    def dashboard(self, **kwargs):
        """A :class:`mindspeed_lab.plots.LiveDashboard` following this job."""
        from .plots import LiveDashboard  # pylint: disable=import-outside-toplevel
        return LiveDashboard(self, **kwargs)

    def _log_dirs(self) -> List[Path]:
        state = getattr(self, "_state", None)
        if state is None:
            return [self.log_root]
        return [n.log_dir for n in state.nodes]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, status={self.status!r}, run_dir={str(self.run_dir)!r})"


def _worker_log_paths(log_dirs: Sequence[Path]) -> Dict[int, Path]:
    out = {}
    for log_dir in log_dirs:
        for path in log_dir.glob("worker_*.log"):
            match = re.fullmatch(r"worker_(\d+)\.log", path.name)
            if match:
                out[int(match.group(1))] = path
    return dict(sorted(out.items()))


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _event_records(events_dir: Path):
    """The complete JSON object lines of every ``rank_*.jsonl`` under ``events_dir`` (others skipped)."""
    for path in sorted(events_dir.glob("rank_*.jsonl")):
        for line in _read_text(path).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def _failed_run_ends(events_dir: Path) -> List[str]:
    found = [(rec.get("time", 0), f"rank {rec.get('rank')}: {rec.get('error')}")
             for rec in _event_records(events_dir) if rec.get("kind") == "run_end" and rec.get("status") == "failed"]
    return [text for _, text in sorted(found)]


def _all_ranks_succeeded(events_dir: Path) -> bool:
    """Whether every rank that wrote a ``run_start`` also wrote a ``run_end`` with status success."""
    started, succeeded = set(), set()
    for rec in _event_records(events_dir):
        if rec.get("kind") == "run_start":
            started.add(rec.get("rank"))
        elif rec.get("kind") == "run_end" and rec.get("status") == "success":
            succeeded.add(rec.get("rank"))
    return bool(started) and started <= succeeded


class Job(_BaseJob):
    """A training job of N workers on this machine, started through msrun.

    Args:
        config: What the script is given as ``--config``: a dict (written as YAML), the path of
            a YAML file (copied), a config object with ``to_yaml(path)`` (e.g.
            ``mindspeed_ms.core.config.AllConfig``) or ``to_dict()``, a dataclass, or None (no
            config file).
        workers: Number of workers (``--worker_num`` = ``--local_worker_num``).
        script: The training script (default: the repo's ``examples/pretrain_gpt.py``).
        script_args: The script's arguments; the placeholders ``{config}``, ``{output_dir}``,
            ``{run_dir}``, ``{events_dir}``, ``{log_dir}`` are replaced by the job's paths.
            Default: ``["--config", "{config}", "--output", "{output_dir}"]``.
        run_dir: The run directory (must not hold a run yet). Default: a new
            ``<runs_root>/<name>-<date>-<time>-<id>``.
        runs_root: Parent of the default run directory (default: ``./runs``).
        name: A short name (letters, digits, ``_.-``), used in paths and the job tag.
        device_target: 'CPU' (default), 'Ascend' or 'GPU'; exported as
            ``MINDSPEED_DEVICE_TARGET``. Ascend also gets ``HCCL_BUFFSIZE=200``,
            ``HCCL_EXEC_TIMEOUT=600`` (unless set) and ``ASCEND_RT_VISIBLE_DEVICES``.
        devices: Device ids to make visible (Ascend default: ``0..workers-1``).
        env: Extra environment variables for msrun and the workers (applied last).
        master_port: The scheduler's port (default: a free one; on a clash the job retries
            up to ``port_retries`` times with a new free port). An explicit port that is taken
            fails the job at once.
        cluster_time_out: msrun's ``--cluster_time_out`` (seconds to build the cluster).
        time_limit_s: Stop the job and mark it 'failed' after this many seconds (None: never).
        grace_s: Seconds between SIGTERM and SIGKILL when stopping.
        msrun_args: More msrun options (e.g. ``["--bind_core=True"]``).
        port_retries: New ports to try after a clash on an automatically chosen port.
        poll_interval_s: How often the monitor thread checks the processes.
        use_msrun: Start through msrun (default: when ``workers > 1``). One worker needs no
            cluster: it runs as ``python SCRIPT ...`` with its output in ``logs/worker_0.log``
            (same statuses, logs, events and cleanup). Measured: msrun with
            ``--worker_num=1`` hangs until ``cluster_time_out`` because its scheduler process
            (``MS_ROLE=MS_SCHED``, ``RANK_SIZE=1``) does not take part in ``init()``.
    """

    def __init__(self, config: Any = None, workers: int = 2, *, script: Optional[Union[str, os.PathLike]] = None,
                 script_args: Optional[Sequence[str]] = None, run_dir: Optional[Union[str, os.PathLike]] = None,
                 runs_root: Optional[Union[str, os.PathLike]] = None, name: str = "job", device_target: str = "CPU",
                 devices: Optional[Sequence[int]] = None, env: Optional[Mapping[str, str]] = None,
                 master_port: Optional[int] = None, cluster_time_out: int = 300,
                 time_limit_s: Optional[float] = None, grace_s: float = 5.0, msrun_args: Sequence[str] = (),
                 port_retries: int = 3, poll_interval_s: float = 0.5, use_msrun: Optional[bool] = None):
        self.workers = _check_positive_int("workers", workers)
        self.use_msrun = self.workers > 1 if use_msrun is None else bool(use_msrun)
        if master_port is not None and (isinstance(master_port, bool) or not isinstance(master_port, int)
                                        or not 1024 <= master_port <= 65535):
            raise ValueError(f"master_port must be an integer in 1024..65535 or None, got {master_port!r}")
        super().__init__(config, script=script, script_args=script_args, run_dir=run_dir, runs_root=runs_root,
                         name=name, device_target=device_target, devices=devices, env=env,
                         cluster_time_out=cluster_time_out, time_limit_s=time_limit_s, grace_s=grace_s,
                         poll_interval_s=poll_interval_s)
        self.requested_port = master_port
        self.msrun_args = [str(a) for a in msrun_args]
        self.port_retries = port_retries

    def command(self, master_port: int) -> List[str]:
        """The argument list this job runs with ``master_port``: msrun's, or the script's own
        (``python SCRIPT ...``) for a single worker without msrun."""
        if not self.use_msrun:
            return [sys.executable, str(self.script), *self._script_args(self.log_root)]
        return [msrun_executable(), f"--worker_num={self.workers}", f"--local_worker_num={self.workers}",
                f"--master_port={master_port}", f"--log_dir={self.log_root}", "--join=True",
                f"--cluster_time_out={self.cluster_time_out}", *self.msrun_args,
                str(self.script), *self._script_args(self.log_root)]

    def start(self) -> "Job":
        if getattr(self, "_state", None) is not None:
            raise RuntimeError(f"job {self.name!r} was already started (status {self._state.status!r}); "
                               "create a new Job to run again")
        port = self.requested_port or free_port()
        # without msrun the script's own output is the worker log msrun would have written
        out_path = self.run_dir / "msrun.out" if self.use_msrun else self.log_root / "worker_0.log"
        node = _Node(host="localhost", node_rank=0, argv=self.command(port), log_dir=self.log_root,
                     out_path=out_path)
        state = _State(self.tag, [node], self._worker_env(self.workers), self.run_dir, self.events_dir,
                       self.time_limit_s, self.port_retries if self.use_msrun else 0,
                       self.requested_port is None and self.use_msrun, self.grace_s, port, _Rebuilder(self))
        self._start_state(state)
        return self


class _Rebuilder:
    """Rebuilds node argvs for a new port without holding the job (a weak reference)."""

    def __init__(self, job: _BaseJob):
        self._job = weakref.ref(job)

    def __call__(self, port: int) -> List[List[str]]:
        job = self._job()
        if job is None:
            raise RuntimeError("the job was garbage-collected")
        if isinstance(job, Job):
            return [job.command(port)]
        return [argv for argv in job.node_argvs(port)]


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# Run on a remote node through ssh to stop the job there: every process whose environment holds
# the tag gets SIGTERM, then SIGKILL after a grace period. Needs only python3 and /proc.
_REMOTE_KILL_SCRIPT = r"""
import os, signal, sys, time
tag = sys.argv[1].encode()
def tagged():
    found = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open('/proc/%s/environ' % pid, 'rb') as f:
                if b'MINDSPEED_JOB_TAG=' + tag in f.read().split(b'\0'):
                    found.append(int(pid))
        except OSError:
            pass
    return found
for sig, pause in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
    for pid in tagged():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(pause)
"""


class MultiNodeJob(_BaseJob):
    """One job over several msrun 'nodes': started locally or over ssh.

    Hosts in ``local_hosts`` (default: 127.0.0.1, localhost, ::1) run msrun as a local
    subprocess; the others run it through ``ssh_command + [host, remote command]``. Each node has
    its own log dir ``logs/node<i>`` and msrun output ``msrun_node<i>.out`` under the run
    directory; the output (events) directory is shared, so remote nodes need the same path
    (a shared file system) for the event stream to be complete here.

    Several nodes on one machine (e.g. two 'nodes' on 127.0.0.1 for testing) each start a
    scheduler; all but one fail to bind the port, which msrun reports as a failure of that node.
    The job accepts that case: such a node counts as succeeded when only its scheduler failed.

    Remote nodes get ``MINDSPEED_OWNER_PID`` = their own msrun (the remote shell's pid, kept
    by ``exec``), so their workers exit when msrun ends; :meth:`stop` also runs a tag-based kill
    on each remote host through ssh.

    Args:
        config: As for :class:`Job`.
        hosts: One host per node; ``hosts[0]`` is the master unless ``master_addr`` is given.
        workers_per_node: Workers on each node (the same on all).
        master_addr: The scheduler's address (default: ``hosts[0]``).
        ssh_command: The ssh argument list before the host (default: ``["ssh", "-o",
            "BatchMode=yes"]``).
        local_hosts: Hosts to start locally instead of over ssh.
        remote_python: Python on remote hosts (for the stop helper).
        Other arguments: as for :class:`Job`.
    """

    def __init__(self, config: Any = None, hosts: Sequence[str] = ("127.0.0.1", "127.0.0.1"), workers_per_node: int = 1,
                 *, script: Optional[Union[str, os.PathLike]] = None, script_args: Optional[Sequence[str]] = None,
                 run_dir: Optional[Union[str, os.PathLike]] = None, runs_root: Optional[Union[str, os.PathLike]] = None,
                 name: str = "multinode", device_target: str = "CPU", devices: Optional[Sequence[int]] = None,
                 env: Optional[Mapping[str, str]] = None, master_addr: Optional[str] = None,
                 master_port: Optional[int] = None, cluster_time_out: int = 300, time_limit_s: Optional[float] = None,
                 grace_s: float = 5.0, msrun_args: Sequence[str] = (),
                 ssh_command: Sequence[str] = ("ssh", "-o", "BatchMode=yes"),
                 local_hosts: Sequence[str] = _LOCAL_HOSTS, remote_python: str = "python3",
                 port_retries: int = 3, poll_interval_s: float = 0.5):
        self.hosts = [str(h) for h in hosts]
        if not self.hosts:
            raise ValueError("hosts must name at least one node, got an empty list")
        self.workers_per_node = _check_positive_int("workers_per_node", workers_per_node)
        if master_port is not None and (isinstance(master_port, bool) or not isinstance(master_port, int)
                                        or not 1024 <= master_port <= 65535):
            raise ValueError(f"master_port must be an integer in 1024..65535 or None, got {master_port!r}")
        super().__init__(config, script=script, script_args=script_args, run_dir=run_dir, runs_root=runs_root,
                         name=name, device_target=device_target, devices=devices, env=env,
                         cluster_time_out=cluster_time_out, time_limit_s=time_limit_s, grace_s=grace_s,
                         poll_interval_s=poll_interval_s)
        self.master_addr = master_addr or self.hosts[0]
        self.requested_port = master_port
        self.msrun_args = [str(a) for a in msrun_args]
        self.ssh_command = [str(a) for a in ssh_command]
        self.local_hosts = set(local_hosts)
        self.remote_python = remote_python
        self.port_retries = port_retries

    @property
    def workers(self) -> int:
        """Total number of workers."""
        return self.workers_per_node * len(self.hosts)

    def is_local(self, host: str) -> bool:
        """Whether ``host`` is started as a local subprocess (not over ssh)."""
        return host in self.local_hosts

    def node_commands(self, master_port: int) -> List[NodeCommand]:
        """The msrun command of every node (see :func:`build_node_commands`)."""
        log_dirs = [self.log_root / f"node{i}" for i in range(len(self.hosts))]
        return build_node_commands(self.hosts, self.workers_per_node, self.script, self._script_args(log_dirs[0]),
                                   master_port=master_port, master_addr=self.master_addr, log_dirs=log_dirs,
                                   cluster_time_out=self.cluster_time_out, extra_msrun_args=self.msrun_args)

    def _remote_env(self) -> Dict[str, str]:
        env = {JOB_TAG_ENV: self.tag, DEVICE_TARGET_ENV: self.device_target, "PYTHONUNBUFFERED": "1",
               "GLOG_v": os.environ.get("GLOG_v", "3"), "MINDSPEED_RUN_DIR": str(self.run_dir),
               "MINDSPEED_OUTPUT_DIR": str(self.output_dir)}
        if self.device_target == "Ascend":
            env.update(ASCEND_ENV_DEFAULTS)
            devices = self.devices if self.devices is not None else list(range(self.workers_per_node))
            env["ASCEND_RT_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
        env.update(self.extra_env)
        return env

    def remote_argv(self, cmd: NodeCommand) -> List[str]:
        """The ssh argument list that runs ``cmd`` on its host.

        The remote command is one string built with :func:`shlex.join` from argument lists (every
        value quoted); it creates the run directories, exports the owner pid as the remote
        shell's own pid and ``exec``\\ s ``env K=V ... msrun ...``.
        """
        env = self._remote_env()
        log_dir = next(a.split("=", 1)[1] for a in cmd.argv if a.startswith("--log_dir="))
        mkdir = shlex.join(["mkdir", "-p", log_dir, str(self.events_dir)])
        cd = shlex.join(["cd", str(self.run_dir)])
        run = shlex.join(["env", *[f"{k}={v}" for k, v in env.items()], *cmd.argv])
        # msrun starts workers with the `python` on PATH: put msrun's own bin directory first.
        bindir = shlex.quote(os.path.dirname(cmd.argv[0]))
        pythonpath = shlex.quote(str(REPO_ROOT))
        remote = (f"{mkdir} && {cd} && export PATH={bindir}:\"$PATH\" && "
                  f"export PYTHONPATH={pythonpath}:\"${{PYTHONPATH:-}}\" && "
                  f"export {OWNER_PID_ENV}=$$ && exec {run}")
        return [*self.ssh_command, cmd.host, remote]

    def node_argvs(self, master_port: int) -> List[List[str]]:
        """What is run locally for each node: msrun itself, or ssh."""
        out = []
        for cmd in self.node_commands(master_port):
            out.append(cmd.argv if self.is_local(cmd.host) else self.remote_argv(cmd))
        return out

    def start(self) -> "MultiNodeJob":
        if getattr(self, "_state", None) is not None:
            raise RuntimeError(f"job {self.name!r} was already started (status {self._state.status!r}); "
                               "create a new job to run again")
        port = self.requested_port or free_port()
        commands = self.node_commands(port)
        argvs = self.node_argvs(port)
        # msrun starts a scheduler on every node whose master_addr is one of its own addresses: with
        # several nodes on the master's machine, all but one of those schedulers fail to bind.
        here = [is_this_machine(cmd.host) for cmd in commands]
        shared_master = is_this_machine(self.master_addr) and sum(here) > 1
        nodes = []
        for cmd, argv, on_this_machine in zip(commands, argvs, here):
            log_dir = Path(next(a.split("=", 1)[1] for a in cmd.argv if a.startswith("--log_dir=")))
            remote = not self.is_local(cmd.host)
            co_located = shared_master and on_this_machine
            kill_argv = ([*self.ssh_command, cmd.host, shlex.join([self.remote_python, "-c", _REMOTE_KILL_SCRIPT, self.tag])]
                         if remote else None)
            nodes.append(_Node(host=cmd.host, node_rank=cmd.node_rank, argv=argv, log_dir=log_dir,
                               out_path=self.run_dir / f"msrun_node{cmd.node_rank}.out", remote=remote,
                               remote_kill_argv=kill_argv, co_located_master=co_located))
        state = _State(self.tag, nodes, self._worker_env(self.workers_per_node), self.run_dir, self.events_dir,
                       self.time_limit_s, self.port_retries, self.requested_port is None, self.grace_s, port,
                       _Rebuilder(self))
        self._start_state(state)
        return self
