"""Loss-scale update cells: the adaptive rule step by step, dynamic/fixed cells, factory, state."""

import json
import logging
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from mindspeed_ms.training import (AdaptiveLossScaleUpdateCell, DynamicLossScaleUpdateCell,
                                   FixedLossScaleUpdateCell, adaptive_window_list, build_loss_scaler)


def _state(cell):
    return (cell.get_loss_scale(), cell.current_window, cell.list_index, cell.up_count, cell.down_count)


def _run(cell, flags):
    for flag in flags:
        cell(None, flag)


# ---------------------------------------------------------------------------------------------
# window list
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_w,min_w,expected", [
    (1000, 20, [20, 30, 40, 50, 100, 200, 500, 1000]),
    (5000, 100, [100, 300, 600, 1200, 2500, 5000]),
    (100, 20, [20, 30, 40, 50, 100]),
    (21, 20, [11, 21]),          # 21 - 20/2 = 11, below min: the list stops (kept as the rule says)
    (2, 1, [1, 1, 2]),           # 2 -> 1.5 -> 1.0, each kept as int
])
def test_window_list(max_w, min_w, expected):
    assert adaptive_window_list(max_w, min_w) == expected
    cell = AdaptiveLossScaleUpdateCell(1024, 2, expected[-1], max_w, min_w)
    assert cell.window_list == expected
    assert cell.current_window == expected[-1]
    assert cell.list_index == len(expected) - 1


def test_start_index_is_position_of_scale_window():
    cell = AdaptiveLossScaleUpdateCell(1024, 2, 200)
    assert cell.list_index == 5 and cell.current_window == 200 and cell.scale_window == 200
    assert cell.cur_iter == 1 and cell.last_overflow_iter == 0
    assert cell.up_count == 0 and cell.down_count == 0
    assert cell.max_scale_window == 1000 and cell.min_scale_window == 20


def test_scale_window_not_in_list_warns_and_starts_at_index_0(caplog):
    with caplog.at_level(logging.WARNING, logger="mindspeed_ms.training.loss_scale"):
        cell = AdaptiveLossScaleUpdateCell(1024, 2, 25)
    assert cell.list_index == 0 and cell.current_window == 20
    assert "not in the adaptive window list" in caplog.text


@pytest.mark.parametrize("max_w,min_w", [(0, 20), (1000, 0), (-5, -10), (20, 20), (20, 1000)])
def test_window_value_errors(max_w, min_w):
    with pytest.raises(ValueError, match="max_scale_window"):
        AdaptiveLossScaleUpdateCell(1024, 2, 20, max_w, min_w)


@pytest.mark.parametrize("max_w,min_w,bad", [(1000.0, 20, "max_scale_window"), (1000, 20.0, "min_scale_window"),
                                             ("1000", 20, "max_scale_window"), (1000, True, "min_scale_window")])
def test_window_type_errors(max_w, min_w, bad):
    with pytest.raises(TypeError, match=bad):
        AdaptiveLossScaleUpdateCell(1024, 2, 20, max_w, min_w)


def test_other_argument_errors():
    with pytest.raises(ValueError, match="loss_scale_value"):
        AdaptiveLossScaleUpdateCell(0, 2, 20)
    with pytest.raises(ValueError, match="loss_scale_value"):
        DynamicLossScaleUpdateCell(float("inf"), 2, 20)
    with pytest.raises(ValueError, match="scale_factor"):
        AdaptiveLossScaleUpdateCell(1024, 1, 20)
    with pytest.raises(TypeError, match="scale_factor"):
        DynamicLossScaleUpdateCell(1024, "2", 20)
    with pytest.raises(TypeError, match="scale_window"):
        DynamicLossScaleUpdateCell(1024, 2, 20.5)
    with pytest.raises(ValueError, match="scale_window"):
        DynamicLossScaleUpdateCell(1024, 2, 0)
    with pytest.raises(TypeError, match="scale_window"):
        AdaptiveLossScaleUpdateCell(1024, 2, "20")
    with pytest.raises(TypeError, match="loss_scale_value"):
        FixedLossScaleUpdateCell("1024")


