"""BaseConfig: construction, validation on assignment, dict round trip and equality.

A subclass only declares its fields (:class:`~.fields.Field`), links to other configs
(:class:`~.fields.Link`) and convenience spellings (:class:`~.fields.Virtual`) as class
attributes, in the documented argument order, and overrides :meth:`BaseConfig._cross_check` for
rules that involve several fields.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import warnings
from typing import Any, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple

from .effects import check_refused
from .fields import (
    ConfigTypeError,
    ConfigValueError,
    Field,
    FieldSpec,
    Link,
    UnknownConfigKeyWarning,
    Virtual,
)

__all__ = ["BaseConfig", "config_class", "registered_configs", "to_plain"]

_REGISTRY: Dict[str, type] = {}


def registered_configs() -> Dict[str, type]:
    """All config classes by class name (in definition order)."""
    return dict(_REGISTRY)


def config_class(name: str) -> type:
    """The config class called ``name`` (e.g. ``'TransformerConfig'``)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown config class {name!r}; known: {', '.join(_REGISTRY)}") from None


def to_plain(value: Any) -> Any:
    """A copy of ``value`` made of YAML-safe containers (tuples become lists)."""
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    return value


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(to_plain(a) == to_plain(b))
    except Exception:  # pylint: disable=broad-except
        # Objects with an unusual __eq__ (arrays) count as different: the caller then reports them.
        return a is b


class _Alias:
    """Attribute access under an alias reads and writes the canonical field."""

    def __init__(self, target: str):
        self.target = target

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj, self.target)

    def __set__(self, obj, value):
        setattr(obj, self.target, value)


