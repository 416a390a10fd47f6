"""Find and stop the msrun jobs a test started indirectly (through the CLI or a notebook kernel).

Every lab job exports ``MINDSPEED_RUN_DIR`` (its run directory) and ``MINDSPEED_JOB_TAG`` to all
its processes. A test that points the runs at its own ``tmp_path`` can therefore find exactly its
jobs' processes by their run directory and stop them by their tag, never by process name.
"""

import os

import psutil

from mindspeed_lab.launcher import JOB_TAG_ENV, kill_tagged


def job_processes(root):
    """``{tag: [pids]}`` of live processes whose MINDSPEED_RUN_DIR lies under ``root``."""
    root = os.path.realpath(str(root))
    found = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        run_dir = env.get("MINDSPEED_RUN_DIR")
        if run_dir and os.path.realpath(run_dir).startswith(root + os.sep) and env.get(JOB_TAG_ENV):
            found.setdefault(env[JOB_TAG_ENV], []).append(proc.pid)
    return found


def stop_jobs_under(root, grace_s=2.0):
    """Stop every job whose run directory lies under ``root``; returns what was still running."""
    leftovers = job_processes(root)
    for tag in leftovers:
        kill_tagged(tag, grace_s=grace_s)
    return leftovers
