"""The guide's YAML layout and unknown-key hints (issue 16, item 2).

The guide's blocks (gpt-pretraining-guide.md: train_config, accelerate_config, model_config.llm)
are quoted here shrunk to tiny sizes; the seed documents are not part of the repository.
"""

import copy
import warnings

import pytest
import yaml

from mindspeed_ms.core.config import TransformerConfig, init_configs_from_dict, init_configs_from_yaml
from mindspeed_ms.core.config.fields import ConfigTypeError, ConfigValueError, UnknownConfigKeyWarning


def _model(**extra):
    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **extra)


def test_unknown_option_close_to_a_field_suggests_it():
    with pytest.warns(UnknownConfigKeyWarning, match="did you mean 'num_attention_heads'"):
        cfg = _model(num_attention_head=3)
    # The seed's **kwargs: the unknown key is kept as an attribute, the real field untouched.
    assert cfg.num_attention_head == 3
    assert cfg.num_attention_heads == 4


def test_unknown_option_far_from_every_field_has_no_suggestion():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _model(zzz_unrelated_knob=1)
    messages = [str(w.message) for w in record if issubclass(w.category, UnknownConfigKeyWarning)]
    assert len(messages) == 1
    assert "did you mean" not in messages[0] and "check the spelling" in messages[0]


# ----------------------------------------------------------------------------------------------
# The guide's YAML blocks (gpt-pretraining-guide.md), shrunk to tiny sizes
# ----------------------------------------------------------------------------------------------

# The guide's three blocks verbatim, but for the sizes (and tensor_parallel / pipeline: one
# process), tokenizer.use_fast (refused: no tokenizer here) and embedding.init_std equal to the
# blocks' (one std here, as in Megatron); see the refusal tests below.
GUIDE_YAML = """
train_config:
  ms_training_config:
    resume_training: False  # 是否启用断点续训
    wrap_with_ddp: True     # 是否使用分布式数据分桶功能
    bucket_size: 2000       # 分桶大小
  recompute_config:
    select_comm_recompute:  # "[[4,4,4,4],[4,4,4,4],[4,4,4,4],[4,4,4,2]]"
accelerate_config:
  parallelization:
    tensor_parallel: 1
    pipeline:
      num_stages: 1
      layer_list:
      micro_batch_size: 2
      noop_layers:
      num_layers_per_vpp:
      virtual_pipeline_model_parallel_size:
    use_sequence_parallel: False
    use_distributed_optimizer: False
  precision:
    param_init_dtype: float32
    compute_dtype: bfloat16
    softmax_compute_dtype: float32
    logits_compute_dtype: float32
    grad_accumulation_dtype: float32
    residual-connection: bfloat16
    fused_operators: flash_attention, rope, rmsnorm, swiglu
    nofused_operators: masked_softmax, gradient_accumulation
model_config:
  llm:
    tokenizer:
      padded_size: 96
      divided_by: 16
    embedding:
      hidden_size: 32
      init_std: 0.02
    position:
      type: 'rope'
      max_size: 32
      rope_base: 10000.0
    blocks:
      num_layers: 3
      init_std: 0.02
      sandwich_norm: True
      layernorm:
        norm_type: 'RMSNorm'
        epsilon: 1e-5
      attention:
        attention_type: 'GQA'
        head_num: 4
        kv_group_size: 2
        qkv_bias: False
        projection_bias: False
        dropout_rate: 0.0
        post_norm_scale: 0.0447
      ffn:
        hidden_size: 48
        activation: 'swiglu'
        dropout_rate: 0.0
        mlp_bias: False
        post_norm_scale: 0.0825
    head:
      shared_embedding: False
"""

# What the guide's blocks mean in the flat layout (the guide's Megatron mapping tables).
GUIDE_FLAT = {
    "training_config": {"resume_training": False, "wrap_with_ddp": True, "bucket_size": 2000,
                        "accumulate_allreduce_grads_in_fp32": True},
    "parallel_config": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                        "sequence_parallel": False, "gradient_accumulation_fusion": False},
    "dataset_config": {"batch_size": 2},
    "model_config": {
        "vocab_size": 96, "hidden_size": 32, "position_embedding_type": "rope",
        "max_position_embeddings": 32, "rotary_base": 10000.0, "num_layers": 3,
        "init_method_std": 0.02, "use_sandwich_norm": True, "normalization": "FusedRMSNorm",
        "norm_epsilon": 1e-5, "group_query_attention": True, "num_attention_heads": 4,
        "num_query_groups": 2, "qkv_has_bias": False, "out_proj_has_bias": False,
        "attention_dropout": 0.0, "attn_post_norm_scale": 0.0447, "ffn_hidden_size": 48,
        "hidden_act": "swiglu", "hidden_dropout": 0.0, "mlp_has_bias": False,
        "ffn_post_norm_scale": 0.0825, "untie_embeddings_and_output_weights": True,
        "params_dtype": "float32", "compute_dtype": "bfloat16", "softmax_compute_dtype": "float32",
        "fp16_lm_cross_entropy": False, "residual_connection_dtype": "bfloat16",
        "use_flash_attention": True, "apply_rope_fusion": True, "apply_swiglu_fusion": True,
        "masked_softmax_fusion": False},
}


