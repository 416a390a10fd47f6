"""Loading configs from YAML files, dicts and Megatron argument namespaces.

YAML layout: one top-level key per config (``training_config``, ``parallel_config``,
``model_config``, ``dataset_config``, ``optimizer_config``, ``moe_config``, ``lora_config``).
The MindFormers sections that the MindFormers training-feature snippets use are accepted too:
``runner_config`` (gradient_accumulation_steps, batch_size, epochs), ``runner_wrapper``
(use_clip_grad, max_grad_norm, scale_sense) and ``model: {model_config: ...}``, and the pretraining
guide's nested blocks: ``accelerate_config.parallelization`` (tensor_parallel,
use_sequence_parallel, use_distributed_optimizer and the ``pipeline`` sub-section),
``accelerate_config.precision``, ``train_config`` and ``model_config.llm`` (see
:mod:`.guide_layout`). They mix with the flat sections; an option given two ways with different
values is refused naming both places.
"""

from __future__ import annotations

import argparse
import difflib
import os
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .all_config import SECTIONS, AllConfig
from .base import BaseConfig
from .fields import ConfigTypeError, ConfigValueError, UnknownConfigKeyWarning
from .guide_layout import collect_llm, collect_precision, collect_train_config

__all__ = [
    "init_configs_from_yaml",
    "init_configs_from_dict",
    "init_configs_from_args",
    "megatron_arg_mapping",
    "load_yaml_file",
]

# MindFormers runner sections: key -> (section, field); None = accepted and ignored (no meaning
# in this framework, e.g. data sinking).
_RUNNER_CONFIG = {
    "gradient_accumulation_steps": ("training_config", "gradient_accumulation_steps"),
    "batch_size": ("dataset_config", "batch_size"),
    "epochs": ("training_config", "epochs"),
    "sink_mode": None,
    "sink_size": None,
    "initial_epoch": None,
    "initial_step": None,
}
_RUNNER_WRAPPER = {
    "type": None,
    "use_clip_grad": ("training_config", "use_clip_grad"),
    "max_grad_norm": ("training_config", "max_grad_norm"),
    "scale_sense": ("training_config", "scale_sense"),
}
# The pretraining guide's accelerate_config.parallelization: key -> (section, field); the
# pipeline sub-section has its own table. Other keys are refused with their path;
# accelerate_config.precision is in guide_layout.
_ACCELERATE_PARALLELIZATION = {
    "tensor_parallel": ("parallel_config", "tensor_model_parallel_size"),
    "use_sequence_parallel": ("parallel_config", "sequence_parallel"),
    "use_distributed_optimizer": ("training_config", "use_distributed_optimizer"),
}
_ACCELERATE_PIPELINE = {
    "num_stages": ("parallel_config", "pipeline_model_parallel_size"),
    "layer_list": ("parallel_config", "num_layer_list"),
    "micro_batch_size": ("dataset_config", "batch_size"),
    "noop_layers": ("parallel_config", "noop_layers"),
    "num_layers_per_vpp": ("parallel_config", "num_layers_per_virtual_pipeline_stage"),
    "virtual_pipeline_model_parallel_size": ("parallel_config", "virtual_pipeline_model_parallel_size"),
}
# Top-level sections besides SECTIONS (the guide's and MindFormers' spellings).
_GUIDE_SECTIONS = ("train_config", "accelerate_config", "model", "runner_config", "runner_wrapper")
# Top-level MindFormers keys that describe things outside the configs (callbacks, context...).
_IGNORED_TOP_LEVEL = ("callbacks", "context", "runner", "trainer", "run_mode", "seed_everything",
                      "output_dir_mf", "profile_mf")

