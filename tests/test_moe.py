"""Mixture of experts in one process: router, dispatcher, experts, MoE layer, statistics, cold/hot.

Numerical references are written here with numpy from the layers' weights (top-k softmax routing,
each expert an MLP), so the layers are checked against the definition, not against themselves.
The multi-process equivalence tests are in test_moe_mp.py.
"""

import json
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.config import (DatasetConfig, ModelParallelConfig, MoEConfig, TrainingConfig,
                                      TransformerConfig)
from mindspeed_ms.legacy.model.gpt_model import GPTModel
from mindspeed_ms.legacy.model.moe import moe_utils
from mindspeed_ms.legacy.model.moe.cold_hot import ColdHotExpertMonitor, choose_hot_experts, is_update_step
from mindspeed_ms.legacy.model.moe.experts import GroupedMLP, SequentialMLP
from mindspeed_ms.legacy.model.moe.moe_layer import MoELayer
from mindspeed_ms.legacy.model.moe.router import TopKRouter
from mindspeed_ms.legacy.model.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from mindspeed_ms.legacy.model.moe import training_hooks
from mindspeed_ms.tools.moe_token_distribution import load_token_distribution, plot_token_distribution
from mindspeed_ms.training.events import EventWriter, read_events

ms.set_device("CPU")

HIDDEN, FFN, EXPERTS, TOPK = 16, 24, 4, 2


def make_config(moe=None, **overrides):
    parallel_config = ModelParallelConfig(use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_kwargs = dict(num_experts=EXPERTS, moe_router_topk=TOPK)
    moe_kwargs.update(moe or {})
    kwargs = dict(vocab_size=32, num_layers=1, num_attention_heads=2, hidden_size=HIDDEN, ffn_hidden_size=FFN,
                  seq_length=8, parallel_config=parallel_config, training_config=training_config,
                  dataset_config=DatasetConfig(batch_size=2), moe_config=MoEConfig(**moe_kwargs),
                  init_method_std=0.3, bias_init="normal")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tokens(n=24, seed=0):
    return np.random.default_rng(seed).standard_normal((n, HIDDEN)).astype(np.float32)


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def expert_numpy(expert, x, gated):
    w1 = expert.dense_h_to_4h.weight.asnumpy()
    b1 = expert.dense_h_to_4h.bias.asnumpy()
    w2 = expert.dense_4h_to_h.weight.asnumpy()
    b2 = expert.dense_4h_to_h.bias.asnumpy()
    h = x @ w1.T + b1
    if gated:
        gate, value = np.split(h, 2, axis=-1)
        h = silu(gate) * value
    else:
        h = gelu(h)
    return h @ w2.T + b2


def route_numpy(weight, x, k):
    logits = x.astype(np.float64) @ weight.T.astype(np.float64)
    idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, idx, 1)
    probs = np.exp(top - top.max(1, keepdims=True))
    return logits, idx, probs / probs.sum(1, keepdims=True)


def moe_numpy(layer, x, gated=False):
    _, idx, probs = route_numpy(layer.router.weight.asnumpy(), x, layer.router.topk)
    out = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            out[t] += probs[t, j] * expert_numpy(layer.experts.local_experts[int(idx[t, j])], x[t:t + 1], gated)[0]
    return out


# ---------------------------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------------------------

def test_router_selects_topk_with_softmax_over_the_selected_scores():
    router = TopKRouter(make_config())
    x = tokens()
    scores, indices = router(Tensor(x))
    assert scores.shape == (24, TOPK) and indices.shape == (24, TOPK) and indices.dtype == ms.int32
    _, idx, probs = route_numpy(router.weight.asnumpy(), x, TOPK)
    np.testing.assert_array_equal(indices.asnumpy(), idx)
    np.testing.assert_allclose(scores.asnumpy(), probs, rtol=1e-5, atol=1e-6)


def test_router_rejects_sinkhorn_and_unknown_load_balancing():
    config = make_config()
    # The config only allows 'aux_loss'/'none'; write past its check to reach the router's own.
    config.moe_config.__dict__["moe_router_load_balancing_type"] = "sinkhorn"
    with pytest.raises(NotImplementedError, match="sinkhorn"):
        TopKRouter(config)
    config.moe_config.__dict__["moe_router_load_balancing_type"] = "balanced"
    with pytest.raises(ValueError, match="moe_router_load_balancing_type.*'balanced'"):
        TopKRouter(config)


