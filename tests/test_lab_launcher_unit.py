"""mindspeed_lab.launcher without msrun: commands, environment, config files, errors, helpers."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from mindspeed_lab import launcher
from mindspeed_lab.launcher import (Job, MultiNodeJob, build_node_commands, free_port, is_this_machine, kill_tagged,
                                    last_exception_line, tagged_processes)

SCRIPTS = Path(__file__).resolve().parent / "lab_scripts"
FAKE_TRAIN = SCRIPTS / "fake_train.py"
FAKE_SSH = SCRIPTS / "fake_ssh.sh"


def test_build_node_commands():
    cmds = build_node_commands(["10.0.0.1", "10.0.0.2"], 4, "train.py", ["--config", "c.yaml"], master_port=8848,
                               log_dirs=["l0", "l1"], msrun="/x/msrun", cluster_time_out=300)
    assert [c.node_rank for c in cmds] == [0, 1] and [c.host for c in cmds] == ["10.0.0.1", "10.0.0.2"]
    assert cmds[1].argv == ["/x/msrun", "--worker_num=8", "--local_worker_num=4", "--node_rank=1",
                            "--master_addr=10.0.0.1", "--master_port=8848", "--log_dir=l1", "--join=True",
                            "--cluster_time_out=300", "train.py", "--config", "c.yaml"]
    other = build_node_commands(["a", "b"], [2, 2], "t.py", master_port=2000, master_addr="m", msrun="msrun")
    assert "--master_addr=m" in other[0].argv and "--log_dir=msrun_log_node1" in other[1].argv
    with pytest.raises(ValueError, match="hosts must name at least one node"):
        build_node_commands([], 1, "t.py", master_port=2000, msrun="msrun")
    with pytest.raises(ValueError, match="same on every node"):
        build_node_commands(["a", "b"], [1, 2], "t.py", master_port=2000, msrun="msrun")
    with pytest.raises(ValueError, match=r"workers_per_node\[0\] must be an integer >= 1, got 0"):
        build_node_commands(["a"], 0, "t.py", master_port=2000, msrun="msrun")
    with pytest.raises(ValueError, match="master_port must be an integer in 1024..65535, got 80"):
        build_node_commands(["a"], 1, "t.py", master_port=80, msrun="msrun")


def test_job_command_environment_and_config(tmp_path):
    job = Job({"model": {"num_layers": 2}, "steps": 3}, workers=2, script=FAKE_TRAIN, runs_root=tmp_path, name="unit")
    assert job.status == "created" and job.returncode is None and job.error_summary is None
    assert job.run_dir.parent == tmp_path and job.run_dir.name.startswith("unit-")
    assert yaml.safe_load(job.config_path.read_text()) == {"model": {"num_layers": 2}, "steps": 3}
    argv = job.command(12345)
    assert argv[0] == str(Path(sys.executable).parent / "msrun")
    assert argv[1:7] == ["--worker_num=2", "--local_worker_num=2", "--master_port=12345",
                         f"--log_dir={job.log_root}", "--join=True", "--cluster_time_out=300"]
    assert argv[7:] == [str(FAKE_TRAIN), "--config", str(job.config_path), "--output", str(job.output_dir)]
    env = job._worker_env(2)  # pylint: disable=protected-access
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["MINDSPEED_JOB_TAG"] == job.tag and env["MINDSPEED_OWNER_PID"] == str(os.getpid())
    assert env["MINDSPEED_DEVICE_TARGET"] == "CPU" and "ASCEND_RT_VISIBLE_DEVICES" not in env
    assert str(Path(launcher.__file__).resolve().parents[1]) in env["PYTHONPATH"].split(os.pathsep)
    with pytest.raises(RuntimeError, match="not started"):
        job.wait(1)

    # one worker needs no cluster: the script runs directly (msrun --worker_num=1 never forms one)
    single = Job({"steps": 1}, workers=1, script=FAKE_TRAIN, runs_root=tmp_path, name="single")
    assert not single.use_msrun
    assert single.command(12345) == [sys.executable, str(FAKE_TRAIN), "--config", str(single.config_path),
                                     "--output", str(single.output_dir)]
    forced = Job({"steps": 1}, workers=1, script=FAKE_TRAIN, runs_root=tmp_path, name="forced", use_msrun=True)
    assert forced.command(12345)[:2] == [str(Path(sys.executable).parent / "msrun"), "--worker_num=1"]


def test_ascend_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HCCL_BUFFSIZE", raising=False)
    job = Job(None, workers=4, script=FAKE_TRAIN, script_args=["--output", "{output_dir}"], runs_root=tmp_path,
              device_target="Ascend", env={"EXTRA": "1"})
    env = job._worker_env(4)  # pylint: disable=protected-access
    assert env["MINDSPEED_DEVICE_TARGET"] == "Ascend"
    assert env["HCCL_BUFFSIZE"] == "200" and env["HCCL_EXEC_TIMEOUT"] == "600"
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1,2,3" and env["EXTRA"] == "1"
    picked = Job(None, workers=2, script=FAKE_TRAIN, script_args=[], runs_root=tmp_path, device_target="Ascend",
                 devices=[4, 5])
    assert picked._worker_env(2)["ASCEND_RT_VISIBLE_DEVICES"] == "4,5"  # pylint: disable=protected-access
    assert job.config_path is None and job.command(2000)[-2:] == ["--output", str(job.output_dir)]


def test_config_variants(tmp_path):
    src = tmp_path / "given.yaml"
    src.write_text("a: 1  # comment kept\n")
    job = Job(src, workers=1, script=FAKE_TRAIN, runs_root=tmp_path / "r")
    assert job.config_path.read_text() == "a: 1  # comment kept\n"

    @dataclass
    class Cfg:
        lr: float = 0.1

    class WithToDict:
        def to_dict(self):
            return {"x": [1, 2]}

    assert yaml.safe_load(Job(Cfg(), script=FAKE_TRAIN, runs_root=tmp_path / "r").config_path.read_text()) == {"lr": 0.1}
    assert yaml.safe_load(Job(WithToDict(), script=FAKE_TRAIN,
                              runs_root=tmp_path / "r").config_path.read_text()) == {"x": [1, 2]}
    class WithToYaml:  # the shape of mindspeed_ms.core.config.AllConfig
        def to_yaml(self, path=None):
            text = "written: by-to-yaml\n"
            if path is not None:
                Path(path).write_text(text)
            return text

        def to_dict(self):
            raise AssertionError("to_yaml is preferred")

    assert Job(WithToYaml(), script=FAKE_TRAIN, runs_root=tmp_path / "r").config_path.read_text() == \
        "written: by-to-yaml\n"
    with pytest.raises(TypeError, match="config must be a dict"):
        Job(42, script=FAKE_TRAIN, runs_root=tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        Job(tmp_path / "missing.yaml", script=FAKE_TRAIN, runs_root=tmp_path / "r")


def test_argument_errors(tmp_path):
    kw = {"script": FAKE_TRAIN, "runs_root": tmp_path}
    with pytest.raises(ValueError, match="workers must be an integer >= 1, got 0"):
        Job({}, workers=0, **kw)
    with pytest.raises(ValueError, match="device_target must be one of .*got 'TPU'"):
        Job({}, device_target="TPU", **kw)
    with pytest.raises(ValueError, match="name must be"):
        Job({}, name="a b", **kw)
    with pytest.raises(ValueError, match="master_port must be an integer in 1024..65535 or None, got 99999"):
        Job({}, master_port=99999, **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Job({}, script=tmp_path / "nope.py", runs_root=tmp_path)
    with pytest.raises(ValueError, match="config is None"):
        Job(None, **kw)
    with pytest.raises(ValueError, match="time_limit_s"):
        Job({}, time_limit_s=0, **kw)
    used = tmp_path / "used"
    (used / "output").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        Job({}, run_dir=used, **kw)
    if not launcher.DEFAULT_SCRIPT.exists():
        with pytest.raises(FileNotFoundError, match="pretrain_gpt.py"):
            Job({}, runs_root=tmp_path)


def test_last_exception_line():
    text = """[WARNING] something
