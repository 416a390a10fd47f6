"""Matrix products in a compute dtype, on every device.

MindSpore's CPU backend has no float16/bfloat16 MatMul ("Unsupported data type"), while casts and
elementwise float16 ops work. On CPU a low-precision product is therefore emulated: both operands are
rounded through the low-precision type, multiplied and accumulated in float32 (as the device's cube
unit accumulates in float32), and the result is rounded to the low-precision type. Values that do not
fit the type overflow to inf exactly as on the device, which is what makes fp16 loss scaling behave
on CPU as it does on Ascend (overflows, skipped steps, recovery).

On Ascend/GPU the native low-precision kernels run.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Union

import mindspore as ms
from mindspore import Tensor, ops

__all__ = ["resolve_dtype", "native_low_precision_matmul", "matmul", "batch_matmul", "LOW_PRECISION"]

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


def _emulated(a: Tensor, b: Tensor, compute_dtype, fn) -> Tensor:
    a32 = a.astype(compute_dtype).astype(ms.float32)
    b32 = b.astype(compute_dtype).astype(ms.float32)
    return fn(a32, b32).astype(compute_dtype)


def matmul(a: Tensor, b: Tensor, transpose_b: bool = False, compute_dtype=None) -> Tensor:
    """``a @ b`` (or ``a @ b.T``) over the last dimension of ``a``, in ``compute_dtype``.

    Args:
        a: ``(..., k)``.
        b: ``(k, n)``, or ``(n, k)`` with ``transpose_b``.
        transpose_b: Whether ``b`` is stored transposed.
        compute_dtype: dtype of the product (default: ``a``'s dtype).

    Returns:
        ``(..., n)`` in ``compute_dtype``.
    """
    compute_dtype = resolve_dtype(compute_dtype, a.dtype)
    lead = a.shape[:-1]

    def mm(x, y):
        out = ops.matmul(x.reshape(-1, x.shape[-1]), y.T if transpose_b else y)
        return out.reshape(tuple(lead) + (out.shape[-1],))

    if compute_dtype in LOW_PRECISION and not native_low_precision_matmul():
        return _emulated(a, b, compute_dtype, mm)
    return mm(a.astype(compute_dtype), b.astype(compute_dtype))


def batch_matmul(a: Tensor, b: Tensor, transpose_a: bool = False, transpose_b: bool = False,
                 compute_dtype: Optional[object] = None) -> Tensor:
    """Batched ``a @ b`` over the last two dimensions, in ``compute_dtype`` (emulated on CPU)."""
    compute_dtype = resolve_dtype(compute_dtype, a.dtype)

    def bmm(x, y):
        if transpose_a:
            x = x.swapaxes(-1, -2)
        if transpose_b:
            y = y.swapaxes(-1, -2)
        return ops.matmul(x, y)

    if compute_dtype in LOW_PRECISION and not native_low_precision_matmul():
        return _emulated(a, b, compute_dtype, bmm)
    return bmm(a.astype(compute_dtype), b.astype(compute_dtype))
