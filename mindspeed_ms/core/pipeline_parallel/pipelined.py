"""1F1B and interleaved 1F1B pipeline schedules (the executor of :mod:`.schedule_plan`).

Both functions keep the calling convention of
:func:`~mindspeed_ms.core.pipeline_parallel.schedules.forward_backward_no_pipelining` (Megatron's
keyword arguments plus ``loss_scale``) and return the unscaled loss of every micro-batch on the
last pipeline stage, an empty list on the others.

How a step runs:

* The plan of this rank (:func:`~.schedule_plan.build_plan`) lists ticks; at each tick the rank
  runs at most one forward or backward step, then one batch of transfers
  (:func:`~.p2p_communication.exchange_tensors`) in which every tensor produced at that tick
  reaches its consumer. Because both ends of every transfer sit in the same batch, blocking
  pairwise exchanges (the CPU backend) cannot deadlock.
* A forward step calls ``chunk.set_input_tensor(received hidden states)`` and
  ``forward_step_func(data_iterator, chunk)``; its output goes to the next stage (on the last
  stage the loss is recorded).
* A backward step differentiates the same forward with ``mindspore.vjp`` (the chunk's parameters
  as weights; on the last stage the loss multiplied by ``loss_scale / num_microbatches``), with
  the gradient received from the next stage as cotangent (1.0 on the last stage), adds the weight
  gradients to the chunk (``chunk.accumulate``) and sends the input gradient to the previous stage.
* Recomputation: MindSpore's PyNative mode can run a vjp function only while no vjp function
  created after it is waiting (last in, first out), but 1F1B runs backwards first in, first out.
  So a backward step that does not directly follow its own forward runs the forward again under
  vjp (as MindSpeed-Core-MS does with GradOperation), from the same input tensor, the same
  micro-batch (the items the forward read are kept and replayed) and the same random-stream state
  (dropout masks repeat). When the backward directly follows its forward (always on the last stage
  of 1F1B) the forward runs once, under vjp. Stored per micro-batch in flight: its input tensor and
  its micro-batch, not its activations.
* ``forward_only`` (evaluation) runs the forwards without vjp and sends only hidden states.

Every stage reads the same micro-batches from ``data_iterator`` (the model takes the tokens, masks
and labels it needs). With several chunks and a single iterator, each chunk sees the micro-batches
from the start (they are cached until every chunk has read them); a list of iterators, one per
chunk, is used as given.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.pipeline_parallel import p2p_communication as p2p
from mindspeed_ms.core.pipeline_parallel.schedule_plan import ScheduleError, Transfer, build_plan
from mindspeed_ms.core.pipeline_parallel.schedules import forward_backward_no_pipelining, loss_from_output, \
    micro_batch_factors
from mindspeed_ms.core.tensor_parallel.random import get_rng_tracker

__all__ = [
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
]


class _SharedMicroBatches:
    """One source iterator read by several model chunks, each from the first micro-batch on."""

    def __init__(self, source, readers: int):
        self._source = iter(source)
        self._cache: Dict[int, Any] = {}
        self._fetched = 0
        self._positions = [0] * readers

    def next_for(self, reader: int):
        index = self._positions[reader]
        while self._fetched <= index:
            self._cache[self._fetched] = next(self._source)
            self._fetched += 1
        item = self._cache[index]
        self._positions[reader] += 1
        if min(self._positions) > index:  # every chunk has read it: drop it
            del self._cache[index]
        return item


class _ChunkView:
    """The iterator one chunk reads from a :class:`_SharedMicroBatches`."""

    def __init__(self, shared: _SharedMicroBatches, reader: int):
        self._shared = shared
        self._reader = reader

    def __iter__(self):
        return self

    def __next__(self):
        return self._shared.next_for(self._reader)


class _Recorder:
    """Passes items through from ``source`` and remembers them (to replay one forward step's batch)."""

    def __init__(self, source):
        self._source = source
        self.items: List[Any] = []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._source)
        self.items.append(item)
        return item