def _aux_reference(weight, x, k, aux_coeff, z_coeff):
    """Switch load-balancing loss and z-loss written out (numpy float64)."""
    logits, idx, _ = route_numpy(weight, x, k)
    full = np.exp(logits - logits.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    counts = np.bincount(idx.reshape(-1), minlength=weight.shape[0])
    t, e = x.shape[0], weight.shape[0]
    aux = aux_coeff * e * np.sum(full.mean(0) * counts / (t * k))
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return aux, z_coeff * np.mean(lse ** 2)


def test_aux_and_z_losses_reach_the_gradient_scaled_by_the_aux_loss_scale():
    config = make_config(dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.3,
                              moe_z_loss_coeff=0.05))
    router = TopKRouter(config)
    router.set_train(True)
    x = tokens()
    r = Tensor(np.random.default_rng(1).standard_normal((24, TOPK)).astype(np.float32))

    def with_autoscaler():
        scores, _ = router(Tensor(x))
        return (scores * r).sum()

    plain = TopKRouter(make_config())  # same key -> same weight, no auxiliary losses
    np.testing.assert_array_equal(plain.weight.asnumpy(), router.weight.asnumpy())

    def explicit(scale):
        def fn():
            scores, indices = plain(Tensor(x))
            logits = plain.gating(Tensor(x))
            counts = np.bincount(indices.asnumpy().reshape(-1), minlength=EXPERTS)
            aux = moe_utils.switch_load_balancing_loss(ops.softmax(logits, -1), counts, TOPK, 0.3, 24)
            zl = moe_utils.z_loss(logits, 0.05, 24)
            return (scores * r).sum() + scale * (aux + zl)
        return fn

    try:
        # loss scale 1 with one micro-batch; loss scale 256 over 4 micro-batches (factor 64)
        for scale, micro in ((1.0, 1), (256.0, 4)):
            moe_utils.set_aux_loss_scale(scale)
            moe_utils.set_aux_loss_micro_batches(micro)
            got = ms.grad(with_autoscaler, None, [router.weight])()[0].asnumpy()
            want = ms.grad(explicit(scale / micro), None, [plain.weight])()[0].asnumpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    finally:
        moe_utils.set_aux_loss_scale(1.0)
        moe_utils.set_aux_loss_micro_batches(1)
    aux, zl = _aux_reference(router.weight.asnumpy(), x, TOPK, 0.3, 0.05)
    recorded = router.pending_aux_losses()
    assert len(recorded["load_balancing_loss"]) == 2  # one value per training forward pass
    np.testing.assert_allclose(recorded["load_balancing_loss"], [aux, aux], rtol=1e-5)
    np.testing.assert_allclose(recorded["z_loss"], [zl, zl], rtol=1e-5)
    with pytest.raises(ValueError, match="finite"):
        moe_utils.set_aux_loss_scale(float("nan"))
    with pytest.raises(ValueError, match="num_micro_batches must be an integer >= 1"):
        moe_utils.set_aux_loss_micro_batches(0)


def test_input_jitter_only_in_training_and_within_eps():
    router = TopKRouter(make_config(dict(moe_input_jitter_eps=0.1)))
    x = Tensor(tokens())
    router.set_train(False)
    assert router.apply_input_jitter(x) is x
    router.set_train(True)
    ratio = router.apply_input_jitter(x).asnumpy() / x.asnumpy()
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.01


