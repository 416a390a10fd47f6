"""AllConfig: every config of a run, wired together, and its YAML form."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Dict, Mapping, Optional

from ._checks import plain_data
from .base import BaseConfig
from .dataset import DatasetConfig
from .fields import ConfigValueError, Invalid, UnknownConfigKeyWarning
from .layout_rules import moe_tensor_parallel_problem
from .lora import LoraConfig
from .moe import MoEConfig
from .optimizer import OptimizerConfig
from .parallel import ModelParallelConfig
from .training import TrainingConfig
from .transformer import TransformerConfig

__all__ = ["AllConfig", "SECTIONS", "save_yaml"]

#: Top-level YAML keys and their config classes, in the order they are written.
SECTIONS: Dict[str, type] = {
    "training_config": TrainingConfig,
    "parallel_config": ModelParallelConfig,
    "model_config": TransformerConfig,
    "dataset_config": DatasetConfig,
    "optimizer_config": OptimizerConfig,
    "moe_config": MoEConfig,
    "lora_config": LoraConfig,
}


def _build_sections(given: Mapping[str, Any]) -> Dict[str, BaseConfig]:
    """Config instances for every section, wired (model <- parallel/training/dataset/moe/lora;
    training <- parallel/dataset/lora).

    ``given`` maps section names to a mapping of field values, a config instance or None.
    """
    instances: Dict[str, BaseConfig] = {}
    data: Dict[str, Dict[str, Any]] = {}
    for section, value in given.items():
        cls = SECTIONS.get(section)
        if cls is None:
            warnings.warn(f"AllConfig: unknown section {section!r} is ignored; known sections: "
                          f"{', '.join(SECTIONS)}", UnknownConfigKeyWarning, stacklevel=3)
            continue
        if value is None:
            continue
        if isinstance(value, cls):
            instances[section] = value
        elif isinstance(value, BaseConfig):
            raise TypeError(f"AllConfig: section {section!r} needs a {cls.__name__}, got a "
                            f"{type(value).__name__}")
        elif isinstance(value, Mapping):
            data[section] = dict(value)
        else:
            raise TypeError(f"AllConfig: section {section!r} must be a mapping of options (or a "
                            f"{cls.__name__}), got {type(value).__name__}")

    # Given instances carry their own links: those define the sections not given otherwise.
    for owner in ("model_config", "training_config"):
        inst = instances.get(owner)
        if inst is None:
            continue
        for link in type(inst).links():
            linked = getattr(inst, link)
            if link in data:
                raise ValueError(f"AllConfig: {link!r} is given as options while the given "
                                 f"{owner} already links a {type(linked).__name__}; give the "
                                 f"instance instead")
            if link in instances and instances[link] is not linked and instances[link] != linked:
                raise ValueError(f"AllConfig: the given {link} differs from the one linked by "
                                 f"the given {owner}")
            instances.setdefault(link, linked)

    def build(section: str, **links) -> BaseConfig:
        if section in instances:
            return instances[section]
        instances[section] = SECTIONS[section].from_dict(data.get(section, {}), **links)
        return instances[section]

    parallel = build("parallel_config")
    dataset = build("dataset_config")
    lora = build("lora_config")
    moe = build("moe_config")
    build("optimizer_config")
    training = build("training_config", parallel_config=parallel, dataset_config=dataset,
                     lora_config=lora)
    build("model_config", parallel_config=parallel, training_config=training,
          dataset_config=dataset, moe_config=moe, lora_config=lora)
    return instances


class AllConfig:
    """All configs of a run; also the default result of the ``init_configs_from_*`` loaders.

    Attributes ``training_config``, ``parallel_config``, ``model_config``, ``dataset_config``,
    ``optimizer_config``, ``moe_config`` and ``lora_config`` hold the configs; the model and
    training configs link to the same parallel/dataset/MoE/LoRA instances.

    Args:
        **kwargs: Sections by their YAML key, each a mapping of options or a config instance.
            Missing sections get defaults.

    Examples:
        >>> from mindspeed_ms.core.config import AllConfig
        >>> all_config = AllConfig(parallel_config={"tensor_model_parallel_size": 2})
        >>> all_config.model_config.parallel_config is all_config.parallel_config
        True
    """

    def __init__(self, **kwargs):
        for section, config in _build_sections(kwargs).items():
            setattr(self, section, config)
        self._cross_check_sections()

    training_config: TrainingConfig
    parallel_config: ModelParallelConfig
    model_config: TransformerConfig
    dataset_config: DatasetConfig
    optimizer_config: OptimizerConfig
    moe_config: MoEConfig
    lora_config: LoraConfig

    def __getitem__(self, section: str) -> BaseConfig:
        if section not in SECTIONS:
            raise KeyError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        return getattr(self, section)

    def sections(self) -> Dict[str, BaseConfig]:
        """``{section name: config}`` in YAML order."""
        return {section: getattr(self, section) for section in SECTIONS}

    def validate(self) -> "AllConfig":
        """Re-run the cross-field rules of every config (see :meth:`BaseConfig.validate`)."""
        for config in self.sections().values():
            config.validate()
        self._cross_check_sections()
        return self

    def _cross_check_sections(self) -> None:
        """Rules between sections that no config links to the other (raise ConfigValueError)."""
        optimizer, training = self.optimizer_config, self.training_config
        parallel = self.parallel_config
        # an AllConfig is a training job's config: MoE + TP without SP is refused here already
        # (the layout rule's owner is layout_rules; evaluation-only models build without AllConfig)
        moe_tp = moe_tensor_parallel_problem(self.moe_config.num_experts, parallel.tensor_model_parallel_size,
                                             bool(parallel.sequence_parallel))
        if moe_tp:
            raise ConfigValueError("ModelParallelConfig", "sequence_parallel", parallel.sequence_parallel,
                                   "True with MoE and tensor_model_parallel_size > 1", moe_tp)
        iters = training.training_iters
        if optimizer.lr_decay_iters is None and optimizer.lr_decay_style != "constant" and iters and \
                optimizer.lr_warmup_iters >= iters:
            # the trainer then decays until training_iters (Megatron's default), which the
            # warm-up must leave room for (core/optimizer/lr_scheduler.py refuses it otherwise)
            raise ConfigValueError(
                "OptimizerConfig", "lr_warmup_iters", optimizer.lr_warmup_iters,
                f"less than training_config.training_iters={iters} (or set lr_decay_iters)",
                f"lr_decay_iters is None, so the {optimizer.lr_decay_style!r} decay ends at "
                "training_config.training_iters")

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """``{section: config.to_dict()}``: the YAML layout as plain data."""
        return {section: config.to_dict() for section, config in self.sections().items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AllConfig":
        """Inverse of :meth:`to_dict` (MindFormers spellings accepted, see the loaders)."""
        from .loading import init_configs_from_dict  # pylint: disable=import-outside-toplevel
        return init_configs_from_dict(data)

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The YAML text of this config; also written to ``path`` when given.

        Options that cannot be written as YAML (unknown options holding objects) are left out
        with a warning.
        """
        text = _dump_yaml(_yaml_ready(self.to_dict()))
        if path is not None:
            with open(os.fspath(path), "w", encoding="utf-8") as handle:
                handle.write(text)
        return text

    def copy(self) -> "AllConfig":
        """A deep copy that keeps the sharing between sections."""
        return copy.deepcopy(self)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, AllConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        inner = ",\n  ".join(f"{section}={config!r}" for section, config in
                             self.sections().items())
        return f"AllConfig(\n  {inner})"


