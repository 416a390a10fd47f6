"""Named starting configs for the config builder, the CLI demo and the notebooks.

A preset is a YAML file in the :class:`AllConfig` layout (``docs/config.md``):

* ``tiny``: the smallest useful GPT (4 steps); the tests and ``MINDSPEED_LAB_SMALL=1`` use it;
* ``demo``: what ``python -m mindspeed_lab demo`` trains: a small character-level GPT on the
  shipped tiny Shakespeare with emulated float16 and dynamic loss scaling;
* ``demo_moe``: the same GPT with 4-expert MoE layers that record their token distribution;
* ``shakespeare_char_small``: nanoGPT's CPU configuration (``examples/configs``);
* ``moe_shakespeare``: that GPT with 8-expert MoE layers over 2 expert-parallel ranks
  (``examples/configs``).

The lab's own presets live in ``mindspeed_lab/presets/*.yaml``; the shakespeare configs are read
from ``examples/configs`` of the checkout, so there is one copy of each.

**MoE switch.** The training loop records MoE token counts (``moe_tokens`` events and
``token_distribution/*.npy``), so by default the demo trains ``demo_moe`` and notebook 04 analyses
a real MoE run. :data:`MOE_TRAINING` (or the environment variable ``MINDSPEED_LAB_MOE=1``/``0``)
switches both back to the dense ``demo`` preset and a synthetic MoE run; see :func:`moe_enabled`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

__all__ = [
    "MOE_TRAINING",
    "SMALL_ENV",
    "MOE_ENV",
    "preset_names",
    "preset_path",
    "load_preset",
    "moe_enabled",
    "demo_preset",
    "small_mode",
    "shrink",
]

_LAB_DIR = Path(__file__).resolve().parent
_PRESET_DIR = _LAB_DIR / "presets"
_EXAMPLES_DIR = _LAB_DIR.parent / "examples" / "configs"
#: Presets read from examples/configs (the engine's own example configs).
_EXAMPLE_PRESETS = ("shakespeare_char_small", "moe_shakespeare")

#: Whether the demo trains ``demo_moe`` and notebook 04 analyses a real MoE run (True: the
#: training loop writes moe_tokens events); False falls back to the dense demo and synthetic events.
MOE_TRAINING = True
#: ``1`` selects tiny settings in the demo and the notebooks (what the test suite uses).
SMALL_ENV = "MINDSPEED_LAB_SMALL"
#: ``1``/``0`` overrides :data:`MOE_TRAINING`.
MOE_ENV = "MINDSPEED_LAB_MOE"


def preset_names() -> List[str]:
    """Names of the available presets (the lab's own first, then the example configs found)."""
    own = sorted(p.stem for p in _PRESET_DIR.glob("*.yaml"))
    examples = [name for name in _EXAMPLE_PRESETS if (_EXAMPLES_DIR / f"{name}.yaml").is_file()]
    return own + [name for name in examples if name not in own]


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``.

    Raises:
        ValueError: For an unknown name (the message lists the known ones).
    """
    if isinstance(name, str):
        for candidate in (_PRESET_DIR / f"{name}.yaml", _EXAMPLES_DIR / f"{name}.yaml"):
            if name in preset_names() and candidate.is_file():
                return candidate
    raise ValueError(f"preset: got {name!r}; allowed: one of {preset_names()}")


def load_preset(name: str) -> Dict[str, Dict[str, Any]]:
    """The preset's sections as plain data (a fresh copy each call)."""
    with open(preset_path(name), encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise TypeError(f"preset {name!r}: the YAML file must hold a mapping of sections, got "
                        f"{type(data).__name__}")
    return copy.deepcopy(data)


def _env_flag(name: str) -> Optional[bool]:
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def moe_enabled() -> bool:
    """Whether the demo and notebook 04 train real MoE models (``MINDSPEED_LAB_MOE``, else
    :data:`MOE_TRAINING`)."""
    flag = _env_flag(MOE_ENV)
    return MOE_TRAINING if flag is None else flag


def demo_preset() -> str:
    """The preset ``python -m mindspeed_lab demo`` trains: ``demo_moe`` when :func:`moe_enabled`,
    else ``demo``."""
    return "demo_moe" if moe_enabled() else "demo"


def small_mode() -> bool:
    """Whether ``MINDSPEED_LAB_SMALL`` asks for tiny settings (tests, quick checks)."""
    return bool(_env_flag(SMALL_ENV))


def shrink(config: Union[Mapping[str, Any], Any], steps: int = 4) -> Any:
    """Cut a config down to ``steps`` training steps with one short evaluation at the end.

    Sets ``training_iters``, ``eval_interval`` (= steps), ``eval_iters`` (2), ``log_interval``
    (1), no periodic checkpoints, and a warm-up shorter than the run. The model is unchanged.

    Args:
        config: A dict of sections (changed in place and returned) or an ``AllConfig`` (changed in
            place and returned).
        steps: Training steps (>= 1).

    Raises:
        ValueError: When ``steps`` is not a positive integer.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: got {steps!r}; allowed: an integer >= 1")
    warmup = max(0, min(steps // 2, 10))
    training = {"training_iters": steps, "eval_interval": steps, "eval_iters": 2, "log_interval": 1,
                "save_interval": None}
    if isinstance(config, Mapping):
        config.setdefault("training_config", {}).update(training)
        optimizer = config.setdefault("optimizer_config", {})
        optimizer["lr_warmup_iters"] = min(int(optimizer.get("lr_warmup_iters", 0) or 0), warmup)
        optimizer["lr_decay_iters"] = None
        return config
    config.training_config.update(**training)
    optimizer = config.optimizer_config
    optimizer.update(lr_warmup_iters=min(int(optimizer.lr_warmup_iters or 0), warmup), lr_decay_iters=None)
    return config
