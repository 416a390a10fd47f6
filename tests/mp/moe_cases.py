"""MoE under expert (and tensor, sequence, data) parallelism against one process.

Usage: moe_cases.py [CASE ...] (2 or 4 workers). Each case builds, in the same worker, the
reference with tensor and expert parallelism 1 (``use_cpu_initialization``: the same full
weights as any layout) and the parallel layout, and compares without token dropping:

* the outputs / losses of every rank with the reference run on that rank's data;
* the gradients after the reduction the training loop performs (Megatron's rule): parameters
  marked ``sequence_parallel`` are first summed over the tensor-parallel group; expert
  parameters (``allreduce == False``) are then summed over the expert-data-parallel group,
  everything else over the data-parallel group; all are scaled by ``1 / dp``. The reference is
  the mean of the single-process gradients over the data-parallel ranks' batches (the step the
  training loop takes is the mean over data-parallel ranks). Expert weights of the parallel run
  are this rank's experts (and tensor-parallel shard) of the reference's.

The 2-worker job also runs the reference's MoE examples (moe_seed_examples.py) first.

Data: data-parallel rank ``d`` (``get_data_parallel_rank()``) holds batch ``d``; with sequence
parallelism its tensor-parallel ranks hold consecutive slices of the sequence.
"""

import os
import re
import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.config import (DatasetConfig, ModelParallelConfig, MoEConfig, TrainingConfig,
                                      TransformerConfig)
from mindspeed_ms.core.tensor_parallel.layers import split_segments
from mindspeed_ms.legacy.model.gpt_model import GPTModel
from mindspeed_ms.legacy.model.moe import moe_utils
from mindspeed_ms.legacy.model.moe.cold_hot import ColdHotExpertMonitor
from mindspeed_ms.legacy.model.moe.moe_layer import MoELayer
from _worker import run_cases

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when imported by the pytest module
from moe_seed_examples import EXAMPLES as SEED_EXAMPLES  # noqa: E402  pylint: disable=wrong-import-position

BATCH, SEQ, VOCAB, HIDDEN, FFN, HEADS = 2, 8, 64, 32, 48, 4
OUT_TOL, GRAD_RTOL, GRAD_ATOL = 2e-5, 2e-4, 2e-6


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------

def configure(tp=1, ep=1, sp=False, moe=None, **model_kwargs):
    """Fresh parallel groups and a TransformerConfig for the layout."""
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    ms.set_seed(7)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                          sequence_parallel=sp, use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_kwargs = dict(num_experts=4, moe_router_topk=2)
    moe_kwargs.update(moe or {})
    kwargs = dict(vocab_size=VOCAB, num_layers=1, num_attention_heads=HEADS, hidden_size=HIDDEN,
                  ffn_hidden_size=FFN, seq_length=SEQ, parallel_config=parallel_config,
                  training_config=training_config, dataset_config=DatasetConfig(batch_size=BATCH),
                  moe_config=MoEConfig(**moe_kwargs), init_method_std=0.2)
    kwargs.update(model_kwargs)
    return TransformerConfig(**kwargs)


def dp_info():
    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()


def sequence_slice(array, sp):
    """This rank's slice of a (B, S, ...) array along the sequence with sequence parallelism."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if not sp or tp == 1:
        return array
    return np.split(array, tp, axis=1)[rank]


def layer_data(d):
    rng = np.random.default_rng(100 + d)
    x = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    r = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    return x, r


def gpt_data(d):
    rng = np.random.default_rng(200 + d)
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    labels = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[-1, -2:] = 0
    return tokens, labels, mask


# ---------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------

def layer_loss_and_grads(layer, x, r, train=True):
    layer.set_train(train)
    params = layer.trainable_params()

    def fn():
        out, _ = layer(Tensor(x))
        return (out * Tensor(r)).sum(), out

    (loss, out), grads = ms.value_and_grad(fn, None, params, has_aux=True)()
    return float(loss.asnumpy()), out.asnumpy(), {p.name: (p, g.asnumpy()) for p, g in zip(params, grads)}


def gpt_loss_and_grads(model, data, train=True):
    model.set_train(train)
    tokens, labels, mask = (Tensor(a) for a in data)
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda: model(tokens, None, None, mask, labels=labels), None, params)()
    return float(loss.asnumpy()), {p.name: (p, g.asnumpy()) for p, g in zip(params, grads)}


def canonical(name, param):
    """The reference's name of a parameter (local expert numbers become global ones)."""
    if hasattr(param, "expert_global_index"):
        name = re.sub(r"local_experts\.\d+\.", f"local_experts.{param.expert_global_index}.", name)
    return name


