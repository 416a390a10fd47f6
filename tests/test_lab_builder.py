"""mindspeed_lab.builder.ConfigBuilder driven from code and through its widgets (no browser).

Setting a widget's ``value`` is what typing into it does in the browser: the observers run, the
message next to the widget and the YAML preview change.
"""

import ipywidgets as widgets
import pytest
import yaml

from mindspeed_ms.core.config import SECTIONS, field_specs, init_configs_from_dict
from mindspeed_lab import presets
from mindspeed_lab.builder import SECTION_TITLES, WORKERS_KEY, ConfigBuilder
from mindspeed_lab.launcher import ASCEND_ENV_DEFAULTS


@pytest.fixture(scope="module")
def built():
    """One builder with every section's widgets built (building them takes a few seconds)."""
    builder = ConfigBuilder("tiny", workers=2)
    for section in SECTIONS:
        builder.widget_for(builder.fields(section)[0])
    return builder


def preview(builder):
    return builder.yaml_preview.value


def test_every_field_of_the_metadata_has_a_widget_of_the_right_kind(built):
    tabs = built.ui.children[3]
    assert isinstance(tabs, widgets.Tab)
    assert list(tabs.titles) == [SECTION_TITLES.get(s, s) for s in built._specs]  # pylint: disable=protected-access
    kinds = {"bool": widgets.Checkbox, "int": widgets.IntText, "float": widgets.FloatText}
    for section in SECTIONS:
        specs = field_specs(section)
        assert built.fields(section) == [f"{section}.{spec.name}" for spec in specs]
        for spec in specs:
            widget = built.widget_for(section, spec.name)
            assert widget.description == spec.name
            assert widget.tooltip == (spec.help or spec.allowed)
            if spec.choices:
                assert isinstance(widget, widgets.Dropdown)
                assert list(widget.options) == ["None" if c is None else str(c) for c in spec.choices]
            elif not spec.nullable and spec.python_type in (bool, int, float):
                assert isinstance(widget, kinds[spec.python_type.__name__]), spec.name
            else:
                assert isinstance(widget, widgets.Text), spec.name
            if spec.derived_default:
                assert widget.placeholder.startswith(spec.derived_default)
    # grouped by the metadata's topic inside each section
    model_groups = built.ui.children[3].children[0].children[0]
    assert isinstance(model_groups, widgets.Accordion)
    assert list(model_groups.titles) == list(dict.fromkeys(s.group for s in field_specs("model_config")))


def test_typing_values_shows_messages_next_to_the_widget_and_changes_the_yaml():
    b = ConfigBuilder("tiny", workers=2)
    hidden = b.widget_for("model_config.hidden_size")
    message = b.message_widget("model_config.hidden_size")
    assert message.value == "" and "hidden_size: 32" in preview(b)

    hidden.value = "-4"
    assert "TransformerConfig.hidden_size: got -4; allowed:" in message.value
    assert b.get("model_config.hidden_size") == -4  # the widget keeps what was typed
    assert b.config.model_config.hidden_size == 32  # the config keeps the last accepted value
    assert "hidden_size: 32" in preview(b) and "not included (rejected): model_config.hidden_size" in preview(b)
    assert not b.ok and b.problems()[0].startswith("model_config.hidden_size:")

    hidden.value = "[1"
    assert "got '[1'" in b.message("model_config.hidden_size") and "not valid YAML" in message.value

    hidden.value = "48"
    assert message.value == "" and b.ok
    assert "hidden_size: 48" in preview(b) and b.config.model_config.hidden_size == 48

    # dropdowns (None is a real choice), checkboxes and YAML-valued texts
    zero = b.widget_for("parallel_config.zero_level")
    assert zero.value == "None"
    zero.value = "z1"
    assert b.get("parallel_config.zero_level") == "z1" and "zero_level: z1" in preview(b)
    zero.value = "None"
    assert b.get("parallel_config.zero_level") is None and "zero_level" not in preview(b)
    betas = b.widget_for("optimizer_config.betas")
    assert betas.value == "[0.9, 0.99]"
    betas.value = "[0.9, 0.95]"
    assert b.config.optimizer_config.betas == (0.9, 0.95)
    clip = b.widget_for("training_config.grad_clip_kwargs")
    assert clip.value == "{grad_clip_type: ClipGlobalNorm, clip_value: 1.0}"

    # a cross-field rule of the config: fp16 and bf16 exclude each other
    b.widget_for("training_config.bf16").value = True
    b.widget_for("training_config.fp16").value = True
    assert "fp16 and bf16 are exclusive" in b.message("training_config.fp16")
    assert b.config.training_config.fp16 is False
    b.widget_for("training_config.bf16").value = False  # the kept fp16 value is retried and now fits
    assert b.config.training_config.fp16 is True and b.message("training_config.fp16") == ""
    assert b.widget_for("training_config.fp16").value is True

    # a derived default: empty text is None, the placeholder says what it reads as
    ffn = b.widget_for("model_config.ffn_hidden_size")
    ffn.value = ""
    assert b.get("model_config.ffn_hidden_size") is None and b.resolved("model_config.ffn_hidden_size") == 4 * 48
    assert ffn.placeholder == "4 * hidden_size = 192"


