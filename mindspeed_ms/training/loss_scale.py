"""Loss-scale update cells: fixed, dynamic and adaptive (MindFormers' adaptive loss scaling).

All three follow MindSpore's calling convention for a ``scale_sense`` manager::

    scale_sense = Parameter(Tensor(cell.get_loss_scale(), ms.float32), name="loss_scale")
    ...
    overflow = cell(scale_sense, overflow)   # updates ``scale_sense`` in place, returns the flag

The update logic runs on the host in plain Python numbers: the caller has already brought the
(all-reduced) overflow flag to the host to decide whether to skip the optimizer step, so the
update itself costs a few microseconds and the parameter is written only when its value changes.
The cells therefore always run eagerly: calling one is the same in PyNative and graph mode, and
they must not be called from inside a function compiled with ``ms.jit``.

The loss-scale parameter is the source of truth for the current value (it is read at every call,
as MindSpore's own update cells do); :meth:`get_loss_scale` returns the value after the last update
(or the initial value before the first call). ``cell(None, overflow)`` updates the cell's own value
without touching any parameter, which is handy in host-only code and tests.

Checkpointing: ``state_dict()`` returns a plain JSON-able dict holding everything needed to resume
bit-for-bit (the current scale, counters, window level); ``load_state_dict(state, loss_scale=param)``
restores it and, when given, writes the scale into the training loop's parameter.

The adaptive rule (``training-features.md`` section 5, as in MindFormers)::

    window list: start with max; while value > min: value > 100 -> floor(value/2/100)*100,
                 value == 100 -> 50, otherwise value - min/2; keep int(value); reverse (ascending).
                 (1000, 20) -> [20, 30, 40, 50, 100, 200, 500, 1000]
                 (5000, 100) -> [100, 300, 600, 1200, 2500, 5000]
    start index: position of ``scale_window`` in the list (a warning and index 0 when absent);
                 below index 0 there is a hidden level -1 whose window is 1.
    per step:    1. overflow: scale = max(scale / factor, 1)
                 2. grow = window <= cur_iter - last_overflow_iter;
                    overflow or grow: last_overflow_iter = cur_iter
                 3. grow and not overflow: scale *= factor;  cur_iter += 1
                 4. on growth: up = (up + 1) % 4, down = 0; up == 3 and index != last:
                    index += 1 (from -1 to 0), window = list[index], up = 0
                 5. on overflow: down = (down + 1) % 4; down == 3 and index not in (0, -1):
                    window = 1, index = -1, up = down = 0

Note that, like the reference, the list rule can produce entries below ``min_scale_window`` (e.g.
(1000, 30) gives [20, 35, 50, ...]) or even 0 (e.g. (150, 100) gives [0, 150]); a window of 0
behaves like a window of 1 (growth after every overflow-free step). The list is kept as the rule
produces it.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Union

import mindspore as ms
from mindspore import Parameter, Tensor, nn

__all__ = [
    "FixedLossScaleUpdateCell",
    "DynamicLossScaleUpdateCell",
    "AdaptiveLossScaleUpdateCell",
    "adaptive_window_list",
    "build_loss_scaler",
]

logger = logging.getLogger(__name__)

_TRUE = None
_FALSE = None


def _flag_tensor(value: bool) -> Tensor:
    """A cached scalar bool Tensor (created once; Tensors are not mutated by the callers)."""
    global _TRUE, _FALSE  # pylint: disable=global-statement
    if _TRUE is None:
        _TRUE = Tensor(True, ms.bool_)
        _FALSE = Tensor(False, ms.bool_)
    return _TRUE if value else _FALSE


def _to_bool(overflow: Any) -> bool:
    """The overflow flag as a Python bool (Python/numpy bool, a number, or a one-element Tensor)."""
    if isinstance(overflow, bool):
        return overflow
    if hasattr(overflow, "asnumpy"):
        overflow = overflow.asnumpy()
    try:
        return bool(overflow)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"overflow must be a bool or a one-element bool Tensor, got {overflow!r}") from exc


def _check_scale_value(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale_factor must be a real number > 1, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 1:
        raise ValueError(f"scale_factor must be a finite number > 1, got {value!r}")
    return value


def _check_window(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def adaptive_window_list(max_scale_window: int, min_scale_window: int) -> List[int]:
    """The ascending scale-window list of :class:`AdaptiveLossScaleUpdateCell`.

    Args:
        max_scale_window: The largest window (an int > ``min_scale_window``).
        min_scale_window: The smallest window (an int > 0).

    Returns:
        The windows in ascending order, e.g. ``(1000, 20) -> [20, 30, 40, 50, 100, 200, 500, 1000]``.

    Raises:
        TypeError: A window is not an int.
        ValueError: A window is <= 0, or ``max_scale_window <= min_scale_window``.
    """
    max_scale_window = _check_window("max_scale_window", max_scale_window)
    min_scale_window = _check_window("min_scale_window", min_scale_window)
    if max_scale_window <= 0 or min_scale_window <= 0 or max_scale_window <= min_scale_window:
        raise ValueError(
            "max_scale_window and min_scale_window must both be > 0 and max_scale_window > "
            f"min_scale_window, got max_scale_window={max_scale_window}, min_scale_window={min_scale_window}")
    value: Union[int, float] = max_scale_window
    windows = [int(value)]
    while value > min_scale_window:
        if value > 100:
            value = math.floor(value / 2 / 100) * 100
        elif value == 100:
            value = 50
        else:
            value = value - min_scale_window / 2
        windows.append(int(value))
    windows.reverse()
    return windows


class _LossScaleUpdateCellBase(nn.Cell):
    """Shared calling convention: ``cell(loss_scale_parameter_or_None, overflow) -> bool Tensor``."""

    _TYPE = ""

    def __init__(self, loss_scale_value: Union[int, float]):
        super().__init__(auto_prefix=False)
        self.loss_scale_value = _check_scale_value("loss_scale_value", loss_scale_value)
        self._scale = self.loss_scale_value

    # -- MindSpore-style interface ------------------------------------------------------------
    def get_loss_scale(self) -> float:
        """The current loss scale (the initial ``loss_scale_value`` before the first update)."""
        return self._scale

    @property
    def current_window(self) -> Optional[int]:
        """The current scale window (``None`` for a fixed scale)."""
        return None

    def __call__(self, loss_scale: Optional[Parameter], overflow: Any) -> Tensor:  # pylint: disable=arguments-differ
        # Host-side by design: bypass nn.Cell.__call__, which would compile ``construct`` in
        # graph mode. See the module docstring.
        return self.construct(loss_scale, overflow)

    def construct(self, loss_scale: Optional[Parameter], overflow: Any) -> Tensor:
        """Update ``loss_scale`` in place for this step's overflow flag; return the flag.

        Args:
            loss_scale: The training loop's loss-scale Parameter (a scalar), or ``None`` to update
                only the cell's own value.
            overflow: Whether this step's gradients overflowed (a bool, or a one-element bool Tensor),
                already reduced across all ranks.

        Returns:
            The overflow flag as a scalar bool Tensor.
        """
        flag = _to_bool(overflow)
        if loss_scale is None:
            self.update(flag)
            return _flag_tensor(flag)
        if not isinstance(loss_scale, Tensor):
            raise TypeError("loss_scale must be a mindspore Parameter (scalar) or None, got "
                            f"{type(loss_scale).__name__}")
        old_scale = float(loss_scale.asnumpy())
        self._scale = old_scale
        new_scale = self.update(flag)
        if new_scale != old_scale:
            loss_scale.set_data(Tensor(new_scale, loss_scale.dtype))
        return _flag_tensor(flag)

    def update(self, overflow: bool) -> float:
        """Apply one step of the rule to the cell's own value (pure Python); return the new scale."""
        del overflow
        return self._scale

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The cell's state as a plain JSON-able dict."""
        return {"type": self._TYPE, "loss_scale": self._scale}

    def load_state_dict(self, state: Mapping[str, Any], loss_scale: Optional[Parameter] = None) -> None:
        """Restore a :meth:`state_dict`; also write the scale into ``loss_scale`` when given.

        Raises:
            ValueError: ``state`` was written by another kind of cell or lacks a field.
        """
        if state.get("type") != self._TYPE:
            raise ValueError(f"state_dict type {state.get('type')!r} does not match {self._TYPE!r}")
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise ValueError(f"{self._TYPE} state_dict is missing field(s) {missing}")
        self._load(state)
        if loss_scale is not None:
            loss_scale.set_data(Tensor(self._scale, loss_scale.dtype))

    def _load(self, state: Mapping[str, Any]) -> None:
        self._scale = float(state["loss_scale"])

    def extend_repr(self) -> str:
        return f"loss_scale={self._scale}"


