"""Command line of mindspeed_lab.

    python -m mindspeed_lab demo [--workers 2] [--output DIR] [--preset NAME] [--steps N] [--small]
    python -m mindspeed_lab run CFG.yaml --workers N [--output DIR] [--training-iters N] [--device-target T]
    python -m mindspeed_lab report DIR [--out OUT] [--dpi N]

``demo`` (no arguments needed) trains the demo preset on 2 CPU workers with a progress bar and
leaves its plots and ``summary.html`` in the run directory; ``run`` does the same for any YAML
config; ``report`` writes the plots and ``summary.html`` of a run from its event files.
Exit statuses: 0 success, 1 the job failed, 2 bad arguments or config, 130 stopped with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mindspeed_lab",
                                     description="Launch, watch and report mindspeed_ms training runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,run,report}")

    demo = sub.add_parser("demo", help="train a small GPT on tiny Shakespeare with 2 workers, then show its plots")
    demo.add_argument("--workers", type=int, default=2, help="number of msrun workers (default 2)")
    demo.add_argument("--output", default=None, help="run directory (default: runs/demo-<time>)")
    demo.add_argument("--preset", default=None,
                      help="preset to train (default: 'demo', or 'demo_moe' when MoE training is switched on)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    demo.add_argument("--small", action="store_true", default=None,
                      help="tiny settings (also MINDSPEED_LAB_SMALL=1)")
    demo.add_argument("--device-target", default="CPU", choices=["CPU", "Ascend", "GPU"])

    run = sub.add_parser("run", help="train with a YAML config through msrun, with a progress bar and a report")
    run.add_argument("config", help="the YAML config file (or a preset name)")
    run.add_argument("--workers", type=int, default=1, help="number of msrun workers (default 1)")
    run.add_argument("--output", default=None, help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--training-iters", type=int, default=None, help="override training_config.training_iters")
    run.add_argument("--device-target", default="CPU", choices=["CPU", "Ascend", "GPU"])
    run.add_argument("--no-report", action="store_true", help="do not write the plots and summary.html")

    report = sub.add_parser("report", help="plots and an HTML summary from a run's events")
    report.add_argument("dir", help="a run directory, its output directory or its events directory")
    report.add_argument("--out", default=None, help="where to write (default: DIR)")
    report.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point (``mindspeed-lab`` console script and ``python -m mindspeed_lab``). Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command in ("run", "demo") and args.workers < 1:
        sys.stderr.write(f"mindspeed_lab {args.command}: --workers: got {args.workers}; allowed: an integer >= 1\n")
        return 2
    if args.command == "demo":
        from .cli import run_demo  # pylint: disable=import-outside-toplevel
        if args.steps is not None and args.steps < 1:
            sys.stderr.write(f"mindspeed_lab demo: --steps: got {args.steps}; allowed: an integer >= 1\n")
            return 2
        return run_demo(workers=args.workers, output=args.output, preset=args.preset, steps=args.steps,
                        small=args.small, device_target=args.device_target)
    if args.command == "run":
        from .cli import run_config  # pylint: disable=import-outside-toplevel
        return run_config(args.config, args.workers, args.output, training_iters=args.training_iters,
                          device_target=args.device_target, report=not args.no_report)
    from .report import write_report  # pylint: disable=import-outside-toplevel
    try:
        files = write_report(args.dir, args.out, dpi=args.dpi)
    except FileNotFoundError as exc:
        sys.stderr.write(f"mindspeed_lab report: {exc}\n")
        return 1
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
