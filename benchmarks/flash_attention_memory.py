"""Peak host memory of attention forward + backward: flash (blockwise) against plain (full scores).

Run: ``python benchmarks/flash_attention_memory.py [--seq 4096] [--block 256]``.

Each variant runs in a fresh process (so one cannot reuse the other's allocator pool). After a
small warm-up call, a sampler thread reads the process's resident set size every millisecond
while one forward + backward at ``--seq`` runs; reported is the sampled peak minus the resident
size just before the call. (The kernel's ``ru_maxrss`` is not used: a peak reached while
importing MindSpore would hide the attention's own allocations.) One S x S float32 score matrix
is ``4 * S * S`` bytes; the flash path should stay well below it, the plain path above it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from _common import ROOT, machine

_MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np, psutil, mindspore as ms
    from mindspore import Tensor
    ms.set_device("CPU")
    from mindspeed_ms.core.flash_attention import flash_attention, plain_attention
    which, s, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if which == "flash":
        fn = lambda a, b, c: flash_attention(a, b, c, causal=True, block_size=block)
    else:
        fn = lambda a, b, c: plain_attention(a, b, c, causal=True)
    def step(n):
        rng = np.random.default_rng(0)
        q, k, v = (Tensor(rng.standard_normal((1, 1, n, 16)).astype(np.float32)) for _ in range(3))
        g = ms.grad(lambda a, b, c: fn(a, b, c).sum(), grad_position=(0, 1, 2))(q, k, v)
        return float(sum(x.asnumpy().sum() for x in g))
    step(block)
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
    step(s)
    elapsed = time.perf_counter() - t0
    done.set(); t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(json.dumps({"peak_increase_bytes": peak[0] - base, "seconds": elapsed}))
""")


def measure(which: str, seq: int, block: int) -> dict:
    """Run one variant in a fresh process; its peak RSS increase (bytes) and wall time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), GLOG_v="3")
    res = subprocess.run([sys.executable, "-c", _MEASURE, which, str(seq), str(block)],
                         capture_output=True, text=True, env=env, timeout=1200, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    matrix = 4 * args.seq * args.seq
    flash = measure("flash", args.seq, args.block)
    plain = measure("plain", args.seq, args.block)
    print(json.dumps({
        "benchmark": "flash_attention_memory",
        "machine": machine(),
        "seq": args.seq, "block": args.block, "score_matrix_bytes": matrix,
        "flash": flash, "plain": plain,
        "flash_over_matrix": flash["peak_increase_bytes"] / matrix,
        "plain_over_matrix": plain["peak_increase_bytes"] / matrix,
        "target": "flash_over_matrix < 0.5 (the plain path materialises at least one matrix)",
        "meets_target": flash["peak_increase_bytes"] < matrix / 2,
    }, indent=2))


if __name__ == "__main__":
    main()
