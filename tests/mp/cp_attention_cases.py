"""Context-parallel attention (Ulysses, ring, hybrid) against single-process attention.

Usage: cp_attention_cases.py 2|4 (the number of workers: CP=2, or CP=4 with hybrid Ulysses degree 2).
Every rank draws the same full q, k, v, upstream gradient and mask, computes the single-process
attention and its gradients (autodiff through a plain attention written here), then runs the
context-parallel attention on its load-balanced slices and compares output, dQ, dK and dV at its
own positions. Values returned: the largest absolute differences.
"""

import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.communication import ProcessGroup
from mindspeed_ms.core.context_parallel import (gather_from_context_parallel, hybrid_attention, local_positions,
                                                ring_attention, ulysses_attention)
from mindspeed_ms.core.flash_attention import flash_attention
from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker
from _worker import run_cases

B, N, S, D = 2, 4, 32, 8
TOL = {ms.float32: (2e-5, 2e-5), ms.bfloat16: (3e-2, 3e-2)}


def setup():
    world = comm.get_world_size()
    if world == 4:
        ps.initialize_model_parallel(context_parallel_size=4, ulysses_degree_in_cp=2)
    else:
        ps.initialize_model_parallel(context_parallel_size=world)


def cp():
    return ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()


def make_mask(kind, seed=5):
    """Full masks (True = masked) that leave every query row at least its own key."""
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "padding":  # key padding in batch 1 plus random holes; the diagonal stays visible
        m = rng.random((B, 1, S, S)) < 0.25
        m[1, :, :, S - 5:] = True
    elif kind == "documents":  # EOD-style: attention only inside each document
        bounds = [0, 7, 13, 24, S]
        m = np.ones((B, 1, S, S), np.bool_)
        for a, z in zip(bounds[:-1], bounds[1:]):
            m[:, :, a:z, a:z] = False
    elif kind == "square":  # a 2-D (S, S) mask shared by the batch
        m = rng.random((S, S)) < 0.3
    else:
        raise ValueError(kind)
    idx = np.arange(S)
    m[..., idx, idx] = False
    return Tensor(m)


