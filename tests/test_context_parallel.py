"""Context parallelism in one process: layout, batch splitting, ring plans, config errors, ring of one.

The multi-process equivalence tests are in tests/test_context_parallel_mp.py.
"""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindspeed_ms.core.communication import ProcessGroup
from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
from mindspeed_ms.core.context_parallel import (RingPlan, check_context_parallel_config, chunk_ids,
                                                hybrid_member_positions, local_positions, ring_attention,
                                                split_batch_for_context_parallel, ulysses_attention)
from mindspeed_ms.core.context_parallel.layout import position_runs, take_runs
from mindspeed_ms.core.flash_attention import plain_attention

ms.set_device("CPU")


# ---- layout ----------------------------------------------------------------------------------

def test_local_positions_load_balanced_layout():
    assert chunk_ids(2, 0) == (0, 3) and chunk_ids(2, 1) == (1, 2)
    assert local_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    for cp in (1, 2, 4):
        got = np.concatenate([local_positions(32, cp, r) for r in range(cp)])
        assert sorted(got.tolist()) == list(range(32))
    assert local_positions(6, 1, 0).tolist() == list(range(6))


def test_causal_work_is_balanced():
    """Each rank's queries see the same number of keys under the causal mask."""
    for cp in (2, 4):
        work = [int((local_positions(64, cp, r) + 1).sum()) for r in range(cp)]
        assert len(set(work)) == 1, work


def test_local_positions_rejects_indivisible_sequence():
    with pytest.raises(ValueError, match=r"sequence length \(12\).*2 \* context_parallel_size \(2 \* 4 = 8\)"):
        local_positions(12, 4, 0)


def test_position_runs_and_take_runs():
    assert position_runs(np.array([0, 1, 6, 7])) == [(0, 2), (2, 4)]
    assert position_runs(np.array([2, 3, 4, 5])) == [(0, 4)]
    x = Tensor(np.arange(24, dtype=np.float32).reshape(2, 12))
    np.testing.assert_array_equal(take_runs(x, 1, [(0, 2), (9, 12)]).asnumpy(),
                                  x.asnumpy()[:, [0, 1, 9, 10, 11]])


def test_split_batch_slices_every_input_consistently():
    b, s = 2, 8
    tokens = Tensor(np.arange(b * s, dtype=np.int32).reshape(b, s))
    labels = tokens + 100
    loss_mask = Tensor(np.tile(np.arange(s, dtype=np.float32), (b, 1)))
    mask = Tensor(np.zeros((b, 1, s, s), np.bool_))
    out = split_batch_for_context_parallel(tokens, None, mask, loss_mask, labels, cp_size=2, cp_rank=1)
    t, pos, m, lm, lab = out
    assert t.asnumpy().tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert pos.asnumpy().tolist() == [[2, 3, 4, 5]]
    assert m is mask  # passed down whole: attention picks its rows and columns by position
    assert lm.asnumpy()[0].tolist() == [2, 3, 4, 5]
    assert (lab.asnumpy() == t.asnumpy() + 100).all()
    given = Tensor(np.tile(np.arange(s, dtype=np.int32) * 10, (b, 1)))
    _, pos0, _, _, _ = split_batch_for_context_parallel(tokens, given, None, None, None, cp_size=2, cp_rank=0)
    assert pos0.asnumpy()[0].tolist() == [0, 10, 60, 70]


def test_split_batch_is_identity_without_context_parallelism():
    tokens = Tensor(np.zeros((1, 6), np.int32))
    out = split_batch_for_context_parallel(tokens, None, None, None, None)
    assert out[0] is tokens and out[1] is None


def test_split_batch_errors_name_fields_and_values():
    tokens = Tensor(np.zeros((2, 10), np.int32))
    with pytest.raises(ValueError, match=r"seq_length=10\) \(10\) must be divisible by 2 \* context_parallel_size"):
        split_batch_for_context_parallel(tokens, None, None, None, None, cp_size=2, cp_rank=0)
    tokens = Tensor(np.zeros((2, 8), np.int32))
    with pytest.raises(ValueError, match=r"attention_mask must end in \(S, S\) = \(8, 8\)"):
        split_batch_for_context_parallel(tokens, None, Tensor(np.zeros((2, 1, 4, 8), np.bool_)), None, None,
                                         cp_size=2, cp_rank=0)
    with pytest.raises(ValueError, match="labels must have the sequence"):
        split_batch_for_context_parallel(tokens, None, None, None, Tensor(np.zeros((2, 6), np.int32)),
                                         cp_size=2, cp_rank=0)


# ---- config checks ---------------------------------------------------------------------------

def _config(**parallel):
    seq = parallel.pop("seq_length", 16)
    heads = parallel.pop("heads", 8)
    pc = ModelParallelConfig(**parallel)
    return TransformerConfig(vocab_size=32, num_layers=1, num_attention_heads=heads, hidden_size=8 * heads,
                             seq_length=seq, parallel_config=pc, training_config=TrainingConfig(parallel_config=pc))


