"""Contradictions between config fields are refused when the config is built (issue 16, item 3).

Each refusal names every field involved; where one field may stand for the other (the sequence
length), leaving one unset makes it follow the other, and the data pipeline sees that length.
"""
import pytest

from mindspeed_ms.core.config import (AllConfig, DatasetConfig, ModelParallelConfig, TrainingConfig,
                                      TransformerConfig, init_configs_from_dict)
from mindspeed_ms.core.config.fields import ConfigValueError

ARCH = dict(vocab_size=32, num_layers=2, num_attention_heads=2, hidden_size=8, ffn_hidden_size=16)


def _all(model=None, dataset=None, **sections):
    data = {"model_config": {**ARCH, **(model or {})}, "dataset_config": dict(dataset or {}), **sections}
    return init_configs_from_dict(data)


# ---- one sequence length ---------------------------------------------------------------------

def test_two_different_sequence_lengths_are_refused_naming_both():
    with pytest.raises(ConfigValueError) as info:
        _all(model={"seq_length": 32}, dataset={"seq_length": 64})
    text = str(info.value)
    assert "model_config.seq_length=32" in text and "dataset_config.seq_length=64" in text


def test_a_later_change_of_the_dataset_length_is_refused_by_validate():
    config = _all(model={"seq_length": 32}, dataset={"seq_length": 32})
    config.dataset_config.seq_length = 64  # the dataset config does not know the model's rules
    with pytest.raises(ConfigValueError, match="dataset_config.seq_length=64"):
        config.validate()


@pytest.mark.parametrize("model, dataset", [({"seq_length": 16}, {}), ({}, {"seq_length": 16}),
                                            ({"seq_length": 16}, {"seq_length": 16})])
def test_one_length_given_is_the_length_of_the_model_and_of_the_samples(model, dataset):
    from mindspeed_ms.training.training import build_datasets
    config = _all(model=model, dataset={"dataset_type": "synthetic", **dataset})
    assert config.model_config.seq_length == 16
    train, _ = build_datasets(config)
    assert len(train[0]) == 16 + 1  # inputs and the shifted labels


def test_builder_takes_both_lengths_together():
    from mindspeed_lab.builder import ConfigBuilder
    builder = ConfigBuilder("tiny", workers=1)
    accepted = builder.update({"model_config.seq_length": 64, "dataset_config.seq_length": 64})
    assert accepted == {"model_config.seq_length": True, "dataset_config.seq_length": True}
    assert builder.ok and builder.get("model_config.seq_length") == 64
    assert not builder.set("dataset_config.seq_length", 16)
    assert "dataset_config.seq_length=16" in builder.message("dataset_config.seq_length")


# ---- position table vs sequence ----------------------------------------------------------------

def test_absolute_position_table_shorter_than_the_sequence_is_refused():
    with pytest.raises(ConfigValueError) as info:
        _all(model={"seq_length": 32, "max_position_embeddings": 16})
    text = str(info.value)
    assert "max_position_embeddings" in text and "seq_length=32" in text
    # rotary positions have no table: the same numbers are fine
    _all(model={"seq_length": 32, "max_position_embeddings": 16, "position_embedding_type": "rope"})
    # the table may be longer than the sequence
    assert _all(model={"seq_length": 16, "max_position_embeddings": 32}).model_config.max_position_embeddings == 32


# ---- loss-scale factor (Megatron's hysteresis maps to it) ----------------------------------------

def _scaler_from(training):
    from mindspeed_ms.training.loss_scale import build_loss_scaler
    t = training
    return build_loss_scaler(t.scale_sense, loss_scale=t.loss_scale, loss_scale_value=t.loss_scale_value,
                             loss_scale_factor=t.loss_scale_factor, loss_scale_window=t.loss_scale_window)


def _verdicts(section):
    """(config accepts, loss_scale.py's cell accepts) for one training_config section."""
    try:
        config = init_configs_from_dict({"training_config": section})
    except ValueError:
        config = None
    try:
        from mindspeed_ms.training.loss_scale import build_loss_scaler
        spec = section.get("scale_sense")
        fields = {k: v for k, v in section.items() if k != "scale_sense"}
        if "hysteresis" in fields:
            fields["loss_scale_factor"] = fields.pop("hysteresis")
        build_loss_scaler(spec, **fields)
        cell_ok = True
    except (TypeError, ValueError):
        cell_ok = False
    if config is not None:
        _scaler_from(config.training_config)  # what the trainer builds: never fails once accepted
    return config is not None, cell_ok


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("spelling", ["loss_scale_factor", "hysteresis"])
def test_config_and_loss_scale_cells_agree_on_the_dynamic_factor(factor, spelling):
    section = {"loss_scale_value": 1024, spelling: factor, "loss_scale_window": 10}
    config_ok, cell_ok = _verdicts(section)
    assert config_ok == cell_ok == (factor > 1)


