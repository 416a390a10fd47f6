"""Data-parallel gradient accumulation, bucketed reduction and the model-gradient finalisation."""

from .distributed_data_parallel import (DistributedDataParallel, GradBuffer, PerParameterGrads,
                                        finalize_model_grads)

__all__ = ["DistributedDataParallel", "GradBuffer", "PerParameterGrads", "finalize_model_grads"]
