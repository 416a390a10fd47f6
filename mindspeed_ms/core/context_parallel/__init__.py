"""Context parallelism: the sequence split over ranks (Ulysses, ring attention, hybrid).

The model uses three hooks:

* :func:`split_batch_for_context_parallel` (GPTModel): this rank's tokens, labels, loss mask and
  position ids in the load-balanced layout (chunks ``r`` and ``2cp-1-r`` of ``2cp``); the
  attention mask is passed down whole.
* :func:`local_positions` (the language model): global positions of this rank's tokens (RoPE).
* :func:`context_parallel_attention` (ParallelAttention): attention of this rank's queries over
  the whole sequence with the configured algorithm.

The loss is summed over the context-parallel group by ``LossWithMask``; the data-parallel
gradient reduction then has to run over the data-and-context-parallel group
(``get_data_parallel_group(with_context_parallel=True)``), summing the context-parallel ranks'
gradients. See docs/context_parallel.md.
"""

from .attention import context_parallel_attention, hybrid_attention, hybrid_member_positions
from .layout import (
    CONTEXT_PARALLEL_ALGOS,
    check_context_parallel_config,
    check_ulysses_heads,
    chunk_ids,
    gather_from_context_parallel,
    local_positions,
    split_batch_for_context_parallel,
)
from .ring import RingPlan, ring_attention
from .ulysses import ulysses_attention, ulysses_gather_heads, ulysses_scatter_heads

__all__ = [
    "CONTEXT_PARALLEL_ALGOS",
    "RingPlan",
    "check_context_parallel_config",
    "check_ulysses_heads",
    "chunk_ids",
    "context_parallel_attention",
    "gather_from_context_parallel",
    "hybrid_attention",
    "hybrid_member_positions",
    "local_positions",
    "ring_attention",
    "split_batch_for_context_parallel",
    "ulysses_attention",
    "ulysses_gather_heads",
    "ulysses_scatter_heads",
]