def test_world_size_checks_for_the_chosen_workers():
    b = ConfigBuilder("tiny", workers=2)
    workers = b.widget_for(WORKERS_KEY)
    b.widget_for("parallel_config.tensor_model_parallel_size").value = 2
    assert b.ok and b.world_info["data_parallel_size"] == 1
    workers.value = 3  # tp*pp*cp = 2 does not divide 3: no field named, so it shows at the workers input
    assert "for 3 workers: tensor x pipeline x context parallel size (2 x 1 x 1 = 2) must divide the world size 3" \
        in b.message_widget(WORKERS_KEY).value
    assert "problem(s)" in b._status_widget.value  # pylint: disable=protected-access
    workers.value = 4
    assert b.ok and b.world_info["data_parallel_size"] == 2

    # heads vs tensor parallel: shown next to both fields the problem names
    b.widget_for("model_config.num_attention_heads").value = "2"
    b.widget_for("model_config.hidden_size").value = "32"
    b.widget_for("parallel_config.tensor_model_parallel_size").value = 4
    assert "num_attention_heads=2 must be divisible by tensor_model_parallel_size=4" in \
        b.message("model_config.num_attention_heads")
    assert "num_attention_heads=2" in b.message("parallel_config.tensor_model_parallel_size")
    b.widget_for("parallel_config.tensor_model_parallel_size").value = 1

    # experts vs expert parallelism
    b.widget_for("parallel_config.expert_model_parallel_size").value = 2
    assert "needs MoE (moe_config.num_experts > 1)" in b.message("moe_config.num_experts")
    b.widget_for("moe_config.num_experts").value = 3
    assert "moe_config.num_experts=3 must be divisible by expert_model_parallel_size=2" in \
        b.message("moe_config.num_experts")
    assert "moe_config.num_experts=3" in b.message("parallel_config.expert_model_parallel_size")
    b.widget_for("moe_config.num_experts").value = 4
    assert b.ok, b.problems()
    assert b.world_info["data_parallel_size"] == 4


def test_code_api_keys_update_and_retries():
    b = ConfigBuilder("tiny", workers=2)
    assert b.key("hidden_size") == "model_config.hidden_size"
    assert b.key("parallel_config.model_parallel") == "parallel_config.tensor_model_parallel_size"  # alias
    with pytest.raises(ValueError, match="several sections have"):
        b.key("seq_length")
    with pytest.raises(ValueError, match=r"section: got 'nope_config'; allowed: one of \["):
        b.key("nope_config.x")
    with pytest.raises(ValueError, match="model_config: got field 'nonsense'; allowed: one of"):
        b.set("model_config.nonsense", 1)

    # 3 heads do not divide hidden 32: kept aside; once hidden is 48 it is retried and accepted
    assert b.set("model_config.num_attention_heads", 3) is False
    assert "num_attention_heads=3" in b.message("model_config.num_attention_heads")
    assert b.set("model_config.hidden_size", 48) is True
    assert b.get("model_config.num_attention_heads") == 3 and b.messages == {}
    # update(): order does not matter
    result = b.update({"moe_config": {"enable_cold_hot_expert": True, "hot_expert_num": 2, "num_experts": 4}})
    assert result["moe_config.enable_cold_hot_expert"] is False  # the capacity factor is missing
    assert "moe_expert_capacity_factor: got None" in b.message("moe_config.enable_cold_hot_expert")
    assert b.set("moe_config.moe_expert_capacity_factor", 1.5) and b.messages == {}
    assert b.config.moe_config.hot_expert_num == 2
    assert b.reset("moe_config.enable_cold_hot_expert") and not b.config.moe_config.enable_cold_hot_expert
    with pytest.raises(ValueError, match="workers: got 0; allowed: an integer >= 1"):
        b.workers = 0
    with pytest.raises(ValueError, match="device_target: got 'TPU'"):
        ConfigBuilder("tiny", device_target="TPU")


