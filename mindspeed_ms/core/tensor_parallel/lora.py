"""LoRA: low-rank adapters on column- and row-parallel linear layers.

A linear ``y = x W^T`` gets ``y += (alpha / r) * dropout(x) A^T B^T`` with ``A: (r, in)`` and
``B: (out, r)``; ``B`` starts at zero, so the adapted model starts equal to the base model, whose
weights are frozen. The adapters are sharded consistently with the base layer:

* column-parallel (``W`` split along ``out``): ``A`` is replicated, ``B`` is split along ``out`` like
  ``W``. Each rank computes ``x A^T`` on the same full input and its slice of the output. ``A``'s
  gradient is a partial sum on each rank (each sees only its ``B`` slice): it is all-reduced over
  the tensor-parallel group (attribute ``allreduce_over_tp``).
* row-parallel (``W`` split along ``in``): ``A`` is split along ``in`` like ``W``, ``B`` is
  replicated. ``x_i A_i^T`` is summed over ranks (all-reduce, or reduce-scatter along the sequence
  with sequence parallelism) before ``B``; with sequence parallelism ``B``'s gradient is partial and
  all-reduced over the tensor-parallel group.

:func:`apply_lora` adds adapters to the cells whose dotted names fully match one of
``lora_config.target_cells`` and freezes everything else.
"""

from __future__ import annotations

import math
import re
from typing import List

import numpy as np
from mindspore import Parameter, nn

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.precision import matmul
from mindspeed_ms.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      init_partitioned_parameter)
from mindspeed_ms.core.tensor_parallel.mappings import ReduceFromRegion, ReduceScatterToRegion
from mindspeed_ms.core.tensor_parallel.random import dropout

__all__ = ["LoraAdapter", "apply_lora", "lora_parameters"]


def _kaiming_a(shape, rng):
    # LoRA's reference initialisation of A: Kaiming-uniform with a = sqrt(5) over the input features
    fan_in = shape[1]
    bound = math.sqrt(6.0 / ((1.0 + 5.0) * fan_in))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


class LoraAdapter(nn.Cell):
    """The low-rank branch of one parallel linear layer.

    Args:
        layer: The ColumnParallelLinear or RowParallelLinear it adapts.
        rank: ``r``.
        alpha: Scaling numerator (the branch is scaled by ``alpha / r``).
        dropout_prob: Dropout on the branch input.
        key: Layout-independent name (master initialisation).
        init_b: Initial value of ``B`` ('zeros'; 'normal' only for tests that need a non-trivial branch).
    """

    def __init__(self, layer, rank: int, alpha: float, dropout_prob: float = 0.0, key: str = "lora",
                 init_b: str = "zeros"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {dropout_prob}")
        self.column = isinstance(layer, ColumnParallelLinear)
        if not self.column and not isinstance(layer, RowParallelLinear):
            raise TypeError(f"LoRA adapts ColumnParallelLinear or RowParallelLinear, got {type(layer).__name__}")
        config = layer.config
        self.scaling = float(alpha) / float(rank)
        self.dropout_prob = float(dropout_prob)
        self.compute_dtype = layer.compute_dtype
        self.sequence_parallel = layer.sequence_parallel
        self.seq_dim = layer.seq_dim
        self.explicit_expert_comm = layer.explicit_expert_comm
        # fixed here: construct must not look up parallel_state, so that it compiles under ms.jit
        self.tensor_parallel = ps.get_tensor_model_parallel_world_size() > 1
        # a row-parallel branch sums its low-rank hidden state like the base layer's output
        self.hidden_reduce = None
        if not self.column and not self.explicit_expert_comm and self.tensor_parallel:
            group = ps.get_tensor_model_parallel_group()
            self.hidden_reduce = (ReduceScatterToRegion(group, self.seq_dim) if self.sequence_parallel
                                  else ReduceFromRegion(group))
        dtype = layer.param_init_dtype
        in_size, out_size = layer.input_size, layer.output_size
        b_init = "zeros" if init_b == "zeros" else "normal"
        if self.column:
            self.lora_a = init_partitioned_parameter((rank, in_size), None, _kaiming_a, config=config, dtype=dtype,
                                                     name="lora_a", key=key + ".lora_a")
            self.lora_b = init_partitioned_parameter((out_size, rank), 0, b_init, config=config, dtype=dtype,
                                                     name="lora_b", key=key + ".lora_b")
            # each rank sees only its slice of B: A's gradient is a partial sum over tensor ranks
            self.lora_a.allreduce_over_tp = ps.get_tensor_model_parallel_world_size() > 1
        else:
            self.lora_a = init_partitioned_parameter((rank, in_size), 1, _kaiming_a, config=config, dtype=dtype,
                                                     name="lora_a", key=key + ".lora_a")
            self.lora_b = init_partitioned_parameter((out_size, rank), None, b_init, config=config, dtype=dtype,
                                                     name="lora_b", key=key + ".lora_b")
            self.lora_b.allreduce_over_tp = self.sequence_parallel
        self.lora_a.is_lora = True
        self.lora_b.is_lora = True

    def construct(self, parallel_input):
        """The branch's contribution, shaped like the base layer's output."""
        x = dropout(parallel_input, self.dropout_prob, self.training) if self.dropout_prob else parallel_input
        hidden = matmul(x, self.lora_a, transpose_b=True, compute_dtype=self.compute_dtype)
        if self.hidden_reduce is not None:
            hidden = self.hidden_reduce(hidden)
        out = matmul(hidden, self.lora_b, transpose_b=True, compute_dtype=self.compute_dtype)
        return out * self.scaling


def apply_lora(model: nn.Cell, lora_config, init_b: str = "zeros") -> List[str]:
    """Add adapters to the matching parallel linear layers of ``model`` and freeze the rest.

    Args:
        model: The model (its cells' dotted names are matched).
        lora_config: LoraConfig (use_lora, lora_rank, lora_alpha, lora_dropout, target_cells).
        init_b: 'zeros' (standard) or 'normal' (tests).

    Returns:
        The dotted names of the adapted cells.

    Raises:
        ValueError: use_lora is set but no cell matches ``target_cells``.
    """
    patterns = [re.compile(p) for p in (lora_config.target_cells or [])]
    if not patterns:
        raise ValueError("lora_config.target_cells is empty: give regular expressions matching the dotted names of "
                         "the linear cells to adapt, e.g. ['.*query_key_value', '.*dense']")
    adapted = []
    for name, cell in model.cells_and_names():
        if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)) and any(p.fullmatch(name) for p in patterns):
            adapter = LoraAdapter(cell, int(lora_config.lora_rank), float(lora_config.lora_alpha),
                                  float(lora_config.lora_dropout), key=f"lora.{name}", init_b=init_b)
            cell.lora = adapter
            # attached after the model was built: give the adapters full, unique names
            adapter.lora_a.name = f"{name}.lora.lora_a"
            adapter.lora_b.name = f"{name}.lora.lora_b"
            adapted.append(name)
    if not adapted:
        names = [n for n, c in model.cells_and_names() if isinstance(c, (ColumnParallelLinear, RowParallelLinear))]
        raise ValueError(f"lora_config.target_cells {lora_config.target_cells} match no parallel linear cell; "
                         f"candidates: {names[:8]}{'...' if len(names) > 8 else ''}")
    for param in model.get_parameters():
        if not getattr(param, "is_lora", False):
            param.requires_grad = False
    return adapted


def lora_parameters(model: nn.Cell) -> List[Parameter]:
    """The adapter parameters of ``model``."""
    return [p for p in model.get_parameters() if getattr(p, "is_lora", False)]

