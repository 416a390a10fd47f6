"""Communication recomputation (select_comm_recompute) under TP=2 with sequence parallelism.

Usage: recompute_cases.py (2 workers). Each worker trains the GPT model 3 SGD steps (no dropout:
TP ranks draw other masks than one process) with TP=world + sequence parallelism, without and
with the sequence-parallel all-gathers recomputed (model_config.select_comm_recompute, and parallel_config.recompute_config's key
together with full recomputation of one layer), and a TP=1 reference on the same full weights.
Reported: losses, the largest gradient differences, and the activation bytes each run keeps for
the backward (the all-gathered inputs are no longer among them).
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.activation_memory import SavedActivations
from mindspeed_ms.core.config import DatasetConfig, ModelParallelConfig, TrainingConfig, TransformerConfig
from mindspeed_ms.core.tensor_parallel.layers import split_segments
from mindspeed_ms.core.tensor_parallel.random import model_parallel_seed
from mindspeed_ms.legacy.model.gpt_model import GPTModel
from _worker import run_cases

BATCH, SEQ, VOCAB, HIDDEN, HEADS, LAYERS, STEPS = 2, 16, 64, 64, 8, 2, 3


def build(tp, sp=False, parallel_extra=None, **model_kwargs):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                          use_cpu_initialization=True, **(parallel_extra or {}))
    config = TransformerConfig(
        vocab_size=VOCAB, num_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
        ffn_hidden_size=4 * HIDDEN, seq_length=SEQ, parallel_config=parallel_config,
        training_config=TrainingConfig(parallel_config=parallel_config),
        dataset_config=DatasetConfig(batch_size=BATCH), init_method_std=0.05,
        hidden_dropout=0.0, attention_dropout=0.0, **model_kwargs)
    model_parallel_seed(11)
    model = GPTModel(config)
    model.set_train(True)
    return model


def train(model):
    """Losses, full-weight-shaped gradients of every step (this rank's slices), kept bytes."""
    params = model.trainable_params()
    rng = np.random.default_rng(3)
    tp_group = ps.get_tensor_model_parallel_group()
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    losses, grads, kept = [], [], []
    for _ in range(STEPS):
        tokens = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
        labels = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
        mask = Tensor(np.ones((BATCH, SEQ), np.float32))
        counter = SavedActivations(params)

        def forward(tokens=tokens, labels=labels, mask=mask, counter=counter):
            with counter:
                return model(tokens, None, None, mask, labels=labels)

        loss, step_grads = ms.value_and_grad(forward, None, params)()
        step = {}
        for p, g in zip(params, step_grads):
            if getattr(p, "sequence_parallel", False):
                g = comm.all_reduce(g, tp_group)  # partial over the sequence slices
            step[p.name.replace(".replay.block", "")] = g  # names of recomputed layers: unwrapped
            ops.assign(p, p - 0.5 * g)  # plain SGD: later steps see updated weights
        losses.append(float(loss.asnumpy()))
        grads.append({name: g.asnumpy() for name, g in step.items()})
        kept.append(counter.bytes)
    meta = {p.name.replace(".replay.block", ""): (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None),
                     getattr(p, "partition_segments", None)) for p in params}
    return losses, grads, kept, meta, (tp, rank)


def max_diff(a_grads, b_grads, rtol, atol, slice_ref=None):
    worst = 0.0
    for step, (a, b) in enumerate(zip(a_grads, b_grads)):
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        for name, value in a.items():
            ref = b[name] if slice_ref is None else slice_ref(name, b[name])
            np.testing.assert_allclose(value, ref, rtol=rtol, atol=atol, err_msg=f"step {step}: {name}")
            worst = max(worst, float(np.abs(value - ref).max()))
    return worst


def comm_case(model_kwargs, parallel_extra):
    def run():
        world = comm.get_world_size()
        ref_losses, ref_grads, _, _, _ = train(build(1))
        sp_losses, sp_grads, sp_kept, meta, (tp, rank) = train(build(world, sp=True))
        losses, grads, kept, _, _ = train(build(world, sp=True, parallel_extra=parallel_extra, **model_kwargs))
        # the same computation as TP+SP without recomputation, to float32 rounding
        np.testing.assert_allclose(losses, sp_losses, rtol=1e-6, atol=1e-6)
        same = max_diff(grads, sp_grads, 1e-6, 1e-7)
        # and the single-process model (TP changes the summation order: TP tolerances)
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=2e-5)

        def sliced(name, full):
            parallel, dim, segments = meta[name]
            return split_segments(full, dim, segments, tp, rank) if parallel else full

        vs_ref = max_diff(grads, ref_grads, 2e-4, 2e-6, sliced)
        assert all(k < s for k, s in zip(kept, sp_kept)), (kept, sp_kept)
        return {"losses": losses, "sp_losses": sp_losses, "ref_losses": ref_losses,
                "max_grad_diff_vs_sp": same, "max_grad_diff_vs_tp1": vs_ref,
                "kept_bytes": kept[0], "sp_kept_bytes": sp_kept[0]}
    return run


CASES = {
    "tp_sp_select_comm_recompute": ({"select_comm_recompute": True}, None),
    "tp_sp_recompute_config": ({}, {"recompute_config": {"select_comm_recompute": True, "recompute": 1}}),
}

if __name__ == "__main__":
    run_cases({name: comm_case(*spec) for name, spec in CASES.items()})
