"""Optimizers (AdamW / AdamWeightDecay, Adam, SGD), parameter groups and gradient clipping.

The optimizer receives the gradients explicitly (MindSpore has no ``param.grad``): the data-parallel
wrapper accumulates them over micro-batches and reduces them over ranks; the training loop passes
``{param_name: grad}`` to :meth:`MegatronOptimizer.step`.

Update rules (``g`` the gradient, ``t`` the 1-based step):

* ``AdamW``: decoupled weight decay with bias correction (PyTorch's AdamW).
* ``AdamWeightDecay``: MindSpore's rule (decoupled weight decay, no bias correction).
* ``Adam``: L2 regularisation (``g + wd * p``) with bias correction.
* ``SGD``: momentum SGD with L2 regularisation.

AdamW runs MindSpore's fused ``AdamWeightDecay`` kernel (one launch per parameter) with the bias
correction folded into the step size and epsilon (``lr_t = lr * sqrt(1-b2^t) / (1-b1^t)``,
``eps_t = eps * sqrt(1-b2^t)``, ``wd_t = wd * lr / lr_t``), which is exactly PyTorch's update.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core.graph_limits import allow_call_depth
from mindspeed_ms.core.precision import native_low_precision_matmul
from mindspeed_ms.core import parallel_state as ps

__all__ = [
    "OPTIMIZER_TYPES",
    "get_param_groups",
    "MegatronOptimizer",
    "get_grad_norm",
    "clip_grads_by_norm",
    "clip_grads_by_value",
    "parse_grad_clip",
    "get_megatron_optimizer",
]

OPTIMIZER_TYPES = ("AdamWeightDecay", "AdamW", "Adam", "SGD")


def _no_weight_decay(param: Parameter) -> bool:
    """Biases and normalisation weights get no weight decay (Megatron's rule: biases and 1-D params)."""
    return param.name.endswith(".bias") or len(param.shape) <= 1


def get_param_groups(params: Sequence[Parameter], weight_decay: float, lr_mult: float = 1.0) -> List[dict]:
    """Two groups: decayed weights, and biases/norms without weight decay.

    Returns:
        Megatron-style groups ``{'params', 'weight_decay', 'wd_mult', 'lr_mult', 'lr'}``.
    """
    decay, no_decay = [], []
    for p in params:
        (no_decay if _no_weight_decay(p) else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": lr_mult,
                       "lr": 0.0, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": lr_mult, "lr": 0.0,
                       "name": "no_decay"})
    return groups


def _counts_for_norm(param: Parameter) -> bool:
    """Whether this rank's copy of ``param`` enters the gradient norm.

    Tensor-parallel shards are distinct on every rank; replicated parameters count on tensor rank 0
    only; the last stage's copy of a tied embedding is skipped (the first stage counts it).
    """
    if getattr(param, "shared_embedding", False) and not ps.is_pipeline_first_stage(ignore_virtual=True) \
            and ps.get_pipeline_model_parallel_world_size() > 1:
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or ps.get_tensor_model_parallel_rank() == 0


def _sum_of_squares(grads):
    """``sum_i sum(g_i * g_i)`` in float32, the PyNative path's operations in the same order."""
    parts = []
    for g in grads:
        g32 = g.astype(ms.float32)
        parts.append((g32 * g32).sum())
    return ops.stack(parts).sum().reshape(1)


# One graph per tuple of gradient shapes, shared by every model and optimizer instance (no
# parameters inside): compiled once per process for a given model shape.
_compiled_sum_of_squares = ms.jit(_sum_of_squares)


