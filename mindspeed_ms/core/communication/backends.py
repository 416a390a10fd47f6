"""Backend implementations of the collectives.

Two implementations of one interface:

* :class:`NativeBackend` calls the backend's own primitives (HCCL on Ascend, NCCL on GPU)
  through ``mindspore.mint.distributed``.
* :class:`ComposedBackend` builds every collective from a sum-AllReduce on a sub-group, the only
  collective MindSpore's CPU backend (mccl) runs on sub-groups. It also handles the dtypes that
  CPU AllReduce rejects (only float32/float16 are accepted there).

Only :func:`get_backend` decides which one runs; nothing outside this package asks.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .groups import ProcessGroup, device_target, get_rank, new_group

__all__ = ["Backend", "ComposedBackend", "NativeBackend", "get_backend", "set_backend"]

_REDUCE_OPS = ("sum", "max", "min", "avg")


def _split_sizes_or_even(total: int, n: int, sizes: Optional[Sequence[int]], what: str) -> List[int]:
    if sizes is None:
        if total % n:
            raise ValueError(f"{what}: dimension of size {total} is not divisible by the group size {n}")
        return [total // n] * n
    sizes = [int(s) for s in sizes]
    if len(sizes) != n:
        raise ValueError(f"{what}: expected {n} split sizes (one per rank), got {len(sizes)}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"{what}: split sizes must be non-negative, got {sizes}")
    if sum(sizes) != total:
        raise ValueError(f"{what}: split sizes {sizes} sum to {sum(sizes)}, expected {total}")
    return sizes


class Backend:
    """Interface of a collective backend. Groups passed here have size > 1 and contain this rank."""

    name = "abstract"

    def all_reduce(self, x: Tensor, group: ProcessGroup, op: str) -> Tensor:
        raise NotImplementedError

    def all_gather(self, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        raise NotImplementedError

    def reduce_scatter(self, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        raise NotImplementedError

    def all_to_all(self, x: Tensor, group: ProcessGroup, split_dim: int, concat_dim: int) -> Tensor:
        raise NotImplementedError

    def all_to_all_v(self, x: Tensor, group: ProcessGroup, send_splits: List[int],
                     recv_splits: Optional[List[int]]) -> Tensor:
        raise NotImplementedError

    def broadcast(self, x: Tensor, group: ProcessGroup, src: int) -> Tensor:
        raise NotImplementedError

    def exchange(self, sends: Dict[int, Tensor], recvs: Dict[int, Tuple[Tuple[int, ...], ms.dtype]],
                 group: ProcessGroup) -> Dict[int, Tensor]:
        """Point-to-point: send ``sends[peer]`` and receive tensors of the given shape from peers."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# The composed backend (CPU)
# --------------------------------------------------------------------------------------------

