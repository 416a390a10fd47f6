"""Matrix products in a compute dtype, on every device.

MindSpore's CPU backend has no float16/bfloat16 MatMul ("Unsupported data type"), while casts and
elementwise float16 ops work. On CPU a low-precision product is therefore emulated: both operands are
rounded through the low-precision type, multiplied and accumulated in float32 (as the device's cube
unit accumulates in float32), and the result is rounded to the low-precision type. Values that do not
fit the type overflow to inf exactly as on the device, which is what makes fp16 loss scaling behave
on CPU as it does on Ascend (overflows, skipped steps, recovery).

bfloat16 goes one step further on CPU: beyond MatMul, the CPU backend has no bfloat16 kernels for
slicing and its gradient, Stack, Tile, Sigmoid, Dropout, MaskedFill, Sqrt/Erf/Exp or ReduceSum
(measured, MindSpore 2.10), so bfloat16 tensors cannot flow through a model there. On CPU a
bfloat16 compute dtype is therefore *carried* in float32 tensors whose values are bfloat16-rounded:
the products round their operands, their result and (through the casts' backward) their gradients
to bfloat16, and :func:`to_compute_dtype` rounds where the model casts to the compute dtype; the
operators in between run float32 kernels on those values. float16, which the CPU backend supports
elementwise, keeps float16 tensors.

On Ascend/GPU the native low-precision kernels run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["resolve_dtype", "native_low_precision_matmul", "matmul", "batch_matmul", "add_bias", "LOW_PRECISION",
           "carrier_dtype", "to_compute_dtype", "readable"]

LOW_PRECISION = (ms.float16, ms.bfloat16)

_DTYPES = {
    "float32": ms.float32, "fp32": ms.float32,
    "float16": ms.float16, "fp16": ms.float16, "half": ms.float16,
    "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
    "float64": ms.float64,
}


def resolve_dtype(dtype: Union[str, "ms.dtype", None], default=ms.float32):
    """A MindSpore dtype from a name ('float16', 'bf16', ...), a dtype, or None (-> default)."""
    if dtype is None:
        return default
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {sorted(_DTYPES)}") from None
    return dtype


@lru_cache(maxsize=None)
def native_low_precision_matmul() -> bool:
    """Whether the device runs float16/bfloat16 MatMul natively (False on CPU)."""
    from mindspeed_ms.core.communication import device_target  # pylint: disable=import-outside-toplevel

    return device_target() != "CPU"


def _compute_dtype_of(compute_dtype, a: Tensor):
    """The dtype a product runs in: ``compute_dtype`` resolved, or ``a``'s dtype when None.

    Kept free of ``try``/dict look-ups for dtypes that are already MindSpore dtypes, so that the
    products below also compile inside ``mindspore.jit`` (graph mode resolves it at compile time).
    """
    if compute_dtype is None:
        return a.dtype
    if isinstance(compute_dtype, str):
        return resolve_dtype(compute_dtype)
    return compute_dtype


def _needs_emulation(compute_dtype) -> bool:
    return compute_dtype in LOW_PRECISION and not native_low_precision_matmul()


def carrier_dtype(compute_dtype):
    """The dtype of the tensors that hold values of ``compute_dtype`` on this device.

    float32 for bfloat16 on CPU (bfloat16-rounded values in float32 tensors, see the module
    docstring); ``compute_dtype`` itself everywhere else.
    """
    compute_dtype = resolve_dtype(compute_dtype)
    if compute_dtype == ms.bfloat16 and not native_low_precision_matmul():
        return ms.float32
    return compute_dtype


def _round(x: Tensor, compute_dtype) -> Tensor:
    """``x`` rounded to ``compute_dtype`` and held in :func:`carrier_dtype`."""
    if compute_dtype == ms.bfloat16 and not native_low_precision_matmul():
        return x.astype(ms.bfloat16).astype(ms.float32)
    return x.astype(compute_dtype)


def to_compute_dtype(x: Tensor, compute_dtype) -> Tensor:
    """``x.astype(compute_dtype)``, or on CPU for bfloat16 its rounded values in float32.

    The backward rounds the gradient through the same dtype, as a cast's backward does.
    """
    return _round(x, _compute_dtype_of(compute_dtype, x))


# The transposes are flags of the kernel, not separate Transpose operators: the products are
# bit-identical to ``ops.matmul(x, y.T)`` on CPU (measured) and skip a copy of the operand, which
# was a tenth of the operator time of a small GPT's training step (and its backward, too).
_MATMUL = ops.MatMul()
_MATMUL_NT = ops.MatMul(transpose_b=True)
_BATCH_MATMUL = ops.BatchMatMul()
_BATCH_MATMUL_NT = ops.BatchMatMul(transpose_b=True)
_BATCH_MATMUL_TN = ops.BatchMatMul(transpose_a=True)
_BATCH_MATMUL_TT = ops.BatchMatMul(transpose_a=True, transpose_b=True)


def _mm(x: Tensor, y: Tensor, transpose_b: bool) -> Tensor:
    """2-D product over the last dimension of ``x`` with its leading dimensions restored."""
    flat = x.reshape(-1, x.shape[-1])
    out = _MATMUL_NT(flat, y) if transpose_b else _MATMUL(flat, y)
    return out.reshape(x.shape[:-1] + (out.shape[-1],))


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False, compute_dtype=None) -> Tensor:
    """``a @ b`` (or ``a @ b.T``) over the last dimension of ``a``, in ``compute_dtype``.

    Args:
        a: ``(..., k)``.
        b: ``(k, n)``, or ``(n, k)`` with ``transpose_b``.
        transpose_b: Whether ``b`` is stored transposed.
        compute_dtype: dtype of the product (default: ``a``'s dtype).

    Returns:
        ``(..., n)`` in ``compute_dtype`` (bfloat16 on CPU: its values, carried in float32).
    """
    compute_dtype = _compute_dtype_of(compute_dtype, a)
    if _needs_emulation(compute_dtype):
        a32 = a.astype(compute_dtype).astype(ms.float32)
        b32 = b.astype(compute_dtype).astype(ms.float32)
        return _round(_mm(a32, b32, transpose_b), compute_dtype)
    return _mm(a.astype(compute_dtype), b.astype(compute_dtype), transpose_b)


def _bmm(x: Tensor, y: Tensor, transpose_a: bool, transpose_b: bool) -> Tensor:
    if len(x.shape) >= 3 and x.shape[:-2] == y.shape[:-2]:  # BatchMatMul: equal batch dimensions only
        if transpose_a:
            return _BATCH_MATMUL_TT(x, y) if transpose_b else _BATCH_MATMUL_TN(x, y)
        return _BATCH_MATMUL_NT(x, y) if transpose_b else _BATCH_MATMUL(x, y)
    if transpose_a:
        x = x.swapaxes(-1, -2)
    if transpose_b:
        y = y.swapaxes(-1, -2)
    return ops.matmul(x, y)


def batch_matmul(a: Tensor, b: Tensor, transpose_a: bool = False, transpose_b: bool = False,
                 compute_dtype: Optional[object] = None) -> Tensor:
    """Batched ``a @ b`` over the last two dimensions, in ``compute_dtype`` (emulated on CPU)."""
    compute_dtype = _compute_dtype_of(compute_dtype, a)
    if _needs_emulation(compute_dtype):
        a32 = a.astype(compute_dtype).astype(ms.float32)
        b32 = b.astype(compute_dtype).astype(ms.float32)
        return _round(_bmm(a32, b32, transpose_a, transpose_b), compute_dtype)
    return _bmm(a.astype(compute_dtype), b.astype(compute_dtype), transpose_a, transpose_b)


def add_bias(x: Tensor, bias: Tensor) -> Tensor:
    """``x + bias`` with ``bias`` broadcast over the leading dimensions, in ``x``'s dtype.

    For bfloat16 tensors that reach it on CPU (the model's own carry float32, see the module
    docstring): the gradient of a broadcast bias is a sum over the leading dimensions; MindSpore's CPU backend
    has no bfloat16 ReduceSum ("Reduce does not support ... BFloat16"), so on CPU a bfloat16 sum
    is formed in float32 from the bfloat16-rounded operands and rounded back: the same value as a
    bfloat16 addition, and the bias gradient is reduced in float32 (as the device accumulates it).
    """
    if x.dtype == ms.bfloat16 and not native_low_precision_matmul():
        return (x.astype(ms.float32) + bias.astype(ms.bfloat16).astype(ms.float32)).astype(ms.bfloat16)
    return x + bias.astype(x.dtype)


def readable(weight: Tensor) -> Tensor:
    """``weight`` as operators other than casts may read it: a bfloat16 tensor on CPU in float32
    (exact; no bfloat16 Gather there), anything else as it is. The gradient flows back through the
    cast, rounded to bfloat16 like the weight."""
    if weight.dtype == ms.bfloat16 and not native_low_precision_matmul():
        return weight.astype(ms.float32)
    return weight
