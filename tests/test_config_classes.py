"""Config classes: documented defaults and signatures, added fields, aliases, validation errors."""

import copy
import inspect
import warnings

import pytest

from mindspeed_ms.core.config import (
    AllConfig,
    ConfigTypeError,
    ConfigValueError,
    DatasetConfig,
    LoraConfig,
    ModelParallelConfig,
    MoEConfig,
    OptimizerConfig,
    TrainingConfig,
    TransformerConfig,
    UnknownConfigKeyWarning,
    field_spec,
    field_specs,
    to_ms_dtype,
    validate_field,
)

# Documented defaults, copied from the signatures of sections 1.1.2 and 1.1.4-1.1.7 of the
# MindSpeed-Core-MS r0.1.0 API reference, in documented order.
DOC_DATASET = [
    ("dataset_dir", "./dataset"), ("shuffle", False), ("batch_size", 1), ("micro_batch_num", 1),
    ("train_samples", 0), ("data_layout", "BSH"), ("eos_token_id", 0),
]
DOC_PARALLEL = [
    ("tensor_model_parallel_size", 1), ("pipeline_model_parallel_size", 1),
    ("context_parallel_size", 1), ("context_parallel_algo", "ulysses_cp_algo"),
    ("ulysses_degree_in_cp", None), ("expert_model_parallel_size", 1),
    ("virtual_pipeline_model_parallel_size", None), ("sequence_parallel", False),
    ("recv_dtype", "float32"), ("zero_level", None), ("standalone_embedding_stage", False),
    ("overlap_grad_reduce", False), ("gradient_accumulation_fusion", False),
    ("overlap_p2p_comm", True), ("use_cpu_initialization", False), ("deterministic_mode", False),
    ("num_layer_list", None), ("recompute_config", None), ("recompute", None),
    ("select_recompute", None), ("select_comm_recompute", None), ("variable_seq_lengths", False),
]
DOC_MOE = [
    ("num_experts", 1), ("moe_grouped_gemm", False), ("moe_router_topk", 2),
    ("moe_router_load_balancing_type", "none"), ("moe_token_dispatcher_type", "alltoall"),
    ("use_self_defined_alltoall", False), ("moe_expert_capacity_factor", None),
    ("moe_pad_expert_input_to_capacity", False), ("moe_token_drop_policy", "probs"),
    ("moe_aux_loss_coeff", 0.0), ("moe_z_loss_coeff", None), ("moe_input_jitter_eps", None),
]
DOC_TRAINING = [
    ("seed", None), ("output_dir", "./output"), ("training_iters", 0), ("epochs", None),
    ("log_interval", None), ("eval_interval", None), ("save_interval", None),
    ("best_metric_comparison", None), ("eval_metric", None), ("grad_clip_kwargs", None),
    ("loss_scale", None), ("loss_scale_value", None), ("loss_scale_factor", None),
    ("loss_scale_window", None), ("loss_reduction", "mean"), ("calculate_per_token_loss", False),
    ("wrap_with_ddp", False), ("accumulate_allreduce_grads_in_fp32", False),
    ("overlap_grad_reduce", False), ("delay_grad_reduce", False),
    ("use_distributed_optimizer", False), ("bucket_size", None), ("check_for_nan_in_grad", False),
    ("fp16", False), ("bf16", False), ("resume_training", False), ("crc_check", False),
    ("load_checkpoint", ""), ("enable_compile_cache", False), ("compile_cache_path", None),
    ("ckpt_format", "ckpt"), ("prefix", "network"), ("keep_checkpoint_max", 5),
    ("no_load_optim", False), ("no_load_rng", True), ("new_dataset", False),
    ("enable_mem_align", False), ("profile", False), ("profile_save_path", None),
    ("profile_step_start", 1), ("profile_step_end", 5), ("profile_level", "level0"),
    ("profile_with_stack", False), ("profile_memory", False), ("profile_framework", "all"),
    ("profile_communication", False), ("profile_parallel_strategy", False),
    ("profile_aicore_metrics", 0), ("profile_l2_cache", False), ("profile_hbm_ddr", False),
    ("profile_pcie", False), ("profile_data_process", False),
    ("profile_data_simplification", False), ("profile_op_time", True),
    ("profile_offline_analyse", False), ("profile_dynamic_profiler_config_path", ""),
]
DOC_TRANSFORMER = [
    ("attention_type", "self_attn"), ("position_embedding_type", "absolute"),
    ("parallel_position_embedding", False), ("use_query_layer", False),
    ("use_visual_encoder", False), ("use_retriever", False), ("group_query_attention", False),
    ("num_query_groups", 32), ("qkv_has_bias", True), ("out_proj_has_bias", True),
    ("head_skip_weight_param_allocation", True), ("apply_query_key_layer_scaling", False),
    ("use_flash_attention", False), ("fa_config", None), ("enable_flash_sp", False),
    ("mask_func_type", "attn_mask_add"), ("mlp_has_bias", True), ("hidden_act", "gelu"),
    ("normalization", "LayerNorm"), ("norm_epsilon", 1.0e-5),
    ("apply_residual_connection_post_norm", False), ("use_final_norm", True),
    ("residual_connection_dtype", "float32"), ("init_method_std", 0.01),
    ("params_dtype", "float32"), ("embedding_init_dtype", "float32"),
    ("compute_dtype", "float32"), ("softmax_compute_dtype", "float32"), ("init_method", "normal"),
    ("bias_init", "zeros"), ("fp16_lm_cross_entropy", False), ("attention_dropout", 0.0),
    ("out_hidden_size", None), ("num_experts", None),
    ("untie_embeddings_and_output_weights", False), ("flatten_labels_and_input_mask", True),
    ("recompute_method", None), ("recompute_num_layers", None), ("recompute_granularity", None),
    ("fp32_residual_connection", False), ("kv_channels", None), ("hidden_dropout", 0.0),
    ("bias_dropout_fusion", False), ("fp8_format", None),
    ("clone_scatter_output_in_embedding", False), ("add_bias_linear", False),
    ("attention_softmax_in_fp32", True), ("masked_softmax_fusion", False),
    ("distribute_saved_activations", False), ("retro_add_retriever", False),
    ("transformer_impl", "local"), ("encoder_num_layers", None), ("decoder_num_layers", None),
    ("model_type", "encoder_or_decoder"), ("select_comm_recompute", False),
    ("select_recompute", False), ("apply_rope_fusion", False), ("use_sandwich_norm", False),
    ("attn_post_norm_scale", 1.0), ("ffn_post_norm_scale", 1.0), ("apply_swiglu_fusion", False),
]
TRANSFORMER_HEAD = ["vocab_size", "num_layers", "num_attention_heads", "hidden_size",
                    "ffn_hidden_size", "parallel_config", "training_config", "lora_config",
                    "dataset_config", "moe_config", "attention_type", "position_embedding_type",
                    "parallel_position_embedding", "rotary_config"]
