"""mindspeed_lab.launcher with real msrun jobs (2 CPU workers) running tests/lab_scripts/fake_train.py
(the two-node test trains the tiny GPT with examples/pretrain_gpt.py).

Every test checks afterwards, by pid and by the job's tag, that no process of the job is left.
"""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mindspeed_lab import launcher
from mindspeed_lab.events import EventReader, step_summary
from mindspeed_lab.launcher import Job, MultiNodeJob, tagged_processes

SCRIPTS = Path(__file__).resolve().parent / "lab_scripts"
FAKE_TRAIN = SCRIPTS / "fake_train.py"
FAKE_SSH = SCRIPTS / "fake_ssh.sh"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def jobs(tmp_path):
    """Create jobs through this fixture; whatever happens, they are stopped and checked at the end."""
    created = []

    def make(config, cls=Job, **kwargs):
        kwargs.setdefault("script", FAKE_TRAIN)
        kwargs.setdefault("runs_root", tmp_path)
        kwargs.setdefault("cluster_time_out", 120)
        job = cls(config, **kwargs)
        created.append(job)
        return job

    yield make
    leftovers = []
    for job in created:
        job.stop(grace_s=2.0)
        leftovers += [(job.name, p.pid) for p in tagged_processes(job.tag)]
    assert not leftovers, f"processes left behind: {leftovers}"


