"""Rotary position embedding (RoPE)."""

from __future__ import annotations

import numpy as np

from mindspore import Tensor, nn, ops

__all__ = ["RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half"]


class RotaryEmbedding(nn.Cell):
    """Rotary position embedding for language models.

    Args:
        kv_channels: Head dimension.
        rotary_percent: Fraction of the head dimension that is rotated.
        rotary_interleaved: Not supported (raises NotImplementedError).
        seq_len_interpolation_factor: Linear position interpolation for longer sequences (> 1.0).
        rotary_base: Base period.

    Inputs:
        - **max_seq_len** (int) - number of positions.
        - **offset** (int) - first position. Default: 0.

    Outputs:
        The angles ``emb`` of shape ``(max_seq_len, 1, 1, rotary_dim)``.

    Raises:
        NotImplementedError: rotary_interleaved is True.
    """

    def __init__(self, kv_channels, rotary_percent=1.0, rotary_interleaved=False, seq_len_interpolation_factor=None,
                 rotary_base=10000):
        super().__init__()
        if rotary_interleaved:
            raise NotImplementedError("rotary_interleaved=True is not supported for now.")
        if not 0.0 < float(rotary_percent) <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent}")
        if seq_len_interpolation_factor is not None and float(seq_len_interpolation_factor) < 1.0:
            raise ValueError(f"seq_len_interpolation_factor must be >= 1.0, got {seq_len_interpolation_factor}")
        dim = int(kv_channels * rotary_percent)
        if dim % 2:
            raise ValueError(f"the rotary dimension kv_channels * rotary_percent = {dim} must be even")
        self.dim = dim
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        self.inv_freq = 1.0 / (float(rotary_base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))

    def construct(self, max_seq_len, offset=0):
        positions = np.arange(max_seq_len, dtype=np.float64) + offset
        if self.seq_len_interpolation_factor is not None:
            positions = positions / float(self.seq_len_interpolation_factor)
        freqs = np.outer(positions, self.inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
        return Tensor(emb.reshape(max_seq_len, 1, 1, self.dim))


def rotate_half(x):
    """``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = ops.chunk(x, 2, axis=-1)
    return ops.concat([-x2, x1], axis=-1)


def apply_rotary_pos_emb(t, freqs, seq_dim=0, fused=False):
    """Rotate the first ``freqs.shape[-1]`` channels of ``t``.

    Args:
        t: ``(..., D)`` with the sequence on ``seq_dim``.
        freqs: Angles ``(S, 1, 1, rot_dim)`` from :class:`RotaryEmbedding` (or any shape that
            broadcasts once reshaped so the sequence sits on ``seq_dim``).
        seq_dim: Sequence dimension of ``t``.
        fused: Use MindSpore's fused ``ops.rotary_position_embedding`` kernel (Ascend only;
            ``model_config.apply_rope_fusion``) when the whole head dimension of a 4-D ``t`` is
            rotated; otherwise the rotation is computed from its parts.
    """
    rot_dim = freqs.shape[-1]
    seq_len = freqs.shape[0]
    shape = [1] * len(t.shape)
    shape[seq_dim] = seq_len
    shape[-1] = rot_dim
    angles = freqs.reshape(tuple(shape))
    cos = ops.cos(angles).astype(t.dtype)
    sin = ops.sin(angles).astype(t.dtype)
    if rot_dim == t.shape[-1]:
        if fused and len(t.shape) == 4:
            # mode 0 rotates halves: the same x * cos + rotate_half(x) * sin, in one kernel
            return ops.rotary_position_embedding(t, cos, sin, 0)
        return t * cos + rotate_half(t) * sin
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    return ops.concat([t_rot * cos + rotate_half(t_rot) * sin, t_pass], axis=-1)

