"""Field declarations, value checking and field metadata shared by every config class.

A config class declares its fields once, as class attributes (:class:`Field`, :class:`Link`,
:class:`Virtual`). Everything else is derived from those declarations: the constructor's
signature, validation on assignment, ``to_dict``/``from_dict``, the Megatron-argument mapping and
the :class:`FieldSpec` metadata the notebook config builder turns into widgets. There is
deliberately no other list of fields anywhere in the project.

This module imports nothing from MindSpore; :func:`to_ms_dtype` imports it on first use.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

__all__ = [
    "DTYPE_NAMES",
    "ConfigValueError",
    "ConfigTypeError",
    "UnknownConfigKeyWarning",
    "FieldSpec",
    "Field",
    "Link",
    "Virtual",
    "Invalid",
    "normalize_dtype_name",
    "to_ms_dtype",
]

#: The dtype names a config may hold. Configs keep dtypes as these strings so that they stay
#: YAML-serialisable and cheap to import; layers convert with :func:`to_ms_dtype`.
DTYPE_NAMES = ("float32", "float16", "bfloat16")

_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "single": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}

_MAX_REPR = 80


# ----------------------------------------------------------------------------------------------
# Errors and warnings
# ----------------------------------------------------------------------------------------------

def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # pylint: disable=broad-except
        # A value whose repr itself fails must still produce a readable error.
        text = f"<{type(value).__name__} object>"
    if len(text) > _MAX_REPR:
        text = text[:_MAX_REPR - 3] + "..."
    return text


class _ConfigErrorMixin:
    """Carries the structured parts of a config error for callers that display them (the lab)."""

    config: str
    field: str
    value: Any
    allowed: str

    def _init_parts(self, config: str, field: str, value: Any, allowed: str,
                    detail: Optional[str]) -> str:
        self.config = config
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = _short_repr(value)
        if isinstance(self, TypeError):
            shown += f" (type {type(value).__name__})"
        message = f"{config}.{field}: got {shown}; allowed: {allowed}"
        if detail:
            message += f" ({detail})"
        return message


class ConfigValueError(_ConfigErrorMixin, ValueError):
    """A config field received a value of the right type that is not allowed.

    Attributes:
        config: Name of the config class, e.g. ``'TransformerConfig'``.
        field: Name of the field (the canonical name, not an alias).
        value: The rejected value.
        allowed: Human-readable description of what is allowed.
    """

    def __init__(self, config: str, field: str, value: Any, allowed: str,
                 detail: Optional[str] = None):
        super().__init__(self._init_parts(config, field, value, allowed, detail))


class ConfigTypeError(_ConfigErrorMixin, TypeError):
    """A config field received a value of the wrong type (same attributes as ConfigValueError)."""

    def __init__(self, config: str, field: str, value: Any, allowed: str,
                 detail: Optional[str] = None):
        super().__init__(self._init_parts(config, field, value, allowed, detail))


class UnknownConfigKeyWarning(UserWarning):
    """A config received a keyword (or YAML key) it does not know; the value is kept as is."""


class Invalid(Exception):
    """Raised by value checkers; the field turns it into ConfigValueError/ConfigTypeError.

    Args:
        detail: What is wrong, shown after the allowed values.
        type_error: True when the value has the wrong type rather than a wrong value.
        allowed: Overrides the field's own description of the allowed values.
    """

    def __init__(self, detail: Optional[str] = None, type_error: bool = False,
                 allowed: Optional[str] = None):
        super().__init__(detail)
        self.detail = detail
        self.type_error = type_error
        self.allowed = allowed


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

def normalize_dtype_name(value: Any) -> str:
    """Canonical dtype name ('float32', 'float16' or 'bfloat16') for a name or dtype object.

    Accepts the canonical names in any case, the short forms fp32/fp16/bf16/half/float, and dtype
    objects of MindSpore, NumPy or PyTorch (Megatron's argument namespace holds torch dtypes).

    Raises:
        TypeError: ``value`` is neither a string nor a framework dtype.
        ValueError: the name is not one of the supported floating-point dtypes.
    """
    if isinstance(value, str):
        text = value
    elif (type(value).__module__ or "").split(".")[0] in ("mindspore", "numpy", "torch") or \
            isinstance(value, type) and (value.__module__ or "").split(".")[0] == "numpy":
        text = getattr(value, "__name__", None) if isinstance(value, type) else str(value)
    else:
        raise TypeError(f"a dtype must be a string such as 'float32' or a framework dtype, "
                        f"got {_short_repr(value)} (type {type(value).__name__})")
    name = text.strip().lower()
    for prefix in ("mindspore.", "mstype.", "torch.", "numpy.", "np."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {_short_repr(value)}; allowed: {', '.join(DTYPE_NAMES)}")
    return name


def to_ms_dtype(name: Any):
    """Convert a config dtype name to the MindSpore dtype (imports MindSpore on first use).

    Args:
        name: A dtype name as held by the configs ('float32', 'float16', 'bfloat16'), one of the
            accepted spellings (see :func:`normalize_dtype_name`), or a MindSpore dtype.

    Returns:
        The ``mindspore.common.dtype`` object.

    Raises:
        TypeError, ValueError: as :func:`normalize_dtype_name`.
    """
    canonical = normalize_dtype_name(name)
    from mindspore.common import dtype as mstype  # pylint: disable=import-outside-toplevel
    return getattr(mstype, canonical)


# ----------------------------------------------------------------------------------------------
# Value coercion per kind
# ----------------------------------------------------------------------------------------------

def _is_bool(value: Any) -> bool:
    # numpy.bool_ is not a bool subclass; recognise it by its dtype kind.
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b" \
        and getattr(value, "shape", None) == ()


_INT_LIMIT = 2 ** 63 - 1


def _bounded(number: int) -> int:
    # Sizes beyond int64 are never meaningful and could not even be printed or saved.
    if abs(number) > _INT_LIMIT:
        raise Invalid("too large (beyond 64-bit integers)")
    return number


def _to_int(value: Any) -> int:
    if _is_bool(value):
        raise Invalid("a bool is not an integer", type_error=True)
    if isinstance(value, numbers.Integral):
        return _bounded(int(value))
    if isinstance(value, numbers.Real):
        try:
            fvalue = float(value)
        except OverflowError:
            raise Invalid("too large") from None
        if math.isfinite(fvalue) and fvalue.is_integer():
            return _bounded(int(fvalue))
        raise Invalid("not a whole number")
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return _bounded(int(text))
        except ValueError:
            pass
        try:
            fvalue = float(text)
        except ValueError:
            raise Invalid("not a number", type_error=True) from None
        if math.isfinite(fvalue) and fvalue.is_integer():
            return _bounded(int(fvalue))
        raise Invalid("not a whole number")
    raise Invalid(type_error=True)


def _to_float(value: Any) -> float:
    if _is_bool(value):
        raise Invalid("a bool is not a number", type_error=True)
    if isinstance(value, numbers.Real):
        try:
            fvalue = float(value)
        except OverflowError:
            raise Invalid("too large") from None
    elif isinstance(value, str):
        # YAML 1.1 reads '1e-3' (no dot) as a string, so numeric strings must be accepted here.
        try:
            fvalue = float(value.strip().replace("_", ""))
        except ValueError:
            raise Invalid("not a number", type_error=True) from None
    else:
        raise Invalid(type_error=True)
    if not math.isfinite(fvalue):
        raise Invalid("must be finite")
    return fvalue


def _to_number(value: Any):
    """int stays int (a loss scale of 4294967296 should print as such), anything else -> float."""
    if not _is_bool(value) and isinstance(value, numbers.Integral):
        return _bounded(int(value))
    return _to_float(value)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_bool(value: Any) -> bool:
    if _is_bool(value):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise Invalid("not a boolean word (true/false)", type_error=True)
    raise Invalid(type_error=True)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Invalid(type_error=True)


def _to_dtype(value: Any) -> str:
    try:
        return normalize_dtype_name(value)
    except TypeError:
        raise Invalid(type_error=True) from None
    except ValueError:
        raise Invalid() from None


def _to_list(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise Invalid(type_error=True)


def _to_dict(value: Any) -> dict:
    if not hasattr(value, "keys") or not hasattr(value, "items"):
        raise Invalid(type_error=True)
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise Invalid(f"dictionary keys must be strings, got {_short_repr(key)}",
                          type_error=True)
        out[key] = item
    return out


def _to_any(value: Any) -> Any:
    return value


_COERCE: Dict[str, Callable[[Any], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "number": _to_number,
    "bool": _to_bool,
    "str": _to_str,
    "dtype": _to_dtype,
    "list": _to_list,
    "dict": _to_dict,
    "any": _to_any,
}

_TYPE_NAMES = {
    "int": "int",
    "float": "float",
    "number": "Union[float, int]",
    "bool": "bool",
    "str": "str",
    "dtype": "str",
    "list": "list",
    "dict": "dict",
    "any": "Any",
}

_PY_TYPES = {
    "int": int,
    "float": float,
    "number": (int, float),
    "bool": bool,
    "str": str,
    "dtype": str,
    "list": list,
    "dict": dict,
    "any": object,
}

_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "number": "a number",
    "bool": "a bool",
    "str": "a string",
    "dtype": "a dtype name",
    "list": "a list",
    "dict": "a mapping",
    "any": "any value",
}


def _fmt_num(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------
# Field metadata
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    """Everything the project knows about one config field (read-only).

    Attributes:
        name: Canonical attribute name, e.g. ``'hidden_size'``.
        config: Name of the owning config class, e.g. ``'TransformerConfig'``.
        section: The owning config's top-level YAML key, e.g. ``'model_config'``.
        type: Type description, e.g. ``'int'``, ``'Optional[int]'``, ``'str'``.
        python_type: The Python type (or tuple of types) of a non-None value.
        default: Default value (``None`` when the field has no default or a derived one).
        help: One-line description.
        choices: Allowed values for closed sets (``None`` may be among them), else ``None``.
        min_value: Lower bound of numeric fields, else ``None``.
        max_value: Upper bound of numeric fields, else ``None``.
        min_inclusive: Whether ``min_value`` itself is allowed.
        max_inclusive: Whether ``max_value`` itself is allowed.
        nullable: Whether ``None`` is accepted.
        required: True for arguments documented without a default (they may still be left
            ``None`` while a config is being built; model construction checks them).
        aliases: Other keys accepted for this field in keyword arguments and YAML.
        megatron_names: Megatron argument names mapped onto this field by
            ``init_configs_from_args``.
        group: Topic used to group widgets (``'attention'``, ``'precision'``, ...).
        derived_default: When the default is computed from other fields, how (else ``None``).
        allowed: Human-readable description of the allowed values (used in error messages).
        kind: ``'value'`` for stored fields; ``'virtual'`` for accepted spellings that write into
            other fields and are not saved themselves (e.g. ``gradient_accumulation_steps``).
        targets: For virtual fields, the ``section.field`` paths they write to.
        effect: (property) The field's status from :mod:`.effects`.
    """

    name: str
    config: str
    section: str
    type: str
    python_type: Any
    default: Any
    help: str
    choices: Optional[Tuple[Any, ...]] = None
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    min_inclusive: bool = True
    max_inclusive: bool = True
    nullable: bool = False
    required: bool = False
    aliases: Tuple[str, ...] = ()
    megatron_names: Tuple[str, ...] = ()
    group: str = "general"
    derived_default: Optional[str] = None
    allowed: str = ""
    kind: str = "value"
    targets: Tuple[str, ...] = ()

    @property
    def effect(self):
        """What the code does with this field (:class:`~.effects.Effect`: works, device-bound
        or refused; None for a field not yet in the registry)."""
        from .effects import effect_of  # pylint: disable=import-outside-toplevel

        return effect_of(self.section, self.name)


# ----------------------------------------------------------------------------------------------
# Descriptors
# ----------------------------------------------------------------------------------------------

class Field:
    """A stored, validated config field (a data descriptor on the config class).

    Args:
        kind: 'int', 'float', 'number', 'bool', 'str', 'dtype', 'list', 'dict' or 'any'.
        default: The documented default. Mutable defaults are copied per instance.
        help: One-line help text.
        nullable: Whether None is accepted (default: True exactly when ``default`` is None).
        required: Documented without a default.
        choices: Closed set of allowed values; strings match case-insensitively and are stored
            in the spelling given here.
        value_aliases: Extra spellings of choices, e.g. ``{'learned_absolute': 'absolute'}``.
        ge, gt, le, lt: Numeric bounds.
        aliases: Other keyword/YAML names of the field.
        megatron: Megatron argument names (``True`` means the field's own name).
        group: Widget grouping topic.
        derived: ``f(config) -> value`` used when the stored value is None.
        derived_doc: Human description of ``derived``.
        check: ``f(value) -> value`` run after the generic checks; raises :class:`Invalid`.
        type_name: Overrides the generated type description.
        python_type: Overrides the Python type reported in the metadata.
        allowed: Overrides the generated description of allowed values.
    """

    # pylint: disable-next=redefined-builtin
    def __init__(self, kind: str, default: Any = None, help: str = "", *,
                 nullable: Optional[bool] = None, required: bool = False,
                 choices: Optional[Iterable[Any]] = None,
                 value_aliases: Optional[Dict[str, Any]] = None,
                 ge: Optional[float] = None, gt: Optional[float] = None,
                 le: Optional[float] = None, lt: Optional[float] = None,
                 aliases: Iterable[str] = (), megatron: Any = (), group: str = "general",
                 derived: Optional[Callable[[Any], Any]] = None,
                 derived_doc: Optional[str] = None,
                 check: Optional[Callable[[Any], Any]] = None,
                 type_name: Optional[str] = None, allowed: Optional[str] = None,
                 python_type: Any = None):
        if kind not in _COERCE:
            raise ValueError(f"unknown field kind {kind!r}")
        self.kind = kind
        self.default = default
        self.help = help
        self.nullable = (default is None) if nullable is None else nullable
        self.required = required
        self.choices = tuple(choices) if choices is not None else None
        self.value_aliases = {str(k).lower(): v for k, v in (value_aliases or {}).items()}
        self.min_value = ge if ge is not None else gt
        self.min_inclusive = gt is None
        self.max_value = le if le is not None else lt
        self.max_inclusive = lt is None
        self.aliases = tuple(aliases)
        self._megatron = megatron
        self.group = group
        self.derived = derived
        self.derived_doc = derived_doc
        self.check = check
        self._type_name = type_name
        self._allowed = allowed
        self._python_type = python_type
        self.name = "<unnamed>"
        self.owner_name = "<config>"

    # -- descriptor protocol -------------------------------------------------------------------

    def __set_name__(self, owner, name):
        self.name = name
        self.owner_name = owner.__name__

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.name)
        if value is None and self.derived is not None:
            return self.derived(obj)
        return value

    def __set__(self, obj, value):
        obj._set_field(self.name, value)  # pylint: disable=protected-access

    # -- metadata ------------------------------------------------------------------------------

    @property
    def megatron_names(self) -> Tuple[str, ...]:
        if self._megatron is True:
            return (self.name,)
        if isinstance(self._megatron, str):
            return (self._megatron,)
        return tuple(self._megatron)

    def type_description(self) -> str:
        base = self._type_name or _TYPE_NAMES[self.kind]
        if self.nullable and not base.startswith("Optional["):
            return f"Optional[{base}]"
        return base

    def describe(self) -> str:
        """Human-readable description of the allowed values."""
        if self._allowed:
            text = self._allowed
        elif self.choices is not None:
            shown = [repr(c) for c in self.choices if c is not None]
            text = "one of " + ", ".join(shown)
        elif self.kind == "dtype":
            text = "one of " + ", ".join(repr(d) for d in DTYPE_NAMES)
        else:
            text = _KIND_WORDS[self.kind]
            low, high = self.min_value, self.max_value
            if low is not None and high is not None:
                text += (f" in {'[' if self.min_inclusive else '('}{_fmt_num(low)}, "
                         f"{_fmt_num(high)}{']' if self.max_inclusive else ')'}")
            elif low is not None:
                text += f" {'>=' if self.min_inclusive else '>'} {_fmt_num(low)}"
            elif high is not None:
                text += f" {'<=' if self.max_inclusive else '<'} {_fmt_num(high)}"
        if self.nullable and "None" not in text:
            text = "None or " + text
        return text

    def spec(self, config_name: str, section: str) -> FieldSpec:
        """This field's :class:`FieldSpec` as seen from the config class ``config_name``."""
        choices = self.choices
        if choices is None and self.kind == "dtype":
            choices = DTYPE_NAMES
        if choices is not None and self.nullable and None not in choices:
            choices = (None,) + tuple(choices)
        return FieldSpec(
            name=self.name, config=config_name, section=section,
            type=self.type_description(),
            python_type=self._python_type or _PY_TYPES[self.kind],
            default=copy.deepcopy(self.default), help=self.help, choices=choices,
            min_value=self.min_value, max_value=self.max_value,
            min_inclusive=self.min_inclusive, max_inclusive=self.max_inclusive,
            nullable=self.nullable, required=self.required, aliases=self.aliases,
            megatron_names=self.megatron_names, group=self.group,
            derived_default=self.derived_doc, allowed=self.describe(), kind="value")

    # -- validation ----------------------------------------------------------------------------

    def coerce(self, value: Any, config_name: Optional[str] = None) -> Any:
        """Check ``value`` and return it in canonical form (the form the config stores).

        Raises:
            ConfigTypeError: wrong type.
            ConfigValueError: right type, value not allowed.
        """
        owner = config_name or self.owner_name
        if value is None:
            if self.nullable:
                return None
            raise ConfigTypeError(owner, self.name, value, self.describe(), "None is not allowed")
        try:
            result = _COERCE[self.kind](value)
            if self.choices is not None:
                result = self._match_choice(result)
            self._check_range(result)
            if self.check is not None:
                result = self.check(result)
        except Invalid as err:
            cls = ConfigTypeError if err.type_error else ConfigValueError
            detail = err.detail
            if detail is None and err.type_error and self.kind != "any":
                detail = f"expected {_KIND_WORDS[self.kind]}"
            raise cls(owner, self.name, value, err.allowed or self.describe(), detail) from None
        return result

    def _match_choice(self, value: Any) -> Any:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in self.value_aliases:
                return self.value_aliases[low]
            for choice in self.choices:
                if isinstance(choice, str) and choice.lower() == low:
                    return choice
            if low in ("none", "null") and None in self.choices:
                return None
            raise Invalid()
        if value in self.choices:
            return value
        raise Invalid()

    def _check_range(self, value: Any) -> None:
        if self.kind not in ("int", "float", "number"):
            return
        low, high = self.min_value, self.max_value
        if low is not None and (value < low if self.min_inclusive else value <= low):
            raise Invalid()
        if high is not None and (value > high if self.max_inclusive else value >= high):
            raise Invalid()

    def fresh_default(self) -> Any:
        """The default value, copied so that instances never share a mutable default."""
        if isinstance(self.default, (list, dict)):
                return copy.deepcopy(self.default)
        return self.default


class Link:
    """A reference to another config (e.g. ``TransformerConfig.parallel_config``).

    Links are not fields: they are wired by the loaders (one top-level YAML section per config)
    and are not written by ``to_dict``. ``None`` asks the owning config for a default instance.

    Args:
        target: Name of the linked config class.
        help: One-line help text.
    """

    def __init__(self, target: str, help: str = ""):  # pylint: disable=redefined-builtin
        self.target = target
        self.help = help
        self.name = "<unnamed>"
        self.owner_name = "<config>"

    def __set_name__(self, owner, name):
        self.name = name
        self.owner_name = owner.__name__

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.__dict__.get(self.name)

    def __set__(self, obj, value):
        obj._set_link(self.name, value)  # pylint: disable=protected-access


class Virtual:
    """A spelling accepted for convenience that writes into other fields and is not saved.

    Examples are MindFormers' ``gradient_accumulation_steps`` (stored as
    ``dataset_config.micro_batch_num``) and Megatron's ``adam_beta1`` (stored in ``betas``). The
    owning config class implements ``_get_virtual(name)`` and ``_apply_virtuals(values)``.

    Args:
        kind: Value kind, as for :class:`Field` (used to check the value first).
        help: One-line help text.
        targets: ``section.field`` paths written by this spelling (for the metadata).
        **field_kwargs: Checks as for :class:`Field` (``ge``, ``choices``, ``check``, ...).
    """

    # pylint: disable-next=redefined-builtin
    def __init__(self, kind: str, help: str = "", *, targets: Iterable[str] = (),
                 **field_kwargs):
        field_kwargs.setdefault("nullable", False)
        self.field = Field(kind, None, help, **field_kwargs)
        self.help = help
        self.targets = tuple(targets)
        self.name = "<unnamed>"
        self.owner_name = "<config>"

    def __set_name__(self, owner, name):
        self.name = name
        self.owner_name = owner.__name__
        self.field.__set_name__(owner, name)

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj._get_virtual(self.name)  # pylint: disable=protected-access

    def __set__(self, obj, value):
        obj._set_virtuals({self.name: value})  # pylint: disable=protected-access

    @property
    def aliases(self) -> Tuple[str, ...]:
        return self.field.aliases

    @property
    def megatron_names(self) -> Tuple[str, ...]:
        return self.field.megatron_names

    def coerce(self, value: Any, config_name: Optional[str] = None) -> Any:
        """Check the value as the field rules say (see :meth:`Field.coerce`)."""
        return self.field.coerce(value, config_name)

    def spec(self, config_name: str, section: str) -> FieldSpec:
        """Metadata of this virtual field (``kind='virtual'``, ``targets`` set)."""
        base = self.field.spec(config_name, section)
        return dataclasses.replace(base, kind="virtual", targets=self.targets, nullable=False,
                                   default=None)