def _keep_brute_force(idx, probs, caps, policy, position=None):
    """Each expert keeps its best slots; ``position[t]`` says how early token t is."""
    position = np.arange(idx.shape[0]) if position is None else position
    keep = np.zeros(idx.shape, bool)
    for e in range(len(caps)):
        slots = [(t, j) for t in range(idx.shape[0]) for j in range(idx.shape[1]) if idx[t, j] == e]
        slots.sort(key=lambda s: (-probs[s] if policy == "probs" else 0, position[s[0]], s[1]))
        for s in slots[:caps[e]]:
            keep[s] = True
    return keep


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_by_policy(policy):
    factor = 0.75
    router = TopKRouter(make_config(dict(moe_expert_capacity_factor=factor, moe_token_drop_policy=policy)))
    x = tokens(40, seed=3)
    scores, indices = router(Tensor(x))
    _, idx, probs = route_numpy(router.weight.asnumpy(), x, TOPK)
    cap = math.ceil(TOPK * 40 * factor / EXPERTS)
    np.testing.assert_array_equal(router.last_capacity, [cap] * EXPERTS)
    keep = _keep_brute_force(idx, probs, [cap] * EXPERTS, policy)
    assert not keep.all()  # the test must actually drop something
    np.testing.assert_array_equal(indices.asnumpy(), np.where(keep, idx, EXPERTS))
    np.testing.assert_allclose(scores.asnumpy(), np.where(keep, probs, 0.0), rtol=1e-5, atol=1e-6)
    kept = np.bincount(indices.asnumpy().reshape(-1), minlength=EXPERTS + 1)[:EXPERTS]
    assert kept.max() <= cap


def test_position_policy_drops_the_latest_sequence_positions_of_bsh_hidden_states():
    layer = MoELayer(make_config(dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="position")),
                     layer_number=1)
    x = tokens(24, seed=4).reshape(3, 8, HIDDEN)  # (B, S, H): flattened order is batch-major
    layer(Tensor(x))
    order = moe_utils.sequence_major_order((3, 8, HIDDEN), 1)
    assert order.tolist()[:9] == [0, 3, 6, 9, 12, 15, 18, 21, 1]
    scores, indices = layer.router(Tensor(x.reshape(24, HIDDEN)))  # token order kept from the layer call
    _, idx, probs = route_numpy(layer.router.weight.asnumpy(), x.reshape(24, HIDDEN), TOPK)
    keep = _keep_brute_force(idx, probs, layer.router.last_capacity, "position", position=order)
    assert not keep.all()
    np.testing.assert_array_equal(indices.asnumpy(), np.where(keep, idx, EXPERTS))


def test_expert_capacities_for_cold_and_hot_experts():
    moe = MoEConfig(num_experts=8, moe_router_topk=2, moe_expert_capacity_factor=1.5,
                    enable_cold_hot_expert=True, hot_expert_num=2, cold_token_percent=0.3)
    caps = moe_utils.expert_capacities(moe, 50, hot_experts=[1, 6])
    c = math.ceil(2 * 50 * 1.5 / 8)
    expected = np.full(8, math.floor(c * 0.3))
    expected[[1, 6]] = c
    np.testing.assert_array_equal(caps, expected)
    assert moe_utils.expert_capacities(MoEConfig(num_experts=8), 50) is None


# ---------------------------------------------------------------------------------------------
# dispatcher and experts
# ---------------------------------------------------------------------------------------------

def test_dispatcher_groups_rows_by_expert_and_weights_them_back():
    config = make_config()
    dispatcher = MoEAlltoAllTokenDispatcher(EXPERTS, range(EXPERTS), config)
    x = tokens(6).reshape(2, 3, HIDDEN)
    idx = np.array([[0, 2], [2, 1], [3, 0], [2, 4], [1, 2], [0, 3]])  # 4 = dropped
    probs = np.random.default_rng(5).random((6, 2))
    rows, per_expert = dispatcher.token_permutation(Tensor(x), Tensor(probs), Tensor(idx.astype(np.int32)))
    np.testing.assert_array_equal(per_expert.asnumpy(), [3, 2, 4, 2])
    flat = x.reshape(6, HIDDEN)
    expected_rows = [flat[t] for e in range(4) for t in range(6) for j in range(2) if idx[t, j] == e]
    np.testing.assert_allclose(rows.asnumpy(), np.stack(expected_rows))
    # An "expert" that doubles its rows: the output is 2 * sum of kept probabilities * token.
    out, bias = dispatcher.token_unpermutation(rows * 2)
    assert bias is None and out.shape == (2, 3, HIDDEN)
    weight = np.where(idx < 4, probs, 0).sum(1)
    np.testing.assert_allclose(out.asnumpy().reshape(6, HIDDEN), 2 * weight[:, None] * flat, rtol=1e-6)
    with pytest.raises(NotImplementedError, match="bias"):
        dispatcher.token_unpermutation(rows, bias=Tensor(np.zeros(HIDDEN, np.float32)))


