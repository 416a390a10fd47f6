"""The pipeline schedules as plain data: the order of forward and backward steps on every stage,
and the communication plan that carries activations and gradients between stages.

Nothing here imports MindSpore, so the schedules can be checked (and drawn) without processes:

* :func:`schedule_order` is the list of ``('F' | 'B', microbatch, chunk)`` steps one pipeline
  rank runs: 1F1B (warm-up forwards, then one forward and one backward alternately, then the
  remaining backwards) or, with model chunks, interleaved 1F1B.
* :func:`build_plan` turns the orders of all ranks into *ticks*. At every tick each rank runs at
  most one step (as early as its input allows), then takes part in one batch of point-to-point
  transfers in which every tensor produced during that tick is delivered. Both ends of every
  transfer therefore meet in the same batch, in the same position of their sequences, which is
  what blocking pairwise exchanges (the CPU backend) need; the executor in
  :mod:`.pipelined` follows this plan literally.
* :func:`simulate_blocking_exchanges` replays a plan as independent processes whose transfers
  block until the peer takes part, with the pairs of one batch taken in the global order that the
  communication layer uses. It raises if the plan would deadlock or if two ends disagree.
* :func:`render_timeline` draws the plan as an ASCII table (used by docs/pipeline.md).

Stage numbering: a model with ``v`` chunks per rank on ``p`` ranks has ``p * v`` virtual stages;
chunk ``c`` of rank ``r`` is virtual stage ``c * p + r`` (Megatron's layout: chunk 0 of every rank
first, then chunk 1, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "Step",
    "Transfer",
    "Tick",
    "ScheduleError",
    "one_f_one_b_order",
    "interleaved_order",
    "schedule_order",
    "check_order",
    "build_plan",
    "simulate_blocking_exchanges",
    "render_timeline",
    "render_orders",
]

Step = Tuple[str, int, int]
"""``('F' | 'B', microbatch, chunk)``: one forward or backward pass of one micro-batch through one
model chunk of this rank."""


class ScheduleError(ValueError):
    """A schedule's arguments are invalid, or its steps cannot run (they would wait forever)."""


@dataclass(frozen=True)
class Transfer:
    """One tensor travelling between two pipeline ranks.

    Attributes:
        kind: ``'activation'`` (output of a forward step, input of the next virtual stage's
            forward) or ``'gradient'`` (input gradient of a backward step, output gradient of the
            previous virtual stage's backward).
        microbatch: The micro-batch it belongs to.
        src: Sending pipeline rank.
        src_chunk: The sender's model chunk that produced it.
        dst: Receiving pipeline rank.
        dst_chunk: The receiver's model chunk that consumes it.
    """

    kind: str
    microbatch: int
    src: int
    src_chunk: int
    dst: int
    dst_chunk: int

    @property
    def consumer(self) -> Step:
        """The receiver's step that uses this tensor."""
        return ("F" if self.kind == "activation" else "B", self.microbatch, self.dst_chunk)

    @property
    def producer(self) -> Step:
        """The sender's step that produces this tensor."""
        return ("F" if self.kind == "activation" else "B", self.microbatch, self.src_chunk)


@dataclass
class Tick:
    """What one rank does at one tick: at most one step, then one batch of transfers.

    Attributes:
        index: The tick number (global: equal on all ranks for the same batch).
        step: The step run at this tick, or None (the rank only communicates).
        sends: Transfers this rank sends in the tick's batch (produced by ``step``).
        recvs: Transfers this rank receives in the tick's batch.
    """

    index: int
    step: Optional[Step] = None
    sends: List[Transfer] = field(default_factory=list)
    recvs: List[Transfer] = field(default_factory=list)


