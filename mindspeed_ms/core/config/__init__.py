"""Config classes, YAML/dict/Megatron-argument loading, validation and field metadata.

This is the bottom layer of ``mindspeed_ms``: it imports nothing else from the project and
nothing from MindSpore (dtypes stay strings; :func:`to_ms_dtype` converts on demand).

Main entry points:

* :class:`AllConfig` and the seven config classes (:class:`TrainingConfig`,
  :class:`ModelParallelConfig`, :class:`TransformerConfig`, :class:`DatasetConfig`,
  :class:`OptimizerConfig`, :class:`MoEConfig`, :class:`LoraConfig`);
* :func:`init_configs_from_yaml`, :func:`init_configs_from_dict`, :func:`init_configs_from_args`,
  :func:`save_yaml`;
* :func:`validate_for_world_size` for the checks that need the number of ranks;
* the field metadata: :func:`field_specs`, :func:`field_spec`, :func:`validate_field`,
  :class:`FieldSpec`.
"""

from .all_config import SECTIONS, AllConfig, save_yaml
from .base import BaseConfig
from .dataset import DatasetConfig
from .fields import (
    DTYPE_NAMES,
    ConfigTypeError,
    ConfigValueError,
    FieldSpec,
    UnknownConfigKeyWarning,
    normalize_dtype_name,
    to_ms_dtype,
)
from .loading import (
    init_configs_from_args,
    init_configs_from_dict,
    init_configs_from_yaml,
    load_yaml_file,
    megatron_arg_mapping,
)
from .lora import LoraConfig
from .metadata import config_class_for, field_spec, field_specs, validate_field
from .moe import MoEConfig
from .optimizer import OptimizerConfig
from .parallel import ModelParallelConfig
from .training import TrainingConfig
from .transformer import TransformerConfig
from .world import layers_per_pipeline_stage, validate_for_world_size

__all__ = [
    "AllConfig",
    "BaseConfig",
    "DatasetConfig",
    "LoraConfig",
    "ModelParallelConfig",
    "MoEConfig",
    "OptimizerConfig",
    "TrainingConfig",
    "TransformerConfig",
    "SECTIONS",
    "init_configs_from_yaml",
    "init_configs_from_dict",
    "init_configs_from_args",
    "load_yaml_file",
    "megatron_arg_mapping",
    "save_yaml",
    "validate_for_world_size",
    "layers_per_pipeline_stage",
    "FieldSpec",
    "field_specs",
    "field_spec",
    "validate_field",
    "config_class_for",
    "ConfigValueError",
    "ConfigTypeError",
    "UnknownConfigKeyWarning",
    "DTYPE_NAMES",
    "normalize_dtype_name",
    "to_ms_dtype",
]
