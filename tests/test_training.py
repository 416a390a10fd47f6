"""The training loop in one process: learning, events, logs, gradient accumulation, resume, loss
scaling with emulated fp16, checkpoints and errors."""

import json
import math

import numpy as np
import pytest
import mindspore as ms

import training_configs as T
from mindspeed_ms.training import checkpointing
from mindspeed_ms.training.events import read_events

ms.set_device("CPU")


def events_of(output_dir, kind=None):
    return read_events(output_dir / "events", kind=kind)


def test_pretrain_requires_all_config():
    from mindspeed_ms.training.training import pretrain

    with pytest.raises(ValueError, match="all_config"):
        pretrain(None, lambda **kw: None, None)


def test_loss_falls_and_events_and_logs_are_written(tmp_path, capsys):
    """A short version of the tiny-Shakespeare run (the full one is benchmarks/shakespeare_char_small.py)."""
    out = tmp_path / "run"
    iters = 200
    steps = T.run(T.make(out, training_config={"training_iters": iters, "eval_interval": 100, "eval_iters": 4,
                                               "log_interval": 50},
                         dataset_config={"batch_size": 8}, optimizer_config={"lr_warmup_iters": 10}))
    losses = [s["loss"] for s in steps]
    assert len(losses) == iters
    # from uniform (ln 66 = 4.19) to clearly learned character statistics
    assert losses[0] > 4.0 and np.mean(losses[-10:]) < 2.7
    kinds = [e["kind"] for e in events_of(out)]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("step") == iters and kinds.count("eval") == 2
    step_events = events_of(out, "step")
    first = step_events[0]
    for field in ("epoch", "step", "loss", "lr", "grad_norm", "loss_scale", "scale_window", "overflow",
                  "step_time_ms", "tokens_per_s"):
        assert field in first
    assert [e["step"] for e in step_events] == list(range(1, iters + 1))
    assert abs(step_events[-1]["loss"] - losses[-1]) < 1e-6
    evals = events_of(out, "eval")
    assert evals[-1]["val_loss"] < 2.8 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    end = events_of(out, "run_end")[-1]
    assert end["status"] == "success" and end["error"] is None
    log = capsys.readouterr().out
    line = [ln for ln in log.splitlines() if "Step: 50," in ln][0]
    message = line.split(" - INFO - ")[1]
    assert message.startswith("Epoch: 0, Step: 50, Loss: ")
    assert message.endswith(" ms") and "Time: " in message
    assert "Learning_rate: " in message and "Grad_norm: " in message and "Finite_grads: True" in message


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    big = T.run(T.make(tmp_path / "a", dataset_config={"batch_size": 8}))
    accumulated = T.run(T.make(tmp_path / "b", dataset_config={"batch_size": 2, "micro_batch_num": 4}))
    np.testing.assert_allclose([s["loss"] for s in accumulated], [s["loss"] for s in big], rtol=2e-6)
    np.testing.assert_allclose([s["grad_norm"] for s in accumulated], [s["grad_norm"] for s in big], rtol=1e-5)


def test_resumed_run_continues_like_an_uninterrupted_one(tmp_path):
    settings = {"training_iters": 6, "save_interval": 2}
    uninterrupted = T.run(T.make(tmp_path / "full", training_config=settings))
    # stopped after step 3: the newest checkpoint is the one of step 2
    first = T.run(T.make(tmp_path / "resumed", training_config=settings), stop_after=3)
    assert checkpointing.latest_step(tmp_path / "resumed", 0) == 2
    second = T.run(T.make(tmp_path / "resumed", training_config=dict(settings, resume_training=True)))
    assert [s["step"] for s in second] == [3, 4, 5, 6]
    resumed = [s["loss"] for s in first[:2] + second]
    assert resumed == [s["loss"] for s in uninterrupted]  # bit for bit
    assert checkpointing.latest_step(tmp_path / "resumed", 0) == 6
    events = events_of(tmp_path / "resumed")
    kinds = [e["kind"] for e in events]
    assert kinds.count("run_start") == 2 and kinds.count("checkpoint") == 3  # steps 2, 4, 6
    assert [e["status"] for e in events if e["kind"] == "run_end"] == ["stopped", "success"]


def test_checkpoints_are_pruned_atomic_and_checked(tmp_path):
    out = tmp_path / "ck"
    T.run(T.make(out, training_config={"training_iters": 4, "save_interval": 1, "keep_checkpoint_max": 2,
                                       "crc_check": True, "ckpt_format": "safetensors"}))
    directory = checkpointing.checkpoint_dir(out, 0)
    assert checkpointing.list_steps(directory, "network") == [3, 4]
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no staging leftovers
    tensors, meta = checkpointing.load_checkpoint(out, 0)
    assert meta["step"] == 4 and meta["format"] == "safetensors"
    assert any(k.startswith("optimizer.exp_avg.") for k in tensors)
    assert json.loads((directory / "latest.json").read_text())["step"] == 4
    # corrupt the newest file: the CRC check refuses it
    path = directory / meta["file"]
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(checkpointing.CheckpointError, match="CRC mismatch"):
        checkpointing.load_checkpoint(out, 0)
    tensors, meta = checkpointing.load_checkpoint(out, 0, step=3)
    assert meta["step"] == 3


