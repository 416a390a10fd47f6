"""Rules of the lazy-inline decision (MindFormers' ENABLE_LAZY_INLINE switches)."""

import pytest

from mindspeed_ms.training.compilation import lazy_inline_decision


@pytest.mark.parametrize("env,pp,device,expected", [
    ({}, 2, "Ascend", True),
    ({}, 1, "Ascend", False),
    ({"ENABLE_LAZY_INLINE_NO_PIPELINE": "1"}, 1, "Ascend", True),
    ({"ENABLE_LAZY_INLINE": "0"}, 4, "Ascend", False),
    ({"ENABLE_LAZY_INLINE": "0", "ENABLE_LAZY_INLINE_NO_PIPELINE": "1"}, 1, "Ascend", False),
    ({}, 2, "CPU", False),
])
def test_decision_follows_env_rules(monkeypatch, env, pp, device, expected):
    monkeypatch.delenv("ENABLE_LAZY_INLINE", raising=False)
    monkeypatch.delenv("ENABLE_LAZY_INLINE_NO_PIPELINE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    enabled, reason = lazy_inline_decision(pp, device_target=device)
    assert enabled is expected
    assert reason
    if device == "CPU" and pp > 1:
        assert "Ascend only" in reason


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv("ENABLE_LAZY_INLINE", "maybe")
    with pytest.raises(ValueError, match="ENABLE_LAZY_INLINE"):
        lazy_inline_decision(2, device_target="Ascend")
