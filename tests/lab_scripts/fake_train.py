"""A stand-in for examples/pretrain_gpt.py, used by the lab launcher tests.

Called as ``fake_train.py --config CFG.yaml --output DIR`` under msrun. It sets the worker up
(device, owner watchdog, communication), runs a collective per "step" and appends the event stream
(``DIR/events/rank_<r>.jsonl``, through mindspeed_ms.training.events.EventWriter) at a
configurable pace. The YAML config holds the test knobs:

    steps: 6                 number of steps
    step_interval_s: 0.2     sleep per step
    fail_at_step: null       raise ValueError at this step ...
    fail_rank: 1             ... on this rank
    eval_interval: 3         an eval event every N steps (0: none)
    checkpoint_interval: 0   a checkpoint event every N steps (0: none)
    moe_layers: 2            moe_tokens events per step for layers 0..moe_layers-1
    num_experts: 4
    overflow_steps: [2]      steps reported as loss-scale overflows
"""

import argparse
import json
import os
import signal
import sys
import time

import numpy as np
import yaml


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}

    from mindspore import Tensor  # pylint: disable=import-outside-toplevel
    import mindspeed_ms.core.communication as comm  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.runtime import setup_worker  # pylint: disable=import-outside-toplevel

    rank = setup_worker()
    world = comm.get_world_size()
    try:  # the engine's writer when it exists; plain JSON lines otherwise (same format)
        from mindspeed_ms.training.events import EventWriter  # pylint: disable=import-outside-toplevel
        stream = EventWriter(args.output, rank)
        emit = stream.write
    except ImportError:
        events_dir = os.path.join(args.output, "events")
        os.makedirs(events_dir, exist_ok=True)
        stream = open(os.path.join(events_dir, f"rank_{rank}.jsonl"), "a", encoding="utf-8")  # pylint: disable=consider-using-with

        def emit(kind, **fields):
            record = {"kind": kind, "time": time.time(), "rank": rank}
            record.update(fields)
            stream.write(json.dumps(record) + "\n")
            stream.flush()

    def on_term(signum, frame):  # pylint: disable=unused-argument
        emit("run_end", status="stopped", error=None)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)

    check = comm.all_reduce(Tensor(np.array([rank + 1.0], np.float32))).asnumpy()[0]
    emit("run_start", world_size=world, check_sum=float(check),
         parallel={"tp": 1, "pp": 1, "dp": world, "cp": 1, "ep": 1, "vpp": 1}, config=cfg)
    print(f"rank {rank}: world {world}, check_sum {check}", flush=True)

    steps = int(cfg.get("steps", 6))
    interval = float(cfg.get("step_interval_s", 0.2))
    overflow_steps = set(cfg.get("overflow_steps", [2]))
    num_experts = int(cfg.get("num_experts", 4))
    scale, window, good = 65536.0, 4, 0
    rng = np.random.default_rng(rank)
    for step in range(1, steps + 1):
        t0 = time.time()
        if cfg.get("fail_at_step") == step and cfg.get("fail_rank", 1) == rank:
            raise ValueError(f"injected failure at step {step} on rank {rank}")
        local = Tensor(np.array([10.0 / step + 0.1 * rank], np.float32))
        loss = float(comm.all_reduce(local, op="avg").asnumpy()[0])
        overflow = step in overflow_steps
        if overflow:
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good >= window:
                scale, good = scale * 2, 0
        time.sleep(interval)
        ms = (time.time() - t0) * 1000
        emit("step", epoch=0, step=step, loss=loss, lr=1e-3 * min(1.0, step / 3), grad_norm=None if overflow else 1.0 / step,
             loss_scale=scale, scale_window=window, overflow=overflow, step_time_ms=ms, tokens_per_s=1024 / (ms / 1000))
        for layer in range(int(cfg.get("moe_layers", 2))):
            counts = rng.multinomial(64, np.ones(num_experts) / num_experts).tolist()
            emit("moe_tokens", step=step, layer=layer, counts=counts)
        if cfg.get("eval_interval") and step % int(cfg["eval_interval"]) == 0:
            emit("eval", step=step, val_loss=loss + 0.5)
        if cfg.get("checkpoint_interval") and step % int(cfg["checkpoint_interval"]) == 0:
            emit("checkpoint", step=step, path=os.path.join(args.output, "ckpt", f"step_{step}"))
        print(f"Epoch: 0, Step: {step}, Loss: {loss:.6f}, Time: {ms:.2f} ms", flush=True)
    emit("run_end", status="success", error=None)
    stream.close()


if __name__ == "__main__":
    main()
