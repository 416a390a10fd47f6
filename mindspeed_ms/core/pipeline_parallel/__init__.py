"""Pipeline parallelism: schedules over micro-batches and stage-to-stage transfers."""

from .pipelined import forward_backward_pipelining_with_interleaving, forward_backward_pipelining_without_interleaving
from .schedule_plan import build_plan, render_timeline, schedule_order, simulate_blocking_exchanges
from .schedules import forward_backward_no_pipelining, get_forward_backward_func

__all__ = [
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving",
    "get_forward_backward_func",
    "build_plan",
    "render_timeline",
    "schedule_order",
    "simulate_blocking_exchanges",
]
