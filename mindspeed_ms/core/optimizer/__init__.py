"""Optimizers, learning-rate/weight-decay schedules, the distributed optimizer and grad clipping."""

from mindspeed_ms.core.optimizer.lr_scheduler import OptimizerParamScheduler

__all__ = ["OptimizerParamScheduler"]
