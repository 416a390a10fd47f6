"""Short training runs under msrun, reporting every step's metrics.

Usage: train_cases.py <cases-json> (a JSON list of [name, config-dict] pairs). Each case trains
in this job (parallel state re-initialised per case) and returns the per-step losses, learning
rates, grad norms and overflow flags; the test compares them with single-process runs.
"""

import json
import sys

from _worker import run_cases
import training_configs as T


def make_case(data):
    def run():
        steps = T.run(data)
        return [{k: s[k] for k in ("step", "loss", "lr", "grad_norm", "overflow")} for s in steps]
    return run


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    run_cases({name: make_case(data) for name, data in cases})