class FixedLossScaleUpdateCell(_LossScaleUpdateCellBase):
    """A static loss scale: the value never changes (MindSpore's ``FixedLossScaleUpdateCell``).

    Args:
        loss_scale_value: The loss scale (a finite number > 0).

    Raises:
        TypeError: ``loss_scale_value`` is not a real number.
        ValueError: ``loss_scale_value`` is not finite and > 0.

    Calling ``cell(param, overflow)`` leaves ``param`` unchanged and returns the flag; whether the
    optimizer step is skipped on overflow is the training loop's decision.
    """

    _TYPE = "FixedLossScaleUpdateCell"


class DynamicLossScaleUpdateCell(_LossScaleUpdateCellBase):
    """Dynamic loss scaling with a fixed window (MindSpore's ``DynamicLossScaleUpdateCell``).

    On overflow the scale is divided by ``scale_factor`` (never below 1); after ``scale_window``
    overflow-free steps it is multiplied by ``scale_factor``.

    Args:
        loss_scale_value: The initial scale (a finite number > 0).
        scale_factor: The factor (a finite number > 1).
        scale_window: Overflow-free steps before growing (an int > 0).

    Raises:
        TypeError: A value has the wrong type (``scale_window`` must be an int).
        ValueError: A value is out of range.

    Attributes:
        scale_window (int): The window; also ``current_window``.
        cur_iter (int): The step counter (starts at 1, as in MindSpore).
        last_overflow_iter (int): The step of the last overflow or growth (starts at 0).
    """

    _TYPE = "DynamicLossScaleUpdateCell"

    def __init__(self, loss_scale_value: Union[int, float], scale_factor: Union[int, float],
                 scale_window: int):
        super().__init__(loss_scale_value)
        self.scale_factor = _check_factor(scale_factor)
        self.scale_window = _check_window("scale_window", scale_window)
        if self.scale_window <= 0:
            raise ValueError(f"scale_window must be > 0, got {self.scale_window}")
        self.cur_iter = 1
        self.last_overflow_iter = 0

    @property
    def current_window(self) -> int:
        return self.scale_window

    def _step(self, overflow: bool) -> bool:
        """Steps 1-3 of the rule; returns whether the scale grew."""
        scale = self._scale
        if overflow:
            scale = max(scale / self.scale_factor, 1.0)
        should_grow = self.scale_window <= self.cur_iter - self.last_overflow_iter
        if overflow or should_grow:
            self.last_overflow_iter = self.cur_iter
        grew = should_grow and not overflow
        if grew:
            scale = scale * self.scale_factor
        self.cur_iter += 1
        self._scale = scale
        return grew

    def update(self, overflow: bool) -> float:
        self._step(bool(overflow))
        return self._scale

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(scale_factor=self.scale_factor, scale_window=self.scale_window,
                     cur_iter=self.cur_iter, last_overflow_iter=self.last_overflow_iter)
        return state

    def _load(self, state: Mapping[str, Any]) -> None:
        super()._load(state)
        self.scale_factor = _check_factor(state["scale_factor"])
        self.scale_window = int(state["scale_window"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])

    def extend_repr(self) -> str:
        return (f"loss_scale={self._scale}, scale_factor={self.scale_factor}, "
                f"scale_window={self.scale_window}")


