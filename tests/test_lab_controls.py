"""mindspeed_lab.controls.JobControl: the status line follows a job; the Stop button stops it off the
calling thread (driven here with a job double whose events are real event files)."""

import json
import threading
import time

import pytest

from mindspeed_lab.controls import JobControl
from mindspeed_lab.events import EventReader

pytest.importorskip("ipywidgets")


class FakeJob:
    """What JobControl uses of a Job: name, status, done, returncode, error_summary, events, stop."""

    def __init__(self, events_dir, stop_delay=0.3):
        self.name = "fake"
        self.events_dir = events_dir
        self._state = object()  # started
        self._status = "running"
        self.stop_delay = stop_delay
        self.stop_threads = []
        self.returncode = None

    @property
    def status(self):
        return self._status

    @property
    def done(self):
        return self._status in ("succeeded", "failed", "stopped")

    @property
    def error_summary(self):
        return "rank 1: ValueError: bad batch" if self._status == "failed" else None

    def events(self):
        return EventReader(self.events_dir)

    def stop(self, grace_s=None):  # pylint: disable=unused-argument
        self.stop_threads.append(threading.current_thread().name)
        time.sleep(self.stop_delay)  # a real stop waits for SIGTERM to take effect
        self._status, self.returncode = "stopped", -15
        return self._status


def write_step(events_dir, step, loss):
    events_dir.mkdir(parents=True, exist_ok=True)
    with open(events_dir / "rank_0.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": "step", "time": time.time(), "rank": 0, "epoch": 0, "step": step,
                             "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0, "scale_window": None,
                             "overflow": False, "step_time_ms": 10.0, "tokens_per_s": 1234.0}) + "\n")


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_status_line_follows_the_events(tmp_path):
    events = tmp_path / "events"
    job = FakeJob(events)
    control = JobControl(job, refresh_s=0.05)
    try:
        assert control.refresh() == "fake: running"  # no events yet: the status alone
        write_step(events, 1, 4.25)
        write_step(events, 2, 3.5)
        assert wait_for(lambda: "step 2" in control.status_label.value)
        assert "loss 3.5000" in control.status_label.value and "1,234 tok/s" in control.status_label.value
        assert not control.stop_button.disabled
    finally:
        control.close()


def test_stop_button_stops_off_the_calling_thread(tmp_path):
    job = FakeJob(tmp_path / "events", stop_delay=0.5)
    control = JobControl(job, refresh_s=0.05)
    start = time.monotonic()
    control.stop_button.click()  # what a click in the browser does
    assert time.monotonic() - start < 0.4, "the click handler must not wait for the stop"
    assert control.stop_button.disabled
    assert "stopping" in control.status_label.value
    assert wait_for(lambda: "fake: stopped" in control.status_label.value)
    assert "exit code -15" in control.status_label.value
    assert job.stop_threads == ["mindspeed-job-stop"]
    assert control.stop_button.disabled  # nothing left to stop
    control.stop_button.click()
    time.sleep(0.2)
    assert len(job.stop_threads) == 1
    assert wait_for(lambda: not control._thread.is_alive())  # pylint: disable=protected-access


def test_failed_job_shows_its_error_and_the_thread_ends(tmp_path):
    job = FakeJob(tmp_path / "events")
    control = JobControl(job, refresh_s=0.05)
    job._status, job.returncode = "failed", 1  # pylint: disable=protected-access
    assert wait_for(lambda: not control._thread.is_alive())  # pylint: disable=protected-access
    text = control.refresh()
    assert text == "fake: failed | exit code 1 | rank 1: ValueError: bad batch"
    assert "#d62728" in control.status_label.value


def test_refresh_interval_is_checked(tmp_path):
    with pytest.raises(ValueError, match="refresh_s"):
        JobControl(FakeJob(tmp_path), refresh_s=0)
