"""Event stream writer/reader and the guide's log line."""

import json
import math
import os

import mindspore as ms
import numpy as np
import pytest

from mindspeed_ms.training.events import EventWriter, event_file, format_log_line, read_events, to_json_value

PARALLEL = {"tp": 1, "pp": 1, "dp": 2, "cp": 1, "ep": 1, "vpp": None}


def _lines(path):
    return path.read_text().splitlines()


def test_all_kinds_one_line_each(tmp_path):
    with EventWriter(tmp_path, rank=3) as ev:
        ev.run_start(world_size=4, parallel=PARALLEL, config={"lr": 1e-3, "betas": (0.9, 0.99), "name": None})
        ev.step(0, 1, loss=np.float32(4.25), lr=1e-3, grad_norm=ms.Tensor(0.5, ms.float32), loss_scale=65536.0,
                scale_window=20, overflow=np.bool_(False), step_time_ms=41.5, tokens_per_s=18500.0, mfu=0.1)
        ev.eval(1, val_loss=4.0)
        ev.moe_tokens(1, layer=2, counts=np.array([3, 0, 5], dtype=np.int64))
        ev.checkpoint(1, tmp_path / "ckpt")
        ev.run_end("success")
    path = event_file(tmp_path, 3)
    assert path == tmp_path / "events" / "rank_3.jsonl"
    lines = _lines(path)
    assert len(lines) == 6
    events = [json.loads(line) for line in lines]
    assert [e["kind"] for e in events] == ["run_start", "step", "eval", "moe_tokens", "checkpoint", "run_end"]
    assert all(e["rank"] == 3 and isinstance(e["time"], float) for e in events)
    start, step, evl, moe, ckpt, end = events
    assert start["world_size"] == 4 and start["parallel"] == PARALLEL and start["pid"] == os.getpid()
    assert start["config"] == {"lr": 1e-3, "betas": [0.9, 0.99], "name": None}
    assert step == {**step, "epoch": 0, "step": 1, "loss": 4.25, "lr": 1e-3, "grad_norm": 0.5, "loss_scale": 65536.0,
                    "scale_window": 20, "overflow": False, "step_time_ms": 41.5, "tokens_per_s": 18500.0,
                    "mfu": 0.1}
    assert "nonfinite" not in step
    assert evl["val_loss"] == 4.0 and evl["step"] == 1
    assert moe["counts"] == [3, 0, 5] and moe["layer"] == 2
    assert ckpt["path"] == str(tmp_path / "ckpt")
    assert end["status"] == "success" and end["error"] is None
    assert read_events(tmp_path) == events


def test_nonfinite_values_are_null_plus_flag(tmp_path):
    with EventWriter(tmp_path, 0) as ev:
        ev.step(0, 5, loss=float("nan"), lr=1e-3, grad_norm=float("inf"), loss_scale=None, scale_window=None,
                overflow=True, step_time_ms=1.0, tokens_per_s=1.0)
        ev.run_start(1, PARALLEL, config={"a": {"b": float("-inf")}, "c": [1.0, float("nan")]})
    text = event_file(tmp_path, 0).read_text()
    assert "NaN" not in text and "Infinity" not in text
    step, start = [json.loads(x) for x in text.splitlines()]   # strict JSON
    assert step["loss"] is None and step["grad_norm"] is None and step["overflow"] is True
    assert step["nonfinite"] == {"loss": "nan", "grad_norm": "inf"}
    assert start["config"] == {"a": {"b": None}, "c": [1.0, None]}
    assert start["nonfinite"] == {"config.a.b": "-inf", "config.c.1": "nan"}


def test_append_never_rewrites_and_terminates_partial_line(tmp_path):
    with EventWriter(tmp_path, 0) as ev:
        ev.eval(1, 3.0)
    path = event_file(tmp_path, 0)
    with open(path, "ab") as f:              # a killed writer left half a line
        f.write(b'{"kind": "step", "time": 1.0, "ra')
    assert [e["step"] for e in read_events(path)] == [1]   # the half line is skipped
    with EventWriter(tmp_path, 0) as ev:     # a resumed run appends
        ev.eval(2, 2.5)
    lines = _lines(path)
    assert lines[0].startswith('{"kind":"eval"') and lines[1] == '{"kind": "step", "time": 1.0, "ra'
    assert [e["step"] for e in read_events(path)] == [1, 2]