class _Replay:
    """Yields recorded items again, once each."""

    def __init__(self, items: Sequence[Any]):
        self._items = list(items)
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._next == len(self._items):
            raise StopIteration
        self._next += 1
        return self._items[self._next - 1]


class _Deferred:
    """A forward step to run again under vjp when its backward comes (see the module docstring)."""

    def __init__(self, items, received, rng_states, output_shape):
        self.items = items
        self.received = received
        self.rng_states = rng_states
        self.output_shape = output_shape


def _chunk_iterators(data_iterator, count: int) -> List[Iterator]:
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) == count:
            return list(data_iterator)
        if len(data_iterator) != 1:
            raise ValueError(f"data_iterator must be one iterator or a list of {count} (one per model chunk), "
                             f"got a list of {len(data_iterator)}")
        data_iterator = data_iterator[0]
    if count == 1:
        return [data_iterator]
    shared = _SharedMicroBatches(data_iterator, count)
    return [_ChunkView(shared, c) for c in range(count)]


def _chunk_params(chunk) -> list:
    params = getattr(chunk, "params", None)
    return list(params) if params is not None else list(chunk.trainable_params())


def _chunk_config(chunk):
    for holder in (chunk, getattr(chunk, "module", None)):
        config = getattr(holder, "config", None) if holder is not None else None
        if config is not None:
            return config
    raise ValueError("pipeline schedules need the model chunk's config (chunk.config) to know what the "
                     "stages send to each other")


