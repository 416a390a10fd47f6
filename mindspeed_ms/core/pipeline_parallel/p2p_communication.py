"""Point-to-point transfers between pipeline stages.

Everything goes through :func:`mindspeed_ms.core.communication.exchange`, which sends and
receives a batch of tensors with neighbours in one call (natively on Ascend/GPU; on CPU as a
2-rank AllReduce per pair, the pairs taken in a global order). Two layers:

* :func:`exchange_tensors`: a batch of transfers with any number of tensors per peer. Tensors for
  the same peer travel as one flat buffer, in the order both sides list them (with two pipeline
  stages the previous and the next stage are the same rank).
* :class:`P2PPrimitive`: Megatron's named operations (``send_forward``, ``recv_backward``,
  ``send_forward_recv_backward``, ...) between this rank and its pipeline neighbours, for code
  written against that API. The schedules in :mod:`.pipelined` use :func:`exchange_tensors`
  directly, following the plan of :mod:`.schedule_plan`.

What travels: hidden states and their gradients in ``parallel_config.recv_dtype``. Their shape is
known from the configuration (:func:`get_tensor_shape`) unless ``variable_seq_lengths`` is set, in
which case the sender's shapes are exchanged first (:func:`exchange_shapes`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.config.parallel import ModelParallelConfig
from mindspeed_ms.core.precision import resolve_dtype
from mindspeed_ms.core.tensor_parallel.layers import sequence_dim

__all__ = [
    "get_tensor_shape",
    "pipeline_dtype",
    "variable_seq_lengths",
    "exchange_tensors",
    "exchange_shapes",
    "P2PPrimitive",
]

_SHAPE_SLOTS = 8  # a shape travels as [ndim, d0, d1, ...] padded to this length


def _parallel_config(config):
    # a ModelParallelConfig itself, or the one of a TransformerConfig
    return config if isinstance(config, ModelParallelConfig) else config.parallel_config


def pipeline_dtype(config):
    """The dtype of tensors sent between stages (``parallel_config.recv_dtype``, default float32)."""
    return resolve_dtype(_parallel_config(config).recv_dtype)


def variable_seq_lengths(config) -> bool:
    """Whether shapes are exchanged before every transfer (``parallel_config.variable_seq_lengths``)."""
    return bool(_parallel_config(config).variable_seq_lengths)


def get_tensor_shape(config, seq_length: Optional[int] = None, micro_batch_size: Optional[int] = None
                     ) -> Tuple[int, int, int]:
    """Shape of the hidden states one stage passes to the next.

    ``(micro_batch_size, seq, hidden)`` for the BSH layout, ``(seq, micro_batch_size, hidden)`` for
    SBH, where ``seq`` is the sequence length divided by the context-parallel size and, with
    sequence parallelism, by the tensor-parallel size (each rank holds its slice).

    Args:
        config: The model's TransformerConfig.
        seq_length: Sequence length (default: ``config.seq_length``).
        micro_batch_size: Samples per micro-batch (default: ``dataset_config.batch_size``).

    Raises:
        ValueError: a size is missing or does not split evenly.
    """
    seq = seq_length if seq_length is not None else config.seq_length
    if micro_batch_size is None:
        micro_batch_size = config.dataset_config.batch_size
    hidden = config.hidden_size
    for name, value in (("seq_length", seq), ("micro_batch_size", micro_batch_size), ("hidden_size", hidden)):
        if value is None or int(value) < 1:
            raise ValueError(f"pipeline transfers need a positive {name} to know the shape of the hidden states, "
                             f"got {value!r}")
    seq, mbs, hidden = int(seq), int(micro_batch_size), int(hidden)
    cp = ps.get_context_parallel_world_size()
    if seq % cp:
        raise ValueError(f"seq_length={seq} is not divisible by context_parallel_size={cp}")
    seq //= cp
    tp = ps.get_tensor_model_parallel_world_size()
    if bool(_parallel_config(config).sequence_parallel) and tp > 1:
        if seq % tp:
            raise ValueError(f"with sequence_parallel the sequence slice ({seq}) must be divisible by "
                             f"tensor_model_parallel_size={tp}")
        seq //= tp
    if sequence_dim(config) == 1:
        return (mbs, seq, hidden)
    return (seq, mbs, hidden)


def exchange_tensors(sends: Sequence[Tuple[int, Tensor]],
                     recvs: Sequence[Tuple[int, Sequence[int], object]]) -> List[Tensor]:
    """Send and receive a batch of tensors with other ranks in one call.

    Both ends must list the tensors between them in the same order (what one sends first, the
    other receives first) with equal shapes and dtypes.

    Args:
        sends: ``(global_peer_rank, tensor)`` pairs.
        recvs: ``(global_peer_rank, shape, dtype)`` triples.

    Returns:
        The received tensors, in the order of ``recvs``.

    Raises:
        TypeError: tensors for one peer have different dtypes.
    """
    out_by_peer: Dict[int, List[Tensor]] = {}
    for peer, tensor in sends:
        out_by_peer.setdefault(int(peer), []).append(tensor)
    in_by_peer: Dict[int, List[Tuple[int, Tuple[int, ...], object]]] = {}
    for index, (peer, shape, dtype) in enumerate(recvs):
        in_by_peer.setdefault(int(peer), []).append((index, tuple(int(d) for d in shape), dtype))

    send_map: Dict[int, Tensor] = {}
    for peer, tensors in out_by_peer.items():
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise TypeError(f"tensors sent together to rank {peer} must share one dtype, "
                            f"got {sorted(map(str, dtypes))}")
        flat = [t.reshape(-1) for t in tensors]
        send_map[peer] = flat[0] if len(flat) == 1 else ops.concat(flat)
    recv_map: Dict[int, Tuple[Tuple[int, ...], object]] = {}
    for peer, items in in_by_peer.items():
        dtypes = {str(dt) for _, _, dt in items}
        if len(dtypes) > 1:
            raise TypeError(f"tensors received together from rank {peer} must share one dtype, got {sorted(dtypes)}")
        total = sum(int(np.prod(shape)) for _, shape, _ in items)
        recv_map[peer] = ((total,), items[0][2])

    received = comm.exchange(sends=send_map, recvs=recv_map)
    results: List[Optional[Tensor]] = [None] * len(recvs)
    for peer, items in in_by_peer.items():
        buffer = received[peer]
        offset = 0
        for index, shape, _ in items:
            size = int(np.prod(shape))
            results[index] = buffer[offset:offset + size].reshape(shape)
            offset += size
    return results  # type: ignore[return-value]


def _encode_shape(shape: Sequence[int]) -> Tensor:
    if len(shape) >= _SHAPE_SLOTS:
        raise ValueError(f"cannot send the shape of a tensor of rank {len(shape)} (at most {_SHAPE_SLOTS - 1})")
    values = [len(shape)] + [int(d) for d in shape]
    values += [0] * (_SHAPE_SLOTS - len(values))
    # float32 carries integers below 2**24 exactly, and every backend transfers float32
    return Tensor(np.asarray(values, np.float32))


def _decode_shape(wire: Tensor) -> Tuple[int, ...]:
    values = [int(round(float(v))) for v in wire.asnumpy().reshape(-1)]
    return tuple(values[1:1 + values[0]])


def exchange_shapes(sends: Sequence[Tuple[int, Sequence[int]]], recv_from: Sequence[int]) -> List[Tuple[int, ...]]:
    """Tell receivers the shapes of the tensors that follow (``variable_seq_lengths``).

    Args:
        sends: ``(global_peer_rank, shape)`` of every tensor this rank is about to send.
        recv_from: The global rank of every tensor this rank is about to receive.

    Returns:
        The announced shapes, in the order of ``recv_from``.
    """
    wires = exchange_tensors([(peer, _encode_shape(shape)) for peer, shape in sends],
                             [(peer, (_SHAPE_SLOTS,), ms.float32) for peer in recv_from])
    return [_decode_shape(w) for w in wires]


class P2PPrimitive:
    """Megatron's pipeline transfers between this rank and its neighbours.

    ``send_forward`` sends to the next stage, ``recv_forward`` receives from the previous one,
    ``send_backward``/``recv_backward`` go the other way, and the combined operations do several
    in one batch. Operations with nothing to do on this stage (receiving forward on the first
    stage, sending forward on the last) return None without communicating, as in Megatron.
    Neighbours wrap around (the last stage's next is the first), which interleaved schedules use.

    Args:
        config: The model's TransformerConfig (recv_dtype, variable_seq_lengths, shapes).
    """

    def __init__(self, config):
        self.config = config
        self.dtype = pipeline_dtype(config)
        self.variable_seq_lengths = variable_seq_lengths(config)

    def send_forward(self, output_tensor) -> None:
        """Send the output of this stage to the next (not on the last stage)."""
        if not ps.is_pipeline_last_stage():
            self.node_p2p_comm(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False,
                               recv_next=False, tensor_shape=None)

    def recv_forward(self, tensor_shape):
        """Receive the input of this stage from the previous one (None on the first stage)."""
        if ps.is_pipeline_first_stage():
            return None
        return self.node_p2p_comm(tensor_send_next=None, tensor_send_prev=None, recv_prev=True, recv_next=False,
                                  tensor_shape=tensor_shape)[0]

    def send_backward(self, input_tensor_grad) -> None:
        """Send the gradient of this stage's input to the previous stage (not on the first stage)."""
        if not ps.is_pipeline_first_stage():
            self.node_p2p_comm(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=False,
                               recv_next=False, tensor_shape=None)

    def recv_backward(self, tensor_shape):
        """Receive the gradient of this stage's output from the next stage (None on the last stage)."""
        if ps.is_pipeline_last_stage():
            return None
        return self.node_p2p_comm(tensor_send_next=None, tensor_send_prev=None, recv_prev=False, recv_next=True,
                                  tensor_shape=tensor_shape)[1]

    def send_forward_recv_backward(self, output_tensor, tensor_shape):
        """Send the output forward and receive its gradient, in one batch."""
        if ps.is_pipeline_last_stage():
            return None
        return self.node_p2p_comm(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False,
                                  recv_next=True, tensor_shape=tensor_shape)[1]

    def send_backward_recv_forward(self, input_tensor_grad, tensor_shape):
        """Send an input gradient back and receive the next input, in one batch."""
        if ps.is_pipeline_first_stage():
            return None
        return self.node_p2p_comm(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=True,
                                  recv_next=False, tensor_shape=tensor_shape)[0]

    def send_forward_recv_forward(self, output_tensor, recv_prev, tensor_shape, overlap_p2p_comm=False):
        """Send forward and receive from the previous stage (interleaved schedules).

        ``overlap_p2p_comm`` is accepted; transfers complete before returning (the second value is
        then an empty list of requests).
        """
        received = self.node_p2p_comm(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=recv_prev,
                                      recv_next=False, tensor_shape=tensor_shape)[0]
        return (received, []) if overlap_p2p_comm else received

    def send_backward_recv_backward(self, input_tensor_grad, recv_next, tensor_shape, overlap_p2p_comm=False):
        """Send backward and receive from the next stage (interleaved schedules)."""
        received = self.node_p2p_comm(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=False,
                                      recv_next=recv_next, tensor_shape=tensor_shape)[1]
        return (received, []) if overlap_p2p_comm else received

    def send_forward_backward_recv_forward_backward(self, output_tensor, input_tensor_grad, recv_prev, recv_next,
                                                    tensor_shape):
        """All four directions in one batch; returns ``(input_tensor, output_tensor_grad)``."""
        received = self.node_p2p_comm(tensor_send_next=output_tensor, tensor_send_prev=input_tensor_grad,
                                      recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape)
        return received[0], received[1]

    def node_p2p_comm(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape,
                      wait_on_reqs=True):
        """One batch of transfers with the neighbours.

        Forward-direction data (to next / from previous) is listed before backward-direction data,
        on both ends, so the order agrees when both neighbours are the same rank.

        Args:
            tensor_send_next: Tensor for the next stage, or None.
            tensor_send_prev: Tensor for the previous stage, or None.
            recv_prev: Receive from the previous stage.
            recv_next: Receive from the next stage.
            tensor_shape: Shape of what is received (unused with ``variable_seq_lengths``).
            wait_on_reqs: Accepted for Megatron compatibility; transfers always complete here.

        Returns:
            ``(tensor_from_prev, tensor_from_next, [])``.

        Raises:
            RuntimeError: a receive without a shape.
        """
        del wait_on_reqs
        nxt = ps.get_pipeline_model_parallel_next_rank()
        prv = ps.get_pipeline_model_parallel_prev_rank()
        sends = []
        if tensor_send_next is not None:
            sends.append((nxt, tensor_send_next.astype(self.dtype)))
        if tensor_send_prev is not None:
            sends.append((prv, tensor_send_prev.astype(self.dtype)))
        sources = ([prv] if recv_prev else []) + ([nxt] if recv_next else [])
        if self.variable_seq_lengths:
            shapes = exchange_shapes([(peer, t.shape) for peer, t in sends], sources)
        else:
            if sources and tensor_shape is None:
                raise RuntimeError("receiving from a pipeline neighbour needs tensor_shape "
                                   "(or parallel_config.variable_seq_lengths=True)")
            shapes = [tuple(tensor_shape)] * len(sources) if sources else []
        received = exchange_tensors(sends, [(peer, shape, self.dtype) for peer, shape in zip(sources, shapes)])
        from_prev = received.pop(0) if recv_prev else None
        from_next = received.pop(0) if recv_next else None
        return from_prev, from_next, []
