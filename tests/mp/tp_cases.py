"""Tensor/sequence parallelism against the single-process computation (numpy), with TP = world.

Usage: tp_cases.py (2 or 4 workers). Every layer is built with use_cpu_initialization, so its
full weight is known (it is drawn identically on every rank) and the numpy reference is exact.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
from mindspeed_ms.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelCrossEntropy,
                                               VocabParallelEmbedding, dropout, get_rng_tracker,
                                               model_parallel_seed)
from mindspeed_ms.core.tensor_parallel import mappings as M
from mindspeed_ms.core.tensor_parallel.layers import draw_full_weight
from _worker import run_cases

RTOL, ATOL = 2e-5, 2e-6
B, S, H, OUT, VOCAB = 2, 8, 12, 16, 24


def setup():
    ps.initialize_model_parallel(tensor_model_parallel_size=comm.get_world_size())
    ms.set_seed(42)


def tp():
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def rand(shape, salt):
    return np.random.default_rng(salt).standard_normal(shape).astype(np.float32)


def make_config(sequence_parallel=False, layout="BSH"):
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=tp()[0], sequence_parallel=sequence_parallel,
                                          use_cpu_initialization=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=VOCAB, num_layers=1, num_attention_heads=4, hidden_size=H,
                               ffn_hidden_size=4 * H, parallel_config=parallel_config,
                               training_config=training_config, init_method_std=0.2)
    config.dataset_config.data_layout = layout
    return config


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual = actual.asnumpy() if hasattr(actual, "asnumpy") else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def grads(cell, inputs, upstream, position=0):
    """Input gradient and parameter gradients of sum(out * upstream)."""
    params = cell.trainable_params()

    def objective(x):
        out = cell(x)
        out = out[0] if isinstance(out, tuple) else out
        return (out * Tensor(upstream)).sum()

    fn = ms.value_and_grad(objective, grad_position=position, weights=params)
    _, (g_in, g_params) = fn(Tensor(inputs))
    return g_in, {p.name.split(".")[-1]: g for p, g in zip(params, g_params)}


def chunk(arr, axis):
    n, r = tp()
    return np.split(arr, n, axis=axis)[r]


def case_mappings():
    n, r = tp()
    x = rand((4, 2 * n, 3 * n), 1)
    up_full = rand((4, 2 * n, 3 * n), 2)
    # copy: identity forward, all-reduce backward (each rank has its own upstream gradient)
    up_mine = rand((4, 2 * n, 3 * n), 10 + comm.get_rank())
    total = sum(rand((4, 2 * n, 3 * n), 10 + k) for k in range(n))
    g = ms.grad(lambda t: (M.copy_to_tensor_model_parallel_region(t) * Tensor(up_mine)).sum())(Tensor(x))
    close(g, total, "copy bwd")
    # reduce: all-reduce forward, identity backward
    x_mine = rand((3, 2), 20 + comm.get_rank())
    close(M.reduce_from_tensor_model_parallel_region(Tensor(x_mine)),
          sum(rand((3, 2), 20 + k) for k in range(n)), "reduce fwd")
    g = ms.grad(lambda t: (M.reduce_from_tensor_model_parallel_region(t) * Tensor(up_full[:3, :2, 0])).sum())(
        Tensor(x_mine))
    close(g, up_full[:3, :2, 0], "reduce bwd")
    # scatter (last dim) / gather (last dim)
    close(M.scatter_to_tensor_model_parallel_region(Tensor(x)), chunk(x, -1), "scatter fwd")
    up_chunk = chunk(up_full, -1)
    g = ms.grad(lambda t: (M.scatter_to_tensor_model_parallel_region(t) * Tensor(up_chunk)).sum())(Tensor(x))
    gathered = np.concatenate([np.split(up_full, n, -1)[k] for k in range(n)], -1)
    close(g, gathered, "scatter bwd")
    close(M.gather_from_tensor_model_parallel_region(Tensor(chunk(x, -1))), x, "gather fwd")
    g = ms.grad(lambda t: (M.gather_from_tensor_model_parallel_region(t) * Tensor(up_full)).sum())(
        Tensor(chunk(x, -1)))
    close(g, chunk(up_full, -1), "gather bwd")
    # sequence-parallel variants along dim 1
    close(M.scatter_to_sequence_parallel_region(Tensor(x), 1), chunk(x, 1), "sp scatter fwd")
    close(M.gather_from_sequence_parallel_region(Tensor(chunk(x, 1)), 1), x, "sp gather fwd")
    g = ms.grad(lambda t: (M.gather_from_sequence_parallel_region(t, 1) * Tensor(up_mine)).sum())(
        Tensor(chunk(x, 1)))
    close(g, chunk(total, 1), "sp gather bwd (reduce-scatter)")
    g = ms.grad(lambda t: (M.gather_from_sequence_parallel_region(t, 1, False) * Tensor(up_full)).sum())(
        Tensor(chunk(x, 1)))
    close(g, chunk(up_full, 1), "sp gather bwd (split)")
    x_rank = rand((4, 2 * n, 3), 30 + comm.get_rank())
    x_sum = sum(rand((4, 2 * n, 3), 30 + k) for k in range(n))
    close(M.reduce_scatter_to_sequence_parallel_region(Tensor(x_rank), 1), chunk(x_sum, 1), "sp rs fwd")
    g = ms.grad(lambda t: (M.reduce_scatter_to_sequence_parallel_region(t, 1) * Tensor(chunk(up_full[..., :3], 1))
                           ).sum())(Tensor(x_rank))
    close(g, up_full[..., :3], "sp rs bwd")
    return "ok"


class _Objective(ms.nn.Cell):
    """sum(mapping(x) * upstream), the mapping in its graph form (what a compiled chunk runs)."""

    def __init__(self, mapping, upstream):
        super().__init__()
        self.mapping = mapping
        self.upstream = Tensor(upstream)
        M.use_graph_collectives(self)

    def construct(self, x):
        return (self.mapping(x) * self.upstream).sum()


def case_graph_mappings():
    """The layers' mapping cells in their graph form, compiled with ms.jit: the values and
    gradients of case_mappings (and so of numpy)."""
    n, r = tp()
    group = ps.get_tensor_model_parallel_group()
    x = rand((4, 2 * n, 3 * n), 1)
    up_full = rand((4, 2 * n, 3 * n), 2)
    up_mine = rand((4, 2 * n, 3 * n), 10 + comm.get_rank())
    total = sum(rand((4, 2 * n, 3 * n), 10 + k) for k in range(n))
    x_rank = rand((4, 2 * n, 3 * n), 30 + comm.get_rank())
    x_sum = sum(rand((4, 2 * n, 3 * n), 30 + k) for k in range(n))
    # (name, mapping, input, upstream, expected output, expected input gradient)
    checks = [
        ("copy", M.CopyToRegion(group), x, up_mine, x, total),
        ("reduce", M.ReduceFromRegion(group), x_rank, up_full, x_sum, up_full),
        ("scatter last", M.ScatterToRegion(group, -1), x, chunk(up_full, -1), chunk(x, -1), up_full),
        ("gather last (split grad)", M.GatherFromRegion(group, -1, "split"), chunk(x, -1), up_full, x,
         chunk(up_full, -1)),
        ("sp scatter", M.ScatterToRegion(group, 1), x, chunk(up_full, 1), chunk(x, 1), up_full),
        ("sp gather (reduce-scatter grad)", M.GatherFromRegion(group, 1, "reduce_scatter"), chunk(x, 1), up_mine, x,
         chunk(total, 1)),
        ("sp reduce-scatter", M.ReduceScatterToRegion(group, 1), x_rank, chunk(up_full, 1), chunk(x_sum, 1),
         up_full),
    ]
    for name, mapping, inp, upstream, out, grad in checks:
        objective = _Objective(mapping, upstream)
        value, g = ms.value_and_grad(ms.jit(objective.construct))(Tensor(inp))
        close(value, (out * upstream).sum(), f"{name} fwd", rtol=1e-5)
        close(g, grad, f"{name} bwd")
    return "ok"


def case_cross_entropy():
    n, _ = tp()
    logits = rand((10, VOCAB), 3) * 4
    target = np.random.default_rng(4).integers(0, VOCAB, 10)
    weights = rand((10,), 5)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    for smoothing in (0.0, 0.1):
        s = smoothing * VOCAB / (VOCAB - 1)
        expected = (1 - s) * -log_probs[np.arange(10), target] - s * log_probs.mean(-1)
        loss = VocabParallelCrossEntropy()
        local = Tensor(chunk(logits, -1))
        close(loss(local, Tensor(target), smoothing), expected, f"ce fwd {smoothing}", 1e-5, 1e-6)
        g = ms.grad(lambda t: (loss(t, Tensor(target), smoothing) * Tensor(weights)).sum())(local)
        soft = np.exp(log_probs)
        full_grad = (soft - (1 - s) * np.eye(VOCAB)[target] - s / VOCAB) * weights[:, None]
        close(g, chunk(full_grad, -1), f"ce bwd {smoothing}", 1e-5, 1e-6)
    assert n >= 2
    return "ok"


def case_column_parallel_linear():
    out = {}
    for sp, gather in ((False, False), (False, True), (True, False)):
        config = make_config(sequence_parallel=sp)
        layer = ColumnParallelLinear(H, OUT, config=config, init_method="normal", bias=True, gather_output=gather,
                                     init_key=f"col-{sp}-{gather}", bias_init="normal")
        w = draw_full_weight("normal", (OUT, H), f"col-{sp}-{gather}.weight", config)
        b = draw_full_weight("normal", (OUT,), f"col-{sp}-{gather}.bias", config)
        x = rand((B, S, H), 6)
        up = rand((B, S, OUT), 7)
        ref = x @ w.T + b
        x_in = chunk(x, 1) if sp else x
        up_local = up if gather else chunk(up, -1)
        y, _ = layer(Tensor(x_in))
        close(y, ref if gather else chunk(ref, -1), f"col fwd sp={sp} gather={gather}")
        g_in, g_p = grads(layer, x_in, up_local)
        g_x = up @ w
        close(g_in, chunk(g_x, 1) if sp else g_x, f"col dX sp={sp}")
        close(g_p["weight"], chunk(up.reshape(-1, OUT).T @ x.reshape(-1, H), 0), f"col dW sp={sp}")
        close(g_p["bias"], chunk(up.reshape(-1, OUT).sum(0), 0), f"col db sp={sp}")
        out[f"sp={sp},gather={gather}"] = float(y.asnumpy().sum())
    return out


def case_row_parallel_linear():
    for sp in (False, True):
        for input_is_parallel in ((True,) if sp else (True, False)):
            config = make_config(sequence_parallel=sp)
            key = f"row-{sp}-{input_is_parallel}"
            layer = RowParallelLinear(OUT, H, config=config, init_method="normal", bias=True,
                                      input_is_parallel=input_is_parallel, skip_bias_add=False, init_key=key,
                                      bias_init="normal")
            w = draw_full_weight("normal", (H, OUT), key + ".weight", config)
            b = draw_full_weight("normal", (H,), key + ".bias", config)
            x = rand((B, S, OUT), 8)
            up = rand((B, S, H), 9)
            ref = x @ w.T + b
            x_in = chunk(x, -1) if input_is_parallel else x
            up_in = chunk(up, 1) if sp else up
            y, _ = layer(Tensor(x_in))
            close(y, chunk(ref, 1) if sp else ref, f"row fwd sp={sp} parallel_in={input_is_parallel}")
            g_in, g_p = grads(layer, x_in, up_in)
            g_x = up @ w
            close(g_in, chunk(g_x, -1) if input_is_parallel else g_x, f"row dX sp={sp}")
            close(g_p["weight"], chunk(up.reshape(-1, H).T @ x.reshape(-1, OUT), 1), f"row dW sp={sp}")
            bias_grad = g_p["bias"]
            if sp:  # partial on each rank: the sum over ranks is the full gradient
                assert layer.bias.sequence_parallel
                bias_grad = comm.all_reduce(bias_grad, ps.get_tensor_model_parallel_group())
            close(bias_grad, up.reshape(-1, H).sum(0), f"row db sp={sp}")
    return "ok"


def case_vocab_parallel_embedding():
    for rs in (False, True):
        config = make_config(sequence_parallel=rs)
        key = f"emb-{rs}"
        layer = VocabParallelEmbedding(VOCAB, H, init_method="normal", reduce_scatter_embeddings=rs, config=config,
                                       init_key=key)
        table = draw_full_weight("normal", (VOCAB, H), key + ".weight", config)
        ids = np.random.default_rng(11).integers(0, VOCAB, (B, S)).astype(np.int32)
        up = rand((B, S, H), 12)
        ref = table[ids]
        y = layer(Tensor(ids))
        close(y, chunk(ref, 1) if rs else ref, f"emb fwd rs={rs}")
        params = layer.trainable_params()
        g = ms.grad(lambda t: (layer(t) * Tensor(chunk(up, 1) if rs else up)).sum(), grad_position=None,
                    weights=params)(Tensor(ids))[0]
        full = np.zeros((VOCAB, H), np.float32)
        np.add.at(full, ids.reshape(-1), up.reshape(-1, H))
        close(g, chunk(full, 0), f"emb dW rs={rs}")
    return "ok"


def case_seed_examples_tp2():
    """The reference's VocabParallelEmbedding example (TP=2 + sequence parallel) prints these shapes."""
    n, _ = tp()
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=n, pipeline_model_parallel_size=1,
                                          context_parallel_size=1, expert_model_parallel_size=1,
                                          sequence_parallel=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    model_config = TransformerConfig(vocab_size=50304, num_layers=1, num_attention_heads=32, hidden_size=2560,
                                     ffn_hidden_size=7680, parallel_config=parallel_config,
                                     training_config=training_config)
    emb = VocabParallelEmbedding(num_embeddings=model_config.vocab_size, embedding_dim=model_config.hidden_size,
                                 init_method=model_config.init_method,
                                 reduce_scatter_embeddings=parallel_config.sequence_parallel, config=model_config)
    out = emb(Tensor(np.ones((1, 1024)).astype(np.int32)))
    rows = out.asnumpy()[0]
    assert np.allclose(rows, rows[0])  # every position embeds token 1
    return list(out.shape)