class _PipelineExecutor:
    """Runs this rank's part of a pipeline plan over its model chunks."""

    def __init__(self, *, forward_step_func: Callable, data_iterator, chunks: Sequence, num_microbatches: int,
                 seq_length: Optional[int], micro_batch_size: Optional[int], forward_only: bool,
                 loss_scale: float, interleaved: bool, loss_weights=None):
        self.forward_step_func = forward_step_func
        self.chunks = list(chunks)
        self.num_microbatches = num_microbatches
        self.forward_only = forward_only
        self.factors = micro_batch_factors(loss_scale, num_microbatches, loss_weights)
        self.interleaved = interleaved
        self.iterators = _chunk_iterators(data_iterator, len(self.chunks))
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.rank = ps.get_pipeline_model_parallel_rank()
        self.group_ranks = list(ps.get_pipeline_model_parallel_group().ranks)
        self.last_stage = self.pp * len(self.chunks) - 1
        config = _chunk_config(self.chunks[0])
        self.dtype = p2p.pipeline_dtype(config)
        self.variable = p2p.variable_seq_lengths(config)
        self.shape = None if self.variable else p2p.get_tensor_shape(config, seq_length, micro_batch_size)
        self.params = None if forward_only else [_chunk_params(c) for c in self.chunks]
        # received tensors by (kind, microbatch, chunk); forwards waiting for their backward by
        # (microbatch, chunk): a kept (vjp function, output) or a _Deferred to recompute
        self.inbox: Dict[Tuple[str, int, int], Tensor] = {}
        self.pending: Dict[Tuple[int, int], Any] = {}
        self.losses: Dict[int, Tensor] = {}
        self.keep_tape: set = set()

    # ---------------------------------------------------------------------------------- helpers
    def _stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def _global(self, pipeline_rank: int) -> int:
        return self.group_ranks[pipeline_rank]

    def _set_chunk(self, chunk: int) -> None:
        if self.interleaved:
            ps.set_virtual_pipeline_model_parallel_rank(chunk)

    # ------------------------------------------------------------------------------------ steps
    def _differentiable(self, microbatch: int, chunk: int, iterator) -> Callable:
        """The forward of one step as a function of its input tensor, for mindspore.vjp."""
        model = self.chunks[chunk]
        stage = self._stage(chunk)
        first, last = stage == 0, stage == self.last_stage

        def run(inp):
            model.set_input_tensor(None if first else inp)
            output, loss_func = self.forward_step_func(iterator, model)
            if last:
                loss = loss_from_output(output, loss_func)
                return loss * self.factors[microbatch], loss
            return output

        return run

    def _vjp(self, microbatch: int, chunk: int, iterator, received):
        """``(output, vjp_fn)`` of one forward; on the last stage the loss is recorded."""
        run = self._differentiable(microbatch, chunk, iterator)
        # the first stage has no input tensor; vjp still needs one, so it gets a placeholder
        inp = ops.zeros((1,), ms.float32) if received is None else received
        if self._stage(chunk) == self.last_stage:
            scaled, vjp_fn, loss = ms.vjp(run, inp, weights=self.params[chunk], has_aux=True)
            self.losses[microbatch] = loss
            return scaled, vjp_fn
        return ms.vjp(run, inp, weights=self.params[chunk])

    def forward(self, microbatch: int, chunk: int) -> Optional[Tensor]:
        """Run one forward step; returns the tensor to send (None on the last stage)."""
        self._set_chunk(chunk)
        model = self.chunks[chunk]
        stage = self._stage(chunk)
        last = stage == self.last_stage
        received = None if stage == 0 else self.inbox.pop(("activation", microbatch, chunk))

        if not self.forward_only and (microbatch, chunk) in self.keep_tape:
            output, vjp_fn = self._vjp(microbatch, chunk, self.iterators[chunk], received)
            self.pending[(microbatch, chunk)] = (vjp_fn, output)
            return None if last else output

        recorder = _Recorder(self.iterators[chunk])
        rng_states = None if self.forward_only else get_rng_tracker().get_states()
        model.set_input_tensor(received)
        output, loss_func = self.forward_step_func(recorder, model)
        if last:
            loss = loss_from_output(output, loss_func)
            self.losses[microbatch] = loss
            output = loss
        if not self.forward_only:
            self.pending[(microbatch, chunk)] = _Deferred(recorder.items, received, rng_states, tuple(output.shape))
        return None if last else output

    def backward(self, microbatch: int, chunk: int) -> Optional[Tensor]:
        """Run one backward step; returns the input gradient to send (None on the first stage)."""
        self._set_chunk(chunk)
        entry = self.pending.pop((microbatch, chunk))
        if isinstance(entry, _Deferred):
            tracker = get_rng_tracker()
            current = tracker.get_states()
            tracker.set_states(entry.rng_states)
            try:
                output, vjp_fn = self._vjp(microbatch, chunk, _Replay(entry.items), entry.received)
            finally:
                tracker.set_states(current)
        else:
            vjp_fn, output = entry
        stage = self._stage(chunk)
        if stage == self.last_stage:
            cotangent = ops.ones_like(output)
        else:
            cotangent = self.inbox.pop(("gradient", microbatch, chunk)).astype(output.dtype)
        input_grads, weight_grads = vjp_fn(cotangent)
        self.chunks[chunk].accumulate(weight_grads)
        if stage == 0:
            return None
        return input_grads[0]

    # ---------------------------------------------------------------------------- communication
    def _outgoing(self, transfer: Transfer, tensor: Tensor) -> Tensor:
        if transfer.kind == "activation" and not self.variable and tuple(tensor.shape) != self.shape:
            raise ValueError(
                f"pipeline stage {self._stage(transfer.src_chunk)} produced hidden states of shape "
                f"{tuple(tensor.shape)}, but the next stage expects {self.shape} (from seq_length, micro batch "
                f"size, hidden_size, data_layout and sequence/context parallelism); set "
                f"parallel_config.variable_seq_lengths=True when micro-batches differ in length")
        return tensor.astype(self.dtype)

    def _incoming_shape(self, transfer: Transfer) -> Tuple[int, ...]:
        if transfer.kind == "gradient":
            # the gradient of what this rank sent has the shape of that output
            entry = self.pending[(transfer.microbatch, transfer.dst_chunk)]
            return entry.output_shape if isinstance(entry, _Deferred) else tuple(entry[1].shape)
        return self.shape

    def communicate(self, sends: Sequence[Tuple[Transfer, Tensor]], recvs: Sequence[Transfer]) -> None:
        """One batch: deliver this tick's tensors, store what arrives for its consumer step."""
        if not sends and not recvs:
            return
        outgoing = [(self._global(t.dst), self._outgoing(t, x)) for t, x in sends]
        if self.variable:
            act_sends = [(peer, x.shape) for (peer, x), (t, _) in zip(outgoing, sends) if t.kind == "activation"]
            act_recvs = [t for t in recvs if t.kind == "activation"]
            announced = iter(p2p.exchange_shapes(act_sends, [self._global(t.src) for t in act_recvs]))
            shapes = [next(announced) if t.kind == "activation" else self._incoming_shape(t) for t in recvs]
        else:
            shapes = [self._incoming_shape(t) for t in recvs]
        received = p2p.exchange_tensors(outgoing, [(self._global(t.src), shape, self.dtype)
                                                   for t, shape in zip(recvs, shapes)])
        for transfer, tensor in zip(recvs, received):
            self.inbox[(transfer.kind, transfer.microbatch, transfer.dst_chunk)] = tensor

    # ------------------------------------------------------------------------------------- run
    def run(self) -> List[Tensor]:
        plan = build_plan(self.num_microbatches, self.pp, len(self.chunks) if self.interleaved else None,
                          self.forward_only)[self.rank]
        steps = [t.step for t in plan if t.step is not None]
        # a forward whose backward comes next keeps its vjp function: no other vjp is created between
        self.keep_tape = {(mb, c) for (kind, mb, c), following in zip(steps, steps[1:])
                          if kind == "F" and following == ("B", mb, c)}
        try:
            for tick in plan:
                sends: List[Tuple[Transfer, Tensor]] = []
                if tick.step is not None:
                    kind, microbatch, chunk = tick.step
                    produced = self.forward(microbatch, chunk) if kind == "F" else self.backward(microbatch, chunk)
                    if tick.sends:
                        sends.append((tick.sends[0], produced))
                self.communicate(sends, tick.recvs)
        finally:
            # leave no hidden states of this step behind in the model chunks
            for chunk in self.chunks:
                chunk.set_input_tensor(None)
            if self.interleaved:
                ps.set_virtual_pipeline_model_parallel_rank(0)
        if self.pending or self.inbox:  # pragma: no cover - a plan that is checked cannot leave any
            raise RuntimeError(f"pipeline schedule ended with unused state: steps {sorted(self.pending)}, "
                               f"tensors {sorted(self.inbox)}")
        return [self.losses[mb] for mb in sorted(self.losses)]