def get_grad_norm(params: Sequence[Parameter], grads: Sequence[Tensor], norm_type: float = 2.0,
                  extra_groups: Iterable[comm.ProcessGroup] = (), compiled: bool = False) -> float:
    """Global gradient norm over all model-parallel ranks, without double counting.

    Dense parameters are reduced over the tensor x pipeline group; expert parameters (attribute
    ``expert_parallel``) also over the expert-parallel group, since each expert rank holds other
    experts. ``extra_groups`` adds reductions (the data-parallel group of a sharded optimizer).
    With ``compiled`` the local sums of squares run as one ``ms.jit`` graph (same result).

    Returns:
        The norm as a Python float (inf/nan propagate).
    """
    if norm_type != 2.0 and not math.isinf(norm_type):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type}")
    dense_grads, expert_grads = [], []
    for p, g in zip(params, grads):
        if g is None or not _counts_for_norm(p):
            continue
        (expert_grads if getattr(p, "expert_parallel", False) else dense_grads).append(g)
    op = "max" if math.isinf(norm_type) else "sum"

    def combine(selected):
        if not selected:
            return Tensor(np.zeros((1,), np.float32))
        if op == "sum":
            if compiled:  # mutable: a plain tuple of tensors is a compile-time constant (recompiles)
                return _compiled_sum_of_squares(ms.mutable(tuple(selected)))
            return _sum_of_squares(selected)
        return ops.stack([ops.abs(g.astype(ms.float32)).max() for g in selected]).max().reshape(1)

    dense, expert = combine(dense_grads), combine(expert_grads)
    mp_group = ps.get_model_parallel_group()
    ep_group = ps.get_expert_model_parallel_group()
    dense = comm.all_reduce(dense, mp_group, op=op)
    expert = comm.all_reduce(comm.all_reduce(expert, mp_group, op=op), ep_group, op=op)
    total = ops.maximum(dense, expert) if op == "max" else dense + expert
    for group in extra_groups:
        total = comm.all_reduce(total, group, op=op)
    value = float(total.asnumpy()[0])
    return value if op == "max" else math.sqrt(value) if value >= 0 else float("nan")


def clip_grads_by_norm(grads: Sequence[Tensor], max_norm: float, total_norm: float) -> List[Tensor]:
    """Scale all gradients by ``max_norm / (total_norm + 1e-6)`` when that is below 1."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0 or not math.isfinite(total_norm):
        return list(grads)
    return [None if g is None else g * coeff for g in grads]


def clip_grads_by_value(grads: Sequence[Tensor], clip_value: float) -> List[Tensor]:
    """Clamp every gradient element to ``[-clip_value, clip_value]``."""
    return [None if g is None else ops.clamp(g, -clip_value, clip_value) for g in grads]


def parse_grad_clip(grad_clip_kwargs: Optional[dict], clip_grad: float = 0.0) -> Tuple[Optional[str], float]:
    """``('norm'|'value'|None, value)`` from the training config's grad_clip_kwargs or optimizer clip_grad."""
    if grad_clip_kwargs:
        kind = str(grad_clip_kwargs.get("grad_clip_type", "ClipGlobalNorm"))
        value = float(grad_clip_kwargs.get("clip_value", grad_clip_kwargs.get("max_norm", 1.0)))
        kinds = {"ClipGlobalNorm": "norm", "ClipByGlobalNorm": "norm", "norm": "norm",
                 "ClipByValue": "value", "value": "value"}
        if kind not in kinds:
            raise ValueError(f"grad_clip_kwargs.grad_clip_type must be one of {sorted(kinds)}, got {kind!r}")
        if value <= 0:
            raise ValueError(f"grad_clip_kwargs.clip_value must be positive, got {value}")
        return kinds[kind], value
    if clip_grad and float(clip_grad) > 0:
        return "norm", float(clip_grad)
    return None, 0.0