class _Wire:
    """Lossless conversion of a tensor to float32/float16 slabs that a CPU AllReduce accepts.

    Integers and booleans travel as 16-bit (or 8-bit for big groups) limbs in float32, so that
    the sum over the group of every limb stays below 2**24 and is exact. bfloat16 widens to
    float32 exactly; float64 travels as a float32 head plus a float32 remainder.
    """

    def __init__(self, dtype, group_size: int):
        self.dtype = dtype
        self.group_size = group_size
        if dtype in (ms.float32, ms.float16):
            self.kind = "native"
        elif dtype == ms.bfloat16:
            self.kind = "widen"
        elif dtype == ms.float64:
            self.kind = "split"
        elif dtype == ms.bool_ or dtype in (ms.int8, ms.int16, ms.int32, ms.int64, ms.uint8, ms.uint16,
                                            ms.uint32, ms.uint64):
            self.kind = "limbs"
            self.limb_bits = 16 if group_size <= 256 else 8
            self.num_limbs = 64 // self.limb_bits
        else:
            raise TypeError(f"communication of dtype {dtype} is not supported")

    @property
    def slabs(self) -> int:
        """How many wire slabs one element becomes (stacked on a new leading axis)."""
        return {"native": 1, "widen": 1, "split": 2, "limbs": self.num_limbs}[self.kind]

    def encode(self, x: Tensor) -> Tensor:
        """Returns a tensor of shape ``(slabs, *x.shape)`` in a wire dtype."""
        if self.kind == "native":
            return x.reshape((1,) + tuple(x.shape))
        if self.kind == "widen":
            return x.astype(ms.float32).reshape((1,) + tuple(x.shape))
        if self.kind == "split":
            head = x.astype(ms.float32)
            tail = (x - head.astype(ms.float64)).astype(ms.float32)
            return ops.stack([head, tail])
        arr = x.asnumpy().astype(np.int64).view(np.uint64)
        mask = np.uint64((1 << self.limb_bits) - 1)
        limbs = [((arr >> np.uint64(k * self.limb_bits)) & mask).astype(np.float32) for k in range(self.num_limbs)]
        return Tensor(np.stack(limbs))

    def decode(self, wire: Tensor) -> Tensor:
        """Inverse of :meth:`encode` applied to the (reduced) wire tensor."""
        if self.kind == "native":
            return wire[0]
        if self.kind == "widen":
            return wire[0].astype(ms.bfloat16)
        if self.kind == "split":
            return wire[0].astype(ms.float64) + wire[1].astype(ms.float64)
        arr = wire.asnumpy().astype(np.float64)
        total = np.zeros(arr.shape[1:], dtype=np.uint64)
        for k in range(self.num_limbs):
            total = total + (arr[k].astype(np.uint64) << np.uint64(k * self.limb_bits))
        out = total.view(np.int64)
        if self.dtype == ms.bool_:
            return Tensor(out != 0)
        return Tensor(out).astype(self.dtype)


