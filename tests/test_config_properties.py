"""Property tests: random and malformed values, sections and YAML never crash deep inside.

Every failure must be a ValueError/TypeError that says what is wrong; every config that is
accepted must survive the dict and YAML round trip unchanged.
"""

import math
import os
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mindspeed_ms.core.config import (
    SECTIONS,
    AllConfig,
    ConfigTypeError,
    ConfigValueError,
    field_specs,
    init_configs_from_dict,
    init_configs_from_yaml,
    validate_field,
)

# CONFIG_HYPOTHESIS_EXAMPLES raises the budget for a longer hunt.
SETTINGS = settings(max_examples=int(os.environ.get("CONFIG_HYPOTHESIS_EXAMPLES", "100")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

ALL_SPECS = [spec for section in SECTIONS for spec in field_specs(section, include_virtual=True)]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.sampled_from([2 ** 1100, -2 ** 1100]), st.builds(lambda: 10 ** 5000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "none", "true", "False", "1e-3", "2e8", "bf16", "fp32", "z1", "BSH",
                     "[1, 2]", "[[1,2],[3,4]]", "1,3", "rope", "ClipGlobalNorm", "nan", "inf",
                     "-1", "0", "0.5", "AdaptiveLossScaleUpdateCell", "ulysses_cp_algo"]),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=10),
                                                         st.sampled_from(["type", "clip_value",
                                                                          "grad_clip_type",
                                                                          "loss_scale_value",
                                                                          "scale_factor",
                                                                          "scale_window",
                                                                          "pre_tokens",
                                                                          "input_layout"]),
                                                         st.integers()), children, max_size=4),
                               st.tuples(children, children)),
    max_leaves=10)


def dump(data):
    """YAML text of random data (integers too long to print become a plain document)."""
    try:
        return yaml.safe_dump(data)
    except ValueError:
        return "{}"


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


section_keys = {section: [s.name for s in field_specs(section, include_virtual=True)]
                + [a for s in field_specs(section, include_virtual=True) for a in s.aliases]
                for section in SECTIONS}


@st.composite
def random_layout(draw):
    data = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS) + ["runner_config",
                                                                    "runner_wrapper", "model",
                                                                    "junk"]),
                                 max_size=4, unique=True)):
        keys = section_keys.get(section, ["gradient_accumulation_steps", "batch_size",
                                          "use_clip_grad", "model_config", "type"])
        data[section] = draw(st.one_of(
            st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), anything,
                            max_size=5),
            anything))
    return data


@SETTINGS
@given(data=random_layout())
def test_random_sections(data):
    try:
        config = quiet(init_configs_from_dict, data)
    except (ValueError, TypeError) as err:
        assert str(err)
        return
    assert quiet(init_configs_from_dict, config.to_dict()) == config


@st.composite
def valid_value(draw, spec):
    if spec.choices is not None:
        return draw(st.sampled_from(spec.choices))
    if spec.python_type is bool:
        return draw(st.booleans())
    if spec.python_type is int and spec.type in ("int", "Optional[int]"):
        low = int(spec.min_value) if spec.min_value is not None else 0
        high = int(spec.max_value) if spec.max_value is not None else low + 64
        value = draw(st.integers(min_value=low, max_value=high))
        return None if spec.nullable and draw(st.booleans()) else value
    if spec.python_type is float:
        low = spec.min_value if spec.min_value is not None else 0.0
        high = spec.max_value if spec.max_value is not None else low + 10.0
        value = draw(st.floats(min_value=low, max_value=high, exclude_min=not spec.min_inclusive,
                               exclude_max=not spec.max_inclusive, allow_nan=False))
        return None if spec.nullable and draw(st.booleans()) else value
    if spec.python_type is str and spec.type in ("str", "Optional[str]"):
        return draw(st.text(max_size=8))
    return spec.default


@st.composite
def near_value(draw, spec):
    base = draw(valid_value(spec))
    if isinstance(base, bool) or base is None:
        return draw(st.sampled_from([None, 0, 1, "yes", "off", 2]))
    if isinstance(base, (int, float)):
        edge = [spec.min_value, spec.max_value, 0, -1]
        delta = draw(st.sampled_from([-1, -0.5, 0, 0.5, 1, 1e-12]))
        pick = draw(st.sampled_from([e for e in edge if e is not None] + [base]))
        value = pick + delta
        return draw(st.sampled_from([value, str(value), int(value) if math.isfinite(value) else 0]))
    if isinstance(base, str):
        return draw(st.sampled_from([base.upper(), base + " ", " " + base, base[:-1], ""]))
    return base


@st.composite
def valid_layout(draw):
    data = {}
    for section in SECTIONS:
        specs = [s for s in field_specs(section) if draw(st.integers(0, 7)) == 0]
        data[section] = {s.name: draw(valid_value(s)) for s in specs}
    return data


@SETTINGS
@given(spec=st.sampled_from(ALL_SPECS), data=st.data())
def test_any_value_for_any_field(spec, data):
    # Half arbitrary data, half values near the allowed ones (right type, edge of the range).
    value = data.draw(st.one_of(anything, valid_value(spec), near_value(spec)))
    try:
        checked = validate_field(spec.section, spec.name, value)
    except (ConfigValueError, ConfigTypeError) as err:
        text = str(err)
        assert text.startswith(f"{spec.config}.{spec.name}: got ") and "allowed:" in text
        return
    # Accepted values are stable: checking them again changes nothing.
    again = validate_field(spec.section, spec.name, checked)
    assert again == checked or (isinstance(again, float) and math.isnan(again))
    try:
        config = quiet(AllConfig, **{spec.section: {spec.name: value}})
    except (ConfigValueError, ConfigTypeError, ValueError, TypeError):
        return  # a cross-field rule (with a clear message) rejected the combination
    assert quiet(init_configs_from_dict, yaml.safe_load(quiet(config.to_yaml))) == config


@SETTINGS
@given(data=valid_layout())
def test_valid_random_configs_round_trip(tmp_path_factory, data):
    try:
        config = quiet(init_configs_from_dict, data)
    except (ConfigValueError, ValueError) as err:
        assert str(err)  # cross-field rules may reject a random combination, clearly
        return
    path = tmp_path_factory.mktemp("rt") / "config.yaml"
    config.to_yaml(str(path))
    assert init_configs_from_yaml(str(path)) == config
    assert init_configs_from_dict(config.to_dict()).to_dict() == config.to_dict()


@SETTINGS
@given(text=st.one_of(
    st.text(max_size=200),
    st.builds(lambda d: dump(d), anything),
    st.builds(lambda d: dump(d), random_layout()),
    st.sampled_from(["model_config: {hidden_size: }", ":", "- [", "a: !!python/name:os.system",
                     "training_config: &a [*a]", "\t\x00", "model_config: {vocab_size: 1e400}",
                     "? [1, 2]\n: 3", "dataset_config: {split: '1,,2'}"])))
def test_malformed_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        quiet(init_configs_from_yaml, str(path))
    except (ValueError, TypeError) as err:
        assert str(err)


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00junk", b"model_config: {a: 1}\n\x80"])
def test_binary_files(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_bytes(raw)
    with pytest.raises(ValueError):
        init_configs_from_yaml(str(path))
