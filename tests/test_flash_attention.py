"""Flash attention (core.flash_attention): blockwise CPU path against plain attention and numpy.

The numpy reference below is written independently of the module (float64 softmax attention and
its hand-derived gradient), so agreement means the blockwise algorithm is right, not only
self-consistent.
"""


import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.flash_attention as fa
from mindspeed_ms.core.flash_attention import (
    FlashAttentionConfig,
    attention_block_backward,
    attention_block_forward,
    flash_attention,
    merge_attention_blocks,
    parse_fa_config,
    plain_attention,
)
from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker

ms.set_device("CPU")


# ------------------------------------------------------------------------------------------------
# numpy reference
# ------------------------------------------------------------------------------------------------

def np_attention(q, k, v, masked, scale=None, dropmul=None):
    """Output and a gradient function of softmax attention in float64.

    ``masked`` is a bool array broadcastable to (B, N, Sq, Sk), True = masked; rows without keys
    give zeros. Returns ``(o, grads)`` where ``grads(do) -> (dq, dk, dv)``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, sq, d = q.shape
    nk, sk = k.shape[1], k.shape[2]
    g = n // nk
    scale = 1 / np.sqrt(d) if scale is None else scale
    kr, vr = np.repeat(k, g, 1), np.repeat(v, g, 1)
    masked = np.broadcast_to(masked, (b, n, sq, sk))
    s = np.einsum("bnid,bnjd->bnij", q, kr) * scale
    s = np.where(masked, -np.inf, s)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    lsum = e.sum(-1, keepdims=True)
    p = np.where(lsum > 0, e / np.where(lsum > 0, lsum, 1.0), 0.0)
    z = np.ones_like(p) if dropmul is None else np.asarray(dropmul, np.float64)
    o = np.einsum("bnij,bnjd->bnid", p * z, vr)

    def grads(do):
        do = np.asarray(do, np.float64)
        dv = np.einsum("bnij,bnid->bnjd", p * z, do)
        dpz = np.einsum("bnid,bnjd->bnij", do, vr) * z
        ds = p * (dpz - (p * dpz).sum(-1, keepdims=True))
        dq = np.einsum("bnij,bnjd->bnid", ds, kr) * scale
        dk = np.einsum("bnij,bnid->bnjd", ds, q) * scale
        fold = lambda x: x.reshape(b, nk, g, sk, d).sum(2)  # noqa: E731
        return dq, fold(dk), fold(dv)

    return o, grads


def positional_mask(qp, kp, causal=True, band=None):
    qp, kp = np.asarray(qp)[:, None], np.asarray(kp)[None, :]
    masked = np.zeros((qp.shape[0], kp.shape[1]), bool)
    if causal:
        masked |= kp > qp
    if band is not None:
        masked |= (kp < qp - band[0]) | (kp > qp + band[1])
    return masked


def make_qkv(b, n, nk, sq, sk, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, sq, d)).astype(dtype)
    k = rng.standard_normal((b, nk, sk, d)).astype(dtype)
    v = rng.standard_normal((b, nk, sk, d)).astype(dtype)
    w = rng.standard_normal((b, n, sq, d)).astype(dtype)
    return q, k, v, w


def value_and_grads(fn, q, k, v, w):
    """Output of ``fn(q, k, v)`` and the gradients of ``sum(fn(q, k, v) * w)``."""
    wt = Tensor(w)

    def loss(a, b_, c):
        return (fn(a, b_, c).astype(ms.float32 if w.dtype != np.float64 else ms.float64) * wt).sum()

    args = [Tensor(x) for x in (q, k, v)]
    out = fn(*args).asnumpy()
    grads = ms.grad(loss, grad_position=(0, 1, 2))(*args)
    return out, [g.asnumpy() for g in grads]


def assert_close(actual, expected, rtol=1e-5, atol=1e-5, what=""):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def check_against_references(q, k, v, w, masked, flash_kwargs, plain_kwargs, rtol=1e-5, atol=1e-5):
    """flash == numpy and flash == plain, for the output and dq/dk/dv."""
    ref_o, ref_grads = np_attention(q, k, v, masked, flash_kwargs.get("scale"))
    ref = [ref_o] + list(ref_grads(w))
    f_out, f_grads = value_and_grads(lambda a, b, c: flash_attention(a, b, c, **flash_kwargs), q, k, v, w)
    p_out, p_grads = value_and_grads(lambda a, b, c: plain_attention(a, b, c, **plain_kwargs), q, k, v, w)
    for name, fl, pl, rf in zip(("o", "dq", "dk", "dv"), [f_out] + f_grads, [p_out] + p_grads, ref):
        assert np.isfinite(fl).all(), name
        assert_close(fl, rf, rtol, atol, f"flash vs numpy: {name}")
        assert_close(pl, rf, rtol, atol, f"plain vs numpy: {name}")
        assert_close(fl, pl, rtol, atol, f"flash vs plain: {name}")


# ------------------------------------------------------------------------------------------------
# equivalence: masks, GQA, lengths, block sizes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,n,nk,sq,sk,d,block,causal", [
    (2, 4, 4, 32, 32, 8, 8, True),        # blocks divide the length
    (2, 4, 4, 37, 37, 8, 8, True),        # they do not
    (2, 4, 2, 30, 30, 16, (7, 11), True),  # GQA, different query/key blocks
    (2, 4, 1, 19, 45, 8, 16, False),      # MQA, Sq != Sk
    (1, 2, 2, 45, 19, 8, 16, True),       # Sq > Sk, causal: early queries see nothing
    (3, 4, 2, 24, 24, 8, None, False),    # default block size (one tile)
    (2, 3, 3, 33, 33, 8, 200, True),      # block larger than the sequence
])
def test_matches_plain_and_numpy_causal_and_unmasked(b, n, nk, sq, sk, d, block, causal):
    q, k, v, w = make_qkv(b, n, nk, sq, sk, d)
    masked = positional_mask(np.arange(sq), np.arange(sk), causal=causal)
    check_against_references(q, k, v, w, masked, dict(causal=causal, block_size=block), dict(causal=causal))


@pytest.mark.parametrize("mask_shape,causal,nk,mask_dtype", [
    ("BNSS", False, 4, np.bool_),
    ("BNSS", True, 2, np.uint8),
    ("B1SS", True, 4, np.bool_),
    ("B1SS", False, 1, np.int32),
    ("11SS", True, 2, np.bool_),
    ("B11S", False, 2, np.bool_),
    ("B11S", True, 1, np.bool_),
    ("SS", False, 4, np.uint8),
])
def test_matches_with_padding_masks(mask_shape, causal, nk, mask_dtype):
    b, n, sq, sk, d = 2, 4, 21, 26, 8
    q, k, v, w = make_qkv(b, n, nk, sq, sk, d, seed=1)
    rng = np.random.default_rng(2)
    shape = {"BNSS": (b, n, sq, sk), "B1SS": (b, 1, sq, sk), "11SS": (1, 1, sq, sk),
             "B11S": (b, 1, 1, sk), "SS": (sq, sk)}[mask_shape]
    mask = rng.random(shape) < 0.4
    if mask_shape != "B11S":
        mask[..., 3, :] = True       # fully masked query rows
    else:
        mask[0] = True               # a whole batch entry without keys
    masked = np.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + shape), (b, n, sq, sk))
    masked = masked | positional_mask(np.arange(sq), np.arange(sk), causal=causal)
    tensor_mask = Tensor(mask.astype(mask_dtype))
    check_against_references(q, k, v, w, masked, dict(attn_mask=tensor_mask, causal=causal, block_size=(8, 6)),
                             dict(attn_mask=tensor_mask, causal=causal))


def test_fully_masked_rows_give_zero_output_and_zero_gradients():
    q, k, v, w = make_qkv(2, 2, 2, 12, 12, 8, seed=3)
    mask = np.zeros((2, 1, 12, 12), bool)
    mask[:, :, 5] = True
    mask[1] = True
    out, grads = value_and_grads(lambda a, b, c: flash_attention(a, b, c, Tensor(mask), block_size=4), q, k, v, w)
    assert np.all(out[:, :, 5] == 0) and np.all(out[1] == 0)
    dq, dk, dv = grads
    assert np.all(dq[:, :, 5] == 0) and np.all(dq[1] == 0) and np.all(dk[1] == 0) and np.all(dv[1] == 0)
    assert all(np.isfinite(g).all() for g in grads)
    # Every key after every query (by position): nothing to attend to anywhere.
    out, grads = value_and_grads(
        lambda a, b, c: flash_attention(a, b, c, causal=True, q_positions=np.arange(12),
                                        k_positions=np.arange(12) + 100, block_size=4), q, k, v, w)
    assert np.all(out == 0) and all(np.all(g == 0) for g in grads)


# ------------------------------------------------------------------------------------------------
# positions (context parallelism)
# ------------------------------------------------------------------------------------------------

def test_query_chunk_with_global_positions():
    """A query chunk at positions 8..15 against keys 0..31, causal."""
    q, k, v, w = make_qkv(2, 4, 2, 8, 32, 8, seed=4)
    qp, kp = np.arange(8, 16), np.arange(32)
    masked = positional_mask(qp, kp)
    kwargs = dict(causal=True, q_positions=qp, k_positions=kp)
    check_against_references(q, k, v, w, masked, dict(kwargs, block_size=(4, 6)), kwargs)
    # The same with positions given as Tensors.
    o1 = flash_attention(*(Tensor(x) for x in (q, k, v)), block_size=5, causal=True,
                         q_positions=Tensor(qp.astype(np.int32)), k_positions=Tensor(kp.astype(np.int32)))
    assert_close(o1.asnumpy(), np_attention(q, k, v, masked)[0])


def test_load_balanced_chunks_and_several_calls_before_backward():
    """Ring-attention-like use: one cached cell, different positions per call, one backward."""
    cp, chunk = 2, 4
    seq = 2 * cp * chunk
    r = 0
    qp = np.concatenate([np.arange(r * chunk, (r + 1) * chunk), np.arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)])
    kp_a = qp
    kp_b = np.concatenate([np.arange(1 * chunk, 2 * chunk), np.arange(2 * chunk, 3 * chunk)])
    q, ka, va, w = make_qkv(1, 2, 2, 2 * chunk, 2 * chunk, 8, seed=5)
    _, kb, vb, _ = make_qkv(1, 2, 2, 2 * chunk, 2 * chunk, 8, seed=6)
    assert seq == 16

    def two_steps(qt, kat, vat, kbt, vbt):
        oa = flash_attention(qt, kat, vat, causal=True, q_positions=qp, k_positions=kp_a, block_size=3)
        ob = flash_attention(qt, kbt, vbt, causal=True, q_positions=qp, k_positions=kp_b, block_size=3)
        return oa, ob

    wt = Tensor(w)
    args = [Tensor(x) for x in (q, ka, va, kb, vb)]
    grads = ms.grad(lambda *a: sum(((o * wt).sum() for o in two_steps(*a))), grad_position=(0, 1, 2, 3, 4))(*args)
    oa_ref, ga = np_attention(q, ka, va, positional_mask(qp, kp_a))
    ob_ref, gb = np_attention(q, kb, vb, positional_mask(qp, kp_b))
    oa, ob = two_steps(*args)
    assert_close(oa.asnumpy(), oa_ref)
    assert_close(ob.asnumpy(), ob_ref)
    dqa, dka, dva = ga(w)
    dqb, dkb, dvb = gb(w)
    for got, want in zip(grads, (dqa + dqb, dka, dva, dkb, dvb)):
        assert_close(got.asnumpy(), want)


# ------------------------------------------------------------------------------------------------
# block primitives (ring attention)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nk", [4, 2])
def test_merge_of_two_halves_equals_full_attention(nk):
    b, n, sq, sk, d = 2, 4, 10, 16, 8
    q, k, v, w = make_qkv(b, n, nk, sq, sk, d, seed=7)
    rng = np.random.default_rng(8)
    masked = rng.random((b, 1, sq, sk)) < 0.3
    masked[:, :, 2, :8] = True      # row 2 has no key in the first half
    masked[:, :, 4] = True          # row 4 has no key at all
    scale = 0.3
    half = sk // 2
    qt, wt = Tensor(q), Tensor(w)
    parts = []
    for sl in (slice(0, half), slice(half, sk)):
        parts.append((Tensor(k[:, :, sl]), Tensor(v[:, :, sl]), Tensor(masked[..., sl])))
    o1, l1 = attention_block_forward(qt, parts[0][0], parts[0][1], scale, parts[0][2])
    o2, l2 = attention_block_forward(qt, parts[1][0], parts[1][1], scale, parts[1][2])
    assert o1.shape == (b, n, sq, d) and l1.shape == (b, n, sq)
    assert np.all(np.isneginf(l1.asnumpy()[:, :, 2])) and np.all(o1.asnumpy()[:, :, 2] == 0)
    o, lse = merge_attention_blocks(o1, l1, o2, l2)
    ref_o, ref_grads = np_attention(q, k, v, masked, scale)
    assert_close(o.asnumpy(), ref_o)
    # lse of the full attention, computed directly
    s = np.einsum("bnid,bnjd->bnij", q.astype(np.float64), np.repeat(k, n // nk, 1)) * scale
    s = np.where(np.broadcast_to(masked, s.shape), -np.inf, s)
    with np.errstate(divide="ignore"):
        ref_lse = np.log(np.exp(s).sum(-1))
    assert np.array_equal(np.isneginf(lse.asnumpy()), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert_close(lse.asnumpy()[finite], ref_lse[finite])
    # Backward: per-half gradients from the final o and lse add up to the full gradients.
    dq_ref, dk_ref, dv_ref = ref_grads(w)
    dq = 0
    for (kt, vt, mt), sl in zip(parts, (slice(0, half), slice(half, sk))):
        dq_h, dk_h, dv_h = attention_block_backward(qt, kt, vt, o, lse, wt, scale, mt)
        dq = dq + dq_h.asnumpy()
        assert_close(dk_h.asnumpy(), dk_ref[:, :, sl])
        assert_close(dv_h.asnumpy(), dv_ref[:, :, sl])
    assert_close(dq, dq_ref)


def test_merge_is_order_independent_and_handles_empty_sides():
    rng = np.random.default_rng(9)
    o1, o2 = (Tensor(rng.standard_normal((2, 3, 4)).astype(np.float32)) for _ in range(2))
    l1 = Tensor(np.array([[0.5, -np.inf, 2.0], [-np.inf, 1.0, 3.0]], np.float32))
    l2 = Tensor(np.array([[1.5, -np.inf, -np.inf], [0.0, -np.inf, 3.0]], np.float32))
    oa, la = merge_attention_blocks(o1, l1, o2, l2)
    ob, lb = merge_attention_blocks(o2, l2, o1, l1)
    assert_close(oa.asnumpy(), ob.asnumpy(), 1e-6, 1e-6)
    assert_close(la.asnumpy(), lb.asnumpy(), 1e-6, 1e-6)
    la_np = la.asnumpy()
    assert np.isneginf(la_np[0, 1]) and np.all(oa.asnumpy()[0, 1] == 0)
    assert_close(la_np[1, 1], 1.0)
    assert_close(oa.asnumpy()[1, 1], o1.asnumpy()[1, 1])
    assert_close(la_np[0, 0], np.logaddexp(0.5, 1.5))


# ------------------------------------------------------------------------------------------------
# low precision and float64
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_low_precision_inputs(dtype):
    q, k, v, w = make_qkv(2, 4, 2, 20, 20, 16, seed=10)
    # the reference sees exactly the rounded inputs
    q, k, v = (Tensor(x).astype(dtype).astype(ms.float32).asnumpy() for x in (q, k, v))
    masked = positional_mask(np.arange(20), np.arange(20))
    ref_o, ref_grads = np_attention(q, k, v, masked)
    wt = Tensor(w).astype(dtype)
    args = [Tensor(x).astype(dtype) for x in (q, k, v)]
    tol = 2e-3 if dtype == ms.float16 else 2e-2
    for fn in (lambda a, b, c: flash_attention(a, b, c, causal=True, block_size=(6, 8)),
               lambda a, b, c: plain_attention(a, b, c, causal=True)):
        out = fn(*args)
        assert out.dtype == dtype
        grads = ms.grad(lambda a, b, c: (fn(a, b, c) * wt).astype(ms.float32).sum(), grad_position=(0, 1, 2))(*args)
        assert_close(out.astype(ms.float32).asnumpy(), ref_o, 4 * tol, tol)
        for got, want in zip(grads, ref_grads(Tensor(w).astype(dtype).astype(ms.float32).asnumpy())):
            assert got.dtype == dtype
            assert_close(got.astype(ms.float32).asnumpy(), want, 8 * tol, 4 * tol)


def test_float64_is_exact_and_low_precision_softmax_dtype_runs():
    q, k, v, w = make_qkv(1, 2, 1, 11, 13, 8, seed=11, dtype=np.float64)
    masked = positional_mask(np.arange(11), np.arange(13))
    ref_o, ref_grads = np_attention(q, k, v, masked)
    out, grads = value_and_grads(lambda a, b, c: flash_attention(a, b, c, causal=True, block_size=4), q, k, v, w)
    assert_close(out, ref_o, 1e-12, 1e-12)
    for got, want in zip(grads, ref_grads(w)):
        assert_close(got, want, 1e-11, 1e-11)
    q32, k32, v32 = (Tensor(x.astype(np.float32)) for x in (q, k, v))
    out16 = flash_attention(q32, k32, v32, causal=True, block_size=4, softmax_dtype="float16").asnumpy()
    assert_close(out16, ref_o, 1e-2, 5e-3)


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------

def _reseed(seed):
    tracker = get_rng_tracker()
    tracker.add(tracker.current, seed)


def test_dropout_is_reproducible_and_unbiased():
    q, k, v, _ = make_qkv(2, 2, 2, 8, 8, 4, seed=12)
    args = [Tensor(x) for x in (q, k, v)]
    run = lambda: flash_attention(*args, causal=True, dropout_p=0.5, block_size=3).asnumpy()  # noqa: E731
    _reseed(123)
    first = run()
    _reseed(123)
    again = run()
    second = run()
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)
    ref = np_attention(q, k, v, positional_mask(np.arange(8), np.arange(8)))[0]
    assert np.abs(first - ref).max() > 0.05  # dropout does something
    # E[output] is the attention without dropout (one tile per call keeps this quick)
    _reseed(7)
    draws = np.stack([flash_attention(*args, causal=True, dropout_p=0.5).asnumpy() for _ in range(300)])
    stderr = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - ref) < 5 * stderr + 1e-6)


def test_dropout_gradient_matches_finite_differences():
    q, k, v, w = make_qkv(1, 2, 1, 5, 6, 3, seed=13, dtype=np.float64)
    wt = Tensor(w)

    def loss(a, b, c):
        _reseed(99)  # the same dropout mask on every evaluation
        return (flash_attention(a, b, c, causal=True, dropout_p=0.4, block_size=(2, 4)) * wt).sum()

    args = [Tensor(x) for x in (q, k, v)]
    grads = [g.asnumpy() for g in ms.grad(loss, grad_position=(0, 1, 2))(*args)]
    eps = 1e-6
    rng = np.random.default_rng(0)
    for which, base in enumerate((q, k, v)):
        for _ in range(6):
            idx = tuple(rng.integers(0, s) for s in base.shape)
            plus, minus = [x.copy() for x in (q, k, v)], [x.copy() for x in (q, k, v)]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            fd = (float(loss(*map(Tensor, plus)).asnumpy()) - float(loss(*map(Tensor, minus)).asnumpy())) / (2 * eps)
            assert abs(fd - grads[which][idx]) < 1e-6 + 1e-5 * abs(fd), (which, idx, fd, grads[which][idx])
    # and the block primitives agree with the numpy reference given the same multiplier
    dm = (np.random.default_rng(1).random((1, 2, 5, 6)) >= 0.4) / 0.6
    masked = positional_mask(np.arange(5), np.arange(6))
    ref_o, ref_grads = np_attention(q, k, v, masked, 0.5, dropmul=dm)
    o, lse = attention_block_forward(*args, 0.5, Tensor(masked), Tensor(dm))
    assert_close(o.asnumpy(), ref_o, 1e-12, 1e-12)
    got = attention_block_backward(*args, o, lse, wt, 0.5, Tensor(masked), Tensor(dm))
    for g, want in zip(got, ref_grads(w)):
        assert_close(g.asnumpy(), want, 1e-12, 1e-12)


# ------------------------------------------------------------------------------------------------
# memory: no Sq x Sk tensor
# ------------------------------------------------------------------------------------------------

def test_score_tiles_never_cover_the_full_matrix(monkeypatch):
    """Sq = Sk = 2048: every score tile of the forward and backward is at most (B, Nk, G*bq, bk)."""
    b, n, nk, s, d, bq, bk = 1, 2, 1, 2048, 8, 256, 128
    shapes = []
    monkeypatch.setattr(fa, "_score_tile_observer", shapes.append)
    q, k, v, w = make_qkv(b, n, nk, s, s, d, seed=14)
    args = [Tensor(x) for x in (q, k, v)]
    wt = Tensor(w)
    grads = ms.grad(lambda a, b_, c: (flash_attention(a, b_, c, causal=True, block_size=(bq, bk)) * wt).sum(),
                    grad_position=(0, 1, 2))(*args)
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    assert shapes, "the observer saw no tiles"
    assert max(int(np.prod(sh)) for sh in shapes) <= b * n * bq * bk
    assert all(sh[-2] <= (n // nk) * bq and sh[-1] <= bk for sh in shapes)
    # causal: tiles above the diagonal are skipped; forward and backward visit the same tiles
    visited = sum(1 for i in range(s // bq) for j in range(s // bk) if j * bk <= i * bq + bq - 1)
    assert visited < (s // bq) * (s // bk)
    assert len(shapes) == 2 * visited
    # spot-check the result against plain attention on a slice of queries
    out = flash_attention(*args, causal=True, block_size=(bq, bk)).asnumpy()
    ref = np_attention(q[:, :, 1000:1010], k, v, positional_mask(np.arange(1000, 1010), np.arange(s)))[0]
    assert_close(out[:, :, 1000:1010], ref, 1e-4, 1e-5)


# ------------------------------------------------------------------------------------------------
# settings, fa_config, errors
# ------------------------------------------------------------------------------------------------

def test_cells_are_cached_by_settings():
    q, k, v, _ = make_qkv(1, 2, 2, 6, 6, 4, seed=15)
    args = [Tensor(x) for x in (q, k, v)]
    flash_attention(*args, causal=True, block_size=3, scale=0.25)
    count = len(fa._CELLS)
    flash_attention(*args, causal=True, block_size=3, scale=0.25, q_positions=np.arange(6))
    assert len(fa._CELLS) == count
    flash_attention(*args, causal=False, block_size=3, scale=0.25)
    assert len(fa._CELLS) == count + 1


def test_band_and_sparse_modes_on_cpu():
    q, k, v, w = make_qkv(1, 2, 2, 12, 16, 8, seed=16)
    # sparse_mode 0 with a band: query i sees keys i-3 .. i+1
    masked = positional_mask(np.arange(12), np.arange(16), causal=False, band=(3, 1))
    kwargs = dict(fa_config={"pre_tokens": 3, "next_tokens": 1, "sparse_mode": 0}, block_size=5)
    out, grads = value_and_grads(lambda a, b, c: flash_attention(a, b, c, **kwargs), q, k, v, w)
    ref_o, ref_grads = np_attention(q, k, v, masked)
    assert_close(out, ref_o)
    for got, want in zip(grads, ref_grads(w)):
        assert_close(got, want)
    # sparse_mode 1 ignores the band
    out = flash_attention(*(Tensor(x) for x in (q, k, v)), causal=True, block_size=5,
                          fa_config={"pre_tokens": 3, "next_tokens": 1, "sparse_mode": 1}).asnumpy()
    assert_close(out, np_attention(q, k, v, positional_mask(np.arange(12), np.arange(16)))[0])
    # sparse_mode 2: causal from the top-left corner; 3: from the bottom-right corner
    for mode, qp in ((2, np.arange(12)), (3, np.arange(12) + 4)):
        out = flash_attention(*(Tensor(x) for x in (q, k, v)), causal=True, block_size=5,
                              fa_config={"sparse_mode": mode}).asnumpy()
        assert_close(out, np_attention(q, k, v, positional_mask(qp, np.arange(16)))[0])


@pytest.mark.parametrize("cfg,field", [
    ({"sparse_mode": 4}, "sparse_mode"),
    ({"sparse_mode": "0"}, "sparse_mode"),
    ({"input_layout": "TND"}, "input_layout"),
    ({"input_layout": "NSD"}, "input_layout"),
    ({"pre_tokens": 1.5}, "pre_tokens"),
    ({"next_tokens": True}, "next_tokens"),
    ({"pre_tokens": -3, "next_tokens": 1}, "pre_tokens"),
    ({"shape_order": "BSH"}, "unknown field"),
])
def test_fa_config_errors_name_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        parse_fa_config(cfg)
    q = Tensor(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=field):
        flash_attention(q, q, q, fa_config=cfg)


def test_fa_config_accepts_objects_and_normalises():
    class Cfg:  # pylint: disable=too-few-public-methods
        pre_tokens = 65536
        next_tokens = 0
        input_layout = "bsh"
        sparse_mode = 0

    cfg = parse_fa_config(Cfg())
    assert cfg == FlashAttentionConfig(65536, 0, "BSH", 0)
    assert cfg.band == (65536, 0)
    assert parse_fa_config(None).band is None
    assert parse_fa_config({"sparse_mode": 2}).band is None


def test_argument_errors():
    q = Tensor(np.zeros((1, 4, 4, 8), np.float32))
    k3 = Tensor(np.zeros((1, 3, 4, 8), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k3, k3)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="q_positions"):
        flash_attention(q, q, q, causal=True, q_positions=np.arange(3))
    with pytest.raises(ValueError, match="broadcast"):
        flash_attention(q, q, q, attn_mask=Tensor(np.zeros((2, 1, 4, 4), bool)))
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="sparse_mode=2"):
        flash_attention(q, q, q, causal=False, fa_config={"sparse_mode": 2})
    with pytest.raises(ValueError, match="sparse_mode=3"):
        flash_attention(q, q, q, causal=True, attn_mask=Tensor(np.zeros((4, 4), bool)), fa_config={"sparse_mode": 3})
    with pytest.raises(ValueError, match="dtype"):
        flash_attention(q, q.astype(ms.float16), q)


# ------------------------------------------------------------------------------------------------
# the Ascend mapping, against an emulated kernel
# ------------------------------------------------------------------------------------------------

def _fake_kernel(calls):
    """``ops.flash_attention_score`` as documented, computed in numpy (for the mapping only)."""

    def kernel(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
               prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0, scalar_value=1.0,
               pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0, input_layout="BSH", sparse_mode=0):
        assert real_shift is None and padding_mask is None and prefix is None
        assert isinstance(keep_prob, float) and isinstance(scalar_value, float)
        assert query.dtype in (ms.float16, ms.bfloat16) and key.dtype == query.dtype
        calls.append(dict(layout=input_layout, mode=sparse_mode,
                          mask_shape=None if attn_mask is None else tuple(attn_mask.shape)))
        qn, kn, vn = (x.astype(ms.float32).asnumpy() for x in (query, key, value))

        def to_bnsd(x, heads):
            if input_layout == "BNSD":
                return x
            if input_layout == "BSND":
                return x.transpose(0, 2, 1, 3)
            if input_layout == "BSH":
                return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)
            return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2, 0, 3)  # SBH

        n = head_num
        nk = (kn.shape[1] if input_layout == "BNSD" else kn.shape[2] if input_layout == "BSND"
              else kn.shape[-1] // (qn.shape[-1] // n))
        qb, kb, vb = to_bnsd(qn, n), to_bnsd(kn, nk), to_bnsd(vn, nk)
        b, _, s1, _ = qb.shape
        s2 = kb.shape[2]
        i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
        if sparse_mode in (2, 3):
            assert attn_mask is not None and tuple(attn_mask.shape) == (2048, 2048)
            masked = j > i if sparse_mode == 2 else j > i + s2 - s1
        elif attn_mask is None:
            masked = np.zeros((s1, s2), bool)
        else:
            assert attn_mask.dtype in (ms.bool_, ms.uint8)
            assert attn_mask.ndim == 2 or (attn_mask.ndim == 4 and attn_mask.shape[0] == b
                                           and attn_mask.shape[1] in (1, n))
            masked = attn_mask.asnumpy().astype(bool)
            if sparse_mode == 0:
                masked = masked | (j < i - pre_tokens) | (j > i + next_tokens)
        dropmul = None
        if drop_mask is not None:
            bits = np.unpackbits(drop_mask.asnumpy(), axis=-1, bitorder="little")[..., :s2]
            dropmul = bits / keep_prob
        o = np_attention(qb, kb, vb, masked, scalar_value, dropmul)[0]
        heads_out = {"BNSD": o, "BSND": o.transpose(0, 2, 1, 3),
                     "BSH": o.transpose(0, 2, 1, 3).reshape(b, s1, -1),
                     "SBH": o.transpose(2, 0, 1, 3).reshape(s1, b, -1)}[input_layout]
        return Tensor(heads_out.astype(np.float32)).astype(query.dtype)

    return kernel


def test_ascend_mapping_against_emulated_kernel(monkeypatch):
    """Every layout and sparse mode: the kernel call gives what the blockwise path gives on CPU."""
    calls = []
    q, k, v, _ = make_qkv(2, 4, 2, 16, 24, 16, seed=17)
    q, k, v = (Tensor(x).astype(ms.float16) for x in (q, k, v))
    rng = np.random.default_rng(18)
    pad_b = Tensor(rng.random((2, 1, 16, 24)) < 0.3)
    pad_bn = Tensor(rng.random((2, 4, 1, 24)) < 0.3)
    pad_ss = Tensor((rng.random((16, 24)) < 0.3).astype(np.uint8))
    cases = [  # (flash_attention kwargs, fa_config, attn_mask shape the kernel must receive)
        (dict(causal=True), {"sparse_mode": 0}, (16, 24)),
        (dict(causal=True, attn_mask=pad_b), {}, (2, 1, 16, 24)),
        (dict(causal=False, attn_mask=pad_bn), {"sparse_mode": 1}, (2, 4, 16, 24)),
        (dict(causal=True, attn_mask=pad_ss), {}, (16, 24)),
        (dict(causal=False), {}, None),
        (dict(causal=True, q_positions=np.arange(16) + 8), {}, (16, 24)),
        (dict(causal=False), {"pre_tokens": 2, "next_tokens": 3}, (16, 24)),
        (dict(causal=True), {"sparse_mode": 2}, (2048, 2048)),
        (dict(causal=True), {"sparse_mode": 3}, (2048, 2048)),
    ]
    expected = [flash_attention(q, k, v, block_size=8, fa_config=cfg, **kw).asnumpy() for kw, cfg, _ in cases]
    monkeypatch.setattr(fa, "_fused_kernel_available", lambda: True)
    monkeypatch.setattr(fa.ops, "flash_attention_score", _fake_kernel(calls))
    for layout in ("BNSD", "BSND", "BSH", "SBH"):
        for (kw, cfg, mask_shape), want in zip(cases, expected):
            got = flash_attention(q, k, v, fa_config=dict(cfg, input_layout=layout), **kw)
            assert got.dtype == ms.float16 and got.shape == q.shape
            assert_close(got.astype(ms.float32).asnumpy(), want.astype(np.float32), 5e-3, 5e-3, f"{layout} {kw} {cfg}")
            assert calls[-1]["layout"] == layout
            assert calls[-1]["mask_shape"] == mask_shape
            assert calls[-1]["mode"] == cfg.get("sparse_mode", 0)
        # dropout: the kernel gets a bit-packed keep mask and keep_prob; same seed, same result
        _reseed(5)
        d1 = flash_attention(q, k, v, causal=True, dropout_p=0.3, fa_config={"input_layout": layout})
        _reseed(5)
        d2 = flash_attention(q, k, v, causal=True, dropout_p=0.3, fa_config={"input_layout": layout})
        assert np.array_equal(d1.asnumpy(), d2.asnumpy())
        assert not np.array_equal(d1.asnumpy(), expected[0])
    # float32 callers get a float16 kernel call and a float32 result
    got = flash_attention(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), causal=True)
    assert got.dtype == ms.float32
    assert_close(got.asnumpy(), expected[0].astype(np.float32), 5e-3, 5e-3)
    with pytest.raises(ValueError, match="divisible by 8"):
        flash_attention(q, k[:, :, :20], v[:, :, :20], dropout_p=0.3)