def _as_chunks(model) -> List:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _check_microbatches(num_microbatches) -> None:
    if not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool) or num_microbatches < 1:
        raise ValueError(f"num_microbatches (dataset_config.micro_batch_num) must be a positive integer, "
                         f"got {num_microbatches!r}")


def forward_backward_pipelining_without_interleaving(*, forward_step_func, data_iterator, model,
                                                     num_microbatches: int, seq_length: Optional[int] = None,
                                                     micro_batch_size: Optional[int] = None,
                                                     decoder_seq_length=None, forward_only: bool = False,
                                                     collect_non_loss_data: bool = False, first_val_step=None,
                                                     loss_scale: float = 1.0, loss_weights=None) -> List[Tensor]:
    """The 1F1B schedule over this rank's pipeline stage.

    Args:
        forward_step_func: ``(data_iterator, model) -> (output, loss_func)``; the model returns
            the loss on the last stage (or ``loss_func`` computes it) and hidden states elsewhere.
        data_iterator: Iterator of micro-batches (or a one-element list of it); every stage reads
            all of them.
        model: The model chunk of this stage (or a one-element list), a DistributedDataParallel
            wrapper with ``params``, ``accumulate`` and ``set_input_tensor``.
        num_microbatches: Micro-batches per step.
        seq_length: Sequence length of the hidden states sent between stages (default:
            ``config.seq_length``).
        micro_batch_size: Samples per micro-batch (default: ``dataset_config.batch_size``).
        decoder_seq_length, collect_non_loss_data, first_val_step: Accepted for Megatron
            compatibility.
        forward_only: Evaluate only (forward steps, no gradients).
        loss_scale: The loss is multiplied by ``loss_scale / num_microbatches`` before
            differentiation.
        loss_weights: Per-micro-batch weights replacing ``1 / num_microbatches`` (see
            :func:`~mindspeed_ms.core.pipeline_parallel.schedules.forward_backward_no_pipelining`).

    Returns:
        The unscaled loss of every micro-batch on the last stage; an empty list elsewhere.

    Raises:
        ValueError: more than one model chunk, or invalid sizes.
    """
    del decoder_seq_length, collect_non_loss_data, first_val_step
    chunks = _as_chunks(model)
    if len(chunks) != 1:
        raise ValueError(f"the 1F1B schedule runs one model chunk per rank, got {len(chunks)}; set "
                         f"virtual_pipeline_model_parallel_size for interleaving")
    _check_microbatches(num_microbatches)
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining(forward_step_func=forward_step_func, data_iterator=data_iterator,
                                              model=chunks[0], num_microbatches=num_microbatches,
                                              forward_only=forward_only, loss_scale=loss_scale,
                                              loss_weights=loss_weights)
    return _PipelineExecutor(forward_step_func=forward_step_func, data_iterator=data_iterator, chunks=chunks,
                             num_microbatches=num_microbatches, seq_length=seq_length,
                             micro_batch_size=micro_batch_size, forward_only=forward_only, loss_scale=loss_scale,
                             interleaved=False, loss_weights=loss_weights).run()