TRAINING_HEAD = ["parallel_config", "dataset_config", "lora_config", "seed", "output_dir",
                 "training_iters"]


def small_model(**kwargs):
    parallel = kwargs.pop("parallel_config", None) or ModelParallelConfig()
    training = kwargs.pop("training_config", None) or TrainingConfig(parallel_config=parallel)
    args = dict(vocab_size=128, num_layers=2, num_attention_heads=4, hidden_size=64,
                ffn_hidden_size=256, parallel_config=parallel, training_config=training)
    args.update(kwargs)
    return TransformerConfig(**args)


@pytest.mark.parametrize("cls, documented", [
    (DatasetConfig, DOC_DATASET), (ModelParallelConfig, DOC_PARALLEL), (MoEConfig, DOC_MOE),
    (TrainingConfig, DOC_TRAINING),
])
def test_documented_defaults_and_order(cls, documented):
    config = cls()
    for name, default in documented:
        assert config.raw(name) == default, name
        assert type(config.raw(name)) is type(default), name
    params = [p for p in inspect.signature(cls).parameters if p != "kwargs"]
    names = [name for name, _ in documented]
    positional = [p for p in params if p in names]
    assert positional == names


def test_transformer_documented_defaults_and_order():
    config = small_model()
    for name, default in DOC_TRANSFORMER:
        assert config.raw(name) == default, name
    params = list(inspect.signature(TransformerConfig).parameters)
    assert params[:len(TRANSFORMER_HEAD)] == TRANSFORMER_HEAD
    documented = [name for name, _ in DOC_TRANSFORMER]
    assert [p for p in params if p in documented] == documented
    assert list(inspect.signature(TrainingConfig).parameters)[:len(TRAINING_HEAD)] == TRAINING_HEAD


def test_optimizer_and_lora_defaults():
    opt = OptimizerConfig()
    assert opt.optimizer_type == "AdamWeightDecay"
    assert opt.learning_rate == 1e-3 and opt.min_lr == 0.0
    assert opt.lr_decay_style == "constant" and opt.lr_warmup_iters == 0
    assert opt.lr_decay_iters is None and opt.betas == (0.9, 0.999)
    assert opt.weight_decay == 0.0 and opt.start_weight_decay == 0.0 and opt.end_weight_decay == 0.0
    assert opt.weight_decay_incr_style == "constant" and opt.clip_grad == 0.0
    assert opt.use_checkpoint_opt_param_scheduler is True
    assert opt.override_opt_param_scheduler is False and opt.overlap_param_gather is False
    lora = LoraConfig()
    assert (lora.use_lora, lora.lora_rank, lora.lora_alpha, lora.lora_dropout,
            lora.target_cells) == (False, 8, 16, 0.0, [])


def test_positional_arguments_follow_the_documented_order():
    parallel = ModelParallelConfig(2, 1, 1)
    assert parallel.tensor_model_parallel_size == 2
    model = TransformerConfig(128, 2, 4, 64, 256, parallel)
    assert (model.vocab_size, model.num_layers, model.num_attention_heads, model.hidden_size,
            model.ffn_hidden_size) == (128, 2, 4, 64, 256)
    assert model.parallel_config is parallel
    with pytest.raises(TypeError):
        DatasetConfig(*range(100))


def test_added_model_fields_and_derived_defaults():
    model = small_model()
    assert model.seq_length is None and model.gated_linear_unit is False
    assert model.rotary_base == 10000 and model.rotary_percent == 1.0
    assert model.rotary_interleaved is False and model.rotary_seq_len_interpolation_factor is None
    assert model.kv_channels == 16 and model.raw("kv_channels") is None
    assert model.out_hidden_size == 64 and model.num_experts is None
    model.seq_length = 32
    assert model.max_position_embeddings == 32
    model.max_position_embeddings = 128
    assert model.max_position_embeddings == 128
    model.kv_channels = 8
    assert model.kv_channels == 8
    no_ffn = TransformerConfig(vocab_size=8, num_layers=1, num_attention_heads=2, hidden_size=16)
    assert no_ffn.ffn_hidden_size == 64
    # seq_length falls back to the dataset config's.
    with_data = TransformerConfig(vocab_size=8, num_layers=1, num_attention_heads=2,
                                  hidden_size=16, dataset_config=DatasetConfig(seq_length=24))
    assert with_data.seq_length == 24 and with_data.max_position_embeddings == 24


