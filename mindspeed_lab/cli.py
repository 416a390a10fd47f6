"""What ``python -m mindspeed_lab run|demo|report`` do, as functions (the CLI parses, these act).

* :func:`run_config`: validate a config for N workers, launch it through a
  :class:`~mindspeed_lab.launcher.Job`, draw a terminal progress bar (step, loss, tokens/s, ETA)
  from the event files, then write the report (PNG plots and ``summary.html``) into the run
  directory.
* :func:`run_demo`: the same for the demo preset (:func:`mindspeed_lab.presets.demo_preset`),
  with tiny settings when ``MINDSPEED_LAB_SMALL=1``.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional, Union

from . import presets

__all__ = ["ProgressBar", "run_config", "run_demo", "format_duration"]

#: Exit statuses of the CLI.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 130


def format_duration(seconds: Optional[float]) -> str:
    """``h:mm:ss`` / ``m:ss`` (``--:--`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """A one-line terminal progress bar: ``[####....] 12/100 loss 2.3456 | 1234 tok/s | ETA 1:48``.

    On a terminal the line is redrawn in place (carriage return); otherwise (a log file, a CI job)
    a full line is printed when the step changes, at most every ``min_interval_s`` seconds, and at
    the end.

    Args:
        total: Number of steps (None when unknown: no bar, no ETA).
        stream: Where to write (default ``sys.stderr``).
        width: Characters of the bar.
        min_interval_s: Smallest time between printed lines when not on a terminal.
    """

    def __init__(self, total: Optional[int], stream: Optional[IO[str]] = None, width: int = 30,
                 min_interval_s: float = 5.0):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval_s = min_interval_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0
        self._last_step: Optional[int] = None
        self._last_print = 0.0
        self.lines = 0

    def render(self, step: Optional[int], loss: Optional[float] = None, tokens_per_s: Optional[float] = None,
               eta_s: Optional[float] = None, status: str = "", elapsed_s: Optional[float] = None) -> str:
        """The text of one progress line."""
        parts = []
        done = step or 0
        if self.total:
            filled = min(self.width, int(self.width * done / self.total))
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}")
        else:
            parts.append(f"step {done}")
        if loss is not None and math.isfinite(loss):
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None and math.isfinite(tokens_per_s):
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if self.total:
            parts.append(f"ETA {format_duration(eta_s)}")
        if elapsed_s is not None:
            parts.append(f"elapsed {format_duration(elapsed_s)}")
        if status:
            parts.append(status)
        return " | ".join(parts)

    def update(self, step: Optional[int], loss: Optional[float] = None, tokens_per_s: Optional[float] = None,
               eta_s: Optional[float] = None, status: str = "", elapsed_s: Optional[float] = None,
               force: bool = False) -> None:
        """Show the current state (see :meth:`render`)."""
        text = self.render(step, loss, tokens_per_s, eta_s, status, elapsed_s)
        if self.tty:
            pad = max(0, self._last_len - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._last_len = len(text)
            self.stream.flush()
            return
        now = time.monotonic()
        if force or (step != self._last_step and now - self._last_print >= self.min_interval_s):
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_print = now
            self._last_step = step
            self.lines += 1

    def close(self) -> None:
        """End the line (on a terminal)."""
        if self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0


def _load_config(config: Any):
    """An AllConfig from a YAML path, a preset name, a dict of sections or an AllConfig."""
    from mindspeed_ms.core.config import AllConfig, init_configs_from_dict, init_configs_from_yaml  # pylint: disable=import-outside-toplevel

    if isinstance(config, AllConfig):
        return config.copy()
    if isinstance(config, dict):
        return init_configs_from_dict(config)
    if isinstance(config, str) and config in presets.preset_names() and not os.path.exists(config):
        return init_configs_from_dict(presets.load_preset(config))
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config: got {str(config)!r}; allowed: an existing YAML file or a preset "
                                f"({', '.join(presets.preset_names())})")
    return init_configs_from_yaml(str(path))


def _eta(summary, total: Optional[int]) -> Optional[float]:
    """Seconds left from the pace of the steps seen so far (wall time between step events)."""
    if total is None or summary.empty:
        return None
    steps = summary["step"].to_numpy()
    times = summary["time"].to_numpy(dtype="float64")
    done = int(steps[-1])
    if done >= total:
        return 0.0
    recent = slice(max(0, len(steps) - 20), len(steps))
    span_steps = steps[recent][-1] - steps[recent][0]
    if span_steps > 0:
        per_step = (times[recent][-1] - times[recent][0]) / span_steps
    else:
        per_step = float(summary["step_time_ms"].iloc[-1]) / 1000.0
    return max(0.0, (total - done) * per_step)


def run_config(config: Any, workers: int, output: Optional[Union[str, os.PathLike]] = None, *,
               training_iters: Optional[int] = None, device_target: str = "CPU", name: str = "run",
               stream: Optional[IO[str]] = None, report: bool = True, poll_s: float = 0.5,
               timeout_s: Optional[float] = None, job_kwargs: Optional[dict] = None) -> int:
    """Train ``config`` on ``workers`` msrun workers with a terminal progress bar, then report.

    Args:
        config: A YAML path, a preset name, a dict of sections or an AllConfig.
        workers: Number of workers.
        output: The run directory (default: ``runs/<name>-<date>-<time>-<id>``); it must not
            hold a run yet. The report (``training.png``, ``loss_scale.png``, MoE plots,
            ``summary.html``) is written there too.
        training_iters: Override ``training_config.training_iters``.
        device_target: 'CPU', 'Ascend' or 'GPU'.
        name: Job name (run directory prefix).
        stream: Where progress and messages go (default ``sys.stderr``).
        report: Write the report at the end.
        poll_s: How often the event files are read.
        timeout_s: Stop the job after this many seconds.
        job_kwargs: More :class:`~mindspeed_lab.launcher.Job` arguments.

    Returns:
        0 (succeeded), 1 (failed), 2 (the config or the arguments are wrong) or 130 (stopped by
        Ctrl-C).
    """
    from mindspeed_ms.core.config import validate_for_world_size  # pylint: disable=import-outside-toplevel

    from .events import EventReader, step_summary  # pylint: disable=import-outside-toplevel
    from .launcher import Job  # pylint: disable=import-outside-toplevel

    out = stream if stream is not None else sys.stderr

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    try:
        all_config = _load_config(config)
        if training_iters is not None:
            all_config.training_config.training_iters = training_iters
        info = validate_for_world_size(all_config, workers)
    except (OSError, TypeError, ValueError) as exc:
        say(f"mindspeed_lab: the config cannot run on {workers} worker(s): {exc}")
        return EXIT_USAGE
    total = int(all_config.training_config.training_iters or 0) or None
    try:
        job = Job(all_config, workers=workers, run_dir=output, name=name, device_target=device_target,
                  time_limit_s=timeout_s, **(job_kwargs or {}))
    except (OSError, ValueError, TypeError) as exc:
        say(f"mindspeed_lab: cannot create the run: {exc}")
        return EXIT_USAGE
    say(f"run directory: {job.run_dir}")
    say(f"training {total or '?'} steps on {workers} {device_target} worker(s): data parallel "
        f"{info['data_parallel_size']}, model parallel {info['model_parallel_size']}, global batch "
        f"{info['global_batch_size']}")
    bar = ProgressBar(total, out)
    reader = EventReader(job.events_dir)
    stopped = False
    job.start()
    try:
        while True:
            done = job.done
            reader.poll()
            summary = step_summary(reader.steps)
            elapsed = job.elapsed_s
            if summary.empty:
                bar.update(0, status=f"{job.status} (starting {workers} workers)", elapsed_s=elapsed, force=done)
            else:
                last = summary.iloc[-1]
                loss = summary["loss"].dropna()
                bar.update(int(last["step"]), float(loss.iloc[-1]) if len(loss) else None,
                           float(last["tokens_per_s"]), _eta(summary, total), job.status, elapsed, force=done)
            if done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stopped = True
        bar.close()
        say("stopping the job (Ctrl-C) ...")
        job.stop()
    bar.close()
    status = job.wait()
    if status == "succeeded":
        say(f"finished in {format_duration(job.elapsed_s)}")
    elif status == "failed":
        say(f"the job failed: {job.error_summary}")
        logs = job.log_paths()
        if logs:
            say("worker logs: " + ", ".join(str(p) for p in logs.values()))
    else:
        say(f"the job was {status}")
    if report and any(job.events_dir.glob("rank_*.jsonl")):
        from .report import write_report  # pylint: disable=import-outside-toplevel

        try:
            files = write_report(job.run_dir)
        except (OSError, ValueError) as exc:
            say(f"no report: {exc}")
        else:
            say("report: " + ", ".join(str(p.name) for p in files.values()) + f" in {job.run_dir}")
    if stopped:
        return EXIT_STOPPED
    return EXIT_OK if status == "succeeded" else EXIT_FAILED


def run_demo(workers: int = 2, output: Optional[Union[str, os.PathLike]] = None, preset: Optional[str] = None,
             steps: Optional[int] = None, small: Optional[bool] = None, stream: Optional[IO[str]] = None,
             device_target: str = "CPU") -> int:
    """The demo: the demo preset on ``workers`` workers with progress, then its plots.

    Args:
        workers: Number of workers (2: data parallel over both).
        output: The run directory (default: ``runs/demo-<date>-<time>-<id>``).
        preset: The preset to train (default :func:`mindspeed_lab.presets.demo_preset`: ``demo``,
            or ``demo_moe`` once MoE training is switched on).
        steps: Training steps (default: the preset's, or 6 with ``small``).
        small: Tiny settings (default: ``MINDSPEED_LAB_SMALL``).
        stream: Where messages go (default ``sys.stderr``).
        device_target: 'CPU', 'Ascend' or 'GPU'.

    Returns:
        The exit status of :func:`run_config`.
    """
    out = stream if stream is not None else sys.stderr
    name = preset or presets.demo_preset()
    try:
        data = presets.load_preset(name)
    except ValueError as exc:
        out.write(f"mindspeed_lab demo: {exc}\n")
        return EXIT_USAGE
    small = presets.small_mode() if small is None else small
    if small or steps is not None:
        presets.shrink(data, steps or 6)
    moe = int(data.get("moe_config", {}).get("num_experts", 1) or 1) > 1
    model = data["model_config"]
    out.write(f"mindspeed_lab demo: a {model['num_layers']}-layer GPT (hidden {model['hidden_size']}"
              + (f", {data['moe_config']['num_experts']} experts per MoE layer" if moe else "")
              + f") on tiny Shakespeare, {data['training_config']['training_iters']} steps, "
              f"{model.get('compute_dtype', 'float32')} matmuls with dynamic loss scaling (preset {name!r})\n")
    if output is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = Path.cwd() / "runs" / f"demo-{stamp}"
    code = run_config(data, workers, output, name="demo", stream=out, device_target=device_target)
    if code in (EXIT_OK, EXIT_FAILED):
        summary = Path(output) / "summary.html"
        if summary.is_file():
            out.write(f"open {summary} for the plots and the summary\n")
    return code
