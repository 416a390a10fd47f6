"""The examples of sections 1.1.1-1.1.7 of the API reference, as written, and the config part of
the later examples (which build configs the same way); plus validate_for_world_size."""

import os
from pathlib import Path

import pytest

from mindspeed_ms.core.config import (
    AllConfig,
    DatasetConfig,
    ModelParallelConfig,
    MoEConfig,
    TrainingConfig,
    TransformerConfig,
    UnknownConfigKeyWarning,
    init_configs_from_yaml,
    layers_per_pipeline_stage,
    validate_for_world_size,
)

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_1_1_1_all_config():
    from mindspeed_ms.core.config import AllConfig as Imported  # noqa: F401
    all_config = [AllConfig]
    assert all_config[0] is AllConfig


def test_1_1_2_dataset_config():
    from mindspeed_ms.core.config import DatasetConfig as Imported
    dataset_config = Imported()
    assert dataset_config.batch_size == 1


def test_1_1_3_init_configs_from_yaml(monkeypatch):
    # The reference writes config_file = "/path/to/config/file"; any YAML file works.
    from mindspeed_ms.core.config import init_configs_from_yaml as imported
    monkeypatch.chdir(CONFIGS)
    config_file = "test_language_model.yaml"
    all_config = imported(config_file)
    assert isinstance(all_config, AllConfig)


def test_1_1_4_model_parallel_config():
    from mindspeed_ms.core.config import ModelParallelConfig as Imported
    parallel_config = Imported()
    assert parallel_config.tensor_model_parallel_size == 1


def test_1_1_5_moe_config():
    from mindspeed_ms.core.config import MoEConfig as Imported
    moe_config = Imported(num_experts=4, moe_router_topk=2)
    assert moe_config.num_experts == 4


def test_1_1_6_training_config():
    from mindspeed_ms.core.config import TrainingConfig as Imported, ModelParallelConfig as MPC
    parallel_config = MPC()
    training_config = Imported(parallel_config=parallel_config)
    assert training_config.parallel_config is parallel_config


def test_1_1_7_transformer_config():
    parallel_config = ModelParallelConfig()
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=128, num_layers=4, num_attention_heads=4,
                               hidden_size=64, ffn_hidden_size=256,
                               parallel_config=parallel_config, training_config=training_config)
    assert config.training_config is training_config


# The config part of later examples of the reference, as written there.

def test_column_and_row_parallel_linear_examples():
    hidden_size = 4
    parallel_config = ModelParallelConfig()
    train_config = TrainingConfig(parallel_config=parallel_config)
    model_config = TransformerConfig(vocab_size=40000, num_layers=1, num_attention_heads=1,
                                     hidden_size=hidden_size, ffn_hidden_size=4 * hidden_size,
                                     parallel_config=parallel_config,
                                     training_config=train_config, mlp_has_bias=True,
                                     gated_linear_unit=False, hidden_act='gelu',
                                     params_dtype='float32', compute_dtype='float32')
    assert model_config.gated_linear_unit is False


def test_vocab_parallel_embedding_example():
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2,
                                          pipeline_model_parallel_size=1,
                                          context_parallel_size=1,
                                          expert_model_parallel_size=1,
                                          sequence_parallel=True)
    training_config = TrainingConfig(parallel_config=parallel_config)
    with pytest.warns(UnknownConfigKeyWarning, match="dataset_size"):
        dataset_config = DatasetConfig(batch_size=1, dataset_size=2, seq_length=1024)
    model_config = TransformerConfig(vocab_size=50304, num_layers=1, num_attention_heads=32,
                                     hidden_size=2560, ffn_hidden_size=7680,
                                     parallel_config=parallel_config,
                                     training_config=training_config)
    model_config.dataset_config = dataset_config
    assert (dataset_config.batch_size, dataset_config.dataset_size,
            dataset_config.seq_length, model_config.vocab_size) == (1, 2, 1024, 50304)
    assert model_config.seq_length == 1024
    assert validate_for_world_size(model_config, 2)["model_parallel_size"] == 2


def test_gpt_model_example():
    batch_size = 8
    seq_length = 32
    parallel_config = ModelParallelConfig()
    data_config = DatasetConfig(batch_size=batch_size)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=128, seq_length=seq_length, num_layers=4,
                               num_attention_heads=4, num_query_groups=32, hidden_size=64,
                               ffn_hidden_size=256, parallel_config=parallel_config,
                               training_config=training_config, dataset_config=data_config)
    assert config.dataset_config.batch_size == 8 and config.num_kv_heads == 4
    validate_for_world_size(config, 1)


