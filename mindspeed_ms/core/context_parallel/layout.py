"""The load-balanced sequence layout of context parallelism, batch splitting and config checks.

With causal attention, token ``i`` attends to ``i + 1`` keys, so cutting the sequence into ``cp``
consecutive pieces would give the last rank almost all of the work. Instead the sequence is cut
into ``2 * cp`` equal chunks and context-parallel rank ``r`` holds chunks ``r`` and
``2 * cp - 1 - r`` (an early and a late chunk): every rank then does the same amount of causal
attention work. Example, ``cp = 2``, sequence of 8 tokens::

    chunks:   [0 1] [2 3] [4 5] [6 7]
    rank 0:   [0 1]             [6 7]     positions 0 1 6 7
    rank 1:         [2 3] [4 5]           positions 2 3 4 5

Everything that must agree on this layout (batch splitting, RoPE angles, ring attention's causal
masks, Ulysses' reordering) gets the positions from :func:`local_positions`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.config.layout_rules import CONTEXT_PARALLEL_ALGOS, LayoutSpec, context_parallel_problems

__all__ = [
    "CONTEXT_PARALLEL_ALGOS",
    "chunk_ids",
    "local_positions",
    "position_runs",
    "take_runs",
    "split_batch_for_context_parallel",
    "gather_from_context_parallel",
    "check_context_parallel_config",
    "check_ulysses_heads",
]

def _cp_size_rank(cp_size: Optional[int], cp_rank: Optional[int]) -> Tuple[int, int]:
    size = ps.get_context_parallel_world_size() if cp_size is None else int(cp_size)
    rank = ps.get_context_parallel_rank() if cp_rank is None else int(cp_rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"context-parallel rank {rank} is outside 0..{size - 1} (context_parallel_size={size})")
    return size, rank


def _check_divisible(total_seq_len: int, cp_size: int, what: str = "sequence length") -> int:
    if total_seq_len % (2 * cp_size):
        raise ValueError(
            f"{what} ({total_seq_len}) must be divisible by 2 * context_parallel_size "
            f"(2 * {cp_size} = {2 * cp_size}): the load-balanced layout cuts the sequence into "
            f"2 * context_parallel_size equal chunks")
    return total_seq_len // (2 * cp_size)


def chunk_ids(cp_size: Optional[int] = None, cp_rank: Optional[int] = None) -> Tuple[int, int]:
    """The two chunks (of ``2 * cp_size``) held by context-parallel rank ``cp_rank``: ``(r, 2cp-1-r)``."""
    size, rank = _cp_size_rank(cp_size, cp_rank)
    return rank, 2 * size - 1 - rank


def local_positions(total_seq_len: int, cp_size: Optional[int] = None, cp_rank: Optional[int] = None) -> np.ndarray:
    """Global token positions held by a context-parallel rank, in the order it holds them.

    Args:
        total_seq_len: Length of the whole sequence.
        cp_size: Context-parallel size (default: from parallel_state).
        cp_rank: Context-parallel rank (default: this rank's).

    Returns:
        ``int64`` array of length ``total_seq_len // cp_size``: chunk ``r`` then chunk ``2cp-1-r``.
        With ``cp_size == 1``: ``arange(total_seq_len)``.

    Raises:
        ValueError: ``total_seq_len`` is not divisible by ``2 * cp_size`` (when ``cp_size > 1``).
    """
    size, rank = _cp_size_rank(cp_size, cp_rank)
    total_seq_len = int(total_seq_len)
    if size == 1:
        return np.arange(total_seq_len, dtype=np.int64)
    chunk = _check_divisible(total_seq_len, size)
    first, second = chunk_ids(size, rank)
    return np.concatenate([np.arange(first * chunk, (first + 1) * chunk),
                           np.arange(second * chunk, (second + 1) * chunk)]).astype(np.int64)


def position_runs(positions: np.ndarray) -> List[Tuple[int, int]]:
    """Maximal runs of consecutive positions, as ``[(start_index, stop_index), ...]`` into ``positions``.

    ``[0, 1, 6, 7]`` -> ``[(0, 2), (2, 4)]``. Ring attention treats each run as one segment whose
    causal relation to another segment is "fully visible", "fully masked" or "diagonal".
    """
    positions = np.asarray(positions)
    if positions.size == 0:
        return []
    breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [positions.size]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def take_runs(x: Tensor, axis: int, runs: Sequence[Tuple[int, int]]) -> Tensor:
    """``x`` restricted to index runs along ``axis`` (slices and one concat: cheap, differentiable)."""
    axis = axis % x.ndim
    if len(runs) == 1 and runs[0] == (0, x.shape[axis]):
        return x
    pieces = []
    for start, stop in runs:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        pieces.append(x[tuple(index)])
    return pieces[0] if len(pieces) == 1 else ops.concat(pieces, axis=axis)


def _slice_seq(x: Optional[Tensor], runs, name: str, seq_len: int) -> Optional[Tensor]:
    if x is None:
        return None
    if x.ndim < 2 or x.shape[1] != seq_len:
        raise ValueError(f"split_batch_for_context_parallel: {name} must have the sequence ({seq_len}) on "
                         f"dimension 1, got shape {tuple(x.shape)}")
    return take_runs(x, 1, runs)


def split_batch_for_context_parallel(tokens, position_ids, attention_mask, loss_mask, labels,
                                     cp_size: Optional[int] = None, cp_rank: Optional[int] = None):
    """This context-parallel rank's slices of a batch, in the load-balanced layout.

    Args:
        tokens: ``(B, S)`` token ids, or None (later pipeline stages).
        position_ids: ``(B, S)`` or ``(1, S)`` position ids, or None: then the global positions of
            this rank's tokens are returned as ``(1, S / cp)`` so that absolute position
            embeddings stay correct.
        attention_mask: None or a mask whose last two dimensions are ``(S, S)`` (nonzero = masked).
            It is returned **whole**: context-parallel attention picks the rows of its queries and
            the columns of each key block itself (Ulysses needs every row, ring attention the rows
            of its own queries and every key block's columns).
        loss_mask: ``(B, S)`` or None.
        labels: ``(B, S)`` or None.
        cp_size: Context-parallel size (default: from parallel_state).
        cp_rank: Context-parallel rank (default: this rank's).

    Returns:
        ``(tokens, position_ids, attention_mask, loss_mask, labels)`` for this rank.

    Raises:
        ValueError: the sequence length is not divisible by ``2 * context_parallel_size``, the
            inputs disagree on it, or the mask is not ``(..., S, S)``.
    """
    size, rank = _cp_size_rank(cp_size, cp_rank)
    seq_len = None
    for name, x in (("tokens", tokens), ("labels", labels), ("loss_mask", loss_mask), ("position_ids", position_ids)):
        if x is not None:
            if x.ndim < 2:
                raise ValueError(f"split_batch_for_context_parallel: {name} must be (B, S), got shape {tuple(x.shape)}")
            seq_len = int(x.shape[1])
            break
    if seq_len is None:
        raise ValueError("split_batch_for_context_parallel: one of tokens, labels, loss_mask or position_ids is "
                         "needed to know the sequence length")
    if size == 1:
        return tokens, position_ids, attention_mask, loss_mask, labels
    _check_divisible(seq_len, size, what=f"sequence length of the batch (seq_length={seq_len})")
    positions = local_positions(seq_len, size, rank)
    runs = [(int(positions[a]), int(positions[b - 1]) + 1) for a, b in position_runs(positions)]
    if attention_mask is not None and tuple(attention_mask.shape[-2:]) != (seq_len, seq_len):
        raise ValueError(f"split_batch_for_context_parallel: attention_mask must end in (S, S) = "
                         f"({seq_len}, {seq_len}), got shape {tuple(attention_mask.shape)}")
    if position_ids is None:
        position_ids = Tensor(positions.astype(np.int32).reshape(1, -1))
    else:
        position_ids = _slice_seq(position_ids, runs, "position_ids", seq_len)
    return (_slice_seq(tokens, runs, "tokens", seq_len), position_ids, attention_mask,
            _slice_seq(loss_mask, runs, "loss_mask", seq_len), _slice_seq(labels, runs, "labels", seq_len))


def gather_from_context_parallel(x: Tensor, dim: int = 1, group=None) -> Tensor:
    """Reassemble a sequence split by :func:`split_batch_for_context_parallel` (not differentiable).

    Every rank gets the full sequence in natural order along ``dim`` (e.g. per-token outputs for
    evaluation or tests).
    """
    from mindspeed_ms.core import communication as comm  # pylint: disable=import-outside-toplevel

    group = group or ps.get_context_parallel_group()
    size = group.size
    if size == 1:
        return x
    dim = dim % x.ndim
    gathered = comm.all_gather(x, group, dim)
    total = int(gathered.shape[dim])
    order = np.concatenate([local_positions(total, size, r) for r in range(size)])
    inverse = np.argsort(order)
    runs = position_runs(inverse)
    return take_runs(gathered, dim, [(int(inverse[a]), int(inverse[b - 1]) + 1) for a, b in runs])


def _get(obj, name, default=None):
    value = getattr(obj, name, default) if obj is not None else default
    return default if value is None else value


def check_context_parallel_config(config, num_attention_heads: Optional[int] = None,
                                  tensor_parallel_size: Optional[int] = None,
                                  context_parallel_size: Optional[int] = None) -> None:
    """Reject configurations context parallelism cannot run, before any data flows.

    Args:
        config: A TransformerConfig (with ``parallel_config``) or a ModelParallelConfig.
        num_attention_heads: Default: ``config.num_attention_heads``.
        tensor_parallel_size: Default: ``parallel_config.tensor_model_parallel_size``.
        context_parallel_size: Default: ``parallel_config.context_parallel_size`` (the model
            passes parallel_state's size, which is what actually runs).

    Raises:
        ValueError: an unknown ``context_parallel_algo``; ``expert_model_parallel_size > 1``
            together with ``context_parallel_size > 1``; ``seq_length`` not divisible by
            ``2 * context_parallel_size``; ``hybrid_cp_algo`` without a ``ulysses_degree_in_cp``
            that divides ``context_parallel_size``; attention heads per tensor-parallel rank not
            divisible by the Ulysses degree. Each message names the fields and their values.
            These are the context-parallel rules of :mod:`mindspeed_ms.core.config.layout_rules`,
            which ``validate_for_world_size`` applies to the config before launch.
    """
    parallel = _get(config, "parallel_config", config)
    cp = int(context_parallel_size if context_parallel_size is not None
             else _get(parallel, "context_parallel_size", 1))
    if cp <= 1:
        return
    heads = num_attention_heads if num_attention_heads is not None else _get(config, "num_attention_heads", None)
    tp = int(tensor_parallel_size if tensor_parallel_size is not None
             else _get(parallel, "tensor_model_parallel_size", 1))
    ulysses = _get(parallel, "ulysses_degree_in_cp", None)
    seq = _get(config, "seq_length", None)
    # the same rules validate_for_world_size applies to the config, here with the sizes that run
    spec = LayoutSpec(world_size=tp * cp, tensor_model_parallel_size=tp, context_parallel_size=cp,
                      expert_model_parallel_size=int(_get(parallel, "expert_model_parallel_size", 1)),
                      context_parallel_algo=_get(parallel, "context_parallel_algo", "ulysses_cp_algo"),
                      ulysses_degree_in_cp=int(ulysses) if ulysses is not None else None,
                      num_attention_heads=int(heads) if heads is not None else None,
                      seq_length=int(seq) if seq is not None else None)
    problems = context_parallel_problems(spec)
    if problems:
        raise ValueError("; ".join(problems))


def check_ulysses_heads(local_heads: int, ulysses_degree: int, num_attention_heads: Optional[int] = None,
                        tensor_parallel_size: Optional[int] = None) -> None:
    """Raise ValueError unless the attention heads of this tensor-parallel rank split over Ulysses ranks."""
    if local_heads % ulysses_degree:
        where = ""
        if num_attention_heads is not None:
            where = (f" (num_attention_heads={num_attention_heads} / tensor_model_parallel_size="
                     f"{tensor_parallel_size})")
        raise ValueError(
            f"attention heads per tensor-parallel rank ({local_heads}){where} must be divisible by the Ulysses "
            f"degree ({ulysses_degree}: context_parallel_size for ulysses_cp_algo, ulysses_degree_in_cp for "
            "hybrid_cp_algo)")