# Megatron arguments that land inside a dict-valued field: name -> (section, field, key).
_MEGATRON_INTO_DICT = {
    "pre_tockens": ("model_config", "fa_config", "pre_tokens"),
    "next_tockens": ("model_config", "fa_config", "next_tokens"),
    "shape_order": ("model_config", "fa_config", "input_layout"),
}
_MEGATRON_OPTIMIZERS = {"adam": "AdamW", "adamw": "AdamW", "sgd": "SGD"}
_STATIC_LOSS_SCALE = ("loss_scale",)
_DYNAMIC_LOSS_SCALE = ("initial_loss_scale", "hysteresis", "loss_scale_window")

ConfigClasses = Union[None, type, Sequence[type]]


# ----------------------------------------------------------------------------------------------
# Section collection (with MindFormers spellings)
# ----------------------------------------------------------------------------------------------

class _Collector:
    """Collects option values per section; the same option given twice must agree."""

    def __init__(self):
        self.sections: Dict[str, Dict[str, Any]] = {}
        self._origin: Dict[Tuple[str, str], Tuple[str, Any]] = {}
        self.instances: Dict[str, BaseConfig] = {}
        # checks that need the built configs (the guide's tokenizer.divided_by, fused rmsnorm)
        self.post_checks: List[Callable[[AllConfig], None]] = []

    def put(self, section: str, key: str, value: Any, origin: str,
            shown: Optional[str] = None) -> None:
        """Set ``section.key``; ``shown`` replaces ``origin=value`` in conflict messages."""
        if not isinstance(key, str):
            raise TypeError(f"{origin.rsplit('.', 1)[0]}: option names must be strings, got "
                            f"{key!r}")
        if section in self.instances:
            raise ValueError(f"{origin}: {section} is given as a config instance; set the "
                             f"option on that instance instead")
        cls = SECTIONS[section]
        canon = cls.canonical_name(key) or key
        if self.claim(section, canon, value, shown or f"{origin}={value!r}"):
            self.sections.setdefault(section, {})[key] = value

    def claim(self, section: str, canon: str, value: Any, text: str) -> bool:
        """Record that ``text`` sets ``section.canon`` to ``value``; False if already set so.

        Raises:
            ValueError: the option was set before to a different value (names both places).
        """
        slot = (section, canon)
        if slot in self._origin:
            first_text, first_value = self._origin[slot]
            if first_value != value and not _same_value(section, canon, first_value, value):
                raise ValueError(f"{section}.{canon} is given twice with different values: "
                                 f"{first_text} and {text}")
            return False
        self._origin[slot] = (text, value)
        return True

    def given_as(self, section: str, canon: str) -> Optional[str]:
        """Where (``path=value``) ``section.canon`` was set, or None."""
        entry = self._origin.get((section, canon))
        return entry[0] if entry else None

    def put_section(self, section: str, values: Any, origin: str) -> None:
        if values is None:
            self.sections.setdefault(section, {})
            return
        cls = SECTIONS[section]
        if isinstance(values, cls):
            if section in self.sections and self.sections[section]:
                raise ValueError(f"{origin}: {section} is given both as options and as an "
                                 f"instance")
            self.instances[section] = values
            return
        if not isinstance(values, Mapping):
            raise TypeError(f"{origin} must be a mapping of {cls.__name__} options, got "
                            f"{type(values).__name__} {values!r:.60}")
        for key, value in values.items():
            self.put(section, key, value, f"{origin}.{key}")

    def override(self, section: str, key: str, value: Any) -> None:
        """Set an option, replacing whatever spelling of it was given before."""
        if section in self.instances:
            raise ValueError(f"override {section}.{key}: {section} is given as a config "
                             f"instance; set the option on that instance instead")
        cls = SECTIONS[section]
        canon = cls.canonical_name(key) or key
        options = self.sections.setdefault(section, {})
        for existing in list(options):
            if (cls.canonical_name(existing) or existing) == canon:
                del options[existing]
        options[key] = value

    def result(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.sections)
        out.update(self.instances)
        return out

    def build(self) -> AllConfig:
        """The AllConfig of the collected options, after the checks that need it."""
        all_config = AllConfig(**self.result())
        for check in self.post_checks:
            check(all_config)
        return all_config


