"""Training-config fields with Megatron semantics, tested by behaviour in one process: the precision
flags (fp16/bf16) and emulated bfloat16 on CPU."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import training_configs as T
from mindspeed_ms.core.config import ConfigValueError, init_configs_from_dict
from mindspeed_ms.training.events import read_events

ms.set_device("CPU")


def _losses(steps):
    return [s["loss"] for s in steps]


# ------------------------------------------------------------------------------------------------
# precision: fp16 / bf16 flags and emulated bfloat16
# ------------------------------------------------------------------------------------------------

def test_bfloat16_compute_trains_on_cpu_close_to_float32(tmp_path):
    settings = {"training_iters": 4}
    fp32 = _losses(T.run(T.make(tmp_path / "fp32", training_config=settings)))
    bf16 = _losses(T.run(T.make(tmp_path / "bf16", training_config=settings,
                                model_config={"compute_dtype": "bfloat16"})))
    assert len(bf16) == 4 and all(np.isfinite(bf16))
    assert bf16[-1] < bf16[0]
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9); the mean over 128 tokens
    # averages most of it out, so the loss stays within 1e-2 of float32 ...
    np.testing.assert_allclose(bf16, fp32, rtol=1e-2)
    # ... but it is rounded: not the float32 run
    assert bf16 != fp32


def test_bf16_flag_sets_the_compute_dtype_and_no_loss_scaling(tmp_path):
    flag = T.run(T.make(tmp_path / "flag", training_config={"training_iters": 4, "bf16": True}))
    explicit = T.run(T.make(tmp_path / "explicit", training_config={"training_iters": 4},
                            model_config={"compute_dtype": "bfloat16"}))
    assert _losses(flag) == _losses(explicit)
    events = read_events(tmp_path / "flag" / "events", kind="step")
    assert all(e["loss_scale"] is None and not e["overflow"] for e in events)
    config = init_configs_from_dict(T.make(tmp_path / "c", training_config={"bf16": True}))
    assert config.model_config.compute_dtype == "bfloat16"


def test_fp16_flag_sets_float16_and_megatrons_dynamic_loss_scale(tmp_path):
    config = init_configs_from_dict(T.make(tmp_path / "c", training_config={"fp16": True}))
    assert config.model_config.compute_dtype == "float16"
    flag = T.run(T.make(tmp_path / "flag", training_config={"training_iters": 4, "fp16": True}))
    # the same run spelled out: float16 compute, dynamic scale from 2**32, factor 2, window 1000
    explicit = T.run(T.make(tmp_path / "explicit", training_config={
        "training_iters": 4, "loss_scale_value": 2.0 ** 32, "loss_scale_factor": 2, "loss_scale_window": 1000},
        model_config={"compute_dtype": "float16"}))
    assert _losses(flag) == _losses(explicit)
    events = read_events(tmp_path / "flag" / "events", kind="step")
    # 2**32 overflows float16 gradients: every step is skipped and the scale halves each time
    assert [e["overflow"] for e in events] == [True] * 4
    assert [e["loss_scale"] for e in events] == [2.0 ** 31, 2.0 ** 30, 2.0 ** 29, 2.0 ** 28]
    # a static loss_scale replaces the dynamic default
    static = init_configs_from_dict(T.make(tmp_path / "s", training_config={"fp16": True, "loss_scale": 128}))
    assert static.training_config.loss_scale_settings() == {"type": "FixedLossScaleUpdateCell",
                                                            "loss_scale_value": 128}


def test_precision_contradictions_are_refused_naming_both_fields(tmp_path):
    with pytest.raises(ConfigValueError, match=r"compute_dtype.*training_config\.fp16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"fp16": True},
                                      model_config={"compute_dtype": "bfloat16"}))
    with pytest.raises(ConfigValueError, match=r"compute_dtype.*training_config\.bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True},
                                      model_config={"compute_dtype": "float32"}))
    with pytest.raises(ConfigValueError, match=r"loss_scale_value.*bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={
            "bf16": True, "loss_scale_value": 1024, "loss_scale_factor": 2, "loss_scale_window": 10}))
    with pytest.raises(ConfigValueError, match=r"scale_sense.*bf16"):
        init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True, "scale_sense": {
            "type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024, "scale_factor": 2, "scale_window": 10}}))
    # agreeing values and a static bf16 scale are fine
    init_configs_from_dict(T.make(tmp_path, training_config={"fp16": True}, model_config={"compute_dtype": "fp16"}))
    ok = init_configs_from_dict(T.make(tmp_path, training_config={"bf16": True, "loss_scale": 8.0}))
    assert ok.training_config.loss_scale_settings()["type"] == "FixedLossScaleUpdateCell"


def test_bfloat16_gelu_and_softmax_run_on_cpu():
    from mindspeed_ms.core.fusions import Gelu, Softmax

    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    xb = Tensor(x).astype(ms.bfloat16)
    rounded = Tensor(x).astype(ms.bfloat16).astype(ms.float32)
    for cell in (Gelu(), Softmax()):
        out = cell(xb)
        assert out.dtype == ms.bfloat16
        reference = cell(rounded).asnumpy()
        np.testing.assert_allclose(out.astype(ms.float32).asnumpy(), reference, rtol=1e-2, atol=1e-2)
        grad = ms.grad(lambda t, c=cell: c(t).astype(ms.float32).sum())(xb)
        assert np.isfinite(grad.astype(ms.float32).asnumpy()).all()
