"""YAML, dict and Megatron-argument loading; MindFormers spellings; round trip; save."""

import argparse
import os
import warnings
from pathlib import Path

import pytest
import yaml

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
    init_configs_from_args,
    init_configs_from_dict,
    init_configs_from_yaml,
    megatron_arg_mapping,
    save_yaml,
    validate_for_world_size,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
LANGUAGE_MODEL_YAML = CONFIGS / "test_language_model.yaml"
MEGATRON_ARGS_YAML = CONFIGS / "megatron_gpt_args.yaml"


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------
# init_configs_from_yaml
# ----------------------------------------------------------------------------------------------

def test_path_errors_documented_in_the_reference(tmp_path):
    with pytest.raises(ValueError, match="string"):
        init_configs_from_yaml(123)
    with pytest.raises(ValueError, match="string"):
        init_configs_from_yaml(None)
    with pytest.raises(ValueError, match=r"\.yaml or \.yml"):
        init_configs_from_yaml(str(tmp_path / "config.json"))
    with pytest.raises(FileNotFoundError):
        init_configs_from_yaml(str(tmp_path / "missing.yaml"))
    # .yml, upper case and path objects are fine.
    path = write(tmp_path, "dataset_config: {batch_size: 2}\n", "c.YML")
    assert init_configs_from_yaml(Path(path)).dataset_config.batch_size == 2


def test_language_model_yaml_as_the_seed_examples_use_it():
    training_config, parallel_config, dataset_config, model_config = init_configs_from_yaml(
        str(LANGUAGE_MODEL_YAML),
        [TrainingConfig, ModelParallelConfig, DatasetConfig, TransformerConfig])
    assert isinstance(training_config, TrainingConfig)
    assert isinstance(parallel_config, ModelParallelConfig)
    assert isinstance(dataset_config, DatasetConfig)
    assert isinstance(model_config, TransformerConfig)
    assert dataset_config.batch_size == 8 and model_config.seq_length == 32
    assert (model_config.hidden_size, model_config.num_layers, model_config.num_attention_heads,
            model_config.vocab_size, model_config.ffn_hidden_size) == (64, 4, 4, 128, 256)
    # Wired: the model sees the same parallel/training/dataset instances.
    assert model_config.parallel_config is parallel_config
    assert model_config.training_config is training_config
    assert model_config.dataset_config is dataset_config
    assert training_config.parallel_config is parallel_config
    assert training_config.dataset_config is dataset_config
    assert validate_for_world_size(model_config, 1)["global_batch_size"] == 8


def test_without_classes_returns_all_config():
    all_config = init_configs_from_yaml(str(LANGUAGE_MODEL_YAML))
    assert isinstance(all_config, AllConfig)
    for section, cls in [("training_config", TrainingConfig),
                         ("parallel_config", ModelParallelConfig),
                         ("model_config", TransformerConfig), ("dataset_config", DatasetConfig),
                         ("optimizer_config", OptimizerConfig), ("moe_config", MoEConfig),
                         ("lora_config", LoraConfig)]:
        assert isinstance(getattr(all_config, section), cls)
        assert all_config[section] is getattr(all_config, section)
    model = all_config.model_config
    assert model.moe_config is all_config.moe_config and model.lora_config is all_config.lora_config
    assert all_config.training_config.lora_config is all_config.lora_config
    single = init_configs_from_yaml(str(LANGUAGE_MODEL_YAML), TransformerConfig)
    assert isinstance(single, TransformerConfig)
    assert init_configs_from_yaml(str(LANGUAGE_MODEL_YAML), [AllConfig])[0] == all_config
    with pytest.raises(TypeError, match="config_classes"):
        init_configs_from_yaml(str(LANGUAGE_MODEL_YAML), [dict])
    with pytest.raises(TypeError, match="config_classes"):
        init_configs_from_yaml(str(LANGUAGE_MODEL_YAML), "TransformerConfig")