def test_yaml_export_import_roundtrip_and_buttons(tmp_path):
    b = ConfigBuilder("demo", workers=2)
    b.set("model_config.num_layers", 3)
    b.set("model_config.hidden_size", -1)  # rejected: not exported
    path = b.save_yaml(tmp_path / "cfg.yaml")
    assert "without the 1 rejected values" in b.status
    data = yaml.safe_load(path.read_text())
    assert data["model_config"]["num_layers"] == 3 and data["model_config"]["hidden_size"] == 64
    assert "lora_config" not in data  # only what differs from the defaults
    assert init_configs_from_dict(data) == b.config
    assert ConfigBuilder(str(path)).config == b.config
    full = ConfigBuilder(b.to_yaml(full=True))  # YAML text works too
    assert full.config == b.config

    # the Export / Import buttons
    c = ConfigBuilder("tiny", workers=2)
    c.ui  # pylint: disable=pointless-statement
    c._path_widget.value = str(tmp_path / "exported.yaml")  # pylint: disable=protected-access
    c._export_button.click()  # pylint: disable=protected-access
    assert (tmp_path / "exported.yaml").is_file() and "exported to" in c.status
    c._path_widget.value = str(path)  # pylint: disable=protected-access
    c._import_button.click()  # pylint: disable=protected-access
    assert c.config == b.config and c.widget_for("model_config.num_layers").value == "3"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_config: {hidden_size: -3}\n")
    c._path_widget.value = str(bad)  # pylint: disable=protected-access
    c._import_button.click()  # pylint: disable=protected-access
    assert c.status.startswith("import failed:") and "hidden_size" in c.status
    assert c.config == b.config  # unchanged
    with pytest.raises(ValueError, match="allowed: a preset"):
        c.load(str(tmp_path / "missing.yaml"))


def test_presets_and_the_moe_switch(monkeypatch):
    names = presets.preset_names()
    assert {"tiny", "demo", "demo_moe", "shakespeare_char_small", "moe_shakespeare"} <= set(names)
    for name in names:
        b = ConfigBuilder(name, workers=2)
        assert b.ok, (name, b.problems())
    assert ConfigBuilder("demo_moe").config.moe_config.num_experts == 4
    assert ConfigBuilder("moe_shakespeare").config.moe_config.num_experts == 8
    b = ConfigBuilder("tiny")
    b.ui  # pylint: disable=pointless-statement
    b._preset_widget.value = "demo"  # pylint: disable=protected-access
    b._preset_button.click()  # pylint: disable=protected-access
    assert b.status == "loaded preset demo" and b.config.model_config.compute_dtype == "float16"
    assert b.widget_for("model_config.compute_dtype").value == "float16"
    with pytest.raises(ValueError, match=r"preset: got 'nope'; allowed: one of \["):
        b.apply_preset("nope")

    small = presets.shrink(presets.load_preset("demo"), 6)
    assert small["training_config"]["training_iters"] == 6 and small["optimizer_config"]["lr_warmup_iters"] == 3
    with pytest.raises(ValueError, match="steps: got 0"):
        presets.shrink({}, 0)
    monkeypatch.setenv(presets.MOE_ENV, "1")
    assert presets.moe_enabled() and presets.demo_preset() == "demo_moe"
    monkeypatch.setenv(presets.MOE_ENV, "0")
    assert presets.demo_preset() == "demo"
    monkeypatch.delenv(presets.MOE_ENV)
    assert presets.moe_enabled() is presets.MOE_TRAINING
    monkeypatch.setenv(presets.SMALL_ENV, "1")
    assert presets.small_mode()


def test_device_target_and_workers_go_to_the_launcher(tmp_path):
    b = ConfigBuilder("tiny", workers=2)
    b.ui  # pylint: disable=pointless-statement
    b._device_widget.value = "Ascend"  # pylint: disable=protected-access
    assert b.device_target == "Ascend"
    job = b.job(runs_root=tmp_path, name="built")  # created, not started
    assert job.workers == 2 and job.device_target == "Ascend" and job.use_msrun
    env = job._worker_env(2)  # pylint: disable=protected-access
    assert env["MINDSPEED_DEVICE_TARGET"] == "Ascend" and env["ASCEND_RT_VISIBLE_DEVICES"] == "0,1"
    for key, value in ASCEND_ENV_DEFAULTS.items():
        assert env[key] == value
    written = init_configs_from_dict(yaml.safe_load(job.config_path.read_text()))
    assert written == b.config
    b.set("parallel_config.tensor_model_parallel_size", 4)
    with pytest.raises(ValueError, match="the config has problems"):
        b.job(runs_root=tmp_path)
    assert b.job(strict=False, runs_root=tmp_path).workers == 2
