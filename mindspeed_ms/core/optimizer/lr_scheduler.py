"""Learning-rate and weight-decay schedules (Megatron's ``OptimizerParamScheduler``).

Steps are counted in iterations (optimizer steps). ``get_lr(s)`` is the learning rate used by the
optimizer step that follows ``s`` completed steps; the scheduler starts at ``s = 0`` and
``step()`` advances it after each optimizer step, as in Megatron::

    sched = OptimizerParamScheduler(max_lr=1e-3, min_lr=1e-4, lr_warmup_iters=100,
                                    lr_decay_iters=2000, lr_decay_style="cosine")
    for it in range(train_iters):
        lr, wd = sched.lr, sched.wd        # values for this step (also pushed to the optimizer)
        ...train step...
        sched.step()

Learning rate at step ``s`` (W = ``lr_warmup_iters``, D = ``lr_decay_iters``):

* warmup, ``W > 0 and s <= W``: ``lr_warmup_init + (max_lr - lr_warmup_init) * s / W``
  (Megatron's rule: the first step uses ``lr_warmup_init``, 0 by default);
* ``constant``: ``max_lr`` after warmup;
* after ``D``: ``min_lr``;
* ``inverse-square-root``: ``max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(s, 1)))``;
* otherwise ``min_lr + coeff * (max_lr - min_lr)`` with ``r = (s - W) / (D - W)`` and
  ``linear``: ``coeff = 1 - r``; ``cosine``: ``coeff = (1 + cos(pi * r)) / 2``;
  ``WSD`` (warmup-stable-decay): ``coeff = 1`` until ``D - lr_wsd_decay_iters``, then with
  ``q`` the fraction of the annealing phase done: ``linear``: ``1 - q``, ``cosine``:
  ``(1 + cos(pi * q)) / 2``, ``exponential``: ``2 * 0.5 ** q - 1``, ``minus_sqrt``: ``1 - sqrt(q)``.

nanoGPT's cosine schedule is the same after warmup; its warmup is ``lr * (s + 1) / (W + 1)``, which
differs from Megatron's by at most ``lr / W`` during the first ``W`` steps.

Weight decay at step ``s`` (I = ``weight_decay_incr_iters``): ``constant``: ``end_weight_decay``
(which must equal ``start_weight_decay``); after ``I``: ``end_weight_decay``; ``linear``/``cosine``:
``start + coeff * (end - start)`` with ``r = s / I``, ``coeff = r`` or ``(1 - cos(pi * r)) / 2``.

The scheduler drives an optimizer that exposes Megatron-style ``param_groups`` (a list of dicts):
each group's ``'lr'`` is set to ``lr * group.get('lr_mult', 1.0)`` and its ``'weight_decay'`` to
``wd * group.get('wd_mult', 1.0)`` at construction and after every :meth:`step`. Without an
optimizer it only computes values (:attr:`lr`, :attr:`wd`, :meth:`get_lr`, :meth:`get_wd`,
:meth:`lr_values`), e.g. for an optimizer that takes a per-step learning-rate list.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["OptimizerParamScheduler", "LR_DECAY_STYLES", "WSD_DECAY_STYLES", "WD_INCR_STYLES"]

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")

# fields restored from / compared with a checkpoint (state_dict keys)
_HYPER = ("max_lr", "min_lr", "lr_warmup_init", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style",
          "lr_wsd_decay_iters", "lr_wsd_decay_style", "start_weight_decay", "end_weight_decay",
          "weight_decay_incr_iters", "weight_decay_incr_style")


def _style(field: str, value: Any, allowed: tuple) -> str:
    """Normalise a style name (case, '-'/'_') and check it against ``allowed``."""
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        for name in allowed:
            if name.lower().replace("_", "-") == key:
                return name
    raise ValueError(f"{field}={value!r} is not supported; allowed: {list(allowed)}")


def _number(field: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{field} must be a finite number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {value!r}")
    return float(value)


def _iters(field: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{field} must be >= {minimum}, got {value!r}")
    return int(value)


class OptimizerParamScheduler:
    """Learning-rate (warmup + decay) and weight-decay schedules, checkpointable as JSON.

    Args:
        optimizer: An optimizer with Megatron-style ``param_groups`` to drive, or ``None``.
        max_lr: The peak learning rate (reached at the end of warmup).
        min_lr: The floor of the decay. Default: 0.0.
        lr_warmup_iters: Linear warmup iterations. Default: 0.
        lr_decay_iters: The iteration where the decay ends (counted from 0, warmup included);
            required unless ``lr_decay_style`` is ``constant`` and must be > ``lr_warmup_iters``.
        lr_decay_style: One of ``constant``, ``linear``, ``cosine``, ``inverse-square-root``,
            ``WSD`` (case and ``-``/``_`` are not significant). Default: ``constant``.
        lr_warmup_init: The learning rate at step 0 of the warmup. Default: 0.0.
        lr_wsd_decay_iters: Length of WSD's final annealing phase (required for ``WSD``;
            ``0 < lr_wsd_decay_iters <= lr_decay_iters - lr_warmup_iters``).
        lr_wsd_decay_style: WSD's annealing: ``linear``, ``cosine``, ``exponential``,
            ``minus_sqrt``. Default: ``exponential`` (Megatron's default).
        start_weight_decay: Weight decay at step 0. Default: 0.0.
        end_weight_decay: Weight decay from ``weight_decay_incr_iters`` on; defaults to
            ``start_weight_decay``.
        weight_decay_incr_iters: Iterations of the weight-decay ramp (required unless the style
            is ``constant``; > 0).
        weight_decay_incr_style: ``constant``, ``linear`` or ``cosine``. Default: ``constant``.
        use_checkpoint_opt_param_scheduler: On :meth:`load_state_dict`, take the schedule's
            hyperparameters from the checkpoint. Default: True.
        override_opt_param_scheduler: On :meth:`load_state_dict`, keep this object's
            hyperparameters (only the step count is restored). Default: False.

    Raises:
        ValueError: A style is unknown (the message names the field and the allowed values),
            a required length is missing, or values are inconsistent (e.g. ``min_lr > max_lr``).
        TypeError: A value has the wrong type.
    """

    def __init__(self, optimizer: Any = None, *, max_lr: float, min_lr: float = 0.0,
                 lr_warmup_iters: int = 0, lr_decay_iters: Optional[int] = None,
                 lr_decay_style: str = "constant", lr_warmup_init: float = 0.0,
                 lr_wsd_decay_iters: Optional[int] = None, lr_wsd_decay_style: str = "exponential",
                 start_weight_decay: float = 0.0, end_weight_decay: Optional[float] = None,
                 weight_decay_incr_iters: Optional[int] = None, weight_decay_incr_style: str = "constant",
                 use_checkpoint_opt_param_scheduler: bool = True, override_opt_param_scheduler: bool = False):
        if use_checkpoint_opt_param_scheduler and override_opt_param_scheduler:
            raise ValueError("use_checkpoint_opt_param_scheduler and override_opt_param_scheduler are both True; "
                             "set at most one")
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must expose Megatron-style param_groups (a list of dicts) or be None, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.use_checkpoint_opt_param_scheduler = bool(use_checkpoint_opt_param_scheduler)
        self.override_opt_param_scheduler = bool(override_opt_param_scheduler)
        self._set_hyper(dict(
            max_lr=max_lr, min_lr=min_lr, lr_warmup_init=lr_warmup_init, lr_warmup_iters=lr_warmup_iters,
            lr_decay_iters=lr_decay_iters, lr_decay_style=lr_decay_style, lr_wsd_decay_iters=lr_wsd_decay_iters,
            lr_wsd_decay_style=lr_wsd_decay_style, start_weight_decay=start_weight_decay,
            end_weight_decay=start_weight_decay if end_weight_decay is None else end_weight_decay,
            weight_decay_incr_iters=weight_decay_incr_iters, weight_decay_incr_style=weight_decay_incr_style))
        self.num_steps = 0
        self._apply()

    # -- validation ----------------------------------------------------------------------------
    def _set_hyper(self, h: Dict[str, Any]) -> None:
        max_lr = _number("max_lr", h["max_lr"])
        min_lr = _number("min_lr", h["min_lr"])
        if min_lr > max_lr:
            raise ValueError(f"min_lr={min_lr} must be <= max_lr={max_lr}")
        warmup_init = _number("lr_warmup_init", h["lr_warmup_init"])
        warmup = _iters("lr_warmup_iters", h["lr_warmup_iters"])
        style = _style("lr_decay_style", h["lr_decay_style"], LR_DECAY_STYLES)
        decay = h["lr_decay_iters"]
        if decay is None:
            if style != "constant":
                raise ValueError(f"lr_decay_iters is required for lr_decay_style={style!r}")
        else:
            decay = _iters("lr_decay_iters", decay, 1)
            if decay <= warmup and style != "constant":
                raise ValueError(f"lr_decay_iters={decay} must be > lr_warmup_iters={warmup}")
        wsd_style = _style("lr_wsd_decay_style", h["lr_wsd_decay_style"], WSD_DECAY_STYLES)
        wsd = h["lr_wsd_decay_iters"]
        if style == "WSD":
            if wsd is None:
                raise ValueError("lr_wsd_decay_iters is required for lr_decay_style='WSD'")
            wsd = _iters("lr_wsd_decay_iters", wsd, 1)
            if wsd > decay - warmup:
                raise ValueError(f"lr_wsd_decay_iters={wsd} must be <= lr_decay_iters - lr_warmup_iters = "
                                 f"{decay - warmup}")
        elif wsd is not None:
            wsd = _iters("lr_wsd_decay_iters", wsd, 1)
        start_wd = _number("start_weight_decay", h["start_weight_decay"])
        end_wd = _number("end_weight_decay", h["end_weight_decay"])
        wd_style = _style("weight_decay_incr_style", h["weight_decay_incr_style"], WD_INCR_STYLES)
        wd_iters = h["weight_decay_incr_iters"]
        if wd_style == "constant":
            if start_wd != end_wd:
                raise ValueError(f"weight_decay_incr_style='constant' needs start_weight_decay == end_weight_decay, "
                                 f"got {start_wd} and {end_wd}")
            if wd_iters is not None:
                wd_iters = _iters("weight_decay_incr_iters", wd_iters, 1)
        else:
            if wd_iters is None:
                raise ValueError(f"weight_decay_incr_iters is required for weight_decay_incr_style={wd_style!r}")
            wd_iters = _iters("weight_decay_incr_iters", wd_iters, 1)
        self.max_lr, self.min_lr, self.lr_warmup_init = max_lr, min_lr, warmup_init
        self.lr_warmup_iters, self.lr_decay_iters, self.lr_decay_style = warmup, decay, style
        self.lr_wsd_decay_iters, self.lr_wsd_decay_style = wsd, wsd_style
        self.start_weight_decay, self.end_weight_decay = start_wd, end_wd
        self.weight_decay_incr_iters, self.weight_decay_incr_style = wd_iters, wd_style

    # -- schedules -----------------------------------------------------------------------------
    def get_lr(self, step: Optional[int] = None) -> float:
        """The learning rate after ``step`` completed steps (default: the current step)."""
        s = self.num_steps if step is None else step
        warmup = self.lr_warmup_iters
        if warmup > 0 and s <= warmup:
            return self.lr_warmup_init + (self.max_lr - self.lr_warmup_init) * s / warmup
        if self.lr_decay_style == "constant":
            return self.max_lr
        decay = self.lr_decay_iters
        if s > decay:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            lr = self.max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(s, 1))
            return max(self.min_lr, lr)
        ratio = (s - warmup) / (decay - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD
            anneal_start = decay - self.lr_wsd_decay_iters
            if s <= anneal_start:
                coeff = 1.0
            else:
                q = (s - anneal_start) / self.lr_wsd_decay_iters
                if self.lr_wsd_decay_style == "linear":
                    coeff = 1.0 - q
                elif self.lr_wsd_decay_style == "cosine":
                    coeff = 0.5 * (math.cos(math.pi * q) + 1.0)
                elif self.lr_wsd_decay_style == "exponential":
                    coeff = 2.0 * math.pow(0.5, q) - 1.0
                else:  # minus_sqrt
                    coeff = 1.0 - math.sqrt(q)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_wd(self, step: Optional[int] = None) -> float:
        """The weight decay after ``step`` completed steps (default: the current step)."""
        s = self.num_steps if step is None else step
        if self.weight_decay_incr_style == "constant" or s >= self.weight_decay_incr_iters:
            return self.end_weight_decay
        ratio = s / self.weight_decay_incr_iters
        if self.weight_decay_incr_style == "linear":
            coeff = ratio
        else:  # cosine
            coeff = 0.5 * (1.0 - math.cos(math.pi * ratio))
        return self.start_weight_decay + coeff * (self.end_weight_decay - self.start_weight_decay)

    @property
    def lr(self) -> float:
        """The learning rate for the current step."""
        return self.get_lr()

    @property
    def wd(self) -> float:
        """The weight decay for the current step."""
        return self.get_wd()

    def lr_values(self, num_steps: int, start: int = 0) -> List[float]:
        """Learning rates for steps ``start .. start + num_steps - 1`` (for per-step LR lists)."""
        return [self.get_lr(s) for s in range(start, start + num_steps)]

    def wd_values(self, num_steps: int, start: int = 0) -> List[float]:
        """Weight decays for steps ``start .. start + num_steps - 1``."""
        return [self.get_wd(s) for s in range(start, start + num_steps)]

    def step(self, increment: int = 1) -> float:
        """Advance by ``increment`` steps, update the optimizer's groups; return the new lr."""
        self.num_steps += _iters("increment", increment)
        self._apply()
        return self.lr

    def _apply(self) -> None:
        if self.optimizer is None:
            return
        lr, wd = self.lr, self.wd
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The step count and hyperparameters as a plain JSON-able dict."""
        state = {name: getattr(self, name) for name in _HYPER}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        The step count is always restored. Hyperparameters: with ``override_opt_param_scheduler``
        this object's are kept; with ``use_checkpoint_opt_param_scheduler`` (the default) the
        checkpoint's are taken; with neither, they must agree.

        Raises:
            ValueError: ``num_steps`` is missing, or (with neither flag) a hyperparameter differs.
        """
        if "num_steps" not in state:
            raise ValueError("scheduler state_dict has no num_steps")
        if not self.override_opt_param_scheduler:
            if self.use_checkpoint_opt_param_scheduler:
                merged = {name: state.get(name, getattr(self, name)) for name in _HYPER}
                self._set_hyper(merged)
            else:
                for name in _HYPER:
                    if name in state and state[name] != getattr(self, name):
                        raise ValueError(f"checkpoint {name}={state[name]!r} differs from the configured "
                                         f"{getattr(self, name)!r}; set use_checkpoint_opt_param_scheduler or "
                                         "override_opt_param_scheduler")
        self.num_steps = _iters("num_steps", state["num_steps"])
        self._apply()

    def __repr__(self) -> str:
        return (f"OptimizerParamScheduler(step={self.num_steps}, lr={self.lr:.6g}, wd={self.wd:.6g}, "
                f"style={self.lr_decay_style})")
