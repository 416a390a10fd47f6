"""Every config field has exactly one status (works / device-bound / refused), checked against the code.

* works: each listed reader file exists outside ``core/config`` and reads the attribute
  (``x.name`` or the string ``"name"`` appears in its code, not only in a docstring or comment);
* device-bound: asking for the feature on CPU logs exactly one line naming the field and the
  device, and nothing on Ascend or at the default;
* refused: a value other than the default raises ConfigValueError naming the field, both when the
  config is loaded and when the field is assigned later (the config is left unchanged);
* the table in docs/config.md is the generated one.
"""

import ast
import logging
import os
import re
import warnings

import pytest
from _logs import LogLines

from mindspeed_ms.core.config import (
    AllConfig,
    ConfigValueError,
    TransformerConfig,
    field_spec,
    field_specs,
)
from mindspeed_ms.core.config import effects
from mindspeed_ms.core.config.base import iter_config_classes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fields whose implementation other work on issue 16 owns and that had not landed when the
# registry was written: they have no status yet. This set must only shrink; the test prints it
# so that it is never forgotten (a field listed here and registered too is an error).
PENDING = set()

# Required model fields, so that a TransformerConfig can be built for the checks below.
_MODEL_BASE = dict(num_layers=2, hidden_size=8, num_attention_heads=2, vocab_size=32)


def _all_specs():
    return field_specs(AllConfig, include_virtual=True)


def _base_kwargs(cls):
    return dict(_MODEL_BASE) if cls is TransformerConfig else {}


def _class_of(section):
    for cls in iter_config_classes():
        if cls.section == section:
            return cls
    raise AssertionError(f"no config class for section {section!r}")


def _non_default(spec, accept=None, config=None):
    """A value of the field's kind that differs from its default (and that ``accept`` refuses)."""
    default = spec.default
    candidates = []
    if spec.choices is not None:
        candidates = [c for c in spec.choices if c is not None and c != default]
    if not candidates:
        if spec.python_type is bool:
            candidates = [not default]
        elif spec.python_type is int:
            low = int(spec.min_value) if spec.min_value is not None else 0
            candidates = [max(low, (default or 0)) + 3, max(low, (default or 0)) + 1]
        elif spec.python_type is float or spec.python_type == (int, float):
            candidates = [(default or 0) + 0.5]
        elif spec.python_type is str:
            candidates = ["something_else"]
        else:
            candidates = [[1]]
    for value in candidates:
        if accept is None or not accept(value, config):
            return value
    raise AssertionError(f"no non-default value for {spec.section}.{spec.name}")


# ---------------------------------------------------------------------------------------------
# Every field has one status
# ---------------------------------------------------------------------------------------------

def test_every_field_of_every_config_class_has_a_status():
    keys = {(spec.section, spec.name) for spec in _all_specs()}
    # Every registered config class is one of the sections (nothing escapes the enumeration).
    for cls in iter_config_classes():
        for spec in cls.field_specs(include_virtual=True):
            keys.add((spec.section, spec.name))
    missing = sorted(key for key in keys if effects.effect_of(*key) is None and key not in PENDING)
    assert not missing, f"fields without a status (works/device_bound/refused): {missing}"
    if PENDING:
        shown = ", ".join(f"{s}.{n}" for s, n in sorted(PENDING))
        print(f"\nPENDING (no status yet, owned by other work): {shown}")
        warnings.warn(f"field status PENDING for {len(PENDING)} fields: {shown}")


def test_pending_fields_are_real_and_not_registered():
    keys = {(spec.section, spec.name) for spec in _all_specs()}
    assert PENDING <= keys, f"PENDING names fields that do not exist: {sorted(PENDING - keys)}"
    both = sorted(key for key in PENDING if effects.effect_of(*key) is not None)
    assert not both, f"fields both PENDING and registered (drop them from PENDING): {both}"


