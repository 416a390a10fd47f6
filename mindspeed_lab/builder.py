"""A config builder generated from the config field metadata, usable as widgets or from code.

Every field shown comes from :func:`mindspeed_ms.core.config.field_specs`: the widget kind from its
type and allowed values, its label, tooltip (the help text) and placeholder (a derived default)
from the metadata, its validation from :func:`~mindspeed_ms.core.config.validate_field` plus the
cross-field rules of the whole config, and the world-size checks from
:func:`~mindspeed_ms.core.config.validate_for_world_size` for the chosen number of workers. The
builder holds no list of fields of its own: a field added to a config class appears here.

From code (this is how the tests drive it; no browser needed)::

    b = ConfigBuilder("tiny", workers=2)
    b.set("parallel_config.tensor_model_parallel_size", 2)   # True: accepted
    b.set("model_config.hidden_size", -4)                    # False: kept aside, message shown
    b.messages          # {"model_config.hidden_size": "TransformerConfig.hidden_size: got -4; ..."}
    b.config            # a copy of the AllConfig built so far (only accepted values)
    print(b.to_yaml())  # the fields that differ from the defaults
    job = b.launch()    # a mindspeed_lab.launcher.Job with the chosen workers and device target

In a notebook, the builder displays itself (``b`` as the last expression, or ``display(b)``): a tab
per config (model, parallel, training, dataset, optimizer, MoE, LoRA), the fields grouped by topic
inside, each input followed by its validation message; presets, the number of workers, the device
target, YAML export/import and a live YAML preview on top. ``b.widget_for(path)`` returns the input
of a field: setting its ``value`` behaves exactly like typing into it.

Invalid values never enter the config: a rejected value stays in its widget with a message, and is
tried again after every other change (it may become valid, e.g. a head count that needed another
hidden size).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from mindspeed_ms.core.config import (
    SECTIONS,
    AllConfig,
    field_specs,
    init_configs_from_dict,
    validate_field,
    validate_for_world_size,
)

from . import presets as _presets
from .launcher import DEVICE_TARGETS

__all__ = ["ConfigBuilder", "SECTION_TITLES", "WORKERS_KEY"]

#: Tab titles of the YAML sections, in the order the tabs are shown. Sections the engine adds
#: later appear after these with their YAML name.
SECTION_TITLES = {
    "model_config": "Model",
    "parallel_config": "Parallel",
    "training_config": "Training",
    "dataset_config": "Dataset",
    "optimizer_config": "Optimizer",
    "moe_config": "MoE",
    "lora_config": "LoRA",
}
#: The message key of problems that belong to the number of workers rather than to one field.
WORKERS_KEY = "workers"

_ERROR_STYLE = "color:#b00020"
_WORLD_STYLE = "color:#b35900"
_OK_STYLE = "color:#1b7f3b"
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"\b([a-z_]+_config)\.([A-Za-z_][A-Za-z0-9_]*)")


def _sections() -> List[str]:
    known = [s for s in SECTION_TITLES if s in SECTIONS]
    return known + [s for s in SECTIONS if s not in known]


def _widget_kind(spec) -> str:
    """How a field is edited: 'dropdown', 'checkbox', 'int', 'float', 'str' or 'yaml' (text parsed
    as YAML, for optional numbers, lists, dicts and unions)."""
    if spec.choices:
        return "dropdown"
    if spec.nullable:
        return "str" if spec.python_type is str else "yaml"
    if spec.python_type is bool:
        return "checkbox"
    if spec.python_type is int:
        return "int"
    if spec.python_type is float:
        return "float"
    if spec.python_type is str:
        return "str"
    return "yaml"


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (how YAML gives values back)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _to_text(kind: str, value: Any) -> str:
    if value is None:
        return ""
    if kind == "str":
        return str(value)
    text = yaml.safe_dump(_plain(value), default_flow_style=True, allow_unicode=True, sort_keys=False).strip()
    # safe_dump ends a scalar document with an explicit end marker
    return text[:-4].strip() if text.endswith("\n...") else text


def _choice_label(choice: Any) -> str:
    return "None" if choice is None else str(choice)


def _choice_value(spec, label: str) -> Any:
    for choice in spec.choices:
        if _choice_label(choice) == label:
            return choice
    return label


class _ParseError(ValueError):
    pass


def _from_text(spec, kind: str, text: str) -> Any:
    if text.strip() == "" and (spec.nullable or kind == "yaml"):
        return None
    if kind == "str":
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _ParseError(f"{spec.config}.{spec.name}: got {text!r}; allowed: {spec.allowed or spec.type} "
                          f"written in YAML, e.g. 64, 1.0e-3, [0.9, 0.95] or {{clip_value: 1.0}} "
                          f"(not valid YAML: {first})") from exc


class ConfigBuilder:
    """Builds an :class:`~mindspeed_ms.core.config.AllConfig` field by field, with live checks.

    Args:
        preset: A preset name (:func:`mindspeed_lab.presets.preset_names`), a dict of sections,
            an ``AllConfig``, a YAML file path, or None (the engine's defaults; the required
            model fields are then reported missing).
        workers: Number of msrun workers the config is checked against (and launched with).
        device_target: 'CPU', 'Ascend' or 'GPU': given to the launcher (device and, on Ascend,
            the HCCL environment).

    Attributes:
        field_errors: ``{"section.field": message}`` for values that were rejected.
        world_errors: The problems :func:`validate_for_world_size` reports for ``workers``.
        world_info: The derived sizes when the config fits ``workers`` (data-parallel size,
            global batch, ...), else None.
        status: One line about the last preset/import/export/launch action.
    """

    def __init__(self, preset: Union[None, str, Mapping[str, Any], AllConfig, os.PathLike] = "tiny",
                 workers: int = 2, device_target: str = "CPU"):
        self._specs = {section: {spec.name: spec for spec in field_specs(section)} for section in _sections()}
        self._owners: Dict[str, List[str]] = {}
        for section, specs in self._specs.items():
            for name in specs:
                self._owners.setdefault(name, []).append(section)
        self._config = AllConfig()
        self._pending: Dict[str, Any] = {}
        self.field_errors: Dict[str, str] = {}
        self.world_errors: List[str] = []
        self.world_info: Optional[Dict[str, Any]] = None
        self._world_by_key: Dict[str, List[str]] = {}
        self.status = ""
        self._workers = self._check_workers(workers)
        self._device_target = self._check_device(device_target)
        self._ui = None
        self._inputs: Dict[str, Any] = {}
        self._message_widgets: Dict[str, Any] = {}
        self._section_boxes: Dict[str, Any] = {}
        self._syncing = False
        if preset is not None:
            self.load(preset)
        else:
            self._refresh()

    # ------------------------------------------------------------------------------ lookups
    @staticmethod
    def _check_workers(workers: Any) -> int:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: got {workers!r}; allowed: an integer >= 1")
        return workers

    @staticmethod
    def _check_device(device_target: Any) -> str:
        if device_target not in DEVICE_TARGETS:
            raise ValueError(f"device_target: got {device_target!r}; allowed: one of {list(DEVICE_TARGETS)}")
        return device_target

    def key(self, path: str, name: Optional[str] = None) -> str:
        """The canonical ``"section.field"`` key of a field.

        Args:
            path: ``"section.field"`` (aliases allowed, e.g. ``"parallel_config.model_parallel"``),
                or a field name that only one section has (e.g. ``"hidden_size"``), or a section
                when ``name`` is given.
            name: The field, when ``path`` is a section.

        Raises:
            ValueError: Unknown section or field, or a bare name several sections have.
        """
        if name is not None:
            section, field = path, name
        elif "." in path:
            section, field = path.split(".", 1)
        else:
            owners = self._owners.get(path) or self._alias_owners(path)
            if not owners:
                raise ValueError(f"field: got {path!r}; allowed: a field of one of the sections "
                                 f"{list(self._specs)}, written 'section.field'")
            if len(owners) > 1:
                raise ValueError(f"field: got {path!r}, which several sections have ({', '.join(owners)}); "
                                 f"allowed: 'section.field', e.g. '{owners[0]}.{path}'")
            section, field = owners[0], path
        if section not in self._specs:
            raise ValueError(f"section: got {section!r}; allowed: one of {list(self._specs)}")
        cls = SECTIONS[section]
        canon = cls.canonical_name(field)
        if canon not in self._specs[section]:
            raise ValueError(f"{section}: got field {field!r}; allowed: one of {sorted(self._specs[section])}")
        return f"{section}.{canon}"

    def _alias_owners(self, name: str) -> List[str]:
        return [section for section in self._specs if SECTIONS[section].canonical_name(name) in self._specs[section]]

    def spec(self, path: str):
        """The :class:`~mindspeed_ms.core.config.FieldSpec` of a field."""
        section, name = self.key(path).split(".", 1)
        return self._specs[section][name]

    def fields(self, section: Optional[str] = None) -> List[str]:
        """Keys of every field (of one section), in the order the widgets show them."""
        sections = [section] if section is not None else list(self._specs)
        return [f"{s}.{n}" for s in sections for n in self._specs[s]]

    # ------------------------------------------------------------------------------ values
    @property
    def config(self) -> AllConfig:
        """A copy of the config built so far (accepted values only)."""
        return self._config.copy()

    @property
    def workers(self) -> int:
        """Number of workers the config is checked against and launched with."""
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = self._check_workers(value)
        if self._ui is not None and self._workers_widget.value != value:
            self._syncing = True
            try:
                self._workers_widget.value = value
            finally:
                self._syncing = False
        self._refresh()

    @property
    def device_target(self) -> str:
        """'CPU', 'Ascend' or 'GPU' (given to the launcher)."""
        return self._device_target

    @device_target.setter
    def device_target(self, value: str) -> None:
        self._device_target = self._check_device(value)
        if self._ui is not None and self._device_widget.value != value:
            self._syncing = True
            try:
                self._device_widget.value = value
            finally:
                self._syncing = False
        self._refresh()

    def get(self, path: str, name: Optional[str] = None) -> Any:
        """The value a field shows: a rejected value if one is pending, else the stored value
        (``None`` for a derived default; :meth:`resolved` gives the value in effect)."""
        key = self.key(path, name)
        if key in self._pending:
            return self._pending[key]
        section, field = key.split(".", 1)
        return self._config[section].raw(field)

    def resolved(self, path: str, name: Optional[str] = None) -> Any:
        """The value in effect for a field (derived defaults computed)."""
        section, field = self.key(path, name).split(".", 1)
        return getattr(self._config[section], field)

    def set(self, path: str, value: Any, name: Optional[str] = None) -> bool:
        """Set one field, as typing into its widget would.

        The value is checked with ``validate_field`` (type, allowed values, range, the rules of
        its config) and then with the rules of every config (links between sections). Accepted
        values enter the config; a rejected value is kept aside with its message and tried again
        after later changes.

        Args:
            path: ``"section.field"`` (or see :meth:`key`).
            value: The new value (``None`` for a derived or empty default where allowed).
            name: The field, when ``path`` is a section name.

        Returns:
            Whether the value was accepted.
        """
        key = self.key(path, name) if name is not None else self.key(path)
        accepted = self._apply(key, value)
        if accepted:
            self._retry_pending()
        self._sync_widget(key)
        self._refresh()
        return accepted

    def update(self, values: Mapping[str, Any]) -> Dict[str, bool]:
        """Set many fields: ``{"section.field": value}`` or ``{"section": {field: value}}``.

        Returns:
            ``{key: accepted}`` after every value was tried (order does not matter: rejected
            values are retried once the others are in).
        """
        flat: Dict[str, Any] = {}
        for path, value in values.items():
            if path in self._specs and isinstance(value, Mapping):
                for name, inner in value.items():
                    flat[self.key(path, name)] = inner
            else:
                flat[self.key(path)] = value
        for key, value in flat.items():
            if self._apply(key, value):
                self._retry_pending()
        self._retry_pending()
        for key in flat:
            self._sync_widget(key)
        self._refresh()
        return {key: key not in self._pending for key in flat}

    def _apply(self, key: str, value: Any) -> bool:
        section, name = key.split(".", 1)
        trial = self._config.copy()
        try:
            validate_field(section, name, value, config=trial[section])
            setattr(trial[section], name, value)
            # rules of the other configs that read this one (e.g. the model reads the parallel sizes)
            trial.validate()
        except (TypeError, ValueError) as exc:
            self._pending[key] = value
            self.field_errors[key] = str(exc)
            return False
        self._config = trial
        self._pending.pop(key, None)
        self.field_errors.pop(key, None)
        return True

    def _retry_pending(self) -> None:
        progress = True
        while progress and self._pending:
            progress = False
            for key, value in list(self._pending.items()):
                if self._apply(key, value):
                    progress = True
                    self._sync_widget(key)
            if not progress and len(self._pending) > 1:
                # Values that are only valid together (e.g. model_config.seq_length and
                # dataset_config.seq_length, which must agree) fail one at a time: try them as one change.
                progress = self._apply_together(dict(self._pending))

    def _apply_together(self, values: Mapping[str, Any]) -> bool:
        trial = self._config.copy()
        remaining = dict(values)
        moved = True
        while remaining and moved:
            # each assignment checks its own config's rules: a value another one makes valid goes in after it
            moved = False
            for key, value in list(remaining.items()):
                section, name = key.split(".", 1)
                try:
                    setattr(trial[section], name, value)
                except (TypeError, ValueError):
                    continue
                del remaining[key]
                moved = True
        try:
            if remaining:
                return False
            trial.validate()
        except (TypeError, ValueError):
            return False
        self._config = trial
        for key in values:
            self._pending.pop(key, None)
            self.field_errors.pop(key, None)
            self._sync_widget(key)
        return True

    def reset(self, path: str, name: Optional[str] = None) -> bool:
        """Set a field back to its default (drops a pending rejected value)."""
        key = self.key(path, name)
        self._pending.pop(key, None)
        self.field_errors.pop(key, None)
        return self.set(key, self.spec(key).default)

    # ------------------------------------------------------------------------------ messages
    def _attribute(self, problem: str) -> List[str]:
        """Field keys a world-size problem names (``section.field`` or a field name)."""
        keys: List[str] = []
        for section, name in _DOTTED.findall(problem):
            if section in self._specs:
                canon = SECTIONS[section].canonical_name(name)
                if canon in self._specs[section]:
                    keys.append(f"{section}.{canon}")
        stripped = _DOTTED.sub(" ", problem)
        for word in _WORD.findall(stripped):
            owners = self._owners.get(word)
            if not owners:
                continue
            # a name several sections share (seq_length, seed, ...): the sections that set it
            chosen = [s for s in owners if self._config[s].raw(word) is not None] or owners
            keys.extend(f"{s}.{word}" for s in chosen)
        return list(dict.fromkeys(keys))

    def _check_world(self) -> None:
        self.world_errors, self.world_info, self._world_by_key = [], None, {}
        try:
            self.world_info = validate_for_world_size(self._config, self._workers)
        except ValueError as exc:
            lines = str(exc).splitlines()
            problems = [ln.strip()[2:] for ln in lines[1:] if ln.strip().startswith("- ")] or [str(exc)]
            self.world_errors = problems
            for problem in problems:
                for key in self._attribute(problem) or [WORKERS_KEY]:
                    self._world_by_key.setdefault(key, []).append(problem)

    @property
    def messages(self) -> Dict[str, str]:
        """Every current message: ``{"section.field": text}`` plus ``"workers"`` for world-size
        problems that name no field. A field rejected and named by a world-size problem shows both."""
        out: Dict[str, str] = dict(self.field_errors)
        for key, problems in self._world_by_key.items():
            text = "; ".join(f"for {self._workers} workers: {p}" for p in problems)
            out[key] = f"{out[key]}; {text}" if key in out else text
        return out

    def message(self, path: str) -> str:
        """The message next to one field ('' when it is fine); ``"workers"`` for the workers input."""
        key = WORKERS_KEY if path == WORKERS_KEY else self.key(path)
        return self.messages.get(key, "")

    @property
    def ok(self) -> bool:
        """Whether every value was accepted and the config fits the number of workers."""
        return not self.field_errors and not self.world_errors

    def problems(self) -> List[str]:
        """Every problem as one line (rejected values first, then world-size problems)."""
        return [f"{key}: {msg}" for key, msg in self.field_errors.items()] + \
               [f"for {self._workers} workers: {p}" for p in self.world_errors]

    # ------------------------------------------------------------------------------ YAML
    def to_dict(self, full: bool = False) -> Dict[str, Dict[str, Any]]:
        """The config as sections of plain data.

        Args:
            full: Every field (``AllConfig.to_dict``); by default only the fields whose value
                differs from the default, plus unknown options kept from an import (loading the
                result gives an equal config).
        """
        data = self._config.to_dict()
        if full:
            return data
        compact: Dict[str, Dict[str, Any]] = {}
        for section, values in data.items():
            specs = self._specs.get(section, {})
            kept = {}
            for name, value in values.items():
                spec = specs.get(name)
                if spec is None or _plain(value) != _plain(spec.default):
                    kept[name] = value
            if kept:
                compact[section] = kept
        return compact

    def to_yaml(self, full: bool = False) -> str:
        """The YAML text of :meth:`to_dict` (what Export writes and the preview shows)."""
        if full:
            return self._config.to_yaml()
        data = _plain(self.to_dict())
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True) if data else "{}\n"

    def save_yaml(self, path: Union[str, os.PathLike], full: bool = False) -> Path:
        """Write :meth:`to_yaml` to ``path`` (rejected values are not part of it). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(full=full), encoding="utf-8")
        self.status = f"exported to {path}" + ("" if not self.field_errors else
                                               f" (without the {len(self.field_errors)} rejected values)")
        self._refresh()
        return path

    def load(self, source: Union[str, Mapping[str, Any], AllConfig, os.PathLike]) -> "ConfigBuilder":
        """Replace the whole config: a preset name, a YAML file path, YAML text, a dict of
        sections or an AllConfig. Rejected values are dropped.

        Raises:
            ValueError, TypeError: When the source cannot be read or is not a valid config (the
                builder keeps its current config).
        """
        if isinstance(source, AllConfig):
            config = source.copy()
            label = "config"
        elif isinstance(source, Mapping):
            config = init_configs_from_dict(dict(source))
            label = "dict"
        elif isinstance(source, (str, os.PathLike)):
            text = os.fspath(source)
            if isinstance(source, str) and source in _presets.preset_names():
                config = init_configs_from_dict(_presets.load_preset(source))
                label = f"preset {source}"
            elif "\n" not in text and Path(text).suffix in (".yaml", ".yml"):
                if not Path(text).is_file():
                    raise ValueError(f"load: got {text!r}; allowed: a preset ({_presets.preset_names()}), "
                                     "an existing YAML file, YAML text or a dict of sections")
                with open(text, encoding="utf-8") as handle:
                    config = init_configs_from_dict(yaml.safe_load(handle) or {})
                label = text
            else:
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    raise ValueError(f"load: the text is not valid YAML: {exc}") from exc
                if not isinstance(data, Mapping):
                    raise ValueError(f"load: got {text[:60]!r}; allowed: a preset ({_presets.preset_names()}), "
                                     "a YAML file path, YAML text of sections or a dict of sections")
                config = init_configs_from_dict(dict(data))
                label = "YAML text"
        else:
            raise TypeError(f"load: got a {type(source).__name__}; allowed: a preset name, a YAML path or "
                            "text, a dict of sections or an AllConfig")
        self._config = config
        self._pending.clear()
        self.field_errors.clear()
        self.status = f"loaded {label}"
        self._sync_all_widgets()
        self._refresh()
        return self

    def apply_preset(self, name: str) -> "ConfigBuilder":
        """Load a preset (see :func:`mindspeed_lab.presets.preset_names`)."""
        _presets.preset_path(name)  # names the allowed presets when unknown
        return self.load(name)

    def load_yaml(self, path_or_text: Union[str, os.PathLike]) -> "ConfigBuilder":
        """Import a YAML file (or YAML text)."""
        return self.load(path_or_text)

    # ------------------------------------------------------------------------------ launching
    def job(self, strict: bool = True, **job_kwargs):
        """A :class:`~mindspeed_lab.launcher.Job` for this config, workers and device target (not started).

        Args:
            strict: Refuse when there are problems (rejected values or a world-size mismatch).
            **job_kwargs: More :class:`~mindspeed_lab.launcher.Job` arguments (name, runs_root, ...).

        Raises:
            ValueError: With ``strict``, listing every problem.
        """
        from .launcher import Job  # pylint: disable=import-outside-toplevel

        if strict and not self.ok:
            raise ValueError("the config has problems; fix them or pass strict=False:\n  - "
                             + "\n  - ".join(self.problems()))
        job_kwargs.setdefault("device_target", self._device_target)
        return Job(self._config.copy(), workers=self._workers, **job_kwargs)

    def launch(self, strict: bool = True, **job_kwargs):
        """:meth:`job` and start it; returns the started job."""
        job = self.job(strict=strict, **job_kwargs).start()
        self.status = f"launched {job.name} in {job.run_dir}"
        self._refresh()
        return job

    # ------------------------------------------------------------------------------ widgets
    @property
    def ui(self):
        """The ipywidgets form (built on first use)."""
        if self._ui is None:
            self._build_ui()
        return self._ui

    def _ipython_display_(self):
        from IPython.display import display  # pylint: disable=import-outside-toplevel
        display(self.ui)

    def widget_for(self, path: str, name: Optional[str] = None):
        """The input widget of a field (``"workers"``: the workers input); builds it if needed."""
        if path == WORKERS_KEY and name is None:
            self.ui  # pylint: disable=pointless-statement
            return self._workers_widget
        key = self.key(path, name)
        self.ui  # pylint: disable=pointless-statement
        self._ensure_section(key.split(".", 1)[0])
        return self._inputs[key]

    def message_widget(self, path: str, name: Optional[str] = None):
        """The HTML widget that shows a field's message (``"workers"`` for the workers input)."""
        if path == WORKERS_KEY and name is None:
            self.ui  # pylint: disable=pointless-statement
            return self._message_widgets[WORKERS_KEY]
        key = self.key(path, name)
        self.widget_for(key)
        return self._message_widgets[key]

    @property
    def yaml_preview(self):
        """The preview widget (an HTML ``<pre>`` of :meth:`to_yaml`)."""
        self.ui  # pylint: disable=pointless-statement
        return self._preview

    def _build_ui(self) -> None:
        import ipywidgets as w  # pylint: disable=import-outside-toplevel

        self._w = w
        label_style = {"description_width": "initial"}
        self._preset_widget = w.Dropdown(options=_presets.preset_names(), description="preset",
                                         value=None, style=label_style, layout=w.Layout(width="260px"))
        self._preset_button = w.Button(description="Apply preset", tooltip="replace the whole config by the preset")
        self._preset_button.on_click(lambda _b: self._on_apply_preset())
        self._workers_widget = w.IntText(value=self._workers, description="workers", style=label_style,
                                         tooltip="number of msrun workers the config is checked against",
                                         layout=w.Layout(width="150px"))
        self._workers_widget.observe(self._on_workers, names="value")
        self._device_widget = w.Dropdown(options=list(DEVICE_TARGETS), value=self._device_target,
                                         description="device", style=label_style, layout=w.Layout(width="170px"),
                                         tooltip="device target given to the launcher (Ascend also sets the "
                                                 "HCCL environment)")
        self._device_widget.observe(self._on_device, names="value")
        self._message_widgets[WORKERS_KEY] = w.HTML()
        self._status_widget = w.HTML()
        self._path_widget = w.Text(value="config.yaml", description="YAML file", style=label_style,
                                   layout=w.Layout(width="360px"))
        self._export_button = w.Button(description="Export", tooltip="write the YAML preview to the file")
        self._import_button = w.Button(description="Import", tooltip="replace the config by the file's")
        self._export_button.on_click(lambda _b: self._on_export())
        self._import_button.on_click(lambda _b: self._on_import())
        self._preview = w.HTML()
        preview_box = w.Accordion(children=[self._preview], titles=("YAML preview",))
        sections = list(self._specs)
        for section in sections:
            self._section_boxes[section] = w.VBox()
        self._tabs = w.Tab(children=[self._section_boxes[s] for s in sections],
                           titles=[SECTION_TITLES.get(s, s) for s in sections])
        self._tabs.observe(self._on_tab, names="selected_index")
        self._ensure_section(sections[0])
        self._ui = w.VBox([
            w.HBox([self._preset_widget, self._preset_button, self._workers_widget, self._device_widget]),
            self._message_widgets[WORKERS_KEY],
            self._status_widget,
            self._tabs,
            w.HBox([self._path_widget, self._export_button, self._import_button]),
            preview_box,
        ])
        self._refresh()

    def _on_tab(self, change) -> None:
        index = change["new"]
        if index is not None:
            self._ensure_section(list(self._specs)[index])

    def _ensure_section(self, section: str) -> None:
        """Build a section's inputs the first time it is needed (a tab opened, a widget asked for):
        a few hundred widgets take seconds to create on a busy machine."""
        box = self._section_boxes[section]
        if box.children:
            return
        w = self._w
        groups: Dict[str, List[Any]] = {}
        for name, spec in self._specs[section].items():
            key = f"{section}.{name}"
            widget = self._make_input(key, spec)
            message = w.HTML()
            self._inputs[key] = widget
            self._message_widgets[key] = message
            groups.setdefault(spec.group or "general", []).append(w.HBox([widget, message]))
        accordion = w.Accordion(children=[w.VBox(rows) for rows in groups.values()],
                                titles=tuple(groups))
        accordion.selected_index = 0
        box.children = (accordion,)
        self._update_messages()

    def _make_input(self, key: str, spec):
        w = self._w
        kind = _widget_kind(spec)
        value = self.get(key)
        common = dict(description=spec.name, tooltip=spec.help or spec.allowed,
                      style={"description_width": "260px"}, layout=w.Layout(width="520px"))
        if kind == "dropdown":
            # labels as values: ipywidgets treats a Dropdown value of None as "nothing selected"
            labels = [_choice_label(c) for c in spec.choices]
            current = value if value in spec.choices else spec.choices[0]
            widget = w.Dropdown(options=labels, value=_choice_label(current), **common)
        elif kind == "checkbox":
            widget = w.Checkbox(value=bool(value), indent=False, **common)
        elif kind == "int":
            widget = w.IntText(value=int(value) if isinstance(value, int) else 0, **common)
        elif kind == "float":
            widget = w.FloatText(value=float(value) if isinstance(value, (int, float)) else 0.0, **common)
        else:
            widget = w.Text(value=_to_text(kind, value), continuous_update=False, **common)
        widget.observe(lambda change, k=key, kd=kind: self._on_input(k, kd, change), names="value")
        self._update_placeholder(key, widget)
        return widget

    def _update_placeholder(self, key: str, widget) -> None:
        spec = self.spec(key)
        if not spec.derived_default or not hasattr(widget, "placeholder"):
            return
        try:
            current = self.resolved(key)
        except Exception:  # pylint: disable=broad-except
            current = None
        widget.placeholder = f"{spec.derived_default}" + (f" = {current}" if current is not None else "")

    def _on_input(self, key: str, kind: str, change) -> None:
        if self._syncing:
            return
        value = change["new"]
        if kind == "dropdown":
            value = _choice_value(self.spec(key), value)
        elif kind in ("str", "yaml"):
            try:
                value = _from_text(self.spec(key), kind, value)
            except _ParseError as exc:
                self._pending[key] = change["new"]
                self.field_errors[key] = str(exc)
                self._refresh()
                return
        self.set(key, value)

    def _on_workers(self, change) -> None:
        if self._syncing:
            return
        try:
            self.workers = change["new"]
        except ValueError as exc:
            self._message_widgets[WORKERS_KEY].value = self._html(str(exc), _ERROR_STYLE)

    def _on_device(self, change) -> None:
        if not self._syncing:
            self.device_target = change["new"]

    def _on_apply_preset(self) -> None:
        if self._preset_widget.value is None:
            self.status = "choose a preset first"
            self._refresh()
            return
        self.apply_preset(self._preset_widget.value)

    def _on_export(self) -> None:
        try:
            self.save_yaml(self._path_widget.value)
        except OSError as exc:
            self.status = f"export failed: {exc}"
            self._refresh()

    def _on_import(self) -> None:
        try:
            self.load(self._path_widget.value)
        except (OSError, ValueError, TypeError) as exc:
            self.status = f"import failed: {exc}"
            self._refresh()

    def _sync_widget(self, key: str) -> None:
        widget = self._inputs.get(key)
        if widget is None:
            return
        spec = self.spec(key)
        kind = _widget_kind(spec)
        value = self.get(key)
        if kind in ("str", "yaml"):
            value = value if isinstance(value, str) and key in self._pending else _to_text(kind, value)
        elif kind == "checkbox":
            value = bool(value)
        elif kind == "int" and not isinstance(value, int):
            return  # a rejected non-integer stays visible only as the message
        elif kind == "float" and not isinstance(value, (int, float)):
            return
        elif kind == "dropdown":
            if value not in spec.choices:
                return
            value = _choice_label(value)
        if widget.value != value:
            self._syncing = True
            try:
                widget.value = value
            finally:
                self._syncing = False

    def _sync_all_widgets(self) -> None:
        for key in list(self._inputs):
            self._sync_widget(key)

    @staticmethod
    def _html(text: str, style: str) -> str:
        return f'<span style="{style}">{html.escape(text)}</span>' if text else ""

    def _update_messages(self) -> None:
        messages = self.messages
        for key, widget in self._message_widgets.items():
            text = messages.get(key, "")
            style = _ERROR_STYLE if key in self.field_errors else _WORLD_STYLE
            value = self._html(text, style)
            if widget.value != value:
                widget.value = value
        for key, widget in self._inputs.items():
            self._update_placeholder(key, widget)

    def _refresh(self) -> None:
        self._check_world()
        if self._ui is None:
            return
        self._update_messages()
        if self.ok and self.world_info:
            info = self.world_info
            line = (f"valid for {self._workers} workers ({self._device_target}): data parallel {info['data_parallel_size']}, "
                    f"model parallel {info['model_parallel_size']}, global batch {info['global_batch_size']}")
            summary = self._html(line, _OK_STYLE)
        else:
            summary = self._html(f"{len(self.problems())} problem(s): " + " | ".join(self.problems()), _ERROR_STYLE)
        status = self._html(self.status, "color:#555") if self.status else ""
        self._status_widget.value = summary + ("<br>" + status if status else "")
        header = f"# workers: {self._workers}, device_target: {self._device_target} (launcher settings)\n"
        if self._pending:
            header += "# not included (rejected): " + ", ".join(self._pending) + "\n"
        self._preview.value = f"<pre>{html.escape(header + self.to_yaml())}</pre>"

    def __repr__(self) -> str:
        state = "ok" if self.ok else f"{len(self.problems())} problem(s)"
        return f"ConfigBuilder(workers={self._workers}, device_target={self._device_target!r}, {state})"