def _same_value(section: str, canon: str, first: Any, second: Any) -> bool:
    """Whether two spellings of one option mean the same (``1e-5`` and ``1.0e-05``)."""
    spec = SECTIONS[section]._fields.get(canon)  # pylint: disable=protected-access
    if spec is None:
        return False
    try:
        return spec.coerce(first) == spec.coerce(second)
    except (TypeError, ValueError):
        return False


def _ignored(origin: str, why: str) -> None:
    warnings.warn(f"{origin} is ignored ({why})", UnknownConfigKeyWarning, stacklevel=4)


def _collect(data: Mapping[str, Any], source: str) -> _Collector:
    if not isinstance(data, Mapping):
        raise TypeError(f"{source}: the top level must be a mapping of sections "
                        f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    collector = _Collector()
    for top, value in data.items():
        if not isinstance(top, str):
            raise TypeError(f"{source}: section names must be strings, got {top!r}")
        if top == "model_config" and isinstance(value, Mapping) and "llm" in value:
            flat = {key: item for key, item in value.items() if key != "llm"}
            collector.put_section(top, flat, top)
            collect_llm(collector, value["llm"], "model_config.llm")
        elif top in SECTIONS:
            collector.put_section(top, value, top)
        elif top == "train_config":
            collect_train_config(collector, value, "train_config")
        elif top == "model":
            _collect_mindformers_model(collector, value)
        elif top == "accelerate_config":
            _collect_accelerate_config(collector, value)
        elif top in ("runner_config", "runner_wrapper"):
            table = _RUNNER_CONFIG if top == "runner_config" else _RUNNER_WRAPPER
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{top} must be a mapping, got {type(value).__name__}")
            for key, item in value.items():
                target = table.get(key, "unknown") if isinstance(key, str) else "unknown"
                if target == "unknown":
                    _ignored(f"{top}.{key}", "not a known MindFormers runner option")
                elif target is None:
                    if key != "type":
                        _ignored(f"{top}.{key}", "no meaning in this framework")
                else:
                    collector.put(target[0], target[1], item, f"{top}.{key}")
        elif top in _IGNORED_TOP_LEVEL:
            _ignored(top, "MindFormers section outside the configs")
        else:
            known = list(SECTIONS) + list(_GUIDE_SECTIONS)
            close = difflib.get_close_matches(top, known, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _ignored(top, f"unknown section; known: {', '.join(known)}{hint}")
    return collector


def _mapping_or_none(value: Any, origin: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{origin} must be a mapping, got {type(value).__name__}")
    return value


def _collect_accelerate_config(collector: _Collector, value: Any) -> None:
    """The guide's ``accelerate_config``: ``parallelization`` (sizes and the ``pipeline``
    sub-section) and ``precision`` (see :mod:`.guide_layout`).

    Keys left empty in the YAML (``noop_layers:``) mean "not set", as the guide's comments say;
    a key that means nothing here is refused with its path.
    """
    for key, item in _mapping_or_none(value, "accelerate_config").items():
        if key == "precision":
            collect_precision(collector, item, "accelerate_config.precision")
            continue
        if key != "parallelization":
            raise ConfigValueError("accelerate_config", str(key), item,
                                   "keys parallelization, precision", "not a guide section")
        for sub_key, sub_value in _mapping_or_none(item, "accelerate_config.parallelization").items():
            origin = f"accelerate_config.parallelization.{sub_key}"
            if sub_key == "pipeline":
                for p_key, p_value in _mapping_or_none(sub_value, origin).items():
                    target = _ACCELERATE_PIPELINE.get(p_key) if isinstance(p_key, str) else None
                    if target is None:
                        raise ConfigValueError(origin, str(p_key), p_value,
                                               "keys " + ", ".join(_ACCELERATE_PIPELINE),
                                               "not a pipeline option")
                    if p_value is not None:
                        collector.put(target[0], target[1], p_value, f"{origin}.{p_key}")
            elif sub_key in _ACCELERATE_PARALLELIZATION:
                if sub_value is not None:
                    target = _ACCELERATE_PARALLELIZATION[sub_key]
                    collector.put(target[0], target[1], sub_value, origin)
            else:
                raise ConfigValueError("accelerate_config.parallelization", str(sub_key),
                                       sub_value, "keys pipeline, " +
                                       ", ".join(_ACCELERATE_PARALLELIZATION),
                                       "not a parallelization option")


def _collect_mindformers_model(collector: _Collector, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise TypeError(f"model must be a mapping, got {type(value).__name__}")
    for key, item in value.items():
        if key == "model_config":
            if item is None:
                continue
            if not isinstance(item, Mapping):
                raise TypeError(f"model.model_config must be a mapping, got "
                                f"{type(item).__name__}")
            for sub_key, sub_value in item.items():
                if sub_key == "type":
                    continue  # MindFormers' model class selector
                if sub_key == "llm":
                    collect_llm(collector, sub_value, "model.model_config.llm")
                    continue
                collector.put("model_config", sub_key, sub_value, f"model.model_config.{sub_key}")
        else:
            _ignored(f"model.{key}", "MindFormers model option outside model_config")


def _apply_overrides(collector: _Collector, overrides: Mapping[str, Any]) -> None:
    """Keyword overrides: a section (mapping or instance), 'section.field', or a field name.

    The guide's nested blocks (``train_config``, ``accelerate_config``, ``model_config`` with
    ``llm``) are accepted too; each option they set replaces the same option of the file.
    """
    for key, value in overrides.items():
        if key in ("train_config", "accelerate_config") or \
                key == "model_config" and isinstance(value, Mapping) and "llm" in value:
            nested = _collect({key: value}, "override")
            for section, options in nested.sections.items():
                for sub_key, sub_value in options.items():
                    collector.override(section, sub_key, sub_value)
            collector.post_checks.extend(nested.post_checks)
            continue
        if key in SECTIONS:
            if isinstance(value, BaseConfig):
                collector.sections.pop(key, None)
                collector.put_section(key, value, key)
            elif isinstance(value, Mapping):
                for sub_key, sub_value in value.items():
                    if not isinstance(sub_key, str):
                        raise TypeError(f"override {key!r}: option names must be strings, got "
                                        f"{sub_key!r}")
                    collector.override(key, sub_key, sub_value)
            else:
                raise TypeError(f"override {key!r} must be a mapping or a "
                                f"{SECTIONS[key].__name__}, got {type(value).__name__}")
            continue
        if "." in key:
            section, field = key.split(".", 1)
            if section not in SECTIONS:
                raise ValueError(f"override {key!r}: unknown section {section!r}")
        else:
            owners = [s for s, cls in SECTIONS.items() if cls.canonical_name(key) is not None]
            if not owners:
                raise ValueError(f"override {key!r} is not an option of any config")
            if len(owners) > 1:
                raise ValueError(f"override {key!r} is ambiguous (in {', '.join(owners)}); use "
                                 f"{owners[0]}={{{key!r}: ...}}")
            section, field = owners[0], key
        collector.override(section, field, value)


def _select(all_config: AllConfig, config_classes: ConfigClasses):
    if config_classes is None:
        return all_config
    single = isinstance(config_classes, type)
    classes = [config_classes] if single else config_classes
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
        raise TypeError("config_classes must be None, a config class or a list of config "
                        f"classes, got {type(config_classes).__name__}")
    by_class = {cls: section for section, cls in SECTIONS.items()}
    out = []
    for cls in classes:
        if cls is AllConfig:
            out.append(all_config)
        elif cls in by_class:
            out.append(getattr(all_config, by_class[cls]))
        else:
            raise TypeError(f"config_classes may hold {', '.join(c.__name__ for c in by_class)} "
                            f"or AllConfig, got {cls!r}")
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------

def init_configs_from_dict(data: Mapping[str, Any], config_classes: ConfigClasses = None,
                           **kwargs):
    """Initialise configs from a dict in the YAML layout.

    Args:
        data: ``{section: {option: value}}`` (see the module docstring for the sections).
        config_classes: None for an :class:`AllConfig`; a list of config classes for the
            instances in that order; a single class for that instance.
        **kwargs: Overrides applied on top of ``data``: a section name with a mapping (merged)
            or a config instance, ``'section.field'`` (via ``**{...}``), or a field name that
            belongs to exactly one config.

    Returns:
        An :class:`AllConfig`, or the requested instances (wired to each other as in AllConfig).

    Raises:
        TypeError: ``data`` or a section is not a mapping, or a value has the wrong type.
        ValueError: an option value is not allowed, or one option is given twice differently.
    """
    if data is None:
        data = {}
    collector = _collect(data, "config")
    _apply_overrides(collector, kwargs)
    return _select(collector.build(), config_classes)


def load_yaml_file(file_path: str) -> Dict[str, Any]:
    """Read a YAML config file with the safe loader (no Python objects can be constructed).

    Raises:
        ValueError: the path is not a string/path or does not end in .yaml/.yml, or the file is
            not valid YAML.
        FileNotFoundError: the file does not exist.
    """
    if isinstance(file_path, os.PathLike):
        file_path = os.fspath(file_path)
    if not isinstance(file_path, str):
        raise ValueError(f"file_path must be a string, got {type(file_path).__name__}")
    if not file_path.lower().endswith((".yaml", ".yml")):
        raise ValueError(f"file_path must end with .yaml or .yml, got {file_path!r}")
    import yaml  # pylint: disable=import-outside-toplevel
    try:
        with open(file_path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file_path}: not UTF-8 text ({err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{file_path}: invalid YAML: {err}") from None
    except RecursionError:
        raise ValueError(f"{file_path}: YAML nested too deeply") from None
    return {} if data is None else data


def init_configs_from_yaml(file_path: str, config_classes: ConfigClasses = None, **kwargs):
    """Initialise config instances from a YAML file.

    Args:
        file_path: YAML file path (.yaml or .yml).
        config_classes: Config classes to initialise, e.g. ``[TrainingConfig,
            ModelParallelConfig, DatasetConfig, TransformerConfig]``; None for an
            :class:`AllConfig` with every known config.
        **kwargs: Overrides, as for :func:`init_configs_from_dict`.

    Returns:
        The instances in the order of ``config_classes``, or an :class:`AllConfig`.

    Raises:
        ValueError: ``file_path`` is not a string, or does not end with yaml/yml; the file is not
            valid YAML; an option value is not allowed.
        TypeError: the file's structure or a value has the wrong type.

    Examples:
        >>> from mindspeed_ms.core.config import init_configs_from_yaml
        >>> all_config = init_configs_from_yaml("examples/configs/test_language_model.yaml")
    """
    data = load_yaml_file(file_path)
    if not isinstance(data, Mapping):
        raise TypeError(f"{file_path}: the top level must be a mapping of sections, got "
                        f"{type(data).__name__}")
    collector = _collect(data, file_path)
    _apply_overrides(collector, kwargs)
    return _select(collector.build(), config_classes)


def megatron_arg_mapping() -> Dict[str, Tuple[str, str]]:
    """``{Megatron argument: (section, field)}`` as declared on the config fields.

    Arguments that land inside a dict field (``pre_tockens``, ``next_tockens``,
    ``shape_order`` -> ``model_config.fa_config``) are listed with the field ``'fa_config.<key>'``.
    """
    mapping: Dict[str, Tuple[str, str]] = {}
    for section, cls in SECTIONS.items():
        for spec in cls.field_specs(include_virtual=True):
            for name in spec.megatron_names:
                if name in mapping:
                    raise RuntimeError(f"Megatron argument {name!r} is declared twice")
                mapping[name] = (section, spec.name)
    for name, (section, field, key) in _MEGATRON_INTO_DICT.items():
        mapping[name] = (section, f"{field}.{key}")
    return mapping


def init_configs_from_args(args: Any = None, config_classes: ConfigClasses = None, **kwargs):
    """Initialise configs from Megatron arguments (the guide's mapping tables).

    Every argument of the guide's model, training, dataset, optimizer and parallel tables is
    mapped (e.g. ``train_iters -> training_config.training_iters``, ``micro_batch_size ->
    dataset_config.batch_size``, ``adam_beta1/adam_beta2 -> optimizer_config.betas``,
    ``attention_dropout -> model_config.attention_dropout``), plus the MoE arguments. Arguments
    that are None are left at the config default; arguments with no mapping are ignored (a
    Megatron namespace has hundreds). As in Megatron, the dynamic loss-scale arguments apply only
    with ``fp16`` and ``loss_scale`` only with ``fp16``/``bf16``; ``optimizer='adam'`` is
    Megatron's decoupled Adam, i.e. ``AdamW``.

    Args:
        args: An ``argparse.Namespace`` (or a mapping) of Megatron arguments.
        config_classes: As for :func:`init_configs_from_dict`.
        **kwargs: Overrides, as for :func:`init_configs_from_dict`.

    Returns:
        An :class:`AllConfig`, or the requested instances.

    Raises:
        TypeError: ``args`` is not a namespace or mapping, or a value has the wrong type.
        ValueError: a value is not allowed.
    """
    if args is None:
        raise TypeError("init_configs_from_args needs the Megatron arguments (an "
                        "argparse.Namespace or a mapping)")
    if isinstance(args, Mapping):
        values = dict(args)
    elif isinstance(args, argparse.Namespace) or hasattr(args, "__dict__"):
        values = dict(vars(args))
    else:
        raise TypeError(f"init_configs_from_args expects an argparse.Namespace or a mapping, got "
                        f"{type(args).__name__}")
    mapping = megatron_arg_mapping()
    fp16 = bool(values.get("fp16"))
    bf16 = bool(values.get("bf16"))
    sections: Dict[str, Dict[str, Any]] = {}
    renamed: Dict[Tuple[str, str], str] = {}  # (section, field) -> the Megatron argument that set it
    for name, value in values.items():
        if value is None or name not in mapping:
            continue
        if name in _DYNAMIC_LOSS_SCALE and not fp16:
            continue
        if name in _STATIC_LOSS_SCALE and not (fp16 or bf16):
            continue
        section, field = mapping[name]
        if field.split(".", 1)[0] != name:
            renamed[(section, field.split(".", 1)[0])] = name
        if name == "optimizer" and isinstance(value, str):
            value = _MEGATRON_OPTIMIZERS.get(value.lower(), value)
        if name == "transformer_impl" and value == "transformer_engine":
            warnings.warn("transformer_impl='transformer_engine' is not available; using 'local'",
                          UserWarning, stacklevel=2)
            value = "local"
        if "." in field:
            field, key = field.split(".", 1)
            sections.setdefault(section, {}).setdefault(field, {})[key] = value
        else:
            sections.setdefault(section, {})[field] = value
    try:
        return init_configs_from_dict(sections, config_classes, **kwargs)
    except (ConfigValueError, ConfigTypeError) as exc:
        # name the argument the user wrote (e.g. hysteresis) next to the field it maps to
        section = next((s for s, cls in SECTIONS.items() if cls.__name__ == exc.config), None)
        arg = renamed.get((section, exc.field))
        if arg is None:
            raise
        raise type(exc)(exc.config, exc.field, exc.value, exc.allowed,
                        f"from the Megatron argument {arg}={values[arg]!r}, which maps to "
                        f"{section}.{exc.field}") from None