# ---------------------------------------------------------------------------------------------
# the adaptive rule, traced by hand on the list [20, 30, 40, 50, 100]
# ---------------------------------------------------------------------------------------------

def test_adaptive_trace_up_rule_down_rule_and_hidden_level():
    cell = AdaptiveLossScaleUpdateCell(1024, 2, 20, max_scale_window=100, min_scale_window=20)
    assert cell.window_list == [20, 30, 40, 50, 100]
    # window 20: growth when cur_iter - last_overflow_iter >= 20, i.e. at calls 20, 40, 60
    _run(cell, [False] * 19)
    assert _state(cell) == (1024, 20, 0, 0, 0) and cell.cur_iter == 20
    _run(cell, [False])
    assert _state(cell) == (2048, 20, 0, 1, 0) and cell.last_overflow_iter == 20
    _run(cell, [False] * 20)
    assert _state(cell) == (4096, 20, 0, 2, 0) and cell.last_overflow_iter == 40
    _run(cell, [False] * 19)
    assert _state(cell) == (4096, 20, 0, 2, 0)
    _run(cell, [False])  # third growth at this level: up to index 1, window 30
    assert _state(cell) == (8192, 30, 1, 0, 0) and cell.last_overflow_iter == 60
    _run(cell, [False] * 29)
    assert _state(cell) == (8192, 30, 1, 0, 0)
    _run(cell, [False])  # call 90
    assert _state(cell) == (16384, 30, 1, 1, 0) and cell.cur_iter == 91
    # down rule at index 1: three overflows drop to the hidden level (window 1)
    cell(None, True)
    assert _state(cell) == (8192, 30, 1, 1, 1) and cell.last_overflow_iter == 91
    cell(None, True)
    assert _state(cell) == (4096, 30, 1, 1, 2)
    cell(None, True)
    assert _state(cell) == (2048, 1, -1, 0, 0) and cell.last_overflow_iter == 93
    # hidden level: window 1 grows every overflow-free step; three growths -> index 0
    cell(None, False)
    assert _state(cell) == (4096, 1, -1, 1, 0)
    cell(None, False)
    assert _state(cell) == (8192, 1, -1, 2, 0)
    cell(None, False)
    assert _state(cell) == (16384, 20, 0, 0, 0) and cell.last_overflow_iter == 96
    # at index 0 three overflows do not drop the window; the down counter wraps mod 4
    _run(cell, [True, True, True])
    assert _state(cell) == (2048, 20, 0, 0, 3)
    cell(None, True)
    assert _state(cell) == (1024, 20, 0, 0, 0)
    cell(None, True)
    assert _state(cell) == (512, 20, 0, 0, 1)
    assert cell.cur_iter == 102 and cell.last_overflow_iter == 101


def test_adaptive_growth_resets_down_counter():
    cell = AdaptiveLossScaleUpdateCell(64, 2, 30, max_scale_window=100, min_scale_window=20)
    _run(cell, [True, True])              # down = 2 at index 1
    assert _state(cell) == (16, 30, 1, 0, 2)
    _run(cell, [False] * 30)              # grows once at the 30th clean step: down -> 0
    assert _state(cell) == (32, 30, 1, 1, 0)
    _run(cell, [True, True])              # only two overflows since the growth: no drop
    assert _state(cell) == (8, 30, 1, 1, 2)
    cell(None, True)                      # third: drop to window 1
    assert _state(cell) == (4, 1, -1, 0, 0)


def test_adaptive_last_level_keeps_window_and_up_counter_wraps():
    cell = AdaptiveLossScaleUpdateCell(1, 2, 100, max_scale_window=100, min_scale_window=20)
    assert cell.list_index == 4
    _run(cell, [False] * 300)             # three growths at the last level
    assert _state(cell) == (8, 100, 4, 3, 0)
    _run(cell, [False] * 100)             # fourth growth: up wraps to 0, still the last level
    assert _state(cell) == (16, 100, 4, 0, 0)


