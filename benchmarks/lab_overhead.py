"""The lab's cost: step time with a live-plotting process on vs off, and the step-to-plot delay.

Run: ``python benchmarks/lab_overhead.py [--config nanogpt] [--blocks 8] [--steps 15]
[--interval 1.0]``.

The training runs in this process (mindspeed_ms's ``Trainer``, default execution mode, writing
its event stream as ``Trainer.run`` does). The plotting runs as a separate process, as a notebook
kernel would: ``mindspeed_lab.LiveDashboard`` on the run's events directory with its default
redraw bounds (``interval_s``, ``max_cpu_fraction``) and ``start()``, which redraws from a
thread at a lower scheduling priority (``nice``), rendering PNGs (``display=False``,
``save_dir``) instead of showing them. Blocks of ``--steps`` steps alternate between plotting off
and on (the plotter is started before an "on" block and stopped after it).

Reported: median and spread of the step time in both states and the relative difference; the
plotter's CPU seconds per wall second; and the delay from a step's end (its ``step`` event's
time) to the end of the first redraw that includes it, over all steps of the "on" blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CONFIGS, ROOT, all_config_dict, load_average, machine, summary  # noqa: E402


def plotter(events_dir: str, log_path: str, interval: float) -> None:
    """The plotting process: redraw on new events, log ``<wall time> <last step drawn>`` per redraw."""
    sys.path.insert(0, str(ROOT))
    from mindspeed_lab.plots import LiveDashboard  # pylint: disable=import-outside-toplevel

    out_dir = tempfile.mkdtemp(prefix="lab_plots_")
    dash = LiveDashboard(events_dir, display=False, save_dir=out_dir, interval_s=interval)
    original = dash.update
    with open(log_path, "a", encoding="utf-8") as log:
        def update(force: bool = False) -> bool:
            drew = original(force)
            if drew:
                steps = dash.reader.steps
                last = int(steps["step"].max()) if not steps.empty else -1
                log.write(f"{time.time():.6f} {last}\n")
                log.flush()
            return drew

        dash.update = update
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        dash.start()  # as a notebook does: redraws from a thread at the dashboard's lower priority
        while not stopped.wait(0.5):
            pass
        dash.stop()


class Training:
    """The Trainer, stepped as Trainer.run steps it, with each step's event time kept."""

    def __init__(self, cfg: Dict[str, int], output_dir: str, iters: int):
        from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.core.config import init_configs_from_dict  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.training.training import Trainer  # pylint: disable=import-outside-toplevel

        ps.destroy_model_parallel()
        all_config = init_configs_from_dict(all_config_dict(cfg, output_dir, iters))
        self.trainer = Trainer(all_config, lambda pre_process=True, post_process=True: GPTModel(
            all_config.model_config, pre_process=pre_process, post_process=post_process))
        self.trainer.events.run_start(1, {}, {}, training_iters=iters)
        self.tokens = cfg["batch"] * cfg["seq"]
        self.step_end: Dict[int, float] = {}

    def steps(self, n: int) -> List[float]:
        trainer = self.trainer
        times = []
        for _ in range(n):
            start = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            elapsed = time.perf_counter() - start
            metrics["step_time_ms"] = elapsed * 1000.0
            metrics["tokens_per_s"] = self.tokens / elapsed
            trainer._after_step(metrics)  # pylint: disable=protected-access  # writes the step event
            self.step_end[trainer.step] = time.time()
            times.append(time.perf_counter() - start)
        return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="nanogpt", choices=sorted(CONFIGS))
    parser.add_argument("--blocks", type=int, default=8, help="blocks per state (off/on alternate)")
    parser.add_argument("--steps", type=int, default=15, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="LiveDashboard interval_s (its default: 1.0)")
    if sys.argv[1:2] == ["plotter"]:
        plotter(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return None
    args = parser.parse_args(argv)

    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import psutil  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    cfg = CONFIGS[args.config]
    report: Dict[str, Any] = {"benchmark": "lab_overhead", "machine": machine(), "config": args.config,
                              "shape": cfg, "dashboard_interval_s": args.interval, "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="lab_bench_") as tmp:
        training = Training(cfg, os.path.join(tmp, "run"), args.warmup + 2 * args.blocks * args.steps)
        events_dir = os.path.join(tmp, "run", "events")
        training.steps(args.warmup)
        log_path = os.path.join(tmp, "plotter.log")
        off: List[float] = []
        on: List[float] = []
        on_steps: List[int] = []
        plot_cpu, plot_wall = 0.0, 0.0
        for _ in range(args.blocks):
            off.extend(training.steps(args.steps))
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "plotter", events_dir, log_path,
                                     str(args.interval)], cwd=str(ROOT))
            started = time.time()
            time.sleep(3.0)  # the plotter imports matplotlib/pandas and draws what exists: not a steady state
            first = training.trainer.step + 1
            on.extend(training.steps(args.steps))
            on_steps.extend(range(first, training.trainer.step + 1))
            time.sleep(args.interval + 2.0)  # let the last steps reach the plot
            try:
                cpu = psutil.Process(proc.pid).cpu_times()
                plot_cpu += cpu.user + cpu.system
                plot_wall += time.time() - started
            except psutil.Error:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        redraws = []
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                when, last = line.split()
                redraws.append((float(when), int(last)))
        delays = []
        for step in on_steps:
            shown = [when for when, last in redraws if last >= step and when >= training.step_end[step]]
            if shown:
                delays.append(min(shown) - training.step_end[step])
        training.trainer.events.close()
    med_off = summary([t * 1000 for t in off], 1)
    med_on = summary([t * 1000 for t in on], 1)
    report.update({
        "step_ms_plotting_off": med_off,
        "step_ms_plotting_on": med_on,
        "step_time_increase": round(med_on["median"] / med_off["median"] - 1.0, 4),
        "plotter_cpu_fraction": round(plot_cpu / plot_wall, 3) if plot_wall else None,
        "redraws": len(redraws),
        "step_to_plot_delay_s": summary(delays, 2),
        "steps_never_plotted": len(on_steps) - len(delays),
        "compiled": dict(training.trainer.compilation),
        "load_after": load_average(),
    })
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
