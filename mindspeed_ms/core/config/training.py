"""TrainingConfig: the training run (length, precision, loss scaling, clipping, checkpoints)."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional

from .base import BaseConfig
from .fields import ConfigValueError, Field, Invalid, Link, Virtual, _to_float, _to_number

__all__ = ["TrainingConfig", "GRAD_CLIP_TYPES", "LOSS_SCALE_CELLS", "FP16_INITIAL_LOSS_SCALE", "EVAL_METRICS",
           "BEST_METRIC_COMPARISONS"]

#: Metrics the evaluation computes (``eval_metric``) and how a new value replaces the best one.
EVAL_METRICS = ("loss", "perplexity")
BEST_METRIC_COMPARISONS = ("less_equal", "greater_equal", "less", "greater")

# Megatron's defaults for --fp16 without --loss-scale: --initial-loss-scale 2**32,
# --loss-scale-window 1000, growth/backoff by 2.
FP16_INITIAL_LOSS_SCALE = 2.0 ** 32
FP16_LOSS_SCALE_FACTOR = 2
FP16_LOSS_SCALE_WINDOW = 1000

GRAD_CLIP_TYPES = ("ClipGlobalNorm", "ClipByValue")
LOSS_SCALE_CELLS = ("AdaptiveLossScaleUpdateCell", "DynamicLossScaleUpdateCell",
                    "FixedLossScaleUpdateCell")

# Keys of each loss-scale cell: (required, optional with default).
_SCALE_SENSE_KEYS = {
    "AdaptiveLossScaleUpdateCell": (("loss_scale_value", "scale_factor", "scale_window"),
                                    {"max_scale_window": 1000, "min_scale_window": 20}),
    "DynamicLossScaleUpdateCell": (("loss_scale_value", "scale_factor", "scale_window"), {}),
    "FixedLossScaleUpdateCell": (("loss_scale_value",), {}),
}


def _grad_clip_kwargs(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping like {'grad_clip_type': 'ClipGlobalNorm', "
                      "'clip_value': 1.0}", type_error=True)
    unknown = set(value) - {"grad_clip_type", "clip_value"}
    if unknown:
        raise Invalid(f"unknown keys {sorted(unknown)}; allowed keys: grad_clip_type, clip_value")
    clip_type = value.get("grad_clip_type", "ClipGlobalNorm")
    if not isinstance(clip_type, str):
        raise Invalid("grad_clip_type must be a string", type_error=True)
    matches = [t for t in GRAD_CLIP_TYPES if t.lower() == clip_type.strip().lower()]
    if not matches:
        raise Invalid(f"grad_clip_type must be one of {', '.join(GRAD_CLIP_TYPES)}")
    if "clip_value" not in value:
        raise Invalid("clip_value is required")
    clip_value = _to_float(value["clip_value"])
    if clip_value <= 0:
        raise Invalid("clip_value must be > 0")
    return {"grad_clip_type": matches[0], "clip_value": clip_value}


def _strict_window(name: str, value: Any) -> int:
    # The adaptive loss-scale cell documents TypeError for non-int windows, so no coercion here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an int", type_error=True)
    if value <= 0:
        raise Invalid(f"{name} must be > 0")
    return value


def _scale_sense(value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = {"type": "FixedLossScaleUpdateCell", "loss_scale_value": value}
        else:
            raise Invalid("expected a mapping with a 'type' key (or a number for a fixed scale)",
                          type_error=True)
    cell = value.get("type")
    if not isinstance(cell, str):
        raise Invalid(f"'type' must be one of {', '.join(LOSS_SCALE_CELLS)}",
                      type_error=cell is not None)
    matches = [c for c in LOSS_SCALE_CELLS if c.lower() == cell.strip().lower()]
    if not matches:
        raise Invalid(f"'type' must be one of {', '.join(LOSS_SCALE_CELLS)}")
    cell = matches[0]
    required, optional = _SCALE_SENSE_KEYS[cell]
    unknown = set(value) - {"type"} - set(required) - set(optional)
    if unknown:
        raise Invalid(f"unknown keys {sorted(unknown)} for {cell}; allowed: "
                      f"{', '.join(required + tuple(optional))}")
    missing = [key for key in required if key not in value]
    if missing:
        raise Invalid(f"{cell} needs {', '.join(missing)}")
    out: Dict[str, Any] = {"type": cell}
    scale = _to_number(value["loss_scale_value"])
    if scale <= 0:
        raise Invalid("loss_scale_value must be > 0")
    out["loss_scale_value"] = scale
    if "scale_factor" in required:
        factor = _to_number(value["scale_factor"])
        if not factor > 1 or math.isinf(factor):
            # as training/loss_scale.py's cells: a factor of 1 would never move the scale
            raise Invalid("scale_factor must be a finite number > 1")
        out["scale_factor"] = factor
        out["scale_window"] = _strict_window("scale_window", value["scale_window"])
    for key, default in optional.items():
        out[key] = _strict_window(key, value.get(key, default))
    if cell == "AdaptiveLossScaleUpdateCell" and \
            not out["max_scale_window"] > out["min_scale_window"]:
        raise Invalid("max_scale_window must be greater than min_scale_window")
    return out


def _profile_framework(value: Any) -> Optional[str]:
    # Megatron-style namespaces may hold a bool here (the guide documents 'False' as default).
    if value is False:
        return None
    if value is True:
        return "all"
    if not isinstance(value, str):
        raise Invalid(type_error=True)
    text = value.strip().lower()
    if text in ("none", "null", "false", ""):
        return None
    if text not in ("all", "time"):
        raise Invalid()
    return text


class TrainingConfig(BaseConfig):
    """Training configuration.

    Loss scaling has three spellings, at most one of which may be used: ``loss_scale`` (static),
    the dynamic trio ``loss_scale_value``/``loss_scale_factor``/``loss_scale_window`` (all
    three together), or MindFormers' ``scale_sense`` mapping (which also offers the adaptive
    cell). :meth:`loss_scale_settings` returns the one in effect in a single normalised form.

    Gradient clipping is ``grad_clip_kwargs`` (MindFormers: ``use_clip_grad`` +
    ``max_grad_norm``, which write into it); :meth:`grad_clip_settings` also takes
    ``optimizer_config.clip_grad`` (Megatron's ``clip_grad``) into account.

    Args:
        parallel_config (ModelParallelConfig): Parallel configuration.
        dataset_config (DatasetConfig): Dataset configuration. Default: DatasetConfig().
        lora_config (LoraConfig): LoRA configuration. Default: LoraConfig().
        seed (int): Random seed. Default: None.
        kwargs (dict): Any other field below, or extra options (kept, with a warning).

    Raises:
        ValueError: ``fp16`` and ``bf16`` are both True.

    Examples:
        >>> from mindspeed_ms.core.config import TrainingConfig, ModelParallelConfig
        >>> parallel_config = ModelParallelConfig()
        >>> training_config = TrainingConfig(parallel_config=parallel_config)
    """

    section = "training_config"

    parallel_config = Link("ModelParallelConfig", "Parallel configuration.")
    dataset_config = Link("DatasetConfig", "Dataset configuration.")
    lora_config = Link("LoraConfig", "LoRA configuration.")
    seed = Field("int", None, "Random seed of initialisation and dropout (None = not set).",
                 ge=0, megatron=True, group="run")
    output_dir = Field("str", "./output", "Directory for checkpoints, logs and events.",
                       megatron=("save",), group="run")
    training_iters = Field("int", 0, "Training iterations (optimizer steps).", ge=0,
                           megatron=("train_iters",), aliases=("train_iters",), group="run")
    epochs = Field("int", None, "Training epochs (None = use training_iters).", ge=1,
                   group="run")
    log_interval = Field("int", None, "Log every this many iterations.", ge=1, megatron=True,
                         group="run")
    eval_interval = Field("int", None, "Evaluate every this many iterations (None = never).",
                          ge=1, megatron=True, group="eval")
    save_interval = Field("int", None, "Save a checkpoint every this many iterations "
                          "(None = never).", ge=1, megatron=True, group="checkpoint")
    best_metric_comparison = Field(
        "str", None, "How a new eval_metric value must compare with the best so far to replace "
        "the best checkpoint (<output_dir>/best); None = 'less' (lower is better for loss and "
        "perplexity).", choices=(None,) + BEST_METRIC_COMPARISONS, group="eval")
    eval_metric = Field("str", None, "Evaluation metric that selects the best checkpoint: 'loss' "
                        "(validation loss) or 'perplexity' (its exp); None = no best checkpoint.",
                        choices=(None,) + EVAL_METRICS,
                        value_aliases={"val_loss": "loss", "ppl": "perplexity"}, group="eval")
    grad_clip_kwargs = Field(
        "dict", None, "Gradient clipping: {'grad_clip_type': 'ClipGlobalNorm' or "
        "'ClipByValue', 'clip_value': x}; None = no clipping.", check=_grad_clip_kwargs,
        allowed="None or {'grad_clip_type': 'ClipGlobalNorm'|'ClipByValue', 'clip_value': > 0}",
        group="clipping")
    loss_scale = Field("number", None, "Static loss scale (None = not static).", gt=0,
                       megatron=True, group="loss_scale")
    loss_scale_value = Field("number", None, "Initial dynamic loss scale.", gt=0,
                             megatron=("initial_loss_scale",), aliases=("initial_loss_scale",),
                             group="loss_scale")
    # The guide maps Megatron's --hysteresis here. The loss-scale cells need a factor > 1 (a
    # factor of 1 never changes the scale; MindSpore's cells refuse it), so 1 is refused here,
    # when the config is loaded, rather than when training builds the cell.
    loss_scale_factor = Field("int", None, "Dynamic loss scale factor (scale is multiplied/"
                              "divided by it); Megatron's hysteresis maps here.", gt=1,
                              megatron=("hysteresis",), aliases=("hysteresis",), group="loss_scale",
                              allowed="None or an integer > 1 (the dynamic scale is divided by it "
                              "on overflow and multiplied by it after loss_scale_window clean steps)")
    loss_scale_window = Field("int", None, "Overflow-free steps before the dynamic scale grows.",
                              ge=1, megatron=True, group="loss_scale")
    loss_reduction = Field("str", "mean", "How the micro-batch losses of a step are reduced: "
                           "'mean' (gradients averaged over micro-batches, Megatron's) or 'sum'.",
                           choices=("mean", "sum"), group="loss")
    calculate_per_token_loss = Field(
        "bool", False, "Megatron's per-token loss: the sum over every unmasked token of the step "
        "divided by their number over all micro-batches and data-parallel ranks (instead of a "
        "mean per micro-batch).", megatron=True, group="loss")
    wrap_with_ddp = Field("bool", False, "Wrap the model with the distributed data-parallel "
                          "gradient buffers.", megatron=True, group="data_parallel")
    accumulate_allreduce_grads_in_fp32 = Field(
        "bool", False, "Accumulate and all-reduce gradients in float32; without it, gradients "
        "are accumulated and reduced in float16 under fp16 (bf16 always uses float32, as in "
        "Megatron).", megatron=True, group="data_parallel")
    overlap_grad_reduce = Field("bool", False, "Overlap gradient reduction with the backward "
                                "pass (data parallel).", megatron=True, group="data_parallel")
    delay_grad_reduce = Field("bool", False, "Delay gradient reduction on all pipeline stages "
                              "but the first.", megatron=True, group="data_parallel")
    use_distributed_optimizer = Field("bool", False, "Shard optimizer states over data-parallel "
                                      "ranks (ZeRO-1).", megatron=True, group="data_parallel")
    bucket_size = Field("int", None, "Bucket size (elements) of the gradient buffer when "
                        "overlap_grad_reduce is on.", ge=1, megatron=True, group="data_parallel")
    check_for_nan_in_grad = Field("bool", False, "Check that reduced gradients are finite.",
                                  group="data_parallel")
    fp16 = Field("bool", False, "Train in float16 mixed precision: model_config.compute_dtype "
                 "float16 (when unset) and dynamic loss scaling unless a loss scale is given.",
                 megatron=True, group="precision")
    bf16 = Field("bool", False, "Train in bfloat16 mixed precision: model_config.compute_dtype "
                 "bfloat16 (when unset), no loss scaling unless a static loss_scale is given.",
                 megatron=True, group="precision")
    resume_training = Field("bool", False, "Resume from load_checkpoint.", megatron=True,
                            group="checkpoint")
    crc_check = Field("bool", False, "CRC check when saving/loading checkpoints (slower).",
                      megatron=("resume_crc_check",), group="checkpoint")
    load_checkpoint = Field("str", "", "Checkpoint path to load.", megatron=("load",),
                            group="checkpoint")
    enable_compile_cache = Field("bool", False, "Save the compile cache.", group="misc")
    compile_cache_path = Field("str", None, "Where to save the compile cache.", group="misc")
    ckpt_format = Field("str", "ckpt", "Checkpoint file format.",
                        choices=("ckpt", "safetensors"), megatron=True, group="checkpoint")
    prefix = Field("str", "network", "Checkpoint file name prefix.", megatron=("ckpt_prefix",),
                   group="checkpoint")
    keep_checkpoint_max = Field("int", 5, "Maximum number of checkpoints kept.", ge=1,
                                megatron=True, group="checkpoint")
    no_load_optim = Field("bool", False, "On resume, do not load the optimizer state.",
                          megatron=True, group="checkpoint")
    no_load_rng = Field("bool", True, "On resume, do not load the RNG state.", megatron=True,
                        group="checkpoint")
    new_dataset = Field("bool", False, "On resume, start a new dataset (do not skip consumed "
                        "samples).", megatron=True, group="checkpoint")
    enable_mem_align = Field("bool", False, "Enable memory alignment.", megatron=True,
                             group="misc")
    profile = Field("bool", False, "Profile the run.", megatron=True, group="profile")
    profile_save_path = Field(
        "str", None, "Where profiles are saved (None = <output_dir>/profile).", megatron=True,
        derived=lambda c: os.path.join(c.output_dir, "profile"),
        derived_doc="<output_dir>/profile", group="profile")
    profile_step_start = Field("int", 1, "First profiled step.", ge=0, megatron=True,
                               group="profile")
    profile_step_end = Field("int", 5, "Last profiled step.", ge=0, megatron=True,
                             group="profile")
    profile_level = Field("str", "level0", "Profiling detail level.",
                          choices=("level0", "level1", "level2"), megatron=True, group="profile")
    profile_with_stack = Field("bool", False, "Record call stacks.", megatron=True,
                               group="profile")
    profile_memory = Field("bool", False, "Record memory usage.", megatron=True, group="profile")
    profile_framework = Field(
        "any", "all", "Record framework information: 'all', 'time' or None.", megatron=True,
        check=_profile_framework, type_name="str", python_type=str, nullable=True,
        choices=None, allowed="None, 'all' or 'time'", group="profile")
    profile_communication = Field("bool", False, "Record communication.", megatron=True,
                                  group="profile")
    profile_parallel_strategy = Field("bool", False, "Record the parallel strategy.",
                                      megatron=True, group="profile")
    profile_aicore_metrics = Field("int", 0, "AI Core metrics type (-1 = off).", ge=-1, le=5,
                                   megatron=True, group="profile")
    profile_l2_cache = Field("bool", False, "Record L2 cache data.", megatron=True,
                             group="profile")
    profile_hbm_ddr = Field("bool", False, "Record HBM/DDR bandwidth.", megatron=True,
                            group="profile")
    profile_pcie = Field("bool", False, "Record PCIe bandwidth.", megatron=True, group="profile")
    profile_data_process = Field("bool", False, "Record data processing.", megatron=True,
                                 group="profile")
    profile_data_simplification = Field("bool", False, "Simplify the profile data.",
                                        megatron=True, group="profile")
    profile_op_time = Field("bool", True, "Record operator times.", megatron=True,
                            group="profile")
    profile_offline_analyse = Field("bool", False, "Analyse the profile offline.",
                                    megatron=True, group="profile")
    profile_dynamic_profiler_config_path = Field(
        "str", "", "Config file of the dynamic profiler.", megatron=True, group="profile")

    # Beyond the documented signature.
    eval_iters = Field("int", 10, "Batches used by one evaluation.", ge=0, megatron=True,
                       group="eval")
    scale_sense = Field(
        "any", None, "MindFormers loss-scale cell: {type: AdaptiveLossScaleUpdateCell, "
        "loss_scale_value, scale_factor, scale_window, max_scale_window, min_scale_window}, or "
        "DynamicLossScaleUpdateCell / FixedLossScaleUpdateCell.", check=_scale_sense,
        type_name="dict", python_type=dict, group="loss_scale",
        allowed="None or {type: AdaptiveLossScaleUpdateCell|DynamicLossScaleUpdateCell|"
                "FixedLossScaleUpdateCell, ...}")

    gradient_accumulation_steps = Virtual(
        "int", "MindFormers gradient accumulation steps (= dataset_config.micro_batch_num).",
        ge=1, targets=("dataset_config.micro_batch_num",), group="batch")
    use_clip_grad = Virtual(
        "bool", "MindFormers switch for global-norm clipping (writes grad_clip_kwargs).",
        targets=("training_config.grad_clip_kwargs",), group="clipping")
    max_grad_norm = Virtual(
        "float", "MindFormers clipping threshold (grad_clip_kwargs['clip_value']).", gt=0.0,
        targets=("training_config.grad_clip_kwargs",), group="clipping")

    # -- virtual fields ------------------------------------------------------------------------

    def _get_virtual(self, name: str) -> Any:
        if name == "gradient_accumulation_steps":
            return self.dataset_config.micro_batch_num
        clip = self.grad_clip_kwargs
        if name == "use_clip_grad":
            return clip is not None
        return clip["clip_value"] if clip else self.__dict__.get("_max_grad_norm", 1.0)

    def _apply_virtuals(self, values: Dict[str, Any]) -> None:
        state = self.__dict__
        constructing = state["_constructing"]
        if "gradient_accumulation_steps" in values:
            steps = values["gradient_accumulation_steps"]
            dataset = self.dataset_config
            if constructing and "micro_batch_num" in dataset.explicit_fields() and \
                    dataset.micro_batch_num != steps:
                raise ConfigValueError(
                    "TrainingConfig", "gradient_accumulation_steps", steps,
                    f"the same as dataset_config.micro_batch_num={dataset.micro_batch_num}",
                    "both set the number of micro batches per step")
            dataset.micro_batch_num = steps
        if "use_clip_grad" in values or "max_grad_norm" in values:
            current = self.grad_clip_kwargs
            use = values.get("use_clip_grad", current is not None)
            norm = values.get("max_grad_norm", self._get_virtual("max_grad_norm"))
            state["_max_grad_norm"] = norm
            new = None
            if use:
                clip_type = current["grad_clip_type"] if current else "ClipGlobalNorm"
                new = {"grad_clip_type": clip_type, "clip_value": norm}
            if constructing and "grad_clip_kwargs" in state["_explicit"] and new != current:
                raise ConfigValueError(
                    "TrainingConfig", "grad_clip_kwargs", current,
                    f"the same as use_clip_grad/max_grad_norm ({new})",
                    "grad_clip_kwargs and use_clip_grad/max_grad_norm disagree")
            self.grad_clip_kwargs = new

    # -- rules ---------------------------------------------------------------------------------

    def _cross_check(self) -> None:
        if self.fp16 and self.bf16:
            self._reject("bf16", "False while fp16 is True", "fp16 and bf16 are exclusive")
        dynamic = {"loss_scale_value": self.loss_scale_value,
                   "loss_scale_factor": self.loss_scale_factor,
                   "loss_scale_window": self.loss_scale_window}
        given = [name for name, value in dynamic.items() if value is not None]
        if given and len(given) != len(dynamic):
            missing = [name for name in dynamic if name not in given]
            self._reject(missing[0], "set together with " + ", ".join(given),
                         "dynamic loss scaling needs loss_scale_value, loss_scale_factor and "
                         "loss_scale_window together")
        if self.loss_scale is not None and given:
            self._reject("loss_scale", "None when dynamic loss scaling is configured",
                         "static loss_scale and loss_scale_value/factor/window are exclusive")
        if self.scale_sense is not None and (self.loss_scale is not None or given):
            self._reject("scale_sense", "None when loss_scale or loss_scale_value/factor/window "
                         "is set", "give the loss scale one way only")
        if self.bf16:
            # Megatron scales a bf16 loss only by a static --loss-scale: bfloat16 has float32's
            # exponent range, so there is nothing for a dynamic scale to find
            if given:
                self._reject(given[0], "None while bf16 is True (a static loss_scale is allowed)",
                             "bf16 trains without dynamic loss scaling")
            sense = self.scale_sense
            if sense is not None and sense["type"] != "FixedLossScaleUpdateCell":
                self._reject("scale_sense", "None or a FixedLossScaleUpdateCell while bf16 is True",
                             "bf16 trains without dynamic loss scaling")
        if self.calculate_per_token_loss and self.loss_reduction == "sum":
            self._reject("loss_reduction", "'mean' when calculate_per_token_loss is True",
                         "the per-token loss already sums every token of the step and divides by "
                         "their number; a sum over micro-batches on top of it has no meaning")
        if self.best_metric_comparison is not None and self.eval_metric is None:
            self._reject("best_metric_comparison", f"None unless eval_metric is set (one of "
                         f"{', '.join(EVAL_METRICS)})", "the comparison applies to eval_metric")
        if self.eval_metric is not None and self.eval_interval is None:
            self._reject("eval_metric", "None unless eval_interval is set",
                         "the best checkpoint is chosen at the evaluations, which eval_interval "
                         "schedules")
        if self.profile_step_end < self.profile_step_start:
            self._reject("profile_step_end", f">= profile_step_start={self.profile_step_start}")

    # -- resolved views for the training layer -------------------------------------------------

    def loss_scale_settings(self) -> Optional[Dict[str, Any]]:
        """The loss scaling in effect, as a ``scale_sense``-style mapping, or None.

        Returns:
            ``{'type': 'FixedLossScaleUpdateCell', 'loss_scale_value': s}`` for ``loss_scale``;
            ``{'type': 'DynamicLossScaleUpdateCell', 'loss_scale_value', 'scale_factor',
            'scale_window'}`` for the dynamic trio; ``scale_sense`` itself when given;
            with ``fp16`` and none of these, Megatron's default dynamic scaling (initial scale
            ``2**32``, factor 2, window 1000); otherwise None (no loss scaling, as with ``bf16``).
        """
        if self.scale_sense is not None:
            return dict(self.scale_sense)
        if self.loss_scale is not None:
            return {"type": "FixedLossScaleUpdateCell", "loss_scale_value": self.loss_scale}
        if self.loss_scale_value is not None:
            return {"type": "DynamicLossScaleUpdateCell",
                    "loss_scale_value": self.loss_scale_value,
                    "scale_factor": self.loss_scale_factor,
                    "scale_window": self.loss_scale_window}
        if self.fp16:
            return {"type": "DynamicLossScaleUpdateCell",
                    "loss_scale_value": FP16_INITIAL_LOSS_SCALE,
                    "scale_factor": FP16_LOSS_SCALE_FACTOR,
                    "scale_window": FP16_LOSS_SCALE_WINDOW}
        return None

    def grad_clip_settings(self, optimizer_config=None) -> Optional[Dict[str, Any]]:
        """The gradient clipping in effect, or None.

        ``grad_clip_kwargs`` wins; otherwise ``optimizer_config.clip_grad > 0`` means global-norm
        clipping at that value.
        """
        if self.grad_clip_kwargs is not None:
            return dict(self.grad_clip_kwargs)
        clip = getattr(optimizer_config, "clip_grad", 0.0) if optimizer_config is not None else 0.0
        if clip and clip > 0 and math.isfinite(clip):
            return {"grad_clip_type": "ClipGlobalNorm", "clip_value": float(clip)}
        return None