def reduce_like_training(param, grad):
    """Megatron's gradient reduction as the training loop does it (see the module docstring)."""
    g = Tensor(grad)
    if getattr(param, "sequence_parallel", False):
        g = comm.all_reduce(g, ps.get_tensor_model_parallel_group())
    if getattr(param, "allreduce", True) is False:
        g = comm.all_reduce(g, ps.get_data_modulo_expert_parallel_group())
    else:
        g = comm.all_reduce(g, ps.get_data_parallel_group())
    return g.asnumpy() / ps.get_data_parallel_world_size()


def reference_slice(param, full):
    """This rank's part of a reference gradient: its experts' rows, its tensor-parallel shard."""
    if hasattr(param, "expert_global_indices"):
        full = full[param.expert_global_indices]
    if getattr(param, "tensor_model_parallel", False):
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        full = split_segments(full, param.partition_dim, param.partition_segments, tp, rank)
    return full


def compare_grads(ours, ref_mean, hot_map=None):
    """Reduced gradients of the parallel run against the mean reference gradients.

    ``hot_map``: ``{replica parameter name -> reference name}`` for cold/hot replicas; their
    owners' gradients are then not compared (the replica carries them).
    """
    worst = 0.0
    replaced = set((hot_map or {}).values())
    checked = 0
    for name, (param, grad) in sorted(ours.items()):
        ref_name = (hot_map or {}).get(name, canonical(name, param))
        if ref_name not in ref_mean:
            raise AssertionError(f"{name} ({ref_name}) has no reference gradient")
        reduced = reduce_like_training(param, grad)
        if hot_map is not None and name not in hot_map and ref_name in replaced:
            continue
        expected = reference_slice(param, ref_mean[ref_name])
        np.testing.assert_allclose(reduced, expected, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)
        worst = max(worst, float(np.abs(reduced - expected).max()))
        checked += 1
    return worst, checked


def layout_position(tp=1, ep=1):
    """(dp, d) of this rank in the parallel layout (the reference is built after asking)."""
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    return dp_info()


def mean_over_data_parallel(ref_grads):
    """Mean of every rank's reference gradients over the parallel layout's data-parallel group.

    Each rank computed the reference on its own batch only; the data-parallel ranks hold the
    different batches, so one all-reduce gives the mean over all of them.
    """
    names = sorted(ref_grads)
    flat = np.concatenate([ref_grads[n].reshape(-1) for n in names]).astype(np.float32)
    total = comm.all_reduce(Tensor(flat), ps.get_data_parallel_group()).asnumpy()
    total /= ps.get_data_parallel_world_size()
    out, offset = {}, 0
    for n in names:
        size = ref_grads[n].size
        out[n] = total[offset:offset + size].reshape(ref_grads[n].shape)
        offset += size
    return out


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

