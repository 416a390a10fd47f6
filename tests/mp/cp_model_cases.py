"""Whole-GPTModel equivalence under context parallelism (x tensor parallelism) against one process.

Usage: cp_model_cases.py 2|4 [case,case,...]. With 2 workers: CP=2; with 4 workers: CP=2 x TP=2 and
one CP=4 hybrid case. In every case each worker first builds the model with TP=CP=1 (its own
single-process reference: same seed and use_cpu_initialization, hence the same full weights), then
with the parallel layout, and compares the loss and the gradients. The loss is summed over the
context-parallel group inside LossWithMask and each rank's gradients cover its own tokens, so the
context-parallel gradients summed over the CP group must equal the single-process ones (the
tensor-parallel ones being this rank's slices).
"""

import sys

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.config import DatasetConfig, ModelParallelConfig, TrainingConfig, TransformerConfig
from mindspeed_ms.core.tensor_parallel import model_parallel_seed
from mindspeed_ms.core.tensor_parallel.layers import split_segments
from mindspeed_ms.legacy.model.gpt_model import GPTModel
from _worker import run_cases

BATCH, SEQ, VOCAB, HIDDEN, HEADS, LAYERS = 2, 16, 64, 64, 4, 2
LOSS_TOL, GRAD_RTOL, GRAD_ATOL = 2e-5, 2e-4, 2e-6


def build(tp=1, cp=1, algo="ulysses_cp_algo", ulysses=None, sequence_parallel=False, **model_kwargs):
    ps.destroy_model_parallel()
    extra = {"ulysses_degree_in_cp": ulysses} if ulysses is not None else {}
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp, **extra)
    model_parallel_seed(1234)  # the flash-attention path forks into the model-parallel stream
    ms.set_seed(7)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                          context_parallel_algo=algo, ulysses_degree_in_cp=ulysses,
                                          sequence_parallel=sequence_parallel, use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    dataset_config = DatasetConfig(batch_size=BATCH)
    kwargs = dict(vocab_size=VOCAB, num_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
                  ffn_hidden_size=4 * HIDDEN, seq_length=SEQ, parallel_config=parallel_config,
                  training_config=training_config, dataset_config=dataset_config, init_method_std=0.05)
    kwargs.update(model_kwargs)
    return GPTModel(TransformerConfig(**kwargs))


def batch(documents=False):
    rng = np.random.default_rng(3)
    tokens = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    labels = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    loss_mask = np.ones((BATCH, SEQ), np.float32)
    loss_mask[1, -3:] = 0  # some padding
    if not documents:
        return tokens, None, None, Tensor(loss_mask), labels
    # EOD-style documents: attention stays inside a document, positions restart at each one.
    bounds = [[0, 5, 11, SEQ], [0, 9, SEQ]]
    mask = np.ones((BATCH, 1, SEQ, SEQ), np.bool_)
    positions = np.zeros((BATCH, SEQ), np.int32)
    for b, cuts in enumerate(bounds):
        for a, z in zip(cuts[:-1], cuts[1:]):
            mask[b, :, a:z, a:z] = False
            positions[b, a:z] = np.arange(z - a)
    return tokens, Tensor(positions), Tensor(mask), Tensor(loss_mask), labels


def loss_and_grads(model, documents):
    tokens, positions, mask, loss_mask, labels = batch(documents)
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda: model(tokens, positions, mask, loss_mask, labels=labels), None, params)()
    out = {}
    tp_group = ps.get_tensor_model_parallel_group()
    cp_group = ps.get_context_parallel_group()
    for p, g in zip(params, grads):
        if getattr(p, "sequence_parallel", False):
            g = comm.all_reduce(g, tp_group)  # partial over the sequence slices of the TP ranks
        g = comm.all_reduce(g, cp_group)  # each CP rank's gradient covers its own tokens
        out[p.name] = (p, g.asnumpy())
    return float(loss.asnumpy()), out


def compare(layout, documents=False, train=False, **kwargs):
    """``train``: training mode (recomputation is active only then; dropout stays 0)."""
    ref_model = build(**kwargs)
    ref_model.set_train(train)
    ref_loss, ref = loss_and_grads(ref_model, documents)
    merged = dict(kwargs)
    merged.update(layout)
    model = build(**merged)
    model.set_train(train)
    loss, ours = loss_and_grads(model, documents)
    assert abs(loss - ref_loss) < LOSS_TOL, (loss, ref_loss)
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    worst = 0.0
    for name, (param, grad) in ours.items():
        full = ref[name][1]
        if getattr(param, "tensor_model_parallel", False):
            full = split_segments(full, param.partition_dim, param.partition_segments, tp, rank)
        np.testing.assert_allclose(grad, full, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)
        worst = max(worst, float(np.abs(grad - full).max()))
    return {"loss": loss, "ref_loss": ref_loss, "max_grad_diff": worst}


ROPE_GQA = dict(position_embedding_type="rope", group_query_attention=True, num_query_groups=2,
                hidden_act="swiglu", untie_embeddings_and_output_weights=True)

U, R, H = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"

CASES_2 = {  # CP=2
    "ulysses_tied_absolute": lambda: compare(dict(cp=2, algo=U)),
    "ulysses_rope_gqa_documents": lambda: compare(dict(cp=2, algo=U), documents=True, **ROPE_GQA),
    "ulysses_flash_rope": lambda: compare(dict(cp=2, algo=U), position_embedding_type="rope",
                                          use_flash_attention=True),
    "ring_tied_absolute": lambda: compare(dict(cp=2, algo=R)),
    "ring_rope_gqa_documents": lambda: compare(dict(cp=2, algo=R), documents=True, **ROPE_GQA),
    "ring_full_recompute_rope": lambda: compare(dict(cp=2, algo=R), train=True, position_embedding_type="rope",
                                                recompute_granularity="full", recompute_method="uniform",
                                                recompute_num_layers=1),
    "hybrid_u1_rope_documents": lambda: compare(dict(cp=2, algo=H, ulysses=1), documents=True,
                                                position_embedding_type="rope"),
    "hybrid_u2_absolute": lambda: compare(dict(cp=2, algo=H, ulysses=2)),
}

CASES_4 = {  # CP=2 x TP=2, and one CP=4 hybrid
    "ulysses_tp2_rope_gqa": lambda: compare(dict(tp=2, cp=2, algo=U), **ROPE_GQA),
    "ulysses_tp2_sp_documents": lambda: compare(dict(tp=2, cp=2, algo=U, sequence_parallel=True), documents=True),
    "ring_tp2_rope_gqa_documents": lambda: compare(dict(tp=2, cp=2, algo=R), documents=True, **ROPE_GQA),
    "ring_tp2_sp_absolute": lambda: compare(dict(tp=2, cp=2, algo=R, sequence_parallel=True)),
    "hybrid_tp2_u2_rope": lambda: compare(dict(tp=2, cp=2, algo=H, ulysses=2), position_embedding_type="rope"),
    "hybrid_cp4_u2_rope_documents": lambda: compare(dict(cp=4, algo=H, ulysses=2), documents=True,
                                                    position_embedding_type="rope"),
}


if __name__ == "__main__":
    chosen = CASES_4 if sys.argv[1:2] == ["4"] else CASES_2
    if len(sys.argv) > 2:  # a comma-separated subset of the cases (for debugging)
        chosen = {name: chosen[name] for name in sys.argv[2].split(",")}
    run_cases(chosen)