def test_dispatcher_and_experts_argument_errors():
    config = make_config()
    with pytest.raises(ValueError, match="num_local_experts must be an integer > 0"):
        MoEAlltoAllTokenDispatcher(0, [], config)
    with pytest.raises(ValueError, match="local_expert_indices must have num_local_experts=4"):
        MoEAlltoAllTokenDispatcher(4, [0, 1, 2], config)
    with pytest.raises(NotImplementedError, match="submodules"):
        SequentialMLP(2, config, submodules=object())
    experts = SequentialMLP(2, config)
    with pytest.raises(ValueError, match="sum to the 5 input rows"):
        experts(Tensor(tokens(5)), [2, 2])


def test_sequential_mlp_is_one_mlp_per_expert():
    config = make_config()
    experts = SequentialMLP(num_local_experts=3, config=config)
    x = tokens(9)
    out, bias = experts(Tensor(x), [4, 0, 5])
    assert bias is None and out.shape == (9, HIDDEN)
    want = np.concatenate([expert_numpy(experts.local_experts[0], x[:4], False),
                           expert_numpy(experts.local_experts[2], x[4:], False)])
    np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_grouped_mlp_equals_sequential_mlp(act):
    config = make_config(hidden_act=act)
    seq = SequentialMLP(3, config, expert_indices=[0, 1, 2])
    grouped = GroupedMLP(3, config, expert_indices=[0, 1, 2])
    np.testing.assert_array_equal(grouped.weight1.asnumpy()[1], seq.local_experts[1].dense_h_to_4h.weight.asnumpy())
    x = Tensor(tokens(11))
    counts = [5, 0, 6]
    r = Tensor(np.random.default_rng(2).standard_normal((11, HIDDEN)).astype(np.float32))

    def run(cell):
        fn = lambda: (cell(x, counts)[0] * r).sum()  # noqa: E731
        return ms.value_and_grad(fn, None, cell.trainable_params())()

    (loss_s, grads_s), (loss_g, grads_g) = run(seq), run(grouped)
    assert abs(float(loss_s.asnumpy()) - float(loss_g.asnumpy())) < 1e-4
    # Sequential gradients stacked per expert = grouped gradients.
    per_expert = [dict(zip(["w1", "b1", "w2", "b2"], [g.asnumpy() for g in grads_s[4 * i:4 * i + 4]]))
                  for i in range(3)]
    grouped_grads = dict(zip(["w1", "b1", "w2", "b2"], [g.asnumpy() for g in grads_g]))
    for key in ("w1", "b1", "w2", "b2"):
        np.testing.assert_allclose(grouped_grads[key], np.stack([p[key] for p in per_expert]), rtol=1e-4,
                                   atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------
# MoE layer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_moe_layer_matches_the_definition(act):
    config = make_config(hidden_act=act)
    layer = MoELayer(config, layer_number=3)
    assert layer.layer_index == 2
    x = tokens(16).reshape(2, 8, HIDDEN)
    out, bias = layer(Tensor(x))
    assert bias is None and out.shape == (2, 8, HIDDEN)
    want = moe_numpy(layer, x.reshape(16, HIDDEN), gated=act == "swiglu")
    np.testing.assert_allclose(out.asnumpy().reshape(16, HIDDEN), want, rtol=1e-4, atol=1e-5)


def test_moe_layer_grouped_gemm_matches_sequential():
    x = Tensor(tokens(16).reshape(2, 8, HIDDEN))
    seq = MoELayer(make_config(), layer_number=1)
    grouped = MoELayer(make_config(dict(moe_grouped_gemm=True)), layer_number=1)
    assert isinstance(grouped.experts, GroupedMLP)
    np.testing.assert_allclose(grouped(x)[0].asnumpy(), seq(x)[0].asnumpy(), rtol=1e-5, atol=1e-6)


def test_pad_to_capacity_gives_every_expert_its_capacity_and_the_same_output():
    moe = dict(moe_expert_capacity_factor=0.75)
    x = Tensor(tokens(20).reshape(4, 5, HIDDEN))
    plain = MoELayer(make_config(moe), layer_number=1)
    padded = MoELayer(make_config(dict(moe, moe_pad_expert_input_to_capacity=True)), layer_number=1)
    out_plain = plain(x)[0].asnumpy()
    out_padded = padded(x)[0].asnumpy()
    np.testing.assert_allclose(out_padded, out_plain, rtol=1e-5, atol=1e-6)
    cap = math.ceil(TOPK * 20 * 0.75 / EXPERTS)
    np.testing.assert_array_equal(padded.token_dispatcher.real_tokens_per_expert, [cap] * EXPERTS)


def test_moe_layer_errors():
    config = make_config()
    config.moe_config.__dict__["moe_token_dispatcher_type"] = "allgather"
    with pytest.raises(ValueError, match="moe_token_dispatcher_type must be 'alltoall'"):
        MoELayer(config)
    layer = MoELayer(make_config())
    layer.set_train(True)
    ps.set_tensor_model_parallel_world_size(2)
    try:
        with pytest.raises(ValueError, match="sequence_parallel"):
            layer(Tensor(tokens(4)))
    finally:
        ps.set_tensor_model_parallel_world_size(None)


# ---------------------------------------------------------------------------------------------
# token counts, loss values, token distribution files
# ---------------------------------------------------------------------------------------------

def gpt(moe=None, **overrides):
    kwargs = dict(num_layers=3)
    kwargs.update(overrides)
    return GPTModel(make_config(dict(moe or {}, moe_layer_freq=2), **kwargs))


def gpt_batch(seed):
    rng = np.random.default_rng(seed)
    return (Tensor(rng.integers(0, 32, (2, 8)).astype(np.int32)), Tensor(rng.integers(0, 32, (2, 8)).astype(np.int32)),
            Tensor(np.ones((2, 8), np.float32)))


def test_gpt_with_moe_every_second_layer_trains_its_routers():
    model = gpt(dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01))
    layers = moe_utils.moe_layers(model)
    assert [layer.layer_index for layer in layers] == [0, 2]
    units = list(model.language_model.encoder.iter_layers())
    assert [type(u.mlp).__name__ for u in units] == ["MoELayer", "ParallelMLP", "MoELayer"]
    tokens_, labels, mask = gpt_batch(0)
    model.set_train(True)
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda: model(tokens_, None, None, mask, labels=labels), None, params)()
    assert np.isfinite(float(loss.asnumpy()))
    by_name = {p.name: g.asnumpy() for p, g in zip(params, grads)}
    routers = [n for n in by_name if n.endswith("router.weight")]
    assert len(routers) == 2 and all(np.abs(by_name[n]).sum() > 0 for n in routers)
    assert all(getattr(p, "allreduce", True) is False for p in params if ".experts." in p.name)