def reference_attention(q, k, v, mask, causal, scale=None):
    """Plain attention on (B, N, S, D) tensors (GQA by consecutive head groups); mask True = masked."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = ops.repeat_interleave(k, groups, 1)
        v = ops.repeat_interleave(v, groups, 1)
    scores = ops.matmul(q.astype(ms.float32), k.astype(ms.float32).swapaxes(-1, -2)) * scale
    sq, sk = q.shape[2], k.shape[2]
    full = None
    if mask is not None:
        full = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if causal:
        tri = Tensor(np.triu(np.ones((sq, sk), np.bool_), 1)[None, None])
        full = tri if full is None else ops.logical_or(full, tri)
    if full is not None:
        scores = ops.masked_fill(scores, ops.broadcast_to(full, scores.shape), Tensor(-1e30, ms.float32))
    probs = ops.softmax(scores, -1)
    return ops.matmul(probs, v.astype(ms.float32)).astype(q.dtype)


def full_inputs(kv_heads, dtype, seed=11):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, N, S, D)).astype(np.float32)
    k = rng.standard_normal((B, kv_heads, S, D)).astype(np.float32)
    v = rng.standard_normal((B, kv_heads, S, D)).astype(np.float32)
    w = rng.standard_normal((B, N, S, D)).astype(np.float32)
    # Values representable in ``dtype``, held in float32 (CPU gathers take no bfloat16).
    return [Tensor(x).astype(dtype).astype(ms.float32) for x in (q, k, v)] + [Tensor(w)]


def outputs_and_grads(fn, q, k, v, w):
    def objective(q_, k_, v_):
        return (fn(q_, k_, v_).astype(ms.float32) * w).sum()

    out = fn(q, k, v)
    _, grads = ms.value_and_grad(objective, (0, 1, 2))(q, k, v)
    return [x.astype(ms.float32).asnumpy() for x in (out,) + tuple(grads)]


def compare(algo, mask_kind=None, causal=True, kv_heads=N, dtype=ms.float32, flash=False):
    size, rank = cp()
    q, k, v, w = full_inputs(kv_heads, dtype)
    mask = make_mask(mask_kind)
    ref = outputs_and_grads(lambda a, b, c: reference_attention(a, b, c, mask, causal), q, k, v, w)
    pos = local_positions(S, size, rank)
    take = Tensor(pos.astype(np.int32))
    ql, kl, vl, wl = (ops.gather(x, take, 2) for x in (q, k, v, w))
    ql, kl, vl = (x.astype(dtype) for x in (ql, kl, vl))
    members = [local_positions(S, size, r) for r in range(size)]

    def whole(qs, ks, vs, positions):
        assert np.array_equal(positions, np.arange(S))
        if flash:
            return flash_attention(qs, ks, vs, attn_mask=mask, causal=causal, block_size=8)
        return reference_attention(qs, ks, vs, mask, causal)

    if algo == "ulysses":
        fn = lambda a, b, c: ulysses_attention(a, b, c, whole, ps.get_context_parallel_group(), members)  # noqa: E731
    elif algo == "ring":
        fn = lambda a, b, c: ring_attention(a, b, c, causal=causal, attn_mask=mask)  # noqa: E731
    elif algo == "hybrid":
        if size == 4:
            ug, rg = None, None  # parallel_state's groups (Ulysses degree 2, ring of 2)
        else:  # degenerate hybrid on 2 ranks: Ulysses degree 1, ring of 2
            ug, rg = ProcessGroup((comm.get_rank(),), None, "cpu"), ps.get_context_parallel_group()
        fn = lambda a, b, c: hybrid_attention(a, b, c, ug, rg, causal=causal, attn_mask=mask)  # noqa: E731
    else:
        raise ValueError(algo)
    ours = outputs_and_grads(fn, ql, kl, vl, wl)
    rtol, atol = TOL[dtype]
    diffs = {}
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        expected = r[:, :, pos]
        np.testing.assert_allclose(a, expected, rtol=rtol, atol=atol, err_msg=f"{algo} {name}")
        diffs[name] = float(np.abs(a - expected).max())
    return diffs


def ring_dropout_directional():
    """With dropout the custom backward must differentiate the forward's own masks: compare the
    gradient with a central difference along a random direction (same seed for every evaluation)."""
    size, rank = cp()
    q, k, v, w = full_inputs(2, ms.float32, seed=21)
    pos = Tensor(local_positions(S, size, rank).astype(np.int32))
    ql, kl, vl, wl = (ops.gather(x, pos, 2) for x in (q, k, v, w))
    tracker = get_rng_tracker()
    start = tracker.get_states()

    def objective(q_, k_, v_):  # this rank's part of the loss; the loss is its sum over the ring
        tracker.set_states(start)
        return (ring_attention(q_, k_, v_, causal=True, dropout_p=0.3) * wl).sum()

    def total(*args):
        return comm.all_reduce(objective(*args), ps.get_context_parallel_group())

    value, grads = ms.value_and_grad(objective, (0, 1, 2))(ql, kl, vl)
    rng = np.random.default_rng(100 + rank)
    dirs = [Tensor(rng.standard_normal(x.shape).astype(np.float32)) for x in (ql, kl, vl)]
    eps = 1e-2
    plus = total(*(x + eps * d for x, d in zip((ql, kl, vl), dirs)))
    minus = total(*(x - eps * d for x, d in zip((ql, kl, vl), dirs)))
    numeric = float((plus - minus).asnumpy()) / (2 * eps)
    local_dot = sum(float((g * d).sum().asnumpy()) for g, d in zip(grads, dirs))
    analytic = float(comm.all_reduce(Tensor(np.float32(local_dot)), ps.get_context_parallel_group()).asnumpy())
    # the dropout output differs from the output without dropout
    plain = (ring_attention(ql, kl, vl, causal=True) * wl).sum()
    assert abs(float(plain.asnumpy()) - float(value.asnumpy())) > 1e-3
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)
    return {"numeric": numeric, "analytic": analytic}


def gather_sequence():
    """gather_from_context_parallel reassembles the natural order from the load-balanced slices."""
    size, rank = cp()
    full = np.arange(B * S, dtype=np.float32).reshape(B, S)
    local = Tensor(full[:, local_positions(S, size, rank)])
    np.testing.assert_array_equal(gather_from_context_parallel(local, dim=1).asnumpy(), full)
    return True


CASES_2 = {
    "gather_sequence": gather_sequence,
    "ulysses_causal": lambda: compare("ulysses"),
    "ulysses_padding_causal": lambda: compare("ulysses", "padding"),
    "ulysses_documents_gqa": lambda: compare("ulysses", "documents", kv_heads=2),
    "ulysses_mqa_noncausal_padding": lambda: compare("ulysses", "padding", causal=False, kv_heads=1),
    "ulysses_flash_causal_padding": lambda: compare("ulysses", "padding", flash=True),
    "ring_causal": lambda: compare("ring"),
    "ring_padding_causal": lambda: compare("ring", "padding"),
    "ring_documents_gqa": lambda: compare("ring", "documents", kv_heads=2),
    "ring_noncausal_square_mask": lambda: compare("ring", "square", causal=False),
    "ring_noncausal_nomask_mqa": lambda: compare("ring", None, causal=False, kv_heads=1),
    "ring_causal_bf16": lambda: compare("ring", "padding", dtype=ms.bfloat16),
    "hybrid_degenerate_causal_padding": lambda: compare("hybrid", "padding"),
    "ring_dropout_directional": ring_dropout_directional,
}

CASES_4 = {
    "gather_sequence": gather_sequence,
    "ulysses_causal": lambda: compare("ulysses"),
    "ulysses_padding_gqa": lambda: compare("ulysses", "padding", kv_heads=2),
    "ulysses_flash_documents": lambda: compare("ulysses", "documents", flash=True),
    "ring_causal": lambda: compare("ring"),
    "ring_padding_causal_gqa": lambda: compare("ring", "padding", kv_heads=2),
    "ring_noncausal_square_mask": lambda: compare("ring", "square", causal=False),
    "hybrid_causal": lambda: compare("hybrid"),
    "hybrid_padding_causal_gqa": lambda: compare("hybrid", "padding", kv_heads=2),
    "hybrid_documents_mqa": lambda: compare("hybrid", "documents", kv_heads=1),
    "hybrid_noncausal_padding": lambda: compare("hybrid", "padding", causal=False),
}


if __name__ == "__main__":
    import sys

    chosen = CASES_4 if sys.argv[1:2] == ["4"] else CASES_2
    if len(sys.argv) > 2:  # a comma-separated subset of the cases (for debugging)
        chosen = {name: chosen[name] for name in sys.argv[2].split(",")}
    run_cases(chosen, setup=setup)
