"""Flash attention: the fused Ascend kernel, and a blockwise online-softmax attention everywhere else.

Conventions (every function in this module):

* ``q`` has shape ``(B, N, Sq, D)``; ``k`` and ``v`` have shape ``(B, Nk, Sk, D)`` with ``N % Nk == 0``.
  Grouped-query attention: query head ``h`` uses key/value head ``h // (N // Nk)`` (consecutive query
  heads share a group, as in Megatron).
* Masks follow Megatron: a boolean (or integer) tensor broadcastable to ``(B, N, Sq, Sk)`` where
  ``1``/``True`` means **masked out**. ``causal=True`` additionally masks key ``j`` for query ``i`` when
  ``k_positions[j] > q_positions[i]``; positions default to ``arange`` and let context parallelism pass
  the global positions of a sequence chunk.
* A query row that has no unmasked key gets output zero (not NaN) and zero gradients.
* ``scale`` defaults to ``1 / sqrt(D)``.

Where which implementation runs
-------------------------------
:func:`flash_attention` picks one of two implementations in :func:`_fused_kernel_available` (the only
place that looks at the device):

* **Ascend**: ``mindspore.ops.flash_attention_score`` with the ``fa_config`` fields (``input_layout``,
  ``sparse_mode``, ``pre_tokens``, ``next_tokens``) and the mask, scale and dropout mapped onto it
  (:func:`_fused_attention`): ``(B, N, S, D)`` is transposed to ``input_layout`` and back; with
  ``sparse_mode`` 0/1 the mask handed to the kernel is the union of ``attn_mask``, the causal mask
  from the positions and the ``pre_tokens``/``next_tokens`` band, as an ``(Sq, Sk)``,
  ``(B, 1, Sq, Sk)`` or ``(B, N, Sq, Sk)`` bool tensor; with ``sparse_mode`` 2/3 the kernel's own
  2048 x 2048 compressed causal mask; float32 inputs run in float16 (the kernel has no float32);
  dropout passes ``keep_prob`` and a bit-packed keep mask drawn from the RNG tracker.
* **Everywhere else** (CPU, GPU): a blockwise attention written from MindSpore primitives. Queries
  are cut into blocks of ``bq`` rows and keys into blocks of ``bk`` columns (``block_size``, default
  :data:`DEFAULT_BLOCK_SIZE` = 128 for both); score tiles are at most ``(B, Nk, G * bq, bk)``
  (``G = N // Nk``), so no ``Sq x Sk`` tensor exists unless a single tile covers it
  (``Sq <= bq`` and ``Sk <= bk``). It is an ``nn.Cell`` whose ``bprop`` recomputes the tiles
  (FlashAttention-2's backward), so the backward keeps only ``O`` and the row log-sum-exp.

The blockwise algorithm
-----------------------
Forward, for every query block ``i`` and every key block ``j`` that is not fully masked::

    S_ij   = scale * Q_i K_j^T  (+ mask bias)          score tile
    m_ij   = rowmax(S_ij);  E_ij = exp(S_ij - m_ij)
    l_ij   = rowsum(E_ij);  lse_ij = m_ij + log(l_ij)
    O_ij   = (E_ij * Z_ij) V_j / l_ij                  normalised block output (Z: dropout multiplier)

and the partial results are merged over key blocks with :func:`merge_attention_blocks`::

    lse = log(exp(lse_a) + exp(lse_b))
    O   = exp(lse_a - lse) * O_a + exp(lse_b - lse) * O_b

Backward (given the final ``O``, the row log-sum-exp ``L`` and ``dO``)::

    Delta = rowsum(dO * O)
    P_ij  = exp(S_ij - L_i)                            exact probabilities, recomputed per tile
    dV_j += (P_ij * Z_ij)^T dO_i
    dP_ij = (dO_i V_j^T) * Z_ij
    dS_ij = P_ij * (dP_ij - Delta_i)
    dQ_i += scale * dS_ij K_j;   dK_j += scale * dS_ij^T Q_i

The same tile kernels are exposed for ring attention (context parallelism), which sends K/V blocks
around the ring and combines the per-step results:

* :func:`attention_block_forward` -> ``(O_block, lse_block)`` for one set of keys,
* :func:`merge_attention_blocks` -> the online-softmax merge of two partial results over disjoint
  key sets,
* :func:`attention_block_backward` -> ``(dQ, dK, dV)`` of one key block, given the final ``O`` and
  ``lse`` of the whole attention.

Example (two key halves, then the gradient of each half)::

    o1, l1 = attention_block_forward(q, k1, v1, scale, mask1)
    o2, l2 = attention_block_forward(q, k2, v2, scale, mask2)
    o, lse = merge_attention_blocks(o1, l1, o2, l2)          # == attention over [k1; k2]
    dq1, dk1, dv1 = attention_block_backward(q, k1, v1, o, lse, do, scale, mask1)
    dq2, dk2, dv2 = attention_block_backward(q, k2, v2, o, lse, do, scale, mask2)
    dq = dq1 + dq2

Numerics on CPU
---------------
Scores, softmax statistics and output accumulators are float32 (float64 for float64 inputs or
``softmax_dtype='float64'``). With float16/bfloat16 ``q/k/v`` the blockwise path does what the fused
kernel does: matrix products take the low-precision values and accumulate in float32 (on CPU,
where float16 MatMul does not exist, by multiplying the exactly widened values, the emulation of
:mod:`mindspeed_ms.core.precision`), probabilities and ``dS`` are rounded to the input type before
their products, and the output is rounded once at the end. A float16/bfloat16 ``softmax_dtype``
rounds scores and probabilities through that type.

Masked scores get a large finite negative value (not ``-inf``) so that a fully masked tile needs
no special case; rows with no unmasked key at all are detected from their ``lse`` and zeroed.

CPU implementation notes (each measured on MindSpore 2.10's CPU kernels):

* Tiles whose keys are all masked by position (causal, band) are skipped in both passes; masks
  given as tensors are sliced per tile; positional tile masks are built on the host and cached.
* A tile is ``softmax`` (one fused kernel) plus ``lse = max(S) - log(P[argmax S])``; separate
  max/subtract/exp/sum ops with broadcasting cost several times more. A query block whose keys all
  fall in one tile needs no ``lse`` at all: the backward recomputes that tile's softmax.
* Row-broadcasts are materialised with ``tile``: implicitly broadcasting elementwise kernels are
  several times slower than a tile followed by a same-shape op.
* Blocks are cut with a gather into dense tensors: slices are strided views, on which matmul and
  elementwise kernels run several times slower, and ``Tensor.contiguous()`` is slow itself.
* No ``.shape``/``.dtype`` is read from a freshly computed tensor: in PyNative mode that waits for
  the asynchronous op pipeline.

Dropout on the attention probabilities draws one seed per call from the current stream of
:func:`mindspeed_ms.core.tensor_parallel.random.get_rng_tracker` (fork into the model-parallel
stream around the call, as Megatron does); the mask of tile ``(i, j)`` comes from a numpy
generator seeded with ``(seed, i, j)``, so the backward regenerates exactly the forward's mask.
The masks therefore depend on the block sizes.

The blockwise path runs in PyNative mode (it plans blocks on the host); it is not meant to be
compiled with ``ms.jit``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core.communication import device_target
from mindspeed_ms.core.precision import LOW_PRECISION, batch_matmul, resolve_dtype

__all__ = [
    "flash_attention",
    "plain_attention",
    "attention_block_forward",
    "attention_block_backward",
    "merge_attention_blocks",
    "FlashAttentionConfig",
    "parse_fa_config",
    "DEFAULT_BLOCK_SIZE",
]

DEFAULT_BLOCK_SIZE = 128
"""Default query and key block size of the blockwise path."""

_INT_MAX = 2147483647
# Score given to masked entries. Finite, so that a tile whose rows are all masked still has a
# finite row maximum and needs no NaN guard; exp(_MASK_VALUE - m) underflows to exactly 0 for every
# real score m. Rows whose lse ends up below _EMPTY_LSE had no unmasked key at all.
_MASK_VALUE = -1.0e30
_EMPTY_LSE = 0.5 * _MASK_VALUE
# float16 cannot hold -1e30; plain_attention with a float16 softmax uses this instead.
_MASK_VALUE_FP16 = -3.0e4

_BMM = ops.BatchMatMul()
_BMM_NT = ops.BatchMatMul(transpose_b=True)
_BMM_TN = ops.BatchMatMul(transpose_a=True)
# Primitives rather than the functional wrappers where the wrappers read ``x.shape`` in Python,
# which waits for the pending op pipeline.
_SOFTMAX = ops.Softmax(axis=-1)
_ARGMAX_WITH_VALUE = ops.ArgMaxWithValue(axis=-1, keep_dims=True)
_GATHER_D = ops.GatherD()
_GATHER = ops.Gather()

# Test hook: when set, called with the shape of every score tile the blockwise path creates.
_score_tile_observer = None


# ----------------------------------------------------------------------------------------------
# fa_config
# ----------------------------------------------------------------------------------------------

_LAYOUTS = ("BNSD", "BSND", "BSH", "SBH")
_SPARSE_MODES = {
    0: "explicit mask (attn_mask/causal/positions) with the pre_tokens/next_tokens band",
    1: "explicit mask, no band",
    2: "causal, aligned top-left (key j masked for query i when j > i)",
    3: "causal, aligned bottom-right (key j masked for query i when j > i + Sk - Sq)",
}


@dataclass(frozen=True)
class FlashAttentionConfig:
    """The ``fa_config`` fields (MindSpeed-Core-MS names), validated by :func:`parse_fa_config`.

    Attributes:
        pre_tokens: Query ``i`` may see keys back to position ``i - pre_tokens`` (sparse_mode 0).
        next_tokens: Query ``i`` may see keys up to position ``i + next_tokens`` (sparse_mode 0);
            ``next_tokens=0`` alone is a causal band.
        input_layout: Layout handed to the Ascend kernel: ``BNSD``, ``BSND``, ``BSH`` or ``SBH``
            (``flash_attention`` always takes and returns ``(B, N, S, D)``; on Ascend it transposes
            to this layout around the kernel call). ``TND`` (packed sequences) is not supported.
        sparse_mode: 0, 1, 2 or 3 (see ``_SPARSE_MODES``); 2 and 3 require ``causal=True`` and no
            ``attn_mask``/positions, since the kernel then builds the causal mask itself.
    """

    pre_tokens: int = _INT_MAX
    next_tokens: int = _INT_MAX
    input_layout: str = "BNSD"
    sparse_mode: int = 0

    @property
    def band(self) -> Optional[Tuple[int, int]]:
        """``(pre_tokens, next_tokens)`` when they restrict anything in sparse_mode 0, else None."""
        if self.sparse_mode != 0 or (self.pre_tokens >= _INT_MAX and self.next_tokens >= _INT_MAX):
            return None
        return (self.pre_tokens, self.next_tokens)


_FA_FIELDS = tuple(f.name for f in fields(FlashAttentionConfig))


def parse_fa_config(fa_config=None) -> FlashAttentionConfig:
    """Validate ``fa_config`` (None, a dict, an object with the fields as attributes, or a config).

    Raises:
        ValueError: An unknown field, or a field value that is not supported; the message names the
            field and the allowed values.
    """
    if fa_config is None:
        values = {}
    elif isinstance(fa_config, FlashAttentionConfig):
        values = {name: getattr(fa_config, name) for name in _FA_FIELDS}
    elif isinstance(fa_config, Mapping):
        unknown = sorted(set(fa_config) - set(_FA_FIELDS))
        if unknown:
            raise ValueError(f"fa_config: unknown field(s) {unknown}; allowed fields: {list(_FA_FIELDS)}")
        values = dict(fa_config)
    else:
        values = {name: getattr(fa_config, name) for name in _FA_FIELDS if hasattr(fa_config, name)}
    defaults = FlashAttentionConfig()
    values = {name: (getattr(defaults, name) if values.get(name) is None else values[name]) for name in _FA_FIELDS}

    for name in ("pre_tokens", "next_tokens"):
        val = values[name]
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise ValueError(f"fa_config.{name} must be an integer, got {val!r}")
        values[name] = int(val)
    if values["pre_tokens"] + values["next_tokens"] < 0:
        raise ValueError(
            f"fa_config.pre_tokens ({values['pre_tokens']}) and fa_config.next_tokens ({values['next_tokens']}) "
            "leave an empty band: query i sees keys i - pre_tokens .. i + next_tokens, so "
            "pre_tokens + next_tokens must be >= 0")
    layout = values["input_layout"]
    if not isinstance(layout, str) or layout.upper() not in _LAYOUTS:
        hint = " ('TND', packed variable-length sequences, is not supported)" if str(layout).upper() == "TND" else ""
        raise ValueError(f"fa_config.input_layout must be one of {list(_LAYOUTS)}, got {layout!r}{hint}")
    values["input_layout"] = layout.upper()
    mode = values["sparse_mode"]
    if isinstance(mode, bool) or not isinstance(mode, (int, np.integer)) or int(mode) not in _SPARSE_MODES:
        allowed = "; ".join(f"{k}: {v}" for k, v in _SPARSE_MODES.items())
        raise ValueError(f"fa_config.sparse_mode must be one of {sorted(_SPARSE_MODES)} ({allowed}), got {mode!r}")
    values["sparse_mode"] = int(mode)
    return FlashAttentionConfig(**values)


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

def _fused_kernel_available() -> bool:
    """Whether ``flash_attention`` uses the fused kernel (Ascend only; it has no CPU/GPU kernel)."""
    return device_target() == "Ascend"


def _compute_dtype(*dtypes):
    """float64 when asked for anywhere, otherwise float32 (scores, statistics, accumulators)."""
    return ms.float64 if any(d == ms.float64 for d in dtypes) else ms.float32


def _np_dtype(dtype):
    return np.float64 if dtype == ms.float64 else np.float32


# The helpers below take dtypes and ranks as arguments instead of reading ``x.dtype``/``x.shape``:
# in PyNative mode those reads wait for the op that produces ``x`` (and everything queued before
# it), which stalls the asynchronous op pipeline once per read.

def _round_through(x: Tensor, dtype, back) -> Tensor:
    """``x`` (of dtype ``back``) rounded to ``dtype`` and widened back; no-op for ``dtype=None``."""
    if dtype is None:
        return x
    return x.astype(dtype).astype(back)


def _widen(x: Tensor, have, want) -> Tensor:
    return x if have == want else x.astype(want)


def _times(x: Tensor, c: float, dtype) -> Tensor:
    """``x * c`` at ``x``'s precision (a Python float operand is rounded to float32 first)."""
    if dtype == ms.float64:
        return x * Tensor(c, ms.float64)
    return x * c