class ComposedBackend(Backend):
    """Every collective as a sum-AllReduce on the group (MindSpore's CPU backend)."""

    name = "composed"

    def __init__(self):
        self._allreduce: Dict[str, ops.AllReduce] = {}

    def _sum(self, wire: Tensor, group: ProcessGroup) -> Tensor:
        prim = self._allreduce.get(group.name)
        if prim is None:
            prim = ops.AllReduce(op=ops.ReduceOp.SUM, group=group.name)
            self._allreduce[group.name] = prim
        return prim(wire)

    def _sum_any(self, x: Tensor, group: ProcessGroup) -> Tensor:
        wire = _Wire(x.dtype, group.size)
        return wire.decode(self._sum(wire.encode(x), group))

    def _gather_stacked(self, x: Tensor, group: ProcessGroup) -> Tensor:
        """All ranks' ``x`` stacked on a new leading axis in group order: shape ``(n, *x.shape)``."""
        n, me = group.size, group.rank
        wire = _Wire(x.dtype, n)
        enc = wire.encode(x)  # (slabs, *shape)
        zeros = ops.zeros(enc.shape, enc.dtype)
        slots = [enc if i == me else zeros for i in range(n)]
        stacked = self._sum(ops.stack(slots, axis=1), group)  # (slabs, n, *shape)
        if wire.kind == "native":
            return stacked[0]
        if wire.kind == "widen":  # decode once: CPU Stack has no bfloat16 kernel
            return stacked[0].astype(wire.dtype)
        return ops.stack([wire.decode(stacked[:, i]) for i in range(n)])

    def all_reduce(self, x, group, op):
        if op in ("sum", "avg"):
            out = self._sum_any(x, group)
            return out / group.size if op == "avg" else out
        if x.dtype == ms.bool_:  # CPU max/min kernels take no booleans
            return self.all_reduce(x.astype(ms.int32), group, op).astype(ms.bool_)
        gathered = self._gather_stacked(x, group)
        return gathered.max(axis=0) if op == "max" else gathered.min(axis=0)

    def all_gather(self, x, group, dim):
        gathered = self._gather_stacked(x, group)
        return ops.concat([gathered[i] for i in range(group.size)], axis=dim)

    def reduce_scatter(self, x, group, dim):
        n = group.size
        if x.shape[dim] % n:
            raise ValueError(f"reduce_scatter: dimension {dim} of size {x.shape[dim]} is not divisible by {n}")
        total = self._sum_any(x, group)
        return ops.chunk(total, n, axis=dim)[group.rank]

    def all_to_all(self, x, group, split_dim, concat_dim):
        n, me = group.size, group.rank
        gathered = self._gather_stacked(x, group)
        pieces = [ops.chunk(gathered[j], n, axis=split_dim)[me] for j in range(n)]
        return ops.concat(pieces, axis=concat_dim)

    def all_to_all_v(self, x, group, send_splits, recv_splits):
        n, me = group.size, group.rank
        # Every rank needs the full n x n split matrix to find its rows in the others' buffers.
        row = ops.zeros((n, n), ms.float32)
        row[me] = Tensor(np.asarray(send_splits, np.float32))
        matrix = np.rint(self._sum(row, group).asnumpy()).astype(np.int64)
        received = [int(v) for v in matrix[:, me]]
        if recv_splits is not None and list(recv_splits) != received:
            raise ValueError(
                f"all_to_all_v: rank {get_rank()} expected to receive {list(recv_splits)} rows, "
                f"but the senders send {received}")
        longest = int(matrix.sum(axis=1).max())
        pad = longest - x.shape[0]
        padded = x if pad == 0 else ops.concat([x, ops.zeros((pad,) + tuple(x.shape[1:]), x.dtype)], axis=0)
        gathered = self._gather_stacked(padded, group)
        pieces = []
        for j in range(n):
            start = int(matrix[j, :me].sum())
            count = int(matrix[j, me])
            if count:
                pieces.append(gathered[j][start:start + count])
        if not pieces:
            return ops.zeros((0,) + tuple(x.shape[1:]), x.dtype)
        return ops.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0]

    def broadcast(self, x, group, src):
        contribution = x if get_rank() == src else ops.zeros(x.shape, x.dtype)
        return self._sum_any(contribution, group)

    def exchange(self, sends, recvs, group):
        me = get_rank()
        results: Dict[int, Tensor] = {}
        # A global order on the pairs makes any set of blocking pairwise exchanges deadlock-free:
        # the lowest pending pair always has both of its endpoints waiting on it.
        for peer in sorted(set(sends) | set(recvs)):
            pair = new_group(sorted((me, peer)), kind="p2p")
            outgoing = sends.get(peer)
            incoming = recvs.get(peer)
            out_n = 0 if outgoing is None else int(np.prod(outgoing.shape))
            in_n = 0 if incoming is None else int(np.prod(incoming[0]))
            wire_dtype = self._p2p_wire_dtype(outgoing, incoming)
            out_flat = (ops.zeros((0,), wire_dtype) if outgoing is None
                        else self._to_p2p_wire(outgoing, wire_dtype).reshape(-1))
            in_zeros = ops.zeros((in_n,), wire_dtype)
            # Lower rank's payload first, so both sides lay the buffer out identically.
            parts = [out_flat, in_zeros] if me < peer else [in_zeros, out_flat]
            buffer = self._sum(ops.concat(parts), pair)
            if incoming is not None:
                start = out_n if me < peer else 0
                received = buffer[start:start + in_n].reshape(incoming[0])
                results[peer] = self._from_p2p_wire(received, incoming[1])
        return results

    @staticmethod
    def _p2p_wire_dtype(outgoing, incoming):
        dtypes = set()
        if outgoing is not None:
            dtypes.add(outgoing.dtype)
        if incoming is not None:
            dtypes.add(incoming[1])
        if dtypes <= {ms.float16}:
            return ms.float16
        return ms.float32

    @staticmethod
    def _to_p2p_wire(x, wire_dtype):
        if x.dtype not in (ms.float32, ms.float16, ms.bfloat16):
            raise TypeError(f"point-to-point transfer of dtype {x.dtype} is not supported (floating point only)")
        return x.astype(wire_dtype)

    @staticmethod
    def _from_p2p_wire(x, dtype):
        return x.astype(dtype)


# --------------------------------------------------------------------------------------------
# The native backend (Ascend HCCL / GPU NCCL)
# --------------------------------------------------------------------------------------------

