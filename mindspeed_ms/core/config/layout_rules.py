"""The rules a parallel layout must follow: the one place that decides whether a layout can run.

A layout is the split of a model over ranks (tensor, pipeline, context, expert and data
parallelism, virtual pipeline chunks, sequence parallelism, the distributed optimizer). Whether
it can run depends on the model's sizes as well, so the rules read one flat record of plain
numbers, :class:`LayoutSpec`, which each caller fills from what it has:

* :func:`~mindspeed_ms.core.config.validate_for_world_size` (the trainer, the lab's builder and
  CLI) from the config sections;
* the context-parallel check that the model runs when it is built
  (:func:`mindspeed_ms.core.context_parallel.check_context_parallel_config`), with the sizes
  parallel_state really has;
* the lab's tuner (``mindspeed_lab.tuner.layout_errors`` and its enumeration), from its model
  description and a candidate layout.

so that a layout one of them accepts is accepted by all. Every message names the config fields
and their values. This module does not import MindSpore.

The rules (Megatron / MindSpeed-Core-MS semantics):

* ``tp * pp * cp`` divides the world size; the rest is data parallelism ``dp``.
* Expert parallelism: ``ep`` divides ``dp`` and the number of experts, needs MoE
  (``num_experts > 1``) and cannot be combined with context parallelism.
* MoE with tensor parallelism needs sequence parallelism when training (as in Megatron: the
  token dispatcher works on the sequence-parallel shards); a training config
  (:class:`~mindspeed_ms.core.config.AllConfig`) refuses it when it is loaded.
* Pipeline: the layers split evenly over the stages that hold layers (or ``num_layer_list``);
  virtual chunks (``virtual_pipeline_model_parallel_size`` or
  ``num_layers_per_virtual_pipeline_stage``) need ``pp >= 2``, divide the layers of a stage and
  a number of micro batches that is a multiple of ``pp``.
* Tensor parallelism: ``tp`` divides the attention heads, the key/value groups, the MLP width
  (and the experts' MLP width) and the vocabulary.
* Context parallelism: every algorithm cuts the sequence into ``2 * cp`` chunks (the
  load-balanced causal layout of ``core/context_parallel/layout.py``), so ``seq_length`` must be
  divisible by ``2 * cp``; the Ulysses degree (``cp`` for ``ulysses_cp_algo``,
  ``ulysses_degree_in_cp`` for ``hybrid_cp_algo``, 1 for ring attention) divides the heads per
  tensor-parallel rank, and ``ulysses_degree_in_cp`` divides ``cp``.
* Sequence parallelism: the sequence per context-parallel rank splits over ``tp`` ranks
  (with ``tp = 1`` it has nothing to split and is a no-op, as in Megatron).
* The distributed optimizer shards Adam-family states; it does not support SGD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .parallel import CONTEXT_PARALLEL_ALGOS

__all__ = ["LayoutSpec", "LayoutVerdict", "check_layout", "context_parallel_problems", "stage_layers",
           "moe_tensor_parallel_problem",
           "CONTEXT_PARALLEL_ALGOS", "DISTRIBUTED_OPTIMIZER_TYPES"]

#: optimizer_type values the distributed optimizer shards (core/optimizer/distrib_optimizer.py)
DISTRIBUTED_OPTIMIZER_TYPES = ("AdamW", "AdamWeightDecay", "Adam")


@dataclass(frozen=True)
class LayoutSpec:
    """Everything the layout rules read; None means "not known here" and skips the rules on it.

    Attributes are named after the config fields they come from
    (``parallel_config``, ``model_config``, ``moe_config``, ``dataset_config``,
    ``training_config``, ``optimizer_config``).
    """

    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    num_layer_list: Optional[Sequence] = None
    standalone_embedding_stage: bool = False
    noop_layers: Optional[Sequence[int]] = None
    sequence_parallel: bool = False
    context_parallel_algo: str = "ulysses_cp_algo"
    ulysses_degree_in_cp: Optional[int] = None
    use_distributed_optimizer: bool = False
    optimizer_type: Optional[str] = None
    num_layers: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None  # key/value heads; None = one per attention head
    ffn_hidden_size: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    seq_length: Optional[int] = None
    num_experts: int = 1
    micro_batch_num: Optional[int] = 1
    training: bool = True

    @property
    def ulysses_degree(self) -> int:
        """The Ulysses (all-to-all) share of context parallelism for the algorithm."""
        cp = self.context_parallel_size
        if cp <= 1:
            return 1
        if self.context_parallel_algo == "ulysses_cp_algo":
            return cp
        if self.context_parallel_algo == "hybrid_cp_algo":
            return self.ulysses_degree_in_cp or 1
        return 1


@dataclass
class LayoutVerdict:
    """What :func:`check_layout` found.

    Attributes:
        problems: Every broken rule, one message each (empty: the layout can run).
        data_parallel_size: ``world_size / (tp * pp * cp)`` (1 when that does not divide).
        virtual_pipeline_size: Model chunks per pipeline rank (1: not interleaved), derived from
            ``num_layers_per_virtual_pipeline_stage`` or ``num_layer_list`` where they give it.
        layers_per_stage: Transformer layers of each pipeline stage (summed over chunks).
    """

    problems: List[str] = field(default_factory=list)
    data_parallel_size: int = 1
    virtual_pipeline_size: int = 1
    layers_per_stage: List[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no rule is broken."""
        return not self.problems


