"""Normalisation layers: LayerNorm and RMSNorm.

RMSNorm is written from primitives: MindSpore's ``ops.rms_norm`` has no CPU kernel. Both compute in
float32 and return the input's dtype. In a compiled graph on CPU both take their row means through the
matmul kernel (``graph_kernels``, switched on for compiled model chunks; see
:mod:`mindspeed_ms.core.fusions`). Under sequence parallelism each rank normalises a slice of the
sequence, so the weight gradients are partial: the weights are marked ``sequence_parallel`` and the
gradient reduction all-reduces them over tensor-parallel ranks.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from mindspeed_ms.core.fusions import layer_norm_by_matmul, rms_by_matmul
from mindspeed_ms.core.precision import resolve_dtype

__all__ = ["LayerNorm", "RMSNorm", "get_norm"]


def _mean_weights(hidden_size: int) -> Tensor:
    """``(H, 1)`` float32 filled with ``1 / H``: a row mean as a matrix-vector product."""
    return Tensor(np.full((hidden_size, 1), 1.0 / hidden_size, np.float32))


class LayerNorm(nn.Cell):
    """Layer normalisation over the last dimension.

    Args:
        hidden_size: Normalised dimension.
        eps: Epsilon.
        params_dtype: Parameter dtype.
        sequence_parallel: Mark the weights for tensor-parallel gradient all-reduce.
    """

    def __init__(self, hidden_size, eps=1e-5, params_dtype=ms.float32, sequence_parallel=False):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        dtype = resolve_dtype(params_dtype)
        self.weight = Parameter(initializer("ones", (self.hidden_size,), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (self.hidden_size,), dtype), name="bias")
        self.weight.sequence_parallel = sequence_parallel
        self.bias.sequence_parallel = sequence_parallel
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)
        #: Row means through the matmul kernel (faster in a compiled graph on CPU only).
        self.graph_kernels = False
        self.mean_weights = _mean_weights(self.hidden_size)

    def construct(self, x):
        dtype = x.dtype
        x32, weight, bias = x.astype(ms.float32), self.weight.astype(ms.float32), self.bias.astype(ms.float32)
        if self.graph_kernels:
            out = layer_norm_by_matmul(x32, weight, bias, self.eps, self.mean_weights)
        else:
            out, _, _ = self.layer_norm(x32, weight, bias)
        return out.astype(dtype)


class RMSNorm(nn.Cell):
    """Root-mean-square normalisation: ``x / sqrt(mean(x^2) + eps) * weight``.

    Args:
        hidden_size: Normalised dimension.
        eps: Epsilon.
        params_dtype: Parameter dtype.
        sequence_parallel: Mark the weight for tensor-parallel gradient all-reduce.
    """

    def __init__(self, hidden_size, eps=1e-5, params_dtype=ms.float32, sequence_parallel=False):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.weight = Parameter(initializer("ones", (self.hidden_size,), resolve_dtype(params_dtype)), name="weight")
        self.weight.sequence_parallel = sequence_parallel
        #: The mean of squares through the matmul kernel (faster in a compiled graph on CPU only).
        self.graph_kernels = False
        self.mean_weights = _mean_weights(self.hidden_size)

    def construct(self, x):
        dtype = x.dtype
        x32 = x.astype(ms.float32)
        if self.graph_kernels:
            normed = rms_by_matmul(x32, self.eps, self.mean_weights)
        else:
            variance = ops.mean(ops.square(x32), axis=-1, keep_dims=True)
            normed = x32 * ops.rsqrt(variance + self.eps)
        return (normed * self.weight.astype(ms.float32)).astype(dtype)


def get_norm(config, hidden_size=None):
    """The normalisation layer named by ``config.normalization``.

    'LayerNorm' or 'RMSNorm'; 'FusedRMSNorm' (upstream's name for its fused kernel) builds the same RMSNorm.
    """
    hidden_size = hidden_size or config.hidden_size
    sequence_parallel = bool(config.parallel_config.sequence_parallel)
    kind = config.normalization
    eps = config.norm_epsilon
    dtype = config.params_dtype
    if kind == "LayerNorm":
        return LayerNorm(hidden_size, eps, dtype, sequence_parallel)
    if kind in ("RMSNorm", "FusedRMSNorm"):
        return RMSNorm(hidden_size, eps, dtype, sequence_parallel)
    raise ValueError(f"normalization must be one of ['LayerNorm', 'RMSNorm', 'FusedRMSNorm'], got {kind!r}")