def case_lora():
    """LoRA on column/row layers (B non-zero), with and without SP, against numpy."""
    from mindspeed_ms.core.tensor_parallel.lora import LoraAdapter, _kaiming_a

    rank = 3
    for sp in (False, True):
        config = make_config(sequence_parallel=sp)
        col = ColumnParallelLinear(H, OUT, config=config, init_method="normal", bias=False, init_key=f"lc{sp}")
        col.lora = LoraAdapter(col, rank, 6.0, key=f"lora-col-{sp}", init_b="normal")
        row = RowParallelLinear(OUT, H, config=config, init_method="normal", bias=False, input_is_parallel=True,
                                skip_bias_add=False, init_key=f"lr{sp}")
        row.lora = LoraAdapter(row, rank, 6.0, key=f"lora-row-{sp}", init_b="normal")
        col.lora.lora_a.name, col.lora.lora_b.name = "col_a", "col_b"
        row.lora.lora_a.name, row.lora.lora_b.name = "row_a", "row_b"
        w1 = draw_full_weight("normal", (OUT, H), f"lc{sp}.weight", config)
        w2 = draw_full_weight("normal", (H, OUT), f"lr{sp}.weight", config)
        a1 = draw_full_weight(_kaiming_a, (rank, H), f"lora-col-{sp}.lora_a", config)
        b1 = draw_full_weight("normal", (OUT, rank), f"lora-col-{sp}.lora_b", config)
        a2 = draw_full_weight(_kaiming_a, (rank, OUT), f"lora-row-{sp}.lora_a", config)
        b2 = draw_full_weight("normal", (H, rank), f"lora-row-{sp}.lora_b", config)
        x = rand((B, S, H), 21)
        up = rand((B, S, H), 22)
        s_ = 6.0 / rank
        h1 = x @ w1.T + s_ * (x @ a1.T) @ b1.T
        ref = h1 @ w2.T + s_ * (h1 @ a2.T) @ b2.T
        x_in = chunk(x, 1) if sp else x
        up_in = chunk(up, 1) if sp else up
        params = [col.lora.lora_a, col.lora.lora_b, row.lora.lora_a, row.lora.lora_b]

        def objective(t):
            return (row(col(t)[0])[0] * Tensor(up_in)).sum()

        out = row(col(Tensor(x_in))[0])[0]
        close(out, chunk(ref, 1) if sp else ref, f"lora fwd sp={sp}")
        g = ms.grad(objective, grad_position=None, weights=params)(Tensor(x_in))
        g = [comm.all_reduce(gi, ps.get_tensor_model_parallel_group())
             if getattr(p, "allreduce_over_tp", False) else gi for gi, p in zip(g, params)]
        # numpy gradients of sum(up * out)
        d_ref = up
        g_b2 = s_ * d_ref.reshape(-1, H).T @ (h1 @ a2.T).reshape(-1, rank)
        g_a2 = s_ * ((d_ref @ b2).reshape(-1, rank).T @ h1.reshape(-1, OUT))
        d_h1 = d_ref @ w2 + s_ * (d_ref @ b2) @ a2
        g_b1 = s_ * d_h1.reshape(-1, OUT).T @ (x @ a1.T).reshape(-1, rank)
        g_a1 = s_ * ((d_h1 @ b1).reshape(-1, rank).T @ x.reshape(-1, H))
        close(g[0], g_a1, f"lora col dA sp={sp}", 1e-4, 1e-5)
        close(g[1], chunk(g_b1, 0), f"lora col dB sp={sp}", 1e-4, 1e-5)
        close(g[2], chunk(g_a2, 1), f"lora row dA sp={sp}", 1e-4, 1e-5)
        close(g[3], g_b2, f"lora row dB sp={sp}", 1e-4, 1e-5)
    return "ok"


