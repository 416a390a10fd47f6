"""What every config field does here: works, device-bound or refused (one registry).

Each field of each config class has exactly one :class:`Effect`:

* ``works``: the field changes what runs; ``readers`` are the module files (outside
  ``core/config``) that read it. A field that only writes other fields (a virtual spelling such as
  ``gradient_accumulation_steps``) lists the readers of the fields it writes, named in ``via``.
  A field implemented for some values only (``zero_level``: z1) refuses the others (``accept``).
* ``device_bound``: an Ascend kernel or overlap with no counterpart on this device (CPU here);
  ``readers`` are the files that take the Ascend path (empty when the project has none yet, which
  the note then says). :func:`report_device_bound` (called when the trainer starts and when a
  GPTModel is built) logs once per field that it has no effect on this device and why; the run is
  otherwise the same computation.
* ``refused``: not implemented; a value other than the default (or the extra values ``accept``
  allows) raises :class:`~.fields.ConfigValueError` when the config is built or changed
  (:func:`check_refused`, called by every config's construction and assignment).

The registry is deliberately kept apart from the field declarations: the declarations say what a
field is, this module says what the code does with it, and ``tests/test_field_effects.py`` checks
it against the code. ``python -m mindspeed_ms.core.config.effects --markdown`` prints the table of
``docs/config.md``; ``--write docs/config.md`` updates it between the markers.

This module imports nothing from MindSpore and nothing above ``core/config``: the device is passed
in by the caller (which asks ``mindspeed_ms.core.communication.device_target()``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .fields import ConfigValueError

__all__ = [
    "STATUSES",
    "Effect",
    "EFFECTS",
    "effect_of",
    "check_refused",
    "report_device_bound",
    "markdown_table",
    "update_markdown",
    "TABLE_BEGIN",
    "TABLE_END",
]

#: The three statuses a field may have.
STATUSES = ("works", "device_bound", "refused")

_UNSET = object()


@dataclass(frozen=True)
class Effect:
    """What the code does with one config field.

    Attributes:
        status: ``'works'``, ``'device_bound'`` or ``'refused'``.
        note: For ``works``, what it does (optional); for ``device_bound``, what it does on
            Ascend and why nothing happens on this device; for ``refused``, why and what is
            supported instead.
        readers: ``works``: the module files (repository-relative) that read the field;
            ``device_bound``: the files that take the Ascend path (empty: none yet).
        via: ``works``: the attribute names those readers read when they are not the field's
            own name (virtual spellings, fields that write other fields).
        trigger: ``device_bound``: the value that asks for the device feature (default: any
            value other than the default).
        accept: ``refused``: ``f(value, config) -> bool`` for values accepted besides the
            default (e.g. ``encoder_num_layers`` equal to ``num_layers``); ``works``: the
            implemented values besides the default (the others are refused).
        allowed: ``refused`` (and ``works`` with ``accept``): the allowed values, for the error
            message.
    """

    status: str
    note: str = ""
    readers: Tuple[str, ...] = ()
    via: Tuple[str, ...] = ()
    trigger: Any = _UNSET
    accept: Optional[Callable[[Any, Any], bool]] = None
    allowed: str = ""

    @property
    def has_trigger(self) -> bool:
        """Whether a specific trigger value is set (else: any non-default value triggers)."""
        return self.trigger is not _UNSET


# ---------------------------------------------------------------------------------------------
# Constructors (keep the table below readable)
# ---------------------------------------------------------------------------------------------

_PATHS = {
    "T": "mindspeed_ms/training/training.py",
    "CK": "mindspeed_ms/training/checkpointing.py",
    "LS": "mindspeed_ms/training/loss_scale.py",
    "PROF": "mindspeed_ms/training/profiling.py",
    "COMP": "mindspeed_ms/training/compilation.py",
    "LF": "mindspeed_ms/training/loss_func.py",
    "TR": "mindspeed_ms/legacy/model/transformer.py",
    "LM": "mindspeed_ms/legacy/model/language_model.py",
    "GPT": "mindspeed_ms/legacy/model/gpt_model.py",
    "NORM": "mindspeed_ms/legacy/model/norm.py",
    "EOS": "mindspeed_ms/legacy/model/eos_mask.py",
    "MOE": "mindspeed_ms/legacy/model/moe/moe_layer.py",
    "ROUTER": "mindspeed_ms/legacy/model/moe/router.py",
    "DISP": "mindspeed_ms/legacy/model/moe/token_dispatcher.py",
    "MOEU": "mindspeed_ms/legacy/model/moe/moe_utils.py",
    "EXPERTS": "mindspeed_ms/legacy/model/moe/experts.py",
    "COLD": "mindspeed_ms/legacy/model/moe/cold_hot.py",
    "HOOKS": "mindspeed_ms/legacy/model/moe/training_hooks.py",
    "PS": "mindspeed_ms/core/parallel_state.py",
    "LAYERS": "mindspeed_ms/core/tensor_parallel/layers.py",
    "LORA": "mindspeed_ms/core/tensor_parallel/lora.py",
    "XENT": "mindspeed_ms/core/tensor_parallel/cross_entropy.py",
    "P2P": "mindspeed_ms/core/pipeline_parallel/p2p_communication.py",
    "PIPE": "mindspeed_ms/core/pipeline_parallel/pipelined.py",
    "CPL": "mindspeed_ms/core/context_parallel/layout.py",
    "CPA": "mindspeed_ms/core/context_parallel/attention.py",
    "OPT": "mindspeed_ms/core/optimizer/optimizer.py",
    "DOPT": "mindspeed_ms/core/optimizer/distrib_optimizer.py",
    "LR": "mindspeed_ms/core/optimizer/lr_scheduler.py",
    "SAMPLER": "mindspeed_ms/core/datasets/sampler.py",
    "PREC": "mindspeed_ms/core/precision.py",
    "ROPE": "mindspeed_ms/legacy/model/rotary_pos_embedding.py",
}


def works(*readers: str, note: str = "", via: Iterable[str] = (),
          accept: Optional[Callable[[Any, Any], bool]] = None, allowed: str = "") -> Effect:
    """A field that changes what runs; ``readers`` are keys of ``_PATHS`` or paths.

    With ``accept``, only the default and the values it accepts are implemented; others are
    refused like a refused field's (``allowed`` describes them).
    """
    return Effect("works", note, tuple(_PATHS.get(r, r) for r in readers), tuple(via),
                  accept=accept, allowed=allowed)


_NO_ASCEND_PATH = ("; this project has no Ascend implementation of it yet, so on Ascend too "
                   "the run is the plain one")


def device_bound(note: str, trigger: Any = _UNSET, ascend: Iterable[str] = ()) -> Effect:
    """An Ascend-only feature; ``note`` says what it does there and why nothing here.

    ``ascend`` names the module files that take the Ascend path (they read the field); without
    them the note says that the project has no Ascend implementation yet.
    """
    readers = tuple(_PATHS.get(r, r) for r in ascend)
    return Effect("device_bound", note if readers else note + _NO_ASCEND_PATH, readers,
                  trigger=trigger)


def refused(note: str, allowed: str = "",
            accept: Optional[Callable[[Any, Any], bool]] = None) -> Effect:
    """A field that is not implemented: non-default values are refused at load time."""
    return Effect("refused", note, accept=accept, allowed=allowed)


def _zero_one(value, config) -> bool:
    del config
    return value == "z1"


def _same_as_num_layers(value, config) -> bool:
    return value == config.__dict__.get("num_layers")


def _same_as_hidden_size(value, config) -> bool:
    return value == config.__dict__.get("hidden_size")


# ---------------------------------------------------------------------------------------------
# The registry: (section, field) -> Effect
# ---------------------------------------------------------------------------------------------

_PROFILE_ASCEND = ("Ascend only: {what} is recorded by the Ascend profiler (CANN); the CPU "
                   "profiler records host operators only")

_LOSS_SCALE = "read through TrainingConfig.loss_scale_settings() into build_loss_scaler"

EFFECTS: Dict[Tuple[str, str], Effect] = {}


def _section(section: str, entries: Dict[str, Effect]) -> None:
    for name, effect in entries.items():
        EFFECTS[(section, name)] = effect


_section("training_config", {
    "seed": works("T", note="seeds the model-parallel RNG and, by default, the data order"),
    "output_dir": works("T", note="events, checkpoints and profiles are written under it"),
    "training_iters": works("T"),
    "epochs": works("T"),
    "log_interval": works("T"),
    "eval_interval": works("T"),
    "save_interval": works("T"),
    "grad_clip_kwargs": works("T"),
    # The loss-scale spellings are resolved into one form by TrainingConfig.loss_scale_settings(),
    # which is what the trainer hands to build_loss_scaler.
    "loss_scale": works("T", via=("loss_scale_settings",), note=_LOSS_SCALE),
    "loss_scale_value": works("T", via=("loss_scale_settings",), note=_LOSS_SCALE),
    "loss_scale_factor": works("T", via=("loss_scale_settings",), note=_LOSS_SCALE),
    "loss_scale_window": works("T", via=("loss_scale_settings",), note=_LOSS_SCALE),
    "scale_sense": works("T", via=("loss_scale_settings",), note=_LOSS_SCALE),
    "wrap_with_ddp": works("T"),
    "use_distributed_optimizer": works("T"),
    "bucket_size": works("T"),
    "check_for_nan_in_grad": works("T"),
    # Megatron's precision flags (tests/test_training_fields.py)
    "fp16": works("T", note="model_config.compute_dtype float16 when unset (a different one is "
                  "refused), Megatron's dynamic loss scale (2**32, x2, window 1000) unless a loss "
                  "scale is given, float16 gradient accumulation unless "
                  "accumulate_allreduce_grads_in_fp32"),
    "bf16": works("TR", "LM", "LAYERS", via=("compute_dtype",),
                  note="model_config.compute_dtype bfloat16 when unset (a different one is "
                  "refused); no loss scaling (dynamic scaling refused, a static loss_scale kept); "
                  "float32 gradient accumulation, as Megatron forces for bf16"),
    "accumulate_allreduce_grads_in_fp32": works(
        "T", note="gradients accumulate and reduce in float32; without it in float16 under fp16"),
    "loss_reduction": works("T", note="micro-batch losses of a step: mean (weights 1/n) or sum"),
    "eval_metric": works("T", note="the best checkpoint by this metric of the evaluations is kept "
                         "in <output_dir>/best"),
    "best_metric_comparison": works("T", note="how a new eval_metric value must compare with the "
                                    "best to replace the best checkpoint"),
    "calculate_per_token_loss": works(
        "T", note="the step's loss sums every unmasked token and divides by their number over "
        "micro-batches and data-parallel ranks"),
    "resume_training": works("T"),
    "crc_check": works("T", "CK"),
    "load_checkpoint": works("T", "CK"),
    "enable_compile_cache": works(
        "mindspeed_ms/training/compile_cache.py",
        note="MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE) for the graphs the run compiles, "
        "under a directory keyed by config, layout, MindSpore version and source; a second start "
        "loads them instead of compiling"),
    "compile_cache_path": works("mindspeed_ms/training/compile_cache.py",
                                note="where the keyed cache directories go (default "
                                "<output_dir>/compile_cache)"),
    "ckpt_format": works("T"),
    "prefix": works("T"),
    "keep_checkpoint_max": works("T"),
    "no_load_optim": works("T"),
    "no_load_rng": works("T"),
    "new_dataset": works("T"),
    "eval_iters": works("T"),
    "profile": works("T"),
    "profile_save_path": works("T"),
    "profile_step_start": works("T"),
    "profile_step_end": works("T"),
    "profile_with_stack": works("PROF"),
    "profile_data_process": works("PROF", note="passed to MindSpore's profiler (dataset "
                                               "pipelines; the Python iterables record nothing)"),
    "profile_data_simplification": works("PROF"),
    "profile_offline_analyse": works("PROF"),
    "profile_level": device_bound(_PROFILE_ASCEND.format(what="level1/level2 (CANN layers)"),
                                  ascend=("PROF",)),
    "profile_memory": device_bound(_PROFILE_ASCEND.format(what="tensor memory"),
                                   ascend=("PROF",)),
    "profile_communication": device_bound(_PROFILE_ASCEND.format(what="HCCL communication")),
    "profile_parallel_strategy": device_bound(_PROFILE_ASCEND.format(
        what="the parallel strategy (graph mode)"), ascend=("PROF",)),
    "profile_aicore_metrics": device_bound(_PROFILE_ASCEND.format(what="AI Core metrics"),
                                           ascend=("PROF",)),
    "profile_l2_cache": device_bound(_PROFILE_ASCEND.format(what="the L2 cache counter"),
                                     ascend=("PROF",)),
    "profile_hbm_ddr": device_bound(_PROFILE_ASCEND.format(what="the HBM/DDR counter"),
                                    ascend=("PROF",)),
    "profile_pcie": device_bound(_PROFILE_ASCEND.format(what="the PCIe counter"),
                                 ascend=("PROF",)),
    "profile_framework": device_bound(_PROFILE_ASCEND.format(
        what="host CPU/memory sampling of the framework"), trigger="time"),
    "profile_op_time": refused("operator timing is what the profiler records; it cannot be "
                               "switched off (leave it True, or set profile: false)"),
    "profile_dynamic_profiler_config_path": refused(
        "MindSpore's DynamicProfilerMonitor is not wired; use profile with "
        "profile_step_start/profile_step_end"),
    "overlap_grad_reduce": device_bound(
        "Ascend/GPU: the data-parallel all-reduce of each gradient bucket starts asynchronously "
        "while the backward pass goes on; CPU collectives here are synchronous (composed from "
        "AllReduce), so gradients are reduced after the backward pass, with the same result"),
    "delay_grad_reduce": device_bound(
        "Ascend/GPU with overlap_grad_reduce: the asynchronous bucket reduction is held back on "
        "every pipeline stage but the first (a scheduling choice of the overlap); there is no "
        "asynchronous reduction on CPU, so there is nothing to delay"),
    "enable_mem_align": device_bound(
        "Ascend: aligns device-memory allocations for the NPU kernels (the CANN allocator); "
        "host memory on CPU has no such alignment switch"),
    "gradient_accumulation_steps": works("T", via=("micro_batch_num",),
                                         note="writes dataset_config.micro_batch_num"),
    "use_clip_grad": works("T", via=("grad_clip_kwargs",),
                           note="writes training_config.grad_clip_kwargs"),
    "max_grad_norm": works("T", via=("grad_clip_kwargs",),
                           note="writes training_config.grad_clip_kwargs"),
})

_section("parallel_config", {
    "tensor_model_parallel_size": works("T", "PS"),
    "pipeline_model_parallel_size": works("T", "PS"),
    "context_parallel_size": works("T", "PS"),
    "context_parallel_algo": works("T", "CPL", "CPA"),
    "ulysses_degree_in_cp": works("T", "PS", "CPA"),
    "expert_model_parallel_size": works("T", "PS"),
    "virtual_pipeline_model_parallel_size": works("T", "PS"),
    "num_layers_per_virtual_pipeline_stage": works(
        "T", via=("virtual_pipeline_size",),
        note="validate_for_world_size derives the virtual pipeline size from it (layers per "
             "stage / layers per chunk) and the trainer runs that size"),
    "sequence_parallel": works("TR", "LAYERS", "LM", "NORM"),
    "recompute": works("TR", note="full recomputation of the first n layers of each stage/chunk "
                       "(True: all; a list by stage, or (vpp, pp) rows)"),
    "select_recompute": works("TR", note="core attention recomputed in the backward, same forms"),
    "select_comm_recompute": works("TR", note="sequence-parallel all-gathers recomputed in the "
                                   "backward; refused without sequence_parallel"),
    "recompute_config": works("TR", note="the three keys above (the guide's train_config block)"),
    "recv_dtype": works("P2P"),
    "standalone_embedding_stage": works("TR"),
    "use_cpu_initialization": works("LAYERS"),
    "deterministic_mode": works("T", note="mindspore.set_deterministic(True) when the trainer "
                                "starts (the example worker sets it before communication init)"),
    "num_layer_list": works("TR"),
    "noop_layers": works("TR"),
    "variable_seq_lengths": works("P2P", "PIPE"),
    "lazy_inline": works("COMP", note="mindspore.lazy_inline on the compiled transformer layers "
                                      "(None: MindFormers' ENABLE_LAZY_INLINE rules)"),
    "zero_level": works("T", accept=_zero_one, allowed="None or 'z1'",
                        note="z1 (optimizer states sharded over data-parallel ranks) turns on the "
                             "distributed optimizer; z2 (+ gradients) and z3 (+ parameters) are "
                             "not implemented and refused"),
    "overlap_grad_reduce": device_bound(
        "Ascend/GPU: gradient all-reduce overlapped with the backward pass; CPU collectives "
        "here are synchronous, so the reduction follows the backward pass (same result)"),
    "gradient_accumulation_fusion": device_bound(
        "Ascend: the weight-gradient GEMM accumulates straight into the fp32 main-grad buffer "
        "(fused kernel); CPU has no such kernel, the gradient is computed and then added "
        "(same result)"),
    "overlap_p2p_comm": device_bound(
        "Ascend/GPU: pipeline send/receive run asynchronously beside the computation "
        "(interleaved schedule); CPU transfers complete before the next step of the schedule",
        trigger=True),
})

_section("model_config", {
    "vocab_size": works("T", "LM"),
    "num_layers": works("TR"),
    "recompute_granularity": works("TR", note="'full' layers or 'selective' (core attention)"),
    "recompute_method": works("TR", note="'uniform' chunks or 'block' (first n layers)"),
    "recompute_num_layers": works("TR"),
    "select_recompute": works("TR", note="core attention recomputed in every layer"),
    "select_comm_recompute": works("TR", note="sequence-parallel all-gathers recomputed in the "
                                   "backward; refused without sequence_parallel"),
    "num_attention_heads": works("TR"),
    "hidden_size": works("TR", "LM", "NORM"),
    "ffn_hidden_size": works("TR"),
    "position_embedding_type": works("LM"),
    "parallel_position_embedding": works("LM"),
    "rotary_config": works("LM", via=("rotary_base", "rotary_percent",
                                      "rotary_seq_len_interpolation_factor"),
                           note="writes the rotary_* fields"),
    "group_query_attention": works("TR"),
    "num_query_groups": works("TR"),
    "qkv_has_bias": works("TR"),
    "out_proj_has_bias": works("TR"),
    "apply_query_key_layer_scaling": works("TR"),
    "use_flash_attention": works("TR", "COMP"),
    "fa_config": works("TR"),
    "mask_func_type": works("TR"),
    "mlp_has_bias": works("TR"),
    "hidden_act": works("TR", "EXPERTS"),
    "normalization": works("NORM"),
    "norm_epsilon": works("NORM"),
    "apply_residual_connection_post_norm": works("TR"),
    "use_final_norm": works("TR"),
    "residual_connection_dtype": works("TR"),
    "init_method_std": works("TR", "LAYERS"),
    "params_dtype": works("LAYERS", "NORM"),
    "embedding_init_dtype": works("LM", "LAYERS"),
    "compute_dtype": works("TR", "LM", "GPT", "LAYERS"),
    "softmax_compute_dtype": works("TR"),
    "attention_softmax_in_fp32": works("TR"),
    "init_method": works("TR"),
    "bias_init": works("TR"),
    "fp16_lm_cross_entropy": works("GPT"),
    "attention_dropout": works("TR", "CPA"),
    "num_experts": works("TR", "MOE"),
    "untie_embeddings_and_output_weights": works("GPT", "LM"),
    "fp32_residual_connection": works("TR"),
    "kv_channels": works("TR", "LM"),
    "hidden_dropout": works("TR", "LM"),
    "use_sandwich_norm": works("TR"),
    "attn_post_norm_scale": works("TR"),
    "ffn_post_norm_scale": works("TR"),
    "seq_length": works("T", "GPT"),
    "gated_linear_unit": works("TR"),
    "max_position_embeddings": works("LM"),
    "rotary_base": works("LM"),
    "rotary_percent": works("LM"),
    "rotary_seq_len_interpolation_factor": works("LM"),
    "apply_rope_fusion": device_bound(
        "Ascend: the rotary embedding of query and key runs as MindSpore's fused "
        "ops.rotary_position_embedding kernel (when the whole head dimension rotates); the CPU "
        "backend has no such kernel, the same rotation is computed from its parts",
        ascend=("TR",)),
    "apply_swiglu_fusion": device_bound(
        "Ascend: the gated MLP's SwiGLU runs as MindSpore's fused ops.swiglu kernel; the CPU "
        "backend has no such kernel, silu(gate) * value is computed from its parts (same "
        "result)", ascend=("TR",)),
    "enable_flash_sp": device_bound(
        "Ascend: FlashSP, the ring context-parallel attention built on the NPU flash-attention "
        "kernel; on CPU the ring algorithm (context_parallel_algo: megatron_cp_algo) runs the "
        "plain attention kernel"),
    "use_query_layer": refused("a separate query layer (Pangu-alpha's top query layer) is not "
                               "implemented"),
    "use_visual_encoder": refused("multimodal (visual encoder) models are not implemented"),
    "use_retriever": refused("retrieval-augmented models are not implemented"),
    "retro_add_retriever": refused("Retro is not implemented"),
    "head_skip_weight_param_allocation": refused(
        "the output head allocates its own weight exactly when "
        "untie_embeddings_and_output_weights is True, and otherwise uses the embedding's "
        "(set untie_embeddings_and_output_weights instead)"),
    "out_hidden_size": refused("an output size other than hidden_size is not implemented",
                               allowed="None or hidden_size", accept=_same_as_hidden_size),
    "flatten_labels_and_input_mask": refused(
        "the loss always flattens labels and loss mask (the False form is not implemented)"),
    "encoder_num_layers": refused("encoder-decoder models are not implemented (the model has "
                                  "num_layers layers)", allowed="None or num_layers",
                                  accept=_same_as_num_layers),
    "decoder_num_layers": refused("encoder-decoder models are not implemented"),
    "model_type": refused("only decoder-only (encoder_or_decoder) models are implemented; "
                          "encoder_and_decoder needs decoder layers with cross-attention"),
    "attention_type": refused("the transformer layers use self-attention; cross_attn needs "
                              "decoder layers with cross-attention (layer_type decoder), which "
                              "are not implemented"),
    "rotary_interleaved": refused("the rotary embedding rotates halves (GPT-NeoX layout); the "
                                  "interleaved-pairs layout is not implemented"),
    "add_bias_linear": works("TR", via=("qkv_has_bias", "out_proj_has_bias", "mlp_has_bias"),
                             note="when given, sets the three per-linear bias switches that "
                                  "were not given themselves"),
    "bias_dropout_fusion": refused("the fused bias-dropout-add is not implemented; bias, "
                                   "dropout and residual add run as separate operators"),
    "masked_softmax_fusion": refused("the fused masked softmax is not implemented; use "
                                     "use_flash_attention for a fused attention"),
    "clone_scatter_output_in_embedding": refused("not implemented"),
    "distribute_saved_activations": refused(
        "distributing the recomputation checkpoints over tensor-parallel ranks is not "
        "implemented"),
    "fp8_format": refused("FP8 needs FP8 matmul kernels (Transformer Engine); none here"),
    "transformer_impl": refused("only the local implementation exists"),
})

_section("dataset_config", {
    "pad_token_id": works("T",
                          note="label positions holding it are masked out of the loss"),
    "num_workers": works("T", note="threads that read the next num_workers steps' samples while a "
                         "step trains (0: read in the main thread)"),
    "dataset_dir": works("T", note="a relative data_path is read from it when it exists there"),
    "shuffle": works("T", "SAMPLER"),
    "batch_size": works("T", "GPT", "P2P"),
    "micro_batch_num": works("T", "SAMPLER"),
    "train_samples": works("T"),
    "data_layout": works("LAYERS"),
    "eos_token_id": works("T"),
    "seq_length": works("T", "GPT"),
    "dataset_type": works("T"),
    "data_path": works("T"),
    "split": works("T"),
    "reset_attention_mask": works("T"),
    "reset_position_ids": works("T", "EOS", "GPT"),
    "eod_mask_loss": works("T"),
    "drop_remainder": works("T", "SAMPLER"),
    "seed": works("T"),
})

_section("optimizer_config", {
    "optimizer_type": works("OPT", "DOPT"),
    "learning_rate": works("T", "OPT"),
    "min_lr": works("T", "LR"),
    "lr_decay_style": works("T", "LR"),
    "lr_warmup_iters": works("T", "LR"),
    "lr_decay_iters": works("T", "LR"),
    "lr_wsd_decay_style": works("T", "LR"),
    "lr_wsd_decay_iters": works("T", "LR"),
    "betas": works("OPT", "DOPT"),
    "eps": works("OPT", "DOPT"),
    "weight_decay": works("T", "OPT"),
    "start_weight_decay": works("T", "LR"),
    "end_weight_decay": works("T", "LR"),
    "weight_decay_incr_style": works("T", "LR"),
    "clip_grad": works("OPT"),
    "momentum": works("OPT"),
    "use_checkpoint_opt_param_scheduler": works("T", "LR"),
    "override_opt_param_scheduler": works("T", "LR"),
    "adam_beta1": works("OPT", via=("betas",), note="writes betas[0]"),
    "adam_beta2": works("OPT", via=("betas",), note="writes betas[1]"),
    "overlap_param_gather": device_bound(
        "Ascend/GPU with the distributed optimizer: the all-gather of updated parameter shards "
        "runs asynchronously beside the next forward pass; CPU collectives here are "
        "synchronous, so the gather completes after the optimizer step (same result)"),
})

_section("moe_config", {
    "num_experts": works("MOE", "ROUTER", "DISP"),
    "moe_grouped_gemm": works("MOE"),
    "moe_router_topk": works("ROUTER", "DISP"),
    "moe_router_load_balancing_type": works("ROUTER"),
    "moe_token_dispatcher_type": works("MOE"),
    "moe_expert_capacity_factor": works("ROUTER", "MOEU"),
    "moe_pad_expert_input_to_capacity": works("DISP"),
    "moe_token_drop_policy": works("ROUTER"),
    "moe_aux_loss_coeff": works("ROUTER"),
    "moe_z_loss_coeff": works("ROUTER"),
    "moe_input_jitter_eps": works("ROUTER"),
    "moe_layer_freq": works("TR"),
    "save_token_distribution": works("HOOKS"),
    "enable_cold_hot_expert": works("MOE"),
    "hot_expert_num": works("COLD", "MOE"),
    "cold_token_percent": works("MOEU"),
    "update_step": works("COLD"),
    "use_self_defined_alltoall": device_bound(
        "Ascend: MindSpeed's own all-to-all operator for the expert dispatch instead of HCCL's; "
        "on CPU every all-to-all is composed from AllReduce by the communication layer, so "
        "there is no operator to choose"),
})

_section("lora_config", {
    "use_lora": works("T"),
    "lora_rank": works("LORA"),
    "lora_alpha": works("LORA"),
    "lora_dropout": works("LORA"),
    "target_cells": works("LORA"),
})


def effect_of(section: str, name: str) -> Optional[Effect]:
    """The effect registered for ``section.name`` (None when the field has none yet)."""
    return EFFECTS.get((section, name))


# ---------------------------------------------------------------------------------------------
# Refusals (called by BaseConfig on construction and on every change)
# ---------------------------------------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    # Values are already coerced to the field's kind; only list/tuple spellings may differ.
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a is b or a == b


def check_refused(config) -> None:
    """Raise for any refused field of ``config`` set to a value that is not supported.

    Args:
        config: A config instance (a :class:`~.base.BaseConfig`).

    Raises:
        ConfigValueError: naming the field, the value and what is allowed.
    """
    cls = type(config)
    section = getattr(cls, "section", "")
    for name, decl in cls._fields.items():  # pylint: disable=protected-access
        effect = EFFECTS.get((section, name))
        if effect is None or effect.status == "device_bound" or \
                effect.status == "works" and effect.accept is None:
            continue
        value = config.__dict__.get(name)
        if _same(value, decl.default):
            continue
        if effect.accept is not None and effect.accept(value, config):
            continue
        allowed = effect.allowed or f"{decl.default!r} (the default; not implemented otherwise)"
        raise ConfigValueError(cls.__name__, name, value, allowed, effect.note)


# ---------------------------------------------------------------------------------------------
# Device-bound fields: one log line per field and device
# ---------------------------------------------------------------------------------------------

_REPORTED = set()


def _configs_of(configs, seen=None) -> List[Any]:
    """The config instances in ``configs`` and those they link to (each once)."""
    seen = set() if seen is None else seen
    if hasattr(configs, "_fields") and hasattr(type(configs), "section"):
        if id(configs) in seen:
            return []
        seen.add(id(configs))
        found = [configs]
        for name in type(configs)._links:  # pylint: disable=protected-access
            linked = configs.__dict__.get(name)
            if linked is not None:
                found.extend(_configs_of(linked, seen))
        return found
    from .all_config import SECTIONS  # pylint: disable=import-outside-toplevel

    found = []
    if hasattr(configs, "training_config") or hasattr(configs, "model_config"):
        for section in SECTIONS:
            sub = getattr(configs, section, None)
            if sub is not None:
                found.extend(_configs_of(sub, seen))
        return found
    for item in configs:
        found.extend(_configs_of(item, seen))
    return found


def _asks_for_device(effect: Effect, value: Any, default: Any, explicit: bool) -> bool:
    if effect.has_trigger:
        # A default that already asks for the feature is reported only when the user set it.
        return _same(value, effect.trigger) and (explicit or not _same(value, default))
    return not _same(value, default)


def report_device_bound(configs, device: str, logger: Optional[logging.Logger] = None
                        ) -> List[str]:
    """Log once per field the device-bound fields that ask for a feature this device lacks.

    On Ascend that is only the fields this project has no Ascend implementation of (no
    ``ascend`` readers in their entry); elsewhere every device-bound field that is set.

    Args:
        configs: An AllConfig, one config (with the configs it links to, e.g. a
            TransformerConfig's parallel and training configs), or an iterable of configs.
        device: The device target ('CPU', 'Ascend', 'GPU'), from
            ``mindspeed_ms.core.communication.device_target()``.
        logger: Where to log (default: the ``mindspeed_ms`` logger).

    Returns:
        The ``section.field`` names logged by this call (already reported ones are not
        repeated).
    """
    log = logger or logging.getLogger("mindspeed_ms")
    logged = []
    for config in _configs_of(configs):
        cls = type(config)
        explicit = config.explicit_fields() if hasattr(config, "explicit_fields") else frozenset()
        for name, decl in cls._fields.items():  # pylint: disable=protected-access
            effect = EFFECTS.get((cls.section, name))
            if effect is None or effect.status != "device_bound":
                continue
            # On Ascend only a field without an Ascend path here has nothing to do: say so there too.
            if device == "Ascend" and effect.readers:
                continue
            value = config.__dict__.get(name)
            if not _asks_for_device(effect, value, decl.default, name in explicit):
                continue
            key = (cls.section, name, device)
            if key in _REPORTED:
                continue
            _REPORTED.add(key)
            log.info("%s.%s=%r has no effect on %s: %s", cls.section, name, value, device,
                     effect.note)
            logged.append(f"{cls.section}.{name}")
    return logged


# ---------------------------------------------------------------------------------------------
# The table of docs/config.md
# ---------------------------------------------------------------------------------------------

TABLE_BEGIN = "<!-- field-status table: generated by `python -m mindspeed_ms.core.config.effects --write docs/config.md`; do not edit -->"
TABLE_END = "<!-- end of field-status table -->"

_STATUS_WORDS = {"works": "works", "device_bound": "device-bound", "refused": "refused"}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The field-status table of every field of every section (with the counts on top)."""
    from .all_config import AllConfig  # pylint: disable=import-outside-toplevel
    from .metadata import field_specs  # pylint: disable=import-outside-toplevel

    specs = field_specs(AllConfig, include_virtual=True)
    counts = {status: 0 for status in STATUSES}
    rows = []
    for spec in specs:
        effect = effect_of(spec.section, spec.name)
        status = effect.status if effect is not None else "pending"
        counts[status] = counts.get(status, 0) + 1
        if effect is None:
            detail = ""
        elif effect.status == "works":
            readers = ", ".join(f"`{r.replace('mindspeed_ms/', '')}`" for r in effect.readers)
            via = f" (reads {', '.join(effect.via)})" if effect.via else ""
            detail = readers + via + (f"; {effect.note}" if effect.note else "")
        elif effect.readers:
            ascend = ", ".join(f"`{r.replace('mindspeed_ms/', '')}`" for r in effect.readers)
            detail = f"{effect.note} (Ascend path: {ascend})"
        else:
            detail = effect.note
        default = spec.derived_default if spec.default is None and spec.derived_default \
            else repr(spec.default)
        if spec.kind == "virtual":
            default = "(writes " + ", ".join(spec.targets) + ")"
        rows.append(f"| {spec.section} | `{spec.name}` | {_cell(spec.type)} | {_cell(default)} | "
                    f"{_STATUS_WORDS.get(status, status)} | {_cell(detail)} |")
    head = (f"{len(specs)} fields: **{counts['works']} work**, **{counts['device_bound']} "
            f"device-bound**, **{counts['refused']} refused**"
            + (f", {counts['pending']} pending (no status yet)" if counts.get("pending") else "")
            + ".")
    lines = [head, "",
             "| section | field | type | default | status | readers / note |",
             "|---|---|---|---|---|---|"] + rows
    return "\n".join(lines) + "\n"


def update_markdown(text: str) -> str:
    """``text`` (docs/config.md) with the table between the markers replaced (or appended)."""
    block = f"{TABLE_BEGIN}\n{markdown_table()}{TABLE_END}"
    if TABLE_BEGIN in text and TABLE_END in text:
        start = text.index(TABLE_BEGIN)
        end = text.index(TABLE_END) + len(TABLE_END)
        return text[:start] + block + text[end:]
    return text.rstrip("\n") + "\n\n## Field status\n\n" + block + "\n"


def _main(argv: List[str]) -> int:
    if "--write" in argv:
        path = argv[argv.index("--write") + 1]
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(update_markdown(text))
        return 0
    if "--markdown" in argv:
        sys.stdout.write(markdown_table())
        return 0
    sys.stderr.write("usage: python -m mindspeed_ms.core.config.effects --markdown | --write PATH\n")
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
