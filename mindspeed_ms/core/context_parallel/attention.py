"""The context-parallel attention entry point used by the model, and hybrid (Ulysses x ring) attention.

``context_parallel_attention`` is what ``ParallelAttention`` calls when
``context_parallel_size > 1``; it reads the algorithm from the module's config:

* ``ulysses_cp_algo``: all-to-all over the context-parallel group, then the module's own
  attention over the whole sequence (flash attention or the plain core attention, exactly as with
  one rank), then the reverse all-to-all.
* ``megatron_cp_algo``: ring attention over the context-parallel group.
* ``hybrid_cp_algo``: all-to-all inside groups of ``ulysses_degree_in_cp`` ranks, ring attention
  across those groups (over the ``cp_ring`` groups of parallel_state).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from mindspore import Tensor

from mindspeed_ms.core import parallel_state as ps

from .layout import CONTEXT_PARALLEL_ALGOS, check_ulysses_heads, local_positions
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["context_parallel_attention", "hybrid_attention", "hybrid_member_positions"]

_CAUSAL_MASK_TYPES = ("causal", "padding_causal")


def hybrid_member_positions(total_seq_len: int, cp_size: int, ulysses_degree: int):
    """Global positions in hybrid context parallelism.

    Context-parallel rank ``c`` is member ``c % u`` of Ulysses group ``c // u`` and member
    ``c // u`` of ring group ``c % u`` (parallel_state's hybrid groups). After the Ulysses
    all-to-all, the ranks of Ulysses group ``i`` hold the tokens of its ``u`` members, sorted by
    position: with the load-balanced layout these are two runs (chunks ``i*u .. i*u+u-1`` and
    their mirror images), i.e. the load-balanced layout of the ring with chunks ``u`` times larger.

    Returns:
        ``(ulysses_members, ring_members)``: ``ulysses_members[i]`` lists the positions of each
        member of Ulysses group ``i`` (in member order); ``ring_members[i]`` the sorted positions
        Ulysses group ``i`` holds after its all-to-all (a ring member's sequence).
    """
    if cp_size % ulysses_degree:
        raise ValueError(f"ulysses_degree_in_cp ({ulysses_degree}) must divide context_parallel_size ({cp_size})")
    groups = cp_size // ulysses_degree
    ulysses_members = [[local_positions(total_seq_len, cp_size, i * ulysses_degree + j) for j in range(ulysses_degree)]
                       for i in range(groups)]
    ring_members = [np.sort(np.concatenate(members)) for members in ulysses_members]
    return ulysses_members, ring_members


def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, ulysses_group=None, ring_group=None, causal: bool = True,
                     scale: Optional[float] = None, attn_mask=None, dropout_p: float = 0.0) -> Tensor:
    """Ulysses inside groups of ``ulysses_group.size`` ranks, ring attention across them.

    Args:
        q, k, v: This context-parallel rank's ``(B, N, L, D)`` / ``(B, Nk, L, D)`` tensors in the
            load-balanced layout (context-parallel rank = ``ring_rank * u + ulysses_rank``).
        ulysses_group: Default: parallel_state's hybrid Ulysses group.
        ring_group: Default: parallel_state's hybrid ring group.
        causal, scale, attn_mask, dropout_p: As in :func:`~.ring.ring_attention` (``attn_mask``
            over the whole sequence).

    Returns:
        ``(B, N, L, D)`` for this rank's tokens.
    """
    ulysses_group = ulysses_group or ps.get_context_parallel_group_for_hybrid_ulysses()
    ring_group = ring_group or ps.get_context_parallel_group_for_hybrid_ring()
    u, r = ulysses_group.size, ring_group.size
    length = int(q.shape[2])
    total = length * u * r
    ulysses_members, ring_members = hybrid_member_positions(total, u * r, u)
    me_ring = ring_group.rank if r > 1 else 0

    def ring_fn(qs, ks, vs, positions):
        del positions  # == ring_members[me_ring]
        return ring_attention(qs, ks, vs, group=ring_group, positions=ring_members, causal=causal, scale=scale,
                              attn_mask=attn_mask, dropout_p=dropout_p)

    return ulysses_attention(q, k, v, ring_fn, ulysses_group, ulysses_members[me_ring])


def _is_causal(attention_module) -> bool:
    mask_type = getattr(getattr(attention_module, "core_attention", None), "attn_mask_type", None)
    if mask_type is None:
        mask_type = getattr(attention_module, "attn_mask_type", None)
    name = getattr(mask_type, "name", str(mask_type))
    return name in _CAUSAL_MASK_TYPES


def _local_attention(attention_module):
    """The module's own single-rank attention ``fn(q, k, v, mask)`` (flash or core attention)."""
    fn = getattr(attention_module, "local_attention", None)
    if fn is not None:
        return fn
    return attention_module.core_attention.attend


def _algorithm(attention_module) -> str:
    algo = attention_module.config.parallel_config.context_parallel_algo
    if algo not in CONTEXT_PARALLEL_ALGOS:
        raise ValueError(f"context_parallel_algo must be one of {list(CONTEXT_PARALLEL_ALGOS)}, got {algo!r}")
    return algo


def _hybrid_groups(cp_group, parallel):
    degree = getattr(parallel, "ulysses_degree_in_cp", None)
    state_degree = ps.get_ulysses_degree_in_cp()
    if degree is None or cp_group.size % int(degree):
        raise ValueError(f"hybrid_cp_algo needs ulysses_degree_in_cp dividing context_parallel_size "
                         f"({cp_group.size}), got ulysses_degree_in_cp={degree!r}")
    if state_degree != int(degree):
        raise ValueError(
            f"hybrid_cp_algo: the config has ulysses_degree_in_cp={degree} but parallel_state was initialised with "
            f"ulysses_degree_in_cp={state_degree}; pass ulysses_degree_in_cp={degree} to "
            "initialize_model_parallel() so that the Ulysses and ring groups exist")
    ulysses_group = ps.get_context_parallel_group_for_hybrid_ulysses()
    ring_group = ps.get_context_parallel_group_for_hybrid_ring()
    u = int(degree)
    c = cp_group.rank
    if tuple(ulysses_group.ranks) != tuple(cp_group.ranks[(c // u) * u:(c // u + 1) * u]) or \
            tuple(ring_group.ranks) != tuple(cp_group.ranks[c % u::u]):
        raise RuntimeError("hybrid_cp_algo: parallel_state's Ulysses/ring groups do not follow the layout "
                           "(Ulysses groups of consecutive context-parallel ranks, ring groups strided)")
    return ulysses_group, ring_group


def context_parallel_attention(attention_module, query: Tensor, key: Tensor, value: Tensor,
                               attention_mask=None) -> Tensor:
    """Attention of this context-parallel rank's queries over the whole sequence.

    Called by ``ParallelAttention`` when ``context_parallel_size > 1``.

    Args:
        attention_module: The ``ParallelAttention`` cell: its ``config`` (``parallel_config.
            context_parallel_algo``, ``ulysses_degree_in_cp``), ``core_attention`` (mask type,
            attention dropout), ``kv_channels``, ``training`` and ``local_attention`` (the
            single-rank attention Ulysses runs) are used.
        query: ``(B, N, L, D)``, ``L = S / cp`` tokens in the load-balanced layout, RoPE applied.
        key: ``(B, Nk, L, D)``.
        value: ``(B, Nk, L, D)``.
        attention_mask: None or the mask of the whole sequence (``(..., S, S)``, nonzero =
            masked), as :func:`~.layout.split_batch_for_context_parallel` passes it down.

    Returns:
        ``(B, N, L, D)``: the attention output of this rank's tokens.

    Raises:
        ValueError: an unknown algorithm, heads not divisible by the Ulysses degree, or a hybrid
            configuration that disagrees with parallel_state.
    """
    cp_group = ps.get_context_parallel_group()
    cp = cp_group.size
    algo = _algorithm(attention_module)
    if cp == 1:
        return _local_attention(attention_module)(query, key, value, attention_mask)
    total = int(query.shape[2]) * cp
    causal = _is_causal(attention_module)
    scale = 1.0 / math.sqrt(int(attention_module.kv_channels))
    core = getattr(attention_module, "core_attention", None)
    dropout_p = float(getattr(core, "attention_dropout", 0.0) or 0.0) if attention_module.training else 0.0
    if algo == "ulysses_cp_algo":
        local = _local_attention(attention_module)
        members = [local_positions(total, cp, r) for r in range(cp)]

        def whole_sequence(qs, ks, vs, positions):
            del positions  # == arange(total): the module's attention applies masks by index
            return local(qs, ks, vs, attention_mask)

        return ulysses_attention(query, key, value, whole_sequence, cp_group, members)
    if algo == "megatron_cp_algo":
        return _under_model_parallel_rng(dropout_p, lambda: ring_attention(
            query, key, value, cp_group, None, causal, scale, attention_mask, dropout_p))
    ulysses_group, ring_group = _hybrid_groups(cp_group, attention_module.config.parallel_config)
    check_ulysses_heads(int(query.shape[1]), ulysses_group.size)
    return _under_model_parallel_rng(dropout_p, lambda: hybrid_attention(
        query, key, value, ulysses_group, ring_group, causal, scale, attention_mask, dropout_p))


def _under_model_parallel_rng(dropout_p, fn):
    """Run ``fn`` with the model-parallel RNG stream current when it draws dropout seeds.

    The module's own attention dropout forks into that stream (heads differ across tensor-parallel
    ranks, so their masks must too); ring attention draws its seed the same way.
    """
    if dropout_p <= 0.0:
        return fn()
    from mindspeed_ms.core.tensor_parallel.random import (  # pylint: disable=import-outside-toplevel
        MODEL_PARALLEL_RNG, get_rng_tracker)

    with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
        return fn()