def test_examples_without_training_config():
    parallel_config = ModelParallelConfig()
    config = TransformerConfig(vocab_size=128, num_layers=1, num_attention_heads=8,
                               num_query_groups=4, hidden_size=256, ffn_hidden_size=128,
                               parallel_config=parallel_config, training_config=None)
    assert config.training_config.parallel_config is parallel_config
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2)
    config = TransformerConfig(vocab_size=1, num_layers=1, num_attention_heads=8,
                               num_query_groups=4, hidden_size=256, ffn_hidden_size=256,
                               parallel_config=parallel_config, training_config=None)
    assert config.kv_channels == 32


def test_moe_examples():
    import mindspore.common.dtype as mstype  # pylint: disable=import-outside-toplevel
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=1)
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_cfg = MoEConfig(num_experts=4, moe_router_topk=2)
    with pytest.warns(UnknownConfigKeyWarning, match="param_init_type"):
        model_cfg = TransformerConfig(vocab_size=1, num_layers=1, num_attention_heads=1,
                                      seq_length=8, hidden_size=16, ffn_hidden_size=64,
                                      gated_linear_unit=True, param_init_type=mstype.float32,
                                      parallel_config=parallel_config, moe_config=moe_cfg,
                                      training_config=training_config)
    assert model_cfg.num_experts == 4 and model_cfg.is_moe_layer(0)
    moe_config = MoEConfig(num_experts=4, moe_router_topk=2)
    config = TransformerConfig(vocab_size=128, num_layers=1, num_attention_heads=1,
                               num_query_groups=1, hidden_size=64, ffn_hidden_size=128,
                               parallel_config=parallel_config, training_config=training_config,
                               moe_config=moe_config)
    assert config.moe_config is moe_config


def test_rotary_and_transformer_examples():
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=1)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(seq_length=16, vocab_size=1, num_layers=1, num_attention_heads=16,
                               hidden_size=256, ffn_hidden_size=256,
                               parallel_config=parallel_config, training_config=training_config)
    assert config.seq_length == 16 and config.kv_channels == 16


def test_language_model_example_configs(monkeypatch):
    monkeypatch.chdir(CONFIGS)
    config_path = "test_language_model.yaml"
    training_config, parallel_config, dataset_config, model_config = init_configs_from_yaml(
        config_path, [TrainingConfig, ModelParallelConfig, DatasetConfig, TransformerConfig])
    batch_size = dataset_config.batch_size
    sq = model_config.seq_length
    assert (batch_size, sq, model_config.hidden_size) == (8, 32, 64)
    assert training_config.parallel_config is parallel_config


def test_pretrain_example_builds_an_empty_transformer_config():
    all_config = TransformerConfig()
    with pytest.raises(ValueError, match="missing required fields"):
        validate_for_world_size(all_config, 1)


# ----------------------------------------------------------------------------------------------
# validate_for_world_size
# ----------------------------------------------------------------------------------------------

def model(parallel=None, moe=None, dataset=None, **kwargs):
    parallel = parallel or ModelParallelConfig()
    args = dict(vocab_size=128, num_layers=4, num_attention_heads=4, hidden_size=64,
                ffn_hidden_size=256, seq_length=32, parallel_config=parallel,
                training_config=TrainingConfig(parallel_config=parallel,
                                               dataset_config=dataset or DatasetConfig()),
                moe_config=moe or MoEConfig())
    args.update(kwargs)
    return TransformerConfig(**args)