def _masked_fill(x: Tensor, cond: Tensor, value: float, dtype) -> Tensor:
    """``masked_fill`` with the fill value typed like ``x`` (a Python float would cost float64
    inputs their precision)."""
    return ops.masked_fill(x, cond, Tensor(value, dtype))


def _expand_last(x: Tensor, width: int, ndim: int = 4) -> Tensor:
    """``(..., R, 1) -> (..., R, width)`` for an ``ndim``-D ``x``.

    Materialised with ``tile`` on purpose: MindSpore's CPU kernels for implicitly broadcasting
    elementwise ops are several times slower than tile followed by a same-shape op.
    """
    if width == 1:
        return x
    return ops.tile(x, (1,) * (ndim - 1) + (width,))


_INDEX_CACHE: Dict[Tuple[int, int], Tensor] = {}


def _index(start: int, stop: int) -> Tensor:
    """``arange(start, stop)`` as an int32 tensor (cached: the same block bounds recur every call)."""
    idx = _INDEX_CACHE.get((start, stop))
    if idx is None:
        if len(_INDEX_CACHE) > 256:
            _INDEX_CACHE.clear()
        idx = _INDEX_CACHE[(start, stop)] = Tensor(np.arange(start, stop, dtype=np.int32))
    return idx


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    """``x[:, :, start:stop]`` as a dense tensor.

    Slices and ``split`` outputs are strided views; MindSpore's CPU matmul and elementwise kernels
    run several times slower on views, and ``Tensor.contiguous()`` copies them slowly (about 10x the
    time of this gather).
    """
    return _GATHER(x, _index(start, stop), 2)


