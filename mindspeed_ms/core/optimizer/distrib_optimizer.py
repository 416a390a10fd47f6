"""The distributed optimizer (ZeRO-1): optimizer state and master weights sharded over data parallel.

The trainable parameters of a rank are viewed as flat float32 vectors, one per replica group:
dense parameters are replicated over the data-parallel group (context parallel folded in), expert
parameters only over the expert-data-parallel group (other expert-parallel ranks hold other
experts). Each vector is padded to a multiple of its group size and cut into equal contiguous
shards; rank ``i`` of the group keeps the Adam moments and float32 master weights of shard ``i``
only (``1/dp`` of the optimizer memory), updates that shard from the reduced gradients, and the
updated shards are all-gathered so every rank holds all its parameters again.

The update is elementwise on a flat shard, so per-parameter settings become masks over it: weight
decay (decayed parameters vs biases and norms) is a 0/1 vector. The result equals the non-sharded
optimizer's update (same float32 arithmetic per element).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.optimizer.optimizer import MegatronOptimizer

__all__ = ["DistributedOptimizer"]


class _Shard:
    """One flat parameter vector sharded over one replica group."""

    def __init__(self, name: str, params: List[Parameter], group: comm.ProcessGroup, decayed: set):
        self.name = name
        self.params = params
        self.group = group
        self.numels = [int(np.prod(p.shape)) if len(p.shape) else 1 for p in params]
        self.total = int(sum(self.numels))
        n = group.size
        self.size = -(-self.total // n) if self.total else 0
        self.padded = self.size * n
        self.start = group.rank * self.size
        window = slice(self.start, self.start + self.size)
        decay = np.zeros(self.padded, np.float32)
        full = np.zeros(self.padded, np.float32)
        offset = 0
        for p, numel in zip(params, self.numels):
            if id(p) in decayed:
                decay[offset:offset + numel] = 1.0
            full[offset:offset + numel] = p.asnumpy().astype(np.float32).reshape(-1)
            offset += numel
        self.decay_mask = Tensor(decay[window])
        self.state = {
            f"{name}.master": Parameter(Tensor(full[window]), name=f"{name}.master", requires_grad=False),
            f"{name}.exp_avg": Parameter(Tensor(np.zeros(self.size, np.float32)), name=f"{name}.exp_avg",
                                         requires_grad=False),
            f"{name}.exp_avg_sq": Parameter(Tensor(np.zeros(self.size, np.float32)), name=f"{name}.exp_avg_sq",
                                            requires_grad=False),
        }

    def flat_grad_shard(self, grads: Dict[str, Tensor]) -> Tensor:
        pieces = [grads[p.name].astype(ms.float32).reshape(-1) if p.name in grads
                  else ops.zeros((n,), ms.float32) for p, n in zip(self.params, self.numels)]
        if self.padded > self.total:
            pieces.append(ops.zeros((self.padded - self.total,), ms.float32))
        flat = ops.concat(pieces) if len(pieces) > 1 else pieces[0]
        return flat[self.start:self.start + self.size]

    def write_back(self) -> None:
        full = comm.all_gather(self.state[f"{self.name}.master"].value(), self.group, 0)
        pieces = ops.split(full[:self.total], self.numels) if len(self.numels) > 1 else [full[:self.total]]
        for p, piece in zip(self.params, pieces):
            # in place: a compiled model graph keeps reading the parameter's memory, which
            # set_data would replace (see mindspeed_ms.training.compilation)
            ops.assign(p, piece.reshape(p.shape).astype(p.dtype))


class DistributedOptimizer(MegatronOptimizer):
    """A :class:`MegatronOptimizer` whose state is sharded over the data-parallel replicas.

    Supports the Adam family (AdamW, AdamWeightDecay, Adam). Arguments as for
    :class:`MegatronOptimizer`.
    """

    def __init__(self, params: Sequence[Parameter], optimizer_type: str = "AdamW", learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 clip=(None, 0.0)):
        if optimizer_type == "SGD":
            raise ValueError("use_distributed_optimizer supports optimizer_type AdamW, AdamWeightDecay and Adam, "
                             "not SGD")
        super().__init__(params, optimizer_type, learning_rate, weight_decay, betas, eps, momentum, clip)
        decayed = {id(p) for g in self.param_groups if g["wd_mult"] for p in g["params"]}
        dense = [p for p in self.params if not getattr(p, "expert_parallel", False)]
        expert = [p for p in self.params if getattr(p, "expert_parallel", False)]
        self.shards = [_Shard("dense", dense, ps.get_data_parallel_group(with_context_parallel=True), decayed)]
        if expert:
            self.shards.append(_Shard("expert", expert, ps.get_data_modulo_expert_parallel_group(), decayed))
        self.state = {}
        for shard in self.shards:
            self.state.update(shard.state)

    def _init_state(self):
        """No per-parameter state: flat shards are created in __init__."""

    def step(self, grads: Dict[str, Tensor]) -> None:
        """Update this rank's shards, then all-gather the parameters."""
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        lr = float(self.param_groups[0]["lr"])
        wd = max(float(g["weight_decay"]) for g in self.param_groups)
        for shard in self.shards:
            if not shard.total:
                continue
            g = shard.flat_grad_shard(grads)
            master = shard.state[f"{shard.name}.master"].value()
            if self.optimizer_type == "Adam" and wd:
                g = g + wd * shard.decay_mask * master
            m = shard.state[f"{shard.name}.exp_avg"].value() * b1 + g * (1.0 - b1)
            v = shard.state[f"{shard.name}.exp_avg_sq"].value() * b2 + g * g * (1.0 - b2)
            if self.optimizer_type == "AdamWeightDecay":
                update = m / (ops.sqrt(v) + self.eps)
            else:
                update = (m / (1.0 - b1 ** t)) / (ops.sqrt(v / (1.0 - b2 ** t)) + self.eps)
            if self.optimizer_type != "Adam" and wd:
                update = update + wd * shard.decay_mask * master
            shard.state[f"{shard.name}.exp_avg"].set_data(m)
            shard.state[f"{shard.name}.exp_avg_sq"].set_data(v)
            shard.state[f"{shard.name}.master"].set_data(master - lr * update)
            shard.write_back()

    def sync_master_from_params(self) -> None:
        """Re-read the master shards from the parameters (after weights were changed outside the
        optimizer, e.g. a checkpoint load or a cold/hot expert swap)."""
        for shard in self.shards:
            full = np.zeros(shard.padded, np.float32)
            offset = 0
            for p, numel in zip(shard.params, shard.numels):
                full[offset:offset + numel] = p.asnumpy().astype(np.float32).reshape(-1)
                offset += numel
            shard.state[f"{shard.name}.master"].set_data(Tensor(full[shard.start:shard.start + shard.size]))

    def state_dict(self) -> Tuple[Dict[str, np.ndarray], dict]:
        tensors, meta = super().state_dict()
        meta.update({"sharded": True,
                     "shards": {s.name: {"start": s.start, "size": s.size, "group_size": s.group.size,
                                         "total": s.total} for s in self.shards}})
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        saved = meta.get("shards") if meta.get("sharded") else None
        current = {s.name: {"group_size": s.group.size, "total": s.total} for s in self.shards}
        if not saved or {k: {"group_size": v["group_size"], "total": v["total"]} for k, v in saved.items()} != current:
            raise ValueError(f"the checkpoint's distributed-optimizer shards {saved} were written with another "
                             f"data-parallel size or model; this run has {current}")
        super().load_state_dict(tensors, meta)
