"""Checks that need the world size; run when a model or a training job is built."""

from __future__ import annotations

from typing import Any, Dict, List

from .all_config import AllConfig
from .layout_rules import LayoutSpec, check_layout, stage_layers
from .transformer import TransformerConfig

__all__ = ["validate_for_world_size", "layers_per_pipeline_stage", "layout_spec"]


def layers_per_pipeline_stage(model_config: TransformerConfig) -> List[int]:
    """Transformer layers held by each pipeline stage (summed over virtual chunks).

    ``num_layer_list`` when given (a flat list per stage, or one row of per-stage counts per virtual
    chunk, whose columns are summed); otherwise an even split, with no layers on the first stage
    when ``standalone_embedding_stage`` is set.
    """
    return stage_layers(layout_spec(model_config, 1))


def layout_spec(model_config: TransformerConfig, world_size: int, optimizer_config: Any = None,
                training: bool = True) -> LayoutSpec:
    """The numbers of a config that the layout rules (:mod:`.layout_rules`) read.

    Args:
        model_config: The model config (its parallel, MoE, dataset and training configs are used).
        world_size: Number of ranks.
        optimizer_config: For the distributed optimizer's rule (None: not checked).
        training: Whether the layout trains (MoE with tensor parallelism then needs sequence
            parallelism).
    """
    parallel = model_config.parallel_config
    moe = model_config.moe_config
    return LayoutSpec(
        world_size=world_size,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=parallel.num_layers_per_virtual_pipeline_stage,
        num_layer_list=parallel.num_layer_list,
        standalone_embedding_stage=bool(parallel.standalone_embedding_stage),
        noop_layers=parallel.noop_layers,
        sequence_parallel=bool(parallel.sequence_parallel),
        context_parallel_algo=parallel.context_parallel_algo,
        ulysses_degree_in_cp=parallel.ulysses_degree_in_cp,
        # zero_level z1 is the distributed optimizer's sharding; the trainer turns it on for z1
        use_distributed_optimizer=bool(model_config.training_config.use_distributed_optimizer)
        or parallel.zero_level == "z1",
        optimizer_type=optimizer_config.optimizer_type if optimizer_config is not None else None,
        num_layers=model_config.num_layers,
        num_attention_heads=model_config.num_attention_heads,
        num_query_groups=model_config.num_query_groups if model_config.group_query_attention else None,
        ffn_hidden_size=model_config.ffn_hidden_size,
        vocab_size=model_config.vocab_size,
        seq_length=model_config.seq_length,
        num_experts=moe.num_experts,
        micro_batch_num=model_config.dataset_config.micro_batch_num,
        training=training)


def validate_for_world_size(config: Any, world_size: int) -> Dict[str, Any]:
    """Check a configuration against the number of ranks it will run on.

    Runs every cross-field rule again (:meth:`BaseConfig.validate`), checks that the required
    model fields are set, then every layout rule (:func:`.layout_rules.check_layout`, the one
    owner of them, which the model's context-parallel check and the lab's tuner use too):
    ``tp * pp * cp`` divides the world size; expert parallelism (divides dp and the experts, needs
    MoE, not with context parallelism); MoE with tensor parallelism needs sequence parallelism;
    the layers split over pipeline stages and virtual chunks (a multiple of ``pp`` micro batches
    when interleaved); heads, query groups, MLP width and vocabulary split over tensor-parallel
    ranks; the sequence splits into ``2 * cp`` chunks and, with sequence parallelism, over the
    tensor-parallel ranks; the Ulysses degree divides the heads per tensor-parallel rank; the
    distributed optimizer has an Adam-family optimizer.

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
    optimizer_config = None
    if isinstance(config, AllConfig):
        model = config.model_config
        optimizer_config = config.optimizer_config
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

    dataset = model.dataset_config
    problems: List[str] = []
    missing = model.missing_required()
    if missing:
        problems.append(f"model_config is missing required fields: {', '.join(missing)}")
    verdict = check_layout(layout_spec(model, world_size, optimizer_config))
    problems.extend(verdict.problems)
    moe = model.moe_config
    experts = moe.num_experts
    if moe.enable_cold_hot_expert and experts > 1 and moe.hot_expert_num > experts:
        problems.append(f"hot_expert_num={moe.hot_expert_num} exceeds num_experts={experts}")

    if problems:
        raise ValueError(f"configuration does not fit world size {world_size}:\n  - "
                         + "\n  - ".join(problems))
    dp = verdict.data_parallel_size
    return {
        "world_size": world_size,
        "data_parallel_size": dp,
        "model_parallel_size": model.parallel_config.model_parallel_size,
        "virtual_pipeline_size": verdict.virtual_pipeline_size,
        "layers_per_stage": verdict.layers_per_stage,
        "global_batch_size": dataset.batch_size * dataset.micro_batch_num * dp,
    }