def test_links_default_and_share():
    parallel = ModelParallelConfig(tensor_model_parallel_size=2)
    dataset = DatasetConfig(batch_size=4)
    training = TrainingConfig(parallel_config=parallel, dataset_config=dataset)
    model = small_model(parallel_config=parallel, training_config=training)
    assert model.dataset_config is dataset and model.lora_config is training.lora_config
    assert model.parallel_config.sequence_parallel is False
    alone = TransformerConfig(vocab_size=8, num_layers=1, num_attention_heads=2, hidden_size=16,
                              parallel_config=parallel, training_config=None)
    assert alone.training_config.parallel_config is parallel
    empty = TransformerConfig()
    assert empty.missing_required() == ["vocab_size", "num_layers", "num_attention_heads",
                                        "hidden_size", "seq_length"]
    with pytest.raises(ValueError, match="vocab_size"):
        empty.check_required()
    with pytest.raises(ConfigTypeError, match="ModelParallelConfig instance"):
        TrainingConfig(parallel_config={"tensor_model_parallel_size": 2})
    with pytest.raises(ConfigValueError, match="disagree on parallelism"):
        small_model(parallel_config=ModelParallelConfig(tensor_model_parallel_size=2),
                    training_config=TrainingConfig(parallel_config=ModelParallelConfig()))


def test_aliases():
    model = small_model(attention_dropout_rate=0.1, hidden_dropout_rate=0.2, use_flash_attn=True,
                        embedding_dtype="bf16", use_fused_swiglu=True)
    assert model.attention_dropout == 0.1 and model.attention_dropout_rate == 0.1
    assert model.hidden_dropout == 0.2 and model.use_flash_attention is True
    assert model.embedding_init_dtype == "bfloat16" and model.apply_swiglu_fusion is True
    model.attention_dropout_rate = 0.3
    assert model.attention_dropout == 0.3
    assert TransformerConfig(padded_vocab_size=64).vocab_size == 64
    moe = MoEConfig(expert_num=8, capacity_factor=2.0)
    assert moe.num_experts == 8 and moe.moe_expert_capacity_factor == 2.0
    parallel = ModelParallelConfig(model_parallel=2, pipeline_stage=2, expert_parallel=2,
                                   use_seq_parallel=True)
    assert (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
            parallel.expert_model_parallel_size, parallel.sequence_parallel) == (2, 2, 2, True)
    assert OptimizerConfig(lr=0.1, adam_eps=1e-6).eps == 1e-6
    assert TrainingConfig(train_iters=7).training_iters == 7
    with pytest.raises(ConfigValueError, match="given both"):
        small_model(attention_dropout=0.1, attention_dropout_rate=0.2)
    # The same value twice is fine.
    assert small_model(attention_dropout=0.1, attention_dropout_rate=0.1).attention_dropout == 0.1


def test_gradient_accumulation_clipping_and_loss_scale_spellings():
    training = TrainingConfig(gradient_accumulation_steps=4, use_clip_grad=True,
                              max_grad_norm=0.5)
    assert training.dataset_config.micro_batch_num == 4
    assert training.gradient_accumulation_steps == 4
    assert training.grad_clip_kwargs == {"grad_clip_type": "ClipGlobalNorm", "clip_value": 0.5}
    assert training.use_clip_grad and training.max_grad_norm == 0.5
    training.max_grad_norm = 2.0
    assert training.grad_clip_kwargs["clip_value"] == 2.0
    training.use_clip_grad = False
    assert training.grad_clip_kwargs is None and training.max_grad_norm == 2.0
    training.use_clip_grad = True
    assert training.grad_clip_kwargs == {"grad_clip_type": "ClipGlobalNorm", "clip_value": 2.0}
    assert TrainingConfig(use_clip_grad=True).grad_clip_kwargs["clip_value"] == 1.0
    assert TrainingConfig(max_grad_norm=3.0).grad_clip_kwargs is None
    by_value = TrainingConfig(grad_clip_kwargs={"grad_clip_type": "clipbyvalue", "clip_value": 1})
    assert by_value.grad_clip_kwargs == {"grad_clip_type": "ClipByValue", "clip_value": 1.0}
    with pytest.raises(ConfigValueError, match="disagree"):
        TrainingConfig(grad_clip_kwargs={"clip_value": 1.0}, use_clip_grad=False)
    with pytest.raises(ConfigValueError, match="micro_batch_num"):
        TrainingConfig(dataset_config=DatasetConfig(micro_batch_num=2),
                       gradient_accumulation_steps=4)
    assert DatasetConfig(gradient_accumulation_steps=3).micro_batch_num == 3

    static = TrainingConfig(loss_scale=1024)
    assert static.loss_scale_settings() == {"type": "FixedLossScaleUpdateCell",
                                            "loss_scale_value": 1024}
    dynamic = TrainingConfig(loss_scale_value=2 ** 16, loss_scale_factor=2, loss_scale_window=100)
    assert dynamic.loss_scale_settings() == {"type": "DynamicLossScaleUpdateCell",
                                             "loss_scale_value": 65536, "scale_factor": 2,
                                             "scale_window": 100}
    adaptive = TrainingConfig(scale_sense={"type": "AdaptiveLossScaleUpdateCell",
                                           "loss_scale_value": 4294967296, "scale_factor": 2,
                                           "scale_window": 20, "max_scale_window": 1000,
                                           "min_scale_window": 20})
    assert adaptive.loss_scale_settings()["type"] == "AdaptiveLossScaleUpdateCell"
    assert TrainingConfig().loss_scale_settings() is None
    assert TrainingConfig(scale_sense=128.0).scale_sense == {
        "type": "FixedLossScaleUpdateCell", "loss_scale_value": 128.0}

    optimizer = OptimizerConfig(clip_grad=1.0)
    assert TrainingConfig().grad_clip_settings(optimizer) == {"grad_clip_type": "ClipGlobalNorm",
                                                              "clip_value": 1.0}
    assert TrainingConfig().grad_clip_settings(OptimizerConfig()) is None
    assert by_value.grad_clip_settings(optimizer)["grad_clip_type"] == "ClipByValue"