WORLD_ERRORS = [
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=3)), 4,
     "must divide the world size 4"),
    (dict(parallel=ModelParallelConfig(expert_model_parallel_size=4), moe=MoEConfig(num_experts=4)),
     2, "must divide the data-parallel size 2"),
    (dict(parallel=ModelParallelConfig(expert_model_parallel_size=2)), 2, "needs MoE"),
    (dict(parallel=ModelParallelConfig(expert_model_parallel_size=2),
          moe=MoEConfig(num_experts=3)), 2, "divisible by expert_model_parallel_size=2"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=3)), 3,
     "num_layers=4 must be divisible by the 3 pipeline stages"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=2, num_layer_list=[1, 2])), 2,
     "sums to 3 layers"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=2,
                                       virtual_pipeline_model_parallel_size=4)), 2,
     "divisible by virtual_pipeline_model_parallel_size=4"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=2,
                                       num_layers_per_virtual_pipeline_stage=3)), 2,
     "must divide the layers per pipeline stage"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=2,
                                       virtual_pipeline_model_parallel_size=1,
                                       num_layers_per_virtual_pipeline_stage=1)), 2, "disagrees"),
    (dict(parallel=ModelParallelConfig(pipeline_model_parallel_size=2,
                                       virtual_pipeline_model_parallel_size=2),
          dataset=DatasetConfig(micro_batch_num=3)), 2, "multiple of pipeline_model_parallel_size"),
    (dict(parallel=ModelParallelConfig(noop_layers=[7])), 1, "noop_layers entry 7"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=8)), 8,
     "num_attention_heads=4 must be divisible"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=2), group_query_attention=True,
          num_query_groups=1), 2, "num_query_groups=1 must be divisible"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=2), ffn_hidden_size=255), 2,
     "ffn_hidden_size=255"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=2), vocab_size=127), 2,
     "pad the vocabulary"),
    (dict(parallel=ModelParallelConfig(context_parallel_size=3)), 3,
     "seq_length (32) must be divisible by 2 * context_parallel_size (2 * 3 = 6)"),
    # every algorithm cuts the sequence into 2 * cp chunks, ring attention too
    (dict(parallel=ModelParallelConfig(context_parallel_size=4, context_parallel_algo="megatron_cp_algo"),
          seq_length=36), 4, "seq_length (36) must be divisible by 2 * context_parallel_size (2 * 4 = 8)"),
    (dict(parallel=ModelParallelConfig(context_parallel_size=2, expert_model_parallel_size=2),
          moe=MoEConfig(num_experts=4)), 8, "expert_model_parallel_size (2) > 1 together with context_parallel_size"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=2), moe=MoEConfig(num_experts=4)), 2,
     "needs sequence_parallel=True"),
    (dict(parallel=ModelParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True),
          seq_length=30, num_attention_heads=4), 4, "with sequence_parallel"),
    (dict(parallel=ModelParallelConfig(context_parallel_size=8), seq_length=64), 8,
     "Ulysses degree (8"),
]


@pytest.mark.parametrize("kwargs, world, text", WORLD_ERRORS,
                         ids=[t[:40] for _, _, t in WORLD_ERRORS])
def test_world_size_errors(kwargs, world, text):
    with pytest.raises(ValueError) as info:
        validate_for_world_size(model(**kwargs), world)
    assert text in str(info.value)
    assert f"world size {world}" in str(info.value)


def test_world_size_results_and_argument_errors():
    parallel = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                   virtual_pipeline_model_parallel_size=2,
                                   expert_model_parallel_size=2, sequence_parallel=True)
    config = model(parallel=parallel, moe=MoEConfig(num_experts=4),
                   dataset=DatasetConfig(batch_size=2, micro_batch_num=4))
    info = validate_for_world_size(config, 16)
    assert info == {"world_size": 16, "data_parallel_size": 4, "model_parallel_size": 4,
                    "virtual_pipeline_size": 2, "layers_per_stage": [2, 2],
                    "global_batch_size": 32}
    all_config = AllConfig(model_config=config)
    assert validate_for_world_size(all_config, 16) == info
    standalone = ModelParallelConfig(pipeline_model_parallel_size=3,
                                     standalone_embedding_stage=True)
    assert layers_per_pipeline_stage(model(parallel=standalone)) == [0, 2, 2]
    validate_for_world_size(model(parallel=standalone), 3)
    with pytest.raises(TypeError):
        validate_for_world_size(config, 2.0)
    with pytest.raises(ValueError):
        validate_for_world_size(config, 0)
    with pytest.raises(TypeError):
        validate_for_world_size(parallel, 2)


def test_several_problems_are_reported_together():
    parallel = ModelParallelConfig(tensor_model_parallel_size=3)
    with pytest.raises(ValueError) as info:
        validate_for_world_size(model(parallel=parallel, vocab_size=128), 4)
    text = str(info.value)
    assert "must divide the world size 4" in text and "num_attention_heads=4" in text


def test_nothing_here_imports_mindspore_at_import_time():
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    code = ("import sys, mindspeed_ms.core.config as c; "
            "c.init_configs_from_yaml(sys.argv[1]); "
            "assert 'mindspore' not in sys.modules, 'mindspore imported'")
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", code,
                             str(CONFIGS / "test_language_model.yaml")],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
