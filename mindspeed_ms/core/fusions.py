"""Which kernels compute GELU, softmax and the normalisations, per device (Megatron's ``fusions``).

On Ascend the framework uses MindSpore's fused operators (``GeLU``, ``Softmax``, ``LayerNorm``)
and their generated backward passes. On the CPU backend several of those are slow for reasons
that have nothing to do with the arithmetic (measured on the project's 2-core machine, fp32,
compute-bound GPT shapes, forward + backward inside ``mindspore.jit``; see docs/performance.md):

* ``ops.gelu(approximate='none')``'s backward is built from a division and its gradient:
  ~95 ms per ``(2048, 1536)`` tensor, against ~55 ms for the same exact GELU with the
  derivative ``Phi(x) + x phi(x)`` written out (:class:`ErfGelu`).
* the generated softmax backward reduces the last axis with ``ReduceSum``, ~4x slower on CPU
  than the same row sums through the matmul kernel: ~40 ms against ~22 ms per
  ``(8, 6, 256, 256)`` tensor (:class:`LastAxisSoftmax`).
* ``LayerNormGrad`` takes ~24 ms for a ``(2048, 384)`` tensor; layer normalisation written
  with row means through the matmul kernel, differentiated by MindSpore, takes ~7 ms
  (:func:`layer_norm_by_matmul`). In PyNative mode the opposite holds (~3x slower, because
  PyNative's broadcasting kernels are slow), so the normalisation layers use it only inside
  compiled graphs: the compiled entry point of a model chunk switches it on
  (:func:`use_graph_kernels`, called by ``training.compilation.CompiledConstruct``).

The rewritten forms compute the same functions in float32 (equal to the native kernels within
float32 rounding, ``tests/test_fusions.py``); float16 keeps the native operators, so the
emulated float16 rounding is unchanged. The CPU backend has no bfloat16 Sqrt/Erf/Exp kernels
(which ``ops.gelu`` and ``ops.softmax`` need): on CPU a bfloat16 input is computed in float32 and
the result rounded back to bfloat16; other devices run the native bfloat16 operators.
"""

from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

__all__ = ["ErfGelu", "LastAxisSoftmax", "Gelu", "Softmax", "layer_norm_by_matmul", "rms_by_matmul",
           "use_graph_kernels", "cpu_kernels"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def cpu_kernels() -> bool:
    """Whether the CPU forms are used (the device target is CPU)."""
    return ms.get_context("device_target") == "CPU"


class ErfGelu(nn.Cell):
    """Exact GELU, ``x * Phi(x)``, with its derivative ``Phi(x) + x * phi(x)`` written out."""

    def construct(self, x):
        return 0.5 * x * (1.0 + ops.erf(x * _INV_SQRT2))

    def bprop(self, x, out, dout):  # pylint: disable=unused-argument
        cdf = 0.5 * (1.0 + ops.erf(x * _INV_SQRT2))
        pdf = ops.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return (dout * (cdf + x * pdf),)


class LastAxisSoftmax(nn.Cell):
    """Softmax over the last axis; its backward ``y * (dy - sum(y * dy))`` sums rows by a matmul."""

    def construct(self, x):
        return ops.softmax(x, axis=-1)

    def bprop(self, x, out, dout):  # pylint: disable=unused-argument
        weighted = out * dout
        ones = ops.ones((out.shape[-1], 1), out.dtype)
        row_sums = ops.matmul(weighted, ones)
        return (weighted - out * row_sums,)


class Gelu(nn.Cell):
    """GELU as MLPs call it: :class:`ErfGelu` for float32 on CPU, ``ops.gelu`` otherwise.

    Args:
        approximate: ``'none'`` (erf, exact) or ``'tanh'``.
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.cpu = cpu_kernels()
        self.erf_gelu = ErfGelu() if approximate == "none" and self.cpu else None

    def construct(self, x):
        if self.cpu and x.dtype == ms.bfloat16:
            # CPU has no bfloat16 Sqrt/Erf/Exp kernels: GELU runs in float32 and the result is
            # rounded back, the bfloat16 rounding the device's vector unit would give
            return self._gelu32(x.astype(ms.float32)).astype(ms.bfloat16)
        return self._gelu32(x) if x.dtype == ms.float32 else ops.gelu(x, approximate=self.approximate)

    def _gelu32(self, x):
        if self.erf_gelu is not None:
            return self.erf_gelu(x)
        return ops.gelu(x, approximate=self.approximate)


class Softmax(nn.Cell):
    """Softmax over the last axis: :class:`LastAxisSoftmax` for float32 on CPU, ``ops.softmax`` otherwise."""

    def __init__(self):
        super().__init__()
        self.last_axis = LastAxisSoftmax() if cpu_kernels() else None

    def construct(self, x):
        if self.last_axis is not None:
            if x.dtype == ms.float32:
                return self.last_axis(x)
            if x.dtype == ms.bfloat16:  # no bfloat16 Exp on CPU: float32, rounded back
                return self.last_axis(x.astype(ms.float32)).astype(ms.bfloat16)
        return ops.softmax(x, axis=-1)


def _row_mean(x, mean_weights):
    """Mean over the last axis, keeping it, as a matrix-vector product (``x`` is 2-D)."""
    return ops.matmul(x, mean_weights)


def layer_norm_by_matmul(x, weight, bias, eps: float, mean_weights):
    """Layer normalisation of float32 ``x`` over its last axis, row means through the matmul kernel.

    Args:
        x: float32 input, any rank.
        weight, bias: float32 ``(H,)``.
        eps: Added to the variance.
        mean_weights: float32 ``(H, 1)`` filled with ``1 / H``.
    """
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    centred = rows - _row_mean(rows, mean_weights)
    variance = _row_mean(centred * centred, mean_weights)
    out = centred * ops.rsqrt(variance + eps) * weight + bias
    return out.reshape(shape)


def rms_by_matmul(x, eps: float, mean_weights):
    """``x / sqrt(mean(x^2) + eps)`` over the last axis of float32 ``x``, the mean through the matmul kernel."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    return (rows * ops.rsqrt(_row_mean(rows * rows, mean_weights) + eps)).reshape(shape)


def use_graph_kernels(module, enabled: bool = True) -> int:
    """Switch the cells of ``module`` that have graph-only kernel forms (``graph_kernels``) to them.

    For a model chunk that runs compiled; switching on does nothing off CPU.

    Returns:
        The number of cells switched.
    """
    if enabled and not cpu_kernels():
        return 0
    count = 0
    for _, cell in module.cells_and_names():
        if hasattr(cell, "graph_kernels"):
            cell.graph_kernels = bool(enabled)
            count += 1
    return count
