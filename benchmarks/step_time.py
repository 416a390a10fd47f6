"""Training step time of mindspeed_ms against plain PyTorch, and model FLOPs utilisation.

Run: ``python benchmarks/step_time.py [--configs nanogpt,compute] [--rounds 5] [--steps 4]
[--modes jit,pynative,plain] [--no-torch]``. Needs ``torch`` (``pip install -e .[bench]``) for the
baseline; without it only mindspeed_ms is timed.

One process, float32. For each configuration (issue 11: nanoGPT's CPU one, 4 layers x 4 heads x
128 hidden, seq 64, batch 12; and a compute-bound one, 6 x 6 x 384, seq 256, batch 8) it builds:

* mindspeed_ms's ``Trainer`` (the real training step: data, forward/backward through the
  schedule, data-parallel gradient buffers, overflow check, gradient norm and clipping, AdamW,
  event stream), once per ``--modes`` entry: ``jit`` = the default (compiled model and
  optimizer), ``pynative`` = ``MINDSPEED_JIT=0``;
* with ``plain`` in ``--modes``: the same architecture and optimizer written directly in
  MindSpore, the whole step compiled as one graph (what the backend gives without the
  framework: the reference for how much of the gap to PyTorch is MindSpore's own);
* the same architecture and optimizer written in plain PyTorch (eager; attention through
  ``scaled_dot_product_attention``, as nanoGPT does).

Then ``--rounds`` times, interleaved: ``--steps`` steps of each, timed as a block (the last
step's work is waited for). Compilation and the first steps are warm-up, not timed. Reported:
median and spread of the step time, tokens/s, the ratio to PyTorch, and MFU = Megatron's model
FLOPs per step / step time / the peak GFLOP/s of a large fp32 matmul measured in the same run
(numpy, MindSpore in a compiled graph and in PyNative mode, and PyTorch are all measured; the
largest is the machine's peak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (CONFIGS, VOCAB, all_config_dict, load_average, machine, matmul_peaks,  # noqa: E402
                     megatron_flops, summary)


class MindSpeedRunner:
    """mindspeed_ms's Trainer, stepped as ``Trainer.run`` steps it (step + events)."""

    def __init__(self, cfg: Dict[str, int], mode: str, iters: int):
        from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.core.config import init_configs_from_dict  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel
        from mindspeed_ms.training.training import Trainer  # pylint: disable=import-outside-toplevel

        self.tmp = tempfile.TemporaryDirectory(prefix=f"bench_{mode}_")
        previous = os.environ.get("MINDSPEED_JIT")
        os.environ["MINDSPEED_JIT"] = "0" if mode == "pynative" else previous or "auto"
        try:
            ps.destroy_model_parallel()
            all_config = init_configs_from_dict(all_config_dict(cfg, self.tmp.name, iters))
            self.trainer = Trainer(all_config, lambda pre_process=True, post_process=True: GPTModel(
                all_config.model_config, pre_process=pre_process, post_process=post_process))
        finally:
            if previous is None:
                os.environ.pop("MINDSPEED_JIT", None)
            else:
                os.environ["MINDSPEED_JIT"] = previous
        self.compiled = dict(self.trainer.compilation)
        self.tokens = cfg["batch"] * cfg["seq"]
        self.losses: List[float] = []
        self.trainer.events.run_start(1, {}, {}, training_iters=iters)

    def steps(self, n: int) -> float:
        """Run ``n`` steps; seconds per step (the last update waited for)."""
        trainer = self.trainer
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            elapsed = time.perf_counter() - t0
            metrics["step_time_ms"] = elapsed * 1000.0
            metrics["tokens_per_s"] = self.tokens / elapsed
            trainer._after_step(metrics)  # pylint: disable=protected-access
            self.losses.append(metrics["loss"])
        trainer.model[0].params[0].asnumpy()  # the optimizer's kernels may still be queued
        return (time.perf_counter() - start) / n

    def close(self):
        self.trainer.events.close()
        self.tmp.cleanup()