def stage_layers(spec: LayoutSpec) -> List[int]:
    """Transformer layers of each pipeline stage (summed over virtual chunks): ``num_layer_list``
    when given, else an even split (none on the first stage with ``standalone_embedding_stage``)."""
    pp = spec.pipeline_model_parallel_size
    custom = spec.num_layer_list
    if custom is not None:
        if isinstance(custom[0], (list, tuple)):
            return [sum(row[stage] for row in custom) for stage in range(len(custom[0]))]
        return list(custom)
    layers = spec.num_layers or 0
    if spec.standalone_embedding_stage and pp > 1:
        return [0] + [layers // (pp - 1)] * (pp - 1)
    return [layers // pp] * pp


def _pipeline(spec: LayoutSpec, verdict: LayoutVerdict) -> None:
    problems = verdict.problems
    pp = spec.pipeline_model_parallel_size
    vpp = spec.virtual_pipeline_model_parallel_size
    per_chunk = spec.num_layers_per_virtual_pipeline_stage
    if vpp is not None and vpp > 1 and pp < 2:
        problems.append(f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size >= 2 "
                        f"(got {pp})")
    if per_chunk is not None and pp < 2:
        problems.append(f"num_layers_per_virtual_pipeline_stage={per_chunk} needs "
                        f"pipeline_model_parallel_size >= 2 (got {pp})")
    if spec.standalone_embedding_stage and pp < 2:
        problems.append(f"standalone_embedding_stage needs pipeline_model_parallel_size >= 2 (got {pp})")
    layers = spec.num_layers
    if layers is None:
        return
    stages = stage_layers(spec)
    verdict.layers_per_stage = stages
    custom = spec.num_layer_list
    effective = 1
    if custom is not None:
        if sum(stages) != layers:
            problems.append(f"num_layer_list sums to {sum(stages)} layers but num_layers is {layers}")
        effective = len(custom) if isinstance(custom[0], (list, tuple)) else (vpp or 1)
    else:
        usable = pp - 1 if spec.standalone_embedding_stage and pp > 1 else pp
        if layers % usable:
            problems.append(f"num_layers={layers} must be divisible by the {usable} pipeline stages that hold "
                            f"layers (pipeline_model_parallel_size={pp}"
                            f"{', standalone_embedding_stage' if usable != pp else ''}); give num_layer_list "
                            "to split the layers unevenly")
        elif stages:
            per_stage = max(stages)
            effective = vpp or 1
            if per_chunk is not None:
                if per_stage % per_chunk:
                    problems.append(f"num_layers_per_virtual_pipeline_stage={per_chunk} must divide the layers "
                                    f"per pipeline stage ({per_stage})")
                else:
                    derived = per_stage // per_chunk
                    if vpp is not None and vpp != derived:
                        problems.append(f"virtual_pipeline_model_parallel_size={vpp} disagrees with "
                                        f"num_layers_per_virtual_pipeline_stage={per_chunk} (layers per stage "
                                        f"{per_stage} / {per_chunk} = {derived})")
                    effective = derived
            if effective > 1 and per_stage % effective:
                problems.append(f"layers per pipeline stage ({per_stage}) must be divisible by "
                                f"virtual_pipeline_model_parallel_size={effective}")
    verdict.virtual_pipeline_size = effective
    for index in spec.noop_layers or []:
        if index >= layers:
            problems.append(f"noop_layers entry {index} is not a layer index (num_layers={layers})")
    if effective > 1 and pp > 1 and spec.micro_batch_num is not None and spec.micro_batch_num % pp:
        problems.append(f"interleaved pipelining needs micro_batch_num ({spec.micro_batch_num}) to be a multiple of "
                        f"pipeline_model_parallel_size={pp}")


def context_parallel_problems(spec: LayoutSpec) -> List[str]:
    """The context-parallel rules alone (algorithm, ep x cp, sequence chunks, Ulysses heads)."""
    problems: List[str] = []
    cp = spec.context_parallel_size
    algo = spec.context_parallel_algo
    if algo not in CONTEXT_PARALLEL_ALGOS:
        problems.append(f"context_parallel_algo must be one of {list(CONTEXT_PARALLEL_ALGOS)}, got {algo!r}")
        return problems
    if algo == "hybrid_cp_algo":
        # checked at every cp (ModelParallelConfig refuses the same when it is built)
        degree = spec.ulysses_degree_in_cp
        if degree is None or degree < 1 or cp % degree:
            problems.append(f"hybrid_cp_algo needs ulysses_degree_in_cp dividing context_parallel_size ({cp}), got "
                            f"ulysses_degree_in_cp={degree!r}")
            return problems
    if cp <= 1:
        return problems
    ep = spec.expert_model_parallel_size
    if ep > 1:
        problems.append(f"expert_model_parallel_size ({ep}) > 1 together with context_parallel_size ({cp}) > 1 is "
                        "not supported (as in MindSpeed-Core-MS): set one of them to 1")
    seq = spec.seq_length
    if seq is not None and seq % (2 * cp):
        problems.append(f"seq_length ({seq}) must be divisible by 2 * context_parallel_size (2 * {cp} = {2 * cp}): "
                        f"every context_parallel_algo ({algo} here) cuts the sequence into 2 * "
                        "context_parallel_size chunks (the load-balanced causal layout)")
    ulysses = spec.ulysses_degree
    heads, tp = spec.num_attention_heads, spec.tensor_model_parallel_size
    if heads is not None and ulysses > 1 and heads % tp == 0 and (heads // tp) % ulysses:
        problems.append(f"attention heads per tensor-parallel rank ({heads // tp}) (num_attention_heads={heads} / "
                        f"tensor_model_parallel_size={tp}) must be divisible by the Ulysses degree ({ulysses}: "
                        "context_parallel_size for ulysses_cp_algo, ulysses_degree_in_cp for hybrid_cp_algo)")
    return problems


def moe_tensor_parallel_problem(num_experts: Optional[int], tensor_model_parallel_size: int,
                                sequence_parallel: bool, training: bool = True) -> Optional[str]:
    """The rule between MoE, tensor parallelism and sequence parallelism (needs no world size).

    :func:`check_layout` applies it, and :class:`~mindspeed_ms.core.config.AllConfig` applies it
    when a training config is loaded, so the contradiction is refused before anything is built.

    Returns:
        The problem, naming the fields, or None when the combination is allowed.
    """
    experts = num_experts or 0
    tp = tensor_model_parallel_size
    if experts > 1 and tp > 1 and not sequence_parallel and training:
        return (f"MoE (moe_config.num_experts={experts}) with tensor_model_parallel_size={tp} needs "
                "sequence_parallel=True when training (as in Megatron: the experts' token dispatcher works on "
                "the sequence-parallel shards)")
    return None


def check_layout(spec: LayoutSpec) -> LayoutVerdict:
    """Apply every layout rule to ``spec``.

    Returns:
        A :class:`LayoutVerdict` listing every broken rule and the derived sizes.
    """
    verdict = LayoutVerdict()
    problems = verdict.problems
    world = spec.world_size
    tp, pp = spec.tensor_model_parallel_size, spec.pipeline_model_parallel_size
    cp, ep = spec.context_parallel_size, spec.expert_model_parallel_size
    mp = tp * pp * cp
    if world % mp:
        problems.append(f"tensor x pipeline x context parallel size ({tp} x {pp} x {cp} = {mp}) must divide the "
                        f"world size {world}")
    else:
        verdict.data_parallel_size = world // mp
        dp = verdict.data_parallel_size
        if dp % ep:
            problems.append(f"expert_model_parallel_size={ep} must divide the data-parallel size {dp} (world "
                            f"{world} / tp*pp*cp {mp})")
    experts = spec.num_experts
    if ep > 1 and experts <= 1:
        problems.append(f"expert_model_parallel_size={ep} needs MoE (moe_config.num_experts > 1)")
    if experts > 1 and experts % ep:
        problems.append(f"moe_config.num_experts={experts} must be divisible by expert_model_parallel_size={ep}")
    moe_tp = moe_tensor_parallel_problem(experts, tp, spec.sequence_parallel, spec.training)
    if moe_tp:
        problems.append(moe_tp)

    _pipeline(spec, verdict)

    heads = spec.num_attention_heads
    if heads is not None:
        if heads % tp:
            problems.append(f"num_attention_heads={heads} must be divisible by tensor_model_parallel_size={tp}")
        groups = spec.num_query_groups
        if groups is not None and groups % tp:
            problems.append(f"num_query_groups={groups} must be divisible by tensor_model_parallel_size={tp}")
    for name, value in (("ffn_hidden_size", spec.ffn_hidden_size),
                        ("moe_ffn_hidden_size", spec.moe_ffn_hidden_size if experts > 1 else None)):
        if value is not None and value % tp:
            problems.append(f"{name}={value} must be divisible by tensor_model_parallel_size={tp}")
    if spec.vocab_size is not None and spec.vocab_size % tp:
        problems.append(f"vocab_size={spec.vocab_size} must be divisible by tensor_model_parallel_size={tp} (pad "
                        "the vocabulary)")

    problems.extend(context_parallel_problems(spec))
    seq = spec.seq_length
    if seq is not None and spec.sequence_parallel and tp > 1 and seq % cp == 0 and (seq // cp) % tp:
        problems.append(f"with sequence_parallel, seq_length / context_parallel_size ({seq} / {cp} = {seq // cp}) "
                        f"must be divisible by tensor_model_parallel_size={tp}")

    if spec.use_distributed_optimizer and spec.optimizer_type is not None and \
            spec.optimizer_type not in DISTRIBUTED_OPTIMIZER_TYPES:
        problems.append(f"use_distributed_optimizer shards the states of optimizer_type "
                        f"{' / '.join(DISTRIBUTED_OPTIMIZER_TYPES)}, not optimizer_type={spec.optimizer_type!r}")
    return verdict