class AdaptiveLossScaleUpdateCell(DynamicLossScaleUpdateCell):
    """Adaptive loss scaling: dynamic scaling whose window moves along a list of levels.

    Three growths at one level move the window up to the next level; three overflows (counted
    since the last growth) at a level above the first drop the window to the hidden level 1, from
    where three growths lead back to the smallest listed window. The full rule is in the module
    docstring (``training-features.md`` section 5).

    Args:
        loss_scale_value: The initial scale (a finite number > 0).
        scale_factor: The factor (a finite number > 1).
        scale_window: The starting window; it should be an entry of the window list, otherwise a
            warning is logged and the smallest window is used.
        max_scale_window: The largest window (int). Default: 1000.
        min_scale_window: The smallest window (int). Default: 20.

    Raises:
        TypeError: ``max_scale_window`` or ``min_scale_window`` is not an int (or another argument
            has the wrong type).
        ValueError: A window is <= 0, ``max_scale_window <= min_scale_window``, or the scale or
            factor is out of range.

    Attributes:
        window_list (list[int]): The ascending window levels.
        list_index (int): The current level (-1 = the hidden level with window 1).
        scale_window (int): The current window; also ``current_window``.
        up_count (int): Growths counted towards the next level (0..3).
        down_count (int): Overflows counted towards the drop to window 1 (0..3).
        cur_iter (int): The step counter (starts at 1).
        last_overflow_iter (int): The step of the last overflow or growth (starts at 0).

    Example:
        >>> cell = AdaptiveLossScaleUpdateCell(2.0 ** 16, 2, 20, max_scale_window=1000, min_scale_window=20)
        >>> cell.window_list
        [20, 30, 40, 50, 100, 200, 500, 1000]
        >>> scale = Parameter(Tensor(cell.get_loss_scale(), ms.float32), name="loss_scale")
        >>> overflow = cell(scale, False)   # scale is updated in place
    """

    _TYPE = "AdaptiveLossScaleUpdateCell"
    _THRESHOLD = 3
    _MOD = 4

    def __init__(self, loss_scale_value: Union[int, float], scale_factor: Union[int, float],
                 scale_window: int, max_scale_window: int = 1000, min_scale_window: int = 20):
        windows = adaptive_window_list(max_scale_window, min_scale_window)
        if isinstance(scale_window, bool) or not isinstance(scale_window, numbers.Real):
            raise TypeError(f"scale_window must be an int, got {scale_window!r} ({type(scale_window).__name__})")
        if scale_window in windows:
            index = windows.index(scale_window)
        else:
            logger.warning("scale_window=%r is not in the adaptive window list %s; starting at the smallest "
                           "window %d", scale_window, windows, windows[0])
            index = 0
        super().__init__(loss_scale_value, scale_factor, max(windows[index], 1))
        self.scale_window = windows[index]
        self.window_list = windows
        self.max_scale_window = int(max_scale_window)
        self.min_scale_window = int(min_scale_window)
        self.list_index = index
        self.up_count = 0
        self.down_count = 0

    def update(self, overflow: bool) -> float:
        overflow = bool(overflow)
        grew = self._step(overflow)
        last = len(self.window_list) - 1
        if grew:  # up rule
            self.up_count = (self.up_count + 1) % self._MOD
            self.down_count = 0
        if self.up_count == self._THRESHOLD and self.list_index != last:
            self.list_index += 1
            self.scale_window = self.window_list[self.list_index]
            self.up_count = 0
        if overflow:  # down rule
            self.down_count = (self.down_count + 1) % self._MOD
            if self.down_count == self._THRESHOLD and self.list_index not in (0, -1):
                self.scale_window = 1
                self.list_index = -1
                self.up_count = 0
                self.down_count = 0
        return self._scale

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(max_scale_window=self.max_scale_window, min_scale_window=self.min_scale_window,
                     window_list=list(self.window_list), list_index=self.list_index,
                     up_count=self.up_count, down_count=self.down_count)
        return state

    def _load(self, state: Mapping[str, Any]) -> None:
        windows = [int(w) for w in state["window_list"]]
        if windows != self.window_list:
            raise ValueError(f"state_dict window_list {windows} differs from this cell's {self.window_list} "
                             f"(max_scale_window={self.max_scale_window}, min_scale_window={self.min_scale_window})")
        super()._load(state)
        self.list_index = int(state["list_index"])
        self.up_count = int(state["up_count"])
        self.down_count = int(state["down_count"])

    def extend_repr(self) -> str:
        return (f"loss_scale={self._scale}, scale_factor={self.scale_factor}, scale_window={self.scale_window}, "
                f"window_list={self.window_list}")


