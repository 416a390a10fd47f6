"""Compile time of a deep model with and without lazy inline, and the second start with the compile cache.

Run: ``python benchmarks/lazy_inline_compile.py [--layers 24,48] [--rounds 3] [--cache-layers 24]``.

Every measurement is a fresh process (MindSpore keeps compiled graphs per process) that trains
two steps of a deep, narrow GPT (hidden 32, 2 heads, sequence 32, batch 2, vocabulary 65) with
``MINDSPEED_JIT=1``. Step 1 compiles the model chunk (forward and backward) and the optimizer
update, step 2 only runs them, so ``step 1 - step 2`` is the compile time. The variants are
interleaved round by round (the machine is shared: the load averages before and after are
recorded), each figure is a median with its spread.

* ``lazy_inline``: ``parallel_config.lazy_inline`` False against True (MindSpore's
  ``lazy_inline`` on the transformer layers; on CPU with the front-end policy, see
  docs/performance.md). The losses of both must agree.
* ``compile_cache``: ``training_config.enable_compile_cache`` with an emptied cache (the first
  start, which saves the graphs) against a filled one (a second start, which loads them), also
  the whole process's wall time (interpreter start, imports and model build included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _common import ROOT, VOCAB, load_average, machine, summary

_SHAPE = {"hidden": 32, "heads": 2, "seq": 32, "batch": 2}


def config_dict(layers: int, output_dir: str, lazy_inline: bool = False, cache_dir: str = "") -> Dict[str, Any]:
    """The benchmark model's configuration (a dict for ``init_configs_from_dict``)."""
    hidden, seq = _SHAPE["hidden"], _SHAPE["seq"]
    # Without the contiguous gradient buffers: their compiled split of one vector into every
    # parameter's gradient costs minutes to compile at 24 layers (290 sections) and would hide
    # the model's own compile time, which is what lazy inline changes.
    training = {"seed": 1, "training_iters": 2, "log_interval": 10 ** 6, "output_dir": output_dir,
                "wrap_with_ddp": False}
    if cache_dir:
        training.update(enable_compile_cache=True, compile_cache_path=cache_dir)
    return {
        "training_config": training,
        "parallel_config": {"use_cpu_initialization": True, "lazy_inline": bool(lazy_inline)},
        "dataset_config": {"dataset_type": "char", "batch_size": _SHAPE["batch"], "micro_batch_num": 1,
                           "seq_length": seq, "seed": 1},
        "optimizer_config": {"optimizer_type": "AdamW", "learning_rate": 1.0e-3, "min_lr": 1.0e-4,
                             "lr_decay_style": "constant", "weight_decay": 0.0},
        "model_config": {"vocab_size": VOCAB, "seq_length": seq, "num_layers": layers,
                         "num_attention_heads": _SHAPE["heads"], "hidden_size": hidden,
                         "ffn_hidden_size": 4 * hidden, "max_position_embeddings": seq,
                         "position_embedding_type": "absolute", "normalization": "LayerNorm", "hidden_act": "gelu",
                         "init_method_std": 0.02},
    }


def child(path: str) -> None:
    """Train the config in ``path`` (JSON); print step times and losses as JSON."""
    start = time.perf_counter()
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    from mindspeed_ms.core.config import init_configs_from_dict  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.training.training import pretrain  # pylint: disable=import-outside-toplevel

    all_config = init_configs_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    steps: List[Dict[str, Any]] = []

    def provider(pre_process=True, post_process=True):
        return GPTModel(all_config.model_config, pre_process=pre_process, post_process=post_process)

    pretrain(None, provider, None, all_config=all_config,
             step_callbacks=[lambda step, metrics: steps.append(dict(metrics, step=step))])
    print(json.dumps({"step_ms": [s["step_time_ms"] for s in steps], "loss": [s["loss"] for s in steps],
                      "grad_norm": [s["grad_norm"] for s in steps], "process_s": time.perf_counter() - start},
                     default=float))


def run_child(config: Dict[str, Any], workdir: Path, name: str) -> Dict[str, Any]:
    """One fresh process; its JSON plus the wall time seen from outside (interpreter start included)."""
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3",
               MINDSPEED_JIT="1")
    for key in ("MS_COMPILER_CACHE_ENABLE", "MS_COMPILER_CACHE_PATH", "ENABLE_LAZY_INLINE",
                "ENABLE_LAZY_INLINE_NO_PIPELINE"):
        env.pop(key, None)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                         capture_output=True, text=True, env=env, timeout=1800, check=False)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out["compile_s"] = (out["step_ms"][0] - out["step_ms"][1]) / 1000.0
    return out


