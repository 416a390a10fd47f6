"""Field metadata API: what the notebook config builder generates its widgets from."""

from __future__ import annotations

import copy
from typing import Any, List, Union

from .all_config import SECTIONS, AllConfig
from .base import BaseConfig, registered_configs
from .fields import FieldSpec

__all__ = ["field_specs", "field_spec", "validate_field", "config_class_for", "SECTIONS"]

ConfigRef = Union[type, BaseConfig, str]


def config_class_for(ref: ConfigRef) -> type:
    """The config class for a class, an instance, a class name or a YAML section name.

    Raises:
        ValueError: unknown name.
        TypeError: ``ref`` is none of the above.
    """
    if isinstance(ref, type) and issubclass(ref, BaseConfig):
        return ref
    if isinstance(ref, BaseConfig):
        return type(ref)
    if isinstance(ref, str):
        if ref in SECTIONS:
            return SECTIONS[ref]
        classes = registered_configs()
        if ref in classes:
            return classes[ref]
        raise ValueError(f"unknown config {ref!r}; use a class, a class name or one of the "
                         f"sections {', '.join(SECTIONS)}")
    raise TypeError(f"expected a config class, instance, class name or section name, got "
                    f"{type(ref).__name__}")


def field_specs(config_cls: Union[ConfigRef, type], include_virtual: bool = False
                ) -> List[FieldSpec]:
    """Metadata of every field of a config, in declaration order.

    Args:
        config_cls: A config class, instance, class name or YAML section name
            (``'model_config'``); :class:`AllConfig` (or ``'AllConfig'``) gives every section's
            fields in YAML order.
        include_virtual: Also list the convenience spellings that write into other fields
            (``kind == 'virtual'``, e.g. ``gradient_accumulation_steps``); a widget builder
            normally leaves them out.

    Returns:
        A list of :class:`FieldSpec`.
    """
    if config_cls is AllConfig or config_cls == "AllConfig" or isinstance(config_cls, AllConfig):
        specs: List[FieldSpec] = []
        for cls in SECTIONS.values():
            specs.extend(cls.field_specs(include_virtual))
        return specs
    return config_class_for(config_cls).field_specs(include_virtual)


def field_spec(config_cls: ConfigRef, name: str) -> FieldSpec:
    """Metadata of one field, looked up by name or alias (virtual fields included).

    Raises:
        ValueError: the config has no such field.
    """
    cls = config_class_for(config_cls)
    canon = cls.canonical_name(name)
    for spec in cls.field_specs(include_virtual=True):
        if spec.name == canon:
            return spec
    raise ValueError(f"{cls.__name__} has no field {name!r}; fields: "
                     f"{', '.join(cls.field_names())}")


def validate_field(config_cls: ConfigRef, name: str, value: Any, config: BaseConfig = None
                   ) -> Any:
    """Check one value for one field, as assigning it would.

    Without ``config`` only the field's own rules run (type, allowed values, range). With a
    config instance the cross-field rules run too, on a copy, so the result is exactly what
    ``setattr(config, name, value)`` would do; ``config`` is not modified.

    Args:
        config_cls: A config class, instance, class name or section name.
        name: Field name or alias.
        value: The candidate value.
        config: Optional instance whose other fields the cross-field rules should see.

    Returns:
        The value in the form the config stores it (e.g. ``'bf16'`` -> ``'bfloat16'``).

    Raises:
        ConfigTypeError, ConfigValueError: the same errors the assignment raises (subclasses of
            TypeError and ValueError).
        ValueError: the config has no such field.
    """
    cls = config_class_for(config_cls)
    canon = cls.canonical_name(name)
    if canon is None or canon in cls.links():
        raise ValueError(f"{cls.__name__} has no field {name!r}; fields: "
                         f"{', '.join(cls.field_names())}")
    decl = cls.__dict__[canon]
    checked = decl.coerce(value, cls.__name__)
    if config is not None:
        if not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        trial = copy.deepcopy(config)
        setattr(trial, canon, value)
    return checked