Traceback (most recent call last):
  File "a.py", line 1, in <module>
    main()
    ^^^^^^
KeyError: 'x'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "a.py", line 3, in <module>
    raise RuntimeError("outer")
RuntimeError: The pointer[abc] is null.

----------------------------------------------------
- C++ Call Stack: (For framework developers)
----------------------------------------------------
mindspore/ccsrc/x.cc:10 Foo
"""
    assert last_exception_line(text) == "RuntimeError: The pointer[abc] is null."
    assert last_exception_line("no traceback here") is None


def test_free_ports_are_unique_and_hosts():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("host.invalid")


def _sleeper(env=None, new_session=True):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env,
                            start_new_session=new_session)


def test_remote_kill_script_stops_tagged_processes_only():
    tag = "unit-remote-kill"
    tagged = _sleeper(dict(os.environ, MINDSPEED_JOB_TAG=tag))
    other = _sleeper(dict(os.environ, MINDSPEED_JOB_TAG="someone-else"))
    try:
        subprocess.run(["python3", "-c", launcher._REMOTE_KILL_SCRIPT, tag], check=True,  # pylint: disable=protected-access
                       timeout=30)
        assert tagged.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for proc in (tagged, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_guard_stops_the_job_when_the_owner_dies():
    tag = "unit-guard"
    owner = _sleeper()
    msrun = _sleeper(dict(os.environ, MINDSPEED_JOB_TAG=tag))  # stands in for msrun (own process group)
    worker = _sleeper(dict(os.environ, MINDSPEED_JOB_TAG=tag))  # a re-parented worker
    guard = subprocess.Popen([sys.executable, "-m", "mindspeed_lab._guard", str(owner.pid), tag, str(msrun.pid)],
                             cwd=str(Path(launcher.__file__).resolve().parents[1]))
    try:
        time.sleep(1.5)
        assert guard.poll() is None and msrun.poll() is None
        owner.kill()
        owner.wait()
        assert guard.wait(timeout=20) == 0
        assert msrun.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert worker.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
        assert not tagged_processes(tag)
    finally:
        for proc in (owner, msrun, worker, guard):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


FAKE_MSRUN = """#!{python}
import json, os, sys
with open(os.environ["FAKE_MSRUN_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "pid": os.getpid(), "owner": os.environ.get("MINDSPEED_OWNER_PID"),
               "tag": os.environ.get("MINDSPEED_JOB_TAG"), "path0": os.environ["PATH"].split(":")[0],
               "cwd": os.getcwd()}}, f)
