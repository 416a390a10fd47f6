"""Forward+backward step time of a tiny GPT with and without context parallelism (CPU, 2 processes).

Run: ``python benchmarks/context_parallel_step_time.py [--seq 64,256] [--steps 5]``. It starts msrun
with 2 CPU workers; in each worker the same model is timed with context_parallel_size=1 (each
process the whole sequence) and with CP=2 for Ulysses and ring attention. Prints one JSON object:
median wall-clock and process-CPU seconds per step (forward + backward of the loss, no optimizer)
per layout and sequence length, and their ratios to CP=1. The numbers are wall-clock on a shared 2-core machine:
compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LAYERS, HIDDEN, HEADS, VOCAB, BATCH = 2, 64, 4, 64, 2
LAYOUTS = {"cp1": (1, "ulysses_cp_algo"), "ulysses_cp2": (2, "ulysses_cp_algo"), "ring_cp2": (2, "megatron_cp_algo")}


def _time_layout(seq, cp, algo, steps):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel

    import mindspeed_ms.core.parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import (DatasetConfig, ModelParallelConfig,  # pylint: disable=import-outside-toplevel
                                          TrainingConfig, TransformerConfig)
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=cp)
    parallel = ModelParallelConfig(context_parallel_size=cp, context_parallel_algo=algo, use_cpu_initialization=True)
    config = TransformerConfig(vocab_size=VOCAB, num_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
                               ffn_hidden_size=4 * HIDDEN, seq_length=seq, parallel_config=parallel,
                               training_config=TrainingConfig(parallel_config=parallel),
                               dataset_config=DatasetConfig(batch_size=BATCH), position_embedding_type="rope")
    model = GPTModel(config)
    rng = np.random.default_rng(0)
    tokens = Tensor(rng.integers(0, VOCAB, (BATCH, seq)).astype(np.int32))
    labels = Tensor(rng.integers(0, VOCAB, (BATCH, seq)).astype(np.int32))
    loss_mask = Tensor(np.ones((BATCH, seq), np.float32))
    params = model.trainable_params()
    step = ms.value_and_grad(lambda: model(tokens, None, None, loss_mask, labels=labels), None, params)
    wall, cpu = [], []
    for i in range(steps + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, grads = step()
        loss.asnumpy()
        for g in grads:
            g.asnumpy()
        if i >= 2:  # two warm-up steps
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def _worker(seqs, steps):
    from _worker import run_cases  # pylint: disable=import-outside-toplevel

    cases = {}
    for seq in seqs:
        for name, (cp, algo) in LAYOUTS.items():
            cases[f"{name}_seq{seq}"] = (lambda s=seq, c=cp, a=algo: _time_layout(s, c, a, steps))
    run_cases(cases)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="64,256", help="comma-separated sequence lengths")
    parser.add_argument("--steps", type=int, default=5)
    if sys.argv[1:2] == ["worker"]:  # inside msrun (a positional marker: msrun would take --worker* itself)
        _worker([int(s) for s in sys.argv[2].split(",")], int(sys.argv[3]))
        return
    args = parser.parse_args()
    seqs = [int(s) for s in args.seq.split(",")]
    from _harness import assert_cases_passed, run_msrun  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="cp_bench_") as tmp:
        result = run_msrun(Path(__file__), 2, ["worker", args.seq, str(args.steps)],
                           workdir=tmp, timeout=1800)
        values = assert_cases_passed(result)
    report = {"device": "CPU", "processes": 2, "model": dict(layers=LAYERS, hidden=HIDDEN, heads=HEADS, batch=BATCH),
              "seconds_per_step": {}, "cpu_seconds_per_step": {}, "wall_ratio_vs_cp1": {}, "cpu_ratio_vs_cp1": {}}
    for seq in seqs:
        for kind, key, ratio in (("wall", "seconds_per_step", "wall_ratio_vs_cp1"),
                                 ("cpu", "cpu_seconds_per_step", "cpu_ratio_vs_cp1")):
            # the slower rank sets the pace of a synchronous step
            per = {name: max(values[r][f"{name}_seq{seq}"][kind] for r in values) for name in LAYOUTS}
            report[key][f"seq{seq}"] = per
            report[ratio][f"seq{seq}"] = {name: per[name] / per["cp1"] for name in LAYOUTS if name != "cp1"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
