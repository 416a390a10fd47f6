"""Data-parallel gradient accumulation and reduction.

Gradients of every micro-batch are added into per-model-chunk storage; once per step they are
reduced over the data-parallel ranks (all-reduce, scaled by ``1/dp`` so the result is the mean over
data-parallel replicas; context-parallel ranks of one replica hold different tokens of the same
samples, so their contributions are summed, not averaged).

Two storages:

* ``wrap_with_ddp=True``: one contiguous float32 buffer per parameter set, split into buckets of
  ``bucket_size`` elements (one bucket if None); one all-reduce per bucket per step. On CPU the
  reduction runs after the backward pass (MindSpore's PyNative backward gives no per-parameter
  hook to start a bucket early), so ``overlap_grad_reduce`` changes nothing there.
* ``wrap_with_ddp=False``: one tensor per parameter, one all-reduce per parameter.

Accumulation dtype: float32 (``grad_dtype=None``, Megatron's ``accumulate_allreduce_grads_in_fp32``)
or a half dtype, as Megatron's gradient buffers in the parameters' dtype under ``--fp16`` without
that flag: every micro-batch sum and the data-parallel reduction are then rounded to it (the
storage stays float32, holding the rounded values, so the same code runs on CPU, which has no
bfloat16 arithmetic); the unscaling by the loss scale happens after, in float32, as Megatron's
optimizer unscales its float32 copy.

Expert parameters (attribute ``expert_parallel``) are reduced over the expert-data-parallel group
(``dp / ep`` replicas), scaled by ``1/dp`` as well: each expert's gradient already sums the tokens
of all expert-parallel ranks.

After the data-parallel reduction, :func:`finalize_model_grads` all-reduces the gradients that are
partial for other reasons: weights used on sequence-parallel slices (norms, row-parallel biases)
over the tensor-parallel group (also LoRA factors marked ``allreduce_over_tp``), and the tied word
embedding over the embedding group (first and last pipeline stage).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.graph_limits import allow_call_depth

__all__ = ["GradBuffer", "PerParameterGrads", "DistributedDataParallel", "finalize_model_grads"]


def _rounded(x: Tensor, grad_dtype) -> Tensor:
    """``x`` (float32) rounded to ``grad_dtype`` and held in float32; ``x`` itself for None."""
    if grad_dtype is None:
        return x
    return x.astype(grad_dtype).astype(ms.float32)


def _flatten(grads):
    """One float32 vector from a tuple of gradients (the PyNative path's operations)."""
    return ops.concat([g.astype(ms.float32).reshape(-1) for g in grads])


def _unflatten(flat, numels, shapes):
    """The per-parameter views of a flat vector."""
    pieces = ops.split(flat, numels)
    return tuple(piece.reshape(shape) for piece, shape in zip(pieces, shapes))


# Compiled forms, used when the trainer compiles the step: one launch instead of one per
# parameter. They hold no parameters, so a graph is compiled once per tuple of shapes and shared
# by every model of that shape in the process.
_compiled_flatten = ms.jit(_flatten)
_compiled_unflatten = ms.jit(_unflatten)


class GradBuffer:
    """Contiguous float32 gradients of ``params`` in buckets, reduced over ``group``.

    Args:
        params: The parameters, in the order gradients will be given.
        group: The data-parallel group to reduce over.
        bucket_size: Elements per bucket (None: one bucket).
        scaling: Factor applied to the sum (``1/dp`` for a mean over replicas).
    """

    def __init__(self, params: Sequence[Parameter], group: comm.ProcessGroup, bucket_size: Optional[int] = None,
                 scaling: float = 1.0, grad_dtype=None):
        self.params = list(params)
        self.grad_dtype = grad_dtype
        # names and shapes read once: reading Parameter.name waits for queued device work
        self.names = [p.name for p in self.params]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.group = group
        self.scaling = float(scaling)
        self.numels = [int(np.prod(p.shape)) if len(p.shape) else 1 for p in self.params]
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.buckets = self._make_buckets(bucket_size)
        self.data: Optional[Tensor] = None
        self.compiled = False  # flatten/unflatten as compiled graphs (set by the trainer)

    def _make_buckets(self, bucket_size):
        if not self.total:
            return []
        if not bucket_size or bucket_size >= self.total:
            return [(0, self.total)]
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be positive, got {bucket_size}")
        # Buckets end on parameter boundaries once they reach bucket_size (as Megatron's do), so a
        # parameter's gradient is never split over two reductions.
        buckets, start = [], 0
        for end in self.offsets[1:]:
            if end - start >= bucket_size:
                buckets.append((start, int(end)))
                start = int(end)
        if start < self.total:
            buckets.append((start, self.total))
        return buckets

    def zero(self) -> None:
        """Forget accumulated gradients."""
        self.data = None

    def add(self, grads: Sequence[Optional[Tensor]]) -> None:
        """Add one micro-batch's gradients (aligned with ``params``; None = zero)."""
        if not self.params:
            return
        if self.compiled and len(self.params) > 1 and all(g is not None for g in grads):
            flat = _compiled_flatten(ms.mutable(tuple(grads)))  # mutable: else a constant per call
        else:
            pieces = [ops.zeros((n,), ms.float32) if g is None else g.astype(ms.float32).reshape(-1)
                      for g, n in zip(grads, self.numels)]
            flat = ops.concat(pieces) if len(pieces) > 1 else pieces[0]
        self.data = _rounded(flat if self.data is None else self.data + flat, self.grad_dtype)

    def reduce(self, extra_scale: float = 1.0) -> None:
        """Mean over the group (scaling, then an all-reduce per bucket)."""
        if not self.total:
            return
        if self.data is None:
            self.data = ops.zeros((self.total,), ms.float32)
        # in a half grad dtype the mean is formed in it and the unscaling follows in float32
        factor = self.scaling * (float(extra_scale) if self.grad_dtype is None else 1.0)
        data = self.data * factor if factor != 1.0 else self.data
        data = _rounded(data, self.grad_dtype)
        if self.group.size > 1:
            if len(self.buckets) == 1:
                data = comm.all_reduce(data, self.group)
            else:
                data = ops.concat([comm.all_reduce(data[s:e], self.group) for s, e in self.buckets])
        if self.grad_dtype is not None:
            data = _rounded(data, self.grad_dtype)
            if extra_scale != 1.0:
                data = data * float(extra_scale)
        self.data = data

    def all_finite(self) -> bool:
        """Whether every gradient element is finite."""
        if self.data is None:
            return True
        return bool(ops.isfinite(self.data).all().asnumpy())

    def grads(self) -> Dict[str, Tensor]:
        """``{param name: gradient}`` views of the buffer."""
        if not self.params:
            return {}
        if self.data is None:
            return {name: ops.zeros(shape, ms.float32) for name, shape in zip(self.names, self.shapes)}
        if self.compiled and len(self.numels) > 1:
            return dict(zip(self.names, _compiled_unflatten(self.data, tuple(self.numels), tuple(self.shapes))))
        pieces = ops.split(self.data, self.numels) if len(self.numels) > 1 else [self.data]
        return {name: piece.reshape(shape) for name, shape, piece in zip(self.names, self.shapes, pieces)}


class PerParameterGrads:
    """Gradients held per parameter and reduced one parameter at a time (no bucketing)."""

    def __init__(self, params: Sequence[Parameter], group: comm.ProcessGroup, scaling: float = 1.0,
                 grad_dtype=None):
        self.params = list(params)
        self.names = [p.name for p in self.params]
        self.group = group
        self.scaling = float(scaling)
        self.grad_dtype = grad_dtype
        self.data: List[Optional[Tensor]] = [None] * len(self.params)

    def zero(self) -> None:
        self.data = [None] * len(self.params)

    def add(self, grads: Sequence[Optional[Tensor]]) -> None:
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.astype(ms.float32)
            self.data[i] = _rounded(g if self.data[i] is None else self.data[i] + g, self.grad_dtype)

    def reduce(self, extra_scale: float = 1.0) -> None:
        out = []
        half = self.grad_dtype is not None
        factor = self.scaling * (1.0 if half else float(extra_scale))
        for p, g in zip(self.params, self.data):
            g = ops.zeros(p.shape, ms.float32) if g is None else g
            if factor != 1.0:
                g = g * factor
            g = _rounded(g, self.grad_dtype)
            g = comm.all_reduce(g, self.group) if self.group.size > 1 else g
            if half:
                g = _rounded(g, self.grad_dtype)
                if extra_scale != 1.0:
                    g = g * float(extra_scale)
            out.append(g)
        self.data = out

    def all_finite(self) -> bool:
        values = [ops.isfinite(g).all() for g in self.data if g is not None]
        return bool(ops.stack(values).all().asnumpy()) if values else True

    def grads(self) -> Dict[str, Tensor]:
        return {name: (ops.zeros(p.shape, ms.float32) if g is None else g)
                for name, p, g in zip(self.names, self.params, self.data)}


class DistributedDataParallel:
    """Wrap a model chunk with data-parallel gradient storage and reduction.

    Calling the wrapper calls the model. The training loop adds each micro-batch's gradients with
    :meth:`accumulate` (aligned with :attr:`params`), calls :func:`finalize_model_grads` once per
    step, then reads :meth:`grads`.

    Args:
        module: The model chunk (an ``nn.Cell``).
        wrap_with_ddp: Contiguous bucketed buffers (True) or per-parameter storage (False).
        bucket_size: Elements per bucket (None: one bucket).
        data_parallel_group: Override of the gradient group (default: data parallel with context
            parallel folded in).
        grad_dtype: dtype gradients are accumulated and reduced in (None or float32: float32;
            float16/bfloat16: rounded to it, see the module docstring).
    """

    def __init__(self, module, wrap_with_ddp: bool = True, bucket_size: Optional[int] = None,
                 data_parallel_group: Optional[comm.ProcessGroup] = None, grad_dtype=None):
        self.module = module
        self.params: List[Parameter] = list(module.trainable_params())
        self.param_names = [p.name for p in self.params]
        dense = [p for p in self.params if not getattr(p, "expert_parallel", False)]
        expert = [p for p in self.params if getattr(p, "expert_parallel", False)]
        dp = ps.get_data_parallel_world_size()
        group = data_parallel_group or ps.get_data_parallel_group(with_context_parallel=True)
        expert_group = ps.get_data_modulo_expert_parallel_group()
        grad_dtype = None if grad_dtype in (None, ms.float32) else grad_dtype
        self.grad_dtype = grad_dtype
        if wrap_with_ddp:
            self.storages = [GradBuffer(dense, group, bucket_size, 1.0 / dp, grad_dtype),
                             GradBuffer(expert, expert_group, bucket_size, 1.0 / dp, grad_dtype)]
        else:
            self.storages = [PerParameterGrads(dense, group, 1.0 / dp, grad_dtype),
                             PerParameterGrads(expert, expert_group, 1.0 / dp, grad_dtype)]
        self._index = {id(p): (0, i) for i, p in enumerate(dense)}
        self._index.update({id(p): (1, i) for i, p in enumerate(expert)})
        self.reduced = False
        # what calling the wrapper runs: the module, or its compiled form (set by the trainer,
        # see mindspeed_ms.training.compilation)
        self.forward_fn = None

    def __call__(self, *args, **kwargs):
        if self.forward_fn is not None:
            return self.forward_fn(*args, **kwargs)
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # model attributes (set_input_tensor, config, ...) are reached through the wrapper
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def use_compiled_buffers(self, enabled: bool = True) -> None:
        """Flatten and split the contiguous gradient buffers with compiled graphs (same values)."""
        for storage in self.storages:
            if isinstance(storage, GradBuffer):
                storage.compiled = bool(enabled)
                if enabled:
                    allow_call_depth(len(storage.params))  # the compiled split loops over them

    def zero_grad_buffer(self) -> None:
        """Start a new step."""
        for storage in self.storages:
            storage.zero()
        self.reduced = False

    def accumulate(self, grads: Sequence[Optional[Tensor]]) -> None:
        """Add one micro-batch's gradients, aligned with :attr:`params`."""
        per_storage = [[None] * len(s.params) for s in self.storages]
        for p, g in zip(self.params, grads):
            which, i = self._index[id(p)]
            per_storage[which][i] = g
        for storage, values in zip(self.storages, per_storage):
            storage.add(values)

    def finish_grad_sync(self, extra_scale: float = 1.0) -> None:
        """Reduce the accumulated gradients over data-parallel ranks (once per step).

        Args:
            extra_scale: Folded into the reduction's scaling (the training loop passes
                ``1 / loss_scale`` to unscale for free).
        """
        for storage in self.storages:
            storage.reduce(extra_scale)
        self.reduced = True

    def grads_finite(self) -> bool:
        """Whether this rank's reduced gradients are all finite."""
        return all(storage.all_finite() for storage in self.storages)

    def grads(self) -> Dict[str, Tensor]:
        """``{param name: gradient}`` of every trainable parameter."""
        out: Dict[str, Tensor] = {}
        for storage in self.storages:
            out.update(storage.grads())
        return out


def finalize_model_grads(model_chunks: Sequence[DistributedDataParallel], grad_scale: float = 1.0) -> Dict[str, Tensor]:
    """Data-parallel reduction, then the tensor-parallel and embedding-group fix-ups.

    Args:
        model_chunks: The wrapped model chunks of this rank.
        grad_scale: Extra factor for every gradient (``1 / loss_scale``).

    Returns:
        ``{param name: gradient}`` over all chunks, ready for clipping.
    """
    grads: Dict[str, Tensor] = {}
    params: Dict[str, Parameter] = {}
    for chunk in model_chunks:
        chunk.finish_grad_sync(grad_scale)
        grads.update(chunk.grads())
        params.update(zip(chunk.param_names, chunk.params))
    tp_group = ps.get_tensor_model_parallel_group()
    if tp_group.size > 1:
        # partial over tensor-parallel ranks: weights applied to sequence-parallel slices, and LoRA
        # factors that each rank combines with only its shard of the other factor
        names = [n for n, p in params.items()
                 if getattr(p, "sequence_parallel", False) or getattr(p, "allreduce_over_tp", False)]
        if names:
            flat = comm.all_reduce(ops.concat([grads[n].reshape(-1) for n in names]), tp_group)
            pieces = ops.split(flat, [int(np.prod(params[n].shape)) for n in names])
            for n, piece in zip(names, pieces):
                grads[n] = piece.reshape(params[n].shape)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        emb_group = ps.get_embedding_group()
        if emb_group.size > 1:
            for n, p in params.items():
                if getattr(p, "shared_embedding", False):
                    grads[n] = comm.all_reduce(grads[n], emb_group)
    return grads