_CELLS = {
    "AdaptiveLossScaleUpdateCell": AdaptiveLossScaleUpdateCell,
    "DynamicLossScaleUpdateCell": DynamicLossScaleUpdateCell,
    "FixedLossScaleUpdateCell": FixedLossScaleUpdateCell,
}
_ALIASES = {"adaptive": "AdaptiveLossScaleUpdateCell", "dynamic": "DynamicLossScaleUpdateCell",
            "fixed": "FixedLossScaleUpdateCell", "static": "FixedLossScaleUpdateCell"}
_ARGS = {
    "AdaptiveLossScaleUpdateCell": ("loss_scale_value", "scale_factor", "scale_window", "max_scale_window",
                                    "min_scale_window"),
    "DynamicLossScaleUpdateCell": ("loss_scale_value", "scale_factor", "scale_window"),
    "FixedLossScaleUpdateCell": ("loss_scale_value",),
}

#: Defaults for the MindSpeed dynamic fields when only ``loss_scale_value`` is given.
DEFAULT_LOSS_SCALE_FACTOR = 2
DEFAULT_LOSS_SCALE_WINDOW = 1000


def build_loss_scaler(spec: Union[None, Mapping[str, Any], numbers.Real, _LossScaleUpdateCellBase] = None, *,
                      loss_scale: Optional[Union[int, float]] = None,
                      loss_scale_value: Optional[Union[int, float]] = None,
                      loss_scale_factor: Optional[Union[int, float]] = None,
                      loss_scale_window: Optional[int] = None) -> Optional[_LossScaleUpdateCellBase]:
    """Build a loss-scale update cell from a MindFormers-style spec or the MindSpeed fields.

    Args:
        spec: ``scale_sense`` as in MindFormers YAML: a dict with ``type`` (one of
            ``AdaptiveLossScaleUpdateCell``, ``DynamicLossScaleUpdateCell``,
            ``FixedLossScaleUpdateCell``, or the short forms ``adaptive``, ``dynamic``,
            ``fixed``/``static``) and that class's arguments; a number (a fixed scale); or an
            already built cell (returned as is).
        loss_scale: MindSpeed's static scale: a :class:`FixedLossScaleUpdateCell`.
        loss_scale_value: MindSpeed's dynamic initial scale: a :class:`DynamicLossScaleUpdateCell`.
        loss_scale_factor: The dynamic factor (default 2).
        loss_scale_window: The dynamic window (default 1000).

    Returns:
        The cell, or ``None`` when nothing asks for loss scaling.

    Raises:
        ValueError: ``spec`` and a MindSpeed field are both given, ``loss_scale`` and
            ``loss_scale_value`` are both given, the type is unknown, or an argument is missing,
            unknown or out of range.
        TypeError: ``spec`` has an unsupported type, or an argument has the wrong type.
    """
    fields = {"loss_scale": loss_scale, "loss_scale_value": loss_scale_value,
              "loss_scale_factor": loss_scale_factor, "loss_scale_window": loss_scale_window}
    given = {k: v for k, v in fields.items() if v is not None}
    if spec is not None:
        if given:
            raise ValueError(f"give either a scale_sense spec or the loss-scale fields, not both: spec={spec!r}, "
                             f"fields={given}")
        if isinstance(spec, _LossScaleUpdateCellBase):
            return spec
        if isinstance(spec, numbers.Real) and not isinstance(spec, bool):
            return FixedLossScaleUpdateCell(spec)
        if not isinstance(spec, Mapping):
            raise TypeError(f"scale_sense spec must be a dict, a number or a loss-scale cell, got "
                            f"{type(spec).__name__}")
        kwargs = dict(spec)
        type_name = kwargs.pop("type", None)
        resolved = _ALIASES.get(str(type_name).lower(), type_name) if type_name is not None else None
        if resolved not in _CELLS:
            raise ValueError(f"scale_sense type {type_name!r} is not supported; allowed: "
                             f"{sorted(_CELLS) + sorted(_ALIASES)}")
        unknown = sorted(set(kwargs) - set(_ARGS[resolved]))
        if unknown:
            raise ValueError(f"scale_sense for {resolved} has unknown field(s) {unknown}; allowed: "
                             f"{list(_ARGS[resolved])}")
        return _CELLS[resolved](**kwargs)
    if loss_scale is not None and loss_scale_value is not None:
        raise ValueError(f"loss_scale={loss_scale!r} (static) and loss_scale_value={loss_scale_value!r} (dynamic) "
                         "are both set; set only one")
    if loss_scale is not None:
        if loss_scale_factor is not None or loss_scale_window is not None:
            raise ValueError("loss_scale_factor/loss_scale_window apply to dynamic scaling (loss_scale_value), "
                             f"not to the static loss_scale={loss_scale!r}")
        return FixedLossScaleUpdateCell(loss_scale)
    if loss_scale_value is not None:
        return DynamicLossScaleUpdateCell(
            loss_scale_value,
            DEFAULT_LOSS_SCALE_FACTOR if loss_scale_factor is None else loss_scale_factor,
            DEFAULT_LOSS_SCALE_WINDOW if loss_scale_window is None else loss_scale_window)
    if given:
        raise ValueError(f"loss-scale field(s) {sorted(given)} need loss_scale_value (the initial dynamic scale)")
    return None
