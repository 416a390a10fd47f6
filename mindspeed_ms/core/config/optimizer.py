"""OptimizerConfig: optimizer, learning-rate and weight-decay schedules (Megatron's names)."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from .base import BaseConfig
from .fields import ConfigValueError, Field, Invalid, Virtual, _to_float

__all__ = ["OptimizerConfig", "OPTIMIZER_TYPES", "LR_DECAY_STYLES"]

OPTIMIZER_TYPES = ("AdamWeightDecay", "AdamW", "Adam", "SGD")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "WSD", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")


def _betas(value: Any) -> Tuple[float, float]:
    if isinstance(value, str):
        value = [v for v in value.replace("(", " ").replace(")", " ").replace(",", " ").split()]
    if not isinstance(value, (list, tuple)):
        raise Invalid("expected two numbers (beta1, beta2)", type_error=True)
    if len(value) != 2:
        raise Invalid("expected exactly two numbers (beta1, beta2)")
    out = tuple(_to_float(v) for v in value)
    if not all(0.0 <= b < 1.0 for b in out):
        raise Invalid("each beta must be in [0, 1)")
    return out  # type: ignore[return-value]


class OptimizerConfig(BaseConfig):
    """Optimizer configuration (field names follow the guide's Megatron mapping table).

    Learning rate: linear warm-up over ``lr_warmup_iters`` from 0 to ``learning_rate``, then
    ``lr_decay_style`` down to ``min_lr`` at ``lr_decay_iters`` (None = the training length).
    Weight decay goes from ``start_weight_decay`` to ``end_weight_decay`` (both default to
    ``weight_decay``) following ``weight_decay_incr_style``.

    Args:
        optimizer_type (str): 'AdamWeightDecay', 'AdamW', 'Adam' or 'SGD'.
            Default: 'AdamWeightDecay'.
        learning_rate (float): Peak learning rate. Default: 1e-3.
        kwargs (dict): Any other field below, or extra options (kept, with a warning).

    Examples:
        >>> from mindspeed_ms.core.config import OptimizerConfig
        >>> optimizer_config = OptimizerConfig(learning_rate=3e-4, lr_decay_style="cosine")
    """

    section = "optimizer_config"

    optimizer_type = Field(
        "str", "AdamWeightDecay", "Optimizer: AdamWeightDecay/AdamW (decoupled weight decay), "
        "Adam (L2 in the gradient) or SGD (with momentum).", choices=OPTIMIZER_TYPES,
        megatron=("optimizer",), aliases=("optimizer",), group="optimizer")
    learning_rate = Field("float", 1e-3, "Peak learning rate.", ge=0.0, megatron=("lr",),
                          aliases=("lr",), group="learning_rate")
    min_lr = Field("float", 0.0, "Learning rate at the end of the decay.", ge=0.0, megatron=True,
                   group="learning_rate")
    lr_decay_style = Field(
        "str", "constant", "Decay after warm-up: constant, linear, cosine, WSD (warmup-stable-"
        "decay) or inverse-square-root.", choices=LR_DECAY_STYLES, megatron=True,
        group="learning_rate")
    lr_warmup_iters = Field("int", 0, "Iterations of linear warm-up from 0.", ge=0,
                            megatron=True, group="learning_rate")
    lr_decay_iters = Field(
        "int", None, "Iteration at which the decay reaches min_lr (None = training_iters).",
        ge=1, megatron=True, group="learning_rate")
    lr_wsd_decay_style = Field(
        "str", "exponential", "Shape of the final decay phase of the WSD schedule.",
        choices=("exponential", "linear", "cosine"), megatron=True, group="learning_rate")
    lr_wsd_decay_iters = Field(
        "int", None, "Length of the final decay phase of the WSD schedule (needed for WSD).",
        ge=1, megatron=True, group="learning_rate")
    betas = Field(
        "any", (0.9, 0.999), "Adam coefficients (beta1, beta2) of the moment estimates.",
        check=_betas, nullable=False, type_name="tuple[float, float]", python_type=tuple,
        allowed="two numbers in [0, 1)", group="optimizer")
    eps = Field("float", 1e-8, "Adam epsilon added to the denominator.", gt=0.0,
                megatron=("adam_eps",), aliases=("adam_eps",), group="optimizer")
    weight_decay = Field("float", 0.0, "Weight decay coefficient.", ge=0.0, megatron=True,
                         group="weight_decay")
    start_weight_decay = Field(
        "float", None, "Weight decay at the start (None = weight_decay).", ge=0.0,
        megatron=True, derived=lambda c: c.weight_decay, derived_doc="weight_decay",
        group="weight_decay")
    end_weight_decay = Field(
        "float", None, "Weight decay at the end (None = weight_decay).", ge=0.0, megatron=True,
        derived=lambda c: c.weight_decay, derived_doc="weight_decay", group="weight_decay")
    weight_decay_incr_style = Field(
        "str", "constant", "How the weight decay moves from start to end value.",
        choices=WD_INCR_STYLES, megatron=True, group="weight_decay")
    clip_grad = Field(
        "float", 0.0, "Global-norm gradient clipping threshold (0 = off); used when "
        "training_config.grad_clip_kwargs is not set.", ge=0.0, megatron=True, group="optimizer")
    momentum = Field("float", 0.9, "SGD momentum.", ge=0.0, lt=1.0, megatron=("sgd_momentum",),
                     group="optimizer")
    overlap_param_gather = Field(
        "bool", False, "Overlap the distributed optimizer's parameter all-gather with the next "
        "forward pass.", megatron=True, group="distributed")
    use_checkpoint_opt_param_scheduler = Field(
        "bool", True, "On resume, take the scheduler settings from the checkpoint.",
        megatron=True, group="learning_rate")
    override_opt_param_scheduler = Field(
        "bool", False, "On resume, use these scheduler settings instead of the checkpoint's.",
        megatron=True, group="learning_rate")

    adam_beta1 = Virtual("float", "Adam beta1 (stored as betas[0]).", ge=0.0, lt=1.0,
                         megatron=True, targets=("optimizer_config.betas",), group="optimizer")
    adam_beta2 = Virtual("float", "Adam beta2 (stored as betas[1]).", ge=0.0, lt=1.0,
                         megatron=True, targets=("optimizer_config.betas",), group="optimizer")

    def _get_virtual(self, name: str) -> Any:
        return self.betas[0 if name == "adam_beta1" else 1]

    def _apply_virtuals(self, values: Dict[str, Any]) -> None:
        beta1 = values.get("adam_beta1", self.betas[0])
        beta2 = values.get("adam_beta2", self.betas[1])
        new = (beta1, beta2)
        if self.__dict__["_constructing"] and "betas" in self.__dict__["_explicit"] \
                and tuple(self.betas) != new:
            raise ConfigValueError("OptimizerConfig", "betas", list(self.betas),
                                   f"the same as adam_beta1/adam_beta2 {new}",
                                   "betas and adam_beta1/adam_beta2 disagree")
        self.betas = new

    def _cross_check(self) -> None:
        if self.min_lr > self.learning_rate:
            self._reject("min_lr", f"at most learning_rate={self.learning_rate!r}")
        if self.lr_decay_style == "WSD" and self.lr_wsd_decay_iters is None:
            self._reject("lr_wsd_decay_iters", "an integer >= 1 when lr_decay_style is 'WSD'")
        if self.lr_decay_iters is not None and self.lr_warmup_iters > self.lr_decay_iters:
            self._reject("lr_warmup_iters", f"at most lr_decay_iters={self.lr_decay_iters}")
        if self.lr_decay_iters is not None and self.lr_decay_style != "constant" and \
                self.lr_warmup_iters >= self.lr_decay_iters:
            # as the scheduler (core/optimizer/lr_scheduler.py) requires: a decay needs steps after the warm-up
            self._reject("lr_warmup_iters", f"less than lr_decay_iters={self.lr_decay_iters} when "
                         f"lr_decay_style is {self.lr_decay_style!r}",
                         "the decay runs from the end of the warm-up to lr_decay_iters")
        if self.use_checkpoint_opt_param_scheduler and self.override_opt_param_scheduler:
            self._reject("override_opt_param_scheduler",
                         "False while use_checkpoint_opt_param_scheduler is True",
                         "the scheduler settings cannot come from both the checkpoint and the "
                         "config")
        if self.weight_decay_incr_style == "constant" and \
                self.start_weight_decay != self.end_weight_decay:
            self._reject("end_weight_decay", f"equal to start_weight_decay="
                         f"{self.start_weight_decay!r} when weight_decay_incr_style is 'constant'",
                         value=self.end_weight_decay)
