"""Shared helpers of the benchmarks: statistics, the machine's state, matmul peaks, model FLOPs.

Every benchmark prints one JSON object. Timings on a shared machine are noisy, so each number is
a median over repetitions with its spread, and everything that is compared is measured in the
same run, interleaved (see docs/performance.md, "Method").
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _training_log_to_stderr() -> None:
    """Send the training logger (stdout by default) to stderr: a benchmark's stdout is its JSON."""
    logger = logging.getLogger("mindspeed_ms")
    if not logger.handlers:  # mindspeed_ms.training.training.get_logger then keeps this handler
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_training_log_to_stderr()

# The two configurations of issue 11: (layers, heads, hidden, seq, batch); vocabulary 65 (the
# characters of tiny Shakespeare), ffn = 4 * hidden, learned positions, LayerNorm, GELU, tied
# embeddings, AdamW (0.9, 0.99), weight decay 0.1, gradient clipping at 1.0.
CONFIGS = {
    "nanogpt": {"layers": 4, "heads": 4, "hidden": 128, "seq": 64, "batch": 12},
    "compute": {"layers": 6, "heads": 6, "hidden": 384, "seq": 256, "batch": 8},
}
VOCAB = 65


def summary(values: Sequence[float], digits: int = 2) -> Dict[str, Any]:
    """Median, spread (min, max, interquartile range) and count of ``values``."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"median": None, "n": 0}
    if len(vals) >= 4:
        q = statistics.quantiles(vals, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = vals[-1] - vals[0]
    return {"median": round(statistics.median(vals), digits), "min": round(vals[0], digits),
            "max": round(vals[-1], digits), "iqr": round(iqr, digits), "n": len(vals)}


def load_average() -> List[float]:
    """The 1, 5 and 15 minute load averages (other work on the machine distorts timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine() -> Dict[str, Any]:
    """CPU model, cores, Python and library versions."""
    info: Dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count(),
                            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    for name in ("mindspore", "numpy", "torch"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # pylint: disable=broad-except
            info[name] = None
    return info


def megatron_flops(layers: int, hidden: int, seq: int, batch: int, vocab: int = VOCAB) -> float:
    """Model FLOPs of one training step (forward + backward), Narayanan et al. 2021.

    ``72 B s l h^2 (1 + s / (6 h) + V / (12 l h))`` for a GPT with ffn = 4h, no recomputation.
    """
    return 72.0 * batch * seq * layers * hidden ** 2 * (1.0 + seq / (6.0 * hidden) + vocab / (12.0 * layers * hidden))


def time_repeated(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> List[float]:
    """Wall-clock seconds of ``fn()`` per call (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def matmul_peaks(n: int = 2048, repeats: int = 5, libraries: Sequence[str] = ("numpy", "mindspore", "torch"),
                 interleave: int = 3) -> Dict[str, Any]:
    """GFLOP/s of an ``n x n`` float32 matmul per library, interleaved, median over repetitions.

    ``mindspore`` is the matmul inside ``mindspore.jit`` (what compiled steps run),
    ``mindspore_pynative`` the same call in PyNative mode.

    The largest median is taken as the machine's peak (the denominator of MFU).
    """
    import numpy as np  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    runners: Dict[str, Callable[[], Any]] = {}
    if "numpy" in libraries:
        runners["numpy"] = lambda: a @ b
    if "mindspore" in libraries:
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        from mindspore import ops  # pylint: disable=import-outside-toplevel

        ta, tb = ms.Tensor(a), ms.Tensor(b)
        # PyNative and compiled graphs select different CPU matmul kernels (graph: ~1.5x faster
        # here); the compiled training step uses the graph one, so both are reported
        runners["mindspore_pynative"] = lambda: ops.matmul(ta, tb).asnumpy()
        compiled_matmul = ms.jit(ops.matmul)
        runners["mindspore"] = lambda: compiled_matmul(ta, tb).asnumpy()
    if "torch" in libraries:
        try:
            import torch  # pylint: disable=import-outside-toplevel

            xa, xb = torch.from_numpy(a), torch.from_numpy(b)
            runners["torch"] = lambda: torch.matmul(xa, xb)
        except ImportError:
            pass
    times: Dict[str, List[float]] = {k: [] for k in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(interleave):
        for name, fn in runners.items():
            times[name].extend(time_repeated(fn, max(1, repeats // interleave), warmup=0))
    flops = 2.0 * n ** 3
    out: Dict[str, Any] = {"n": n}
    for name, ts in times.items():
        out[name] = summary([flops / t / 1e9 for t in ts], 1)
    medians = [v["median"] for k, v in out.items() if isinstance(v, dict) and v.get("median")]
    out["peak_gflops"] = max(medians) if medians else None
    return out


def all_config_dict(cfg: Dict[str, int], output_dir: str, iters: int) -> Dict[str, Any]:
    """The training configuration (a dict for ``init_configs_from_dict``) of one of :data:`CONFIGS`."""
    hidden = cfg["hidden"]
    return {
        "training_config": {"seed": 1337, "training_iters": iters, "log_interval": 10 ** 6, "output_dir": output_dir,
                            "wrap_with_ddp": True,
                            "grad_clip_kwargs": {"grad_clip_type": "ClipGlobalNorm", "clip_value": 1.0}},
        "parallel_config": {"use_cpu_initialization": True},
        "dataset_config": {"dataset_type": "char", "batch_size": cfg["batch"], "micro_batch_num": 1,
                           "seq_length": cfg["seq"], "seed": 1337},
        "optimizer_config": {"optimizer_type": "AdamW", "learning_rate": 1.0e-3, "min_lr": 1.0e-4,
                             "lr_decay_style": "cosine", "lr_warmup_iters": 1, "lr_decay_iters": iters + 10,
                             "weight_decay": 0.1,
                             "betas": [0.9, 0.99], "eps": 1.0e-8},
        "model_config": {"vocab_size": VOCAB, "seq_length": cfg["seq"], "num_layers": cfg["layers"],
                         "num_attention_heads": cfg["heads"], "hidden_size": hidden, "ffn_hidden_size": 4 * hidden,
                         "max_position_embeddings": cfg["seq"], "position_embedding_type": "absolute",
                         "normalization": "LayerNorm", "hidden_act": "gelu", "init_method_std": 0.02},
    }