"""


def test_remote_command_survives_shell_quoting(tmp_path, monkeypatch):
    """The ssh command line, run by a shell as ssh would, hands msrun exactly the argument list."""
    odd = tmp_path / "dir with 'quotes' and $HOME"
    odd.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_msrun = bindir / "msrun"
    fake_msrun.write_text(FAKE_MSRUN.format(python=sys.executable))
    fake_msrun.chmod(0o755)
    monkeypatch.setattr(launcher, "msrun_executable", lambda: str(fake_msrun))
    script = odd / "train; rm -rf x.py"
    script.write_text("")
    job = MultiNodeJob({"a": 1}, hosts=["127.0.0.1", "node-b"], workers_per_node=2, script=script,
                       script_args=["--config", "{config}", "--note", "it's $(whoami) `x` \"q\""],
                       run_dir=odd / "run", ssh_command=[str(FAKE_SSH), "-o", "BatchMode=yes"])
    cmd = job.node_commands(23456)[1]
    argv = job.remote_argv(cmd)
    assert argv[:4] == [str(FAKE_SSH), "-o", "BatchMode=yes", "node-b"] and len(argv) == 5
    out = tmp_path / "seen.json"
    subprocess.run(argv, env=dict(os.environ, FAKE_MSRUN_OUT=str(out)), check=True, timeout=60)
    seen = json.loads(out.read_text())
    assert seen["argv"] == cmd.argv[1:]
    assert seen["argv"][-1] == "it's $(whoami) `x` \"q\""
    assert seen["tag"] == job.tag
    assert seen["owner"] == str(seen["pid"])  # the remote shell's pid, kept by exec: msrun itself
    assert seen["path0"] == str(bindir) and seen["cwd"] == str(job.run_dir)
    assert shlex.split(argv[4])  # one well-formed shell command


def test_kill_tagged_and_tagged_processes():
    tag = "unit-kill-tagged"
    procs = [_sleeper(dict(os.environ, MINDSPEED_JOB_TAG=tag), new_session=False) for _ in range(2)]
    try:
        assert sorted(p.pid for p in tagged_processes(tag)) == sorted(p.pid for p in procs)
        killed = kill_tagged(tag, grace_s=2)
        assert sorted(killed) == sorted(p.pid for p in procs)
        for proc in procs:
            proc.wait(timeout=5)
        assert not tagged_processes(tag)
        assert all(not psutil.pid_exists(p.pid) for p in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_error_summary_names_the_signal_of_a_crashed_worker(tmp_path):
    """msrun's "Worker process P exit with exception" line: the signal is named, and a crash after
    every rank wrote run_end success (a native crash at shutdown) says so."""
    # pylint: disable=protected-access
    log_dir, events = tmp_path / "logs", tmp_path / "events"
    log_dir.mkdir()
    events.mkdir()
    out = tmp_path / "msrun.out"
    out.write_text("[ERROR] ME(1:2,MainProcess): Worker process 4242 exit with exception. Error code: -11.\n")
    node = launcher._Node(host="localhost", node_rank=0, argv=["msrun"], log_dir=log_dir, out_path=out)
    state = launcher._State("tag", [node], {}, tmp_path, events, None, 0, False, 1.0, 12345, None)
    assert state.error_summary() == f"a worker (pid 4242) exited with code -11 (SIGSEGV); see the logs in {log_dir}"
    for rank in (0, 1):
        (events / f"rank_{rank}.jsonl").write_text(
            json.dumps({"kind": "run_start", "rank": rank}) + "\n"
            + json.dumps({"kind": "run_end", "rank": rank, "status": "success"}) + "\n")
    assert state.error_summary() == ("a worker (pid 4242) exited with code -11 (SIGSEGV) after every rank had "
                                     f"finished training (run_end success); see the logs in {log_dir}")
