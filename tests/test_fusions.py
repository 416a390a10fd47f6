"""The CPU kernel forms of mindspeed_ms.core.fusions compute what MindSpore's fused operators compute.

Each form is checked against the native operator, forward and backward, in PyNative mode and
inside ``mindspore.jit`` (where the trainer uses them), on float32 data, to float32 rounding.
"""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindspeed_ms.core import fusions
from mindspeed_ms.legacy.model.norm import LayerNorm, RMSNorm

RTOL, ATOL = 2e-6, 2e-6  # float32: a few ulps, the forms sum in a different order


class _Fn(nn.Cell):
    """A plain function as a cell (``mindspore.jit`` parses cells, not lambdas)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, *args):
        return self.fn(*args)


class _WeightedSum(nn.Cell):
    def __init__(self, inner, weight):
        super().__init__()
        self.inner = inner
        self.weight = weight

    def construct(self, *args):
        return (self.inner(*args) * self.weight).sum()


def _value_and_grads(fn, inputs, compiled):
    """fn(*inputs) and the gradients of sum(fn * w) for a fixed random w, for every input."""
    cell = fn if isinstance(fn, nn.Cell) else _Fn(fn)
    out = cell(*inputs)
    weight = Tensor(np.random.default_rng(7).standard_normal(out.shape).astype(np.float32))
    grad = ms.grad(_WeightedSum(cell, weight), grad_position=tuple(range(len(inputs))))
    if compiled:
        grad = ms.jit(grad)
    grads = grad(*inputs)
    return out.asnumpy(), [g.asnumpy() for g in grads]


def _assert_same(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL, atol=ATOL)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


# MindSpore parses the functions it compiles from their source: named functions, not lambdas
def _exact_gelu(x):
    return ops.gelu(x, approximate="none")


def _softmax(x):
    return ops.softmax(x, axis=-1)


def _rms(x):
    return x * ops.rsqrt(ops.mean(x * x, axis=-1, keep_dims=True) + 1e-6)


_NATIVE_LAYER_NORM = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=1e-5)
_MEAN_32 = Tensor(np.full((32, 1), 1 / 32, np.float32))
_MEAN_16 = Tensor(np.full((16, 1), 1 / 16, np.float32))


def _native_layer_norm(x, weight, bias):
    return _NATIVE_LAYER_NORM(x, weight, bias)[0]


def _composed_layer_norm(x, weight, bias):
    return fusions.layer_norm_by_matmul(x, weight, bias, 1e-5, _MEAN_32)


def _composed_rms(x):
    return fusions.rms_by_matmul(x, 1e-6, _MEAN_16)


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_erf_gelu_equals_the_exact_gelu(compiled):
    x = Tensor(np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32) * 3)
    cell = fusions.ErfGelu()
    _assert_same(_value_and_grads(cell, (x,), compiled),
                 _value_and_grads(_exact_gelu, (x,), compiled))


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_last_axis_softmax_equals_softmax(compiled):
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 16, 24)).astype(np.float32) * 4)
    cell = fusions.LastAxisSoftmax()
    _assert_same(_value_and_grads(cell, (x,), compiled),
                 _value_and_grads(_softmax, (x,), compiled))


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_layer_norm_by_matmul_equals_layer_norm(compiled):
    rng = np.random.default_rng(2)
    x = Tensor((rng.standard_normal((5, 3, 32)) * 2 + 1).astype(np.float32))
    weight = Tensor(rng.standard_normal(32).astype(np.float32))
    bias = Tensor(rng.standard_normal(32).astype(np.float32))
    _assert_same(_value_and_grads(_composed_layer_norm, (x, weight, bias), compiled),
                 _value_and_grads(_native_layer_norm, (x, weight, bias), compiled))


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
def test_rms_by_matmul_equals_the_mean_of_squares(compiled):
    x = Tensor(np.random.default_rng(3).standard_normal((4, 6, 16)).astype(np.float32))
    _assert_same(_value_and_grads(_composed_rms, (x,), compiled), _value_and_grads(_rms, (x,), compiled))


@pytest.mark.parametrize("norm_class", [LayerNorm, RMSNorm])
def test_norm_layers_give_the_same_result_with_graph_kernels(norm_class):
    x = Tensor(np.random.default_rng(4).standard_normal((8, 2, 24)).astype(np.float32))
    norm = norm_class(24)
    for p in norm.trainable_params():  # not the all-ones / all-zeros initial values
        p.set_data(Tensor(np.random.default_rng(5).standard_normal(p.shape).astype(np.float32)))
    params = tuple(norm.trainable_params())

    class Squares(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def construct(self, t):
            return (self.norm(t) ** 2).sum()

    def run():
        grad = ms.jit(ms.value_and_grad(Squares(), grad_position=0, weights=params))
        loss, (dx, dparams) = grad(x)
        return [loss.asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in dparams]

    native = run()
    assert fusions.use_graph_kernels(norm) == 1 and norm.graph_kernels
    composed = run()
    for got, want in zip(composed, native):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_wrappers_keep_native_operators_for_low_precision():
    x16 = Tensor(np.linspace(-3, 3, 40, dtype=np.float32).reshape(5, 8)).astype(ms.float16)
    np.testing.assert_array_equal(fusions.Gelu("none")(x16).asnumpy(), ops.gelu(x16, approximate="none").asnumpy())
    np.testing.assert_array_equal(fusions.Softmax()(x16).asnumpy(), ops.softmax(x16, axis=-1).asnumpy())
    x32 = x16.astype(ms.float32)
    np.testing.assert_allclose(fusions.Gelu("tanh")(x32).asnumpy(), ops.gelu(x32, approximate="tanh").asnumpy())


def test_gelu_rejects_an_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fusions.Gelu("erf")


def test_use_graph_kernels_switches_every_norm_of_a_model():
    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norms = nn.CellList([LayerNorm(8), RMSNorm(8), LayerNorm(8)])
            self.w = Parameter(Tensor(np.ones(8, np.float32)))

        def construct(self, x):
            for norm in self.norms:
                x = norm(x) * self.w
            return x

    net = Net()
    assert fusions.use_graph_kernels(net) == 3
    assert all(n.graph_kernels for n in net.norms)
    assert fusions.use_graph_kernels(net, enabled=False) == 3
    assert not any(n.graph_kernels for n in net.norms)


def test_compiled_entry_point_switches_graph_kernels_and_back_when_it_cannot_compile():
    from mindspeed_ms.training.compilation import compile_cell  # pylint: disable=import-outside-toplevel

    class Compiles(nn.Cell):
        def __init__(self):
            super().__init__()
            self.norm = LayerNorm(8)

        def construct(self, x):
            return self.norm(x)

    class DoesNotCompile(Compiles):
        def construct(self, x):
            return self.norm(x) * len({id(x): 1})  # a dict keyed by a Python id: no graph form

    x = Tensor(np.random.default_rng(6).standard_normal((3, 8)).astype(np.float32))
    good = Compiles()
    good.set_train(True)
    entry = compile_cell(good)
    assert good.norm.graph_kernels  # switched on with the compiled entry point
    entry(x)
    assert entry.state == {True: "compiled"} and good.norm.graph_kernels
    bad = DoesNotCompile()
    bad.set_train(True)
    entry = compile_cell(bad)
    assert bad.norm.graph_kernels
    entry(x)
    assert entry.state == {True: "eager"}
    assert not bad.norm.graph_kernels  # eager again: back to the PyNative kernels