class NativeBackend(Backend):
    """The backend's own collectives, through ``mindspore.mint.distributed``.

    Runs on Ascend (HCCL) and GPU (NCCL). It cannot be exercised on this project's CPU CI; the
    composed backend carries the same semantics there and the tests check those.
    """

    name = "native"

    def __init__(self):
        from mindspore.mint import distributed as dist  # pylint: disable=import-outside-toplevel

        self.dist = dist

    def all_reduce(self, x, group, op):
        out = x.copy()
        if op == "avg":
            self.dist.all_reduce(out, op="sum", group=group.name)
            return out / group.size
        self.dist.all_reduce(out, op=op, group=group.name)
        return out

    def all_gather(self, x, group, dim):
        moved = ops.moveaxis(x, dim, 0) if dim != 0 else x
        out = ops.zeros((moved.shape[0] * group.size,) + tuple(moved.shape[1:]), x.dtype)
        self.dist.all_gather_into_tensor(out, moved.contiguous(), group=group.name)
        return ops.moveaxis(out, 0, dim) if dim != 0 else out

    def reduce_scatter(self, x, group, dim):
        moved = ops.moveaxis(x, dim, 0) if dim != 0 else x
        if moved.shape[0] % group.size:
            raise ValueError(f"reduce_scatter: dimension {dim} of size {moved.shape[0]} is not divisible by {group.size}")
        out = ops.zeros((moved.shape[0] // group.size,) + tuple(moved.shape[1:]), x.dtype)
        self.dist.reduce_scatter_tensor(out, moved.contiguous(), op="sum", group=group.name)
        return ops.moveaxis(out, 0, dim) if dim != 0 else out

    def all_to_all(self, x, group, split_dim, concat_dim):
        n = group.size
        # Put the split dimension first, exchange equal chunks, then lay received chunks out
        # along the concat dimension.
        chunks = ops.stack(ops.chunk(x, n, axis=split_dim))  # (n, *chunk_shape)
        flat = chunks.reshape(n, -1)
        out = ops.zeros(flat.shape, x.dtype)
        self.dist.all_to_all_single(out, flat.contiguous(), group=group.name)
        received = out.reshape(chunks.shape)
        return ops.concat([received[j] for j in range(n)], axis=concat_dim)

    def all_to_all_v(self, x, group, send_splits, recv_splits):
        if recv_splits is None:
            counts = Tensor(np.asarray(send_splits, np.int64))
            received = ops.zeros(counts.shape, counts.dtype)
            self.dist.all_to_all_single(received, counts, group=group.name)
            recv_splits = [int(v) for v in received.asnumpy()]
        out = ops.zeros((sum(recv_splits),) + tuple(x.shape[1:]), x.dtype)
        self.dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=group.name)
        return out

    def broadcast(self, x, group, src):
        out = x.copy()
        self.dist.broadcast(out, src, group=group.name)
        return out

    def exchange(self, sends, recvs, group):
        ops_list = []
        results = {}
        for peer in sorted(set(sends) | set(recvs)):
            if peer in sends:
                ops_list.append(self.dist.P2POp(self.dist.isend, sends[peer].contiguous(), peer, group=group.name))
            if peer in recvs:
                shape, dtype = recvs[peer]
                buf = ops.zeros(shape, dtype)
                results[peer] = buf
                ops_list.append(self.dist.P2POp(self.dist.irecv, buf, peer, group=group.name))
        for handle in self.dist.batch_isend_irecv(ops_list) or []:
            handle.wait()
        return results


_backend: Optional[Backend] = None


def get_backend() -> Backend:
    """The backend for this process, chosen once from the device target.

    ``MINDSPEED_COMM_IMPL=composed|native`` overrides the choice (the composed implementation is
    valid on every backend, which is useful to compare them on a device).
    """
    global _backend  # pylint: disable=global-statement
    if _backend is None:
        choice = os.environ.get("MINDSPEED_COMM_IMPL", "").strip().lower()
        if choice not in ("", "composed", "native"):
            raise ValueError(f"MINDSPEED_COMM_IMPL must be 'composed' or 'native', got {choice!r}")
        if not choice:
            choice = "composed" if device_target() == "CPU" else "native"
        _backend = ComposedBackend() if choice == "composed" else NativeBackend()
    return _backend


def set_backend(backend: Optional[Backend]) -> None:
    """Replace the backend (None: choose again on next use). For tests and benchmarks."""
    global _backend  # pylint: disable=global-statement
    _backend = backend