def test_config_check_accepts_valid_layouts():
    check_context_parallel_config(_config(context_parallel_size=1))
    check_context_parallel_config(_config(context_parallel_size=4))
    check_context_parallel_config(_config(context_parallel_size=4, context_parallel_algo="megatron_cp_algo",
                                          heads=3, seq_length=8))
    check_context_parallel_config(_config(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo",
                                          ulysses_degree_in_cp=2, heads=2))


def test_config_check_rejects_expert_parallelism():
    with pytest.raises(ValueError, match=r"expert_model_parallel_size \(2\) > 1 together with "
                                         r"context_parallel_size \(2\)"):
        check_context_parallel_config(_config(context_parallel_size=2, expert_model_parallel_size=2))


def test_config_check_rejects_sequence_length():
    with pytest.raises(ValueError, match=r"seq_length \(12\) must be divisible by 2 \* context_parallel_size "
                                         r"\(2 \* 4 = 8\)"):
        check_context_parallel_config(_config(context_parallel_size=4, seq_length=12))


def test_config_check_rejects_heads_not_divisible_by_ulysses_degree():
    with pytest.raises(ValueError, match=r"attention heads per tensor-parallel rank \(3\) \(num_attention_heads=6 / "
                                         r"tensor_model_parallel_size=2\) must be divisible by the Ulysses degree "
                                         r"\(2"):
        check_context_parallel_config(_config(context_parallel_size=2, tensor_model_parallel_size=2, heads=6))
    with pytest.raises(ValueError, match=r"\(6\).*Ulysses degree \(4"):
        check_context_parallel_config(_config(context_parallel_size=8, context_parallel_algo="hybrid_cp_algo",
                                              ulysses_degree_in_cp=4, heads=6))


def test_ulysses_attention_rejects_indivisible_heads_before_communicating():
    group = ProcessGroup((0, 1), "never_used", "cp")
    q = Tensor(np.zeros((1, 3, 4, 2), np.float32))
    with pytest.raises(ValueError, match=r"attention heads per tensor-parallel rank \(3\).*Ulysses degree \(2"):
        ulysses_attention(q, q, q, None, group, [np.arange(4), np.arange(4, 8)])


# ---- ring plans --------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_plan_covers_every_visible_pair_once(n):
    seq = 16 * n
    positions = [local_positions(seq, n, r) for r in range(n)]
    costs = set()
    for me in range(n):
        plan = RingPlan(positions, me, causal=True)
        cover = np.zeros((seq, seq), np.int64)
        cost = 0
        for src, calls in plan.steps:
            for call in calls:
                qi = np.concatenate([positions[me][a:b] for a, b in call.row_index])
                ki = np.concatenate([positions[src][a:b] for a, b in call.col_index])
                cover[np.ix_(qi, ki)] += 1
                cost += qi.size * ki.size
        visible = np.zeros((seq, seq), np.int64)
        visible[positions[me]] = 1
        visible *= np.tril(np.ones((seq, seq), np.int64))
        assert cover.max() <= 1 and (cover >= visible).all()
        costs.add(cost)
    # load balance: every rank computes the same number of scores
    assert len(costs) == 1, costs


def test_hybrid_positions_form_a_coarser_load_balanced_ring():
    ulysses_members, ring_members = hybrid_member_positions(32, 4, 2)
    assert [m.tolist() for m in ulysses_members[0]] == [local_positions(32, 4, 0).tolist(),
                                                        local_positions(32, 4, 1).tolist()]
    for i, pos in enumerate(ring_members):
        assert pos.tolist() == sorted(local_positions(32, 2, i).tolist())


# ---- a ring of one rank ------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
def test_ring_of_one_matches_plain_attention(causal, with_mask):
    rng = np.random.default_rng(0)
    b, n, nk, s, d = 2, 4, 2, 16, 8
    q, k, v, w = (Tensor(rng.standard_normal(shape).astype(np.float32))
                  for shape in ((b, n, s, d), (b, nk, s, d), (b, nk, s, d), (b, n, s, d)))
    mask = None
    if with_mask:
        m = rng.random((b, 1, s, s)) < 0.3
        m[..., np.arange(s), np.arange(s)] = False
        mask = Tensor(m)
    group = ProcessGroup((0,), None, "cp")

    def ours(q_, k_, v_):
        return (ring_attention(q_, k_, v_, group=group, causal=causal, attn_mask=mask) * w).sum()

    def ref(q_, k_, v_):
        return (plain_attention(q_, k_, v_, causal=causal, attn_mask=mask) * w).sum()

    got = ms.value_and_grad(ours, (0, 1, 2))(q, k, v)
    want = ms.value_and_grad(ref, (0, 1, 2))(q, k, v)
    assert abs(float(got[0].asnumpy()) - float(want[0].asnumpy())) < 1e-4
    for a, e in zip(got[1], want[1]):
        np.testing.assert_allclose(a.asnumpy(), e.asnumpy(), rtol=1e-5, atol=1e-5)


def test_ring_attention_rejects_a_mask_that_is_not_over_the_whole_sequence():
    group = ProcessGroup((0,), None, "cp")
    q = Tensor(np.zeros((1, 2, 8, 4), np.float32))
    with pytest.raises(ValueError, match="must cover the whole sequence"):
        ring_attention(q, q, q, group=group, attn_mask=Tensor(np.zeros((1, 1, 4, 8), np.bool_)))