def test_token_counts_count_training_passes_once_and_sum_to_tokens_times_topk():
    model = gpt()
    tokens_, labels, mask = gpt_batch(1)
    model.set_train(True)
    for _ in range(3):  # three micro-batches of 16 tokens
        model(tokens_, None, None, mask, labels=labels)
    with moe_utils.recomputation():  # a recomputation pass is not counted again
        model(tokens_, None, None, mask, labels=labels)
    model.set_train(False)
    model(tokens_, None, None, mask, labels=labels)  # evaluation is not counted
    counts = moe_utils.collect_token_counts(model)
    assert sorted(counts) == [0, 2]
    for vec in counts.values():
        assert vec.dtype == np.int64 and vec.shape == (EXPERTS,) and int(vec.sum()) == 3 * 16 * TOPK
    assert all(int(v.sum()) == 0 for v in moe_utils.collect_token_counts(model).values())


def test_full_recompute_gives_the_same_loss_gradients_and_counts():
    tokens_, labels, mask = gpt_batch(2)
    results = []
    for overrides in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        model = gpt(dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1), **overrides)
        model.set_train(True)
        params = model.trainable_params()
        loss, grads = ms.value_and_grad(lambda m=model: m(tokens_, None, None, mask, labels=labels), None, params)()
        results.append((float(loss.asnumpy()), [g.asnumpy() for g in grads], moe_utils.collect_token_counts(model),
                        moe_utils.collect_aux_losses(model)))
    (loss_a, grads_a, counts_a, aux_a), (loss_b, grads_b, counts_b, aux_b) = results
    assert abs(loss_a - loss_b) < 1e-6
    for ga, gb in zip(grads_a, grads_b):
        np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-7)
    for layer in counts_a:
        np.testing.assert_array_equal(counts_a[layer], counts_b[layer])
    assert aux_a["load_balancing_loss"] == pytest.approx(aux_b["load_balancing_loss"])
    assert sorted(aux_a["load_balancing_loss"]) == [0, 2]