class TorchRunner:
    """The same GPT and AdamW in plain PyTorch (eager)."""

    def __init__(self, cfg: Dict[str, int]):
        import torch  # pylint: disable=import-outside-toplevel
        from torch import nn  # pylint: disable=import-outside-toplevel
        from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

        torch.manual_seed(1337)
        hidden, heads, seq = cfg["hidden"], cfg["heads"], cfg["seq"]

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1 = nn.LayerNorm(hidden)
                self.qkv = nn.Linear(hidden, 3 * hidden)
                self.proj = nn.Linear(hidden, hidden)
                self.ln2 = nn.LayerNorm(hidden)
                self.fc = nn.Linear(hidden, 4 * hidden)
                self.out = nn.Linear(4 * hidden, hidden)

            def forward(self, x):
                b, s, h = x.shape
                q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
                q, k, v = (t.view(b, s, heads, h // heads).transpose(1, 2) for t in (q, k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + self.proj(y.transpose(1, 2).reshape(b, s, h))
                return x + self.out(F.gelu(self.fc(self.ln2(x))))

        class GPT(nn.Module):
            def __init__(self):
                super().__init__()
                self.wte = nn.Embedding(VOCAB, hidden)
                self.wpe = nn.Embedding(seq, hidden)
                self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
                self.ln_f = nn.LayerNorm(hidden)
                for p in self.parameters():
                    if p.dim() > 1:
                        nn.init.normal_(p, std=0.02)

            def forward(self, idx, targets):
                x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
                for block in self.blocks:
                    x = block(x)
                logits = self.ln_f(x) @ self.wte.weight.t()  # tied embeddings
                return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

        self.torch = torch
        self.model = GPT()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=1.0e-3, betas=(0.9, 0.99), eps=1.0e-8)
        gen = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, VOCAB, (cfg["batch"], seq + 1), generator=gen) for _ in range(8)]
        self.i = 0
        self.losses: List[float] = []

    def steps(self, n: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        for _ in range(n):
            data = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = self.model(data[:, :-1], data[:, 1:])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.losses.append(float(loss.item()))  # the loss is reported every step, as in mindspeed_ms
        return (time.perf_counter() - start) / n

    def close(self):
        pass


class PlainMindSporeRunner:
    """The same GPT and AdamW written directly in MindSpore, the whole step as one ``mindspore.jit`` graph.

    No framework: what MindSpore's CPU backend gives for this architecture when forward,
    backward, gradient clipping and AdamW are compiled together (a reference for the engine's
    compiled step, which keeps the step's hooks between those parts).
    """

    def __init__(self, cfg: Dict[str, int]):
        import numpy as np  # pylint: disable=import-outside-toplevel
        import mindspore as ms  # pylint: disable=import-outside-toplevel
        from mindspore import Parameter, Tensor, nn, ops  # pylint: disable=import-outside-toplevel

        hidden, heads, seq, batch = cfg["hidden"], cfg["heads"], cfg["seq"], cfg["batch"]
        head_dim = hidden // heads
        rng = np.random.default_rng(1337)
        causal = Tensor(np.triu(np.full((seq, seq), -1.0e9, np.float32), 1))

        class Block(nn.Cell):
            def __init__(self):
                super().__init__()
                self.ln1 = nn.LayerNorm((hidden,))
                self.ln2 = nn.LayerNorm((hidden,))
                self.qkv = nn.Dense(hidden, 3 * hidden)
                self.proj = nn.Dense(hidden, hidden)
                self.fc = nn.Dense(hidden, 4 * hidden)
                self.out = nn.Dense(4 * hidden, hidden)
                self.gelu = nn.GELU(approximate=False)
                self.scores = ops.BatchMatMul(transpose_b=True)
                self.mix = ops.BatchMatMul()
                self.scale = 1.0 / math.sqrt(head_dim)

            def construct(self, x):
                qkv = self.qkv(self.ln1(x).reshape(batch * seq, hidden))
                qkv = qkv.reshape(batch, seq, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
                att = ops.softmax(self.scores(qkv[0], qkv[1]) * self.scale + causal, -1)
                y = self.mix(att, qkv[2]).transpose(0, 2, 1, 3).reshape(batch * seq, hidden)
                x = x + self.proj(y).reshape(batch, seq, hidden)
                h = self.ln2(x).reshape(batch * seq, hidden)
                return x + self.out(self.gelu(self.fc(h))).reshape(batch, seq, hidden)

        class GPT(nn.Cell):
            def __init__(self):
                super().__init__()
                self.wte = Parameter(Tensor(rng.normal(0, 0.02, (VOCAB, hidden)).astype(np.float32)), name="wte")
                self.wpe = Parameter(Tensor(rng.normal(0, 0.02, (seq, hidden)).astype(np.float32)), name="wpe")
                self.blocks = nn.CellList([Block() for _ in range(cfg["layers"])])
                self.ln_f = nn.LayerNorm((hidden,))
                self.logits = ops.MatMul(transpose_b=True)  # tied embeddings
                self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")

            def construct(self, idx, targets):
                x = ops.gather(self.wte, idx, 0) + self.wpe
                for block in self.blocks:
                    x = block(x)
                logits = self.logits(self.ln_f(x).reshape(batch * seq, hidden), self.wte)
                return self.loss(logits, targets.reshape(-1))

        model = GPT()
        params = model.trainable_params()
        groups = [{"params": [p for p in params if len(p.shape) >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if len(p.shape) < 2], "weight_decay": 0.0}]
        optimizer = nn.AdamWeightDecay(groups, learning_rate=1.0e-3, beta1=0.9, beta2=0.99, eps=1.0e-8)
        grad_fn = ms.value_and_grad(model, None, optimizer.parameters)

        def train_step(idx, targets):
            loss, grads = grad_fn(idx, targets)
            optimizer(ops.clip_by_global_norm(grads, 1.0))
            return loss

        self.train_step = ms.jit(train_step)
        data = np.random.default_rng(0).integers(0, VOCAB, (8, batch, seq + 1)).astype(np.int32)
        self.batches = [(Tensor(d[:, :-1]), Tensor(d[:, 1:])) for d in data]
        self.i = 0
        self.losses: List[float] = []

    def steps(self, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            idx, targets = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.losses.append(float(self.train_step(idx, targets).asnumpy()))
        return (time.perf_counter() - start) / n

    def close(self):
        pass


def bench_config(name: str, cfg: Dict[str, int], modes: List[str], rounds: int, steps: int, warmup: int,
                 with_torch: bool, peak: float) -> Dict[str, Any]:
    iters = warmup + rounds * steps
    runners: Dict[str, Any] = {}
    setup: Dict[str, float] = {}
    for mode in modes:
        key = "mindspore_plain_jit" if mode == "plain" else f"mindspeed_ms_{mode}"
        start = time.perf_counter()
        runners[key] = PlainMindSporeRunner(cfg) if mode == "plain" else MindSpeedRunner(cfg, mode, iters)
        runners[key].steps(warmup)  # compilation happens here
        setup[key] = round(time.perf_counter() - start, 2)
    if with_torch:
        start = time.perf_counter()
        runners["torch"] = TorchRunner(cfg)
        runners["torch"].steps(warmup)
        setup["torch"] = round(time.perf_counter() - start, 2)
    times: Dict[str, List[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            times[key].append(runner.steps(steps))
    tokens = cfg["batch"] * cfg["seq"]
    flops = megatron_flops(cfg["layers"], cfg["hidden"], cfg["seq"], cfg["batch"])
    out: Dict[str, Any] = {"shape": cfg, "tokens_per_step": tokens, "model_gflops_per_step": round(flops / 1e9, 3),
                           "warmup_s_incl_compile": setup}
    for key, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        entry = {"step_ms": summary([t * 1000 for t in ts], 1), "tokens_per_s": round(tokens / med, 1),
                 "mfu": round(flops / med / (peak * 1e9), 4) if peak else None,
                 "last_loss": round(runners[key].losses[-1], 4)}
        if key.startswith("mindspeed_ms"):
            entry["compiled"] = runners[key].compiled
        out[key] = entry
    if "torch" in times:
        torch_med = out["torch"]["step_ms"]["median"]
        for key in times:
            if key != "torch":
                out[key]["ratio_to_torch"] = round(out[key]["step_ms"]["median"] / torch_med, 2)
    for runner in runners.values():
        runner.close()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="nanogpt,compute")
    parser.add_argument("--modes", default="jit,pynative,plain",
                        help="jit (mindspeed_ms's default path), pynative (mindspeed_ms, MINDSPEED_JIT=0), "
                             "plain (the model in plain MindSpore, whole step compiled)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)

    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError:
            with_torch = False
    result: Dict[str, Any] = {"benchmark": "step_time", "machine": machine(), "load_before": load_average()}
    libraries = ("numpy", "mindspore", "torch") if with_torch else ("numpy", "mindspore")
    result["matmul_gflops"] = matmul_peaks(libraries=libraries)
    peak = result["matmul_gflops"]["peak_gflops"]
    result["configs"] = {}
    for name in args.configs.split(","):
        result["configs"][name] = bench_config(name, CONFIGS[name], [m for m in args.modes.split(",") if m],
                                               args.rounds, args.steps, args.warmup, with_torch, peak)
    result["matmul_gflops_after"] = matmul_peaks(libraries=libraries)
    result["load_after"] = load_average()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