def test_keyword_overrides(tmp_path):
    path = str(LANGUAGE_MODEL_YAML)
    config = init_configs_from_yaml(path, num_layers=2, model_config={"hidden_dropout_rate": 0.1},
                                    **{"dataset_config.batch_size": 4})
    assert config.model_config.num_layers == 2 and config.model_config.hidden_dropout == 0.1
    assert config.dataset_config.batch_size == 4
    parallel = ModelParallelConfig()
    assert init_configs_from_yaml(path, parallel_config=parallel).parallel_config is parallel
    with pytest.raises(ValueError, match="ambiguous"):
        init_configs_from_yaml(path, seed=3)
    with pytest.raises(ValueError, match="not an option"):
        init_configs_from_yaml(path, no_such_option=3)
    with pytest.raises(ValueError, match="unknown section"):
        init_configs_from_yaml(path, **{"nope.x": 1})
    # An override replaces the YAML's spelling of the same option.
    text = "model_config: {attention_dropout_rate: 0.2}\n"
    assert init_configs_from_yaml(write(tmp_path, text), attention_dropout=0.3) \
        .model_config.attention_dropout == 0.3


def test_safe_loader_never_runs_code(tmp_path):
    marker = tmp_path / "marker"
    text = f"training_config: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ValueError, match="invalid YAML"):
        init_configs_from_yaml(write(tmp_path, text))
    assert not marker.exists()
    with pytest.raises(ValueError, match="invalid YAML"):
        init_configs_from_yaml(write(tmp_path, "model_config: [1, 2\n"))