def test_adaptive_hidden_level_does_not_drop_further():
    cell = AdaptiveLossScaleUpdateCell(2 ** 20, 2, 50, max_scale_window=100, min_scale_window=20)
    _run(cell, [True] * 3)
    assert _state(cell) == (2 ** 17, 1, -1, 0, 0)
    _run(cell, [True] * 3)                # at the hidden level the down rule does not apply
    assert _state(cell) == (2 ** 14, 1, -1, 0, 3)
    cell(None, False)                     # growth resets down, counts up
    assert _state(cell) == (2 ** 15, 1, -1, 1, 0)


def test_overflow_when_growth_was_due_does_not_grow():
    cell = AdaptiveLossScaleUpdateCell(8, 2, 20, max_scale_window=100, min_scale_window=20)
    _run(cell, [False] * 19)
    cell(None, True)                      # window reached, but overflow: halve, no up count
    assert _state(cell) == (4, 20, 0, 0, 1) and cell.last_overflow_iter == 20


def test_scale_never_below_one():
    cell = AdaptiveLossScaleUpdateCell(3, 2, 20)
    _run(cell, [True] * 5)
    assert cell.get_loss_scale() == 1.0


# ---------------------------------------------------------------------------------------------
# dynamic and fixed cells
# ---------------------------------------------------------------------------------------------

def test_dynamic_trace():
    cell = DynamicLossScaleUpdateCell(8, 2, 3)
    seen = []
    for flag in [False, False, False, True, False, False, False, True, True, True, True, True]:
        cell(None, flag)
        seen.append((cell.get_loss_scale(), cell.last_overflow_iter))
    assert seen == [(8, 0), (8, 0), (16, 3), (8, 4), (8, 4), (8, 4), (16, 7), (8, 8), (4, 9), (2, 10),
                    (1, 11), (1, 12)]
    assert cell.current_window == 3 and cell.cur_iter == 13
    assert not hasattr(cell, "up_count")


def test_fixed_cell_never_changes():
    cell = FixedLossScaleUpdateCell(1024)
    param = Parameter(Tensor(1024.0, ms.float32), name="loss_scale")
    for flag in [True, False, True]:
        out = cell(param, flag)
        assert bool(out) is flag
    assert float(param.asnumpy()) == 1024.0 and cell.get_loss_scale() == 1024.0
    assert cell.current_window is None


# ---------------------------------------------------------------------------------------------
# MindSpore calling convention
# ---------------------------------------------------------------------------------------------

def test_cell_updates_parameter_in_place_and_returns_bool_tensor():
    cell = AdaptiveLossScaleUpdateCell(2.0 ** 16, 2, 20)
    assert isinstance(cell, ms.nn.Cell)
    param = Parameter(Tensor(cell.get_loss_scale(), ms.float32), name="loss_scale")
    out = cell(param, Tensor(True, ms.bool_))
    assert isinstance(out, Tensor) and out.dtype == ms.bool_ and bool(out.asnumpy()) is True
    assert float(param.asnumpy()) == 2.0 ** 15 and cell.get_loss_scale() == 2.0 ** 15
    out = cell(param, np.bool_(False))
    assert bool(out.asnumpy()) is False
    # the parameter is the source of truth, as in MindSpore: an external change is picked up
    param.set_data(Tensor(100.0, ms.float32))
    cell(param, True)
    assert float(param.asnumpy()) == 50.0


def test_cell_runs_eagerly_in_graph_mode():
    cell = DynamicLossScaleUpdateCell(16, 2, 1)
    param = Parameter(Tensor(16.0, ms.float32), name="loss_scale")
    old = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        out = cell(param, False)
    finally:
        ms.set_context(mode=old)
    assert bool(out.asnumpy()) is False and float(param.asnumpy()) == 32.0


def test_bad_overflow_and_parameter_types():
    cell = DynamicLossScaleUpdateCell(16, 2, 1)
    with pytest.raises(TypeError, match="loss_scale"):
        cell(16.0, False)
    with pytest.raises(TypeError, match="overflow"):
        cell(None, np.array([True, False]))