def layer_equivalence(tp, ep, sp, moe=None, **model_kwargs):
    _, d = layout_position(tp, ep)
    ref_layer = MoELayer(configure(moe=moe, **model_kwargs), layer_number=1)
    _, ref_out, ref_grads = layer_loss_and_grads(ref_layer, *layer_data(d))
    layer = MoELayer(configure(tp=tp, ep=ep, sp=sp, moe=moe, **model_kwargs), layer_number=1)
    ref_mean = mean_over_data_parallel({n: g for n, (_, g) in ref_grads.items()})
    x, r = layer_data(d)
    _, out, grads = layer_loss_and_grads(layer, sequence_slice(x, sp), sequence_slice(r, sp))
    expected_out = sequence_slice(ref_out, sp)
    np.testing.assert_allclose(out, expected_out, rtol=OUT_TOL, atol=OUT_TOL)
    worst, checked = compare_grads(grads, ref_mean)
    return {"out_diff": float(np.abs(out - expected_out).max()), "grad_diff": worst, "checked": checked}


def gpt_equivalence(tp, ep, sp, moe=None, **model_kwargs):
    model_kwargs.setdefault("num_layers", 3)
    _, d = layout_position(tp, ep)
    ref_loss, ref_grads = gpt_loss_and_grads(GPTModel(configure(moe=moe, **model_kwargs)), gpt_data(d))
    model = GPTModel(configure(tp=tp, ep=ep, sp=sp, moe=moe, **model_kwargs))
    ref_mean = mean_over_data_parallel({n: g for n, (_, g) in ref_grads.items()})
    loss, grads = gpt_loss_and_grads(model, gpt_data(d))
    assert abs(loss - ref_loss) < OUT_TOL, (loss, ref_loss)
    worst, checked = compare_grads(grads, ref_mean)
    moe_count = len(moe_utils.moe_layers(model))
    return {"loss": loss, "ref_loss": ref_loss, "grad_diff": worst, "checked": checked, "moe_layers": moe_count}


def token_counts_case(tp, ep, sp):
    """Counts over two micro-batches: identical on all ranks, sum = tokens x topk, = reference."""
    moe = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001,
               moe_layer_freq=2)
    dp, d = layout_position(tp, ep)
    ref_model = GPTModel(configure(moe=moe, num_layers=3))
    ref_model.set_train(True)
    for micro in range(2):
        tokens, _, _ = gpt_data(10 * d + micro)
        ref_model(Tensor(tokens), None, None, None)
    ref_layers = moe_utils.moe_layers(ref_model)
    local_counts = {layer.layer_index: layer.router.pending_token_counts() for layer in ref_layers}
    local_losses = {layer.layer_index: layer.router.pending_aux_losses() for layer in ref_layers}

    model = GPTModel(configure(tp=tp, ep=ep, sp=sp, moe=moe, num_layers=3))
    # The reference's counts and mean losses over all data-parallel batches.
    expected = {k: comm.all_reduce(Tensor(v.astype(np.int32)), ps.get_data_parallel_group()).asnumpy()
                for k, v in local_counts.items()}
    ref_means = {k: {name: float(comm.all_reduce(Tensor(np.float32(np.mean(vals))).reshape(1),
                                                 ps.get_data_parallel_group()).asnumpy()[0]) / dp
                     for name, vals in v.items()} for k, v in local_losses.items()}
    model.set_train(True)
    for micro in range(2):
        tokens, _, _ = gpt_data(10 * d + micro)
        model(Tensor(tokens), None, None, None)
    model.set_train(False)
    tokens, _, _ = gpt_data(99)
    model(Tensor(tokens), None, None, None)  # evaluation: not counted
    counts = moe_utils.collect_token_counts(model)
    losses = moe_utils.collect_aux_losses(model)
    assert sorted(counts) == [0, 2], counts
    for layer, vec in counts.items():
        assert int(vec.sum()) == dp * 2 * BATCH * SEQ * 2, (layer, vec)
        np.testing.assert_array_equal(vec, expected[layer])
        for name in ("load_balancing_loss", "z_loss"):
            assert abs(losses[name][layer] - ref_means[layer][name]) < 1e-5, (name, losses, ref_means)
    again = moe_utils.collect_token_counts(model)
    assert all(int(v.sum()) == 0 for v in again.values()), again
    return {"counts": {str(k): v.tolist() for k, v in counts.items()},
            "losses": {k: {str(l): v for l, v in d_.items()} for k, d_ in losses.items()},
            "writer": moe_utils.is_token_count_writer()}