def _dense(x: Tensor, length: int) -> Tensor:
    """``x`` (4-D, ``length`` along axis 2) itself if contiguous, else a dense copy."""
    return x if x.is_contiguous() else _rows(x, 0, length)


def _observe(s: Tensor) -> None:
    if _score_tile_observer is not None:
        _score_tile_observer(tuple(s.shape))


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> Tuple[int, int, int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, N, S, D); got shapes {q.shape}, {k.shape}, {v.shape}")
    b, n, sq, d = q.shape
    bk_, nk, sk, dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if bk_ != b or dk != d:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch size and head dimension")
    if nk == 0 or n % nk:
        raise ValueError(f"the number of query heads ({n}) must be a multiple of the key/value heads ({nk})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    return b, n, sq, d, nk, sk


def _normalize_mask(mask, b: int, n: int, sq: int, sk: int):
    """``(mask, shape)``: a 4-D bool mask whose dims are each 1 or the full size (True = masked) and
    its shape, or ``(None, None)``."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        mask = Tensor(np.asarray(mask))
    if mask.ndim > 4:
        raise ValueError(f"attn_mask must have at most 4 dims, got shape {mask.shape}")
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    for size, full, name in zip(shape, (b, n, sq, sk), ("B", "N", "Sq", "Sk")):
        if size not in (1, full):
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, N, Sq, Sk) = "
                             f"{(b, n, sq, sk)} (dimension {name})")
    if mask.ndim != 4:
        mask = mask.reshape(shape)
    if mask.dtype != ms.bool_:
        mask = mask != 0
    return mask, shape


def _normalize_positions(pos, length: int, name: str) -> Optional[np.ndarray]:
    if pos is None:
        return None
    arr = pos.asnumpy() if isinstance(pos, Tensor) else np.asarray(pos)
    if arr.ndim != 1 or arr.shape[0] != length or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array of length {length}, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    return arr.astype(np.int64)


def _host_mask(qp: np.ndarray, kp: np.ndarray, causal: bool, band) -> Optional[np.ndarray]:
    """The positional mask of a (query, key) block, True = masked; None when nothing is masked."""
    masked = None
    if causal and kp.max() > qp.min():  # otherwise every key precedes every query
        masked = kp[None, :] > qp[:, None]
    if band is not None:
        pre, nxt = band
        if not (kp.min() >= qp.max() - pre and kp.max() <= qp.min() + nxt):
            outside = (kp[None, :] < qp[:, None] - pre) | (kp[None, :] > qp[:, None] + nxt)
            masked = outside if masked is None else (masked | outside)
    return masked


def _rows_without_keys(qp: np.ndarray, kp: np.ndarray, causal: bool, band) -> bool:
    """Whether some query has no key left by the positional mask (then outputs need zeroing)."""
    if not causal and band is None:
        return False
    ks = np.sort(kp)
    hi = np.full(qp.shape, np.iinfo(np.int64).max, dtype=np.int64)
    lo = np.full(qp.shape, np.iinfo(np.int64).min, dtype=np.int64)
    if causal:
        hi = np.minimum(hi, qp)
    if band is not None:
        hi = np.minimum(hi, qp + band[1])
        lo = np.maximum(lo, qp - band[0])
    count = np.searchsorted(ks, hi, side="right") - np.searchsorted(ks, lo, side="left")
    return bool((count <= 0).any())


def _user_bias(mask4: Tensor, mshape: Tuple[int, int, int, int], rows: Tuple[int, int], cols: Tuple[int, int],
               b: int, nk: int, g: int, dtype) -> Tensor:
    """Additive bias ``(B, Nk, G * rq, ck)`` of a tile from a normalised 4-D user mask.

    Query heads are folded into rows (head ``kv * G + grp``, row ``grp * rq + i``), matching how
    the blockwise path folds ``q`` for grouped-query attention.
    """
    bm, nm, sqm, skm = mshape
    r0, r1 = rows if sqm != 1 else (0, 1)
    c0, c1 = cols if skm != 1 else (0, 1)
    blk = mask4[:, :, r0:r1, c0:c1]
    bias = blk.astype(dtype) * _MASK_VALUE
    rq, ck = rows[1] - rows[0], cols[1] - cols[0]
    shape = (bm, nm, r1 - r0, c1 - c0)
    if nm != 1 and g > 1:
        if sqm == 1 and rq > 1:
            bias = ops.tile(bias, (1, 1, rq, 1))
        shape = (bm, nk, g * rq, shape[3])
        bias = bias.reshape(shape)
    reps = (b // shape[0], nk // shape[1], (g * rq) // shape[2], ck // shape[3])
    if reps != (1, 1, 1, 1):
        bias = ops.tile(bias, reps)
    return bias


@dataclass(frozen=True)
class _Numerics:
    """How a tile is computed: accumulation dtype and the roundings that emulate low precision."""

    compute: object            # float32 or float64
    operand: object = None     # float16/bfloat16 input type: P and dS are rounded to it
    softmax: object = None     # float16/bfloat16 softmax_dtype: scores/probabilities rounded to it

    @staticmethod
    def of(input_dtype, softmax_dtype=None) -> "_Numerics":
        sd = resolve_dtype(softmax_dtype, None)
        compute = _compute_dtype(input_dtype, sd)
        return _Numerics(compute=compute,
                         operand=input_dtype if input_dtype in LOW_PRECISION else None,
                         softmax=sd if sd in LOW_PRECISION else None)


# ----------------------------------------------------------------------------------------------
# tile kernels (folded layout: q rows are (G * rows); k, v have Nk heads)
# ----------------------------------------------------------------------------------------------

def _tile_forward(qs: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], dropmul: Optional[Tensor],
                  num: _Numerics, need_lse: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """One tile: normalised ``O`` ``(..., R, D)`` and ``lse`` ``(..., R, 1)``.

    Args:
        qs: Queries already multiplied by the softmax scale, ``(..., R, D)``.
        k: Keys ``(..., C, D)``.
        v: Values ``(..., C, D)``.
        bias: Additive mask of the tile's full shape ``(..., R, C)`` or None.
        dropmul: Dropout multiplier ``keep / (1 - p)`` of shape ``(..., R, C)`` or None.
        num: Numerics.
        need_lse: Whether to compute ``lse`` (else None is returned for it).

    The fused softmax kernel does max-subtraction, exp, sum and division in one op (separately,
    and with the broadcasting they need, they cost several times more on CPU). The log-sum-exp is
    recovered from it: at the row maximum ``m`` of the scores the probability is
    ``exp(m - m) / l = 1 / l``, so ``lse = m + log(l) = m - log(P[argmax])`` (one reduction and a
    gather instead of a second reduction over the tile).
    """
    cdt = num.compute
    s = _BMM_NT(qs, k)
    _observe(s)
    s = _round_through(s, num.softmax, cdt)
    if bias is not None:
        s = s + bias
    p = _SOFTMAX(s)
    lse = None
    if need_lse:
        at, m = _ARGMAX_WITH_VALUE(s)
        lse = m - ops.log(_GATHER_D(p, 3, at))
    if dropmul is not None:
        p = p * dropmul
    p = _round_through(p, num.softmax, cdt)
    o = _BMM(_round_through(p, num.operand, cdt), v)
    return o, lse


def _merge(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor, d: int, ndim: int = 4) -> Tuple[Tensor, Tensor]:
    """Merge two normalised partial results (``o``: last dim ``d``; ``lse``: last dim 1, finite).

    With ``d = lse2 - lse1`` the weight of the second part is ``exp(lse2) / (exp(lse1) + exp(lse2))
    = sigmoid(d)``, and ``lse = max(lse1, lse2) + log1p(exp(-|d|))`` (the symmetric form: a side
    that is empty, lse ~ _MASK_VALUE, must not cancel the other side's value).
    """
    diff = lse2 - lse1
    w2 = ops.sigmoid(diff)
    lse = ops.maximum(lse1, lse2) + ops.log1p(ops.exp(-ops.abs(diff)))
    o = o1 + (o2 - o1) * _expand_last(w2, d, ndim)
    return o, lse


def _tile_backward(qs: Tensor, k: Tensor, v: Tensor, do: Tensor, lse_t: Optional[Tensor], delta_t: Tensor,
                   bias: Optional[Tensor], dropmul: Optional[Tensor],
                   num: _Numerics) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one tile: ``(dS K, dS^T qs, P^T dO)`` = (dQ / scale, dK, dV).

    ``lse_t`` and ``delta_t`` are the final row log-sum-exp and ``rowsum(dO * O)`` already expanded
    to the tile's shape ``(..., R, C)``; ``lse_t`` is ``+inf`` on rows without any unmasked key.
    ``lse_t=None`` means this tile holds every unmasked key of its rows, so ``P`` is the tile's own
    softmax (recomputed exactly as in the forward).
    """
    cdt = num.compute
    s = _BMM_NT(qs, k)
    _observe(s)
    s = _round_through(s, num.softmax, cdt)
    if bias is not None:
        s = s + bias
    p = _SOFTMAX(s) if lse_t is None else ops.exp(s - lse_t)
    p = _round_through(p, num.softmax, cdt)
    pd = p if dropmul is None else p * dropmul
    dv = _BMM_TN(_round_through(pd, num.operand, cdt), do)
    dp = _BMM_NT(do, v)
    if dropmul is not None:
        dp = dp * dropmul
    ds = _round_through(p * (dp - delta_t), num.operand, cdt)
    dq = _BMM(ds, k)
    dk = _BMM_TN(ds, qs)
    return dq, dk, dv


def _backward_lse(lse: Tensor, dtype) -> Tensor:
    """lse for recomputing probabilities: ``+inf`` on rows without keys, so that P = 0 there."""
    return _masked_fill(lse, lse <= _EMPTY_LSE, float("inf"), dtype)


# ----------------------------------------------------------------------------------------------
# public block primitives (for ring attention)
# ----------------------------------------------------------------------------------------------

def _fold(x: Tensor, b: int, n: int, s: int, d: int, nk: int) -> Tensor:
    """``(B, N, S, D) -> (B, Nk, G * S, D)``: each key/value head's query heads become its rows."""
    return x if n == nk else x.reshape(b, nk, (n // nk) * s, d)


def _as(x, dtype) -> Tensor:
    """``x`` (a Tensor or array-like from the caller) as a Tensor of ``dtype``."""
    return (x if isinstance(x, Tensor) else Tensor(np.asarray(x))).astype(dtype)


def _dropout_folded(dropout_mask, b, n, nk, sq, sk, dtype) -> Optional[Tensor]:
    if dropout_mask is None:
        return None
    dm = ops.broadcast_to(_as(dropout_mask, dtype), (b, n, sq, sk))
    return dm.reshape(b, nk, (n // nk) * sq, sk)


def attention_block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mask_block=None,
                            dropout_mask=None) -> Tuple[Tensor, Tensor]:
    """Attention of ``q`` over one block of keys: normalised output and row log-sum-exp.

    Args:
        q: ``(B, N, Sq, D)``.
        k: ``(B, Nk, Sk, D)`` with ``N % Nk == 0`` (grouped-query attention).
        v: ``(B, Nk, Sk, D)``.
        scale: Softmax scale (usually ``1 / sqrt(D)``).
        mask_block: Optional bool/int tensor broadcastable to ``(B, N, Sq, Sk)``, True = masked.
        dropout_mask: Optional multiplier (``keep / (1 - p)``) broadcastable to ``(B, N, Sq, Sk)``
            applied to the probabilities; the normaliser ``lse`` ignores it.

    Returns:
        ``(o, lse)``: ``o = softmax(S) @ V`` over this block, ``(B, N, Sq, D)``, and
        ``lse = log(sum(exp(S)))`` over the block, ``(B, N, Sq)``, where
        ``S = scale * q k^T`` with masked entries removed; both in float32 (float64 for float64
        inputs). Rows without any unmasked key have ``o = 0`` and ``lse = -inf``. Combine blocks
        with :func:`merge_attention_blocks`.
    """
    b, n, sq, d, nk, sk = _check_shapes(q, k, v)
    in_dtype = q.dtype
    num = _Numerics.of(in_dtype)
    cdt = num.compute
    # Callers pass slices (strided views), on which the kernels are much slower: densify once.
    qs = _fold(_times(_widen(_dense(q, sq), in_dtype, cdt), scale, cdt), b, n, sq, d, nk)
    kc, vc = _widen(_dense(k, sk), in_dtype, cdt), _widen(_dense(v, sk), in_dtype, cdt)
    mask4, mshape = _normalize_mask(mask_block, b, n, sq, sk)
    g = n // nk
    bias = None if mask4 is None else _user_bias(mask4, mshape, (0, sq), (0, sk), b, nk, g, cdt)
    dm = _dropout_folded(dropout_mask, b, n, nk, sq, sk, cdt)
    o, lse = _tile_forward(qs, kc, vc, bias, dm, num)
    if mask4 is not None:
        empty = lse <= _EMPTY_LSE
        o = o * _expand_last((~empty).astype(cdt), d)
        lse = _masked_fill(lse, empty, float("-inf"), cdt)
    return o.reshape(b, n, sq, d), lse.reshape(b, n, sq)


def merge_attention_blocks(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tuple[Tensor, Tensor]:
    """Online-softmax merge of two partial attention results over disjoint key sets.

    Args:
        o1, o2: Normalised outputs ``(..., Sq, D)`` (e.g. from :func:`attention_block_forward`).
        lse1, lse2: Their row log-sum-exps ``(..., Sq)``; ``-inf`` marks rows with no keys.

    Returns:
        ``(o, lse)`` of the attention over the union of both key sets:
        ``lse = log(exp(lse1) + exp(lse2))``, ``o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2``
        (``o = 0``, ``lse = -inf`` where both are empty).
    """
    shape, dtype = tuple(o1.shape), o1.dtype
    # -inf (no keys) becomes the finite empty marker the internal merge expects, and back.
    floor = Tensor(_MASK_VALUE, dtype)
    lse1 = ops.maximum(lse1.astype(dtype), floor).expand_dims(-1)
    lse2 = ops.maximum(lse2.astype(dtype), floor).expand_dims(-1)
    o, lse = _merge(o1, lse1, o2.astype(dtype), lse2, shape[-1], len(shape))
    empty = lse <= _EMPTY_LSE
    o = o * _expand_last((~empty).astype(dtype), shape[-1], len(shape))
    return o, _masked_fill(lse, empty, float("-inf"), dtype).squeeze(-1)


def attention_block_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                             scale: float, mask_block=None, dropout_mask=None,
                             delta: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients contributed by one key block, given the final output and log-sum-exp.

    With ``P = exp(S - lse)`` (the exact probabilities of the full attention restricted to this
    block), ``Delta = rowsum(do * o)``, ``dS = P * (dO V^T * Z - Delta)`` it returns
    ``dq = scale * dS K``, ``dk = scale * dS^T Q``, ``dv = (P * Z)^T dO``. Summing ``dq`` over all
    key blocks gives the full query gradient.

    Args:
        q: ``(B, N, Sq, D)``.
        k, v: This block's keys and values ``(B, Nk, Sk, D)``.
        o: Final attention output ``(B, N, Sq, D)`` (over all key blocks).
        lse: Final row log-sum-exp ``(B, N, Sq)`` (``-inf`` or very negative on rows without keys).
        do: Gradient of the output ``(B, N, Sq, D)``.
        scale: Softmax scale used in the forward.
        mask_block: As in :func:`attention_block_forward`.
        dropout_mask: The same multiplier as in the forward, or None.
        delta: ``rowsum(do * o)`` of shape ``(B, N, Sq)`` if already computed (ring attention
            computes it once); pass ``rowsum(do * o) - dlse`` to also propagate a gradient that
            arrives at ``lse``.

    Returns:
        ``(dq, dk, dv)`` with the shapes of ``q``, ``k``, ``v`` in float32 (float64 for float64
        inputs); ``dk``/``dv`` are summed over the query heads of each group.
    """
    b, n, sq, d, nk, sk = _check_shapes(q, k, v)
    in_dtype = q.dtype
    num = _Numerics.of(in_dtype)
    cdt = num.compute
    g = n // nk
    qs = _fold(_times(_widen(_dense(q, sq), in_dtype, cdt), scale, cdt), b, n, sq, d, nk)
    kc, vc = _widen(_dense(k, sk), in_dtype, cdt), _widen(_dense(v, sk), in_dtype, cdt)
    doc = _dense(_as(do, cdt), sq)
    if delta is None:
        delta = (doc * _as(o, cdt)).sum(axis=-1)
    delta = _as(delta, cdt).reshape(b, nk, g * sq, 1)
    lse_b = _backward_lse(_as(lse, cdt), cdt).reshape(b, nk, g * sq, 1)
    mask4, mshape = _normalize_mask(mask_block, b, n, sq, sk)
    bias = None if mask4 is None else _user_bias(mask4, mshape, (0, sq), (0, sk), b, nk, g, cdt)
    dm = _dropout_folded(dropout_mask, b, n, nk, sq, sk, cdt)
    dq, dk, dv = _tile_backward(qs, kc, vc, _fold(doc, b, n, sq, d, nk), _expand_last(lse_b, sk),
                                _expand_last(delta, sk), bias, dm, num)
    return _times(dq, scale, cdt).reshape(b, n, sq, d), dk, dv


# ----------------------------------------------------------------------------------------------
# the blockwise flash attention cell
# ----------------------------------------------------------------------------------------------

def _draw_seed() -> int:
    """One 48-bit seed from the current stream of the RNG tracker (two float32 draws of 24 bits)."""
    from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker  # pylint: disable=import-outside-toplevel

    # numpy's float32 uniforms are k / 2**24 for a random 24-bit k, so this is exact.
    hi, lo = (int(x) for x in np.round(get_rng_tracker().uniform((2,)).astype(np.float64) * (1 << 24)))
    return (hi << 24) | lo


@dataclass(frozen=True)
class _Settings:
    scale: float
    causal: bool
    band: Optional[Tuple[int, int]]
    dropout_p: float
    block_q: int
    block_k: int
    softmax_dtype: Optional[str]


_BIAS_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_BIAS_CACHE_SIZE = 8


def _positional_bias(masked: np.ndarray, b: int, nk: int, g: int, dtype) -> Tensor:
    """Additive bias ``(B, Nk, G * rows, cols)`` of a positional tile mask, cached across calls.

    Causal attention meets the same diagonal tile in every block, layer and step; building it once
    saves a host-to-tensor copy and a tile per use. The cache is small and keyed by the exact mask.
    """
    key = (masked.tobytes(), masked.shape, b, nk, g, str(dtype))
    bias = _BIAS_CACHE.get(key)
    if bias is None:
        arr = np.where(masked, _MASK_VALUE, 0.0).astype(_np_dtype(dtype))
        if g > 1:
            arr = np.tile(arr, (g, 1))
        bias = ops.tile(Tensor(arr[None, None]), (b, nk, 1, 1))
        _BIAS_CACHE[key] = bias
        if len(_BIAS_CACHE) > _BIAS_CACHE_SIZE:
            _BIAS_CACHE.popitem(last=False)
    else:
        _BIAS_CACHE.move_to_end(key)
    return bias


class _Run:
    """Per-call state shared by the forward and the backward: shapes, the block plan and the masks.

    Built from the same inputs in ``construct`` and ``bprop``, so both passes visit the same tiles
    with the same masks and dropout multipliers.
    """

    def __init__(self, st: _Settings, q: Tensor, k: Tensor, mask4: Optional[Tensor], mshape, q_pos, k_pos,
                 seed):
        self.st = st
        self.b, self.n, self.sq, self.d = q.shape
        self.nk, self.sk = k.shape[1], k.shape[2]
        self.g = self.n // self.nk
        self.in_dtype = q.dtype
        self.num = _Numerics.of(self.in_dtype, st.softmax_dtype)
        self.cdt = self.num.compute
        self.mask4 = mask4
        self.mshape = mshape
        self.seed = seed
        qp = np.arange(self.sq, dtype=np.int64) if q_pos is None else q_pos
        kp = np.arange(self.sk, dtype=np.int64) if k_pos is None else k_pos
        self.q_bounds = [(i, min(i + st.block_q, self.sq)) for i in range(0, self.sq, st.block_q)]
        self.k_bounds = [(j, min(j + st.block_k, self.sk)) for j in range(0, self.sk, st.block_k)]
        # host[(i, j)]: None (nothing masked by positions) or a partial bool mask; fully masked
        # tiles are left out of the plan altogether.
        self.host: Dict[Tuple[int, int], Optional[np.ndarray]] = {}
        self.cols_of_row: List[List[int]] = [[] for _ in self.q_bounds]
        self.rows_of_col: List[List[int]] = [[] for _ in self.k_bounds]
        for i, (i0, i1) in enumerate(self.q_bounds):
            for j, (j0, j1) in enumerate(self.k_bounds):
                hm = _host_mask(qp[i0:i1], kp[j0:j1], st.causal, st.band)
                if hm is not None:
                    if hm.all():
                        continue
                    if not hm.any():
                        hm = None
                self.host[(i, j)] = hm
                self.cols_of_row[i].append(j)
                self.rows_of_col[j].append(i)
        self.zero_empty_rows = mask4 is not None or _rows_without_keys(qp, kp, st.causal, st.band)
        # A query block whose unmasked keys all lie in one tile needs no lse: no merge, and the
        # backward recomputes that tile's softmax directly. (With possibly empty rows the lse is
        # still needed, to find and zero those rows.)
        self.needs_lse = [len(cols) != 1 or self.zero_empty_rows for cols in self.cols_of_row]

    def rows(self, i: int) -> int:
        return self.q_bounds[i][1] - self.q_bounds[i][0]

    def cols(self, j: int) -> int:
        return self.k_bounds[j][1] - self.k_bounds[j][0]

    def bias(self, i: int, j: int) -> Optional[Tensor]:
        """The additive mask of tile (i, j) at its full shape, or None."""
        hm = self.host[(i, j)]
        hb = None if hm is None else _positional_bias(hm, self.b, self.nk, self.g, self.cdt)
        if self.mask4 is None:
            return hb
        ub = _user_bias(self.mask4, self.mshape, self.q_bounds[i], self.k_bounds[j], self.b, self.nk, self.g,
                        self.cdt)
        return ub if hb is None else ub + hb

    def dropmul(self, i: int, j: int) -> Optional[Tensor]:
        """Dropout multiplier of tile (i, j), regenerated identically on every call."""
        p = self.st.dropout_p
        if p <= 0.0:
            return None
        rng = np.random.default_rng([self.seed, i, j])
        keep = rng.random((self.b, self.n, self.rows(i), self.cols(j)), dtype=np.float32) >= p
        mult = keep.astype(_np_dtype(self.cdt)) * np.asarray(1.0 / (1.0 - p), dtype=_np_dtype(self.cdt))
        return Tensor(mult.reshape(self.b, self.nk, self.g * self.rows(i), self.cols(j)))

    def split_rows(self, x: Tensor, width: int) -> List[Tensor]:
        """``(B, N, Sq, width)`` -> one dense, folded ``(B, Nk, G * rows, width)`` tensor per query block."""
        if len(self.q_bounds) == 1:
            parts = [_dense(x, self.sq)]
        else:
            parts = [_rows(x, i0, i1) for i0, i1 in self.q_bounds]
        return [_fold(t, self.b, self.n, self.rows(i), width, self.nk) for i, t in enumerate(parts)]

    def split_cols(self, x: Tensor) -> List[Tensor]:
        """``(B, Nk, Sk, D)`` -> one dense tensor per key block."""
        if len(self.k_bounds) == 1:
            return [_dense(x, self.sk)]
        return [_rows(x, j0, j1) for j0, j1 in self.k_bounds]

    def join_rows(self, parts: List[Tensor], width: int) -> Tensor:
        """Inverse of :meth:`split_rows`: folded blocks -> ``(B, N, Sq, width)``."""
        unfolded = [t.reshape(self.b, self.n, self.rows(i), width) for i, t in enumerate(parts)]
        return unfolded[0] if len(unfolded) == 1 else ops.cat(unfolded, axis=2)


class _BlockwiseAttention(nn.Cell):
    """Blockwise attention with a recomputing backward; settings are fixed per cell (cached)."""

    def __init__(self, settings: _Settings):
        super().__init__()
        self.settings = settings

    def construct(self, q, k, v, mask, mshape, q_pos, k_pos, seed):
        run = _Run(self.settings, q, k, mask, mshape, q_pos, k_pos, seed)
        num, cdt, in_dtype = run.num, run.cdt, run.in_dtype
        b, nk, d = run.b, run.nk, run.d
        qs_blocks = run.split_rows(_times(_widen(q, in_dtype, cdt), self.settings.scale, cdt), d)
        k_blocks = run.split_cols(_widen(k, in_dtype, cdt))
        v_blocks = run.split_cols(_widen(v, in_dtype, cdt))
        outs, lses = [], []
        for i, qs in enumerate(qs_blocks):
            o_i = lse_i = None
            for j in run.cols_of_row[i]:
                o_ij, lse_ij = _tile_forward(qs, k_blocks[j], v_blocks[j], run.bias(i, j), run.dropmul(i, j), num,
                                             run.needs_lse[i])
                if o_i is None:
                    o_i, lse_i = o_ij, lse_ij
                else:
                    o_i, lse_i = _merge(o_i, lse_i, o_ij, lse_ij, d)
            rows = run.g * run.rows(i)
            if o_i is None:  # every key of this query block is masked by position
                o_i = ops.zeros((b, nk, rows, d), cdt)
                lse_i = ops.full((b, nk, rows, 1), _MASK_VALUE, dtype=cdt)
            elif lse_i is None and any(run.needs_lse):
                lse_i = ops.zeros((b, nk, rows, 1), cdt)  # placeholder, never read
            outs.append(o_i)
            lses.append(lse_i)
        o = run.join_rows(outs, d)
        # The second output carries the lse to bprop (a placeholder when no block needs one).
        lse = run.join_rows(lses, 1) if any(run.needs_lse) else ops.zeros((1,), cdt)
        if run.zero_empty_rows:
            o = o * _expand_last((lse > _EMPTY_LSE).astype(cdt), d)
        return _widen(o, cdt, in_dtype), lse

    def bprop(self, q, k, v, mask, mshape, q_pos, k_pos, seed, out, dout):
        run = _Run(self.settings, q, k, mask, mshape, q_pos, k_pos, seed)
        num, cdt, in_dtype = run.num, run.cdt, run.in_dtype
        b, nk, d = run.b, run.nk, run.d
        o, lse = out
        doc = _widen(dout[0], in_dtype, cdt)
        delta = (doc * _widen(o, in_dtype, cdt)).sum(axis=-1, keepdims=True)
        qs_blocks = run.split_rows(_times(_widen(q, in_dtype, cdt), self.settings.scale, cdt), d)
        do_blocks = run.split_rows(doc, d)
        if any(run.needs_lse):
            lse_blocks = run.split_rows(_backward_lse(lse, cdt) if run.zero_empty_rows else lse, 1)
        delta_blocks = run.split_rows(delta, 1)
        k_blocks = run.split_cols(_widen(k, in_dtype, cdt))
        v_blocks = run.split_cols(_widen(v, in_dtype, cdt))
        expanded: Dict[Tuple[str, int, int], Tensor] = {}

        def wide(kind, blocks, i, width):
            key = (kind, i, width)
            if key not in expanded:
                expanded[key] = _expand_last(blocks[i], width)
            return expanded[key]

        dq_blocks: List[Optional[Tensor]] = [None] * len(qs_blocks)
        dk_blocks, dv_blocks = [], []
        for j, (kj, vj) in enumerate(zip(k_blocks, v_blocks)):
            width = run.cols(j)
            dk_j = dv_j = None
            for i in run.rows_of_col[j]:
                lse_t = wide("lse", lse_blocks, i, width) if run.needs_lse[i] else None
                dq_ij, dk_ij, dv_ij = _tile_backward(
                    qs_blocks[i], kj, vj, do_blocks[i], lse_t, wide("delta", delta_blocks, i, width),
                    run.bias(i, j), run.dropmul(i, j), num)
                dq_blocks[i] = dq_ij if dq_blocks[i] is None else dq_blocks[i] + dq_ij
                dk_j = dk_ij if dk_j is None else dk_j + dk_ij
                dv_j = dv_ij if dv_j is None else dv_j + dv_ij
            if dk_j is None:
                dk_j = ops.zeros((b, nk, width, d), cdt)
                dv_j = ops.zeros((b, nk, width, d), cdt)
            dk_blocks.append(dk_j)
            dv_blocks.append(dv_j)
        dq_blocks = [t if t is not None else ops.zeros((b, nk, run.g * run.rows(i), d), cdt)
                     for i, t in enumerate(dq_blocks)]
        dq = _times(run.join_rows(dq_blocks, d), self.settings.scale, cdt)
        dk = dk_blocks[0] if len(dk_blocks) == 1 else ops.cat(dk_blocks, axis=2)
        dv = dv_blocks[0] if len(dv_blocks) == 1 else ops.cat(dv_blocks, axis=2)
        return (_widen(dq, cdt, in_dtype), _widen(dk, cdt, in_dtype), _widen(dv, cdt, in_dtype),
                None, None, None, None, None)


_CELLS: Dict[_Settings, _BlockwiseAttention] = {}


def _blockwise_cell(settings: _Settings) -> _BlockwiseAttention:
    cell = _CELLS.get(settings)
    if cell is None:
        cell = _BlockwiseAttention(settings)
        _CELLS[settings] = cell
    return cell


def _block_sizes(block_size) -> Tuple[int, int]:
    if block_size is None:
        return DEFAULT_BLOCK_SIZE, DEFAULT_BLOCK_SIZE
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a (query, key) pair, got {block_size!r}")
        bq, bk = block_size
    else:
        bq = bk = block_size
    for val in (bq, bk):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"block_size must be positive integers, got {block_size!r}")
    return int(bq), int(bk)


# ----------------------------------------------------------------------------------------------
# the Ascend kernel
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _compressed_causal_mask() -> Tensor:
    """The 2048 x 2048 mask that sparse_mode 2/3 expect (True above the diagonal = masked)."""
    return Tensor(np.triu(np.ones((2048, 2048), dtype=np.bool_), k=1))


_KERNEL_MASK_CACHE: "OrderedDict[tuple, Optional[Tensor]]" = OrderedDict()


def _positional_kernel_mask(qp: np.ndarray, kp: np.ndarray, causal: bool, band) -> Optional[Tensor]:
    """The (Sq, Sk) positional mask as a device tensor, cached: every layer of every step of a
    causal model uses the same one, and building it is an Sq x Sk host array plus a copy."""
    key = (qp.tobytes(), kp.tobytes(), causal, band)
    if key in _KERNEL_MASK_CACHE:
        _KERNEL_MASK_CACHE.move_to_end(key)
        return _KERNEL_MASK_CACHE[key]
    host = _host_mask(qp, kp, causal, band)
    mask = None if host is None else Tensor(host)
    _KERNEL_MASK_CACHE[key] = mask
    if len(_KERNEL_MASK_CACHE) > 4:
        _KERNEL_MASK_CACHE.popitem(last=False)
    return mask


def _kernel_mask(mask4: Optional[Tensor], mshape, host: Optional[Tensor], b: int, n: int, sq: int,
                 sk: int) -> Optional[Tensor]:
    """An explicit bool mask in a shape the kernel accepts: (Sq, Sk), (B, 1, Sq, Sk) or (B, N, Sq, Sk).

    ``host`` is the positional part as an (Sq, Sk) bool tensor, or None.
    """
    if mask4 is None:
        return host
    bm, nm = mshape[:2]
    if nm > 1:
        full = ops.broadcast_to(mask4, (b, n, sq, sk))
    elif bm > 1:
        full = ops.broadcast_to(mask4, (b, 1, sq, sk))
    else:
        full = ops.broadcast_to(mask4.reshape(mshape[2:]), (sq, sk))
    if host is not None:
        full = ops.logical_or(full, host)
    return full


def _to_layout(x: Tensor, layout: str, b: int, n: int, s: int, d: int) -> Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
    return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def _from_layout(x: Tensor, layout: str, b: int, n: int, s: int, d: int) -> Tensor:
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return x.reshape(b, s, n, d).transpose(0, 2, 1, 3)
    return x.reshape(s, b, n, d).transpose(1, 2, 0, 3)  # SBH


def _kernel_drop_mask(b: int, n: int, sq: int, sk: int, p: float) -> Tensor:
    """Bit-packed keep mask ``(B, N, Sq, Sk / 8)`` (uint8) for the kernel, from the RNG tracker.

    Bit ``t`` of byte ``c`` keeps element ``8 * c + t`` (least significant bit first, the packing
    of MindSpore's DropoutGenMask).
    """
    if sk % 8:
        raise ValueError(f"attention dropout with the fused kernel needs Sk divisible by 8, got Sk={sk}")
    rng = np.random.default_rng(_draw_seed())
    keep = rng.random((b, n, sq, sk), dtype=np.float32) >= p
    return Tensor(np.packbits(keep, axis=-1, bitorder="little"))


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, mask4: Optional[Tensor], mshape, causal: bool, scale: float,
                     dropout_p: float, q_pos, k_pos, cfg: FlashAttentionConfig) -> Tensor:
    """``ops.flash_attention_score`` with this module's conventions mapped onto its arguments."""
    b, n, sq, d = q.shape
    sk = k.shape[2]
    in_dtype = q.dtype
    # The kernel takes float16/bfloat16 only; float32 callers get a float16 computation.
    kdt = in_dtype if in_dtype in LOW_PRECISION else ms.float16
    mode = cfg.sparse_mode
    if mode in (2, 3):
        attn = _compressed_causal_mask()
    else:
        qp = np.arange(sq, dtype=np.int64) if q_pos is None else q_pos
        kp = np.arange(sk, dtype=np.int64) if k_pos is None else k_pos
        attn = _kernel_mask(mask4, mshape, _positional_kernel_mask(qp, kp, causal, cfg.band), b, n, sq, sk)
        if attn is None:
            mode = 0  # nothing to mask; sparse_mode 1 would demand a mask
    layout = cfg.input_layout
    qk = _to_layout(_widen(q, in_dtype, kdt), layout, b, n, sq, d)
    kk, vk = (_to_layout(_widen(t, in_dtype, kdt), layout, b, k.shape[1], sk, d) for t in (k, v))
    drop = _kernel_drop_mask(b, n, sq, sk, dropout_p) if dropout_p > 0.0 else None
    # The band of sparse_mode 0 is already part of the explicit mask (built from the positions,
    # which the kernel does not know), so the kernel's own band is left open.
    out = ops.flash_attention_score(
        qk, kk, vk, n, attn_mask=attn, drop_mask=drop, keep_prob=float(1.0 - dropout_p),
        scalar_value=float(scale), pre_tokens=_INT_MAX, next_tokens=_INT_MAX, input_layout=layout,
        sparse_mode=mode)
    return _widen(_from_layout(out, layout, b, n, sq, d), kdt, in_dtype)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def _in_dtype_of(out: Tensor, q: Tensor) -> Tensor:
    # On CPU the low-precision products carry bfloat16 values in float32 tensors
    # (core/precision.py); a caller that passed bfloat16 tensors gets bfloat16 back, as documented.
    return out if out.dtype == q.dtype else out.astype(q.dtype)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, causal: bool = False,
                    scale: Optional[float] = None, dropout_p: float = 0.0,
                    block_size: Union[int, Tuple[int, int], None] = None, q_positions=None,
                    k_positions=None, softmax_dtype=None, fa_config=None) -> Tensor:
    """Memory-efficient exact attention (fused kernel on Ascend, blockwise elsewhere).

    Args:
        q: Queries ``(B, N, Sq, D)``.
        k: Keys ``(B, Nk, Sk, D)``, ``N % Nk == 0`` (grouped-query attention without repeating k/v).
        v: Values ``(B, Nk, Sk, D)``.
        attn_mask: Optional bool/uint8/int tensor broadcastable to ``(B, N, Sq, Sk)``; nonzero means
            masked out (Megatron's convention).
        causal: Mask key ``j`` for query ``i`` when ``k_positions[j] > q_positions[i]``.
        scale: Softmax scale, default ``1 / sqrt(D)``.
        dropout_p: Dropout probability on the attention probabilities (seeded from the RNG
            tracker's current stream; pass 0 in evaluation).
        block_size: Blockwise path only: block size for queries and keys, an int or a
            ``(query, key)`` pair; default :data:`DEFAULT_BLOCK_SIZE`.
        q_positions: Optional 1-D integer array ``(Sq,)`` of the queries' global positions
            (default ``arange(Sq)``); used by ``causal`` and the ``fa_config`` band.
        k_positions: Same for the keys ``(Sk,)``.
        softmax_dtype: Blockwise path: dtype of the softmax statistics (default float32; float64
            for float64 inputs; float16/bfloat16 round scores and probabilities through that type).
        fa_config: Dict/object with ``pre_tokens``, ``next_tokens``, ``input_layout``,
            ``sparse_mode`` (see :class:`FlashAttentionConfig`). The band and the sparse modes mean
            the same on every device.

    Returns:
        The attention output ``(B, N, Sq, D)`` in ``q``'s dtype; zero on rows where every key is
        masked.

    Raises:
        ValueError: Inconsistent shapes, a bad ``dropout_p``/``block_size``/positions, or an
            unsupported ``fa_config`` value (the message names the field and the allowed values).
    """
    b, n, sq, d, nk, sk = _check_shapes(q, k, v)
    cfg = parse_fa_config(fa_config)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_pos = _normalize_positions(q_positions, sq, "q_positions")
    k_pos = _normalize_positions(k_positions, sk, "k_positions")
    mask4, mshape = _normalize_mask(attn_mask, b, n, sq, sk)
    causal = bool(causal)
    if cfg.sparse_mode in (2, 3):
        if not causal or mask4 is not None or q_pos is not None or k_pos is not None:
            raise ValueError(
                f"fa_config.sparse_mode={cfg.sparse_mode} makes the kernel build a causal mask by index: it needs "
                "causal=True and no attn_mask/q_positions/k_positions; use sparse_mode 0 or 1 for explicit masks")
        if cfg.sparse_mode == 3:  # bottom-right aligned: the last query sees every key
            q_pos = np.arange(sq, dtype=np.int64) + (sk - sq)
    if _fused_kernel_available():
        return _fused_attention(q, k, v, mask4, mshape, causal, scale, float(dropout_p), q_pos, k_pos, cfg)

    bq, bk = _block_sizes(block_size)
    sd = resolve_dtype(softmax_dtype, None)
    settings = _Settings(scale=scale, causal=causal, band=cfg.band, dropout_p=float(dropout_p), block_q=bq,
                         block_k=bk, softmax_dtype=None if sd is None else str(sd))
    seed = _draw_seed() if dropout_p > 0.0 else 0
    o, _ = _blockwise_cell(settings)(q, k, v, mask4, mshape, q_pos, k_pos, seed)
    return _in_dtype_of(o, q)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, causal: bool = False,
                    scale: Optional[float] = None, q_positions=None, k_positions=None,
                    softmax_dtype=None) -> Tensor:
    """Reference attention that materialises the ``(B, N, Sq, Sk)`` scores (differentiable by autodiff).

    Same conventions as :func:`flash_attention` (mask: True = masked; GQA by head groups; fully
    masked rows give zeros). Low-precision inputs use :func:`mindspeed_ms.core.precision.batch_matmul`
    (products rounded to the input type, as a non-fused device path does); the softmax runs in
    ``softmax_dtype`` (default float32, float64 for float64 inputs).

    Returns:
        ``(B, N, Sq, D)`` in ``q``'s dtype.
    """
    b, n, sq, d, nk, sk = _check_shapes(q, k, v)
    in_dtype = q.dtype
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q, k, v = _dense(q, sq), _dense(k, sk), _dense(v, sk)  # kernels are slow on strided views
    g = n // nk
    if g > 1:
        # Repeat in a type the CPU Tile kernel has (it lacks bfloat16); exact either way.
        rep = ms.float32 if in_dtype == ms.bfloat16 else in_dtype
        k = ops.repeat_interleave(_widen(k, in_dtype, rep), g, 1)
        v = ops.repeat_interleave(_widen(v, in_dtype, rep), g, 1)
        k, v = _widen(k, rep, in_dtype), _widen(v, rep, in_dtype)
    sd = resolve_dtype(softmax_dtype, _compute_dtype(in_dtype))
    low = in_dtype in LOW_PRECISION
    if low:
        s = batch_matmul(_times(q, scale, in_dtype), k, transpose_b=True)
    else:
        s = _BMM_NT(_times(q, scale, in_dtype), k)
    s = _widen(s, in_dtype, sd)
    q_pos = _normalize_positions(q_positions, sq, "q_positions")
    k_pos = _normalize_positions(k_positions, sk, "k_positions")
    qp = np.arange(sq, dtype=np.int64) if q_pos is None else q_pos
    kp = np.arange(sk, dtype=np.int64) if k_pos is None else k_pos
    host = _host_mask(qp, kp, bool(causal), None)
    mask4, _ = _normalize_mask(attn_mask, b, n, sq, sk)
    keep = None
    if host is not None or mask4 is not None:
        if mask4 is None:
            masked = ops.tile(Tensor(host[None, None]), (b, n, 1, 1))
        else:
            masked = ops.broadcast_to(mask4, (b, n, sq, sk))
            if host is not None:
                masked = ops.logical_or(masked, Tensor(host))
        maskf = masked.astype(sd)
        fill = _MASK_VALUE_FP16 if sd == ms.float16 else _MASK_VALUE
        s = s + maskf * fill
        if mask4 is not None or _rows_without_keys(qp, kp, bool(causal), None):
            keep = 1 - maskf
    p = ops.softmax(s, -1)
    if keep is not None:
        p = p * keep  # zero the uniform distribution of rows that have no key at all
    if low:
        return _in_dtype_of(batch_matmul(p.astype(in_dtype), v), q)
    return _BMM(_widen(p, sd, in_dtype), v)
