"""GPTModel in one process against an independent plain-MindSpore GPT written here.

The reference is nanoGPT's architecture written directly with MindSpore ops (no mindspeed_ms code):
token + position embeddings, pre-norm blocks with causal self-attention and a GELU MLP, a final
LayerNorm, logits with the tied embedding, mean cross entropy. Both get the same weights; the loss
and every gradient must agree, so the model is known to be a correct GPT, not only self-consistent.
"""

import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig, DatasetConfig
from mindspeed_ms.legacy.model.gpt_model import GPTModel

ms.set_device("CPU")

LAYERS, HEADS, HIDDEN, SEQ, BATCH, VOCAB = 4, 4, 128, 64, 3, 65


def build_config(**overrides):
    parallel_config = ModelParallelConfig(use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    dataset_config = DatasetConfig(batch_size=BATCH)
    kwargs = dict(vocab_size=VOCAB, num_layers=LAYERS, num_attention_heads=HEADS, hidden_size=HIDDEN,
                  ffn_hidden_size=4 * HIDDEN, seq_length=SEQ, parallel_config=parallel_config,
                  training_config=training_config, dataset_config=dataset_config, init_method_std=0.02,
                  hidden_dropout=0.0, attention_dropout=0.0)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def reference_loss(w, tokens, labels):
    """nanoGPT's forward, written from MindSpore ops only."""
    b, s = tokens.shape
    x = ops.gather(w["wte"], tokens, 0) + ops.gather(w["wpe"], Tensor(np.arange(s, dtype=np.int32)), 0)
    causal = Tensor(np.triu(np.ones((s, s), np.bool_), 1))
    head_dim = HIDDEN // HEADS

    def layer_norm(t, g, beta):
        mean = t.mean(-1, keep_dims=True)
        var = ((t - mean) ** 2).mean(-1, keep_dims=True)
        return (t - mean) / ops.sqrt(var + 1e-5) * g + beta

    for i in range(LAYERS):
        p = lambda name: w[f"h{i}.{name}"]  # noqa: E731
        h = layer_norm(x, p("ln1.g"), p("ln1.b"))
        qkv = ops.matmul(h, p("attn.w").T) + p("attn.b")
        q, k, v = ops.split(qkv, HIDDEN, axis=-1)
        q, k, v = [t.reshape(b, s, HEADS, head_dim).transpose(0, 2, 1, 3) for t in (q, k, v)]
        att = ops.matmul(q, k.swapaxes(-1, -2)) / math.sqrt(head_dim)
        att = ops.masked_fill(att, causal, Tensor(-1e9, ms.float32))
        att = ops.softmax(att, -1)
        y = ops.matmul(att, v).transpose(0, 2, 1, 3).reshape(b, s, HIDDEN)
        x = x + ops.matmul(y, p("proj.w").T) + p("proj.b")
        h = layer_norm(x, p("ln2.g"), p("ln2.b"))
        h = ops.gelu(ops.matmul(h, p("fc.w").T) + p("fc.b"), approximate="none")
        x = x + ops.matmul(h, p("fc2.w").T) + p("fc2.b")
    x = layer_norm(x, w["lnf.g"], w["lnf.b"])
    logits = ops.matmul(x, w["wte"].T)
    logp = ops.log_softmax(logits.reshape(-1, VOCAB), -1)
    return -ops.gather_elements(logp, 1, labels.reshape(-1, 1)).mean()


def mapping(model):
    """Reference weight name -> the GPTModel parameter (same full weight)."""
    names = {"wte": "language_model.embedding.word_embeddings.weight",
             "wpe": "language_model.embedding.position_embeddings.weight",
             "lnf.g": "language_model.encoder.final_norm.weight", "lnf.b": "language_model.encoder.final_norm.bias"}
    for i in range(LAYERS):
        base = f"language_model.encoder.units.{i}.layers.0."
        names.update({
            f"h{i}.ln1.g": base + "input_norm.weight", f"h{i}.ln1.b": base + "input_norm.bias",
            f"h{i}.attn.w": base + "attention.query_key_value.weight",
            f"h{i}.attn.b": base + "attention.query_key_value.bias",
            f"h{i}.proj.w": base + "attention.dense.weight", f"h{i}.proj.b": base + "attention.dense.bias",
            f"h{i}.ln2.g": base + "post_attention_norm.weight", f"h{i}.ln2.b": base + "post_attention_norm.bias",
            f"h{i}.fc.w": base + "mlp.dense_h_to_4h.weight", f"h{i}.fc.b": base + "mlp.dense_h_to_4h.bias",
            f"h{i}.fc2.w": base + "mlp.dense_4h_to_h.weight", f"h{i}.fc2.b": base + "mlp.dense_4h_to_h.bias",
        })
    params = {p.name: p for p in model.trainable_params()}
    assert set(names.values()) == set(params), sorted(set(params) ^ set(names.values()))
    return {k: params[v] for k, v in names.items()}


@pytest.fixture(autouse=True)
def single_process():
    ps.destroy_model_parallel()
    ms.set_seed(1234)
    yield
    ps.destroy_model_parallel()


def test_gpt_matches_an_independent_reference():
    config = build_config()
    model = GPTModel(config)
    model.set_train(True)
    rng = np.random.default_rng(0)
    tokens = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    labels = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    loss_mask = Tensor(np.ones((BATCH, SEQ), np.float32))
    names = mapping(model)
    params = list(names.values())

    def ours():
        return model(tokens, None, None, loss_mask, labels=labels)

    loss, grads = ms.value_and_grad(ours, grad_position=None, weights=params)()
    weights = {k: Tensor(p.asnumpy()) for k, p in names.items()}
    keys = list(weights)
    ref_loss, ref_grads = ms.value_and_grad(lambda *ws: reference_loss(dict(zip(keys, ws)), tokens, labels),
                                            grad_position=tuple(range(len(keys))))(*[weights[k] for k in keys])
    assert abs(float(loss.asnumpy()) - float(ref_loss.asnumpy())) < 1e-5
    # an untrained model predicts about uniformly
    assert abs(float(loss.asnumpy()) - math.log(VOCAB)) < 0.1
    for key, g, rg in zip(keys, grads, ref_grads):
        np.testing.assert_allclose(g.asnumpy(), rg.asnumpy(), rtol=1e-4, atol=2e-6, err_msg=key)


def test_logits_without_labels_have_the_documented_layout():
    config = build_config(num_layers=1)
    model = GPTModel(config)
    tokens = Tensor(np.zeros((BATCH, SEQ), np.int32))
    logits = model(tokens, None, Tensor(np.zeros((BATCH, 1, SEQ, SEQ), np.int32)), None)
    assert logits.shape == (SEQ, BATCH, VOCAB)


@pytest.mark.parametrize("overrides", [
    dict(use_flash_attention=True),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="selective"),
])
def test_flash_attention_and_recompute_match_the_plain_model(overrides):
    rng = np.random.default_rng(1)
    tokens = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    labels = Tensor(rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32))
    mask = Tensor(np.ones((BATCH, SEQ), np.float32))
    results = []
    for extra in ({}, overrides):
        model = GPTModel(build_config(num_layers=2, **extra))
        model.set_train(True)  # recomputation only wraps the layers in training mode
        params = model.trainable_params()
        loss, grads = ms.value_and_grad(lambda: model(tokens, None, None, mask, labels=labels), None, params)()
        # recomputation wraps layers (names change), construction order does not
        results.append((float(loss.asnumpy()), [(p.name, g.asnumpy()) for p, g in zip(params, grads)]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert len(grads_a) == len(grads_b)
    for (name_a, ga), (name_b, gb) in zip(grads_a, grads_b):
        assert name_a.split(".")[-2:] == name_b.split(".")[-2:]
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6, err_msg=f"{name_a} / {name_b}")