def test_betas_and_rotary_spellings():
    opt = OptimizerConfig(adam_beta1=0.8, adam_beta2=0.95)
    assert opt.betas == (0.8, 0.95) and opt.adam_beta1 == 0.8
    opt.adam_beta2 = 0.9
    assert opt.betas == (0.8, 0.9)
    assert OptimizerConfig(betas=[0.5, 0.6]).betas == (0.5, 0.6)
    with pytest.raises(ConfigValueError, match="disagree"):
        OptimizerConfig(betas=(0.9, 0.99), adam_beta1=0.5)
    model = small_model(rotary_config={"rotary_base": 500000, "rotary_percent": 0.5,
                                       "seq_len_interpolation_factor": 2.0})
    assert model.rotary_base == 500000 and model.rotary_percent == 0.5
    assert model.rotary_seq_len_interpolation_factor == 2.0
    assert model.rotary_config["rotary_base"] == 500000
    with pytest.raises(ConfigValueError, match="unknown keys"):
        small_model(rotary_config={"rotary_bse": 1})
    with pytest.raises(ConfigValueError, match="disagree"):
        small_model(rotary_base=10, rotary_config={"rotary_base": 20})


def test_unknown_options_are_kept_and_warned():
    with pytest.warns(UnknownConfigKeyWarning, match="DatasetConfig.*'dataset_size'"):
        dataset = DatasetConfig(batch_size=1, dataset_size=2, seq_length=1024)
    assert dataset.dataset_size == 2 and dataset.extra_options() == {"dataset_size": 2}
    assert dataset.to_dict()["dataset_size"] == 2
    with pytest.warns(UnknownConfigKeyWarning, match="TransformerConfig.*'param_init_type'"):
        model = small_model(param_init_type="float32")
    assert model.param_init_type == "float32"
    with pytest.raises(ConfigValueError, match="clashes"):
        DatasetConfig(to_dict=1)
    with pytest.raises(ConfigValueError, match="clashes"):
        DatasetConfig(_explicit=1)
    # Setting an attribute afterwards (e.g. a layer index on a copy) is plain and silent.
    moe = MoEConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moe.cur_layer = 3
    assert moe.cur_layer == 3


def test_dtypes_stay_strings_and_convert_lazily():
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    model = small_model(params_dtype="BF16", compute_dtype=ms.float16,
                        softmax_compute_dtype="float")
    assert (model.params_dtype, model.compute_dtype, model.softmax_compute_dtype) == \
        ("bfloat16", "float16", "float32")
    assert to_ms_dtype(model.params_dtype) == ms.bfloat16
    assert to_ms_dtype("float32") == ms.float32 and to_ms_dtype(ms.float16) == ms.float16
    with pytest.raises(ValueError):
        to_ms_dtype("int8")
    with pytest.raises(TypeError):
        to_ms_dtype(3)
    with pytest.raises(ConfigValueError, match="params_dtype"):
        small_model(params_dtype="float64")


# ----------------------------------------------------------------------------------------------
# Validation errors, one by one
# ----------------------------------------------------------------------------------------------

