"""Single-process checks of the tensor-parallel building blocks (no communication)."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from mindspore import dtype as mstype

from mindspeed_ms.core.precision import batch_matmul, carrier_dtype, matmul, resolve_dtype
from mindspeed_ms.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from mindspeed_ms.core.tensor_parallel.layers import draw_full_weight, master_init_seed
from mindspeed_ms.core.tensor_parallel.random import RNGStatesTracker, dropout, get_rng_tracker

ms.set_device("CPU")


def reference_cross_entropy(logits, target, smoothing=0.0):
    vocab = logits.shape[-1]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -log_probs[np.arange(len(target)), target]
    s = smoothing * vocab / (vocab - 1)
    return (1 - s) * nll - s * log_probs.mean(-1)


def test_seed_example_cross_entropy_prints_documented_values():
    loss = VocabParallelCrossEntropy()
    logits = Tensor([[2., 1., 0.2], [2., 1., 0.2]], mstype.float32)
    labels = Tensor([1, 1], mstype.int32)
    output = loss(logits, labels)
    assert output.shape == (2,)
    assert str(output) == "[1.4273429 1.4273429]"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_value_and_gradient(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 11)).astype(np.float32) * 3
    target = rng.integers(0, 11, 6)
    weights = rng.standard_normal(6).astype(np.float32)
    loss = VocabParallelCrossEntropy()
    out = loss(Tensor(logits), Tensor(target), smoothing)
    np.testing.assert_allclose(out.asnumpy(), reference_cross_entropy(logits.astype(np.float64), target, smoothing),
                               rtol=1e-6, atol=1e-6)
    grad = ms.grad(lambda x: (loss(x, Tensor(target), smoothing) * Tensor(weights)).sum())(Tensor(logits))
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    s = smoothing * 11 / 10
    expected = (soft - (1 - s) * np.eye(11)[target] - s / 11) * weights[:, None]
    np.testing.assert_allclose(grad.asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        VocabParallelCrossEntropy()(Tensor(np.ones((2, 3), np.float32)), Tensor([0, 1]), 1.0)


def test_rng_tracker_fork_and_state_roundtrip():
    tracker = RNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    states = tracker.get_states()
    a = tracker.uniform((3,))
    with tracker.fork():
        b = tracker.uniform((3,))
    assert tracker.current == "default"
    tracker.set_states(states)
    np.testing.assert_array_equal(tracker.uniform((3,)), a)
    with tracker.fork():
        np.testing.assert_array_equal(tracker.uniform((3,)), b)
    with pytest.raises(KeyError, match="does not exist"):
        with tracker.fork("nope"):
            pass


def test_dropout_scales_and_gradient_uses_the_same_mask():
    get_rng_tracker().reset()
    x = Tensor(np.ones((200, 50), np.float32))
    states = get_rng_tracker().get_states()
    out = dropout(x, 0.25).asnumpy()
    kept = out != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(out[kept], 1 / 0.75, rtol=1e-6)
    get_rng_tracker().set_states(states)
    grad = ms.grad(lambda t: dropout(t, 0.25).sum())(x).asnumpy()
    np.testing.assert_array_equal(grad != 0, kept)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.0)


def test_full_weight_draws_depend_only_on_key_and_seed():
    ms.set_seed(11)
    a = draw_full_weight("normal", (8, 4), "layer1.qkv")
    b = draw_full_weight("normal", (8, 4), "layer1.qkv")
    c = draw_full_weight("normal", (8, 4), "layer2.qkv")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert abs(a.std() - 0.01) < 0.005
    assert master_init_seed("k", 1) != master_init_seed("k", 2)
    with pytest.raises(ValueError, match="cannot draw"):
        draw_full_weight("orthogonal", (2, 2), "x")


def test_emulated_half_precision_matmul_rounds_and_overflows():
    a = np.array([[1.0 + 2 ** -12, 300.0]], np.float32)
    b = np.array([[1.0], [300.0]], np.float32)
    out = matmul(Tensor(a), Tensor(b), compute_dtype="float16")
    assert out.dtype == mstype.float16
    # 1 + 2^-12 rounds to 1 in fp16; 300*300 = 90000 overflows fp16 (max 65504)
    assert np.isinf(out.asnumpy()[0, 0])
    small = matmul(Tensor(a[:, :1]), Tensor(b[:1]), compute_dtype="float16")
    assert small.asnumpy()[0, 0] == 1.0
    bf = batch_matmul(Tensor(np.ones((2, 3, 4), np.float32)), Tensor(np.ones((2, 4, 5), np.float32)),
                      compute_dtype="bfloat16")
    # bfloat16 on CPU: its values carried in float32 (no bfloat16 kernels downstream there)
    assert bf.dtype == carrier_dtype("bfloat16") and bf.shape == (2, 3, 5)
    odd = batch_matmul(Tensor(np.full((1, 1, 1), 1.0 + 2 ** -10, np.float32)), Tensor(np.ones((1, 1, 1), np.float32)),
                       compute_dtype="bfloat16")
    assert float(odd.astype(mstype.float32).asnumpy().ravel()[0]) == 1.0  # 1 + 2^-10 rounds to 1 in bfloat16
    assert resolve_dtype("bf16") == mstype.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
