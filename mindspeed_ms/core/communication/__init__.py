"""The communication layer: the one module that knows which collective backend runs.

Everything above it (parallel_state, tensor/pipeline/context/expert parallelism, the data-parallel
gradient reduction, the distributed optimizer) calls the functions exported here with a
:class:`ProcessGroup`. On Ascend (HCCL) and GPU (NCCL) they use the native primitives; on CPU
(MindSpore's mccl backend, which only runs a sum-AllReduce on sub-groups) they are composed from
that AllReduce. See docs/architecture.md.

Non-differentiable collectives are exported at the top level; differentiable ones (with the
adjoint collective as backward) are in :mod:`mindspeed_ms.core.communication.autograd`.
"""

from . import autograd
from .backends import get_backend, set_backend
from .collectives import (
    all_gather,
    all_reduce,
    all_to_all,
    all_to_all_v,
    barrier,
    broadcast,
    exchange,
    recv,
    reduce_scatter,
    send,
)
from .timing import comm_timer_enabled, comm_timer_summary, enable_comm_timer, reset_comm_timer
from .groups import (
    ProcessGroup,
    device_target,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    launched_by_msrun,
    new_group,
    world_group,
)

__all__ = [
    "autograd",
    "ProcessGroup",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_all_v",
    "barrier",
    "broadcast",
    "comm_timer_enabled",
    "comm_timer_summary",
    "device_target",
    "enable_comm_timer",
    "exchange",
    "get_backend",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_initialized",
    "launched_by_msrun",
    "new_group",
    "recv",
    "reduce_scatter",
    "reset_comm_timer",
    "send",
    "set_backend",
    "world_group",
]