def assert_gone(job, timeout=15.0):
    """No process carries the job's tag, and msrun's own pids are gone (checked by pid)."""
    deadline = time.monotonic() + timeout
    while tagged_processes(job.tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tagged_processes(job.tag), [p.pid for p in tagged_processes(job.tag)]
    for node in job._state.nodes:  # pylint: disable=protected-access
        assert node.popen.poll() is not None
        assert not psutil.pid_exists(node.popen.pid) or psutil.Process(node.popen.pid).status() == psutil.STATUS_ZOMBIE


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_success_and_failure_side_by_side(jobs):
    """Two jobs at once: one succeeds (status transitions, events read while it runs, logs, job.json,
    a live dashboard thread), the other fails on rank 1 and is reported in one line, fast."""
    job = jobs({"steps": 6, "step_interval_s": 0.1, "eval_interval": 3, "checkpoint_interval": 3},
               workers=2, name="ok")
    bad = jobs({"steps": 50, "step_interval_s": 0.3, "fail_at_step": 2, "fail_rank": 1}, workers=2, name="bad")
    assert job.status == "created"
    assert (job.run_dir / "config.yaml").read_text().startswith("steps: 6")
    updates = []

    class FakeHandle:
        def update(self, obj):
            updates.append(obj)

    shown = []
    dash = job.dashboard(interval_s=0.5, display=lambda obj: shown.append(obj) or FakeHandle(), image=len)
    job.start()
    bad.start()
    t0 = time.monotonic()
    assert job.master_port != bad.master_port
    assert job.run_dir != bad.run_dir and job.tag != bad.tag
    dash.start()
    seen = [job.status]
    reader = EventReader(job.events_dir)
    rows_while_running = 0
    fail_s = None
    while not job.done:
        seen.append(job.status)
        reader.poll()
        if job.status == "running":
            rows_while_running = max(rows_while_running, len(reader.steps))
        if fail_s is None and bad.done:
            fail_s = time.monotonic() - t0
        time.sleep(0.2)
    assert job.wait(timeout=60) == "succeeded"
    dash.join(timeout=30)
    assert not dash.running
    assert job.returncode == 0
    assert job.error_summary is None
    statuses = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert statuses[:1] == ["starting"] and "running" in statuses, statuses
    assert rows_while_running > 0  # events were read while the job ran

    reader.poll()
    assert sorted(reader.steps["rank"].unique()) == [0, 1]
    assert len(reader.steps) == 12
    summary = step_summary(reader.steps)
    assert summary["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert summary["overflow"].tolist() == [False, True, False, False, False, False]
    assert len(reader.evals) == 4 and len(reader.checkpoints) == 4
    info = reader.run_info()
    assert info["status"] == "success" and info["world_size"] == 2
    assert reader.run_starts["check_sum"].tolist() == [3.0, 3.0]  # the all-reduce ran across both workers

    logs = job.worker_logs()
    assert sorted(logs) == [0, 1]
    assert "Step: 6" in logs[0] and "Step: 6" in logs[1]
    assert "Step: 6" in job.tail(1, 5)
    meta = json.loads((job.run_dir / "job.json").read_text())
    assert meta["status"] == "succeeded" and meta["tag"] == job.tag
    argv = meta["nodes"][0]["argv"]
    assert argv[0] == str(Path(sys.executable).parent / "msrun")
    assert "--worker_num=2" in argv and "--join=True" in argv
    assert argv[-4:] == ["--config", str(job.run_dir / "config.yaml"), "--output", str(job.output_dir)]

    assert len(shown) == 1  # one output, later redraws update it in place
    assert dash.redraws >= 2 and len(updates) >= 1
    assert_gone(job)

    assert bad.wait(timeout=180) == "failed"
    fail_s = fail_s if fail_s is not None else time.monotonic() - t0
    assert bad.returncode not in (0, None)
    summary = bad.error_summary
    assert summary == "rank 1: ValueError: injected failure at step 2 on rank 1", summary
    assert "\n" not in summary
    # The failure is reported as soon as msrun sees it, not after the scheduler's ~30 s timeout.
    assert fail_s < 90
    assert_gone(bad)


def test_stop_wait_timeout_time_limit_and_garbage_collection(jobs, tmp_path):
    """Four jobs at once: one stopped in the middle, one past a wait() timeout (a single worker,
    run without msrun), one past its time limit, and one garbage-collected while running."""
    stopme = jobs({"steps": 1000, "step_interval_s": 0.2}, workers=2, name="stopme").start()
    slow = jobs({"steps": 1000, "step_interval_s": 0.2}, workers=1, name="slow").start()
    limited = jobs({"steps": 1000, "step_interval_s": 0.2}, workers=2, name="limited", time_limit_s=8).start()
    collected = Job({"steps": 1000, "step_interval_s": 0.2}, workers=2, script=FAKE_TRAIN, runs_root=tmp_path,
                    name="gc", cluster_time_out=120).start()
    gc_tag = collected.tag

    # wait() that times out leaves the job running; the single worker runs without msrun
    with pytest.raises(TimeoutError, match="still"):
        slow.wait(timeout=1)
    assert slow.status in ("starting", "running") and not slow.use_msrun
    assert slow._state.nodes[0].argv[:2] == [sys.executable, str(FAKE_TRAIN)]  # pylint: disable=protected-access

    # stop in the middle
    reader = stopme.events()

    def some_steps():
        reader.poll()
        return len(reader.steps) >= 4

    wait_for(some_steps, 180, "a few steps")
    assert stopme.status == "running"
    pids = stopme.pids
    assert len(pids) >= 3  # msrun, scheduler, two workers (and msrun's tail helpers)
    t0 = time.monotonic()
    assert stopme.stop() == "stopped"
    assert time.monotonic() - t0 < 15
    assert stopme.status == "stopped" and stopme.wait(timeout=1) == "stopped"
    assert stopme.error_summary is None
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    reader.poll()
    # SIGTERM reached the workers: the script's handler wrote its run_end.
    assert set(reader.run_ends["status"]) == {"stopped"}
    assert stopme.stop() == "stopped"  # idempotent
    assert_gone(stopme)

    # the time limit
    assert limited.wait(timeout=120) == "failed"
    assert limited.returncode == 124
    assert "time limit of 8 s" in limited.error_summary
    assert_gone(limited)

    # garbage collection of a running job stops it
    wait_for(lambda: len(tagged_processes(gc_tag)) >= 4, 120, "the workers of the collected job")
    gc_pids = [p.pid for p in tagged_processes(gc_tag)]
    del collected
    gc.collect()
    deadline = time.monotonic() + 20
    while tagged_processes(gc_tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tagged_processes(gc_tag)
    assert not [pid for pid in gc_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

    # the single worker: its own output is worker_0.log; stop_on_timeout stops it
    wait_for(lambda: "world 1" in slow.worker_logs().get(0, ""), 120, "the single worker's log")
    with pytest.raises(TimeoutError, match="stopped"):
        slow.wait(timeout=1, stop_on_timeout=True)
    assert slow.status == "stopped"
    assert_gone(slow)


def test_port_clash_fails_fast_or_retries_on_a_new_port(jobs, monkeypatch):
    real_free_port = launcher.free_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        # an explicit port that is taken: the job fails as soon as the scheduler reports it
        explicit = jobs({"steps": 3}, workers=2, name="clash", master_port=port).start()
        # an automatic port that turns out to be taken (a race with another program): a new port
        handed = iter([port])
        monkeypatch.setattr(launcher, "free_port", lambda: next(handed, None) or real_free_port())
        auto = jobs({"steps": 3, "step_interval_s": 0.1}, workers=2, name="retry").start()
        assert auto.master_port == port
        t0 = time.monotonic()
        assert explicit.wait(timeout=120) == "failed"
        assert time.monotonic() - t0 < 60  # not the cluster timeout (120 s)
        assert auto.wait(timeout=180) == "succeeded", auto.error_summary
    assert auto.master_port != port
    assert explicit.returncode == 98
    assert f"master_port {port} is already in use" in explicit.error_summary
    meta = json.loads((explicit.run_dir / "job.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == explicit.error_summary
    assert_gone(explicit)
    assert_gone(auto)


OWNER = """
import sys, time
sys.path.insert(0, {repo!r})
from mindspeed_lab.launcher import Job
job = Job({{"steps": 1000, "step_interval_s": 0.2}}, workers=2, script={script!r}, runs_root={root!r}, name="orphan")
job.start()
print(job.tag, job.events_dir, flush=True)
time.sleep(600)
"""


def test_killed_owner_leaves_no_orphans(tmp_path):
    """A kernel that dies (SIGKILL: no atexit, no finalizer) leaves nothing: the workers watch its pid."""
    code = OWNER.format(repo=str(REPO), script=str(FAKE_TRAIN), root=str(tmp_path))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    tag = None
    try:
        tag, events_dir = owner.stdout.readline().split()
        wait_for(lambda: any(Path(events_dir).glob("rank_*.jsonl")), 120, "the first events")
        assert len(tagged_processes(tag)) >= 4
        owner.kill()
        owner.wait(timeout=10)
        # workers: their owner watchdog; msrun and the scheduler: the launcher's guard process
        deadline = time.monotonic() + 15
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not tagged_processes(tag), [p.cmdline() for p in tagged_processes(tag)]
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait(timeout=10)
        if tag:
            from mindspeed_lab.launcher import kill_tagged  # pylint: disable=import-outside-toplevel
            kill_tagged(tag, grace_s=2)


def test_multinode_two_local_nodes_one_over_ssh_train_like_one_node(jobs):
    """Two msrun 'nodes' on 127.0.0.1 (node_rank 0 and 1, one local worker each; node 1 started
    through a stand-in for ssh) train the tiny GPT (examples/pretrain_gpt.py) as one 2-rank job,
    side by side with the same model on one node with two workers: the same losses step by step."""
    from mindspeed_lab import presets  # pylint: disable=import-outside-toplevel

    config = presets.shrink(presets.load_preset("tiny"), 3)
    # a worker that crashes in native code leaves its Python stack in its log
    env = {"PYTHONFAULTHANDLER": "1"}
    job = jobs(config, cls=MultiNodeJob, hosts=["127.0.0.1", "localhost"], script=launcher.DEFAULT_SCRIPT,
               workers_per_node=1, local_hosts=("127.0.0.1",), ssh_command=[str(FAKE_SSH), "-o", "BatchMode=yes"],
               name="multi", env=env)
    single = jobs(config, workers=2, script=launcher.DEFAULT_SCRIPT, name="single", env=env)
    job.start()
    single.start()
    nodes = job._state.nodes  # pylint: disable=protected-access
    assert not nodes[0].remote and nodes[1].remote
    assert nodes[1].argv[0] == str(FAKE_SSH) and nodes[1].argv[3] == "localhost"
    for rank, node in enumerate(nodes):
        command = " ".join(node.argv)   # a remote node's msrun command is one argument of ssh
        assert f"--node_rank={rank}" in command and "--worker_num=2" in command
        assert "--local_worker_num=1" in command and "--master_addr=127.0.0.1" in command
    assert job.wait(timeout=300) == "succeeded", job.error_summary
    assert single.wait(timeout=300) == "succeeded", single.error_summary
    losses = {}
    for name, one in (("multi", job), ("single", single)):
        reader = one.events()
        reader.poll()
        info = reader.run_info()
        assert info["world_size"] == 2 and info["status"] == "success", info
        summary = step_summary(reader.steps)
        assert summary["step"].tolist() == [1, 2, 3]
        assert sorted(reader.steps["rank"].unique()) == [0, 1]
        losses[name] = summary["loss"].to_numpy()
    assert abs(losses["multi"] - losses["single"]).max() < 1e-5, losses
    assert sorted(job.log_paths()) == [0, 1]
    assert (job.log_root / "node0" / "worker_0.log").exists()
    assert (job.log_root / "node1" / "worker_1.log").exists()
    assert_gone(job)
    assert_gone(single)