FIELD_ERRORS = [
    # (class, field, bad value, exception, text in the message)
    (ModelParallelConfig, "tensor_model_parallel_size", 0, ConfigValueError, ">= 1"),
    (ModelParallelConfig, "pipeline_model_parallel_size", -1, ConfigValueError, ">= 1"),
    (ModelParallelConfig, "context_parallel_size", 1.5, ConfigValueError, "whole number"),
    (ModelParallelConfig, "expert_model_parallel_size", "two", ConfigTypeError, "integer"),
    (ModelParallelConfig, "context_parallel_algo", "ring", ConfigValueError, "hybrid_cp_algo"),
    (ModelParallelConfig, "zero_level", "z4", ConfigValueError, "'z1', 'z2', 'z3'"),
    (ModelParallelConfig, "zero_level", 1, ConfigTypeError, "string"),
    (ModelParallelConfig, "sequence_parallel", 1, ConfigTypeError, "bool"),
    (ModelParallelConfig, "sequence_parallel", "maybe", ConfigTypeError, "bool"),
    (ModelParallelConfig, "recv_dtype", "int32", ConfigValueError, "'bfloat16'"),
    (ModelParallelConfig, "num_layer_list", [1, [2]], ConfigValueError, "mix"),
    (ModelParallelConfig, "num_layer_list", [[1, 2], [1]], ConfigValueError, "same"),
    (ModelParallelConfig, "num_layer_list", "[[1,2", ConfigValueError, "could not read"),
    (ModelParallelConfig, "num_layer_list", [-1], ConfigValueError, ">= 0"),
    (ModelParallelConfig, "noop_layers", ["a"], ConfigTypeError, "number"),
    (ModelParallelConfig, "recompute", {"a": 1}, ConfigTypeError, "a list"),
    (ModelParallelConfig, "recompute_config", [1], ConfigTypeError, "mapping"),
    (DatasetConfig, "data_layout", "HSB", ConfigValueError, "'BSH', 'SBH'"),
    (DatasetConfig, "batch_size", 0, ConfigValueError, ">= 1"),
    (DatasetConfig, "micro_batch_num", None, ConfigTypeError, "None is not allowed"),
    (DatasetConfig, "dataset_type", "json", ConfigValueError, "'char', 'mmap', 'synthetic'"),
    (DatasetConfig, "split", "90,10,0,5", ConfigValueError, "1 to 3 parts"),
    (DatasetConfig, "split", "0,0", ConfigValueError, "positive sum"),
    (DatasetConfig, "split", 5, ConfigTypeError, "90,10,0"),
    (DatasetConfig, "eos_token_id", -1, ConfigValueError, ">= 0"),
    (DatasetConfig, "data_path", {"a": 1}, ConfigTypeError, "path"),
    (DatasetConfig, "num_workers", -1, ConfigValueError, ">= 0"),
    (MoEConfig, "moe_router_load_balancing_type", "sinkhorn", ConfigValueError, "aux_loss"),
    (MoEConfig, "moe_token_dispatcher_type", "allgather", ConfigValueError, "alltoall"),
    (MoEConfig, "moe_token_drop_policy", "random", ConfigValueError, "'probs', 'position'"),
    (MoEConfig, "moe_expert_capacity_factor", 0, ConfigValueError, "> 0"),
    (MoEConfig, "moe_aux_loss_coeff", -0.1, ConfigValueError, ">= 0"),
    (MoEConfig, "cold_token_percent", 0.0, ConfigValueError, "(0.0, 1.0]"),
    (MoEConfig, "cold_token_percent", 1.5, ConfigValueError, "(0.0, 1.0]"),
    (MoEConfig, "update_step", 0, ConfigValueError, ">= 1"),
    (MoEConfig, "moe_layer_freq", 0, ConfigValueError, ">= 1"),
    (MoEConfig, "moe_layer_freq", [1, 2], ConfigValueError, "0 (dense) or 1"),
    (MoEConfig, "moe_layer_freq", [], ConfigValueError, "empty"),
    (TrainingConfig, "loss_reduction", "max", ConfigValueError, "'mean', 'sum'"),
    (TrainingConfig, "ckpt_format", "pt", ConfigValueError, "safetensors"),
    (TrainingConfig, "profile_level", "level9", ConfigValueError, "level2"),
    (TrainingConfig, "profile_framework", "gpu", ConfigValueError, "'all' or 'time'"),
    (TrainingConfig, "profile_aicore_metrics", 9, ConfigValueError, "[-1, 5]"),
    (TrainingConfig, "best_metric_comparison", "equal", ConfigValueError, "greater_equal"),
    (TrainingConfig, "loss_scale", 0, ConfigValueError, "> 0"),
    (TrainingConfig, "keep_checkpoint_max", 0, ConfigValueError, ">= 1"),
    (TrainingConfig, "grad_clip_kwargs", {"clip_value": 0}, ConfigValueError, "> 0"),
    (TrainingConfig, "grad_clip_kwargs", {"grad_clip_type": "L1", "clip_value": 1},
     ConfigValueError, "ClipGlobalNorm"),
    (TrainingConfig, "grad_clip_kwargs", {"norm": 1}, ConfigValueError, "unknown keys"),
    (TrainingConfig, "grad_clip_kwargs", {"grad_clip_type": "ClipByValue"}, ConfigValueError,
     "clip_value is required"),
    (TrainingConfig, "grad_clip_kwargs", 1.0, ConfigTypeError, "mapping"),
    (TrainingConfig, "scale_sense", {"type": "AdaptiveLossScaleUpdateCell",
                                     "loss_scale_value": 1, "scale_factor": 2,
                                     "scale_window": 20, "max_scale_window": 20,
                                     "min_scale_window": 20}, ConfigValueError, "greater than"),
    (TrainingConfig, "scale_sense", {"type": "AdaptiveLossScaleUpdateCell",
                                     "loss_scale_value": 1, "scale_factor": 2,
                                     "scale_window": 20.0}, ConfigTypeError, "must be an int"),
    (TrainingConfig, "scale_sense", {"type": "AdaptiveLossScaleUpdateCell",
                                     "loss_scale_value": 1, "scale_factor": 2,
                                     "scale_window": 20, "min_scale_window": 0},
     ConfigValueError, "must be > 0"),
    (TrainingConfig, "scale_sense", {"type": "DynamicLossScaleUpdateCell",
                                     "loss_scale_value": 1}, ConfigValueError, "needs"),
    (TrainingConfig, "scale_sense", {"type": "Foo"}, ConfigValueError, "'type' must be"),
    (TrainingConfig, "scale_sense", {"type": "FixedLossScaleUpdateCell", "loss_scale_value": 1,
                                     "x": 1}, ConfigValueError, "unknown keys"),
    (TrainingConfig, "scale_sense", "dynamic", ConfigTypeError, "mapping"),
    (TrainingConfig, "gradient_accumulation_steps", 0, ConfigValueError, ">= 1"),
    (TrainingConfig, "max_grad_norm", -1.0, ConfigValueError, "> 0"),
    (OptimizerConfig, "optimizer_type", "Lion", ConfigValueError, "AdamWeightDecay"),
    (OptimizerConfig, "lr_decay_style", "step", ConfigValueError, "inverse-square-root"),
    (OptimizerConfig, "weight_decay_incr_style", "step", ConfigValueError, "'linear'"),
    (OptimizerConfig, "lr_wsd_decay_style", "step", ConfigValueError, "'exponential'"),
    (OptimizerConfig, "learning_rate", -1e-3, ConfigValueError, ">= 0.0"),
    (OptimizerConfig, "learning_rate", float("nan"), ConfigValueError, "finite"),
    (OptimizerConfig, "eps", 0.0, ConfigValueError, "> 0.0"),
    (OptimizerConfig, "betas", (0.9,), ConfigValueError, "exactly two"),
    (OptimizerConfig, "betas", (0.9, 1.0), ConfigValueError, "[0, 1)"),
    (OptimizerConfig, "momentum", 1.0, ConfigValueError, "[0.0, 1.0)"),
    (OptimizerConfig, "adam_beta1", 1.5, ConfigValueError, "[0.0, 1.0)"),
    (LoraConfig, "lora_rank", 0, ConfigValueError, ">= 1"),
    (LoraConfig, "lora_alpha", 0, ConfigValueError, "> 0"),
    (LoraConfig, "lora_dropout", 1.0, ConfigValueError, "[0.0, 1.0)"),
    (LoraConfig, "target_cells", ["("], ConfigValueError, "regular expression"),
    (LoraConfig, "target_cells", [1], ConfigTypeError, "strings"),
    (TransformerConfig, "hidden_act", "tanh", ConfigValueError, "swiglu"),
    (TransformerConfig, "normalization", "BatchNorm", ConfigValueError, "RMSNorm"),
    (TransformerConfig, "position_embedding_type", "alibi", ConfigValueError, "rope"),
    (TransformerConfig, "attention_type", "full", ConfigValueError, "self_attn"),
    (TransformerConfig, "mask_func_type", "mul", ConfigValueError, "attn_mask_fill"),
    (TransformerConfig, "init_method", "kaiming", ConfigValueError, "xavier_uniform"),
    (TransformerConfig, "bias_init", "xavier_uniform", ConfigValueError, "'zeros'"),
    (TransformerConfig, "recompute_granularity", "partial", ConfigValueError, "selective"),
    (TransformerConfig, "recompute_method", "all", ConfigValueError, "'uniform', 'block'"),
    (TransformerConfig, "transformer_impl", "transformer_engine", ConfigValueError, "'local'"),
    (TransformerConfig, "fp8_format", "e5m2", ConfigValueError, "hybrid"),
    (TransformerConfig, "model_type", "decoder", ConfigValueError, "encoder_or_decoder"),
    (TransformerConfig, "attention_dropout", 1.0, ConfigValueError, "[0.0, 1.0)"),
    (TransformerConfig, "hidden_dropout", -0.1, ConfigValueError, "[0.0, 1.0)"),
    (TransformerConfig, "norm_epsilon", 0, ConfigValueError, "> 0.0"),
    (TransformerConfig, "init_method_std", "abc", ConfigTypeError, "number"),
    (TransformerConfig, "rotary_percent", 0.0, ConfigValueError, "(0.0, 1.0]"),
    (TransformerConfig, "vocab_size", 0, ConfigValueError, ">= 1"),
    (TransformerConfig, "hidden_size", None, None, None),
    (TransformerConfig, "fa_config", {"input_layout": "XYZ"}, ConfigValueError, "input_layout"),
    (TransformerConfig, "fa_config", {"sparse_mode": 4}, ConfigValueError, "sparse_mode"),
    (TransformerConfig, "fa_config", {"pre_tokens": -5, "next_tokens": 2}, ConfigValueError,
     "pre_tokens + next_tokens"),
    (TransformerConfig, "fa_config", {"keep_prob": 0.9}, ConfigValueError, "unknown key"),
    (TransformerConfig, "fa_config", {"pre_tokens": "x"}, ConfigTypeError, "number"),
    (TransformerConfig, "fa_config", {"window": 3}, ConfigValueError, "unknown key"),
    (TransformerConfig, "fa_config", {1: 3}, ConfigTypeError, "keys must be strings"),
    (TransformerConfig, "params_dtype", [1], ConfigTypeError, "dtype"),
]