def test_malformed_structure(tmp_path):
    with pytest.raises(TypeError, match="top level"):
        init_configs_from_yaml(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(TypeError, match="model_config must be a mapping"):
        init_configs_from_yaml(write(tmp_path, "model_config: 5\n"))
    with pytest.raises(TypeError, match="option names must be strings"):
        init_configs_from_yaml(write(tmp_path, "dataset_config: {1: 2}\n"))
    with pytest.raises(TypeError, match="section names must be strings"):
        init_configs_from_yaml(write(tmp_path, "1: {}\n"))
    with pytest.raises(ValueError, match="own top-level section"):
        init_configs_from_yaml(write(tmp_path, "model_config: {parallel_config: {}}\n"))
    with pytest.raises(ConfigTypeError, match="DatasetConfig.batch_size"):
        init_configs_from_yaml(write(tmp_path, "dataset_config: {batch_size: [8]}\n"))
    with pytest.raises(ConfigValueError, match="TransformerConfig.hidden_act"):
        init_configs_from_yaml(write(tmp_path, "model_config: {hidden_act: tanh}\n"))
    # Empty file and empty sections mean defaults.
    assert init_configs_from_yaml(write(tmp_path, "")) == AllConfig()
    assert init_configs_from_yaml(write(tmp_path, "model_config:\nmoe_config: {}\n")) == AllConfig()
    with pytest.warns(UnknownConfigKeyWarning, match="unknown section"):
        init_configs_from_yaml(write(tmp_path, "modle_config: {}\n"))
    with pytest.warns(UnknownConfigKeyWarning, match="'num_layer'"):
        init_configs_from_yaml(write(tmp_path, "model_config: {num_layer: 3}\n"))


def test_yaml_1_1_number_strings(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; numeric fields accept it.
    text = ("optimizer_config: {learning_rate: 1e-3, eps: 1e-8}\n"
            "training_config: {bucket_size: 2e8}\n")
    config = init_configs_from_yaml(write(tmp_path, text))
    assert config.optimizer_config.learning_rate == 1e-3 and config.optimizer_config.eps == 1e-8
    assert config.training_config.bucket_size == 200000000


# ----------------------------------------------------------------------------------------------
# MindFormers spellings (the training-features YAML snippets)
# ----------------------------------------------------------------------------------------------

MINDFORMERS_YAML = """
runner_config:
  epochs: 3
  batch_size: 4
  gradient_accumulation_steps: 4
  sink_mode: True
  sink_size: 2
runner_wrapper:
  type: MFTrainOneStepCell
  scale_sense:
    type: AdaptiveLossScaleUpdateCell
    loss_scale_value: 4294967296
    scale_factor: 2
    scale_window: 20
    max_scale_window: 1000
    min_scale_window: 20
  use_clip_grad: True
  max_grad_norm: 1.0
moe_config:
  expert_num: 8
  capacity_factor: 2.0
  save_token_distribution: true
  enable_cold_hot_expert: True
  hot_expert_num: 1
  cold_token_percent: 0.7
  moe_module_name: "network._backbone.backbone.blocks"
model:
  model_config:
    type: LlamaConfig
    use_flash_attention: True
    vocab_size: 128
    num_layers: 2
    num_attention_heads: 4
    hidden_size: 64
  arch:
    type: LlamaForCausalLM
callbacks:
- type: SummaryMonitor
  summary_dir: "../summary_dir/token_distribution_dir"
"""


def test_mindformers_sections_and_aliases(tmp_path):
    with pytest.warns(UnknownConfigKeyWarning) as record:
        config = init_configs_from_yaml(write(tmp_path, MINDFORMERS_YAML))
    messages = " ".join(str(w.message) for w in record)
    for ignored in ("runner_config.sink_mode", "runner_config.sink_size", "model.arch",
                    "callbacks", "moe_module_name"):
        assert ignored in messages
    training = config.training_config
    assert training.epochs == 3 and config.dataset_config.batch_size == 4
    assert config.dataset_config.micro_batch_num == 4
    assert training.grad_clip_kwargs == {"grad_clip_type": "ClipGlobalNorm", "clip_value": 1.0}
    assert training.scale_sense["type"] == "AdaptiveLossScaleUpdateCell"
    assert training.loss_scale_settings()["min_scale_window"] == 20
    moe = config.moe_config
    assert (moe.num_experts, moe.moe_expert_capacity_factor, moe.save_token_distribution,
            moe.enable_cold_hot_expert, moe.hot_expert_num, moe.cold_token_percent) == \
        (8, 2.0, True, True, 1, 0.7)
    assert config.model_config.use_flash_attention is True
    assert config.model_config.num_experts == 8
    # Saved in the canonical layout; loading that again gives the same config.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownConfigKeyWarning)
        again = init_configs_from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_the_same_option_twice_must_agree(tmp_path):
    text = "runner_config: {batch_size: 4}\ndataset_config: {batch_size: 8}\n"
    with pytest.raises(ValueError, match="given twice"):
        init_configs_from_yaml(write(tmp_path, text))
    text = "runner_config: {batch_size: 4}\ndataset_config: {micro_batch_size: 4}\n"
    assert init_configs_from_yaml(write(tmp_path, text)).dataset_config.batch_size == 4
    text = ("runner_config: {gradient_accumulation_steps: 4}\n"
            "dataset_config: {micro_batch_num: 2}\n")
    with pytest.raises(ConfigValueError, match="micro_batch_num"):
        init_configs_from_yaml(write(tmp_path, text))
    text = "model_config: {attention_dropout: 0.1, attention_dropout_rate: 0.2}\n"
    with pytest.raises(ValueError, match="given twice"):
        init_configs_from_yaml(write(tmp_path, text))


# ----------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------

def rich_config():
    return init_configs_from_dict({
        "parallel_config": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                            "virtual_pipeline_model_parallel_size": 2,
                            "num_layer_list": [[1, 1], [1, 1]], "zero_level": "z1",
                            "context_parallel_size": 2, "context_parallel_algo": "hybrid_cp_algo",
                            "ulysses_degree_in_cp": 2, "recompute_config": {"recompute": True},
                            "noop_layers": [3], "sequence_parallel": True},
        "dataset_config": {"batch_size": 2, "micro_batch_num": 4, "split": [0.8, 0.2],
                           "dataset_type": "char", "data_path": "data.txt", "seq_length": 16},
        "training_config": {"fp16": True, "loss_scale_value": 65536, "loss_scale_factor": 2,
                            "loss_scale_window": 100, "grad_clip_kwargs": {"clip_value": 0.5},
                            "seed": 7, "profile_framework": None},
        "optimizer_config": {"optimizer_type": "SGD", "betas": [0.8, 0.9],
                             "lr_decay_style": "WSD", "lr_wsd_decay_iters": 5,
                             "start_weight_decay": 0.01, "end_weight_decay": 0.1,
                             "weight_decay_incr_style": "cosine"},
        "moe_config": {"num_experts": 4, "moe_layer_freq": [1, 0, 1, 0],
                       "moe_expert_capacity_factor": 1.5},
        "lora_config": {"use_lora": True, "target_cells": [".*qkv.*", ".*proj"]},
        "model_config": {"vocab_size": 64, "num_layers": 4, "num_attention_heads": 4,
                         "hidden_size": 32, "position_embedding_type": "rope",
                         "rotary_base": 500000, "fa_config": {"input_layout": "BSH",
                                                              "sparse_mode": 0},
                         "params_dtype": "bf16", "group_query_attention": True,
                         "num_query_groups": 2},
    })


def test_round_trip_dict_and_yaml(tmp_path):
    config = rich_config()
    assert init_configs_from_dict(config.to_dict()) == config
    assert init_configs_from_dict(yaml.safe_load(config.to_yaml())) == config
    path = str(tmp_path / "saved.yaml")
    save_yaml(config, path)
    loaded = init_configs_from_yaml(path)
    assert loaded == config and loaded.to_dict() == config.to_dict()
    assert loaded.optimizer_config.betas == (0.8, 0.9)
    assert AllConfig.from_dict(config.to_dict()) == config
    # Each config alone.
    for section, item in config.sections().items():
        links = {name: getattr(item, name) for name in type(item).links()}
        assert type(item).from_dict(item.to_dict(), **links) == item, section
    # A single config can be saved as its own section.
    save_yaml(config.moe_config, path)
    assert init_configs_from_yaml(path).moe_config == config.moe_config
    with pytest.raises(TypeError):
        save_yaml({"a": 1}, path)


def test_round_trip_keeps_derived_defaults_derived():
    config = init_configs_from_yaml(str(LANGUAGE_MODEL_YAML))
    data = config.to_dict()
    assert data["model_config"]["kv_channels"] is None
    assert data["model_config"]["max_position_embeddings"] is None
    again = init_configs_from_dict(data)
    again.model_config.hidden_size = 128
    assert again.model_config.kv_channels == 32


def test_extras_survive_round_trip_unless_unwritable():
    with pytest.warns(UnknownConfigKeyWarning):
        config = AllConfig(dataset_config={"dataset_size": 2})
    with pytest.warns(UnknownConfigKeyWarning):
        again = init_configs_from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config and again.dataset_config.dataset_size == 2
    with pytest.warns(UnknownConfigKeyWarning):
        odd = AllConfig(model_config={"param_init_type": object()})
    with pytest.warns(UnknownConfigKeyWarning, match="cannot be written"):
        text = odd.to_yaml()
    assert "param_init_type" not in text


def test_all_config_accepts_instances():
    parallel = ModelParallelConfig(tensor_model_parallel_size=2)
    training = TrainingConfig(parallel_config=parallel)
    model = TransformerConfig(vocab_size=8, num_layers=1, num_attention_heads=2, hidden_size=8,
                              parallel_config=parallel, training_config=training)
    config = AllConfig(model_config=model)
    assert config.parallel_config is parallel and config.training_config is training
    assert config.dataset_config is model.dataset_config
    with pytest.raises(ValueError, match="instance instead"):
        AllConfig(model_config=model, parallel_config={"tensor_model_parallel_size": 2})
    with pytest.raises(ValueError, match="differs"):
        AllConfig(model_config=model, parallel_config=ModelParallelConfig())
    with pytest.raises(TypeError, match="needs a"):
        AllConfig(model_config=parallel)
    with pytest.raises(TypeError, match="mapping"):
        AllConfig(model_config=[1])
    clone = config.copy()
    assert clone == config and clone.model_config.parallel_config is clone.parallel_config


# ----------------------------------------------------------------------------------------------
# Megatron arguments (the guide's mapping tables)
# ----------------------------------------------------------------------------------------------

# Every row of the guide's tables: Megatron argument -> (section, attribute, expected value for
# examples/configs/megatron_gpt_args.yaml).
GUIDE_ROWS = {
    # model_config
    "padded_vocab_size": ("model_config", "vocab_size", 50304),
    "hidden_size": ("model_config", "hidden_size", 1024),
    "seq_length": ("model_config", "seq_length", 2048),
    "rotary_base": ("model_config", "rotary_base", 500000),
    "num_layers": ("model_config", "num_layers", 24),
    "position_embedding_type": ("model_config", "position_embedding_type", "rope"),
    "init_method_std": ("model_config", "init_method_std", 0.02),
    "normalization": ("model_config", "normalization", "RMSNorm"),
    "norm_epsilon": ("model_config", "norm_epsilon", 1e-6),
    "group_query_attention": ("model_config", "group_query_attention", True),
    "num_attention_heads": ("model_config", "num_attention_heads", 16),
    "num_query_groups": ("model_config", "num_query_groups", 4),
    "attention_dropout": ("model_config", "attention_dropout_rate", 0.1),
    "ffn_hidden_size": ("model_config", "ffn_hidden_size", 4096),
    "hidden_dropout": ("model_config", "hidden_dropout_rate", 0.05),
    "attention_softmax_in_fp32": ("model_config", "attention_softmax_in_fp32", False),
    "use_flash_attn": ("model_config", "use_flash_attention", True),
    "untie_embeddings_and_output_weights": ("model_config",
                                            "untie_embeddings_and_output_weights", True),
    "transformer_impl": ("model_config", "transformer_impl", "local"),
    "recompute_granularity": ("model_config", "recompute_granularity", "full"),
    "recompute_method": ("model_config", "recompute_method", "uniform"),
    "recompute_num_layers": ("model_config", "recompute_num_layers", 2),
    "fp16_lm_cross_entropy": ("model_config", "fp16_lm_cross_entropy", True),
    "fp32_residual_connection": ("model_config", "fp32_residual_connection", True),
    "add_qkv_bias": ("model_config", "qkv_has_bias", False),
    "add_dense_bias": ("model_config", "out_proj_has_bias", False),
    "add_bias_linear": ("model_config", "add_bias_linear", True),
    "use_sandwich_norm": ("model_config", "use_sandwich_norm", True),
    "pre_tockens": ("model_config", "fa_config.pre_tokens", 65536),
    "next_tockens": ("model_config", "fa_config.next_tokens", 0),
    "shape_order": ("model_config", "fa_config.input_layout", "BSH"),
    "attn_post_norm_scale": ("model_config", "attn_post_norm_scale", 0.5),
    "ffn_post_norm_scale": ("model_config", "ffn_post_norm_scale", 0.25),
    "params_dtype": ("model_config", "params_dtype", "float16"),
    "compute_dtype": ("model_config", "compute_dtype", "float16"),
    "embedding_dtype": ("model_config", "embedding_init_dtype", "bfloat16"),
    "use_fused_swiglu": ("model_config", "apply_swiglu_fusion", True),
    "apply_rope_fusion": ("model_config", "apply_rope_fusion", True),
    "hidden_act": ("model_config", "hidden_act", "swiglu"),
    # training_config
    "seed": ("training_config", "seed", 1234),
    "log_interval": ("training_config", "log_interval", 10),
    "train_iters": ("training_config", "training_iters", 5000),
    "save_interval": ("training_config", "save_interval", 1000),
    "eval_interval": ("training_config", "eval_interval", 500),
    "accumulate_allreduce_grads_in_fp32": ("training_config",
                                           "accumulate_allreduce_grads_in_fp32", True),
    "clip_grad": ("optimizer_config", "clip_grad", 1.0),
    "bf16": ("training_config", "bf16", False),
    "fp16": ("training_config", "fp16", True),
    "loss_scale": ("training_config", "loss_scale", None),
    "initial_loss_scale": ("training_config", "loss_scale_value", 65536),
    "loss_scale_window": ("training_config", "loss_scale_window", 500),
    "hysteresis": ("training_config", "loss_scale_factor", 2),
    "use_distributed_optimizer": ("training_config", "use_distributed_optimizer", True),
    "resume_training": ("training_config", "resume_training", True),
    "resume_crc_check": ("training_config", "crc_check", True),
    "load": ("training_config", "load_checkpoint", "./ckpt_in"),
    "save": ("training_config", "output_dir", "./ckpt_out"),
    "ckpt_prefix": ("training_config", "prefix", "gpt"),
    "ckpt_format": ("training_config", "ckpt_format", "safetensors"),
    "keep_checkpoint_max": ("training_config", "keep_checkpoint_max", 3),
    "wrap_with_ddp": ("training_config", "wrap_with_ddp", True),
    "bucket_size": ("training_config", "bucket_size", 40000000),
    "enable_mem_align": ("training_config", "enable_mem_align", True),
    "overlap_grad_reduce": ("training_config", "overlap_grad_reduce", True),
    "delay_grad_reduce": ("training_config", "delay_grad_reduce", True),
    "no_load_optim": ("training_config", "no_load_optim", True),
    "no_load_rng": ("training_config", "no_load_rng", False),
    "new_dataset": ("training_config", "new_dataset", True),
    "profile": ("training_config", "profile", True),
    "profile_save_path": ("training_config", "profile_save_path", "./profile_out"),
    "profile_step_start": ("training_config", "profile_step_start", 2),
    "profile_step_end": ("training_config", "profile_step_end", 4),
    "profile_level": ("training_config", "profile_level", "level1"),
    "profile_with_stack": ("training_config", "profile_with_stack", True),
    "profile_memory": ("training_config", "profile_memory", True),
    "profile_framework": ("training_config", "profile_framework", "time"),
    "profile_communication": ("training_config", "profile_communication", True),
    "profile_parallel_strategy": ("training_config", "profile_parallel_strategy", True),
    "profile_aicore_metrics": ("training_config", "profile_aicore_metrics", 1),
    "profile_l2_cache": ("training_config", "profile_l2_cache", True),
    "profile_hbm_ddr": ("training_config", "profile_hbm_ddr", True),
    "profile_pcie": ("training_config", "profile_pcie", True),
    "profile_data_process": ("training_config", "profile_data_process", True),
    "profile_data_simplification": ("training_config", "profile_data_simplification", True),
    # profile_op_time and profile_dynamic_profiler_config_path are refused away from their
    # defaults (see tests/test_field_effects.py): the file keeps the defaults.
    "profile_op_time": ("training_config", "profile_op_time", True),
    "profile_offline_analyse": ("training_config", "profile_offline_analyse", True),
    "profile_dynamic_profiler_config_path": ("training_config",
                                             "profile_dynamic_profiler_config_path", ""),
    # dataset_config
    "micro_batch_size": ("dataset_config", "batch_size", 4),
    "micro_batch_num": ("dataset_config", "micro_batch_num", 8),
    "reset_attention_mask": ("dataset_config", "reset_attention_mask", True),
    "reset_position_ids": ("dataset_config", "reset_position_ids", True),
    "eod_mask_loss": ("dataset_config", "eod_mask_loss", True),
    "pad_token_id": ("dataset_config", "pad_token_id", 3),
    "eos_token_id": ("dataset_config", "eos_token_id", 2),
    "drop_remainder": ("dataset_config", "drop_remainder", False),
    # optimizer_config
    "optimizer": ("optimizer_config", "optimizer_type", "AdamW"),
    "adam_beta1": ("optimizer_config", "betas", (0.85, 0.95)),
    "adam_beta2": ("optimizer_config", "betas", (0.85, 0.95)),
    "adam_eps": ("optimizer_config", "eps", 1e-6),
    "lr_decay_style": ("optimizer_config", "lr_decay_style", "cosine"),
    "lr": ("optimizer_config", "learning_rate", 3e-4),
    "min_lr": ("optimizer_config", "min_lr", 3e-5),
    "lr_warmup_iters": ("optimizer_config", "lr_warmup_iters", 100),
    "lr_decay_iters": ("optimizer_config", "lr_decay_iters", 4000),
    "use_checkpoint_opt_param_scheduler": ("optimizer_config",
                                           "use_checkpoint_opt_param_scheduler", False),
    "override_opt_param_scheduler": ("optimizer_config", "override_opt_param_scheduler", True),
    "weight_decay": ("optimizer_config", "weight_decay", 0.1),
    "overlap_param_gather": ("optimizer_config", "overlap_param_gather", True),
    "start_weight_decay": ("optimizer_config", "start_weight_decay", 0.05),
    "end_weight_decay": ("optimizer_config", "end_weight_decay", 0.1),
    "weight_decay_incr_style": ("optimizer_config", "weight_decay_incr_style", "linear"),
    # parallel_config
    "tensor_model_parallel_size": ("parallel_config", "tensor_model_parallel_size", 2),
    "context_parallel_size": ("parallel_config", "context_parallel_size", 2),
    "context_parallel_algo": ("parallel_config", "context_parallel_algo", "hybrid_cp_algo"),
    "ulysses_degree_in_cp": ("parallel_config", "ulysses_degree_in_cp", 2),
    "expert_model_parallel_size": ("parallel_config", "expert_model_parallel_size", 1),
    "virtual_pipeline_model_parallel_size": ("parallel_config",
                                             "virtual_pipeline_model_parallel_size", 2),
    "num_layers_per_virtual_pipeline_stage": ("parallel_config",
                                              "num_layers_per_virtual_pipeline_stage", 6),
    "sequence_parallel": ("parallel_config", "sequence_parallel", True),
    "pipeline_model_parallel_size": ("parallel_config", "pipeline_model_parallel_size", 2),
    "num_layer_list": ("parallel_config", "num_layer_list", [[6, 6], [6, 6]]),
    "recompute": ("parallel_config", "recompute", True),
    "select_recompute": ("parallel_config", "select_recompute", True),
    "select_comm_recompute": ("parallel_config", "select_comm_recompute", True),
}


def megatron_args():
    with open(MEGATRON_ARGS_YAML, encoding="utf-8") as handle:
        return argparse.Namespace(**yaml.safe_load(handle))


def lookup(all_config, section, attribute):
    value = getattr(all_config, section)
    for part in attribute.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def test_the_args_file_has_every_row_of_the_guide():
    args = vars(megatron_args())
    assert set(GUIDE_ROWS) <= set(args)
    mapping = megatron_arg_mapping()
    for name, (section, attribute, _) in GUIDE_ROWS.items():
        assert name in mapping, name
        assert mapping[name][0] == section, name


@pytest.mark.parametrize("name", sorted(GUIDE_ROWS))
def test_every_guide_row_maps(name):
    all_config = init_configs_from_args(megatron_args())
    section, attribute, expected = GUIDE_ROWS[name]
    assert lookup(all_config, section, attribute) == expected


def test_args_config_is_consistent_and_round_trips(tmp_path):
    all_config = init_configs_from_args(megatron_args())
    info = validate_for_world_size(all_config, 16)
    assert info["data_parallel_size"] == 2 and info["virtual_pipeline_size"] == 2
    assert init_configs_from_dict(all_config.to_dict()) == all_config
    parallel, model = init_configs_from_args(megatron_args(),
                                             [ModelParallelConfig, TransformerConfig])
    assert model.parallel_config is parallel


def test_args_details():
    base = dict(vars(megatron_args()))
    # Megatron only uses the dynamic scaler with fp16 and a static scale with fp16/bf16.
    fp32 = dict(base, fp16=False, loss_scale=1024.0)
    config = init_configs_from_args(fp32)
    assert config.training_config.loss_scale_settings() is None
    # (the file's compute_dtype float16 would contradict bf16)
    bf16 = dict(base, fp16=False, bf16=True, loss_scale=1024.0, compute_dtype="bfloat16")
    assert init_configs_from_args(bf16).training_config.loss_scale_settings() == {
        "type": "FixedLossScaleUpdateCell", "loss_scale_value": 1024.0}
    # None means "not given"; unknown arguments are ignored.
    assert init_configs_from_args(dict(base, seed=None)).training_config.seed is None
    assert init_configs_from_args(dict(base, totally_unknown=1)) == init_configs_from_args(base)
    assert init_configs_from_args(dict(base, optimizer="sgd")).optimizer_config.optimizer_type \
        == "SGD"
    assert init_configs_from_args(dict(base, params_dtype="torch.bfloat16")) \
        .model_config.params_dtype == "bfloat16"
    assert init_configs_from_args(dict(base, position_embedding_type="learned_absolute")) \
        .model_config.position_embedding_type == "absolute"
    with pytest.warns(UserWarning, match="transformer_engine"):
        init_configs_from_args(dict(base, transformer_impl="transformer_engine"))
    with pytest.raises(TypeError):
        init_configs_from_args(None)
    with pytest.raises(TypeError):
        init_configs_from_args(5)
    with pytest.raises(ConfigValueError, match="TransformerConfig.num_layers"):
        init_configs_from_args(dict(base, num_layers=0))


def test_loaders_leave_files_alone(tmp_path):
    path = write(tmp_path, LANGUAGE_MODEL_YAML.read_text(encoding="utf-8"))
    before = os.stat(path).st_mtime_ns
    init_configs_from_yaml(path)
    assert os.stat(path).st_mtime_ns == before


def test_yaml_text_round_trips_awkward_strings(tmp_path):
    # PyYAML writes U+0085 raw in a way it reads back changed; save_yaml must not lose it.
    config = AllConfig(dataset_config={"dataset_dir": "data\x85dir/数据", "data_path": "a\u2028b"})
    path = str(tmp_path / "c.yaml")
    save_yaml(config, path)
    assert init_configs_from_yaml(path) == config
