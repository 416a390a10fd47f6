"""Optimizers, learning-rate/weight-decay schedules, the distributed optimizer and grad clipping."""

from mindspeed_ms.core.optimizer.lr_scheduler import OptimizerParamScheduler
from mindspeed_ms.core.optimizer.optimizer import (OPTIMIZER_TYPES, MegatronOptimizer, clip_grads_by_norm,
                                                   clip_grads_by_value, get_grad_norm, get_megatron_optimizer,
                                                   get_param_groups, parse_grad_clip)

__all__ = ["OptimizerParamScheduler", "OPTIMIZER_TYPES", "MegatronOptimizer", "clip_grads_by_norm",
           "clip_grads_by_value", "get_grad_norm", "get_megatron_optimizer", "get_param_groups", "parse_grad_clip"]