class MegatronOptimizer:
    """An optimizer over named parameters with Megatron-style parameter groups.

    Args:
        params: Trainable parameters.
        optimizer_type: One of :data:`OPTIMIZER_TYPES`.
        learning_rate: Initial learning rate (the scheduler overrides it per step).
        weight_decay: Weight decay of the decayed group.
        betas: Adam betas.
        eps: Adam epsilon.
        momentum: SGD momentum.
        clip: ``(kind, value)`` from :func:`parse_grad_clip`.

    The state (``exp_avg``/``exp_avg_sq`` or ``momentum`` per parameter, the step count) lives in
    MindSpore Parameters named ``<state>.<param name>`` so checkpoints store them by name.
    """

    def __init__(self, params: Sequence[Parameter], optimizer_type: str = "AdamW", learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 clip: Tuple[Optional[str], float] = (None, 0.0)):
        if optimizer_type not in OPTIMIZER_TYPES:
            raise ValueError(f"optimizer_type must be one of {list(OPTIMIZER_TYPES)}, got {optimizer_type!r}")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.optimizer_type = optimizer_type
        self.params = list(params)
        # read once: Parameter.name waits for queued device work, too slow for every step
        self.names = [p.name for p in self.params]
        self.param_groups = get_param_groups(self.params, weight_decay)
        self._group_names = [[p.name for p in group["params"]] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = float(learning_rate)
        self.betas = betas
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.clip_kind, self.clip_value = clip
        self.step_count = 0
        self.state: Dict[str, Parameter] = {}
        self._init_state()
        self._kernel = ops.AdamWeightDecay()
        self._beta1 = Tensor(self.betas[0], ms.float32)
        self._beta2 = Tensor(self.betas[1], ms.float32)
        self._fused: Optional[_FusedAdamUpdate] = None
        # (gradients dict, norm-clipping factor) returned by clip_and_norm when the compiled
        # update applies the factor itself
        self._pending: Optional[Tuple[dict, float]] = None

    def _init_state(self):
        for p in self.params:
            for slot in self._slots():
                self.state[f"{slot}.{p.name}"] = Parameter(Tensor(np.zeros(p.shape, np.float32)),
                                                           name=f"{slot}.{p.name}", requires_grad=False)

    def _slots(self):
        return ("momentum",) if self.optimizer_type == "SGD" else ("exp_avg", "exp_avg_sq")

    # --------------------------------------------------------------------------------- update
    def step(self, grads: Dict[str, Tensor]) -> None:
        """Apply one update with the (unscaled, reduced, clipped) gradients ``{param name: grad}``."""
        self.step_count += 1
        coeff = self._take_pending_coeff(grads)
        if self._fused is not None and self._fused.applies(grads):
            self._fused(grads, self._group_scalars(self.step_count), coeff)
            return
        if coeff != 1.0:
            grads = {name: g * coeff for name, g in grads.items()}
        t = self.step_count
        scalars = self._group_scalars(t)
        for index, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            wd = float(group["weight_decay"])
            for p, name in zip(group["params"], self._group_names[index]):
                g = grads.get(name)
                if g is None:
                    continue
                if g.dtype != ms.float32:
                    g = g.astype(ms.float32)
                if self.optimizer_type == "SGD":
                    self._sgd(p, name, g, lr, wd)
                    continue
                if self.optimizer_type == "Adam" and wd:
                    g = g + wd * _float32_value(p)
                self._adam(p, name, g, *scalars[index])

    def _group_scalars(self, t: int) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """``(lr_t, eps_t, decay_t)`` of every parameter group at step ``t``, as float32 Tensors.

        Built once per group and step (not per parameter): each is a host-to-device copy.
        """
        b1, b2 = self.betas
        out = []
        for group in self.param_groups:
            lr = float(group["lr"])
            wd_eff = 0.0 if self.optimizer_type == "Adam" else float(group["weight_decay"])
            if self.optimizer_type in ("AdamW", "Adam"):
                c1, c2 = 1.0 - b1 ** t, 1.0 - b2 ** t
                lr_t = lr * math.sqrt(c2) / c1
                eps_t = self.eps * math.sqrt(c2)
                decay_t = wd_eff * lr / lr_t if lr_t else 0.0
            else:  # AdamWeightDecay: no bias correction
                lr_t, eps_t, decay_t = lr, self.eps, wd_eff
            out.append((Tensor(lr_t, ms.float32), Tensor(eps_t, ms.float32), Tensor(decay_t, ms.float32)))
        return out

    def _adam(self, p, name, g, lr: Tensor, eps: Tensor, decay: Tensor):
        m = self.state[f"exp_avg.{name}"]
        v = self.state[f"exp_avg_sq.{name}"]
        if p.dtype == ms.float32:
            self._kernel(p, m, v, lr, self._beta1, self._beta2, eps, decay, g)
            return
        # low-precision parameters: update a float32 copy, then round back
        master = Parameter(_float32_value(p), name="master", requires_grad=False)
        self._kernel(master, m, v, lr, self._beta1, self._beta2, eps, decay, g)
        _write_param(p, master.value().astype(p.dtype))

    # ----------------------------------------------------------------------- compiled update
    def enable_compiled_update(self) -> bool:
        """Run clipping and the update of all parameters as one compiled graph from now on.

        Applies to AdamW and AdamWeightDecay over float32 parameters (the others keep the
        per-parameter PyNative update). The graph launches the same fused kernel per parameter
        with the same float32 inputs, so the result is identical; it saves the per-operator
        launch overhead of PyNative mode. Compiling costs about a second once.

        Returns:
            Whether the compiled update is on.
        """
        if self.optimizer_type not in ("AdamW", "AdamWeightDecay") or type(self) is not MegatronOptimizer:
            return False
        if not self.params or any(p.dtype != ms.float32 for p in self.params):
            return False
        allow_call_depth(len(self.params))  # the compiled update and norm loop over every parameter
        self._fused = _FusedAdamUpdate(self)
        return True

    def _sgd(self, p, name, g, lr, wd):
        buf = self.state[f"momentum.{name}"]
        p32 = _float32_value(p)
        if wd:
            g = g + wd * p32
        new_buf = buf.value() * self.momentum + g
        ops.assign(buf, new_buf)  # in place: compiled graphs hold the parameters' memory
        _write_param(p, (p32 - lr * new_buf).astype(p.dtype))

    # ----------------------------------------------------------------------------- gradients
    def clip_and_norm(self, grads: Dict[str, Tensor], extra_groups=()) -> Tuple[Dict[str, Tensor], float]:
        """The unclipped global norm, and the gradients clipped as configured."""
        names = self.names
        values = [grads.get(n) for n in names]
        norm = get_grad_norm(self.params, values, extra_groups=extra_groups, compiled=self._fused is not None)
        if self.clip_kind == "norm":
            coeff = self.clip_value / (norm + 1.0e-6)
            if self._fused is not None:
                # the compiled update multiplies by the factor itself (by 1.0 when not clipping:
                # exact), which saves one launch per parameter
                out = {n: v for n, v in zip(names, values) if v is not None}
                self._pending = (out, coeff if coeff < 1.0 and math.isfinite(norm) else 1.0)
                return out, norm
            values = clip_grads_by_norm(values, self.clip_value, norm)
        elif self.clip_kind == "value":
            values = clip_grads_by_value(values, self.clip_value)
        return {n: v for n, v in zip(names, values) if v is not None}, norm

    def _take_pending_coeff(self, grads) -> float:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is grads:
            return pending[1]
        return 1.0

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Tuple[Dict[str, np.ndarray], dict]:
        """``(tensors, meta)``: optimizer state arrays by name, and JSON-able metadata."""
        tensors = {name: p.asnumpy() for name, p in self.state.items()}
        meta = {"optimizer_type": self.optimizer_type, "step": self.step_count,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}
        return tensors, meta

    def load_state_dict(self, tensors: Dict[str, np.ndarray], meta: dict) -> None:
        """Restore from :meth:`state_dict` output (missing entries raise KeyError naming them)."""
        if meta.get("optimizer_type") != self.optimizer_type:
            raise ValueError(f"checkpoint optimizer_type {meta.get('optimizer_type')!r} differs from "
                             f"{self.optimizer_type!r}")
        missing = sorted(set(self.state) - set(tensors))
        if missing:
            raise KeyError(f"optimizer state missing from the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for name, p in self.state.items():
            p.set_data(Tensor(np.asarray(tensors[name], np.float32)))
        self.step_count = int(meta.get("step", 0))
        for group, saved in zip(self.param_groups, meta.get("param_groups", [])):
            group["lr"] = float(saved.get("lr", group["lr"]))
            group["weight_decay"] = float(saved.get("weight_decay", group["weight_decay"]))


class _FusedAdamUpdate(nn.Cell):
    """The AdamW / AdamWeightDecay update of all parameters as one compiled graph.

    Per parameter it launches the fused ``AdamWeightDecay`` kernel with the inputs the PyNative
    path gives it (the group's float32 step scalars, the gradient multiplied by the clipping
    factor), so parameters and moments come out identical.
    """

    def __init__(self, optimizer: "MegatronOptimizer"):
        super().__init__()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.names = [name for names in optimizer._group_names for name in names]  # pylint: disable=protected-access
        self.group_of = tuple(i for i, group in enumerate(optimizer.param_groups) for _ in group["params"])
        self.weights = ParameterTuple(params)
        self.exp_avg = ParameterTuple([optimizer.state[f"exp_avg.{p.name}"] for p in params])
        self.exp_avg_sq = ParameterTuple([optimizer.state[f"exp_avg_sq.{p.name}"] for p in params])
        self.beta1 = optimizer._beta1  # pylint: disable=protected-access
        self.beta2 = optimizer._beta2  # pylint: disable=protected-access
        self.kernel = ops.AdamWeightDecay()
        self.update = ms.jit(self._update)

    def applies(self, grads: Dict[str, Tensor]) -> bool:
        """Whether every parameter has a float32 gradient (else the per-parameter path runs)."""
        return all(name in grads and grads[name].dtype == ms.float32 for name in self.names)

    def construct(self, grads, scalars, coeff):
        lrs = tuple(s[0] for s in scalars)
        epss = tuple(s[1] for s in scalars)
        decays = tuple(s[2] for s in scalars)
        # mutable: plain tuples of tensors would be compile-time constants (a recompile per step)
        self.update(ms.mutable(tuple(grads[name] for name in self.names)), ms.mutable(lrs), ms.mutable(epss),
                    ms.mutable(decays), Tensor(coeff, ms.float32))

    def _update(self, grads, lrs, epss, decays, coeff):
        # iterating over tuples unrolls the loop at compile time (a range() loop may become a
        # graph while-loop, whose variable index cannot select a Parameter)
        for weight, exp_avg, exp_avg_sq, grad, group in zip(self.weights, self.exp_avg, self.exp_avg_sq, grads,
                                                            self.group_of):
            self.kernel(weight, exp_avg, exp_avg_sq, lrs[group], self.beta1, self.beta2, epss[group], decays[group],
                        grad * coeff)
        return coeff


def get_megatron_optimizer(optimizer_config, params: Sequence[Parameter], grad_clip_kwargs=None,
                           use_distributed_optimizer: bool = False):
    """Build the optimizer from an OptimizerConfig (and the training config's grad_clip_kwargs).

    With ``use_distributed_optimizer`` the state is sharded over data-parallel ranks
    (:class:`~mindspeed_ms.core.optimizer.distrib_optimizer.DistributedOptimizer`).
    """
    clip = parse_grad_clip(grad_clip_kwargs, optimizer_config.clip_grad)
    cls = MegatronOptimizer
    if use_distributed_optimizer:
        from mindspeed_ms.core.optimizer.distrib_optimizer import DistributedOptimizer  # pylint: disable=import-outside-toplevel

        cls = DistributedOptimizer
    return cls(
        params, optimizer_type=optimizer_config.optimizer_type, learning_rate=optimizer_config.learning_rate,
        weight_decay=optimizer_config.weight_decay, betas=optimizer_config.betas, eps=optimizer_config.eps,
        momentum=optimizer_config.momentum, clip=clip)


def _float32_value(param: Parameter) -> Tensor:
    """``param``'s value in float32 (a bfloat16 one read through Cast: CPU has no bfloat16 Identity)."""
    if param.dtype == ms.bfloat16:
        return param.astype(ms.float32)
    return param.value().astype(ms.float32)


def _write_param(param: Parameter, value: Tensor) -> None:
    """``param``'s new value, written in place (compiled graphs hold the parameters' memory).

    The CPU backend has no bfloat16 Assign: there the value replaces the data; the model of such a
    run is not compiled (``training.compilation`` lists bfloat16 parameters on CPU as a blocker).
    """
    if value.dtype == ms.bfloat16 and not native_low_precision_matmul():
        param.set_data(value)
        return
    ops.assign(param, value)