def test_emulated_fp16_with_a_large_loss_scale_overflows_skips_and_recovers(tmp_path):
    out = tmp_path / "fp16"
    # fp16 overflows in the backward pass above a loss scale of about 2**17 for this model
    steps = T.run(T.make(out, training_config={"training_iters": 12, "loss_scale_value": 2.0 ** 20,
                                               "loss_scale_factor": 2, "loss_scale_window": 3, "fp16": True},
                         model_config={"compute_dtype": "float16"}))
    events = events_of(out, "step")
    overflows = [e["overflow"] for e in events]
    scales = [e["loss_scale"] for e in events]
    assert overflows[0] and not overflows[-1]
    assert scales[0] == 2.0 ** 19 and min(scales) <= 2.0 ** 17  # halved on every overflow
    first_ok = overflows.index(False)
    assert all(overflows[:first_ok])
    # skipped steps keep the learning-rate schedule where it was, and report no gradient norm
    assert all(e["grad_norm"] is None for e in events[:first_ok])
    # after `window` clean steps the scale grows again
    grown = [i for i in range(first_ok + 1, len(scales)) if scales[i] > scales[i - 1]]
    assert grown, scales
    losses = [s["loss"] for s in steps]
    assert all(math.isfinite(v) for v in losses)


def test_adaptive_loss_scaling_reports_its_window(tmp_path):
    out = tmp_path / "adaptive"
    T.run(T.make(out, training_config={"training_iters": 8, "fp16": True, "scale_sense": {
        "type": "AdaptiveLossScaleUpdateCell", "loss_scale_value": 2.0 ** 24, "scale_factor": 2,
        "scale_window": 20, "max_scale_window": 1000, "min_scale_window": 20}},
        model_config={"compute_dtype": "float16"}))
    events = events_of(out, "step")
    assert all(e["scale_window"] is not None for e in events)
    assert any(e["overflow"] for e in events)


def test_failures_are_written_to_the_event_stream(tmp_path):
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.config import init_configs_from_dict
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.training.training import pretrain

    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.run(T.make(tmp_path / "nofile", dataset_config={"data_path": str(tmp_path / "missing.txt")}))
    with pytest.raises(ValueError, match="training_iters"):
        T.run(T.make(tmp_path / "zero", training_config={"training_iters": 0}))

    out = tmp_path / "fail"
    all_config = init_configs_from_dict(T.make(out, training_config={"save_interval": 1}))

    def explode(step, metrics):
        if step == 2:
            raise RuntimeError("worker lost its accelerator")

    ps.destroy_model_parallel()
    try:
        with pytest.raises(RuntimeError, match="accelerator"):
            pretrain(None, lambda pre_process=True, post_process=True: GPTModel(all_config.model_config), None,
                     all_config=all_config, step_callbacks=[explode])
    finally:
        ps.destroy_model_parallel()
    end = events_of(out, "run_end")[-1]
    assert end["status"] == "failed" and "accelerator" in end["error"]
    # the checkpoint written before the failure is complete and loads
    tensors, meta = checkpointing.load_checkpoint(out, 0)
    assert meta["step"] == 1 and tensors


def test_lora_trains_only_the_adapters(tmp_path):
    out = tmp_path / "lora"
    steps = T.run(T.make(out, training_config={"training_iters": 6, "save_interval": 6},
                         optimizer_config={"learning_rate": 1.0e-2, "weight_decay": 0.0},
                         lora_config={"use_lora": True, "lora_rank": 4, "lora_alpha": 8,
                                      "target_cells": [".*query_key_value", ".*dense_4h_to_h"]}))
    losses = [s["loss"] for s in steps]
    assert losses[-1] < losses[0]
    tensors, _ = checkpointing.load_checkpoint(out, 0)
    lora_b = [k for k in tensors if k.endswith("lora.lora_b") and not k.startswith("optimizer.")]
    assert len(lora_b) == 4 and all(np.abs(tensors[k]).max() > 0 for k in lora_b)  # B left zero: trained
    # frozen base weights have no optimizer state and did not move
    assert not any(k.startswith("optimizer.") and k.endswith("query_key_value.weight") for k in tensors)
    base = T.run(T.make(tmp_path / "base", training_config={"training_iters": 1, "save_interval": 1},
                        optimizer_config={"learning_rate": 0.0, "min_lr": 0.0, "lr_warmup_iters": 0}))
    assert base
    start, _ = checkpointing.load_checkpoint(tmp_path / "base", 0)
    name = "language_model.encoder.units.0.layers.0.attention.query_key_value.weight"
    np.testing.assert_array_equal(tensors[name], start[name])
