"""Config contradictions and layout rules (issue 16, items 3 and 4).

Only the FusedRMSNorm part is in place so far; see the report of issue 16 for what remains.
"""
import numpy as np
import pytest

from mindspeed_ms.core.config import TransformerConfig
from mindspeed_ms.core.config.fields import ConfigValueError


def _tiny(normalization):
    return TransformerConfig(vocab_size=32, num_layers=1, num_attention_heads=2, hidden_size=8,
                             ffn_hidden_size=16, normalization=normalization)


def test_fused_rmsnorm_is_accepted_and_builds_the_rmsnorm_layer():
    import mindspore as ms
    from mindspeed_ms.legacy.model.norm import get_norm, RMSNorm
    fused, plain = _tiny("FusedRMSNorm"), _tiny("RMSNorm")
    a, b = get_norm(fused), get_norm(plain)
    assert isinstance(a, RMSNorm)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32))
    np.testing.assert_allclose(a(x).asnumpy(), b(x).asnumpy(), rtol=1e-6)
    # RMS normalisation: each output row has unit root-mean-square (weights start at one).
    rms = np.sqrt((a(x).asnumpy() ** 2).mean(-1))
    np.testing.assert_allclose(rms, 1.0, rtol=1e-3)


def test_unknown_normalization_is_still_refused_naming_the_field():
    with pytest.raises(ConfigValueError, match="normalization"):
        _tiny("GroupNorm")
