"""Whole-GPTModel equivalence under tensor (and sequence) parallelism against one process.

Usage: gpt_tp_cases.py (2 or 4 workers; TP = number of workers). In every case each worker first
builds the model with TP=1 (its own single-process reference: same seed, use_cpu_initialization,
so the same full weights), then with TP=world, and compares loss and gradients (the TP gradients
are this rank's slices of the full ones).
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.config import DatasetConfig, ModelParallelConfig, TrainingConfig, TransformerConfig
from mindspeed_ms.core.tensor_parallel.layers import split_segments
from mindspeed_ms.legacy.model.gpt_model import GPTModel
from _worker import run_cases

BATCH, SEQ, VOCAB, HIDDEN, HEADS, LAYERS = 2, 16, 64, 64, 8, 2
LOSS_TOL, GRAD_RTOL, GRAD_ATOL = 2e-5, 2e-4, 2e-6


def build(tp, sequence_parallel=False, **model_kwargs):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    ms.set_seed(7)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                                          use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    dataset_config = DatasetConfig(batch_size=BATCH)
    kwargs = dict(vocab_size=VOCAB, num_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
                  ffn_hidden_size=4 * HIDDEN, seq_length=SEQ, parallel_config=parallel_config,
                  training_config=training_config, dataset_config=dataset_config, init_method_std=0.05)
    kwargs.update(model_kwargs)
    return GPTModel(TransformerConfig(**kwargs))


def batch():
    rng = np.random.default_rng(3)
    tokens = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    labels = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    mask = np.ones((BATCH, SEQ), np.float32)
    mask[1, -3:] = 0  # some padding
    return tokens, labels, Tensor(mask)


def loss_and_grads(model):
    tokens, labels, mask = batch()
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda: model(tokens, None, None, mask, labels=labels), None, params)()
    out = {}
    tp_group = ps.get_tensor_model_parallel_group()
    for p, g in zip(params, grads):
        if getattr(p, "sequence_parallel", False):
            g = comm.all_reduce(g, tp_group)  # partial over the sequence slices
        out[p.name] = (p, g.asnumpy())
    return float(loss.asnumpy()), out


def compare(**kwargs):
    world = comm.get_world_size()
    sp = kwargs.pop("sequence_parallel", False)
    ref_loss, ref = loss_and_grads(build(1, **kwargs))
    loss, ours = loss_and_grads(build(world, sequence_parallel=sp, **kwargs))
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


CASES = {
    "tied_absolute_gelu": dict(),
    "untied_rope_swiglu": dict(untie_embeddings_and_output_weights=True, position_embedding_type="rope",
                               hidden_act="swiglu", normalization="RMSNorm"),
    "gqa_rope": dict(group_query_attention=True, num_query_groups=4, position_embedding_type="rope"),
    "tied_sequence_parallel": dict(sequence_parallel=True),
    "untied_rope_gqa_sequence_parallel": dict(sequence_parallel=True, untie_embeddings_and_output_weights=True,
                                              position_embedding_type="rope", group_query_attention=True,
                                              num_query_groups=4, hidden_act="swiglu"),
    "sbh_layout_sequence_parallel": dict(sequence_parallel=True),
}


def make_case(name, kwargs):
    def run():
        kw = dict(kwargs)
        if name.startswith("sbh"):
            kw["dataset_config"] = DatasetConfig(batch_size=BATCH, data_layout="SBH")
        return compare(**kw)
    return run


if __name__ == "__main__":
    run_cases({name: make_case(name, kw) for name, kw in CASES.items()})