def grouped_matches_sequential(ep):
    cfg = configure(ep=ep, moe=dict(moe_grouped_gemm=False))
    seq = MoELayer(cfg, layer_number=1)
    _, d = dp_info()
    x, r = layer_data(d)
    _, out_s, grads_s = layer_loss_and_grads(seq, x, r)
    cfg = configure(ep=ep, moe=dict(moe_grouped_gemm=True))
    grouped = MoELayer(cfg, layer_number=1)
    _, out_g, grads_g = layer_loss_and_grads(grouped, x, r)
    np.testing.assert_allclose(out_g, out_s, rtol=1e-5, atol=1e-6)
    # Stack the sequential experts' gradients to compare with the grouped parameters.
    by_name = {canonical(n, p): g for n, (p, g) in grads_s.items()}
    lo = ps.get_expert_model_parallel_rank() * grouped.num_local_experts
    pairs = {"weight1": "dense_h_to_4h.weight", "bias1": "dense_h_to_4h.bias", "weight2": "dense_4h_to_h.weight",
             "bias2": "dense_4h_to_h.bias"}
    for name, (param, grad) in grads_g.items():
        short = name.split(".")[-1]
        if short in pairs:
            stacked = np.stack([by_name[f"experts.local_experts.{lo + i}.{pairs[short]}"]
                                for i in range(grouped.num_local_experts)])
            np.testing.assert_allclose(grad, stacked, rtol=1e-4, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_allclose(grad, by_name[name], rtol=1e-4, atol=1e-6, err_msg=name)
    return float(np.abs(out_g - out_s).max())


# -- cold / hot -----------------------------------------------------------------------------------

COLD_HOT = dict(enable_cold_hot_expert=True, hot_expert_num=2, moe_expert_capacity_factor=8.0,
                cold_token_percent=1.0, update_step=2)


def hot_name_map(layer_or_model):
    """Replica parameter name -> the reference name of the expert it currently holds."""
    mapping = {}
    for layer in moe_utils.moe_layers(layer_or_model):
        for slot, expert in enumerate(layer.hot_expert_ids):
            for param, _ in layer.hot_experts.expert_parameters(slot):
                owner_name = param.name.replace(f"hot_experts.local_experts.{slot}.",
                                                f"experts.local_experts.{expert}.")
                mapping[param.name] = owner_name
    return mapping


def cold_hot_matches_plain(ep):
    """Cold/hot on (hot set [1, 3]) vs off: same outputs and reduced gradients (no dropping)."""
    _, d = layout_position(1, ep)
    ref_layer = MoELayer(configure(moe=dict(moe_expert_capacity_factor=8.0)), layer_number=1)
    _, ref_out, ref_grads = layer_loss_and_grads(ref_layer, *layer_data(d))
    layer = MoELayer(configure(ep=ep, moe=COLD_HOT), layer_number=1)
    ref_mean = mean_over_data_parallel({n: g for n, (_, g) in ref_grads.items()})
    layer.set_hot_experts([1, 3])
    _, out, grads = layer_loss_and_grads(layer, *layer_data(d))
    np.testing.assert_allclose(out, ref_out, rtol=OUT_TOL, atol=OUT_TOL)
    worst, checked = compare_grads(grads, ref_mean, hot_map=hot_name_map(layer))
    return {"grad_diff": worst, "checked": checked}


def sgd_step(params_grads, lr=0.5):
    for _, (param, grad) in params_grads.items():
        param.set_data(Tensor(param.asnumpy() - lr * reduce_like_training(param, grad)))


def gpt_training_steps(ep, moe, cold_hot=False, steps=5, lr=0.5):
    """Five SGD steps with EP (optionally cold/hot with its monitor) against the reference.

    Both models live in this worker; per step each computes its loss on this rank's batch, the
    reference's gradients are averaged over the data-parallel ranks, the parallel model's are
    reduced as the training loop does, and both take the same SGD step. The per-step losses
    must agree (the loss curves of the two runs).
    """
    _, d = layout_position(1, ep)
    ref = GPTModel(configure(moe=moe, num_layers=2))
    parallel_moe = dict(moe, **(COLD_HOT if cold_hot else {}))
    # COLD_HOT's update_step=2: decisions after steps 1, 2 and 4.
    model = GPTModel(configure(ep=ep, moe=parallel_moe, num_layers=2))
    monitor = ColdHotExpertMonitor(model) if cold_hot else None
    losses, ref_losses, decided = [], [], []
    for step in range(1, steps + 1):
        data = gpt_data(d)  # the same batch every step, so the loss must fall
        ref_loss, ref_grads = gpt_loss_and_grads(ref, data)
        ref_mean = mean_over_data_parallel({n: g for n, (_, g) in ref_grads.items()})
        for name, (param, _) in ref_grads.items():
            param.set_data(Tensor(param.asnumpy() - lr * ref_mean[name]))
        moe_utils.collect_token_counts(ref)  # the reference's counts are not compared here
        loss, grads = gpt_loss_and_grads(model, data)
        sgd_step(grads, lr)
        counts = moe_utils.collect_token_counts(model)
        if monitor is not None and monitor.on_step_end(step, counts):
            decided.append(step)
            for layer_index, hot in monitor.hot_experts().items():
                # The most used experts of this step's global counts (ties: lower index).
                top = np.argsort(-counts[layer_index], kind="stable")[:len(hot)]
                assert hot == sorted(int(i) for i in top), (step, counts, hot)
        losses.append(loss)
        ref_losses.append(ref_loss)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=5e-5)
    assert ref_losses[-1] < ref_losses[0], ref_losses  # the steps did train
    if monitor is not None:
        assert decided == [1, 2, 4], decided
    return {"losses": losses, "ref_losses": ref_losses, "decided": decided}


