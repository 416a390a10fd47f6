"""Train once in this (fresh) process from a JSON config; print the per-step metrics as JSON.

Used by tests that need a new process per run (MindSpore's compile cache is per process):
``python tests/_train_child.py CONFIG.json`` prints ``{"steps": [...], "seconds": ...}`` as its last line.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mindspore as ms  # noqa: E402

import training_configs as T  # noqa: E402


def main(path: str) -> None:
    ms.set_device("CPU")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    start = time.perf_counter()
    steps = T.run(data)
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - start}, default=float))


if __name__ == "__main__":
    main(sys.argv[1])