@pytest.mark.parametrize("factor", [1, 1.0, 1.5, 2])
@pytest.mark.parametrize("cell", ["DynamicLossScaleUpdateCell", "AdaptiveLossScaleUpdateCell"])
def test_config_and_loss_scale_cells_agree_on_scale_sense(factor, cell):
    section = {"scale_sense": {"type": cell, "loss_scale_value": 1024, "scale_factor": factor, "scale_window": 10}}
    config_ok, cell_ok = _verdicts(section)
    assert config_ok == cell_ok == (factor > 1)


def test_megatron_hysteresis_of_one_is_refused_when_loaded_naming_both_names():
    from mindspeed_ms.core.config import init_configs_from_args
    with pytest.raises(ConfigValueError) as info:
        init_configs_from_args({"fp16": True, "hysteresis": 1, "initial_loss_scale": 1024, "loss_scale_window": 10})
    text = str(info.value)
    assert "loss_scale_factor" in text and "hysteresis=1" in text
    config = init_configs_from_args({"fp16": True, "hysteresis": 2, "initial_loss_scale": 1024,
                                     "loss_scale_window": 10})
    scaler = _scaler_from(config.training_config)
    assert scaler.scale_factor == 2 and scaler.update(True) == 512  # an overflow halves the scale


# ---- required architecture sizes -----------------------------------------------------------------

@pytest.fixture
def one_rank():
    from mindspeed_ms.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    yield
    ps.destroy_model_parallel()


def test_transformer_config_without_sizes_builds_but_no_model_is_built_from_it(one_rank):  # pylint: disable=unused-argument
    from mindspeed_ms.legacy.model.enums import ModelType
    from mindspeed_ms.legacy.model.gpt_model import GPTModel
    from mindspeed_ms.legacy.model.transformer import ParallelTransformer
    config = TransformerConfig()  # assembling a config (the lab does) may leave the sizes unset
    assert config.missing_required()
    with pytest.raises(ConfigValueError) as info:
        GPTModel(config, num_tokentypes=0, parallel_output=True, pre_process=True, post_process=True)
    text = str(info.value)
    assert "GPTModel" in text and all(name in text for name in ("vocab_size", "num_layers", "num_attention_heads",
                                                                    "hidden_size"))
    partial = TransformerConfig(vocab_size=32, num_attention_heads=2, hidden_size=8)
    with pytest.raises(ConfigValueError, match=r"ParallelTransformer needs the required model_config fields "
                                               r"num_layers,"):
        ParallelTransformer(partial, ModelType.encoder_or_decoder)
    # once the sizes are there the same config builds a model
    partial.num_layers = 1
    model = GPTModel(partial, num_tokentypes=0, parallel_output=True, pre_process=True, post_process=True)
    assert len(list(model.get_parameters())) > 0


# ---- warm-up vs decay (the scheduler's rule, checked when the config is built) -------------------

@pytest.mark.parametrize("style", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup, decay, iters", [(2, None, 2), (1, None, 2), (2, 2, 10), (2, 3, 10), (3, 2, 10)])
def test_config_and_scheduler_agree_on_warmup_and_decay(style, warmup, decay, iters):
    import mindspore as ms
    from mindspeed_ms.core.optimizer import OptimizerParamScheduler, get_megatron_optimizer
    section = {"optimizer_config": {"lr_decay_style": style, "lr_warmup_iters": warmup, "lr_decay_iters": decay,
                                    "learning_rate": 1e-3},
               "training_config": {"training_iters": iters}}
    try:
        config = init_configs_from_dict(section)
    except ValueError as exc:
        assert "lr_warmup_iters" in str(exc)
        config = None
    # the trainer's scheduler, with the trainer's default for lr_decay_iters
    oc = init_configs_from_dict({}).optimizer_config
    optimizer = get_megatron_optimizer(oc, [ms.Parameter(ms.Tensor([1.0], ms.float32), name="w")], None)
    try:
        OptimizerParamScheduler(optimizer, max_lr=1e-3, min_lr=0.0, lr_warmup_iters=warmup,
                                lr_decay_iters=decay or iters, lr_decay_style=style)
        scheduler_ok = True
    except ValueError:
        scheduler_ok = False
    if config is not None:
        assert scheduler_ok  # nothing accepted fails when training starts
    if style != "constant":
        assert (config is not None) == scheduler_ok
    # (a constant schedule ignores lr_decay_iters; the config still refuses a warm-up longer than it)