def forward_backward_pipelining_with_interleaving(*, forward_step_func, data_iterator, model,
                                                  num_microbatches: int, seq_length: Optional[int] = None,
                                                  micro_batch_size: Optional[int] = None,
                                                  decoder_seq_length=None, forward_only: bool = False,
                                                  collect_non_loss_data: bool = False, first_val_step=None,
                                                  loss_scale: float = 1.0, loss_weights=None) -> List[Tensor]:
    """The interleaved 1F1B schedule over this rank's model chunks (virtual pipeline stages).

    Chunk ``c`` of pipeline rank ``r`` is virtual stage ``c * pp + r``; its hidden states go to
    chunk ``c`` of rank ``r + 1`` or, from the last rank, to chunk ``c + 1`` of the first rank.

    Args:
        model: The list of this rank's chunks, one per virtual stage
            (``virtual_pipeline_model_parallel_size`` of them).
        data_iterator: One iterator (every chunk reads all micro-batches from it) or a list of one
            iterator per chunk.
        Others: As :func:`forward_backward_pipelining_without_interleaving`.

    Returns:
        The unscaled loss of every micro-batch on the last pipeline rank; an empty list elsewhere.

    Raises:
        ValueError: the number of chunks differs from the virtual pipeline size, or
            ``num_microbatches`` is not a multiple of the pipeline size.
    """
    del decoder_seq_length, collect_non_loss_data, first_val_step
    chunks = _as_chunks(model)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if vpp is not None and len(chunks) != vpp:
        raise ValueError(f"interleaved pipelining needs one model chunk per virtual stage: "
                         f"virtual_pipeline_model_parallel_size={vpp}, got {len(chunks)} chunk(s)")
    _check_microbatches(num_microbatches)
    if pp < 2:
        raise ValueError(f"interleaved pipelining needs pipeline_model_parallel_size >= 2, got {pp} "
                         f"(virtual_pipeline_model_parallel_size={vpp})")
    if len(chunks) == 1:
        # one chunk per rank is plain 1F1B (no micro-batch grouping needed)
        return forward_backward_pipelining_without_interleaving(
            forward_step_func=forward_step_func, data_iterator=data_iterator, model=chunks,
            num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=forward_only, loss_scale=loss_scale, loss_weights=loss_weights)
    if num_microbatches % pp:
        raise ScheduleError(
            f"interleaved pipelining needs num_microbatches (dataset_config.micro_batch_num) to be a multiple of "
            f"pipeline_model_parallel_size={pp}, got {num_microbatches}")
    return _PipelineExecutor(forward_step_func=forward_step_func, data_iterator=data_iterator, chunks=chunks,
                             num_microbatches=num_microbatches, seq_length=seq_length,
                             micro_batch_size=micro_batch_size, forward_only=forward_only, loss_scale=loss_scale,
                             interleaved=True, loss_weights=loss_weights).run()