def test_record_token_distribution_writes_events_and_npy_files_the_tool_reads(tmp_path):
    model = gpt()
    tokens_, labels, mask = gpt_batch(3)
    events = EventWriter(tmp_path, rank=0)
    model.set_train(True)
    written = {}
    for step in (1, 2, 3):
        model(tokens_, None, None, mask, labels=labels)
        written[step] = moe_utils.record_token_distribution(model, step, tmp_path, events)
    events.close()
    records = read_events(tmp_path, kind="moe_tokens")
    assert [(r["step"], r["layer"]) for r in records] == [(s, l) for s in (1, 2, 3) for l in (0, 2)]
    for r in records:
        assert r["counts"] == written[r["step"]][r["layer"]].tolist() and sum(r["counts"]) == 16 * TOPK
    loaded = load_token_distribution(tmp_path / "token_distribution")
    assert sorted(loaded) == [0, 2]
    for layer, (steps, counts) in loaded.items():
        assert steps.tolist() == [1, 2, 3]
        np.testing.assert_array_equal(counts, np.stack([written[s][layer] for s in (1, 2, 3)]))
    hot = plot_token_distribution(3, 2, tmp_path / "token_distribution", tmp_path / "plots")
    assert sorted(hot) == [0, 2]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "layer-0_token_distribution.png", "layer-2_token_distribution.png"]


# ---------------------------------------------------------------------------------------------
# cold / hot experts
# ---------------------------------------------------------------------------------------------

COLD_HOT = dict(enable_cold_hot_expert=True, hot_expert_num=2, moe_expert_capacity_factor=4.0,
                cold_token_percent=1.0, update_step=8)


def test_update_steps_are_powers_of_two_then_multiples():
    assert [s for s in range(0, 40) if is_update_step(s, 10)] == [1, 2, 4, 8, 10, 20, 30]
    assert [s for s in range(0, 20) if is_update_step(s, 4)] == [1, 2, 4, 8, 12, 16]
    assert choose_hot_experts([3, 9, 9, 1], 2) == [1, 2]


def _grads_by_expert(layer, params, grads):
    """Gradient per (expert, parameter kind), taking each hot expert's from its replica."""
    by_param = {id(p): g.asnumpy() for p, g in zip(params, grads)}
    out = {}
    for e in range(layer.num_experts):
        pairs = layer.experts.expert_parameters(e)
        if layer.cold_hot and e in layer.hot_expert_ids:
            pairs = layer.hot_experts.expert_parameters(layer.hot_expert_ids.index(e))
        for k, (p, _) in enumerate(pairs):
            out[(e, k)] = by_param[id(p)]
    return out


def test_cold_hot_layer_matches_the_plain_layer_without_dropping():
    x = Tensor(tokens(32).reshape(4, 8, HIDDEN))
    r = Tensor(np.random.default_rng(9).standard_normal((4, 8, HIDDEN)).astype(np.float32))
    plain = MoELayer(make_config(dict(moe_expert_capacity_factor=4.0)), layer_number=1)
    hot = MoELayer(make_config(COLD_HOT), layer_number=1)
    hot.set_hot_experts([3, 1])
    assert hot.router.hot_experts == [3, 1]
    results = []
    for layer in (plain, hot):
        params = layer.trainable_params()
        out, grads = ms.value_and_grad(lambda l=layer: (l(x)[0] * r).sum(), None, params)()
        results.append((float(out.asnumpy()), _grads_by_expert(layer, params, grads),
                        [g.asnumpy() for p, g in zip(params, grads) if "router" in p.name][0]))
    assert abs(results[0][0] - results[1][0]) < 1e-4
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-4, atol=1e-6)
    for key, grad in results[0][1].items():
        np.testing.assert_allclose(results[1][1][key], grad, rtol=1e-4, atol=1e-6, err_msg=str(key))


