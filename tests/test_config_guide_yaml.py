"""The guide's YAML layout and unknown-key hints (issue 16, item 2)."""

import warnings

import pytest

from mindspeed_ms.core.config import TransformerConfig
from mindspeed_ms.core.config.fields import UnknownConfigKeyWarning


def _model(**extra):
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **extra)


def test_unknown_option_close_to_a_field_suggests_it():
    with pytest.warns(UnknownConfigKeyWarning, match="did you mean 'num_attention_heads'"):
        cfg = _model(num_attention_head=3)
    # The seed's **kwargs: the unknown key is kept as an attribute, the real field untouched.
    assert cfg.num_attention_head == 3
    assert cfg.num_attention_heads == 4


def test_unknown_option_far_from_every_field_has_no_suggestion():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _model(zzz_unrelated_knob=1)
    messages = [str(w.message) for w in record if issubclass(w.category, UnknownConfigKeyWarning)]
    assert len(messages) == 1
    assert "did you mean" not in messages[0] and "check the spelling" in messages[0]