class BaseConfig:
    """Common behaviour of all config classes.

    * Construction: positional arguments follow the documented signature; keywords may use the
      field name or any alias. Unknown keywords are kept as attributes and reported with an
      :class:`~.fields.UnknownConfigKeyWarning` (a typo should not pass silently).
    * Every assignment to a field is checked (type, allowed values, cross-field rules); a
      rejected assignment leaves the config unchanged. Use :meth:`update` to change several
      fields that must change together.
    * :meth:`to_dict` / :meth:`from_dict` round-trip; ``==`` compares field values, unknown
      extras and the linked configs.
    """

    #: Top-level YAML key of this config, e.g. ``'model_config'``.
    section: ClassVar[str] = ""

    _fields: ClassVar[Dict[str, Field]] = {}
    _links: ClassVar[Dict[str, Link]] = {}
    _virtuals: ClassVar[Dict[str, Virtual]] = {}
    _aliases: ClassVar[Dict[str, str]] = {}
    _order: ClassVar[Tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fields: Dict[str, Field] = {}
        links: Dict[str, Link] = {}
        virtuals: Dict[str, Virtual] = {}
        order: List[str] = []
        for name, attr in cls.__dict__.items():
            if isinstance(attr, Field):
                fields[name] = attr
            elif isinstance(attr, Link):
                links[name] = attr
            elif isinstance(attr, Virtual):
                virtuals[name] = attr
            else:
                continue
            order.append(name)
        names = set(order)
        aliases: Dict[str, str] = {}
        for name, decl in list(fields.items()) + list(virtuals.items()):
            for alias in decl.aliases:
                if alias in names or alias in aliases:
                    raise TypeError(f"{cls.__name__}: alias {alias!r} of {name!r} is ambiguous")
                aliases[alias] = name
                # Code written against either spelling (e.g. attention_dropout_rate) works.
                setattr(cls, alias, _Alias(name))
        cls._fields = fields
        cls._links = links
        cls._virtuals = virtuals
        cls._aliases = aliases
        cls._order = tuple(order)
        cls.__signature__ = cls._build_signature()
        _REGISTRY[cls.__name__] = cls

    @classmethod
    def _build_signature(cls) -> inspect.Signature:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
        for name in cls._order:
            decl = cls.__dict__[name]
            default = decl.default if isinstance(decl, Field) else None
            params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            default=default))
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        # inspect drops the bound first parameter itself when it shows the class signature.
        return inspect.Signature(params[1:])

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    def __init__(self, *args, **kwargs):
        cname = type(self).__name__
        state = self.__dict__
        state["_initializing"] = True
        # Only during construction do values given together get checked for agreement.
        state["_constructing"] = True
        state["_explicit"] = set()
        state["_extra_keys"] = []
        if len(args) > len(self._order):
            raise TypeError(f"{cname}() takes at most {len(self._order)} positional arguments "
                            f"({len(args)} given)")
        given = self._canonical_kwargs(dict(zip(self._order, args)), kwargs)

        for name, field in self._fields.items():
            if name in given:
                state[name] = field.coerce(given.pop(name), cname)
                state["_explicit"].add(name)
            else:
                state[name] = field.fresh_default()
        for name in self._links:
            value = given.pop(name, None)
            state[name] = self._checked_link(name, value) if value is not None else None
            if value is not None:
                state["_explicit"].add(name)
        pending = {name: self._virtuals[name].coerce(given.pop(name), cname)
                   for name in list(given) if name in self._virtuals}
        for key, value in given.items():
            self._keep_extra(key, value)

        self._wire_links()
        if pending:
            self._apply_virtuals(pending)
        state["_initializing"] = False
        state["_constructing"] = False
        self._follow_switches()
        # Unimplemented fields are refused here, before any rule that might read them.
        check_refused(self)
        self._cross_check()

    def _canonical_kwargs(self, given: Dict[str, Any], kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """Map aliases onto field names; the same field given twice must agree."""
        cname = type(self).__name__
        spelled: Dict[str, str] = {name: name for name in given}
        for key, value in kwargs.items():
            if not isinstance(key, str):
                raise TypeError(f"{cname}: option names must be strings, got {key!r}")
            canon = self._aliases.get(key, key)
            if canon in given:
                if not _same(given[canon], value):
                    raise ConfigValueError(
                        cname, canon, value, f"the same value as {spelled[canon]!r}",
                        f"given both as {spelled[canon]!r}={given[canon]!r} and as {key!r}")
                continue
            given[canon] = value
            spelled[canon] = key
        return given

    def _keep_extra(self, key: str, value: Any) -> None:
        cname = type(self).__name__
        if key.startswith("_") or hasattr(type(self), key):
            # Such a key would shadow a method or internal state of the config.
            raise ConfigValueError(cname, key, value, "a field name of " + cname,
                                   "unknown option that clashes with an attribute of the class")
        # A close real name (field, virtual or alias) is most likely what the user meant.
        known = list(self._fields) + list(self._virtuals) + list(self._aliases)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]!r}?" if close else "; check the spelling"
        warnings.warn(f"{cname}: unknown option {key!r} (value {value!r}) is kept as an attribute "
                      f"but not used by {cname}{hint}",
                      UnknownConfigKeyWarning, stacklevel=3)
        self.__dict__[key] = value
        self.__dict__["_extra_keys"].append(key)

    def _checked_link(self, name: str, value: Any) -> Any:
        link = self._links[name]
        target = _REGISTRY.get(link.target)
        if target is not None and not isinstance(value, target):
            raise ConfigTypeError(type(self).__name__, name, value,
                                  f"a {link.target} instance (or None for the default)")
        return value

    # ------------------------------------------------------------------------------------------
    # Hooks for subclasses
    # ------------------------------------------------------------------------------------------

    def _wire_links(self) -> None:
        """Replace links left as None by default instances (subclasses decide how)."""
        for name, link in self._links.items():
            if self.__dict__.get(name) is None:
                self.__dict__[name] = _REGISTRY[link.target]()

    def _get_virtual(self, name: str) -> Any:
        raise AttributeError(name)

    def _apply_virtuals(self, values: Dict[str, Any]) -> None:
        """Write checked virtual values into the fields they stand for."""
        raise NotImplementedError(f"{type(self).__name__} declares no virtual fields")

    def _follow_switches(self) -> None:
        """Write the fields that follow an explicitly set umbrella switch (before the rules).

        Called after construction and after every change; e.g. ``add_bias_linear`` sets the
        per-layer bias switches that were not given themselves.
        """

    def _cross_check(self) -> None:
        """Rules involving several fields; raise via :meth:`_reject`."""

    def _reject(self, name: str, allowed: str, detail: Optional[str] = None,
                value: Any = None) -> None:
        if value is None:
            value = self.__dict__.get(name)
        raise ConfigValueError(type(self).__name__, name, value, allowed, detail)

    # ------------------------------------------------------------------------------------------
    # Assignment
    # ------------------------------------------------------------------------------------------

    def _set_field(self, name: str, value: Any) -> None:
        state = self.__dict__
        new = self._fields[name].coerce(value, type(self).__name__)
        if state.get("_initializing", True):
            state[name] = new
            state.setdefault("_explicit", set()).add(name)
            return
        self._transaction(lambda: (state.__setitem__(name, new), state["_explicit"].add(name)))

    def _set_link(self, name: str, value: Any) -> None:
        state = self.__dict__
        if value is None:
            state[name] = None
            self._wire_links()
            value = state[name]
        value = self._checked_link(name, value)
        if state.get("_initializing", True):
            state[name] = value
            return
        self._transaction(lambda: state.__setitem__(name, value))

    def _set_virtuals(self, values: Dict[str, Any]) -> None:
        cname = type(self).__name__
        checked = {name: self._virtuals[name].coerce(value, cname)
                   for name, value in values.items()}
        self._transaction(lambda: self._apply_virtuals(checked))

    def _transaction(self, change) -> None:
        state = self.__dict__
        saved = dict(state)
        saved_explicit = set(state["_explicit"])
        state["_initializing"] = True
        try:
            change()
            state["_initializing"] = False
            self._follow_switches()
            check_refused(self)
            self._cross_check()
        except BaseException:
            state.clear()
            state.update(saved)
            state["_explicit"] = saved_explicit
            raise
        finally:
            state["_initializing"] = False

    def update(self, **kwargs) -> "BaseConfig":
        """Change several fields at once; the cross-field rules are checked after all changes.

        Use this when fields depend on each other (e.g. ``context_parallel_algo`` and
        ``ulysses_degree_in_cp``). Nothing changes when any value is rejected.

        Returns:
            The config itself.
        """
        def change():
            given = self._canonical_kwargs({}, kwargs)
            cname = type(self).__name__
            pending = {}
            for key, value in given.items():
                if key in self._fields:
                    self._set_field(key, value)
                elif key in self._links:
                    self._set_link(key, value)
                elif key in self._virtuals:
                    pending[key] = self._virtuals[key].coerce(value, cname)
                else:
                    self._keep_extra(key, value)
            if pending:
                self._apply_virtuals(pending)
        self._transaction(change)
        return self

    # ------------------------------------------------------------------------------------------
    # Inspection, validation, serialisation
    # ------------------------------------------------------------------------------------------

    @classmethod
    def field_specs(cls, include_virtual: bool = False) -> List[FieldSpec]:
        """Metadata of every field of this class, in declaration order.

        Args:
            include_virtual: Also list the convenience spellings (``kind == 'virtual'``).
        """
        specs = []
        for name in cls._order:
            decl = cls.__dict__[name]
            if isinstance(decl, Field) or include_virtual and isinstance(decl, Virtual):
                specs.append(decl.spec(cls.__name__, cls.section))
        return specs

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """Names of the stored fields, in declaration order."""
        return tuple(cls._fields)

    @classmethod
    def links(cls) -> Dict[str, str]:
        """``{link attribute: linked config class name}``, e.g. ``{'parallel_config': ...}``."""
        return {name: link.target for name, link in cls._links.items()}

    @classmethod
    def canonical_name(cls, key: str) -> Optional[str]:
        """The field/virtual name that ``key`` (a name or an alias) stands for, else None."""
        key = cls._aliases.get(key, key)
        if key in cls._fields or key in cls._virtuals or key in cls._links:
            return key
        return None

    def explicit_fields(self) -> frozenset:
        """Names of the fields set explicitly (not left at their default)."""
        return frozenset(self.__dict__["_explicit"])

    def extra_options(self) -> Dict[str, Any]:
        """The unknown options this config was given (kept as attributes)."""
        return {key: self.__dict__[key] for key in self.__dict__["_extra_keys"]}

    def raw(self, name: str) -> Any:
        """The stored value of field ``name`` (``None`` where the attribute shows a derived one)."""
        if name not in self._fields:
            raise ValueError(f"{type(self).__name__} has no field {name!r}")
        return self.__dict__[name]

    def validate(self) -> "BaseConfig":
        """Re-run every cross-field rule on this config and the configs it links to.

        Needed after a linked config was changed on its own (the owner is not told).

        Returns:
            The config itself.
        """
        seen = set()

        def visit(config):
            if id(config) in seen:
                return
            seen.add(id(config))
            config._cross_check()  # pylint: disable=protected-access
            for name in config._links:  # pylint: disable=protected-access
                linked = config.__dict__.get(name)
                if linked is not None:
                    visit(linked)
        visit(self)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """Field values (as stored) plus the unknown options, as plain YAML-safe data.

        Linked configs are not included: each has its own top-level YAML section.
        """
        out = {name: to_plain(self.__dict__[name]) for name in self._fields}
        for key in self.__dict__["_extra_keys"]:
            out[key] = to_plain(self.__dict__[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **links) -> "BaseConfig":
        """Build a config from :meth:`to_dict` output (or a YAML section).

        Args:
            data: Field values by name or alias.
            **links: Linked configs, e.g. ``parallel_config=...``.

        Raises:
            TypeError: ``data`` is not a mapping or has non-string keys.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got "
                            f"{type(data).__name__}")
        for key in data:
            if not isinstance(key, str):
                raise TypeError(f"{cls.__name__}: option names must be strings, got {key!r}")
            if key in cls._links:
                raise ValueError(f"{cls.__name__}: {key!r} is a separate config; give it as its "
                                 f"own top-level section, not inside {cls.section!r}")
        return cls(**dict(data), **links)

    def copy(self) -> "BaseConfig":
        """A deep copy (linked configs are copied too)."""
        return copy.deepcopy(self)

    def __eq__(self, other: Any) -> bool:
        if self is other:
            return True
        if type(self) is not type(other):
            return NotImplemented
        if self.to_dict() != other.to_dict():
            return False
        return all(self.__dict__.get(name) == other.__dict__.get(name) for name in self._links)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        parts = []
        for name, field in self._fields.items():
            value = self.__dict__.get(name)
            if not _same(value, field.default):
                parts.append(f"{name}={value!r}")
        for key in self.__dict__.get("_extra_keys", ()):
            parts.append(f"{key}={self.__dict__[key]!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def iter_config_classes() -> Iterable[type]:
    """The registered config classes."""
    return tuple(_REGISTRY.values())