# ---------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: AdaptiveLossScaleUpdateCell(1024, 2, 20, 100, 20),
    lambda: DynamicLossScaleUpdateCell(1024, 2, 5),
    lambda: FixedLossScaleUpdateCell(1024),
])
def test_state_dict_round_trip_resumes_identically(make):
    rng = np.random.default_rng(0)
    flags = list(rng.random(400) < 0.08)
    full = make()
    _run(full, flags)
    first = make()
    _run(first, flags[:173])
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able
    resumed = make()
    param = Parameter(Tensor(1.0, ms.float32), name="loss_scale")
    resumed.load_state_dict(state, loss_scale=param)
    assert float(param.asnumpy()) == first.get_loss_scale()
    _run(resumed, flags[173:])
    assert resumed.state_dict() == full.state_dict()


def test_load_state_dict_errors():
    cell = AdaptiveLossScaleUpdateCell(1024, 2, 20)
    with pytest.raises(ValueError, match="type"):
        cell.load_state_dict(DynamicLossScaleUpdateCell(1024, 2, 5).state_dict())
    other = AdaptiveLossScaleUpdateCell(1024, 2, 100, 5000, 100).state_dict()
    with pytest.raises(ValueError, match="window_list"):
        cell.load_state_dict(other)
    state = cell.state_dict()
    del state["up_count"]
    with pytest.raises(ValueError, match="up_count"):
        cell.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------

def test_build_from_mindformers_spec():
    cell = build_loss_scaler({"type": "AdaptiveLossScaleUpdateCell", "loss_scale_value": 4294967296,
                              "scale_factor": 2, "scale_window": 20, "max_scale_window": 1000,
                              "min_scale_window": 20})
    assert isinstance(cell, AdaptiveLossScaleUpdateCell) and cell.get_loss_scale() == 4294967296
    cell = build_loss_scaler({"type": "dynamic", "loss_scale_value": 128, "scale_factor": 2, "scale_window": 10})
    assert type(cell) is DynamicLossScaleUpdateCell and cell.current_window == 10
    assert type(build_loss_scaler({"type": "FixedLossScaleUpdateCell", "loss_scale_value": 8})) \
        is FixedLossScaleUpdateCell
    assert build_loss_scaler(16).get_loss_scale() == 16
    assert build_loss_scaler(cell) is cell


def test_build_from_mindspeed_fields():
    assert build_loss_scaler() is None
    fixed = build_loss_scaler(loss_scale=256)
    assert type(fixed) is FixedLossScaleUpdateCell and fixed.get_loss_scale() == 256
    dyn = build_loss_scaler(loss_scale_value=2 ** 16, loss_scale_factor=4, loss_scale_window=50)
    assert type(dyn) is DynamicLossScaleUpdateCell
    assert (dyn.get_loss_scale(), dyn.scale_factor, dyn.scale_window) == (2 ** 16, 4, 50)
    dyn = build_loss_scaler(loss_scale_value=2 ** 16)
    assert (dyn.scale_factor, dyn.scale_window) == (2, 1000)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    (({"type": "Nope"},), {}, ValueError, "Nope"),
    (({"loss_scale_value": 1},), {}, ValueError, "type"),
    (({"type": "dynamic", "loss_scale_value": 1, "scale_factor": 2, "scale_window": 2, "x": 1},), {},
     ValueError, r"\['x'\]"),
    (({"type": "fixed", "loss_scale_value": 8},), {"loss_scale": 8}, ValueError, "not both"),
    (("big",), {}, TypeError, "spec"),
    ((), {"loss_scale": 8, "loss_scale_value": 8}, ValueError, "loss_scale_value"),
    ((), {"loss_scale": 8, "loss_scale_window": 8}, ValueError, "loss_scale_window"),
    ((), {"loss_scale_window": 8}, ValueError, "loss_scale_value"),
])
def test_build_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_loss_scaler(*args, **kwargs)


def test_training_package_import_is_cheap():
    code = ("import sys, mindspeed_ms.training as t; t.AdaptiveLossScaleUpdateCell; "
            "bad = [m for m in sys.modules if m.startswith(('mindspeed_ms.legacy', 'mindspeed_ms.core.config'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