def pretrain_cold_hot_resume():
    """pretrain() with EP=2 and cold/hot experts: events, npy files, and a resumed run that
    continues exactly like an uninterrupted one (the hot sets travel in the checkpoint)."""
    import json  # pylint: disable=import-outside-toplevel
    from pathlib import Path  # pylint: disable=import-outside-toplevel

    import training_configs as T  # pylint: disable=import-outside-toplevel

    base = Path(os.environ.get("MINDSPEED_TEST_RESULTS", ".")) / "pretrain_moe"
    moe = dict(num_experts=4, moe_router_topk=2, moe_router_load_balancing_type="aux_loss",
               moe_aux_loss_coeff=0.01, save_token_distribution=True, **COLD_HOT)
    sections = dict(parallel_config={"use_cpu_initialization": True, "expert_model_parallel_size": 2},
                    moe_config=moe, model_config={"hidden_size": 32, "ffn_hidden_size": 32, "seq_length": 16},
                    dataset_config={"batch_size": 2, "seq_length": 16})
    settings = {"training_iters": 5, "save_interval": 2}
    full = T.run(T.make(base / "full", training_config=settings, **sections))
    T.run(T.make(base / "resumed", training_config=settings, **sections), stop_after=3)
    second = T.run(T.make(base / "resumed", training_config=dict(settings, resume_training=True), **sections))
    assert [s["step"] for s in second] == [3, 4, 5], second
    assert [s["loss"] for s in second] == [s["loss"] for s in full[2:]], (second, full)
    assert full[-1]["loss"] < full[0]["loss"], full

    rank = comm.get_rank()
    events = [json.loads(line) for line in open(base / "full" / "events" / f"rank_{rank}.jsonl", encoding="utf-8")]
    steps = [e for e in events if e["kind"] == "step"]
    tokens = [e for e in events if e["kind"] == "moe_tokens"]
    assert all(set(e["moe_hot_experts"]) == {"0", "1"} for e in steps), steps[0]
    assert all(set(e["moe_aux_losses"]["load_balancing_loss"]) == {"0", "1"} for e in steps), steps[0]
    if rank == 0:  # the stage's writer
        assert [(e["step"], e["layer"]) for e in tokens] == [(s, l) for s in range(1, 6) for l in (0, 1)]
        assert all(sum(e["counts"]) == 2 * 2 * 16 * 2 for e in tokens)  # dp x batch x seq x topk
        files = sorted(p.name for p in (base / "full" / "token_distribution").iterdir())
        assert files == sorted(f"layer-{l}_{s}.npy" for s in range(1, 6) for l in (0, 1)), files
    else:
        assert not tokens
    return {"losses": [s["loss"] for s in full], "hot": [e["moe_hot_experts"] for e in steps]}


