"""Resolution of the recompute settings into per-layer sets (pure Python)."""

import numpy as np
import pytest

from mindspeed_ms.core.config.fields import ConfigValueError
from mindspeed_ms.core.config.recompute import (check_recompute_shapes, layers_for_value,
                                                 resolve_recompute)


def test_value_forms():
    assert layers_for_value(True, num_layers=3) == {0, 1, 2}
    assert layers_for_value(None, num_layers=3) == set()
    assert layers_for_value(2, num_layers=3) == {0, 1}
    assert layers_for_value([1, 3], num_layers=4, pp_rank=1, pp_size=2) == {0, 1, 2}
    assert layers_for_value([[4, 4], [4, 2]], num_layers=4, pp_rank=1, pp_size=2,
                            vpp_rank=1, vpp_size=2) == {0, 1}
    # rows are virtual chunks, columns stages (num_layer_list's layout): pp=3, vpp=2
    grid = [[0, 1, 2], [3, 0, 1]]
    got = {(v, p): len(layers_for_value(grid, num_layers=4, pp_rank=p, pp_size=3, vpp_rank=v,
                                        vpp_size=2)) for v in range(2) for p in range(3)}
    assert got == {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 1): 0, (1, 2): 1}
    # the guide quotes its lists in YAML
    assert layers_for_value("[[4,4],[4,2]]", num_layers=4, pp_rank=1, pp_size=2,
                            vpp_rank=1, vpp_size=2) == {0, 1}
    assert layers_for_value("True", num_layers=2) == {0, 1}
    assert layers_for_value(5, num_layers=2) == {0, 1}


@pytest.mark.parametrize("value,kw", [
    ([1, 2, 3], dict(pp_size=2)),
    ([[1, 1], [1]], dict(pp_size=2, vpp_size=2, vpp_rank=0)),
    ([[1], [1]], dict(pp_size=2)),
    ("full", {}),
    ("feed_forward.mul", {}),
    (["feed_forward.mul"], {}),
    ([True, 1], dict(pp_size=2)),
    ([-1, 1], dict(pp_size=2)),
    ([[1, 1, 1], [1, 1, 1]], dict(pp_size=2, vpp_size=3, vpp_rank=0)),  # (pp, vpp) is not the layout
    ([1, 1], dict(pp_size=2, vpp_size=2, vpp_rank=0)),
    ({"a": 1}, {}),
])
def test_bad_shapes_refused(value, kw):
    with pytest.raises(ConfigValueError, match="recompute"):
        layers_for_value(value, num_layers=4, **kw)


def test_resolve_conflicts_and_merge():
    r = resolve_recompute({"recompute_granularity": "full", "recompute_method": "block",
                           "recompute_num_layers": 2}, {}, num_layers=4)
    assert r["full"] == {0, 1} and r["uniform_chunk"] == 0
    with pytest.raises(ConfigValueError, match="recompute_granularity"):
        resolve_recompute({"recompute_granularity": "full", "recompute_method": "block",
                           "recompute_num_layers": 2}, {"recompute": 3}, num_layers=4)
    r = resolve_recompute({"recompute_granularity": "selective"},
                          {"recompute_config": {"recompute": 1, "select_comm_recompute": True}},
                          num_layers=3)
    assert r["full"] == {0} and r["selective"] == {1, 2} and r["comm"] == {1, 2}
    with pytest.raises(ConfigValueError, match="select_recompute"):
        resolve_recompute({"select_recompute": 1}, {"select_recompute": 2}, num_layers=3)


def test_granularity_forms():
    uniform = resolve_recompute({"recompute_granularity": "full", "recompute_method": "uniform",
                                 "recompute_num_layers": 2}, {}, num_layers=4)
    assert uniform["full"] == {0, 1, 2, 3} and uniform["uniform_chunk"] == 2
    sel = resolve_recompute({"recompute_granularity": "selective"}, {}, num_layers=3)
    assert sel["selective"] == {0, 1, 2} and not sel["full"]
    # full layers need neither selective nor comm recomputation on top
    both = resolve_recompute({"select_recompute": True}, {"recompute": [2], "select_comm_recompute": 3},
                             num_layers=3)
    assert both == {"full": {0, 1}, "selective": {2}, "comm": {2}, "uniform_chunk": 0}
    with pytest.raises(ConfigValueError, match="recompute_method"):
        resolve_recompute({"recompute_granularity": "full"}, {}, num_layers=2)
    with pytest.raises(ConfigValueError, match="recompute_config"):
        resolve_recompute({}, {"recompute_config": {"recompute": 1, "offload": True}}, num_layers=2)
    with pytest.raises(ConfigValueError, match="recompute_config.recompute"):
        resolve_recompute({}, {"recompute": 1, "recompute_config": {"recompute": 2}}, num_layers=2)


def test_check_recompute_shapes_visits_every_stage_and_chunk():
    check_recompute_shapes({"recompute": [[1, 0], [0, 1]]}, pp_size=2, vpp_size=2)
    with pytest.raises(ConfigValueError, match="select_comm_recompute"):
        check_recompute_shapes({"recompute_config": {"select_comm_recompute": [1, 1]}}, pp_size=2,
                               vpp_size=2)
    with pytest.raises(ConfigValueError, match="recompute"):
        check_recompute_shapes({"recompute": [1, 1, 1]}, pp_size=2)


# ---------------------------------------------------------------------------------------------
# The model: each form gives the losses and gradients of the model without recomputation, and
# keeps fewer activation bytes for the backward (so the recomputation really happened).
# ---------------------------------------------------------------------------------------------

