"""Short compiled training runs under msrun: the per-step losses and what the trainer logged.

Usage: compiled_cases.py <cases-json> (a JSON list of [name, config-dict] pairs), run with
``MINDSPEED_JIT=1``. Each case returns its losses and grad norms, the trainer's line about
compilation and any fallback warning, so that the test can check that the model chunk really ran
as a compiled graph and not in PyNative mode.
"""

import json
import logging
import sys

from _logs import LogLines
from _worker import run_cases
import training_configs as T


def make_case(data):
    def run():
        logger = logging.getLogger("mindspeed_ms")
        lines = LogLines(logging.INFO)
        old_level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(lines)
        try:
            steps = T.run(data)
        finally:
            logger.removeHandler(lines)
            logger.setLevel(old_level)
        return {"loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
                "log": [line for line in lines.lines if "compile" in line or "PyNative" in line]}
    return run


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    run_cases({name: make_case(data) for name, data in cases})