def test_reader_tolerates_missing_files_and_filters(tmp_path):
    assert read_events(tmp_path / "nope") == []
    assert read_events(tmp_path) == []
    for rank in (1, 0, 10, 2):
        with EventWriter(tmp_path, rank) as ev:
            ev.eval(rank, float(rank))
            ev.run_end("stopped")
    by_dir = read_events(tmp_path / "events")
    assert [e["rank"] for e in by_dir if e["kind"] == "eval"] == [0, 1, 2, 10]   # numeric rank order
    assert len(read_events(tmp_path, kind="eval")) == 4
    assert len(read_events(tmp_path, kind=["eval", "run_end"], rank=10)) == 2


def test_fsync_option_and_closed_writer(tmp_path):
    ev = EventWriter(tmp_path, 0, fsync=True)
    ev.checkpoint(3, "x")
    ev.close()
    ev.close()
    assert ev.closed
    with pytest.raises(ValueError, match="closed"):
        ev.eval(1, 1.0)


def test_run_end_with_exception_and_errors(tmp_path):
    with EventWriter(tmp_path, 0) as ev:
        try:
            raise RuntimeError("worker 1 died")
        except RuntimeError as exc:
            event = ev.run_end("failed", exc)
        assert event["error"] == "RuntimeError: worker 1 died"
        with pytest.raises(ValueError, match="status"):
            ev.run_end("ok")
        with pytest.raises(ValueError, match="kind"):
            ev.write("metrics", x=1)
        with pytest.raises(ValueError, match="reserved"):
            ev.eval(1, 1.0, rank=2)
        with pytest.raises(TypeError, match="loss"):
            ev.step(0, 1, loss="high", lr=1.0, grad_norm=None, loss_scale=None, scale_window=None, overflow=False,
                    step_time_ms=1.0, tokens_per_s=1.0)
        with pytest.raises(ValueError, match="step"):
            ev.eval(1.5, 1.0)
    with pytest.raises(ValueError, match="rank"):
        EventWriter(tmp_path, -1)


def test_to_json_value_conversions():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        a: int = 1
        b: tuple = (1, 2)

    class WithDict:
        def to_dict(self):
            return {"x": np.int32(7)}

    nf = {}
    out = to_json_value({"cfg": Cfg(), "obj": WithDict(), "arr": np.arange(3), "dtype": ms.float16,
                         "s": {2, 1}, 3: np.float64(math.inf)}, nonfinite=nf)
    assert out == {"cfg": {"a": 1, "b": [1, 2]}, "obj": {"x": 7}, "arr": [0, 1, 2], "dtype": str(ms.float16),
                   "s": [1, 2], "3": None}
    assert nf == {"3": "inf"}
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# the log line
# ---------------------------------------------------------------------------------------------

def test_log_line_guide_format():
    line = format_log_line(0, 13, 12.0177145004272461, 15742.81, finite_grads=True, loss_scale=65536.0,
                           learning_rate=1e-3, grad_norm=0.123)
    assert line == ("Epoch: 0, Step: 13, Loss: 12.0177145004272461, Finite_grads: True, Loss_scale: 65536.0, "
                    "Learning_rate: 1.0e-03, Grad_norm: 0.123, Time: 15742.81 ms")
    assert format_log_line(0, 14, 12.0177106857299805, 15729.62) == \
        "Epoch: 0, Step: 14, Loss: 12.0177106857299805, Time: 15729.62 ms"


def test_log_line_values():
    line = format_log_line(1, 2, None, 3.14159, learning_rate=5.5e-4, finite_grads=False)
    assert line == "Epoch: 1, Step: 2, Loss: None, Finite_grads: False, Learning_rate: 5.5e-04, Time: 3.14 ms"
    assert "Learning_rate: 9.87654e-04" in format_log_line(0, 1, 1.0, 1.0, learning_rate=9.876543e-4)
    assert "Loss: nan" in format_log_line(0, 1, float("nan"), 1.0)
    assert "Learning_rate: 0.0e+00" in format_log_line(0, 1, 1.0, 1.0, learning_rate=0.0)