def _gpt_run(model_extra, parallel_extra, steps=3):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor, ops  # pylint: disable=import-outside-toplevel

    from mindspeed_ms.core.activation_memory import SavedActivations  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import (DatasetConfig, ModelParallelConfig,  # pylint: disable=import-outside-toplevel
                                          TrainingConfig, TransformerConfig)
    from mindspeed_ms.core.tensor_parallel.random import model_parallel_seed  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    layers, hidden, seq, batch, vocab = 4, 64, 32, 2, 50
    parallel = ModelParallelConfig(use_cpu_initialization=True, **parallel_extra)
    config = TransformerConfig(
        vocab_size=vocab, num_layers=layers, num_attention_heads=4, hidden_size=hidden,
        ffn_hidden_size=4 * hidden, seq_length=seq, parallel_config=parallel,
        training_config=TrainingConfig(parallel_config=parallel),
        dataset_config=DatasetConfig(batch_size=batch), init_method_std=0.02,
        hidden_dropout=0.1, attention_dropout=0.1, **model_extra)
    model_parallel_seed(1234)  # same dropout masks for every form
    model = GPTModel(config)
    model.set_train(True)
    params = model.trainable_params()
    rng = np.random.default_rng(7)
    losses, grads, kept = [], [], []
    for _ in range(steps):
        tokens = Tensor(rng.integers(0, vocab, (batch, seq)).astype(np.int32))
        labels = Tensor(rng.integers(0, vocab, (batch, seq)).astype(np.int32))
        mask = Tensor(np.ones((batch, seq), np.float32))
        counter = SavedActivations(params)

        def forward(tokens=tokens, labels=labels, mask=mask, counter=counter):
            with counter:
                return model(tokens, None, None, mask, labels=labels)

        loss, step_grads = ms.value_and_grad(forward, None, params)()
        losses.append(float(loss.asnumpy()))
        # recomputation wraps layers (names change), construction order does not
        grads.append([(".".join(p.name.split(".")[-2:]), g.asnumpy()) for p, g in zip(params, step_grads)])
        kept.append(counter.bytes)
        for p, g in zip(params, step_grads):  # plain SGD, so later steps see updated weights
            ops.assign(p, p - 0.5 * g)
    return losses, grads, kept


_BASELINE = {}


def _baseline():
    if not _BASELINE:
        _BASELINE["run"] = _gpt_run({}, {})
    return _BASELINE["run"]


@pytest.mark.parametrize("model_extra,parallel_extra", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2), {}),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), {}),
    (dict(recompute_granularity="selective"), {}),
    (dict(select_recompute=True), {}),
    ({}, dict(recompute=True)),
    ({}, dict(recompute=2)),
    ({}, dict(recompute=[3])),
    ({}, dict(recompute="[1]")),
    ({}, dict(select_recompute=[2])),
    ({}, dict(recompute_config={"recompute": 1, "select_recompute": True})),
], ids=["full-uniform", "full-block", "selective", "model-select_recompute", "recompute-True",
        "recompute-int", "recompute-list", "recompute-quoted", "select_recompute-list",
        "recompute_config"])
def test_recompute_forms_match_the_model_without(model_extra, parallel_extra):
    ref_losses, ref_grads, ref_kept = _baseline()
    losses, grads, kept = _gpt_run(model_extra, parallel_extra)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=1e-6)
    for step, (ref, got) in enumerate(zip(ref_grads, grads)):
        assert [name for name, _ in ref] == [name for name, _ in got]
        for (name, value), (_, mine) in zip(ref, got):
            np.testing.assert_allclose(mine, value, rtol=1e-6, atol=1e-7, err_msg=f"step {step}: {name}")
    # dropout masks are replayed: identical results although the recomputation draws again
    assert all(k < r for k, r in zip(kept, ref_kept)), (kept, ref_kept)


def test_comm_recompute_needs_sequence_parallel():
    from mindspeed_ms.core.config import ModelParallelConfig, TransformerConfig  # pylint: disable=import-outside-toplevel

    with pytest.raises(ConfigValueError, match="sequence_parallel"):
        ModelParallelConfig(select_comm_recompute=True)
    with pytest.raises(ConfigValueError, match="recompute_config.select_comm_recompute"):
        ModelParallelConfig(recompute_config={"select_comm_recompute": [1]})
    with pytest.raises(ConfigValueError, match="select_comm_recompute"):
        TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2,
                          parallel_config=ModelParallelConfig(), select_comm_recompute=True)
    ModelParallelConfig(sequence_parallel=True, select_comm_recompute=True)  # accepted with SP


def test_comm_recompute_without_an_all_gather_says_so(caplog):
    """Sequence parallelism with one tensor-parallel rank has no all-gather: a warning, same model."""
    import logging  # pylint: disable=import-outside-toplevel

    with caplog.at_level(logging.WARNING, logger="mindspeed_ms"):
        from mindspeed_ms.legacy.model import transformer as tr  # pylint: disable=import-outside-toplevel
        tr._NO_COMM_LOGGED.clear()  # pylint: disable=protected-access
        losses, _, kept = _gpt_run({}, dict(sequence_parallel=True, select_comm_recompute=True), steps=1)
    assert any("no sequence-parallel all-gather" in r.getMessage() for r in caplog.records)
    ref_losses, _, ref_kept = _baseline()
    assert losses[0] == pytest.approx(ref_losses[0], abs=1e-6) and kept[0] == ref_kept[0]