def test_registry_names_only_real_fields_with_known_statuses():
    keys = {(spec.section, spec.name) for spec in _all_specs()}
    stale = sorted(set(effects.EFFECTS) - keys)
    assert not stale, f"registry entries for fields that do not exist: {stale}"
    for key, effect in effects.EFFECTS.items():
        assert effect.status in effects.STATUSES, key
        if effect.status == "works":
            assert effect.readers, f"{key}: works without readers"
        else:
            assert effect.note, f"{key}: {effect.status} without a note"


def test_field_spec_exposes_the_effect():
    assert field_spec("model_config", "apply_rope_fusion").effect.status == "device_bound"
    assert field_spec("model_config", "use_query_layer").effect.status == "refused"
    # Aliases resolve to the field, and virtual spellings have a status too.
    assert field_spec("model_config", "use_fused_swiglu").effect.status == "device_bound"
    assert field_spec("training_config", "gradient_accumulation_steps").effect.status == "works"


# ---------------------------------------------------------------------------------------------
# works: the readers really read the field
# ---------------------------------------------------------------------------------------------

def _names_read(path):
    """Attribute names (``x.name``) and string constants (``getattr(c, "name")``) in the code.

    Parsed, so that a name mentioned only in a docstring or a comment does not count.
    """
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


# works: every field; device-bound: those with an Ascend path (the files that take it).
_WORKS = [(s.section, s.name, s.kind) for s in _all_specs()
          if (effects.effect_of(s.section, s.name) or effects.Effect("none")).readers]


def test_every_works_field_names_readers():
    for spec in _all_specs():
        effect = effects.effect_of(spec.section, spec.name)
        if effect is not None and effect.status == "works":
            assert effect.readers, f"{spec.section}.{spec.name}"


@pytest.mark.parametrize("section,name,kind", _WORKS, ids=[f"{s}.{n}" for s, n, _ in _WORKS])
def test_readers_read_the_field(section, name, kind):
    effect = effects.effect_of(section, name)
    names = effect.via or (name,)
    if kind == "virtual":
        spec = field_spec(section, name)
        targets = {t.split(".", 1)[1] for t in spec.targets}
        assert set(effect.via) <= targets, (
            f"{section}.{name}: via {effect.via} must be among the fields it writes {sorted(targets)}")
    for reader in effect.readers:
        assert "core/config" not in reader, f"{section}.{name}: {reader} is the config itself"
        path = os.path.join(REPO, reader)
        assert os.path.isfile(path), f"{section}.{name}: reader {reader} does not exist"
        read = _names_read(path)
        for attr in names:
            assert attr in read, f"{section}.{name}: {reader} never reads {attr!r}"


# ---------------------------------------------------------------------------------------------
# device-bound: logged once on CPU
# ---------------------------------------------------------------------------------------------

_DEVICE = [(s.section, s.name) for s in _all_specs()
           if (effects.effect_of(s.section, s.name) or effects.Effect("none")).status
           == "device_bound"]