def _check_sizes(num_microbatches: int, pipeline_size: int, pipeline_rank: Optional[int] = None,
                 num_chunks: Optional[int] = None) -> None:
    for name, value in (("num_microbatches", num_microbatches), ("pipeline_model_parallel_size", pipeline_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {value!r}")
    if pipeline_rank is not None and not 0 <= pipeline_rank < pipeline_size:
        raise ScheduleError(f"pipeline rank {pipeline_rank} is outside 0..{pipeline_size - 1} "
                            f"(pipeline_model_parallel_size={pipeline_size})")
    if num_chunks is not None and (not isinstance(num_chunks, int) or isinstance(num_chunks, bool)
                                   or num_chunks < 1):
        raise ScheduleError(f"virtual_pipeline_model_parallel_size (model chunks per rank) must be a positive "
                            f"integer, got {num_chunks!r}")


def one_f_one_b_order(num_microbatches: int, pipeline_size: int, pipeline_rank: int,
                      forward_only: bool = False) -> List[Step]:
    """The 1F1B order of one rank (PipeDream-Flush, Megatron's non-interleaved schedule).

    Rank ``r`` of ``p`` first runs ``min(p - r - 1, m)`` warm-up forwards; then it alternates one
    forward and one backward, so that at most ``p - r`` micro-batches hold activations at a time;
    the cool-down runs the backwards that remain.

    Args:
        num_microbatches: Micro-batches per step (``m``).
        pipeline_size: Pipeline stages (``p``).
        pipeline_rank: This rank's stage (``r``).
        forward_only: Only the forwards, in micro-batch order (evaluation).

    Returns:
        The steps, each ``('F' | 'B', microbatch, 0)``.
    """
    _check_sizes(num_microbatches, pipeline_size, pipeline_rank)
    if forward_only:
        return [("F", i, 0) for i in range(num_microbatches)]
    warmup = min(pipeline_size - pipeline_rank - 1, num_microbatches)
    order: List[Step] = [("F", i, 0) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        order.append(("F", warmup + i, 0))
        order.append(("B", i, 0))
    order.extend(("B", i, 0) for i in range(num_microbatches - warmup, num_microbatches))
    return order


def _virtual_microbatch(k: int, pipeline_size: int, num_chunks: int, forward: bool) -> Tuple[int, int]:
    """``(microbatch, chunk)`` of the ``k``-th forward (or backward) on a rank of the interleaved schedule.

    Micro-batches go through the chunks in groups of ``pipeline_size``: the first ``p`` micro-batches
    through chunk 0, the same ``p`` through chunk 1, ..., then the next ``p`` micro-batches. Backwards
    walk the chunks in the reverse order.
    """
    group = pipeline_size * num_chunks
    chunk = (k % group) // pipeline_size
    if not forward:
        chunk = num_chunks - 1 - chunk
    microbatch = (k // group) * pipeline_size + k % pipeline_size
    return microbatch, chunk


def interleaved_order(num_microbatches: int, pipeline_size: int, pipeline_rank: int, num_chunks: int,
                      forward_only: bool = False) -> List[Step]:
    """The interleaved 1F1B order of one rank (Narayanan et al. 2021, Megatron's virtual pipeline).

    With ``v`` chunks, rank ``r`` of ``p`` runs ``(p - r - 1) * 2 + (v - 1) * p`` warm-up forwards
    (all of them when ``m == p``), then alternates forward and backward, then finishes the
    backwards. ``m`` must be a multiple of ``p``: micro-batches enter the chunks in groups of ``p``.

    Args:
        num_microbatches: Micro-batches per step (``m``).
        pipeline_size: Pipeline stages (``p``).
        pipeline_rank: This rank's stage (``r``).
        num_chunks: Model chunks per rank (``v``, the virtual pipeline size).
        forward_only: Only the forwards (evaluation).

    Returns:
        The steps, each ``('F' | 'B', microbatch, chunk)``.

    Raises:
        ScheduleError: ``num_microbatches`` is not a multiple of ``pipeline_size``.
    """
    _check_sizes(num_microbatches, pipeline_size, pipeline_rank, num_chunks)
    if num_microbatches % pipeline_size:
        raise ScheduleError(
            f"interleaved pipelining needs num_microbatches (dataset_config.micro_batch_num) to be a multiple "
            f"of pipeline_model_parallel_size={pipeline_size}, got {num_microbatches}")
    total = num_microbatches * num_chunks
    if forward_only:
        return [("F",) + _virtual_microbatch(k, pipeline_size, num_chunks, True) for k in range(total)]
    if num_microbatches == pipeline_size:
        # One group of micro-batches only: the steady state would need a gradient that has not been
        # produced yet, so every forward runs first (Megatron does the same).
        warmup = total
    else:
        warmup = min((pipeline_size - pipeline_rank - 1) * 2 + (num_chunks - 1) * pipeline_size, total)
    order: List[Step] = [("F",) + _virtual_microbatch(k, pipeline_size, num_chunks, True) for k in range(warmup)]
    for k in range(total - warmup):
        order.append(("F",) + _virtual_microbatch(k + warmup, pipeline_size, num_chunks, True))
        order.append(("B",) + _virtual_microbatch(k, pipeline_size, num_chunks, False))
    order.extend(("B",) + _virtual_microbatch(k, pipeline_size, num_chunks, False)
                 for k in range(total - warmup, total))
    return order


def schedule_order(num_microbatches: int, pipeline_size: int, pipeline_rank: int,
                   num_chunks: Optional[int] = None, forward_only: bool = False) -> List[Step]:
    """The order of one rank: 1F1B without ``num_chunks``, interleaved 1F1B with it.

    See :func:`one_f_one_b_order` and :func:`interleaved_order`.
    """
    if num_chunks is None:
        return one_f_one_b_order(num_microbatches, pipeline_size, pipeline_rank, forward_only)
    return interleaved_order(num_microbatches, pipeline_size, pipeline_rank, num_chunks, forward_only)


def check_order(order: Sequence[Step], num_microbatches: int, num_chunks: int = 1,
                forward_only: bool = False) -> None:
    """Check that ``order`` runs every (micro-batch, chunk) forward once, and (when training) its
    backward once and after the forward.

    Raises:
        ScheduleError: naming the first problem.
    """
    seen_f, seen_b = set(), set()
    for kind, mb, chunk in order:
        key = (mb, chunk)
        if kind not in ("F", "B") or not 0 <= mb < num_microbatches or not 0 <= chunk < num_chunks:
            raise ScheduleError(f"invalid step {(kind, mb, chunk)!r}")
        if kind == "F":
            if key in seen_f:
                raise ScheduleError(f"forward of micro-batch {mb}, chunk {chunk} appears twice")
            seen_f.add(key)
        else:
            if forward_only:
                raise ScheduleError("a forward-only order contains a backward step")
            if key not in seen_f:
                raise ScheduleError(f"backward of micro-batch {mb}, chunk {chunk} comes before its forward")
            if key in seen_b:
                raise ScheduleError(f"backward of micro-batch {mb}, chunk {chunk} appears twice")
            seen_b.add(key)
    expected = {(mb, c) for mb in range(num_microbatches) for c in range(num_chunks)}
    if seen_f != expected:
        raise ScheduleError(f"forwards missing for (micro-batch, chunk) {sorted(expected - seen_f)[:4]}")
    if not forward_only and seen_b != expected:
        raise ScheduleError(f"backwards missing for (micro-batch, chunk) {sorted(expected - seen_b)[:4]}")


def _input_of(step: Step, rank: int, pipeline_size: int, num_chunks: int) -> Optional[Transfer]:
    """The transfer ``step`` of ``rank`` waits for (None: its input is local)."""
    kind, mb, chunk = step
    stage = chunk * pipeline_size + rank
    last = pipeline_size * num_chunks - 1
    if kind == "F":
        if stage == 0:
            return None
        src = stage - 1
        return Transfer("activation", mb, src % pipeline_size, src // pipeline_size, rank, chunk)
    if stage == last:
        return None
    src = stage + 1
    return Transfer("gradient", mb, src % pipeline_size, src // pipeline_size, rank, chunk)


def _output_of(step: Step, rank: int, pipeline_size: int, num_chunks: int) -> Optional[Transfer]:
    """The transfer ``step`` of ``rank`` produces (None: nothing leaves the rank)."""
    kind, mb, chunk = step
    stage = chunk * pipeline_size + rank
    last = pipeline_size * num_chunks - 1
    if kind == "F":
        if stage == last:
            return None
        dst = stage + 1
        return Transfer("activation", mb, rank, chunk, dst % pipeline_size, dst // pipeline_size)
    if stage == 0:
        return None
    dst = stage - 1
    return Transfer("gradient", mb, rank, chunk, dst % pipeline_size, dst // pipeline_size)


def build_plan(num_microbatches: int, pipeline_size: int, num_chunks: Optional[int] = None,
               forward_only: bool = False, orders: Optional[Sequence[Sequence[Step]]] = None) -> List[List[Tick]]:
    """The tick plan of every rank.

    Every rank runs its next step at the first tick at which the step's input has been delivered
    (a tensor produced at tick ``t`` is delivered in the batch of tick ``t``, so it can be used from
    tick ``t + 1``). Ranks keep their order; only the timing is derived.

    Args:
        num_microbatches: Micro-batches per step.
        pipeline_size: Pipeline ranks.
        num_chunks: Model chunks per rank (None: 1F1B).
        forward_only: Forward steps only (evaluation).
        orders: Per-rank orders to plan instead of :func:`schedule_order`'s (tests use this to
            check that a broken order is refused).

    Returns:
        For each pipeline rank, its ticks that have a step or a transfer, in tick order.

    Raises:
        ScheduleError: invalid sizes, or orders that cannot run (a step waits for a tensor that is
            never produced); the message names the waiting steps.
    """
    _check_sizes(num_microbatches, pipeline_size, None, num_chunks)
    chunks = num_chunks or 1
    if orders is None:
        orders = [schedule_order(num_microbatches, pipeline_size, r, num_chunks, forward_only)
                  for r in range(pipeline_size)]
    if len(orders) != pipeline_size:
        raise ScheduleError(f"expected {pipeline_size} orders (one per pipeline rank), got {len(orders)}")
    for order in orders:
        check_order(order, num_microbatches, chunks, forward_only)
    position = [0] * pipeline_size
    delivered = set()
    plan: List[List[Tick]] = [[] for _ in range(pipeline_size)]
    tick = 0
    while any(position[r] < len(orders[r]) for r in range(pipeline_size)):
        ran: Dict[int, Step] = {}
        produced: List[Transfer] = []
        for r in range(pipeline_size):
            if position[r] == len(orders[r]):
                continue
            step = tuple(orders[r][position[r]])
            need = _input_of(step, r, pipeline_size, chunks)
            if need is not None and need not in delivered:
                continue
            ran[r] = step
            position[r] += 1
            out = _output_of(step, r, pipeline_size, chunks)
            if out is not None:
                produced.append(out)
        if not ran:
            waiting = {r: orders[r][position[r]] for r in range(pipeline_size) if position[r] < len(orders[r])}
            raise ScheduleError(f"the pipeline orders cannot run: every rank waits for a tensor that is never "
                                f"sent (next step per rank: {waiting})")
        ticks = {r: Tick(tick, step=ran.get(r)) for r in set(ran) | {t.dst for t in produced}}
        for transfer in produced:
            ticks[transfer.src].sends.append(transfer)
            ticks[transfer.dst].recvs.append(transfer)
            delivered.add(transfer)
        for r in sorted(ticks):
            plan[r].append(ticks[r])
        tick += 1
    return plan


def simulate_blocking_exchanges(plan: Sequence[Sequence[Tick]]) -> int:
    """Replay ``plan`` with blocking pairwise exchanges and check that it completes.

    Each rank runs on its own: for every tick, its step (no waiting), then one exchange per peer
    of the batch, peers in increasing rank order (the communication layer's global pair order).
    An exchange completes only when the peer is at its exchange with this rank; then both sides
    must agree on what travels each way.

    Pipeline ranks stand for global ranks here: the global ranks of a pipeline group increase with
    the stage, so the pair order is the same.

    Returns:
        The number of pairwise exchanges.

    Raises:
        ScheduleError: a deadlock (naming what each blocked rank waits for) or a mismatch.
    """
    queues: List[List[Tuple[int, int, Tuple[Transfer, ...], Tuple[Transfer, ...]]]] = []
    for rank, ticks in enumerate(plan):
        queue = []
        for tick in ticks:
            peers = sorted({t.dst for t in tick.sends} | {t.src for t in tick.recvs})
            for peer in peers:
                out = tuple(t for t in tick.sends if t.dst == peer)
                inc = tuple(t for t in tick.recvs if t.src == peer)
                queue.append((tick.index, peer, out, inc))
        queues.append(queue)
    position = [0] * len(plan)
    exchanges = 0
    progress = True
    while progress:
        progress = False
        for rank, queue in enumerate(queues):
            if position[rank] == len(queue):
                continue
            index, peer, out, inc = queue[position[rank]]
            if peer == rank:
                raise ScheduleError(f"rank {rank} exchanges with itself at tick {index}")
            if position[peer] == len(queues[peer]):
                continue
            p_index, p_peer, p_out, p_inc = queues[peer][position[peer]]
            if p_peer != rank:
                continue
            if p_out != inc or p_inc != out:
                raise ScheduleError(f"ranks {rank} and {peer} disagree at ticks {index}/{p_index}: rank {rank} "
                                    f"sends {out} and expects {inc}; rank {peer} sends {p_out} and expects {p_inc}")
            position[rank] += 1
            position[peer] += 1
            exchanges += 1
            progress = True
    blocked = {r: queues[r][position[r]][:2] for r in range(len(plan)) if position[r] < len(queues[r])}
    if blocked:
        raise ScheduleError(f"deadlock: blocked ranks wait at (tick, peer) {blocked}")
    return exchanges


def _cell(step: Optional[Step], chunked: bool) -> str:
    if step is None:
        return "."
    kind, mb, chunk = step
    return f"{kind}{mb}" + (f"{'abcdefghijklmnopqrstuvwxyz'[chunk]}" if chunked else "")


def render_timeline(plan: Sequence[Sequence[Tick]], chunked: bool = False) -> str:
    """An ASCII table: one row per rank, one column per tick, the step run there.

    ``F3`` is the forward of micro-batch 3, ``B3`` its backward, ``.`` a tick without a step; with
    ``chunked`` a letter names the model chunk (``F3a`` chunk 0, ``F3b`` chunk 1, ...).
    """
    ticks = 1 + max((t.index for ticks in plan for t in ticks), default=-1)
    rows = []
    for rank, rank_ticks in enumerate(plan):
        by_index = {t.index: t.step for t in rank_ticks}
        rows.append([f"rank {rank}"] + [_cell(by_index.get(i), chunked) for i in range(ticks)])
    header = ["tick"] + [str(i) for i in range(ticks)]
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(ticks + 1)]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.extend(" ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)
    return "\n".join(lines)


def render_orders(num_microbatches: int, pipeline_size: int, num_chunks: Optional[int] = None) -> str:
    """Each rank's order on one line (``F0 F1 B0 ...``), chunk letters with interleaving."""
    lines = []
    for rank in range(pipeline_size):
        order = schedule_order(num_microbatches, pipeline_size, rank, num_chunks)
        lines.append(f"rank {rank}: " + " ".join(_cell(s, num_chunks is not None) for s in order))
    return "\n".join(lines)
