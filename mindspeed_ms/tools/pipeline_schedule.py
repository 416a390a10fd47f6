"""Draw the pipeline schedules as the code runs them (the pictures in docs/pipeline.md).

Usage::

    python -m mindspeed_ms.tools.pipeline_schedule                  # print every picture
    python -m mindspeed_ms.tools.pipeline_schedule --pp 4 --vpp 2 -m 8   # one layout
    python -m mindspeed_ms.tools.pipeline_schedule --write docs/pipeline.md

``--write`` replaces the text between ``<!-- schedule:NAME -->`` and ``<!-- /schedule:NAME -->``
markers with the current pictures, so the document is regenerated from the scheduler itself
(tests/test_pipeline_schedule.py checks that it is up to date).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, Optional

from mindspeed_ms.core.pipeline_parallel.schedule_plan import build_plan, render_orders, render_timeline

__all__ = ["picture", "pictures", "write_pictures", "main"]

# the layouts shown in docs/pipeline.md: name -> (micro-batches, stages, chunks per stage)
LAYOUTS = {
    "1f1b": (8, 4, None),
    "interleaved": (8, 4, 2),
    "interleaved-pp2": (4, 2, 2),
}


def picture(num_microbatches: int, pipeline_size: int, num_chunks: Optional[int] = None) -> str:
    """Each rank's order, then the tick timeline, as one fenced text block."""
    plan = build_plan(num_microbatches, pipeline_size, num_chunks)
    title = (f"pp={pipeline_size}, micro-batches={num_microbatches}"
             + (f", chunks per rank={num_chunks}" if num_chunks else ""))
    body = [title, "", "order per rank:", render_orders(num_microbatches, pipeline_size, num_chunks), "",
            "ticks (one step per rank per tick, then that tick's transfers):",
            render_timeline(plan, chunked=num_chunks is not None)]
    return "```text\n" + "\n".join(body) + "\n```"


def pictures() -> Dict[str, str]:
    """The pictures of docs/pipeline.md by marker name."""
    return {name: picture(*layout) for name, layout in LAYOUTS.items()}


def write_pictures(path: Path) -> None:
    """Replace every marked block of ``path`` with the current picture."""
    text = path.read_text(encoding="utf-8")
    for name, block in pictures().items():
        pattern = re.compile(rf"(<!-- schedule:{re.escape(name)} -->\n).*?(\n<!-- /schedule:{re.escape(name)} -->)",
                             re.S)
        if not pattern.search(text):
            raise ValueError(f"{path} has no <!-- schedule:{name} --> ... <!-- /schedule:{name} --> block")
        text = pattern.sub(lambda m, b=block: m.group(1) + b + m.group(2), text)
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, help="pipeline stages")
    parser.add_argument("--vpp", type=int, help="model chunks per stage (interleaved)")
    parser.add_argument("-m", "--microbatches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--write", type=Path, help="update the marked blocks of this Markdown file")
    args = parser.parse_args(argv)
    if args.write:
        write_pictures(args.write)
        return 0
    if args.pp:
        print(picture(args.microbatches, args.pp, args.vpp))
        return 0
    print("\n\n".join(pictures().values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