def test_cold_experts_get_the_reduced_capacity():
    moe = dict(COLD_HOT, moe_expert_capacity_factor=1.0, cold_token_percent=0.5)
    layer = MoELayer(make_config(moe), layer_number=1)
    layer(Tensor(tokens(32)))
    c = math.ceil(TOPK * 32 * 1.0 / EXPERTS)
    np.testing.assert_array_equal(layer.router.last_capacity, [c, c, c // 2, c // 2])


def test_monitor_swaps_copies_back_and_moves_optimizer_state():
    model = gpt(COLD_HOT)
    layers = moe_utils.moe_layers(model)
    moments = {}

    def state_fn(param):  # a stand-in optimizer state per parameter, shaped like it
        if id(param) not in moments:
            moments[id(param)] = ms.Parameter(Tensor(np.full(param.shape, float(len(moments)), np.float32)),
                                              name=f"m{len(moments)}")
        return [moments[id(param)]]

    monitor = ColdHotExpertMonitor(model, optimizer_state_fn=state_fn)
    layer = layers[0]
    assert layer.hot_expert_ids == [0, 1]
    # Train replica 1 (expert 1) "by hand"; its owner must receive the change at the next decision.
    replica_w = layer.hot_experts.expert_parameters(1)[0][0]
    replica_w.set_data(replica_w + 1.0)
    trained = replica_w.asnumpy().copy()
    replica_state = state_fn(replica_w)[0].asnumpy().copy()
    counts = {0: np.array([1, 5, 2, 9]), 2: np.array([7, 7, 0, 1])}
    assert monitor.on_step_end(3, counts) is False  # not a trigger step
    assert monitor.on_step_end(4, counts) is True
    assert monitor.hot_experts() == {0: [1, 3], 2: [0, 1]}
    owner_w = layer.experts.expert_parameters(1)[0][0]
    np.testing.assert_array_equal(owner_w.asnumpy(), trained)
    np.testing.assert_array_equal(state_fn(owner_w)[0].asnumpy(), replica_state)
    # New replicas hold their owners' weights and states; the mapping follows.
    for slot, expert in enumerate([1, 3]):
        for (rp, _), (op, _) in zip(layer.hot_experts.expert_parameters(slot), layer.experts.expert_parameters(expert)):
            np.testing.assert_array_equal(rp.asnumpy(), op.asnumpy())
            np.testing.assert_array_equal(state_fn(rp)[0].asnumpy(), state_fn(op)[0].asnumpy())
    assert layer.hot_slot_of_expert.tolist() == [-1, 0, -1, 1]
    assert [h[0] for h in monitor.history] == [4]
    # Before a checkpoint: copy back (and re-decide); at the end: copy back only.
    replica_w = layer.hot_experts.expert_parameters(0)[0][0]
    replica_w.set_data(replica_w * 2.0)
    monitor.before_checkpoint()
    np.testing.assert_array_equal(layer.experts.expert_parameters(1)[0][0].asnumpy(), replica_w.asnumpy())
    monitor.on_train_end()
    assert [h[1] for h in monitor.history] == ["step", "checkpoint", "train_end"]
    with pytest.raises(ValueError, match="no MoE layer with"):
        ColdHotExpertMonitor(gpt())


def test_checkpoint_taken_at_any_step_reloads_into_the_same_outputs():
    tokens_, labels, mask = gpt_batch(4)
    model = gpt(COLD_HOT)
    monitor = ColdHotExpertMonitor(model, update_step=2)
    for step in range(1, 4):
        model.set_train(True)
        params = model.trainable_params()
        _, grads = ms.value_and_grad(lambda: model(tokens_, None, None, mask, labels=labels), None, params)()
        for p, g in zip(params, grads):
            p.set_data(p - 0.5 * g)
        monitor.on_step_end(step)
        if step == 2:
            continue
        # Step 1 decided a hot set just now; at step 3 the replicas were trained since then.
        monitor.before_checkpoint()
        saved = {p.name: p.asnumpy().copy() for p in model.trainable_params() if not getattr(p, "expert_replica", False)}
        state = json.loads(json.dumps(monitor.state_dict()))
        model.set_train(False)
        expected = model(tokens_, None, None, mask, labels=labels).asnumpy()
        fresh = gpt(COLD_HOT)
        for p in fresh.trainable_params():
            if p.name in saved:
                p.set_data(Tensor(saved[p.name]))
        ColdHotExpertMonitor(fresh).load_state_dict(state)
        fresh.set_train(False)
        np.testing.assert_allclose(fresh(tokens_, None, None, mask, labels=labels).asnumpy(), expected, rtol=1e-6)


def test_a_checkpoint_of_all_parameters_carries_the_hot_sets():
    """The training loop saves every parameter and nothing else: the hot set travels in
    ``hot_expert_table``, and a fresh model adopts it at its first forward pass."""
    tokens_, labels, mask = gpt_batch(5)
    model = gpt(COLD_HOT)
    monitor = ColdHotExpertMonitor(model)
    monitor.on_step_end(1, {0: np.array([0, 3, 9, 1]), 2: np.array([5, 0, 0, 6])})
    assert monitor.hot_experts() == {0: [1, 2], 2: [0, 3]}
    monitor.before_checkpoint()
    saved = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    model.set_train(False)
    expected = model(tokens_, None, None, mask, labels=labels).asnumpy()
    fresh = gpt(COLD_HOT)
    assert [layer.hot_expert_ids for layer in moe_utils.moe_layers(fresh)] == [[0, 1], [0, 1]]
    for p in fresh.get_parameters():
        p.set_data(Tensor(saved[p.name]).astype(p.dtype))
    fresh.set_train(False)
    np.testing.assert_allclose(fresh(tokens_, None, None, mask, labels=labels).asnumpy(), expected, rtol=1e-6)
    assert [layer.hot_expert_ids for layer in moe_utils.moe_layers(fresh)] == [[1, 2], [0, 3]]


class _Optimizer:
    """The per-parameter state layout of MegatronOptimizer (``<slot>.<parameter name>``)."""

    def __init__(self, params):
        self.state = {f"{slot}.{p.name}": ms.Parameter(Tensor(np.full(p.shape, k, np.float32)), name=f"{slot}.{p.name}")
                      for k, p in enumerate(params) for slot in self._slots()}

    def _slots(self):
        return ("exp_avg", "exp_avg_sq")


class _Trainer:
    def __init__(self, output_dir, micro, optimizer):
        self.output_dir = str(output_dir)
        self.dc = DatasetConfig(batch_size=2, micro_batch_num=micro)
        self.optimizer = optimizer


def test_training_hooks_write_the_statistics_and_drive_the_monitor(tmp_path):
    assert training_hooks.build([gpt(dict(num_experts=1))], _Trainer(tmp_path, 1, None)) is None
    model = gpt(dict(COLD_HOT, save_token_distribution=True, moe_router_load_balancing_type="aux_loss",
                     moe_aux_loss_coeff=0.01))
    optimizer = _Optimizer(model.trainable_params())

    class Wrapper:  # the loop hands over DistributedDataParallel wrappers
        module = model

    hooks = training_hooks.build([Wrapper()], _Trainer(tmp_path, 2, optimizer))
    try:
        assert moe_utils.get_aux_loss_scale() == 0.5  # loss scale 1 over 2 micro-batches
        layer = moe_utils.moe_layers(model)[0]
        states = training_hooks.optimizer_state_fn(optimizer)(layer.experts.expert_parameters(2)[0][0])
        assert [t.name.split(".")[0] for t in states] == ["exp_avg", "exp_avg_sq"]
        tokens_, labels, mask = gpt_batch(6)
        events = EventWriter(tmp_path, rank=0)
        model.set_train(True)
        extras = []
        for step in (1, 2, 3):
            for _ in range(2):
                model(tokens_, None, None, mask, labels=labels)
            extras.append(hooks.on_step_end(step, events))
        hooks.before_checkpoint()
        hooks.on_train_end()
        events.close()
    finally:
        moe_utils.set_aux_loss_micro_batches(1)
    assert [h[0] for h in hooks.monitor.history] == [1, 2, 3, 3]  # steps 1, 2, checkpoint, end
    for extra in extras:
        assert sorted(extra) == ["moe_aux_losses", "moe_hot_experts"]
        assert sorted(extra["moe_aux_losses"]["load_balancing_loss"]) == ["0", "2"]
        assert sorted(extra["moe_hot_experts"]) == ["0", "2"]
    records = read_events(tmp_path, kind="moe_tokens")
    assert len(records) == 6 and all(sum(r["counts"]) == 2 * 16 * TOPK for r in records)
    assert sorted(load_token_distribution(tmp_path / "token_distribution")) == [0, 2]
