"""Checks that need the world size; run when a model or a training job is built."""

from __future__ import annotations

from typing import Any, Dict, List

from .all_config import AllConfig
from .transformer import TransformerConfig

__all__ = ["validate_for_world_size", "layers_per_pipeline_stage"]


def layers_per_pipeline_stage(model_config: TransformerConfig) -> List[int]:
    """Transformer layers held by each pipeline stage (summed over virtual chunks).

    ``num_layer_list`` when given (a flat list per stage, or one row of per-stage counts per virtual
    chunk, whose columns are summed); otherwise an even split, with no layers on the first stage
    when ``standalone_embedding_stage`` is set.
    """
    parallel = model_config.parallel_config
    pp = parallel.pipeline_model_parallel_size
    custom = parallel.num_layer_list
    if custom is not None:
        if isinstance(custom[0], list):
            return [sum(row[stage] for row in custom) for stage in range(len(custom[0]))]
        return list(custom)
    layers = model_config.num_layers or 0
    if parallel.standalone_embedding_stage and pp > 1:
        return [0] + [layers // (pp - 1)] * (pp - 1)
    return [layers // pp] * pp


def _effective_vpp(parallel, layers_per_stage: int, problems: List[str]) -> int:
    vpp = parallel.virtual_pipeline_model_parallel_size
    per_chunk = parallel.num_layers_per_virtual_pipeline_stage
    if per_chunk is not None:
        if layers_per_stage % per_chunk:
            problems.append(f"num_layers_per_virtual_pipeline_stage={per_chunk} must divide the "
                            f"layers per pipeline stage ({layers_per_stage})")
            return vpp or 1
        derived = layers_per_stage // per_chunk
        if vpp is not None and vpp != derived:
            problems.append(f"virtual_pipeline_model_parallel_size={vpp} disagrees with "
                            f"num_layers_per_virtual_pipeline_stage={per_chunk} (layers per "
                            f"stage {layers_per_stage} / {per_chunk} = {derived})")
        return derived
    return vpp or 1


def validate_for_world_size(config: Any, world_size: int) -> Dict[str, Any]:
    """Check a configuration against the number of ranks it will run on.

    Runs every cross-field rule again (:meth:`BaseConfig.validate`), checks that the required
    model fields are set, then the rules that need the world size: ``tp * pp * cp`` divides the
    world size; the expert-parallel size divides the data-parallel size and the number of
    experts; the layers split over pipeline stages (and virtual chunks); heads, query groups,
    MLP width and vocabulary split over tensor-parallel ranks; the sequence splits over context
    (and, with sequence parallelism, tensor) parallel ranks; interleaved pipelining has a
    multiple of ``pp`` micro batches.

    Args:
        config: An :class:`AllConfig` or a :class:`TransformerConfig` (its linked configs are
            used).
        world_size: Number of ranks.

    Returns:
        Derived sizes: ``world_size``, ``data_parallel_size``, ``model_parallel_size``,
        ``virtual_pipeline_size``, ``layers_per_stage`` (list), ``global_batch_size``
        (samples per optimizer step over all ranks).

    Raises:
        TypeError: wrong argument types.
        ValueError: listing every problem found.
    """
    if isinstance(config, AllConfig):
        model = config.model_config
        config.validate()
    elif isinstance(config, TransformerConfig):
        model = config
        model.validate()
    else:
        raise TypeError(f"validate_for_world_size expects an AllConfig or a TransformerConfig, "
                        f"got {type(config).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {type(world_size).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")

    parallel = model.parallel_config
    moe = model.moe_config
    dataset = model.dataset_config
    problems: List[str] = []
    missing = model.missing_required()
    if missing:
        problems.append(f"model_config is missing required fields: {', '.join(missing)}")

    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    ep = parallel.expert_model_parallel_size
    mp = tp * pp * cp
    dp = 1
    if world_size % mp:
        problems.append(f"tensor x pipeline x context parallel size ({tp} x {pp} x {cp} = {mp}) "
                        f"must divide the world size {world_size}")
    else:
        dp = world_size // mp
        if dp % ep:
            problems.append(f"expert_model_parallel_size={ep} must divide the data-parallel "
                            f"size {dp} (world {world_size} / tp*pp*cp {mp})")
    experts = moe.num_experts
    if ep > 1 and experts <= 1:
        problems.append(f"expert_model_parallel_size={ep} needs MoE (moe_config.num_experts > 1)")
    if experts > 1 and experts % ep:
        problems.append(f"moe_config.num_experts={experts} must be divisible by "
                        f"expert_model_parallel_size={ep}")

    layers = model.num_layers
    stages: List[int] = []
    vpp = 1
    if layers is not None:
        stages = layers_per_pipeline_stage(model)
        custom = parallel.num_layer_list
        if custom is not None:
            if sum(stages) != layers:
                problems.append(f"num_layer_list sums to {sum(stages)} layers but num_layers is "
                                f"{layers}")
            if isinstance(custom[0], list):
                vpp = len(custom)
            else:
                vpp = parallel.virtual_pipeline_model_parallel_size or 1
        else:
            usable = pp - 1 if parallel.standalone_embedding_stage and pp > 1 else pp
            if layers % usable:
                problems.append(f"num_layers={layers} must be divisible by the {usable} pipeline "
                                f"stages that hold layers (pipeline_model_parallel_size={pp}"
                                f"{', standalone_embedding_stage' if usable != pp else ''}); give "
                                f"num_layer_list to split the layers unevenly")
            elif stages:
                vpp = _effective_vpp(parallel, max(stages), problems)
                if vpp > 1 and max(stages) % vpp:
                    problems.append(f"layers per pipeline stage ({max(stages)}) must be divisible "
                                    f"by virtual_pipeline_model_parallel_size={vpp}")
        for index in parallel.noop_layers or []:
            if index >= layers:
                problems.append(f"noop_layers entry {index} is not a layer index (num_layers="
                                f"{layers})")
    if vpp > 1 and dataset.micro_batch_num % pp:
        problems.append(f"interleaved pipelining needs micro_batch_num "
                        f"({dataset.micro_batch_num}) to be a multiple of "
                        f"pipeline_model_parallel_size={pp}")

    heads = model.num_attention_heads
    if heads is not None:
        if heads % tp:
            problems.append(f"num_attention_heads={heads} must be divisible by "
                            f"tensor_model_parallel_size={tp}")
        kv_heads = model.num_kv_heads
        if model.group_query_attention and kv_heads % tp:
            problems.append(f"num_query_groups={kv_heads} must be divisible by "
                            f"tensor_model_parallel_size={tp}")
        ulysses = parallel.ulysses_degree if cp > 1 else 1
        if ulysses > 1 and heads % tp == 0 and (heads // tp) % ulysses:
            problems.append(f"attention heads per tensor-parallel rank ({heads // tp}) must be "
                            f"divisible by the Ulysses degree {ulysses}")
    ffn = model.ffn_hidden_size
    if ffn is not None and ffn % tp:
        problems.append(f"ffn_hidden_size={ffn} must be divisible by tensor_model_parallel_size"
                        f"={tp}")
    if model.vocab_size is not None and model.vocab_size % tp:
        problems.append(f"vocab_size={model.vocab_size} must be divisible by "
                        f"tensor_model_parallel_size={tp} (pad the vocabulary)")
    seq = model.seq_length
    if seq is not None:
        if seq % cp:
            problems.append(f"seq_length={seq} must be divisible by context_parallel_size={cp}")
        elif parallel.sequence_parallel and tp > 1 and (seq // cp) % tp:
            problems.append(f"with sequence_parallel, seq_length / context_parallel_size "
                            f"({seq // cp}) must be divisible by tensor_model_parallel_size={tp}")
    if moe.enable_cold_hot_expert and experts > 1 and moe.hot_expert_num > experts:
        problems.append(f"hot_expert_num={moe.hot_expert_num} exceeds num_experts={experts}")

    if problems:
        raise ValueError(f"configuration does not fit world size {world_size}:\n  - "
                         + "\n  - ".join(problems))
    return {
        "world_size": world_size,
        "data_parallel_size": dp,
        "model_parallel_size": mp,
        "virtual_pipeline_size": vpp,
        "layers_per_stage": stages,
        "global_batch_size": dataset.batch_size * dataset.micro_batch_num * dp,
    }
