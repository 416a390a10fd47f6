"""The distributed optimizer (ZeRO-1): optimizer state and master weights sharded over data parallel.

All trainable parameters of a rank are viewed as one flat float32 vector, padded to a multiple of
the data-parallel size and cut into ``dp`` equal contiguous shards. Data-parallel rank ``i`` keeps
the Adam moments and the float32 master weights of shard ``i`` only (``1/dp`` of the optimizer
memory), updates that shard from the reduced gradients, and the updated shards are all-gathered so
every rank holds all parameters again.

The update is elementwise on one flat shard, so per-parameter settings become masks over it:
weight decay (decayed parameters vs biases and norms) is a 0/1 vector. The result equals the
non-sharded optimizer's update exactly (same float32 arithmetic per element).
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.optimizer.optimizer import MegatronOptimizer

__all__ = ["DistributedOptimizer"]


class DistributedOptimizer(MegatronOptimizer):
    """A :class:`MegatronOptimizer` whose state is sharded over the data-parallel group.

    Supports the Adam family (AdamW, AdamWeightDecay, Adam). Arguments as for
    :class:`MegatronOptimizer`, plus ``data_parallel_group`` (default: data parallel with context
    parallel, whose ranks hold identical parameters).
    """

    def __init__(self, params: Sequence[Parameter], optimizer_type: str = "AdamW", learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                 clip=(None, 0.0), data_parallel_group=None):
        if optimizer_type == "SGD":
            raise ValueError("use_distributed_optimizer supports optimizer_type AdamW, AdamWeightDecay and Adam, "
                             "not SGD")
        self.group = data_parallel_group or ps.get_data_parallel_group(with_context_parallel=True)
        super().__init__(params, optimizer_type, learning_rate, weight_decay, betas, eps, momentum, clip)
        self.numels = [int(np.prod(p.shape)) if len(p.shape) else 1 for p in self.params]
        self.total = int(sum(self.numels))
        n = self.group.size
        self.shard_size = -(-self.total // n)
        self.padded = self.shard_size * n
        self.shard_start = self.group.rank * self.shard_size
        shard = slice(self.shard_start, self.shard_start + self.shard_size)
        decay = np.zeros(self.padded, np.float32)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        offset = 0
        for p, size in zip(self.params, self.numels):
            if group_of[id(p)]["wd_mult"]:
                decay[offset:offset + size] = 1.0
            offset += size
        self.decay_mask = Tensor(decay[shard])
        full = np.zeros(self.padded, np.float32)
        full[:self.total] = np.concatenate([p.asnumpy().astype(np.float32).reshape(-1) for p in self.params])
        # replace the per-parameter state of the base class with flat shards
        self.state = {
            "master": Parameter(Tensor(full[shard]), name="master", requires_grad=False),
            "exp_avg": Parameter(Tensor(np.zeros(self.shard_size, np.float32)), name="exp_avg", requires_grad=False),
            "exp_avg_sq": Parameter(Tensor(np.zeros(self.shard_size, np.float32)), name="exp_avg_sq",
                                    requires_grad=False),
        }

    def _init_state(self):
        """No per-parameter state: the flat shards are created in __init__."""

    def _flat_grads(self, grads: Dict[str, Tensor]) -> Tensor:
        pieces = [grads[name].astype(ms.float32).reshape(-1) if name in grads
                  else ops.zeros((n,), ms.float32) for name, n in zip(self.names, self.numels)]
        if self.padded > self.total:
            pieces.append(ops.zeros((self.padded - self.total,), ms.float32))
        return ops.concat(pieces)

    def step(self, grads: Dict[str, Tensor]) -> None:
        """Update this rank's shard, then all-gather the parameters."""
        self.step_count += 1
        t = self.step_count
        b1, b2 = self.betas
        lr = float(self.param_groups[0]["lr"])
        wd = max(float(g["weight_decay"]) for g in self.param_groups)
        g = self._flat_grads(grads)[self.shard_start:self.shard_start + self.shard_size]
        master = self.state["master"].value()
        if self.optimizer_type == "Adam" and wd:
            g = g + wd * self.decay_mask * master
        m = self.state["exp_avg"].value() * b1 + g * (1.0 - b1)
        v = self.state["exp_avg_sq"].value() * b2 + g * g * (1.0 - b2)
        if self.optimizer_type == "AdamWeightDecay":
            update = m / (ops.sqrt(v) + self.eps)
        else:
            update = (m / (1.0 - b1 ** t)) / (ops.sqrt(v / (1.0 - b2 ** t)) + self.eps)
        if self.optimizer_type != "Adam" and wd:
            update = update + wd * self.decay_mask * master
        master = master - lr * update
        self.state["exp_avg"].set_data(m)
        self.state["exp_avg_sq"].set_data(v)
        self.state["master"].set_data(master)
        full = comm.all_gather(master, self.group, 0)
        pieces = ops.split(full[:self.total], self.numels)
        for p, piece in zip(self.params, pieces):
            p.set_data(piece.reshape(p.shape).astype(p.dtype))

    def state_dict(self) -> Tuple[Dict[str, np.ndarray], dict]:
        tensors, meta = super().state_dict()
        meta.update({"sharded": True, "shard_start": self.shard_start, "shard_size": self.shard_size,
                     "data_parallel_size": self.group.size, "total": self.total})
        return tensors, meta

    def load_state_dict(self, tensors, meta) -> None:
        if not meta.get("sharded") or int(meta.get("data_parallel_size", -1)) != self.group.size \
                or int(meta.get("total", -1)) != self.total:
            raise ValueError("the checkpoint's distributed-optimizer shards were written with another data-parallel "
                             f"size or model ({meta.get('data_parallel_size')} ranks, {meta.get('total')} elements); "
                             f"this run has {self.group.size} ranks, {self.total} elements")
        super().load_state_dict(tensors, meta)

