"""Parallel overhead with 2 processes: communication share of the step and step time vs one process.

Run: ``python benchmarks/parallel_overhead.py [--config compute] [--layouts dp2,tp2,tp2_sp,ep2,pp2,pp2_m8]
[--rounds 3] [--steps 3]``.

For each layout of issue 11 (data, tensor, expert and pipeline parallelism, 2 CPU processes under
msrun, the same global batch of sequences as the one-process run) it trains with mindspeed_ms's
``Trainer`` and reports, from the slower rank (a synchronous step waits for it):

* ``step_ms``: step time with the communication timer off;
* ``comm_fraction``: seconds inside collectives / step time, from rounds with the timer on
  (``mindspeed_ms.core.communication.timing``; the timer synchronises around every collective,
  so those rounds are a little slower, and the fraction uses their own step time);
* ``relative_to_one_process``: ``step_ms`` over the one-process step time of the same model and
  global batch, measured by this script before and after the msrun job (median of both). Two
  processes share the 2 cores, so the ideal is 0.5 (perfect scaling) and 1.0 means no gain.

* ``relative_to_dp2``: ``step_ms`` over the ``dp2`` layout's (when it ran in the same job): the
  model-parallel layouts' cost against data parallelism on the same two cores.

Timer-off and timer-on rounds alternate. Each layout runs in its default execution mode (see
``mindspeed_ms.training.compilation``: data and tensor parallelism, with or without sequence
parallelism, compile the model; pipeline and expert parallelism run PyNative); the one-process
reference is given in both modes. The timer sees the eager collectives only: inside a compiled
model chunk the collectives are graph operators and their time is part of the step, so a compiled
tensor-parallel layout reports the gradient synchronisation alone. A layout that
fails (pipeline and expert parallelism are being finished) is reported with its error and skipped;
the ones after it in the job are skipped too (a failed collective would desynchronise the ranks).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import CONFIGS, ROOT, all_config_dict, load_average, machine, summary  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

MOE = {"num_experts": 2, "moe_router_topk": 1, "moe_router_load_balancing_type": "aux_loss",
       "moe_aux_loss_coeff": 0.01, "moe_expert_capacity_factor": None}

# name -> (config overrides, one-process reference name); global batch = the config's batch
LAYOUTS = {
    "dp2": {"parallel_config": {}, "dataset_config": {"batch_size_div": 2}},
    # the 65-character vocabulary padded to a multiple of TP (what Megatron's vocabulary padding does)
    "tp2": {"parallel_config": {"tensor_model_parallel_size": 2}, "model_config": {"vocab_size": 66}},
    "tp2_sp": {"parallel_config": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
               "model_config": {"vocab_size": 66}},
    "ep2": {"parallel_config": {"expert_model_parallel_size": 2}, "dataset_config": {"batch_size_div": 2},
            "moe_config": MOE},
    "pp2": {"parallel_config": {"pipeline_model_parallel_size": 2},
            "dataset_config": {"batch_size_div": 4, "micro_batch_num": 4}},
    # Megatron's usual m = 4p: the 1F1B bubble (p - 1) / (m + p - 1) falls from 1/5 to 1/9
    "pp2_m8": {"parallel_config": {"pipeline_model_parallel_size": 2},
               "dataset_config": {"batch_size_div": 8, "micro_batch_num": 8}},
}


def layout_config(cfg: Dict[str, int], layout: Dict[str, Any], output_dir: str, iters: int) -> Dict[str, Any]:
    """The training config dict of ``layout`` (batch per rank so that the global batch is the config's)."""
    data = all_config_dict(cfg, output_dir, iters)
    for section, values in layout.items():
        values = dict(values)
        div = values.pop("batch_size_div", None)
        if div:
            values["batch_size"] = cfg["batch"] // div
        data.setdefault(section, {}).update(copy.deepcopy(values))
    return data


def _run_steps(trainer, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        trainer.train_step()
        trainer.step += 1
    trainer.model[0].params[0].asnumpy()
    return (time.perf_counter() - start) / n


def _build(data: Dict[str, Any]):
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import init_configs_from_dict  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.training.training import Trainer  # pylint: disable=import-outside-toplevel

    ps.destroy_model_parallel()
    all_config = init_configs_from_dict(data)
    return Trainer(all_config, lambda pre_process=True, post_process=True: GPTModel(
        all_config.model_config, pre_process=pre_process, post_process=post_process))


def time_layout(cfg: Dict[str, int], layout: Dict[str, Any], rounds: int, steps: int, warmup: int) -> Dict[str, Any]:
    """Timer-off and timer-on rounds of one layout on this rank."""
    from mindspeed_ms.core import communication as comm  # pylint: disable=import-outside-toplevel

    with tempfile.TemporaryDirectory(prefix="par_bench_") as tmp:
        trainer = _build(layout_config(cfg, layout, os.path.join(tmp, f"rank{comm.get_rank()}"),
                                       warmup + 2 * rounds * steps))
        _run_steps(trainer, warmup)
        off, on, comm_s = [], [], []
        for _ in range(rounds):
            comm.enable_comm_timer(False)
            off.append(_run_steps(trainer, steps))
            comm.reset_comm_timer()
            comm.enable_comm_timer(True)
            on.append(_run_steps(trainer, steps))
            comm.enable_comm_timer(False)
            comm_s.append(comm.comm_timer_summary()["total_s"] / steps)
        detail = comm.comm_timer_summary()["by_collective"]
        return {"off": off, "on": on, "comm": comm_s, "by_collective": detail,
                "compiled": dict(trainer.compilation)}


def _worker(config: str, layouts: List[str], rounds: int, steps: int, warmup: int) -> None:
    from _worker import run_cases  # pylint: disable=import-outside-toplevel

    cfg = CONFIGS[config]
    run_cases({name: (lambda n=name: time_layout(cfg, LAYOUTS[n], rounds, steps, warmup)) for name in layouts})


def one_process(cfg: Dict[str, int], moe: bool, mode: str, steps: int, warmup: int) -> float:
    """Seconds per step of the one-process run (in this process)."""
    os.environ["MINDSPEED_JIT"] = "0" if mode == "pynative" else "1"
    try:
        with tempfile.TemporaryDirectory(prefix="par_ref_") as tmp:
            data = all_config_dict(cfg, tmp, warmup + steps + 20)
            if moe:
                data["moe_config"] = dict(MOE)
            trainer = _build(data)
            _run_steps(trainer, warmup)
            return _run_steps(trainer, steps)
    finally:
        os.environ.pop("MINDSPEED_JIT", None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="compute", choices=sorted(CONFIGS))
    parser.add_argument("--layouts", default="dp2,tp2,tp2_sp,ep2,pp2,pp2_m8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    if sys.argv[1:2] == ["worker"]:  # inside msrun (a positional marker: msrun would take --worker* itself)
        _worker(sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return None
    args = parser.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    cfg = CONFIGS[args.config]

    import mindspore as ms  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    from _harness import run_msrun  # pylint: disable=import-outside-toplevel

    report: Dict[str, Any] = {"benchmark": "parallel_overhead", "machine": machine(), "config": args.config,
                              "shape": cfg, "processes": 2, "load_before": load_average()}
    needs_moe = "ep2" in layouts
    refs: Dict[str, List[float]] = {}

    def measure_refs():
        for mode in ("jit", "pynative"):
            refs.setdefault(f"dense_{mode}", []).append(one_process(cfg, False, mode, args.steps, args.warmup))
            if needs_moe:
                refs.setdefault(f"moe_{mode}", []).append(one_process(cfg, True, mode, args.steps, args.warmup))

    measure_refs()
    with tempfile.TemporaryDirectory(prefix="par_bench_job_") as tmp:
        result = run_msrun(Path(__file__), 2, ["worker", args.config, ",".join(layouts), str(args.rounds),
                                                str(args.steps), str(args.warmup)], workdir=tmp, timeout=3000)
        reports = result.results  # {rank: {"cases": {name: {"ok", "value" | "error"}}}}
        logs = result.log_tails(40) if result.returncode != 0 or result.timed_out else ""
    measure_refs()
    report["one_process_step_ms"] = {k: summary([x * 1000 for x in v], 1) for k, v in refs.items()}
    report["layouts"] = {}
    for name in layouts:
        cases = [reports.get(r, {}).get("cases", {}).get(name) for r in range(2)]
        ok = [c["value"] for c in cases if c and c.get("ok")]
        if len(ok) != 2:
            errors = [c["error"] for c in cases if c and not c.get("ok")]
            report["layouts"][name] = {"skipped": True, "reason": (errors[0][-1500:] if errors else
                                                                   "not run (an earlier layout failed, or the job "
                                                                   "ended)"), "log_tail": logs[-3000:]}
            continue
        off = [max(a, b) for a, b in zip(ok[0]["off"], ok[1]["off"])]
        on = [max(a, b) for a, b in zip(ok[0]["on"], ok[1]["on"])]
        comm_s = [max(a, b) for a, b in zip(ok[0]["comm"], ok[1]["comm"])]
        fractions = [c / t for c, t in zip(comm_s, on)]
        ref_key = ("moe" if name == "ep2" else "dense") + "_"
        entry = {"step_ms": summary([t * 1000 for t in off], 1),
                 "step_ms_timer_on": summary([t * 1000 for t in on], 1),
                 "comm_ms_per_step": summary([c * 1000 for c in comm_s], 1),
                 "comm_fraction": summary(fractions, 3),
                 "compiled": ok[0]["compiled"],
                 "by_collective_rank0": ok[0]["by_collective"]}
        med = statistics.median(off)
        for mode in ("jit", "pynative"):
            ref = refs.get(ref_key + mode)
            if ref:
                entry[f"relative_to_one_process_{mode}"] = round(med / statistics.median(ref), 3)
        report["layouts"][name] = entry
    dp2 = report["layouts"].get("dp2", {}).get("step_ms")
    if dp2:
        for entry in report["layouts"].values():
            if entry.get("step_ms"):
                entry["relative_to_dp2"] = round(entry["step_ms"]["median"] / dp2["median"], 3)
    report["load_after"] = load_average()
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