def _capture_logger(tag):
    logger = logging.getLogger(f"test_field_effects.{tag}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = LogLines(logging.DEBUG)
    logger.handlers = [handler]
    return logger, handler


@pytest.mark.parametrize("section,name", _DEVICE, ids=[f"{s}.{n}" for s, n in _DEVICE])
def test_device_bound_field_logs_once_on_cpu(section, name, monkeypatch):
    monkeypatch.setattr(effects, "_REPORTED", set())
    spec = field_spec(section, name)
    effect = effects.effect_of(section, name)
    cls = _class_of(section)
    value = effect.trigger if effect.has_trigger else _non_default(spec)
    logger, records = _capture_logger(name)

    # At the default (not set by the user) nothing is reported.
    assert effects.report_device_bound(cls(**_base_kwargs(cls)), "CPU", logger) == []
    assert records.lines == []

    config = cls(**_base_kwargs(cls), **{name: value})
    if effect.readers:
        # On Ascend the field takes its Ascend path: nothing to report.
        assert effects.report_device_bound(config, "Ascend", logger) == []
    else:
        # No Ascend implementation here: on Ascend too the user is told it does nothing.
        assert effects.report_device_bound(config, "Ascend", logger) == [f"{section}.{name}"]
        assert effects.report_device_bound(config, "Ascend", logger) == []
        assert "Ascend" in records.lines.pop() and "no Ascend implementation" in effect.note
    assert effects.report_device_bound(config, "CPU", logger) == [f"{section}.{name}"]
    # A second model build or trainer start does not repeat it.
    assert effects.report_device_bound(config, "CPU", logger) == []
    assert effects.report_device_bound(AllConfig(**{section: config}), "CPU", logger) == []
    assert len(records.lines) == 1, records.lines
    message = records.lines[0]
    assert f"{section}.{name}" in message and "CPU" in message and "no effect" in message


def test_trainer_reports_device_bound_fields_through_the_device_query():
    # The trainer asks the communication layer's device query (no backend knowledge above it).
    with open(os.path.join(REPO, "mindspeed_ms/training/training.py"), encoding="utf-8") as handle:
        text = handle.read()
    assert re.search(r"report_device_bound\(all_config, comm\.device_target\(\)", text)


# ---------------------------------------------------------------------------------------------
# refused: a non-default value raises at load time
# ---------------------------------------------------------------------------------------------

_REFUSED = [(s.section, s.name) for s in _all_specs()
            if (effects.effect_of(s.section, s.name) or effects.Effect("none")).status == "refused"]


@pytest.mark.parametrize("section,name", _REFUSED, ids=[f"{s}.{n}" for s, n in _REFUSED])
def test_refused_field_raises_when_set(section, name):
    spec = field_spec(section, name)
    effect = effects.effect_of(section, name)
    cls = _class_of(section)
    base = cls(**_base_kwargs(cls))  # left at the default: accepted
    value = _non_default(spec, effect.accept, base)

    with pytest.raises(ConfigValueError) as err:
        cls.from_dict({**_base_kwargs(cls), name: value})
    assert err.value.field == name
    assert name in str(err.value)

    before = base.to_dict()
    with pytest.raises(ConfigValueError) as err:
        setattr(base, name, value)
    assert err.value.field == name
    assert base.to_dict() == before

    # The default itself, given explicitly, is accepted.
    if spec.kind == "value":
        cls(**_base_kwargs(cls), **{name: spec.default})


def test_refusals_accept_the_values_that_mean_the_same():
    config = TransformerConfig(**_MODEL_BASE, encoder_num_layers=2, out_hidden_size=8)
    assert config.encoder_num_layers == 2 and config.out_hidden_size == 8
    with pytest.raises(ConfigValueError, match="encoder_num_layers"):
        TransformerConfig(**_MODEL_BASE, encoder_num_layers=3)
    with pytest.raises(ConfigValueError, match="rotary_interleaved"):
        TransformerConfig(**_MODEL_BASE, rotary_config={"rotary_interleaved": True})


# ---------------------------------------------------------------------------------------------
# The generated table
# ---------------------------------------------------------------------------------------------

def test_docs_config_table_is_up_to_date():
    path = os.path.join(REPO, "docs", "config.md")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    assert effects.TABLE_BEGIN in text, "docs/config.md has no field-status table"
    assert effects.update_markdown(text) == text, (
        "docs/config.md is stale: run python -m mindspeed_ms.core.config.effects --write docs/config.md")


def test_table_counts_every_field():
    table = effects.markdown_table()
    specs = _all_specs()
    assert table.count("\n| ") == len(specs) + 1  # the header row and one row per field
    counts = {status: 0 for status in effects.STATUSES}
    for spec in specs:
        effect = effects.effect_of(spec.section, spec.name)
        if effect is not None:
            counts[effect.status] += 1
    assert f"**{counts['works']} work**" in table
    assert f"**{counts['refused']} refused**" in table


# ---------------------------------------------------------------------------------------------
# add_bias_linear: Megatron's switch for every linear layer, mapped onto the per-linear switches
# ---------------------------------------------------------------------------------------------

def _linear_biases(**overrides):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    ps.destroy_model_parallel()
    config = TransformerConfig(vocab_size=32, num_layers=1, num_attention_heads=2, hidden_size=8,
                               ffn_hidden_size=16, seq_length=8, **overrides)
    model = GPTModel(config)
    names = [p.name for p in model.get_parameters() if p.name.endswith(".bias") and "norm" not in p.name]
    return sorted(name.rsplit(".", 2)[-2] for name in names)


def test_add_bias_linear_switches_the_bias_of_every_linear_layer():
    every = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    assert _linear_biases() == every
    assert _linear_biases(add_bias_linear=False) == []
    assert _linear_biases(add_bias_linear=True) == every
    # A per-linear switch given explicitly wins over the umbrella switch.
    assert _linear_biases(add_bias_linear=False, mlp_has_bias=True) == ["dense_4h_to_h", "dense_h_to_4h"]
    config = TransformerConfig(**_MODEL_BASE, add_bias_linear=False, qkv_has_bias=True)
    config.add_bias_linear = True  # later changes follow too
    assert (config.qkv_has_bias, config.out_proj_has_bias, config.mlp_has_bias) == (True, True, True)
    assert TransformerConfig.from_dict(config.to_dict()) == config


def test_megatron_arguments_with_a_refused_value_are_refused_by_name():
    import argparse  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import init_configs_from_args  # pylint: disable=import-outside-toplevel

    base = dict(num_layers=2, hidden_size=8, num_attention_heads=2, padded_vocab_size=32,
                seq_length=8, micro_batch_size=1)
    init_configs_from_args(argparse.Namespace(**base, profile_op_time=True))
    with pytest.raises(ConfigValueError) as err:
        init_configs_from_args(argparse.Namespace(**base, profile_op_time=False))
    assert err.value.field == "profile_op_time"
    with pytest.raises(ConfigValueError) as err:
        init_configs_from_args(argparse.Namespace(**base, rotary_interleaved=True))
    assert err.value.field == "rotary_interleaved"
    # Megatron's default bias switch (on) is accepted and means bias on every linear layer.
    model = init_configs_from_args(argparse.Namespace(**base, add_bias_linear=True)).model_config
    assert (model.qkv_has_bias, model.out_proj_has_bias, model.mlp_has_bias) == (True, True, True)


# ---------------------------------------------------------------------------------------------
# layer_type of the transformer layers: decoder (cross-attention) layers are refused by name
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_type", ["decoder", "retro_encoder", "retro_decoder"])
def test_decoder_layer_types_are_refused_naming_layer_type(layer_type):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.enums import LayerType, ModelType  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.transformer import (  # pylint: disable=import-outside-toplevel
        ParallelTransformer, ParallelTransformerLayer)

    ms.set_device("CPU")
    config = TransformerConfig(**_MODEL_BASE, ffn_hidden_size=16, seq_length=8)
    ParallelTransformerLayer(config, 1, LayerType.encoder)  # the supported kind builds
    with pytest.raises(ConfigValueError) as err:
        ParallelTransformerLayer(config, 1, getattr(LayerType, layer_type))
    assert err.value.field == "layer_type" and "cross-attention" in str(err.value)
    with pytest.raises(ConfigValueError, match="layer_type"):
        ParallelTransformer(config, ModelType.encoder_or_decoder, layer_type=getattr(LayerType, layer_type))


# ---------------------------------------------------------------------------------------------
# A training run on CPU with device-bound switches: same losses, each switch named once
# ---------------------------------------------------------------------------------------------

def test_training_with_device_bound_switches_logs_each_once_and_trains_the_same(tmp_path, capsys,
                                                                                 monkeypatch):
    import training_configs as T  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(effects, "_REPORTED", set())
    switches = dict(training_config={"training_iters": 3, "overlap_grad_reduce": True},
                    model_config={"apply_swiglu_fusion": True, "apply_rope_fusion": True,
                                  "hidden_act": "swiglu", "position_embedding_type": "rope"},
                    optimizer_config={"overlap_param_gather": True})
    plain = dict(training_config={"training_iters": 3},
                 model_config={"hidden_act": "swiglu", "position_embedding_type": "rope"})
    with_switches = [s["loss"] for s in T.run(T.make(tmp_path / "a", **switches))]
    # A second trainer in the same process does not repeat the lines.
    T.run(T.make(tmp_path / "b", **switches))
    log = capsys.readouterr().out
    without = [s["loss"] for s in T.run(T.make(tmp_path / "c", **plain))]
    assert with_switches == without
    for name in ("training_config.overlap_grad_reduce", "model_config.apply_swiglu_fusion",
                 "model_config.apply_rope_fusion", "optimizer_config.overlap_param_gather"):
        lines = [line for line in log.splitlines() if f"{name}=True has no effect on CPU" in line]
        assert len(lines) == 1, (name, lines)


# ---------------------------------------------------------------------------------------------
# Fields implemented for some values only (e.g. zero_level: z1 works, z2/z3 refused)
# ---------------------------------------------------------------------------------------------

_PARTIAL = [(section, name) for (section, name), effect in sorted(effects.EFFECTS.items())
            if effect.status == "works" and effect.accept is not None]


@pytest.mark.parametrize("section,name", _PARTIAL, ids=[f"{s}.{n}" for s, n in _PARTIAL])
def test_partially_implemented_field_refuses_the_rest(section, name):
    spec = field_spec(section, name)
    effect = effects.effect_of(section, name)
    cls = _class_of(section)
    base = cls(**_base_kwargs(cls))
    value = _non_default(spec, effect.accept, base)
    with pytest.raises(ConfigValueError) as err:
        cls.from_dict({**_base_kwargs(cls), name: value})
    assert err.value.field == name and effect.allowed in str(err.value)


def test_zero_level_z1_is_the_distributed_optimizer(tmp_path, monkeypatch):
    import training_configs as T  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.training import training as training_module  # pylint: disable=import-outside-toplevel

    for level in ("z2", "z3"):
        with pytest.raises(ConfigValueError, match="zero_level"):
            T.run(T.make(tmp_path / level, parallel_config={"zero_level": level}))
    built = []
    original = training_module.get_megatron_optimizer

    def spy(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        built.append((kwargs.get("use_distributed_optimizer"), type(optimizer).__name__))
        return optimizer

    monkeypatch.setattr(training_module, "get_megatron_optimizer", spy)
    z1 = [s["loss"] for s in T.run(T.make(tmp_path / "z1", training_config={"training_iters": 3},
                                          parallel_config={"zero_level": "z1"}))]
    do = [s["loss"] for s in T.run(T.make(tmp_path / "do", training_config={
        "training_iters": 3, "use_distributed_optimizer": True}))]
    T.run(T.make(tmp_path / "plain", training_config={"training_iters": 3}))
    assert z1 == do
    assert built[0] == built[1] and built[0][0] is True
    assert built[2][0] is False and built[2][1] != built[0][1]


# ---------------------------------------------------------------------------------------------
# The Ascend path of the fused-kernel switches (apply_swiglu_fusion, apply_rope_fusion)
# ---------------------------------------------------------------------------------------------

def test_fusion_switches_take_the_fused_kernels_on_ascend_only(monkeypatch):
    """On Ascend the switches call MindSpore's fused kernels; on CPU they are not called at all.

    CPU has no such kernels ("kernel Swiglu unregistered"), so the Ascend run is emulated: the
    device query answers 'Ascend' and the two kernels are replaced by their documented formulas
    (swiglu: silu(first half) * second half; rotary_position_embedding mode 0 with cos/sin of
    shape (1, 1, S, D): x * cos + rotate_half(x) * sin). The fused model must then give exactly the
    unfused model's loss and gradients, with the kernels called once per layer (twice for rope).
    """
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor, ops  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import ModelParallelConfig  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model import transformer as transformer_module  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    ps.destroy_model_parallel()
    calls = []
    seq, batch, layers, heads, hidden = 8, 2, 2, 2, 16

    def fake_swiglu(x, dim=-1):
        calls.append("swiglu")
        gate, value = ops.chunk(x, 2, axis=dim)
        return ops.silu(gate) * value

    def fake_rope(x, cos, sin, mode=0):
        assert mode == 0 and tuple(cos.shape) == (1, 1, seq, hidden // heads) == tuple(sin.shape)
        calls.append("rope")
        x1, x2 = ops.chunk(x, 2, axis=-1)
        return x * cos + ops.concat([-x2, x1], axis=-1) * sin

    monkeypatch.setattr(ops, "swiglu", fake_swiglu, raising=False)
    monkeypatch.setattr(ops, "rotary_position_embedding", fake_rope, raising=False)
    rng = np.random.default_rng(3)
    tokens = Tensor(rng.integers(0, 32, (batch, seq)).astype(np.int32))
    labels = Tensor(rng.integers(0, 32, (batch, seq)).astype(np.int32))
    mask = Tensor(np.ones((batch, seq), np.float32))

    def loss_and_grads(device, **switches):
        monkeypatch.setattr(transformer_module, "device_target", lambda: device)
        config = TransformerConfig(
            vocab_size=32, num_layers=layers, num_attention_heads=heads, hidden_size=hidden,
            ffn_hidden_size=32, seq_length=seq, hidden_act="swiglu", position_embedding_type="rope",
            parallel_config=ModelParallelConfig(use_cpu_initialization=True), **switches)
        model = GPTModel(config)
        params = model.trainable_params()
        loss, grads = ms.value_and_grad(lambda: model(tokens, None, None, mask, labels=labels), None, params)()
        return float(loss.asnumpy()), [g.asnumpy() for g in grads]

    fused = dict(apply_swiglu_fusion=True, apply_rope_fusion=True)
    plain_loss, plain_grads = loss_and_grads("Ascend")
    assert calls == []
    loss_and_grads("CPU", **fused)
    assert calls == []  # CPU: the switches do nothing
    ascend_loss, ascend_grads = loss_and_grads("Ascend", **fused)
    assert calls.count("swiglu") == layers and calls.count("rope") == 2 * layers
    assert abs(ascend_loss - plain_loss) < 1e-6
    for a, b in zip(ascend_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_model_built_directly_names_its_device_bound_switches_once(monkeypatch):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import ModelParallelConfig  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    ps.destroy_model_parallel()
    monkeypatch.setattr(effects, "_REPORTED", set())
    handler = LogLines(logging.DEBUG)
    logger = logging.getLogger("mindspeed_ms")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        for _ in range(2):
            # the linked parallel config's switch is named too
            GPTModel(TransformerConfig(**_MODEL_BASE, ffn_hidden_size=16, seq_length=8,
                                       apply_rope_fusion=True,
                                       parallel_config=ModelParallelConfig(gradient_accumulation_fusion=True)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    named = [m for m in handler.lines if "has no effect on CPU" in m]
    assert len(named) == 2, named
    assert any("model_config.apply_rope_fusion" in m for m in named)
    assert any("parallel_config.gradient_accumulation_fusion" in m for m in named)


def test_zero_level_z1_follows_the_distributed_optimizer_rules():
    import training_configs as T  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core.config import init_configs_from_dict, validate_for_world_size  # pylint: disable=import-outside-toplevel

    sgd = {"optimizer_type": "SGD"}
    validate_for_world_size(init_configs_from_dict(T.make("/tmp/unused", optimizer_config=sgd)), 1)
    config = init_configs_from_dict(T.make("/tmp/unused", parallel_config={"zero_level": "z1"},
                                           optimizer_config=sgd))
    # the distributed optimizer's rule applies (z1 turns it on in the trainer)
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        validate_for_world_size(config, 1)