def _guide():
    return yaml.safe_load(GUIDE_YAML)


def _load(data, **kwargs):
    with warnings.catch_warnings():
        # device-bound fields (fused kernels) may log that they do nothing on CPU
        warnings.simplefilter("ignore")
        return init_configs_from_dict(data, **kwargs)


def test_guide_blocks_load_every_value(tmp_path):
    path = tmp_path / "guide.yaml"
    path.write_text(GUIDE_YAML, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = init_configs_from_yaml(str(path))
    sections = {"training_config": config.training_config, "parallel_config": config.parallel_config,
                "dataset_config": config.dataset_config, "model_config": config.model_config}
    for section, values in GUIDE_FLAT.items():
        for field, expected in values.items():
            assert getattr(sections[section], field) == expected, f"{section}.{field}"
    # the guide's empty recompute_config entry means "not set"
    assert config.parallel_config.recompute_config is None
    # and it is the same config as the flat spelling
    assert config == _load(GUIDE_FLAT)


def test_guide_recompute_config_routes_to_parallel_config():
    # rows by virtual chunk, one count per stage: needs pp=2 with 2 virtual chunks
    # (select_comm_recompute recomputes the sequence-parallel all-gather: needs sequence_parallel)
    data = {"parallel_config": {"pipeline_model_parallel_size": 2,
                                "virtual_pipeline_model_parallel_size": 2,
                                "sequence_parallel": True},
            "train_config": {"recompute_config": {
                "recompute": [[1, 1], [1, 0]], "select_recompute": None,
                "select_comm_recompute": True}}}
    parallel = _load(data).parallel_config
    assert parallel.recompute_config == {"recompute": [[1, 1], [1, 0]], "select_comm_recompute": True}


def test_guide_layout_mixes_with_the_flat_one():
    data = _guide()
    data["model_config"]["seq_length"] = 16           # flat key next to llm
    data["model_config"]["num_layers"] = 3            # the same value both ways: fine
    data["training_config"] = {"training_iters": 7}
    config = _load(data)
    assert config.model_config.seq_length == 16 and config.model_config.num_layers == 3
    assert config.training_config.training_iters == 7 and config.training_config.bucket_size == 2000
    # numeric spellings that mean the same value do not conflict ('1e-5' is a string in YAML 1.1)
    data["model_config"]["norm_epsilon"] = 1.0e-5
    assert _load(data).model_config.norm_epsilon == 1e-5


@pytest.mark.parametrize("section, flat, nested, value", [
    ("model_config", "num_layers", "model_config.llm.blocks.num_layers", 4),
    ("model_config", "num_attention_heads", "model_config.llm.blocks.attention.head_num", 8),
    ("model_config", "untie_embeddings_and_output_weights", "model_config.llm.head.shared_embedding", False),
    ("model_config", "compute_dtype", "accelerate_config.precision.compute_dtype", "float16"),
    ("model_config", "apply_rope_fusion", "accelerate_config.precision.fused_operators", False),
    ("training_config", "bucket_size", "train_config.ms_training_config.bucket_size", 4000),
    ("parallel_config", "gradient_accumulation_fusion", "accelerate_config.precision.nofused_operators",
     True),
])
def test_a_value_given_both_ways_differently_names_both_paths(section, flat, nested, value):
    data = _guide()
    data.setdefault(section, {})[flat] = value
    with pytest.raises(ValueError, match="is given twice with different values") as err:
        _load(data)
    message = str(err.value)
    assert f"{section}.{flat}={value!r}" in message and nested in message


def test_the_same_operator_fused_and_not_fused_is_refused():
    data = _guide()
    data["accelerate_config"]["precision"]["nofused_operators"] = "masked_softmax, rope"
    with pytest.raises(ValueError, match="apply_rope_fusion is given twice") as err:
        _load(data)
    assert "fused_operators lists 'rope'" in str(err.value)
    assert "nofused_operators lists as not fused 'rope'" in str(err.value)


def test_the_guide_verbatim_is_refused_only_where_it_means_nothing_here():
    """The guide's own model_config keys, unshrunk: two cannot load, each refused by its path."""
    llm = yaml.safe_load("""
    tokenizer: {padded_size: 165664, divided_by: 16, use_fast: True}
    embedding: {hidden_size: 6144, init_std: 0.5}
    blocks: {num_layers: 62, init_std: 0.00884}
    """)
    with pytest.raises(ConfigValueError, match=r"model_config\.llm\.tokenizer\.use_fast: got True") as err:
        _load({"model_config": {"llm": llm}})
    assert "loads no tokenizer" in str(err.value)
    del llm["tokenizer"]["use_fast"]
    # one init std for the word embedding and the blocks, as in Megatron: 0.5 vs 0.00884 conflict
    with pytest.raises(ConfigValueError, match=r"model_config\.llm\.embedding\.init_std: got 0\.5; "
                       r"allowed: the std of the blocks \(model_config\.llm\.blocks\.init_std=0\.00884\)"):
        _load({"model_config": {"llm": llm}})
    # alone it must not change the blocks' std either: it is checked against the default
    with pytest.raises(ConfigValueError, match=r"the default init_method_std=0\.01"):
        _load({"model_config": {"llm": {"embedding": {"init_std": 0.5}}}})
    assert _load({"model_config": {"llm": {"embedding": {"init_std": 0.01}}}}).model_config \
        .init_method_std == 0.01
    llm["embedding"]["init_std"] = 0.00884
    model = _load({"model_config": {"llm": llm}}).model_config
    assert (model.vocab_size, model.hidden_size, model.num_layers, model.init_method_std) == \
        (165664, 6144, 62, 0.00884)


@pytest.mark.parametrize("where, key, value", [
    ("train_config", "other_block", {}),
    ("train_config.ms_training_config", "resume_trainig", True),
    ("train_config.ms_training_config", "parallel_config", {}),
    ("train_config.recompute_config", "recompute_layers", 2),
    ("accelerate_config", "optimizer", {}),
    ("accelerate_config.parallelization", "data_parallel", 2),
    ("accelerate_config.parallelization.pipeline", "schedule", "1f1b"),
    ("accelerate_config.precision", "loss_dtype", "float32"),
    ("model_config.llm", "vision", {}),
    ("model_config.llm.tokenizer", "vocab_file", "x.json"),
    ("model_config.llm.embedding", "dropout", 0.1),
    ("model_config.llm.position", "scaling", 2.0),
    ("model_config.llm.blocks", "moe", {}),
    ("model_config.llm.blocks.layernorm", "elementwise_affine", False),
    ("model_config.llm.blocks.attention", "window", 128),
    ("model_config.llm.blocks.ffn", "gate_bias", True),
    ("model_config.llm.head", "bias", True),
])
def test_a_key_with_no_meaning_is_refused_with_its_path(where, key, value):
    data = _guide()
    node = data
    for part in where.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(ConfigValueError) as err:
        _load(data)
    assert str(err.value).startswith(f"{where}.{key}: got {value!r}; allowed: ")


@pytest.mark.parametrize("where, value, match", [
    ("accelerate_config.precision.logits_compute_dtype", "bfloat16", "float32 .cross entropy in float32."),
    ("accelerate_config.precision.logits_compute_dtype", "float16", "float32 while compute_dtype is bfloat16"),
    ("accelerate_config.precision.grad_accumulation_dtype", "bfloat16", "float32 .accumulate_allreduce"),
    ("accelerate_config.precision.compute_dtype", "float8", "'float32', 'float16', 'bfloat16'"),
    ("accelerate_config.precision.fused_operators", "rope, layernorm", "unknown operator 'layernorm'"),
    ("accelerate_config.precision.fused_operators", 3, "comma-separated string"),
    ("model_config.llm.blocks.attention.attention_type", "MLA", "GQA, MHA or MQA"),
    ("model_config.llm.blocks.attention.head_num", "four", r"-> TransformerConfig.num_attention_heads"),
    ("model_config.llm.blocks.layernorm.norm_type", "BatchNorm", "LayerNorm"),
    ("model_config.llm.head.shared_embedding", "no", "True or False"),
    ("model_config.llm.tokenizer.divided_by", 0, "an integer >= 1"),
])
def test_a_bad_value_is_refused_with_its_path(where, value, match):
    data = _guide()
    node = data
    *parents, key = where.split(".")
    for part in parents:
        node = node[part]
    node[key] = value
    with pytest.raises((ConfigValueError, ConfigTypeError), match=match) as err:
        _load(data)
    assert str(err.value).startswith(f"{where}: got ")


def test_a_misspelt_training_option_is_refused_with_a_suggestion():
    data = {"train_config": {"ms_training_config": {"resume_trainig": True}}}
    with pytest.raises(ConfigValueError, match=r"train_config\.ms_training_config\.resume_trainig: got "
                       r"True; .*did you mean 'resume_training'\?"):
        _load(data)
    data = {"train_config": {"ms_training_config": {"bucket_size": "big"}}}
    with pytest.raises(ConfigTypeError, match=r"^train_config\.ms_training_config\.bucket_size: got "
                       r"'big' .*-> TrainingConfig\.bucket_size"):
        _load(data)
    # aliases of the flat section work here too
    assert _load({"train_config": {"ms_training_config": {"train_iters": 5}}}) \
        .training_config.training_iters == 5


def test_tokenizer_divided_by_checks_the_padded_size():
    data = _guide()
    data["model_config"]["llm"]["tokenizer"]["padded_size"] = 100
    with pytest.raises(ConfigValueError, match=r"TransformerConfig.vocab_size: got 100; allowed: a "
                       r"multiple of model_config.llm.tokenizer.divided_by=16"):
        _load(data)
    # the flat vocab_size is checked the same way
    del data["model_config"]["llm"]["tokenizer"]["padded_size"]
    data["model_config"]["vocab_size"] = 112
    assert _load(data).model_config.vocab_size == 112
    del data["model_config"]["vocab_size"]
    with pytest.raises(ConfigValueError, match="loads no tokenizer"):
        _load(data)


def test_fused_rmsnorm_selects_the_rms_norm():
    data = _guide()
    del data["model_config"]["llm"]["blocks"]["layernorm"]["norm_type"]
    assert _load(data).model_config.normalization == "FusedRMSNorm"
    data["model_config"]["normalization"] = "LayerNorm"
    with pytest.raises(ConfigValueError, match=r"normalization: got 'LayerNorm'; allowed: RMSNorm or "
                       r"FusedRMSNorm \(accelerate_config.precision.fused_operators lists 'rmsnorm'"):
        _load(data)
    precision = data["accelerate_config"]["precision"]
    precision["fused_operators"] = "flash_attention"
    precision["nofused_operators"] = "rmsnorm"
    assert _load(data).model_config.normalization == "LayerNorm"
    precision["fused_operators"] = "rmsnorm"
    with pytest.raises(ValueError, match="rmsnorm operator fusion is given twice"):
        _load(data)


def test_attention_types():
    data = _guide()
    attention = data["model_config"]["llm"]["blocks"]["attention"]
    attention.update(attention_type="MHA")
    del attention["kv_group_size"]
    model = _load(data).model_config
    assert not model.group_query_attention and model.num_kv_heads == 4
    attention.update(attention_type="MQA")
    model = _load(data).model_config
    assert model.group_query_attention and model.num_kv_heads == 1
    attention.update(kv_group_size=2)
    with pytest.raises(ValueError, match="num_query_groups is given twice"):
        _load(data)


def test_mindformers_model_section_takes_llm_too():
    llm = _guide()["model_config"]["llm"]
    model = _load({"model": {"model_config": {"type": "GPTConfig", "llm": llm}}}).model_config
    assert (model.hidden_size, model.num_layers, model.num_attention_heads) == (32, 3, 4)


# ----------------------------------------------------------------------------------------------
# The loaded values have effect: the model built from the guide layout
# ----------------------------------------------------------------------------------------------

def _training_data(tmp_path, guide: bool):
    """A tiny training run in the guide layout (``guide``) or its flat equivalent."""
    import training_configs as T  # pylint: disable=import-outside-toplevel

    data = T.make(tmp_path, training_config={"training_iters": 3}, optimizer_config={"lr_warmup_iters": 1},
                  dataset_config={"dataset_type": "synthetic", "seq_length": 16, "batch_size": 2})
    data["model_config"] = {"seq_length": 16}
    flat = copy.deepcopy(GUIDE_FLAT)
    # float32 here so that the CPU run is exact; the dtypes' loading is tested above
    flat["model_config"].update(compute_dtype="float32", residual_connection_dtype="float32")
    if guide:
        layout = _guide()
        layout["accelerate_config"]["precision"].update(
            {"compute_dtype": "float32", "residual-connection": "float32"})
        data.update({key: value for key, value in layout.items() if key != "model_config"})
        data["model_config"]["llm"] = layout["model_config"]["llm"]
        data["dataset_config"].pop("batch_size")  # the guide's micro_batch_size gives it
    else:
        for section, values in flat.items():
            data.setdefault(section, {}).update(values)
    return data


def test_model_built_from_the_guide_layout_has_its_shape_and_trains_like_the_flat_one(tmp_path):
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    import training_configs as T  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel
    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    guide = _training_data(tmp_path / "guide", True)
    config = _load(guide)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel()
    try:
        ms.set_seed(5)
        model = GPTModel(config.model_config, pre_process=True, post_process=True)
        shapes = {p.name: tuple(p.shape) for p in model.get_parameters()}
    finally:
        ps.destroy_model_parallel()
    def shapes_of(part):
        return [shape for name, shape in shapes.items() if part in name]

    # head_num 4, kv_group_size 2, hidden 32 -> head dim 8: q 4*8 + k, v 2*2*8 = 64 rows; one
    # per block (blocks.num_layers 3)
    assert shapes_of("query_key_value.weight") == [(64, 32)] * 3, shapes
    assert shapes_of("dense_h_to_4h.weight") == [(96, 32)] * 3        # swiglu: 2 * ffn 48
    assert shapes_of("dense_4h_to_h.weight") == [(32, 48)] * 3
    assert not shapes_of("bias"), "qkv/projection/mlp biases are off"
    assert shapes_of("embedding") == [(96, 32)]        # padded_size; rope: no position table
    assert shapes_of("output_layer.weight") == [(96, 32)]             # shared_embedding False
    # sandwich norm: input, post-attention and the two post norms in each block, RMSNorm (no bias)
    assert len(shapes_of("norm.weight")) == 4 * 3 + 1

    losses_guide = [s["loss"] for s in T.run(guide)]
    losses_flat = [s["loss"] for s in T.run(_training_data(tmp_path / "flat", False))]
    assert len(losses_guide) == 3 and all(np.isfinite(losses_guide))
    np.testing.assert_allclose(losses_guide, losses_flat, rtol=0, atol=0)


def test_a_misspelt_section_is_kept_out_with_a_suggestion():
    with pytest.warns(UnknownConfigKeyWarning, match="unknown section.*did you mean 'train_config'"):
        config = init_configs_from_dict({"train_confg": {"ms_training_config": {"bucket_size": 8}}})
    assert config.training_config.bucket_size is None


@pytest.mark.parametrize("compute", ["float32", "float16"])
def test_guide_precision_sets_the_dtypes_the_model_runs_in(compute):
    """accelerate_config.precision reaches the layers: logits dtype, parameter dtype, values."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel

    from mindspeed_ms.legacy.model.gpt_model import GPTModel  # pylint: disable=import-outside-toplevel

    ms.set_device("CPU")
    outputs = {}
    for dtype in ("float32", compute):
        data = _guide()
        data["accelerate_config"]["precision"].update(
            {"compute_dtype": dtype, "residual-connection": "float32"})
        data["model_config"]["seq_length"] = 8
        data["parallel_config"] = {"use_cpu_initialization": True}
        model_config = _load(data).model_config
        ms.set_seed(3)
        model = GPTModel(model_config)
        assert {p.dtype for p in model.get_parameters()} == {ms.float32}   # param_init_dtype
        tokens = Tensor(np.arange(16, dtype=np.int32).reshape(2, 8) % 96)
        mask = Tensor(np.triu(np.ones((8, 8), np.int32), 1)[None, None])
        logits = model(tokens, None, mask, None)
        assert logits.dtype == getattr(ms, dtype) and logits.shape == (8, 2, 96)
        outputs[dtype] = logits.astype(ms.float32).asnumpy()
    if compute == "float16":
        difference = np.abs(outputs["float16"] - outputs["float32"]).max()
        assert 0 < difference < 5e-3, difference   # half-precision rounding (3.6e-4 measured)


def test_guide_blocks_as_keyword_overrides(tmp_path):
    path = tmp_path / "guide.yaml"
    path.write_text(GUIDE_YAML, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = init_configs_from_yaml(
            str(path), train_config={"ms_training_config": {"bucket_size": 4000}},
            accelerate_config={"precision": {"compute_dtype": "float16"}},
            model_config={"llm": {"blocks": {"num_layers": 2}}, "seq_length": 8})
    assert config.training_config.bucket_size == 4000
    assert config.model_config.compute_dtype == "float16"
    assert (config.model_config.num_layers, config.model_config.seq_length) == (2, 8)
    assert config.model_config.num_attention_heads == 4      # the rest of the file stays
    with pytest.raises(ConfigValueError, match=r"^model_config\.llm\.blocks\.depth: got 2"):
        init_configs_from_yaml(str(path), model_config={"llm": {"blocks": {"depth": 2}}})
