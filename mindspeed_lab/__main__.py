"""Command line of mindspeed_lab.

    python -m mindspeed_lab report DIR [--out OUT] [--dpi N]
    python -m mindspeed_lab run CFG.yaml --workers N [--output DIR]    (not available yet)
    python -m mindspeed_lab demo                                       (not available yet)

``report`` writes the plots and ``summary.html`` of a finished (or running) run from its event files.
``run`` and ``demo`` need the training entry point (examples/pretrain_gpt.py), which is not there yet;
they exit with status 2 and say so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

NOT_AVAILABLE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mindspeed_lab",
                                     description="Launch, watch and report mindspeed_ms training runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,demo,report}")

    run = sub.add_parser("run", help="train with a YAML config through msrun (not available yet)")
    run.add_argument("config", help="the YAML config file")
    run.add_argument("--workers", type=int, default=1, help="number of msrun workers (default 1)")
    run.add_argument("--output", default=None, help="run directory (default: runs/<name>-<time>)")

    sub.add_parser("demo", help="a 2-worker MoE GPT run on tinyshakespeare, then its plots (not available yet)")

    report = sub.add_parser("report", help="plots and an HTML summary from a run's events")
    report.add_argument("dir", help="a run directory, its output directory or its events directory")
    report.add_argument("--out", default=None, help="where to write (default: DIR)")
    report.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point (``mindspeed-lab`` console script and ``python -m mindspeed_lab``). Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command in ("run", "demo"):
        sys.stderr.write(f"mindspeed_lab {args.command}: not available yet: it needs the training entry point "
                         "examples/pretrain_gpt.py, which is still being built. Meanwhile, "
                         "mindspeed_lab.launcher.Job(config, workers, script=...) launches any msrun script, and "
                         "'python -m mindspeed_lab report DIR' reports a run's events.\n")
        return NOT_AVAILABLE
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
