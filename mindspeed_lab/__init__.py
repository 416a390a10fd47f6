"""mindspeed_lab: configure, launch and watch mindspeed_ms training runs from notebooks and the CLI.

The main objects are importable from here::

    from mindspeed_lab import ConfigBuilder, Job, LiveDashboard, EventReader, run_layouts

They are loaded on first use: ``import mindspeed_lab`` itself stays cheap, which matters for the
launcher's guard process (``python -m mindspeed_lab._guard``, which must start in a fraction of a
second and import nothing but psutil).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    # config builder and presets
    "ConfigBuilder": "builder",
    "preset_names": "presets",
    "load_preset": "presets",
    "demo_preset": "presets",
    "moe_enabled": "presets",
    "small_mode": "presets",
    "shrink": "presets",
    # launching
    "Job": "launcher",
    "MultiNodeJob": "launcher",
    "build_node_commands": "launcher",
    "WorkerMemoryMonitor": "monitor",
    # events and plots
    "EventReader": "events",
    "read_events": "events",
    "step_summary": "events",
    "moe_pivot": "events",
    "hot_experts": "events",
    "moe_imbalance": "events",
    "LiveDashboard": "plots",
    "training_figure": "plots",
    "loss_scale_figure": "plots",
    "moe_distribution_figure": "plots",
    "moe_imbalance_figure": "plots",
    "capacity_figure": "plots",
    "estimates_figure": "plots",
    "layout_runs_figure": "plots",
    "show": "plots",
    "JobControl": "controls",
    # tuner
    "ModelSpec": "tuner",
    "HardwareSpec": "tuner",
    "Layout": "tuner",
    "estimate_layouts": "tuner",
    "enumerate_layouts": "tuner",
    "model_spec_from_config": "tuner",
    "run_layouts": "tuner",
    "LayoutTable": "tuner",
    # MoE analysis
    "load_token_counts": "moe",
    "hot_expert_suggestions": "moe",
    "capacity_for_drop": "moe",
    "cold_token_percent_for_drop": "moe",
    "write_synthetic_run": "moe",
    # report and CLI
    "write_report": "report",
    "run_config": "cli",
    "run_demo": "cli",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mindspeed_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
