"""Training: pretrain(), the train step, loss scaling, checkpoints, the event stream and logs.

Names are imported lazily (PEP 562), so ``import mindspeed_ms.training`` is cheap and does not
import the model; ``from mindspeed_ms.training import AdaptiveLossScaleUpdateCell`` loads only
the loss-scale module.
"""

import importlib

# public name -> submodule that defines it
_LAZY = {
    "AdaptiveLossScaleUpdateCell": "loss_scale",
    "DynamicLossScaleUpdateCell": "loss_scale",
    "FixedLossScaleUpdateCell": "loss_scale",
    "adaptive_window_list": "loss_scale",
    "build_loss_scaler": "loss_scale",
    "EventWriter": "events",
    "read_events": "events",
    "format_log_line": "events",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