def _figures(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {"compile_s": summary([r["compile_s"] for r in runs]),
            "first_step_s": summary([r["step_ms"][0] / 1000.0 for r in runs]),
            "second_step_ms": summary([r["step_ms"][1] for r in runs]),
            "wall_s": summary([r["wall_s"] for r in runs]),
            "loss": runs[0]["loss"], "grad_norm": runs[0]["grad_norm"]}


def bench_lazy_inline(layer_counts: List[int], rounds: int, workdir: Path) -> Dict[str, Any]:
    """Compile time with lazy inline off and on, interleaved, per depth."""
    runs: Dict[int, Dict[bool, List[Dict[str, Any]]]] = {n: {False: [], True: []} for n in layer_counts}
    for r in range(rounds):
        for n in layer_counts:
            for lazy in ((False, True) if r % 2 == 0 else (True, False)):
                name = f"li_{n}_{int(lazy)}_{r}"
                runs[n][lazy].append(run_child(config_dict(n, str(workdir / name), lazy), workdir, name))
                print(f"{name}: compile {runs[n][lazy][-1]['compile_s']:.2f} s", file=sys.stderr, flush=True)
    out: Dict[str, Any] = {}
    for n in layer_counts:
        off, on = _figures(runs[n][False]), _figures(runs[n][True])
        out[str(n)] = {
            "off": off, "on": on,
            "compile_ratio_on_over_off": round(on["compile_s"]["median"] / off["compile_s"]["median"], 3),
            "compile_saved_s": round(off["compile_s"]["median"] - on["compile_s"]["median"], 2),
            "same_losses": all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(on["loss"], off["loss"])),
        }
    return out


def bench_compile_cache(layers: int, rounds: int, workdir: Path) -> Dict[str, Any]:
    """First start (empty cache) against second start (filled cache), interleaved."""
    cache = workdir / "cache"
    cold: List[Dict[str, Any]] = []
    warm: List[Dict[str, Any]] = []
    plain: List[Dict[str, Any]] = []
    for r in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        name = f"cache_{layers}_{r}"
        plain.append(run_child(config_dict(layers, str(workdir / (name + "_plain"))), workdir, name + "_plain"))
        cold.append(run_child(config_dict(layers, str(workdir / name), cache_dir=str(cache)), workdir, name + "_cold"))
        warm.append(run_child(config_dict(layers, str(workdir / name), cache_dir=str(cache)), workdir, name + "_warm"))
        print(f"{name}: plain {plain[-1]['wall_s']:.1f} s, first start {cold[-1]['wall_s']:.1f} s, "
              f"second start {warm[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    saved = sorted(p.name for p in cache.rglob("*.mindir"))
    first, second, off = _figures(cold), _figures(warm), _figures(plain)
    return {
        "layers": layers, "no_cache": off, "first_start": first, "second_start": second,
        "graphs_saved": len(saved),
        "first_step_ratio_second_over_first": round(second["first_step_s"]["median"]
                                                    / first["first_step_s"]["median"], 3),
        "wall_ratio_second_over_first": round(second["wall_s"]["median"] / first["wall_s"]["median"], 3),
        "wall_saved_s": round(first["wall_s"]["median"] - second["wall_s"]["median"], 2),
        "same_losses": second["loss"] == first["loss"] == off["loss"],
    }


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="24,48", help="depths for the lazy-inline comparison")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache-layers", type=int, default=24, help="depth for the compile-cache comparison (0: skip)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    result: Dict[str, Any] = {"benchmark": "lazy_inline_compile", "machine": machine(), "shape": _SHAPE,
                              "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="lazy_inline_bench_") as tmp:
        workdir = Path(tmp)
        layer_counts = [int(x) for x in args.layers.split(",") if x]
        if layer_counts:
            result["lazy_inline"] = bench_lazy_inline(layer_counts, args.rounds, workdir)
        result["load_middle"] = load_average()
        if args.cache_layers:
            result["compile_cache"] = bench_compile_cache(args.cache_layers, args.rounds, workdir)
    result["load_after"] = load_average()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
