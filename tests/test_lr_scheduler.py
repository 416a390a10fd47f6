"""OptimizerParamScheduler against hand-computed learning rates and weight decays."""

import json
import math

import pytest

from mindspeed_ms.core.optimizer import OptimizerParamScheduler


def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    """nanoGPT's train.py get_lr (for the part after warmup, where Megatron's rule is the same)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def nanogpt_sched(**kw):
    return OptimizerParamScheduler(max_lr=1e-3, min_lr=1e-4, lr_warmup_iters=100, lr_decay_iters=2000,
                                   lr_decay_style="cosine", **kw)


def test_nanogpt_cosine_hand_values():
    s = nanogpt_sched()
    assert s.get_lr(0) == 0.0
    assert s.get_lr(50) == pytest.approx(5e-4, rel=1e-12)
    assert s.get_lr(100) == pytest.approx(1e-3, rel=1e-12)
    assert s.get_lr(1050) == pytest.approx(5.5e-4, rel=1e-12)    # half way: (1e-3 + 1e-4) / 2
    assert s.get_lr(2000) == pytest.approx(1e-4, rel=1e-12)
    assert s.get_lr(2001) == 1e-4 and s.get_lr(10 ** 6) == 1e-4
    for it in range(100, 2200, 7):
        assert s.get_lr(it) == pytest.approx(nanogpt_lr(it), rel=1e-12, abs=1e-15)
    # Megatron's warmup differs from nanoGPT's by at most lr / warmup
    assert max(abs(s.get_lr(i) - nanogpt_lr(i)) for i in range(100)) <= 1e-3 / 100


def test_step_advances_and_returns_lr():
    s = nanogpt_sched()
    assert s.num_steps == 0 and s.lr == 0.0
    for _ in range(100):
        lr = s.step()
    assert s.num_steps == 100 and lr == pytest.approx(1e-3)
    assert s.step(950) == pytest.approx(5.5e-4)
    assert s.lr_values(3, start=99) == [s.get_lr(99), s.get_lr(100), s.get_lr(101)]


def test_warmup_init_and_constant():
    s = OptimizerParamScheduler(max_lr=1.0, lr_warmup_iters=4, lr_warmup_init=0.2)
    assert [s.get_lr(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert s.get_lr(10 ** 7) == 1.0


def test_linear():
    s = OptimizerParamScheduler(max_lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_iters=110,
                                lr_decay_style="linear")
    assert s.get_lr(60) == pytest.approx(0.55)
    assert s.get_lr(110) == pytest.approx(0.1)
    assert s.get_lr(35) == pytest.approx(0.1 + 0.75 * 0.9)


def test_inverse_square_root():
    s = OptimizerParamScheduler(max_lr=1.0, min_lr=0.3, lr_warmup_iters=4, lr_decay_iters=1000,
                                lr_decay_style="inverse_square_root")
    assert s.lr_decay_style == "inverse-square-root"
    assert s.get_lr(3) == pytest.approx(0.75)
    assert s.get_lr(16) == pytest.approx(0.5)
    assert s.get_lr(9) == pytest.approx(2 / 3)
    assert s.get_lr(100) == pytest.approx(0.3)   # 0.2, clamped at min_lr
    assert s.get_lr(1001) == 0.3


@pytest.mark.parametrize("style,mid", [("linear", 0.5), ("cosine", 0.5),
                                       ("exponential", 2 * 0.5 ** 0.5 - 1), ("minus_sqrt", 1 - 0.5 ** 0.5)])
def test_wsd(style, mid):
    s = OptimizerParamScheduler(max_lr=1.0, min_lr=0.0, lr_warmup_iters=10, lr_decay_iters=100,
                                lr_decay_style="wsd", lr_wsd_decay_iters=20, lr_wsd_decay_style=style)
    assert s.lr_decay_style == "WSD"
    assert s.get_lr(5) == pytest.approx(0.5)     # warmup
    assert s.get_lr(11) == 1.0 and s.get_lr(80) == 1.0   # stable
    assert s.get_lr(90) == pytest.approx(mid)    # half way through the annealing
    assert s.get_lr(100) == pytest.approx(0.0, abs=1e-12)
    if style == "cosine":
        assert s.get_lr(85) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_schedules():
    lin = OptimizerParamScheduler(max_lr=1.0, start_weight_decay=0.0, end_weight_decay=0.1,
                                  weight_decay_incr_iters=100, weight_decay_incr_style="linear")
    assert lin.get_wd(0) == 0.0 and lin.get_wd(25) == pytest.approx(0.025) and lin.get_wd(100) == 0.1
    assert lin.get_wd(1000) == 0.1
    cos = OptimizerParamScheduler(max_lr=1.0, start_weight_decay=0.0, end_weight_decay=0.1,
                                  weight_decay_incr_iters=100, weight_decay_incr_style="cosine")
    assert cos.get_wd(50) == pytest.approx(0.05)
    assert cos.get_wd(25) == pytest.approx(0.1 * (1 - math.cos(math.pi / 4)) / 2)
    const = OptimizerParamScheduler(max_lr=1.0, start_weight_decay=0.1)
    assert const.wd == 0.1 and const.get_wd(10 ** 9) == 0.1


def test_drives_optimizer_param_groups():
    class Opt:
        param_groups = [{"params": "decay"}, {"params": "no_decay", "wd_mult": 0.0},
                        {"params": "head", "lr_mult": 0.5}]
    opt = Opt()
    s = OptimizerParamScheduler(opt, max_lr=1e-3, lr_warmup_iters=10, lr_decay_iters=100,
                                lr_decay_style="linear", start_weight_decay=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]
    s.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert opt.param_groups[2]["lr"] == pytest.approx(2.5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]
    with pytest.raises(TypeError, match="param_groups"):
        OptimizerParamScheduler(object(), max_lr=1.0)


def test_state_dict_round_trip():
    s = nanogpt_sched(start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_iters=500,
                      weight_decay_incr_style="linear")
    s.step(321)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = nanogpt_sched(start_weight_decay=0.0, end_weight_decay=0.1, weight_decay_incr_iters=500,
                          weight_decay_incr_style="linear")
    fresh.load_state_dict(state)
    assert fresh.num_steps == 321 and fresh.lr == s.lr and fresh.wd == s.wd
    for _ in range(50):
        assert fresh.step() == s.step()


def test_load_state_dict_flags():
    state = nanogpt_sched().state_dict()
    state["num_steps"] = 10
    state["max_lr"] = 2e-3
    taken = nanogpt_sched()                               # default: use the checkpoint's values
    taken.load_state_dict(state)
    assert taken.max_lr == 2e-3 and taken.num_steps == 10
    kept = nanogpt_sched(use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    kept.load_state_dict(state)
    assert kept.max_lr == 1e-3 and kept.num_steps == 10
    strict = nanogpt_sched(use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="max_lr"):
        strict.load_state_dict(state)
    with pytest.raises(ValueError, match="num_steps"):
        taken.load_state_dict({"max_lr": 1.0})
    with pytest.raises(ValueError, match="at most one"):
        nanogpt_sched(override_opt_param_scheduler=True)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr_decay_style="step", lr_decay_iters=10), ValueError,
     r"lr_decay_style='step'.*\['constant', 'linear', 'cosine', 'inverse-square-root', 'WSD'\]"),
    (dict(lr_decay_style="WSD", lr_decay_iters=10, lr_wsd_decay_iters=5, lr_wsd_decay_style="sqrt"), ValueError,
     r"lr_wsd_decay_style='sqrt'.*minus_sqrt"),
    (dict(weight_decay_incr_style="exp", weight_decay_incr_iters=5), ValueError,
     r"weight_decay_incr_style='exp'.*\['constant', 'linear', 'cosine'\]"),
    (dict(lr_decay_style="cosine"), ValueError, "lr_decay_iters is required"),
    (dict(lr_decay_style="cosine", lr_decay_iters=10, lr_warmup_iters=10), ValueError, "lr_warmup_iters"),
    (dict(lr_decay_style="WSD", lr_decay_iters=10), ValueError, "lr_wsd_decay_iters is required"),
    (dict(lr_decay_style="WSD", lr_decay_iters=10, lr_warmup_iters=5, lr_wsd_decay_iters=6), ValueError,
     "lr_wsd_decay_iters=6"),
    (dict(min_lr=2.0), ValueError, "min_lr"),
    (dict(start_weight_decay=0.0, end_weight_decay=0.1), ValueError, "start_weight_decay == end_weight_decay"),
    (dict(weight_decay_incr_style="linear"), ValueError, "weight_decay_incr_iters is required"),
    (dict(lr_warmup_iters=1.5), TypeError, "lr_warmup_iters"),
    (dict(lr_warmup_iters=-1), ValueError, "lr_warmup_iters"),
])
def test_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        OptimizerParamScheduler(max_lr=1.0, **kwargs)