def _yaml_ready(data: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for section, values in data.items():
        kept = {}
        for key, value in values.items():
            try:
                kept[key] = plain_data(value)
            except Invalid:
                warnings.warn(f"{section}.{key} holds a {type(value).__name__}, which cannot be "
                              f"written to YAML; left out", UnknownConfigKeyWarning, stacklevel=3)
        out[section] = kept
    return out


def _dump_yaml(data: Any) -> str:
    import yaml  # pylint: disable=import-outside-toplevel
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    # PyYAML writes some characters (e.g. U+0085) raw in a way it reads back differently; the
    # escaped form always round-trips, so it is the fallback.
    if yaml.safe_load(text) != data:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=False)
    return text


def save_yaml(config: Any, path: str) -> str:
    """Write a config as YAML (the layout ``init_configs_from_yaml`` reads).

    Args:
        config: An :class:`AllConfig`, or one config (written as its own section).
        path: Output file.

    Returns:
        The YAML text.
    """
    if isinstance(config, AllConfig):
        return config.to_yaml(path)
    if isinstance(config, BaseConfig):
        text = _dump_yaml(_yaml_ready({config.section: config.to_dict()}))
        with open(os.fspath(path), "w", encoding="utf-8") as handle:
            handle.write(text)
        return text
    raise TypeError(f"save_yaml expects an AllConfig or a config, got {type(config).__name__}")