@pytest.mark.parametrize("cls, name, value, error, text", FIELD_ERRORS,
                         ids=[f"{c.__name__}.{n}={v!r}"[:60] for c, n, v, _, _ in FIELD_ERRORS])
def test_field_errors(cls, name, value, error, text):
    if error is None:
        assert validate_field(cls, name, value) == value
        return
    # The same error from validate_field, from the constructor and from assignment; the message
    # names the config, the field (canonical name), the value and what is allowed.
    with pytest.raises(error) as info:
        validate_field(cls, name, value)
    assert text in str(info.value)
    assert str(info.value).startswith(f"{cls.__name__}.{cls.canonical_name(name)}: got ")
    assert "allowed:" in str(info.value)
    assert info.value.config == cls.__name__ and info.value.value is value
    with pytest.raises(error, match=r"^" + cls.__name__):
        if cls is TransformerConfig:
            small_model(**{name: value})
        else:
            cls(**{name: value})
    config = small_model() if cls is TransformerConfig else cls()
    before = config.to_dict()
    with pytest.raises(error):
        setattr(config, name, value)
    assert config.to_dict() == before


CROSS_ERRORS = [
    (ModelParallelConfig, dict(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo"),
     "ulysses_degree_in_cp"),
    (ModelParallelConfig, dict(context_parallel_size=4, context_parallel_algo="hybrid_cp_algo",
                               ulysses_degree_in_cp=3), "divisor of context_parallel_size=4"),
    (ModelParallelConfig, dict(virtual_pipeline_model_parallel_size=2), "at least 2 pipeline"),
    (ModelParallelConfig, dict(num_layers_per_virtual_pipeline_stage=2), "at least 2 pipeline"),
    (ModelParallelConfig, dict(standalone_embedding_stage=True), "at least 2 stages"),
    (ModelParallelConfig, dict(pipeline_model_parallel_size=2, num_layer_list=[1, 1, 1]),
     "one entry per pipeline stage (2)"),
    (ModelParallelConfig, dict(pipeline_model_parallel_size=2,
                               virtual_pipeline_model_parallel_size=2,
                               num_layer_list=[[1, 1, 1], [1, 1, 1]]), "virtual chunk (2)"),
    (TrainingConfig, dict(fp16=True, bf16=True), "fp16 and bf16 are exclusive"),
    (TrainingConfig, dict(loss_scale_value=1024, loss_scale_window=10), "loss_scale_factor"),
    (TrainingConfig, dict(loss_scale_factor=2), "loss_scale_value"),
    (TrainingConfig, dict(loss_scale=8, loss_scale_value=1024, loss_scale_factor=2,
                          loss_scale_window=10), "exclusive"),
    (TrainingConfig, dict(loss_scale=8, scale_sense={"type": "FixedLossScaleUpdateCell",
                                                     "loss_scale_value": 1}), "one way only"),
    (TrainingConfig, dict(profile_step_start=5, profile_step_end=2), ">= profile_step_start"),
    (MoEConfig, dict(num_experts=4, moe_router_topk=5), "at most num_experts=4"),
    (MoEConfig, dict(num_experts=4, hot_expert_num=5), "at most num_experts=4"),
    (MoEConfig, dict(enable_cold_hot_expert=True), "num_experts > 1"),
    (MoEConfig, dict(num_experts=4, enable_cold_hot_expert=True, moe_expert_capacity_factor=1.0),
     "hot_expert_num"),
    (MoEConfig, dict(num_experts=4, enable_cold_hot_expert=True, hot_expert_num=1),
     "moe_expert_capacity_factor"),
    (MoEConfig, dict(moe_pad_expert_input_to_capacity=True), "moe_expert_capacity_factor"),
    (OptimizerConfig, dict(learning_rate=1e-4, min_lr=1e-3), "at most learning_rate"),
    (OptimizerConfig, dict(lr_decay_style="WSD"), "lr_wsd_decay_iters"),
    (OptimizerConfig, dict(lr_warmup_iters=10, lr_decay_iters=5), "at most lr_decay_iters=5"),
    (OptimizerConfig, dict(override_opt_param_scheduler=True), "checkpoint and the config"),
    (OptimizerConfig, dict(start_weight_decay=0.0, end_weight_decay=0.1),
     "weight_decay_incr_style is 'constant'"),
    (LoraConfig, dict(use_lora=True), "at least one pattern"),
    (TransformerConfig, dict(group_query_attention=True, num_query_groups=3),
     "divisor of num_attention_heads=4"),
    (TransformerConfig, dict(group_query_attention=True, num_query_groups=8),
     "divisor of num_attention_heads=4"),
    (TransformerConfig, dict(hidden_size=66), "multiple of num_attention_heads=4"),
    (TransformerConfig, dict(recompute_granularity="full"), "'uniform' or 'block'"),
    (TransformerConfig, dict(recompute_granularity="full", recompute_method="block"),
     "recompute_num_layers"),
    (TransformerConfig, dict(recompute_method="uniform"), "unless recompute_granularity"),
    (TransformerConfig, dict(recompute_granularity="full", recompute_method="block",
                             recompute_num_layers=3), "at most num_layers=2"),
    (TransformerConfig, dict(num_experts=4, moe_config=MoEConfig(num_experts=8)),
     "moe_config.num_experts=8"),
    (TransformerConfig, dict(moe_config=MoEConfig(num_experts=4, moe_layer_freq=[1, 0, 1])),
     "a list of 2 entries"),
]


@pytest.mark.parametrize("cls, kwargs, text", CROSS_ERRORS,
                         ids=[f"{c.__name__}-{'-'.join(k)}"[:60] for c, k, _ in CROSS_ERRORS])
def test_cross_field_errors(cls, kwargs, text):
    with pytest.raises(ConfigValueError) as info:
        if cls is TransformerConfig:
            small_model(**copy.deepcopy(kwargs))
        else:
            cls(**kwargs)
    assert text in str(info.value)
    assert str(info.value).startswith(("ModelParallelConfig.", "TrainingConfig.", "MoEConfig.",
                                       "OptimizerConfig.", "LoraConfig.", "TransformerConfig."))


def test_assignment_checks_cross_rules_and_rolls_back():
    training = TrainingConfig(fp16=True)
    with pytest.raises(ConfigValueError, match="exclusive"):
        training.bf16 = True
    assert training.bf16 is False and training.fp16 is True
    parallel = ModelParallelConfig(context_parallel_size=4)
    with pytest.raises(ConfigValueError):
        parallel.context_parallel_algo = "hybrid_cp_algo"
    assert parallel.context_parallel_algo == "ulysses_cp_algo"
    # update() changes fields that depend on each other together.
    parallel.update(context_parallel_algo="hybrid_cp_algo", ulysses_degree_in_cp=2)
    assert (parallel.ulysses_degree, parallel.ring_degree) == (2, 2)
    with pytest.raises(ConfigValueError):
        parallel.update(ulysses_degree_in_cp=3, tensor_model_parallel_size=2)
    assert parallel.ulysses_degree_in_cp == 2 and parallel.tensor_model_parallel_size == 1
    # validate() sees changes made to a linked config on its own.
    model = small_model()
    model.moe_config.update(num_experts=4)
    model.moe_config.moe_layer_freq = [1, 0, 1]
    with pytest.raises(ConfigValueError, match="moe_layer_freq"):
        model.validate()


def test_validate_field_with_a_config_runs_cross_rules_on_a_copy():
    training = TrainingConfig(fp16=True)
    assert validate_field(TrainingConfig, "bf16", True) is True
    with pytest.raises(ConfigValueError, match="exclusive"):
        validate_field("training_config", "bf16", True, config=training)
    assert training.bf16 is False
    assert validate_field("OptimizerConfig", "adam_beta1", "0.5") == 0.5
    with pytest.raises(ValueError, match="no field"):
        validate_field(TrainingConfig, "nonsense", 1)
    with pytest.raises(ValueError, match="no field"):
        validate_field(TrainingConfig, "parallel_config", ModelParallelConfig())


def test_values_are_normalised():
    assert DatasetConfig(batch_size="8").batch_size == 8
    assert DatasetConfig(batch_size=8.0).batch_size == 8
    assert TrainingConfig(bucket_size="2e8").bucket_size == 200000000
    assert OptimizerConfig(learning_rate="1e-3").learning_rate == 1e-3
    assert OptimizerConfig(optimizer_type="adamw").optimizer_type == "AdamW"
    assert OptimizerConfig(lr_decay_style="wsd", lr_wsd_decay_iters=10).lr_decay_style == "WSD"
    assert ModelParallelConfig(sequence_parallel="true").sequence_parallel is True
    assert ModelParallelConfig(zero_level="None").zero_level is None
    assert ModelParallelConfig(pipeline_model_parallel_size=2,
                               num_layer_list="[2, 2]").num_layer_list == [2, 2]
    parallel = ModelParallelConfig(pipeline_model_parallel_size=2,
                                   virtual_pipeline_model_parallel_size=2,
                                   num_layer_list="[[4,4],[4,2]]", noop_layers="1, 3")
    assert parallel.num_layer_list == [[4, 4], [4, 2]] and parallel.noop_layers == [1, 3]
    assert small_model(position_embedding_type="learned_absolute").position_embedding_type == \
        "absolute"
    assert small_model(hidden_act="SwiGLU").hidden_act == "swiglu"
    assert small_model(normalization="rmsnorm").normalization == "RMSNorm"
    assert DatasetConfig(split=[0.9, 0.1]).split_fractions() == pytest.approx((0.9, 0.1, 0.0))
    assert DatasetConfig().split_fractions() == pytest.approx((0.9, 0.1, 0.0))
    assert TrainingConfig(profile_framework=False).profile_framework is None


def test_moe_layer_pattern_and_helpers():
    moe = MoEConfig(num_experts=4, moe_layer_freq=2)
    assert moe.moe_layer_pattern(5) == [True, False, True, False, True]
    assert MoEConfig(num_experts=4, moe_layer_freq=[0, 1]).moe_layer_pattern(2) == [False, True]
    assert MoEConfig().moe_layer_pattern(3) == [False, False, False]
    model = small_model(moe_config=MoEConfig(num_experts=4))
    assert model.num_experts == 4 and model.is_moe_layer(1)
    assert small_model(num_experts=4).moe_config.num_experts == 4
    gqa = small_model(group_query_attention=True, num_query_groups=2)
    assert gqa.num_kv_heads == 2 and small_model().num_kv_heads == 4
    assert small_model(hidden_act="swiglu").is_gated_mlp and not small_model().is_gated_mlp


def test_field_specs_cover_every_field():
    for section in ("training_config", "parallel_config", "model_config", "dataset_config",
                    "optimizer_config", "moe_config", "lora_config"):
        specs = field_specs(section)
        cls = type(AllConfig()[section])
        assert [s.name for s in specs] == list(cls.field_names())
        for spec in specs:
            assert spec.help and spec.type and spec.allowed and spec.section == section
            assert spec.config == cls.__name__
            if not spec.required and spec.derived_default is None:
                assert validate_field(section, spec.name, spec.default) == spec.default
    every = field_specs(AllConfig)
    assert len(every) == sum(len(field_specs(s)) for s in
                             ("training_config", "parallel_config", "model_config",
                              "dataset_config", "optimizer_config", "moe_config", "lora_config"))
    spec = field_spec(TransformerConfig, "hidden_dropout_rate")
    assert spec.name == "hidden_dropout" and spec.aliases == ("hidden_dropout_rate",)
    assert (spec.min_value, spec.max_value, spec.max_inclusive) == (0.0, 1.0, False)
    assert field_spec("ModelParallelConfig", "zero_level").choices == (None, "z1", "z2", "z3")
    assert field_spec("model_config", "params_dtype").choices == ("float32", "float16",
                                                                  "bfloat16")
    assert field_spec("model_config", "kv_channels").derived_default == \
        "hidden_size // num_attention_heads"
    assert field_spec("model_config", "vocab_size").required
    virtual = {s.name: s for s in field_specs(TrainingConfig, include_virtual=True)
               if s.kind == "virtual"}
    assert set(virtual) == {"gradient_accumulation_steps", "use_clip_grad", "max_grad_norm"}
    assert virtual["gradient_accumulation_steps"].targets == ("dataset_config.micro_batch_num",)
    with pytest.raises(ValueError):
        field_specs("no_such_config")
    with pytest.raises(TypeError):
        field_specs(42)


def test_equality_copy_and_repr():
    a = small_model(hidden_act="relu")
    b = small_model(hidden_act="relu")
    assert a == b and a is not b
    b.parallel_config.sequence_parallel = True
    assert a != b
    clone = a.copy()
    assert clone == a and clone.parallel_config is not a.parallel_config
    assert clone.training_config.parallel_config is clone.parallel_config
    assert "hidden_act='relu'" in repr(a) and "TransformerConfig(" in repr(a)
    with pytest.raises(TypeError):
        hash(a)
