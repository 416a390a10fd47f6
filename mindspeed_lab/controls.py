"""A job's controls in the notebook: a Stop button and a status line that follows the run.

The status line is refreshed from a daemon thread and the Stop button does its work on another
thread, so the notebook kernel stays free: a cell that blocks (``dash.run()``, ``job.wait()``)
would keep the kernel from handling the button's click, which is why the tutorials draw the
dashboard with ``dash.start()`` next to these controls.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Optional

from .events import step_summary

__all__ = ["JobControl"]

_STATUS_COLOURS = {
    "created": "#555555",
    "starting": "#b8860b",
    "running": "#1f77b4",
    "succeeded": "#2ca02c",
    "failed": "#d62728",
    "stopped": "#7f7f7f",
}


class JobControl:
    """Stop button plus a live status line for a :class:`~mindspeed_lab.launcher.Job`.

    Args:
        job: The job (started or not yet started).
        refresh_s: Seconds between two refreshes of the status line.
        grace_s: Passed to ``job.stop``: time between SIGTERM and SIGKILL.

    Attributes:
        widget: The ipywidgets box to display (``display(control)`` shows it too).
        status_label: The ``HTML`` widget with the status line.
        stop_button: The ``Button`` that stops the job.

    The line reads ``<job>: <status> | step S | loss L | <tokens/s> tok/s`` while the job runs, and
    the exit code and the first error line once it has ended. The refresh thread ends by itself
    one refresh after the job reaches a final status.
    """

    def __init__(self, job: Any, refresh_s: float = 1.0, grace_s: Optional[float] = None):
        import ipywidgets as w  # pylint: disable=import-outside-toplevel

        if not refresh_s > 0:
            raise ValueError(f"refresh_s: got {refresh_s!r}; allowed: a number > 0")
        self.job = job
        self.refresh_s = float(refresh_s)
        self.grace_s = grace_s
        self.status_label = w.HTML(value="")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="stop the job: SIGTERM to its processes, then SIGKILL")
        self.stop_button.on_click(self._on_stop_click)
        self.widget = w.HBox([self.stop_button, self.status_label])
        self._stopping = False
        self._reader = None
        self._closed = threading.Event()
        self._stopper: Optional[threading.Thread] = None
        self.refresh()
        self._thread = threading.Thread(target=self._follow, name="mindspeed-job-control", daemon=True)
        self._thread.start()

    # -- the status line ---------------------------------------------------------------------------
    def status_text(self) -> str:
        """The status line as plain text (what the label shows, without colours)."""
        job = self.job
        status = job.status
        if self._stopping and status not in ("succeeded", "failed", "stopped"):
            status = "stopping"
        parts = [f"{job.name}: {status}"]
        try:
            if self._reader is None:
                self._reader = job.events()
            self._reader.poll()  # reads only what was appended since the last refresh
            summary = step_summary(self._reader.steps)
        except Exception:  # pylint: disable=broad-except
            summary = None  # events not readable yet: the line still shows the status
        if summary is not None and not summary.empty:
            last = summary.iloc[-1]
            parts.append(f"step {int(last['step'])}")
            loss = last.get("loss")
            if loss is not None and loss == loss:
                parts.append(f"loss {float(loss):.4f}")
            tps = last.get("tokens_per_s")
            if tps is not None and tps == tps:
                parts.append(f"{float(tps):,.0f} tok/s")
        if status in ("succeeded", "failed", "stopped"):
            code = job.returncode
            if code is not None:
                parts.append(f"exit code {code}")
            if status == "failed":
                error = job.error_summary
                if error:
                    parts.append(error)
        return " | ".join(parts)

    def refresh(self) -> str:
        """Recompute the status line now; returns its text."""
        text = self.status_text()
        status = text.split(" | ", 1)[0].rsplit(": ", 1)[-1]
        colour = _STATUS_COLOURS.get(status, "#b8860b")
        self.status_label.value = (f'<span class="mindspeed-job-status" style="color:{colour}; '
                                   f'font-family:monospace">{html.escape(text)}</span>')
        self.stop_button.disabled = self._stopping or self.job.done or getattr(self.job, "_state", None) is None
        return text

    def _follow(self) -> None:
        while not self._closed.is_set():
            try:
                self.refresh()
            except Exception:  # pylint: disable=broad-except
                pass  # a transient read error: the next refresh tries again
            if self.job.done and not self._stopping:
                break
            self._closed.wait(self.refresh_s)
        try:
            self.refresh()
        except Exception:  # pylint: disable=broad-except
            pass

    # -- stopping ------------------------------------------------------------------------------------
    def _on_stop_click(self, _button=None) -> None:
        self.stop()

    def stop(self, wait: bool = False) -> None:
        """What the Stop button does: stop the job from a worker thread.

        Args:
            wait: Block until the job has stopped (for code; the button never blocks).
        """
        if self._stopping:
            if wait and self._stopper is not None:
                self._stopper.join()
            return
        if self.job.done:
            return  # nothing left to stop (a disabled button can still be clicked from code)
        self._stopping = True
        self.stop_button.disabled = True

        def target():
            try:
                self.job.stop(self.grace_s)
            finally:
                self._stopping = False
                self.refresh()

        self._stopper = threading.Thread(target=target, name="mindspeed-job-stop", daemon=True)
        self._stopper.start()
        self.refresh()
        if wait:
            self._stopper.join()

    def close(self) -> None:
        """End the refresh thread (the widgets stay as they are)."""
        self._closed.set()
        self._thread.join(5.0)

    def _ipython_display_(self):
        from IPython.display import display  # pylint: disable=import-outside-toplevel

        display(self.widget)

    def __repr__(self) -> str:
        return f"JobControl({self.status_text()})"