# ---------------------------------------------------------------------------------------------

AUX = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01)

CASES_2 = {
    **{f"seed_{name}": fn for name, fn in SEED_EXAMPLES.items()},
    "layer_ep2": lambda: layer_equivalence(1, 2, False),
    "layer_ep2_aux_swiglu": lambda: layer_equivalence(1, 2, False, moe=AUX, hidden_act="swiglu"),
    "layer_ep2_grouped": lambda: layer_equivalence(1, 2, False, moe=dict(moe_grouped_gemm=True, num_experts=6)),
    "gpt_ep2_moe_every_layer": lambda: gpt_equivalence(1, 2, False, moe=AUX, num_layers=2),
    "gpt_ep2_moe_layer_freq2": lambda: gpt_equivalence(1, 2, False, moe=dict(AUX, moe_layer_freq=2)),
    "grouped_matches_sequential_ep2": lambda: grouped_matches_sequential(2),
    "token_counts_ep2": lambda: token_counts_case(1, 2, False),
    "cold_hot_matches_plain_ep2": lambda: cold_hot_matches_plain(2),
    "pretrain_ep2_cold_hot_resume": pretrain_cold_hot_resume,
    "gpt_ep2_five_steps": lambda: gpt_training_steps(2, dict(AUX, moe_layer_freq=2)),
    "gpt_ep2_cold_hot_five_steps": lambda: gpt_training_steps(2, dict(moe_layer_freq=2, moe_expert_capacity_factor=8.0),
                                                              cold_hot=True),
}

CASES_4 = {
    "layer_ep4": lambda: layer_equivalence(1, 4, False),
    "layer_ep2_dp4": lambda: layer_equivalence(1, 2, False, moe=AUX),
    "layer_ep2_tp2_sp": lambda: layer_equivalence(2, 2, True, moe=AUX, hidden_act="swiglu"),
    "gpt_ep4": lambda: gpt_equivalence(1, 4, False, moe=dict(AUX, moe_layer_freq=2)),
    "gpt_ep2_dp4": lambda: gpt_equivalence(1, 2, False, moe=AUX, num_layers=2),
    "gpt_ep2_tp2_sp": lambda: gpt_equivalence(2, 2, True, moe=dict(AUX, moe_layer_freq=2)),
    "gpt_ep2_tp2_sp_grouped": lambda: gpt_equivalence(2, 2, True, moe=dict(moe_grouped_gemm=True), num_layers=2),
    "token_counts_ep2_tp2_sp": lambda: token_counts_case(2, 2, True),
    "cold_hot_matches_plain_ep2_dp4": lambda: cold_hot_matches_plain(2),
}


def select(names):
    """The cases for this job's world size (msrun sets MS_WORKER_NUM), or the named ones."""
    world = int(os.environ.get("MS_WORKER_NUM") or os.environ.get("RANK_SIZE") or 2)
    cases = CASES_2 if world == 2 else CASES_4
    if names:
        cases = {n: {**CASES_2, **CASES_4}[n] for n in names}
    return cases


if __name__ == "__main__":
    run_cases(select(sys.argv[1:]))