def case_rng_streams():
    model_parallel_seed(1234)
    tracker = get_rng_tracker()
    hidden = dropout(Tensor(np.ones((64,), np.float32)), 0.5).asnumpy()
    with tracker.fork():
        sharded = dropout(Tensor(np.ones((64,), np.float32)), 0.5).asnumpy()
    group = ps.get_tensor_model_parallel_group()
    hidden_all = comm.all_gather(Tensor(hidden.reshape(1, -1)), group, 0).asnumpy()
    sharded_all = comm.all_gather(Tensor(sharded.reshape(1, -1)), group, 0).asnumpy()
    assert all(np.array_equal(hidden_all[0], row) for row in hidden_all), "hidden dropout must match across TP"
    assert not np.array_equal(sharded_all[0], sharded_all[1]), "tensor-parallel dropout must differ across TP"
    return "ok"


if __name__ == "__main__":
    run_cases({
        "mappings": case_mappings,
        "graph_mappings": case_graph_mappings,
        "cross_entropy": case_cross_entropy,
        "column_parallel_linear": case_column_parallel_linear,
        "row_parallel_linear": case_row_parallel_linear,
        "vocab_parallel_embedding": case_vocab_parallel_embedding,
        "seed_examples_tp2": case_seed_examples_tp2,
        "rng_streams": case_rng_streams,
        "lora": case_lora,
    }, setup=setup)
