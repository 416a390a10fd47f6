"""Parallel-strategy tuner: every valid layout, its memory and step time, and real runs to compare.

For a model (:class:`ModelSpec`) and a number of workers, :func:`enumerate_layouts` lists every
valid (tp, pp, dp, cp, ep, vpp, sequence parallel, distributed optimizer, recompute) layout, and
:func:`estimate_layouts` returns a DataFrame with the estimates of each, sortable by any column::

    model = ModelSpec(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048,
                      vocab_size=50304, micro_batch_size=1, micro_batch_num=8)
    table = estimate_layouts(model, workers=8, hardware=HardwareSpec(memory_gb=64))
    table.sort_values("total_gb")

The formulas (symbols: l layers, h hidden, a heads, s sequence, b micro batch, V vocabulary,
t/p/d/c/e/v the tp/pp/dp/cp/ep/vpp sizes, m micro batches per step):

* Model FLOPs per step (Narayanan et al. 2021): ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` for a
  GPT with ffn = 4h, one key/value group per head, no gated unit, where ``B = b m d`` is the global
  batch. Generalised here as ``3 T (l (2 P_mm + 4 s h) + 2 h V)`` with ``T = B s`` tokens and
  ``P_mm`` the matmul parameters a token goes through per layer (top-k experts for MoE), which
  reduces to the formula above in that case. Recomputation adds one more forward of the layers
  (full) or of the attention core (selective) to the hardware FLOPs, not to the model FLOPs.
* Activations per layer and micro batch, in bytes with 16-bit activations (Korthikanti et al.
  2022): ``s b h (34 + 5 a s / h)`` without parallelism; ``s b h (10 + 24/t + 5 a s/(h t))`` with
  tensor parallelism; ``(34 s b h + 5 a s^2 b) / t`` with sequence parallelism; selective
  recompute drops the ``5 a s^2 b`` term; full recompute keeps ``2 s b h`` (``/t`` with SP) per
  layer plus one layer's activations for the recomputation. The constants 10/24 are generalised
  for grouped-query attention, other ffn sizes, gated units and top-k experts (see
  :func:`activation_bytes_per_layer`). Context parallelism replaces s by s/c. The first pipeline
  stage holds ``min(p, m)`` micro batches in flight (1F1B), times ``1 + (p-1)/(p v)`` when
  interleaved; the last stage also holds the logits, ``4 s b V / t``.
* Weights ``param_bytes`` (2), gradients ``grad_bytes`` (4, fp32 main grads) and optimizer state
  ``optimizer_bytes`` (12: fp32 master copy and two Adam moments) per parameter; the
  distributed optimizer divides the optimizer state by the data-parallel size (``d c`` for dense
  weights, ``d / e`` for expert weights): Megatron's ``6 + 12/d`` bytes per parameter.
* Step time: compute ``hardware FLOPs / (workers * peak * efficiency) * (1 + (p-1)/(m v))``
  (pipeline bubble) plus communication time, not overlapped: ring collectives move
  ``2 (n-1)/n`` (all-reduce) or ``(n-1)/n`` (all-gather, reduce-scatter, all-to-all) of the
  buffer per rank. TP: 4 all-reduces of ``b s h`` per layer and micro batch (all-gather +
  reduce-scatter pairs with SP, the same volume; 6 with full recompute). CP (ring attention):
  ``c - 1`` exchanges of the K/V chunk forward, twice that backward. PP: one activation and one
  gradient of ``b s h / t`` per micro batch and virtual stage. DP: the gradient all-reduce
  (reduce-scatter of gradients + all-gather of weights with the distributed optimizer). EP: four
  all-to-alls of the ``k b s h`` routed tokens per MoE layer and micro batch. Groups that fit in
  one node (ranks ordered tp-cp-ep-dp-pp) use ``intra_node_bandwidth``, the others
  ``inter_node_bandwidth``. Biases, the embedding's and the loss's own collectives are ignored.

Real runs: :func:`run_layouts` trains a config under each chosen layout for a few steps (one job
after the other, same weights through ``use_cpu_initialization``, same samples through a fixed
global batch) and returns a :class:`LayoutRuns` with the measured step time, peak worker RSS and
loss next to the estimates, and every layout's loss curve; :func:`model_spec_from_config` and
:func:`layout_config` connect the estimator to the engine's configs.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import pandas as pd

from mindspeed_ms.core.config.layout_rules import CONTEXT_PARALLEL_ALGOS, LayoutSpec, check_layout

__all__ = [
    "ModelSpec",
    "HardwareSpec",
    "Layout",
    "RECOMPUTE_MODES",
    "layout_errors",
    "layout_spec_for",
    "micro_batches",
    "enumerate_layouts",
    "parameter_counts",
    "activation_bytes_per_layer",
    "model_flops",
    "estimate",
    "estimate_layouts",
    "CPU_HARDWARE",
    "model_spec_from_config",
    "layout_config",
    "run_layouts",
    "LayoutRuns",
    "LayoutTable",
]

RECOMPUTE_MODES = ("none", "selective", "full")
GB = 1024 ** 3


def _divisors(n: int) -> List[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def _pos_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A GPT model and its batch, as the tuner sees it.

    Attributes:
        num_layers: Transformer layers.
        hidden_size: Hidden size h.
        num_attention_heads: Attention heads a.
        seq_length: Sequence length s.
        vocab_size: Vocabulary size V (padded or not).
        num_query_groups: Key/value groups (grouped-query attention); default: one per head.
        ffn_hidden_size: MLP hidden size; default 4h.
        micro_batch_size: b.
        micro_batch_num: Micro batches per step per data-parallel rank (gradient accumulation).
        global_batch_size: If given, fixes the global batch: each layout then runs
            ``global_batch_size / (micro_batch_size * dp)`` micro batches (must divide).
        gated_linear_unit: SwiGLU-style MLP (two input projections).
        num_experts: MoE experts per layer (None or 0: dense).
        moe_router_topk: Experts per token k.
        moe_ffn_hidden_size: Expert MLP hidden size (default: ffn_hidden_size).
        untie_embeddings_and_output_weights: Separate output layer weights.
        position_embedding_type: 'learned_absolute' (adds s h parameters) or 'rope'.
        param_bytes: Bytes per weight (2 for bf16/fp16, 4 for fp32).
        grad_bytes: Bytes per gradient (4: fp32 main grads).
        optimizer_bytes: Optimizer state bytes per parameter (12: fp32 master + Adam m, v;
            use 8 when the weights are fp32 already).
        activation_bytes: Bytes per activation element (2; the published constants assume 2).
        context_parallel_algo: The config's ``parallel_config.context_parallel_algo`` (the layout
            rules depend on it: the Ulysses degree must divide the heads per tp rank).
        ulysses_degree_in_cp: The config's ``ulysses_degree_in_cp`` (hybrid_cp_algo).
        optimizer_type: The config's ``optimizer_config.optimizer_type`` (the distributed
            optimizer needs an Adam-family one); None: not checked.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    micro_batch_size: int = 1
    micro_batch_num: int = 1
    global_batch_size: Optional[int] = None
    gated_linear_unit: bool = False
    num_experts: Optional[int] = None
    moe_router_topk: int = 1
    moe_ffn_hidden_size: Optional[int] = None
    untie_embeddings_and_output_weights: bool = False
    position_embedding_type: str = "learned_absolute"
    param_bytes: int = 2
    grad_bytes: int = 4
    optimizer_bytes: int = 12
    activation_bytes: int = 2
    context_parallel_algo: str = "ulysses_cp_algo"
    ulysses_degree_in_cp: Optional[int] = None
    optimizer_type: Optional[str] = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "micro_batch_size", "micro_batch_num", "moe_router_topk"):
            _pos_int(name, getattr(self, name))
        for name in ("num_query_groups", "ffn_hidden_size", "global_batch_size", "moe_ffn_hidden_size"):
            if getattr(self, name) is not None:
                _pos_int(name, getattr(self, name))
        if self.num_experts is not None and self.num_experts != 0:
            _pos_int("num_experts", self.num_experts)
            if self.moe_router_topk > self.num_experts:
                raise ValueError(f"moe_router_topk must be <= num_experts ({self.num_experts}), "
                                 f"got {self.moe_router_topk}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                             f"num_query_groups ({self.groups})")
        if self.position_embedding_type not in ("learned_absolute", "rope", "none"):
            raise ValueError("position_embedding_type must be 'learned_absolute', 'rope' or 'none', "
                             f"got {self.position_embedding_type!r}")
        if self.context_parallel_algo not in CONTEXT_PARALLEL_ALGOS:
            raise ValueError(f"context_parallel_algo must be one of {list(CONTEXT_PARALLEL_ALGOS)}, "
                             f"got {self.context_parallel_algo!r}")
        for name in ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")

    # derived sizes
    @property
    def groups(self) -> int:
        """Key/value groups g."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn(self) -> int:
        """MLP hidden size f."""
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def expert_ffn(self) -> int:
        """Expert MLP hidden size."""
        return self.moe_ffn_hidden_size or self.ffn

    @property
    def kv_channels(self) -> int:
        """Total key (or value) width: g * h / a."""
        return self.groups * self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        """Whether layers have experts."""
        return bool(self.num_experts)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelSpec":
        """Build from a flat dict of config fields; known aliases: ``num_moe_experts`` /
        ``expert_num`` (num_experts), ``moe_topk`` / ``num_experts_chosen`` (moe_router_topk),
        ``padded_vocab_size`` (vocab_size), ``ffn_hidden`` (ffn_hidden_size). Other keys are ignored."""
        aliases = {"num_moe_experts": "num_experts", "expert_num": "num_experts", "moe_topk": "moe_router_topk",
                   "num_experts_chosen": "moe_router_topk", "padded_vocab_size": "vocab_size",
                   "ffn_hidden": "ffn_hidden_size", "group_query_num": "num_query_groups"}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            key = aliases.get(key, key)
            if key in names and value is not None:
                kwargs[key] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class HardwareSpec:
    """Device and network parameters of the estimate (defaults: an Ascend 910B-class node).

    Attributes:
        peak_flops: Peak FLOP/s of one device for the training dtype.
        flops_efficiency: Fraction of the peak the matmuls reach.
        intra_node_bandwidth: Bytes/s per rank for collectives inside a node.
        inter_node_bandwidth: Bytes/s per rank for collectives across nodes.
        devices_per_node: Devices in one node.
        memory_gb: Device memory (GiB); None: no ``fits`` check.
    """

    peak_flops: float = 280e12
    flops_efficiency: float = 0.5
    intra_node_bandwidth: float = 100e9
    inter_node_bandwidth: float = 25e9
    devices_per_node: int = 8
    memory_gb: Optional[float] = 64.0

    def __post_init__(self):
        for name in ("peak_flops", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.flops_efficiency <= 1:
            raise ValueError(f"flops_efficiency must be in (0, 1], got {self.flops_efficiency!r}")
        _pos_int("devices_per_node", self.devices_per_node)

    def bandwidth(self, span: int) -> float:
        """Bandwidth for a group whose ranks span ``span`` consecutive global ranks."""
        return self.intra_node_bandwidth if span <= self.devices_per_node else self.inter_node_bandwidth


@dataclass(frozen=True)
class Layout:
    """One parallel layout. ``tp * pp * cp * dp`` is the number of workers; ep splits dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"

    @property
    def world_size(self) -> int:
        """tp * pp * cp * dp."""
        return self.tp * self.pp * self.cp * self.dp

    @property
    def name(self) -> str:
        """A short label, e.g. ``tp2 pp2 dp1 vpp2 sp do rc=full``."""
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.distributed_optimizer:
            parts.append("do")
        if self.recompute != "none":
            parts.append(f"rc={self.recompute}")
        return " ".join(parts)


def micro_batches(model: ModelSpec, layout: Layout) -> int:
    """Micro batches per step per data-parallel rank for this layout."""
    if model.global_batch_size is None:
        return model.micro_batch_num
    return model.global_batch_size // (model.micro_batch_size * layout.dp)


def layout_spec_for(model: ModelSpec, workers: int, layout: Layout) -> LayoutSpec:
    """The numbers the engine's layout rules read (:mod:`mindspeed_ms.core.config.layout_rules`),
    for ``layout`` of ``model`` on ``workers`` workers: the same record
    ``validate_for_world_size`` builds from the config :func:`layout_config` makes."""
    return LayoutSpec(
        world_size=workers, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=bool(layout.sequence_parallel), context_parallel_algo=model.context_parallel_algo,
        ulysses_degree_in_cp=model.ulysses_degree_in_cp,
        use_distributed_optimizer=bool(layout.distributed_optimizer), optimizer_type=model.optimizer_type,
        num_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn,
        moe_ffn_hidden_size=model.expert_ffn if model.is_moe else None, vocab_size=model.vocab_size,
        seq_length=model.seq_length, num_experts=model.num_experts or 1,
        # a global batch that does not split over dp has no micro-batch count (layout_errors says so)
        micro_batch_num=None if model.global_batch_size is not None
        and model.global_batch_size % (model.micro_batch_size * layout.dp) else micro_batches(model, layout))


def layout_errors(model: ModelSpec, workers: int, layout: Layout) -> List[str]:
    """Why ``layout`` is not valid for ``model`` on ``workers`` workers (empty list: valid).

    The layout rules are the engine's own (:func:`mindspeed_ms.core.config.layout_rules.check_layout`,
    which ``validate_for_world_size`` applies before every launch), so a layout listed here is
    one the builder, the CLI and the workers accept. The tuner adds its own: the sizes are
    integers >= 1, ``tp*pp*cp*dp == workers``, a fixed global batch divisible by
    ``micro_batch_size * dp``, and a recompute mode of :data:`RECOMPUTE_MODES`.
    """
    errors = []
    t, p, d, c, e, v = layout.tp, layout.pp, layout.dp, layout.cp, layout.ep, layout.vpp
    for name, value in (("tp", t), ("pp", p), ("dp", d), ("cp", c), ("ep", e), ("vpp", v)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(f"{name} must be an integer >= 1, got {value!r}")
    if errors:
        return errors
    if t * p * c * d != workers:
        errors.append(f"tp*pp*cp*dp = {t}*{p}*{c}*{d} = {t * p * c * d} must equal workers ({workers})")
    if model.global_batch_size is not None and model.global_batch_size % (model.micro_batch_size * d):
        errors.append(f"global_batch_size ({model.global_batch_size}) must be divisible by "
                      f"micro_batch_size*dp ({model.micro_batch_size}*{d})")
    errors.extend(check_layout(layout_spec_for(model, workers, layout)).problems)
    if layout.recompute not in RECOMPUTE_MODES:
        errors.append(f"recompute must be one of {RECOMPUTE_MODES}, got {layout.recompute!r}")
    return errors


def enumerate_layouts(model: ModelSpec, workers: int, *, recompute: Iterable[str] = RECOMPUTE_MODES,
                      sequence_parallel: Iterable[bool] = (False, True),
                      distributed_optimizer: Iterable[bool] = (False, True),
                      max_vpp: Optional[int] = None) -> List[Layout]:
    """Every valid layout for ``workers`` workers (see :func:`layout_errors`).

    Options that change nothing are not repeated: sequence parallelism only with tp > 1, the
    distributed optimizer only with a data-parallel group (dp*cp > 1).

    Args:
        model: The model.
        workers: Number of workers.
        recompute: Recompute modes to include.
        sequence_parallel: Values to include.
        distributed_optimizer: Values to include.
        max_vpp: Largest virtual pipeline size (default: no limit).
    """
    _pos_int("workers", workers)
    recompute = list(recompute)
    for mode in recompute:
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must contain only {RECOMPUTE_MODES}, got {mode!r}")
    sp_values, do_values = list(sequence_parallel), list(distributed_optimizer)
    out = []
    experts = model.num_experts or 1
    for t in _divisors(workers):
        for p in _divisors(workers // t):
            for c in _divisors(workers // (t * p)):
                d = workers // (t * p * c)
                for e in _divisors(min(d, experts)):
                    vpps = [1] + [v for v in range(2, model.num_layers // p + 1) if p > 1]
                    for v in vpps:
                        if max_vpp is not None and v > max_vpp:
                            continue
                        for sp in sp_values:
                            if sp and t == 1:
                                continue
                            for do in do_values:
                                if do and d * c == 1:
                                    continue
                                for rc in recompute:
                                    layout = Layout(t, p, d, c, e, v, sp, do, rc)
                                    if not layout_errors(model, workers, layout):
                                        out.append(layout)
    return out


def parameter_counts(model: ModelSpec) -> Dict[str, int]:
    """Parameters by part (no biases besides the norms').

    Returns:
        ``attention`` (per layer: ``2 h^2 + 2 h kv``), ``mlp`` (per layer: ``(2|3) h f`` or, for
        MoE, ``E (2|3) h f_e + h E`` with the router), ``norms`` (per layer: ``4 h``),
        ``layer`` (their sum), ``embedding`` (``V h`` + ``s h`` if learned positions),
        ``output`` (``V h`` if untied, else 0), ``final_norm`` (``2 h``), ``total``, and
        ``expert`` (all expert weights of the model).
    """
    h = model.hidden_size
    attention = 2 * h * h + 2 * h * model.kv_channels
    mult = 3 if model.gated_linear_unit else 2
    if model.is_moe:
        expert_one = mult * h * model.expert_ffn
        mlp = model.num_experts * expert_one + h * model.num_experts
        expert_total = model.num_layers * model.num_experts * expert_one
    else:
        mlp = mult * h * model.ffn
        expert_total = 0
    norms = 4 * h
    layer = attention + mlp + norms
    embedding = model.vocab_size * h + (model.seq_length * h if model.position_embedding_type == "learned_absolute" else 0)
    output = model.vocab_size * h if model.untie_embeddings_and_output_weights else 0
    final_norm = 2 * h
    total = model.num_layers * layer + embedding + output + final_norm
    return {"attention": attention, "mlp": mlp, "norms": norms, "layer": layer, "embedding": embedding,
            "output": output, "final_norm": final_norm, "total": total, "expert": expert_total}


def activation_bytes_per_layer(model: ModelSpec, tp: int = 1, sequence_parallel: bool = False, cp: int = 1,
                               recompute: str = "none") -> float:
    """Activation memory of one layer for one micro batch (bytes), Korthikanti et al. 2022.

    With s' = s/cp, kv the key width and f the ffn size:
    replicated part ``10 s' b h`` (two norm inputs, QKV and fc1 inputs, two dropout masks) and
    split part ``2 s'bh (Q) + 4 s'b kv (K, V) + 2 s'bh (projection input) + k (4|8) s'b f (MLP
    inner; 8 with a gated unit; k experts per token) + 5 a s'^2 b (attention scores)``; for
    ffn = 4h, kv = h, k = 1 this is the paper's ``10 + 24/t`` and ``5 a s/(h t)``. Without SP:
    replicated + split/t; with SP: (replicated + split)/t. Selective recompute removes the
    scores term; full recompute keeps only the layer input, ``2 s'bh`` (/t with SP). Scaled by
    ``activation_bytes / 2``.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    s = model.seq_length / cp
    b, h, a = model.micro_batch_size, model.hidden_size, model.num_attention_heads
    scale = model.activation_bytes / 2
    if recompute == "full":
        stored = 2 * s * b * h
        return scale * (stored / tp if sequence_parallel else stored)
    if model.is_moe:
        inner = model.moe_router_topk * (8 if model.gated_linear_unit else 4) * s * b * model.expert_ffn
    else:
        inner = (8 if model.gated_linear_unit else 4) * s * b * model.ffn
    replicated = 10 * s * b * h
    split = 2 * s * b * h + 4 * s * b * model.kv_channels + 2 * s * b * h + inner
    scores = 0.0 if recompute == "selective" else 5 * a * s * s * b
    if sequence_parallel:
        total = (replicated + split + scores) / tp
    else:
        total = replicated + (split + scores) / tp
    return scale * total


def model_flops(model: ModelSpec, global_batch: int) -> Dict[str, float]:
    """FLOPs of one training step (forward + backward) over ``global_batch`` sequences.

    Returns:
        ``model`` (``3 T (l (2 P_mm + 4 s h) + 2 h V)``, T = global_batch * s: equal to
        ``72 B s l h^2 (1 + s/(6h) + V/(12 l h))`` for the standard GPT), ``forward_layers``
        (one forward of all layers), ``attention_core`` (one forward of the attention scores and
        weighted sum, ``4 T s h l``).
    """
    h, s, l = model.hidden_size, model.seq_length, model.num_layers
    mult = 3 if model.gated_linear_unit else 2
    attn_mm = 2 * h * h + 2 * h * model.kv_channels
    if model.is_moe:
        mlp_mm = model.moe_router_topk * mult * h * model.expert_ffn + h * model.num_experts
    else:
        mlp_mm = mult * h * model.ffn
    tokens = global_batch * s
    core = 4 * tokens * s * h * l
    layers_fwd = 2 * tokens * (attn_mm + mlp_mm) * l + core
    logits_fwd = 2 * tokens * h * model.vocab_size
    return {"model": 3.0 * (layers_fwd + logits_fwd), "forward_layers": float(layers_fwd),
            "attention_core": float(core)}


def _allreduce(n: int, size: float) -> float:
    return 2.0 * (n - 1) / n * size if n > 1 else 0.0


def _gather(n: int, size: float) -> float:
    return (n - 1) / n * size if n > 1 else 0.0


def estimate(model: ModelSpec, layout: Layout, hardware: Optional[HardwareSpec] = None) -> Dict[str, Any]:
    """Per-rank memory and step-time estimate of one layout (see the module docstring).

    Returns:
        A flat dict: the layout fields, ``layout`` (name), ``micro_batches``, ``params_per_rank``,
        ``weights_gb``, ``grads_gb``, ``optimizer_gb``, ``activations_gb``, ``total_gb`` (the
        pipeline stage with the largest total), ``fits``, ``model_tflop`` and ``hardware_tflop``
        per step, ``compute_s``, ``bubble_fraction``, ``tp_comm_gb`` ... ``ep_comm_gb`` (bytes
        sent per rank per step), ``tp_comm_s`` ... ``ep_comm_s``, ``comm_s``, ``step_time_s``,
        ``tokens_per_s``, ``mfu``.

    Raises:
        ValueError: For an invalid layout (the message lists every broken rule).
    """
    hardware = hardware or HardwareSpec()
    workers = layout.world_size
    errors = layout_errors(model, workers, layout)
    if errors:
        raise ValueError(f"invalid layout {layout.name}: " + "; ".join(errors))
    t, p, d, c, e, v = layout.tp, layout.pp, layout.dp, layout.cp, layout.ep, layout.vpp
    m = micro_batches(model, layout)
    b, s, h = model.micro_batch_size, model.seq_length, model.hidden_size
    counts = parameter_counts(model)
    layers_per_stage = model.num_layers // p

    # --- parameters on one rank of the first and of the last stage -----------------------------
    if model.is_moe:
        mult = 3 if model.gated_linear_unit else 2
        expert_layer = model.num_experts * mult * h * model.expert_ffn
        dense_layer = counts["attention"] / t + h * model.num_experts + counts["norms"]
        expert_rank_layer = expert_layer / (e * t)
    else:
        dense_layer = (counts["attention"] + counts["mlp"]) / t + counts["norms"]
        expert_rank_layer = 0.0
    pos = s * h if model.position_embedding_type == "learned_absolute" else 0
    vocab_rank = model.vocab_size * h / t
    stage_dense = layers_per_stage * dense_layer
    stage_expert = layers_per_stage * expert_rank_layer
    first_extra = vocab_rank + pos
    last_extra = counts["final_norm"] + (vocab_rank if (model.untie_embeddings_and_output_weights or p > 1) else 0)
    if p == 1:
        first_extra = vocab_rank + pos + counts["final_norm"] + (vocab_rank if model.untie_embeddings_and_output_weights else 0)
        last_extra = first_extra

    # --- activations -------------------------------------------------------------------------
    per_layer = activation_bytes_per_layer(model, t, layout.sequence_parallel, c, layout.recompute)
    in_flight = min(p, m) if p > 1 else 1
    interleave = 1 + (p - 1) / (p * v) if v > 1 else 1.0
    working = (activation_bytes_per_layer(model, t, layout.sequence_parallel, c, "none")
               if layout.recompute == "full" else 0.0)
    logits = 4 * (s / c) * b * model.vocab_size / t * (model.activation_bytes / 2)
    act_first = per_layer * layers_per_stage * in_flight * interleave + working
    act_last = per_layer * layers_per_stage + working + logits
    if p == 1:
        act_first = act_last

    dp_dense = d * c
    dp_expert = max(1, d // e)

    def stage(dense_params, expert_params, act):
        params = dense_params + expert_params
        weights = params * model.param_bytes
        grads = params * model.grad_bytes
        if layout.distributed_optimizer:
            optim = model.optimizer_bytes * (dense_params / dp_dense + expert_params / dp_expert)
        else:
            optim = model.optimizer_bytes * params
        return {"params": params, "dense": dense_params, "expert": expert_params, "weights": weights,
                "grads": grads, "optimizer": optim, "activations": act,
                "total": weights + grads + optim + act}

    first = stage(stage_dense + first_extra, stage_expert, act_first)
    last = stage(stage_dense + last_extra, stage_expert, act_last)
    peak = max((first, last), key=lambda st: st["total"])

    # --- compute -----------------------------------------------------------------------------
    global_batch = b * m * d
    flops = model_flops(model, global_batch)
    hw_flops = flops["model"]
    if layout.recompute == "full":
        hw_flops += flops["forward_layers"]
    elif layout.recompute == "selective":
        hw_flops += flops["attention_core"]
    bubble = (p - 1) / (m * v) if p > 1 else 0.0
    compute_s = hw_flops / (workers * hardware.peak_flops * hardware.flops_efficiency) * (1 + bubble)

    # --- communication (bytes sent per rank per step) ----------------------------------------
    act_bytes = model.activation_bytes
    s_local = s / c
    act = b * s_local * h * act_bytes
    tp_collectives = 4 + (2 if layout.recompute == "full" else 0)
    tp_bytes = m * layers_per_stage * tp_collectives * _allreduce(t, act)
    kv_chunk = 2 * b * s_local * (model.kv_channels / t) * act_bytes
    cp_passes = 3 + (1 if layout.recompute == "full" else 0)
    cp_bytes = m * layers_per_stage * cp_passes * (c - 1) * kv_chunk if c > 1 else 0.0
    pp_bytes = 2 * m * v * b * s_local * h * act_bytes / t if p > 1 else 0.0
    dense_grad = peak["dense"]
    expert_grad = peak["expert"]
    if layout.distributed_optimizer:
        dp_bytes = (_gather(dp_dense, dense_grad * model.grad_bytes) + _gather(dp_dense, dense_grad * model.param_bytes)
                    + _gather(dp_expert, expert_grad * model.grad_bytes)
                    + _gather(dp_expert, expert_grad * model.param_bytes))
    else:
        dp_bytes = _allreduce(dp_dense, dense_grad * model.grad_bytes) + _allreduce(dp_expert, expert_grad * model.grad_bytes)
    routed = b * s_local * model.moe_router_topk * h * act_bytes / (t if layout.sequence_parallel else 1)
    ep_bytes = m * layers_per_stage * 4 * _gather(e, routed) if (model.is_moe and e > 1) else 0.0

    spans = {"tp": t, "cp": t * c, "ep": t * c * e, "dp": t * c * d, "pp": t * c * d * p}
    comm = {"tp": tp_bytes, "cp": cp_bytes, "pp": pp_bytes, "dp": dp_bytes, "ep": ep_bytes}
    comm_s = {k: vbytes / hardware.bandwidth(spans[k]) for k, vbytes in comm.items()}
    step_time = compute_s + sum(comm_s.values())
    tokens = global_batch * s

    row: Dict[str, Any] = {
        "layout": layout.name, "tp": t, "pp": p, "dp": d, "cp": c, "ep": e, "vpp": v,
        "sequence_parallel": layout.sequence_parallel, "distributed_optimizer": layout.distributed_optimizer,
        "recompute": layout.recompute, "micro_batches": m, "global_batch": global_batch,
        "params_total": counts["total"], "params_per_rank": peak["params"],
        "weights_gb": peak["weights"] / GB, "grads_gb": peak["grads"] / GB, "optimizer_gb": peak["optimizer"] / GB,
        "activations_gb": peak["activations"] / GB, "total_gb": peak["total"] / GB,
        "fits": None if hardware.memory_gb is None else bool(peak["total"] / GB <= hardware.memory_gb),
        "model_tflop": flops["model"] / 1e12, "hardware_tflop": hw_flops / 1e12,
        "compute_s": compute_s, "bubble_fraction": bubble,
    }
    for key in ("tp", "cp", "pp", "dp", "ep"):
        row[f"{key}_comm_gb"] = comm[key] / GB
    for key in ("tp", "cp", "pp", "dp", "ep"):
        row[f"{key}_comm_s"] = comm_s[key]
    row["comm_s"] = sum(comm_s.values())
    row["step_time_s"] = step_time
    row["tokens_per_s"] = tokens / step_time
    row["mfu"] = flops["model"] / step_time / (workers * hardware.peak_flops)
    return row


def estimate_layouts(model: ModelSpec, workers: int, hardware: Optional[HardwareSpec] = None,
                     layouts: Optional[Sequence[Layout]] = None, sort_by: str = "tokens_per_s",
                     ascending: Optional[bool] = None, only_fitting: bool = False,
                     **enumerate_kwargs) -> pd.DataFrame:
    """Estimates of every valid layout (or of ``layouts``) as a DataFrame.

    Args:
        model: The model.
        workers: Number of workers.
        hardware: Device and network parameters (default :class:`HardwareSpec`).
        layouts: Layouts to estimate (default: :func:`enumerate_layouts`).
        sort_by: Column to sort by; any column of :func:`estimate`'s result. The default,
            throughput, is the fair comparison when ``global_batch_size`` is not fixed (then the
            global batch, and so the step time, grows with dp).
        ascending: Sort order (default: descending for tokens_per_s and mfu, else ascending).
        only_fitting: Drop layouts whose total memory exceeds ``hardware.memory_gb``.
        **enumerate_kwargs: Passed to :func:`enumerate_layouts` (recompute, sequence_parallel,
            distributed_optimizer, max_vpp).

    Returns:
        One row per layout, index 0..n-1.

    Raises:
        ValueError: For an unknown ``sort_by`` column or an invalid given layout.
    """
    hardware = hardware or HardwareSpec()
    if layouts is None:
        layouts = enumerate_layouts(model, workers, **enumerate_kwargs)
    rows = [estimate(model, layout, hardware) for layout in layouts]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if sort_by not in df.columns:
        raise ValueError(f"sort_by must be one of the columns {list(df.columns)}, got {sort_by!r}")
    if only_fitting and hardware.memory_gb is not None:
        df = df[df["fits"]]
    if ascending is None:
        ascending = sort_by not in ("tokens_per_s", "mfu")
    return df.sort_values(sort_by, ascending=ascending, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# Real runs next to the estimates
# ------------------------------------------------------------------------------------------------

#: A rough CPU "device" for estimating the lab's own CPU runs: the numbers only need to rank the
#: layouts and be of the right order, measured runs are shown next to them.
CPU_HARDWARE = HardwareSpec(peak_flops=5e10, flops_efficiency=0.2, intra_node_bandwidth=2e9,
                            inter_node_bandwidth=1e9, devices_per_node=64, memory_gb=None)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _all_config(config: Any):
    """An AllConfig from an AllConfig, a dict of sections, a preset name or a YAML path (a copy)."""
    from mindspeed_ms.core.config import AllConfig, init_configs_from_dict  # pylint: disable=import-outside-toplevel

    from . import presets  # pylint: disable=import-outside-toplevel

    if isinstance(config, AllConfig):
        return config.copy()
    if isinstance(config, Mapping):
        return init_configs_from_dict(dict(config))
    if isinstance(config, str) and config in presets.preset_names():
        return init_configs_from_dict(presets.load_preset(config))
    if isinstance(config, (str, os.PathLike)):
        import yaml  # pylint: disable=import-outside-toplevel

        with open(config, encoding="utf-8") as handle:
            return init_configs_from_dict(yaml.safe_load(handle) or {})
    raise TypeError(f"config: got a {type(config).__name__}; allowed: an AllConfig, a dict of sections, a preset "
                    "name or a YAML path")


def model_spec_from_config(config: Any, global_batch_size: Optional[int] = None) -> ModelSpec:
    """The tuner's view of a config (AllConfig, dict of sections, preset name or YAML path).

    Byte sizes follow the config's dtypes: float32 parameters take 4 bytes, their gradients 4 and
    Adam's two moments 8 (no separate master copy); 16-bit parameters take 2, fp32 gradients 4
    and 12 for the master copy and moments. Activations take the compute dtype's size.

    Args:
        config: The config.
        global_batch_size: Fix the global batch (each layout then runs
            ``global / (micro_batch_size * dp)`` micro batches); default: not fixed.
    """
    all_config = _all_config(config)
    mc, dc, moe = all_config.model_config, all_config.dataset_config, all_config.moe_config
    params = _DTYPE_BYTES.get(str(mc.params_dtype), 4)
    compute = _DTYPE_BYTES.get(str(mc.compute_dtype), 4)
    experts = int(moe.num_experts) if moe.num_experts and moe.num_experts > 1 else None
    position = {"absolute": "learned_absolute", "rope": "rope"}.get(str(mc.position_embedding_type), "none")
    return ModelSpec(
        num_layers=int(mc.num_layers), hidden_size=int(mc.hidden_size),
        num_attention_heads=int(mc.num_attention_heads), seq_length=int(mc.seq_length),
        vocab_size=int(mc.vocab_size),
        num_query_groups=int(mc.num_query_groups) if mc.group_query_attention else None,
        ffn_hidden_size=int(mc.ffn_hidden_size), micro_batch_size=int(dc.batch_size),
        micro_batch_num=int(dc.micro_batch_num), global_batch_size=global_batch_size,
        gated_linear_unit=bool(mc.is_gated_mlp), num_experts=experts,
        moe_router_topk=int(moe.moe_router_topk) if experts else 1,
        untie_embeddings_and_output_weights=bool(mc.untie_embeddings_and_output_weights),
        position_embedding_type=position, param_bytes=params, grad_bytes=4,
        optimizer_bytes=8 if params == 4 else 12, activation_bytes=compute,
        context_parallel_algo=str(all_config.parallel_config.context_parallel_algo),
        ulysses_degree_in_cp=all_config.parallel_config.ulysses_degree_in_cp,
        optimizer_type=str(all_config.optimizer_config.optimizer_type))


def layout_config(config: Any, layout: Layout, global_batch_size: Optional[int] = None):
    """A copy of ``config`` set up for ``layout``.

    Sets the tensor/pipeline/context/expert/virtual-pipeline sizes, sequence parallelism, the
    distributed optimizer and recomputation ('full': every layer, 'selective': the attention
    core). With ``global_batch_size`` the micro batches per step become ``global /
    (batch_size * dp)``, so every layout trains on the same samples per step.

    Raises:
        ValueError: When the global batch does not split over the layout's data-parallel ranks.
    """
    all_config = _all_config(config)
    dc = all_config.dataset_config
    if global_batch_size is not None:
        per_step = int(dc.batch_size) * layout.dp
        if global_batch_size % per_step:
            raise ValueError(f"global_batch_size: got {global_batch_size}; allowed: a multiple of batch_size * dp "
                             f"= {dc.batch_size} * {layout.dp} = {per_step} for layout {layout.name}")
        dc.micro_batch_num = global_batch_size // per_step
    all_config.parallel_config.update(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        sequence_parallel=layout.sequence_parallel)
    all_config.training_config.use_distributed_optimizer = layout.distributed_optimizer
    if layout.recompute == "full":
        all_config.model_config.update(recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1)
    elif layout.recompute == "selective":
        all_config.model_config.update(recompute_granularity="selective", recompute_method=None,
                                       recompute_num_layers=None)
    else:
        all_config.model_config.update(recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    all_config.validate()
    return all_config


def _as_layout(value: Any) -> Layout:
    if isinstance(value, Layout):
        return value
    if isinstance(value, Mapping):
        return Layout(**dict(value))
    raise TypeError(f"layouts: got a {type(value).__name__}; allowed: Layout objects or dicts of Layout fields")


@dataclass
class LayoutRuns:
    """Results of :func:`run_layouts`.

    Attributes:
        table: One row per layout: ``layout``, ``status``, the estimates (``est_step_time_s``,
            ``est_memory_gb``, ``est_tokens_per_s``), the measurements (``step_time_s``: median
            over the steps after the first, which includes one-time set-up; ``tokens_per_s``;
            ``peak_rss_gb``: the largest resident memory of one worker, MindSpore's own ~0.5 GB
            included), ``first_loss``, ``final_loss``, ``max_loss_diff`` (largest difference to the
            first layout's loss curve), ``run_dir`` and ``error``.
        curves: Loss per step (rows) and layout (columns).
        jobs: The finished jobs by layout name.
        estimates: The estimator's full rows for the layouts.
    """

    table: pd.DataFrame
    curves: pd.DataFrame
    jobs: Dict[str, Any]
    estimates: pd.DataFrame

    def max_loss_diff(self) -> float:
        """Largest absolute difference between any layout's loss and the first layout's, over all steps."""
        if self.curves.empty or self.curves.shape[1] < 2:
            return 0.0
        base = self.curves.iloc[:, 0]
        return float(self.curves.sub(base, axis=0).abs().max().max())

    def same_loss(self, atol: float = 1e-3) -> bool:
        """Whether every layout's loss curve matches the first one's within ``atol`` at every step
        (runs from the same weights and data differ only by floating-point summation order)."""
        if self.curves.isna().any().any():
            return False
        return self.max_loss_diff() <= atol


def run_layouts(config: Any, layouts: Sequence[Any], *, steps: int = 6, global_batch_size: Optional[int] = None,
                hardware: Optional[HardwareSpec] = None, runs_root: Optional[Union[str, os.PathLike]] = None,
                timeout_s: float = 900.0, device_target: str = "CPU", memory_interval_s: float = 0.25,
                on_start=None) -> LayoutRuns:
    """Run short real jobs for some layouts, one after the other, and put them next to the estimates.

    Every run starts from the same weights (``use_cpu_initialization``: the full weights are drawn
    from one seed and then split, whatever the layout) and sees the same samples (a fixed global
    batch), so their loss curves must agree: that is what makes a faster layout trustworthy.

    Args:
        config: The model (AllConfig, dict of sections, preset name or YAML path).
        layouts: :class:`Layout` objects (or dicts of their fields); all need the same number of
            workers (``tp * pp * cp * dp``).
        steps: Training steps per run.
        global_batch_size: Samples per step for every layout (default: ``batch_size *
            micro_batch_num * dp`` of the config for the layout with the largest dp).
        hardware: For the estimates (default :data:`CPU_HARDWARE`).
        runs_root: Where the run directories go (default ``./runs``).
        timeout_s: Per run.
        device_target: Given to the launcher.
        memory_interval_s: RSS sampling period.
        on_start: Called with ``(layout, job)`` when a run starts (e.g. to show a dashboard).

    Returns:
        A :class:`LayoutRuns`.

    Raises:
        ValueError: No layouts, layouts with different worker counts, or a layout the estimator
            rejects (the message lists every broken rule).
    """
    from . import presets  # pylint: disable=import-outside-toplevel
    from .events import EventReader, step_summary  # pylint: disable=import-outside-toplevel
    from .launcher import Job  # pylint: disable=import-outside-toplevel
    from .monitor import WorkerMemoryMonitor  # pylint: disable=import-outside-toplevel

    layouts = [_as_layout(v) for v in layouts]
    if not layouts:
        raise ValueError("layouts: got an empty list; allowed: at least one Layout")
    workers = {layout.world_size for layout in layouts}
    if len(workers) != 1:
        raise ValueError(f"layouts: got worker counts {sorted(workers)}; allowed: layouts with one tp*pp*cp*dp")
    workers_n = workers.pop()
    _pos_int("steps", steps)
    base = _all_config(config)
    base.parallel_config.use_cpu_initialization = True
    if global_batch_size is None:
        global_batch_size = int(base.dataset_config.batch_size) * int(base.dataset_config.micro_batch_num) * \
            max(layout.dp for layout in layouts)
    spec = model_spec_from_config(base, global_batch_size=global_batch_size)
    hardware = hardware or CPU_HARDWARE
    estimates = estimate_layouts(spec, workers_n, hardware=hardware, layouts=layouts, sort_by="step_time_s")
    est_by_name = {row["layout"]: row for _, row in estimates.iterrows()}

    rows, curves, jobs = [], {}, {}
    for layout in layouts:
        cfg = layout_config(base, layout, global_batch_size)
        presets.shrink(cfg, steps)  # also keeps the warm-up shorter than the run
        cfg.training_config.eval_interval = None  # evaluation would only make the runs longer
        name = "layout-" + layout.name.replace(" ", "-").replace("=", "")
        job = Job(cfg, workers=workers_n, name=name, runs_root=runs_root, device_target=device_target)
        monitor = WorkerMemoryMonitor(job, interval_s=memory_interval_s)
        job.start()
        monitor.start()
        if on_start is not None:
            on_start(layout, job)
        try:
            status = job.wait(timeout=timeout_s, stop_on_timeout=True)
        except TimeoutError:
            status = job.status
        finally:
            monitor.stop()
        jobs[layout.name] = job
        reader = EventReader(job.events_dir)
        reader.poll()
        summary = step_summary(reader.steps)
        est = est_by_name[layout.name]
        later = summary[summary["step"] > 1]
        step_ms = float(later["step_time_ms"].median()) if len(later) else float("nan")
        tokens = float(later["tokens_per_s"].median()) if len(later) else float("nan")
        losses = summary.set_index("step")["loss"] if not summary.empty else pd.Series(dtype="float64")
        curves[layout.name] = losses
        peak = monitor.peak_rss_bytes
        rows.append({
            "layout": layout.name, "status": status,
            "est_step_time_s": float(est["step_time_s"]), "est_memory_gb": float(est["total_gb"]),
            "est_tokens_per_s": float(est["tokens_per_s"]),
            "step_time_s": step_ms / 1000.0, "tokens_per_s": tokens,
            "peak_rss_gb": peak / GB if peak is not None else float("nan"),
            "first_loss": float(losses.iloc[0]) if len(losses) else float("nan"),
            "final_loss": float(losses.iloc[-1]) if len(losses) else float("nan"),
            "run_dir": str(job.run_dir), "error": job.error_summary,
        })
    curve_frame = pd.DataFrame(curves)
    curve_frame.index.name = "step"
    table = pd.DataFrame(rows)
    if not curve_frame.empty:
        first = curve_frame.iloc[:, 0]
        table["max_loss_diff"] = [float((curve_frame[name] - first).abs().max()) for name in curve_frame.columns]
    return LayoutRuns(table=table, curves=curve_frame, jobs=jobs, estimates=estimates)


class LayoutTable:
    """The estimates as an interactive table: pick the column to sort by, the direction, and
    whether to show only the layouts that fit in memory (ipywidgets; drivable from code).

    ``display(LayoutTable(table))`` in a notebook shows a *sort by* dropdown, an *order* toggle, a
    *only layouts that fit* checkbox and the table (HTML, ``rows`` rows). From code:
    ``t.sort("total_gb", ascending=True)``, ``t.fits_only = True``, ``t.view`` (the DataFrame shown).

    Args:
        table: A frame from :func:`estimate_layouts` (any frame works; ``fits_only`` needs a
            ``fits`` column).
        columns: Columns to show (default: all); sorting may use any column of ``table``.
        sort_by: The first sort column.
        ascending: The first direction.
        rows: How many rows the HTML shows.

    Raises:
        ValueError: For a ``sort_by`` or a shown column that is not in ``table``.
    """

    def __init__(self, table: pd.DataFrame, columns: Optional[Sequence[str]] = None, sort_by: str = "step_time_s",
                 ascending: bool = True, rows: int = 20):
        unknown = [c for c in list(columns or []) + [sort_by] if c not in table.columns]
        if unknown:
            raise ValueError(f"columns: got {unknown}; allowed: columns of the table {list(table.columns)}")
        self.table = table
        self.columns = list(columns) if columns else list(table.columns)
        self.rows = int(rows)
        self.sort_by = sort_by
        self.ascending = bool(ascending)
        self._fits_only = False
        self._ui = None
        self._syncing = False

    @property
    def fits_only(self) -> bool:
        """Whether only the layouts that fit in memory are shown."""
        return self._fits_only

    @fits_only.setter
    def fits_only(self, value: bool) -> None:
        self._fits_only = bool(value)
        self._sync()

    @property
    def view(self) -> pd.DataFrame:
        """The rows and columns shown now (all rows, not only the first ``rows``)."""
        table = self.table
        if self.fits_only and "fits" in table.columns:
            table = table[table["fits"].astype(bool)]
        # mergesort: stable, so equal values keep the estimator's order
        table = table.sort_values(self.sort_by, ascending=self.ascending, kind="mergesort")
        return table[self.columns].reset_index(drop=True)

    def sort(self, column: str, ascending: Optional[bool] = None) -> "LayoutTable":
        """Sort by ``column`` (and set the direction when given); returns self."""
        if column not in self.table.columns:
            raise ValueError(f"sort_by: got {column!r}; allowed: columns of the table {list(self.table.columns)}")
        self.sort_by = column
        if ascending is not None:
            self.ascending = bool(ascending)
        self._sync()
        return self

    def html(self) -> str:
        """The first ``rows`` rows of :attr:`view` as an HTML table (numbers rounded to 4 digits)."""
        view = self.view
        shown = view.head(self.rows)
        note = f"<p>{len(shown)} of {len(view)} layouts, sorted by {self.sort_by} " \
               f"({'ascending' if self.ascending else 'descending'})</p>"
        return note + shown.to_html(index=False, float_format=lambda v: f"{v:.4g}")

    @property
    def ui(self):
        """The widget (built on first use)."""
        if self._ui is None:
            import ipywidgets as w  # pylint: disable=import-outside-toplevel
            self._sort_widget = w.Dropdown(options=list(self.table.columns), value=self.sort_by, description="sort by")
            self._order_widget = w.ToggleButtons(options=["ascending", "descending"],
                                                 value="ascending" if self.ascending else "descending",
                                                 description="order")
            self._fits_widget = w.Checkbox(value=self._fits_only, description="only layouts that fit",
                                           disabled="fits" not in self.table.columns)
            self._html_widget = w.HTML(self.html())

            def changed(_):
                if self._syncing:  # our own update of the widgets: the settings are already set
                    return
                self.sort_by = self._sort_widget.value
                self.ascending = self._order_widget.value == "ascending"
                self._fits_only = bool(self._fits_widget.value)
                self._html_widget.value = self.html()

            for widget in (self._sort_widget, self._order_widget, self._fits_widget):
                widget.observe(changed, names="value")
            self._ui = w.VBox([w.HBox([self._sort_widget, self._order_widget, self._fits_widget]),
                               self._html_widget])
        return self._ui

    def _sync(self) -> None:
        """Put the current settings into the widgets (when built) and redraw."""
        if self._ui is None:
            return
        self._syncing = True
        try:
            self._sort_widget.value = self.sort_by
            self._order_widget.value = "ascending" if self.ascending else "descending"
            self._fits_widget.value = self._fits_only
        finally:
            self._syncing = False
        self._html_widget.value = self.html()

    def _repr_mimebundle_(self, include=None, exclude=None):  # pylint: disable=unused-argument
        """In a notebook: the widget (HTML where widgets are not rendered)."""
        bundle = {"text/html": self.html(), "text/plain": f"LayoutTable({len(self.view)} layouts)"}
        try:
            bundle.update(self.ui._repr_mimebundle_())  # pylint: disable=protected-access
        except Exception:  # noqa: BLE001 - no widget front end: the HTML stands in
            pass
        return bundle
