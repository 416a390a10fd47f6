"""Activation memory kept for the backward, and peak host memory, with and without recomputation.

Run: ``python benchmarks/recompute_memory.py [--layers 8] [--seq 512] [--hidden 256] [--reps 3]``.

Settings: ``none``; ``selective`` (``recompute_granularity: selective``: the core attention of
every layer recomputed); ``full`` (``recompute_granularity: full``, ``recompute_method: uniform``,
``recompute_num_layers: 1``: every layer recomputed). Each measurement is one training step
(forward + backward of the GPT model, dropout 0.1) in a fresh process, the settings interleaved
over ``--reps`` rounds. Two figures per step:

* ``activation_bytes``: the bytes of the tensors autograd saves for the backward during the
  forward (:class:`mindspeed_ms.core.activation_memory.SavedActivations`: every saved tensor
  once, parameters left out). This is exact and does not depend on the allocator.
* ``peak_increase_bytes``: the process's resident set size sampled every millisecond during the
  step (the first of the process: a warm-up would leave its activations in the allocator's pool),
  peak minus the size just before; ``max_rss_bytes``: the process's peak resident size
  (``ru_maxrss``: imports, model and the step). Noisier than the count: the allocator keeps
  freed blocks and the first step also builds kernels (alike in every setting).

The loss of each setting is printed too: recomputation must not change it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from _common import ROOT, load_average, machine, summary

SETTINGS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}

_MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np, psutil, mindspore as ms
    from mindspore import Tensor
    ms.set_device("CPU")
    from mindspeed_ms.core.activation_memory import SavedActivations
    from mindspeed_ms.core.config import DatasetConfig, ModelParallelConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.core.tensor_parallel.random import model_parallel_seed
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    extra, layers, heads, hidden, seq, batch, vocab = json.loads(sys.argv[1])
    parallel = ModelParallelConfig(use_cpu_initialization=True)
    config = TransformerConfig(
        vocab_size=vocab, num_layers=layers, num_attention_heads=heads, hidden_size=hidden,
        ffn_hidden_size=4 * hidden, seq_length=seq, parallel_config=parallel,
        training_config=TrainingConfig(parallel_config=parallel), dataset_config=DatasetConfig(batch_size=batch),
        init_method_std=0.02, hidden_dropout=0.1, attention_dropout=0.1, **extra)
    model_parallel_seed(1234)
    model = GPTModel(config)
    model.set_train(True)
    params = model.trainable_params()
    rng = np.random.default_rng(0)
    tokens = Tensor(rng.integers(0, vocab, (batch, seq)).astype(np.int32))
    labels = Tensor(rng.integers(0, vocab, (batch, seq)).astype(np.int32))
    mask = Tensor(np.ones((batch, seq), np.float32))
    def step():
        counter = SavedActivations(params)
        def forward():
            with counter:
                return model(tokens, None, None, mask, labels=labels)
        loss, grads = ms.value_and_grad(forward, None, params)()
        norm = float(sum(float((g * g).sum().asnumpy()) for g in grads))
        return float(loss.asnumpy()), norm, counter
    # no warm-up step: its freed activations would stay in the allocator's pool and hide the
    # measured step's peak (the first step's one-off costs are the same in every setting)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    loss, norm, counter = step()
    elapsed = time.perf_counter() - t0
    done.set(); t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    import resource
    print(json.dumps({"loss": loss, "grad_sq_norm": norm, "activation_bytes": counter.bytes,
                      "saved_tensors": counter.count, "peak_increase_bytes": peak[0] - base,
                      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": elapsed}))
""")


def measure(extra: dict, shape: list) -> dict:
    """One training step of one setting in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    res = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps([extra] + shape)],
                         capture_output=True, text=True, env=env, timeout=1800, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    shape = [args.layers, args.heads, args.hidden, args.seq, args.batch, 65]
    load_before = load_average()
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.reps):
        for name, extra in SETTINGS.items():  # interleaved: drift on the machine hits all alike
            runs[name].append(measure(extra, shape))
    result = {}
    for name, items in runs.items():
        result[name] = {
            "loss": items[0]["loss"], "grad_sq_norm": items[0]["grad_sq_norm"],
            "activation_bytes": items[0]["activation_bytes"],
            "activation_bytes_same_every_run": len({i["activation_bytes"] for i in items}) == 1,
            "saved_tensors": items[0]["saved_tensors"],
            "peak_increase_bytes": summary([i["peak_increase_bytes"] for i in items], 0),
            "max_rss_bytes": summary([i["max_rss_bytes"] for i in items], 0),
            "step_seconds": summary([i["seconds"] for i in items], 3),
        }
    none = result["none"]

    def ratio(name: str, key: str) -> float:
        mine = result[name][key] if key == "activation_bytes" else result[name][key]["median"]
        ref = none[key] if key == "activation_bytes" else none[key]["median"]
        return round(mine / ref, 4)

    score_matrix = 4 * args.batch * args.heads * args.seq * args.seq
    print(json.dumps({
        "benchmark": "recompute_memory",
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "model": {"layers": args.layers, "heads": args.heads, "hidden": args.hidden, "seq": args.seq,
                  "batch": args.batch, "vocab": 65, "dropout": 0.1},
        "attention_score_bytes_per_layer": score_matrix,
        "settings": SETTINGS,
        "results": result,
        "activation_ratio_vs_none": {name: ratio(name, "activation_bytes") for name in ("selective", "full")},
        "peak_increase_ratio_vs_none": {name: ratio(name, "peak_increase_bytes") for name in ("selective", "full")},
        "max_rss_ratio_vs_none": {name: ratio(name, "max_rss_bytes") for name in ("selective", "full")},
        "step_time_ratio_vs_none": {name: ratio(name, "step_seconds") for name in ("selective", "full")},
        "same_loss": len({round(r["loss"], 6) for r in result.values()}) == 1,
    }, indent=2))


if __name__ == "__main__":
    main()
