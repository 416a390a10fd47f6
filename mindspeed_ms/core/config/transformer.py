"""TransformerConfig: the model architecture, precision and attention/MLP options."""

from __future__ import annotations

from typing import Any, Dict, List

from ._checks import plain_data
from .base import BaseConfig
from .recompute import check_recompute_shapes, model_values, parallel_values
from .fields import (
    ConfigValueError,
    Field,
    Invalid,
    Link,
    Virtual,
    _to_int,
)

__all__ = ["TransformerConfig", "HIDDEN_ACTS", "NORMALIZATIONS", "POSITION_EMBEDDING_TYPES",
           "INIT_METHODS", "FA_INPUT_LAYOUTS", "FA_SPARSE_MODES"]

HIDDEN_ACTS = ("gelu", "fast_gelu", "relu", "silu", "swiglu", "squared_relu")
# "FusedRMSNorm" is upstream's name for the fused RMSNorm kernel (its own test YAML uses it); on this
# build it selects the same RMSNorm as "RMSNorm" (legacy/model/norm.py get_norm).
NORMALIZATIONS = ("LayerNorm", "RMSNorm", "FusedRMSNorm")
POSITION_EMBEDDING_TYPES = ("absolute", "rope", "none")
# Names of mindspore.common.initializer initialisers; 'normal' and 'truncated_normal' take
# init_method_std as sigma.
INIT_METHODS = ("normal", "truncated_normal", "xavier_uniform", "xavier_normal", "he_uniform",
                "he_normal", "uniform", "zeros", "ones")
BIAS_INITS = ("zeros", "ones", "normal", "truncated_normal", "uniform")
FA_INPUT_LAYOUTS = ("BNSD", "BSND", "BSH", "SBH")
# 0: explicit mask with the pre/next-tokens band, 1: explicit mask, 2/3: causal (top-left /
# bottom-right aligned); the modes the flash-attention layer implements on every backend.
FA_SPARSE_MODES = (0, 1, 2, 3)

_REQUIRED = ("vocab_size", "num_layers", "num_attention_heads", "hidden_size")

_ROTARY_KEYS = {
    "rotary_base": "rotary_base",
    "base": "rotary_base",
    "rotary_percent": "rotary_percent",
    "rotary_interleaved": "rotary_interleaved",
    "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
    "rotary_seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
}


def _fa_config(value: Any) -> Dict[str, Any]:
    checks = {
        "pre_tokens": _to_int,
        "next_tokens": _to_int,
        "input_layout": _fa_layout,
        "sparse_mode": _fa_sparse_mode,
    }
    out = {}
    for key, item in value.items():
        if key not in checks:
            raise Invalid(f"unknown key {key!r}; allowed keys: {', '.join(checks)}")
        out[key] = checks[key](item)
    if "pre_tokens" in out and "next_tokens" in out and out["pre_tokens"] + out["next_tokens"] < 0:
        raise Invalid("pre_tokens + next_tokens must be >= 0 (query i sees keys i - pre_tokens .. "
                      "i + next_tokens)")
    return out


def _fa_layout(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("input_layout must be a string", type_error=True)
    for layout in FA_INPUT_LAYOUTS:
        if layout == value.strip().upper():
            return layout
    raise Invalid(f"input_layout must be one of {', '.join(FA_INPUT_LAYOUTS)}")


def _fa_sparse_mode(value: Any) -> int:
    number = _to_int(value)
    if number not in FA_SPARSE_MODES:
        raise Invalid(f"sparse_mode must be one of {', '.join(map(str, FA_SPARSE_MODES))}")
    return number


def _rotary_config(value: Any) -> Dict[str, Any]:
    unknown = [key for key in value if key not in _ROTARY_KEYS]
    if unknown:
        raise Invalid(f"unknown keys {unknown}; allowed keys: {', '.join(_ROTARY_KEYS)}")
    return plain_data(value)


class TransformerConfig(BaseConfig):
    """Transformer configuration.

    Every field of the documented signature is present with its documented default. The
    architecture sizes ``vocab_size``, ``num_layers``, ``num_attention_heads`` and ``hidden_size``
    have no default: they may be left None while a config is assembled (e.g. by the lab), and
    model construction (:func:`~mindspeed_ms.core.config.validate_for_world_size`) rejects a
    config that still lacks them.

    Fields whose default is computed (``ffn_hidden_size``, ``kv_channels``, ``seq_length``,
    ``max_position_embeddings``, ``out_hidden_size``, ``num_experts``) store None and read as the
    computed value; ``to_dict`` keeps the None so that the computation follows later changes.

    Args:
        vocab_size (int): Vocabulary size (Megatron ``padded_vocab_size``).
        num_layers (int): Number of transformer layers.
        num_attention_heads (int): Attention heads.
        hidden_size (int): Hidden size.
        ffn_hidden_size (int): MLP hidden size (None = 4 * hidden_size).
        parallel_config (ModelParallelConfig): Parallel configuration.
        training_config (TrainingConfig): Training configuration (None = a default one sharing
            this config's parallel/dataset/LoRA configs).
        lora_config (LoraConfig): Default: the training config's, else LoraConfig().
        dataset_config (DatasetConfig): Default: the training config's, else DatasetConfig().
        moe_config (MoEConfig): Default: MoEConfig().
        kwargs (dict): Any other field below, or extra options (kept, with a warning).

    Examples:
        >>> from mindspeed_ms.core.config import (ModelParallelConfig, TrainingConfig,
        ...                                       TransformerConfig)
        >>> parallel_config = ModelParallelConfig()
        >>> training_config = TrainingConfig(parallel_config=parallel_config)
        >>> config = TransformerConfig(vocab_size=128, num_layers=2, num_attention_heads=4,
        ...                            hidden_size=64, ffn_hidden_size=256,
        ...                            parallel_config=parallel_config,
        ...                            training_config=training_config)
        >>> config.kv_channels
        16
    """

    section = "model_config"

    vocab_size = Field("int", None, "Vocabulary size (already padded for tensor parallelism).",
                       ge=1, required=True, megatron=("padded_vocab_size",),
                       aliases=("padded_vocab_size",), group="architecture")
    num_layers = Field("int", None, "Number of transformer layers.", ge=1, required=True,
                       megatron=True, group="architecture")
    num_attention_heads = Field("int", None, "Attention heads.", ge=1, required=True,
                                megatron=True, group="architecture")
    hidden_size = Field("int", None, "Hidden size.", ge=1, required=True, megatron=True,
                        group="architecture")
    ffn_hidden_size = Field("int", None, "Hidden size of the MLP (None = 4 * hidden_size).",
                            ge=1, megatron=True, group="architecture",
                            derived=lambda c: 4 * c.hidden_size if c.hidden_size else None,
                            derived_doc="4 * hidden_size")
    parallel_config = Link("ModelParallelConfig", "Parallel configuration.")
    training_config = Link("TrainingConfig", "Training configuration.")
    lora_config = Link("LoraConfig", "LoRA configuration.")
    dataset_config = Link("DatasetConfig", "Dataset configuration.")
    moe_config = Link("MoEConfig", "Mixture-of-experts configuration.")
    attention_type = Field("str", "self_attn", "Attention type.",
                           choices=("self_attn", "cross_attn"), group="attention")
    position_embedding_type = Field(
        "str", "absolute", "Position embedding: learned absolute, rotary (rope) or none.",
        choices=POSITION_EMBEDDING_TYPES, value_aliases={"learned_absolute": "absolute"},
        megatron=True, group="position")
    parallel_position_embedding = Field(
        "bool", False, "Vocab-parallel absolute position embedding table.", group="position")
    rotary_config = Virtual(
        "dict", "Rotary settings as one mapping (rotary_base, rotary_percent, "
        "rotary_interleaved, seq_len_interpolation_factor); stored in the rotary_* fields.",
        check=_rotary_config, targets=("model_config.rotary_base", "model_config.rotary_percent",
                                       "model_config.rotary_interleaved",
                                       "model_config.rotary_seq_len_interpolation_factor"),
        group="position")
    use_query_layer = Field("bool", False, "Use a separate query layer.", group="misc")
    use_visual_encoder = Field("bool", False, "Use a visual encoder.", group="misc")
    use_retriever = Field("bool", False, "Use a retriever.", group="misc")
    group_query_attention = Field("bool", False, "Grouped-query attention (GQA).",
                                  megatron=True, group="attention")
    num_query_groups = Field("int", 32, "Key/value head groups under GQA (ignored without "
                             "GQA: then every head has its own key/value).", ge=1,
                             megatron=True, group="attention")
    qkv_has_bias = Field("bool", True, "Bias in the query/key/value projection.",
                         megatron=("add_qkv_bias",), group="attention")
    out_proj_has_bias = Field("bool", True, "Bias in the attention output projection.",
                              megatron=("add_dense_bias",), group="attention")
    head_skip_weight_param_allocation = Field(
        "bool", True, "The output head allocates no weight and uses the one passed in "
        "(tied embeddings).", group="head")
    apply_query_key_layer_scaling = Field(
        "bool", False, "Scale query-key products by the layer number.", group="attention")
    use_flash_attention = Field(
        "bool", False, "Flash attention (fused kernel on Ascend, blockwise online-softmax on "
        "CPU).", megatron=("use_flash_attn",), aliases=("use_flash_attn",), group="attention")
    fa_config = Field(
        "dict", None, "Flash attention options: pre_tokens, next_tokens (attention band), "
        "input_layout (BNSD, BSND, BSH, SBH), sparse_mode (0-3).", check=_fa_config,
        group="attention", allowed="None or a mapping with keys pre_tokens, next_tokens, "
                                   "input_layout, sparse_mode")
    enable_flash_sp = Field("bool", False, "FlashSP (ring flash attention) for context "
                            "parallelism.", group="attention")
    mask_func_type = Field("str", "attn_mask_add", "How the attention mask is applied: "
                           "add a large negative number, or fill.",
                           choices=("attn_mask_add", "attn_mask_fill"), group="attention")
    mlp_has_bias = Field("bool", True, "Bias in the MLP linear layers.", group="mlp")
    hidden_act = Field("str", "gelu", "MLP activation ('swiglu' = gated SiLU).",
                       choices=HIDDEN_ACTS, value_aliases={"swish": "silu"}, megatron=True,
                       group="mlp")
    normalization = Field("str", "LayerNorm", "Normalisation layer.", choices=NORMALIZATIONS,
                          megatron=True, group="norm")
    norm_epsilon = Field("float", 1.0e-5, "Epsilon of the normalisation.", gt=0.0,
                         megatron=True, group="norm")
    apply_residual_connection_post_norm = Field(
        "bool", False, "Take the residual after the norm instead of before.", group="norm")
    use_final_norm = Field("bool", True, "Normalise the output of the last layer.",
                           group="norm")
    residual_connection_dtype = Field("dtype", "float32", "dtype of the residual additions.",
                                      group="precision")
    init_method_std = Field("float", 0.01, "Standard deviation of the normal weight "
                            "initialisation.", gt=0.0, megatron=True, group="init")
    params_dtype = Field("dtype", "float32", "dtype of the parameters.", megatron=True,
                         group="precision")
    embedding_init_dtype = Field("dtype", "float32", "dtype of the embedding parameters.",
                                 megatron=("embedding_dtype",), aliases=("embedding_dtype",),
                                 group="precision")
    compute_dtype = Field("dtype", "float32", "dtype of the linear layers' computation; when "
                          "not given, float16/bfloat16 with training_config.fp16/bf16 (as "
                          "Megatron's flags).", megatron=True, group="precision")
    softmax_compute_dtype = Field("dtype", "float32", "dtype of the attention softmax.",
                                  group="precision")
    init_method = Field("str", "normal", "Weight initialiser (normal/truncated_normal use "
                        "init_method_std).", choices=INIT_METHODS, group="init")
    bias_init = Field("str", "zeros", "Bias initialiser.", choices=BIAS_INITS, group="init")
    fp16_lm_cross_entropy = Field("bool", False, "Compute the LM cross entropy in float16.",
                                  megatron=True, group="precision")
    attention_dropout = Field("float", 0.0, "Dropout on the attention probabilities.",
                              ge=0.0, lt=1.0, megatron=True, aliases=("attention_dropout_rate",),
                              group="dropout")
    out_hidden_size = Field("int", None, "Output hidden size (None = hidden_size).", ge=1,
                            derived=lambda c: c.hidden_size, derived_doc="hidden_size",
                            group="architecture")
    num_experts = Field("int", None, "Number of experts (None = moe_config.num_experts when "
                        "> 1).", ge=1, group="architecture",
                        derived=lambda c: _moe_experts(c), derived_doc="moe_config.num_experts")
    untie_embeddings_and_output_weights = Field(
        "bool", False, "Separate output-head weights instead of sharing the embedding's.",
        megatron=True, group="head")
    flatten_labels_and_input_mask = Field("bool", True, "Flatten labels and loss mask.",
                                          group="head")
    recompute_method = Field("str", None, "Full recompute: 'uniform' (chunks of "
                             "recompute_num_layers) or 'block' (first recompute_num_layers "
                             "layers per stage).", choices=(None, "uniform", "block"),
                             megatron=True, group="recompute")
    recompute_num_layers = Field("int", None, "Layers per recompute chunk/block.", ge=1,
                                 megatron=True, group="recompute")
    recompute_granularity = Field("str", None, "Recompute granularity: 'full' layers or "
                                  "'selective' (attention core only).",
                                  choices=(None, "full", "selective"), megatron=True,
                                  group="recompute")
    fp32_residual_connection = Field("bool", False, "Residual stream in float32.",
                                     megatron=True, group="precision")
    kv_channels = Field("int", None, "Channels per attention head (None = hidden_size // "
                        "num_attention_heads).", ge=1, megatron=True, group="attention",
                        derived=lambda c: _head_dim(c), derived_doc="hidden_size // "
                        "num_attention_heads")
    hidden_dropout = Field("float", 0.0, "Dropout on the attention and MLP outputs.",
                           ge=0.0, lt=1.0, megatron=True, aliases=("hidden_dropout_rate",),
                           group="dropout")
    bias_dropout_fusion = Field("bool", False, "Fuse bias add and dropout.", group="fusion")
    fp8_format = Field("str", None, "FP8 format (not supported on CPU).",
                       choices=(None, "e4m3", "hybrid"), group="precision")
    clone_scatter_output_in_embedding = Field(
        "bool", False, "Clone the scattered embedding output (sequence parallel).",
        group="misc")
    add_bias_linear = Field("bool", False, "Megatron's bias switch for all linear layers: when "
                            "given, it sets qkv_has_bias, out_proj_has_bias and mlp_has_bias "
                            "(those given themselves win).", megatron=True, group="misc")
    attention_softmax_in_fp32 = Field("bool", True, "Attention softmax in float32.",
                                      megatron=True, group="precision")
    masked_softmax_fusion = Field("bool", False, "Fused masked softmax.", group="fusion")
    distribute_saved_activations = Field(
        "bool", False, "Distribute recomputation checkpoints over tensor-parallel ranks.",
        group="recompute")
    retro_add_retriever = Field("bool", False, "Retro retriever.", group="misc")
    transformer_impl = Field("str", "local", "Transformer implementation (only 'local').",
                             choices=("local",), megatron=True, group="misc")
    encoder_num_layers = Field("int", None, "Encoder layers (encoder-decoder models).", ge=1,
                               group="architecture")
    decoder_num_layers = Field("int", None, "Decoder layers (encoder-decoder models).", ge=1,
                               group="architecture")
    model_type = Field("str", "encoder_or_decoder", "Model type.",
                       choices=("encoder_or_decoder", "encoder_and_decoder"),
                       group="architecture")
    select_comm_recompute = Field("bool", False, "Selective communication recompute.",
                                  group="recompute")
    select_recompute = Field("bool", False, "Selective recompute.", group="recompute")
    apply_rope_fusion = Field("bool", False, "Fused rotary embedding.", megatron=True,
                              group="fusion")
    use_sandwich_norm = Field("bool", False, "Sandwich norm (extra norms after attention and "
                              "MLP).", megatron=True, group="norm")
    attn_post_norm_scale = Field("float", 1.0, "Scale of the post-attention norm (sandwich "
                                 "norm).", gt=0.0, megatron=True, group="norm")
    ffn_post_norm_scale = Field("float", 1.0, "Scale of the post-MLP norm (sandwich norm).",
                                gt=0.0, megatron=True, group="norm")
    apply_swiglu_fusion = Field("bool", False, "Fused SwiGLU.",
                                megatron=("use_fused_swiglu",), aliases=("use_fused_swiglu",),
                                group="fusion")

    # Beyond the documented signature (settings the seed examples pass).
    seq_length = Field("int", None, "Sequence length (None = dataset_config.seq_length).",
                       ge=1, megatron=True, group="architecture",
                       derived=lambda c: _dataset_seq_length(c),
                       derived_doc="dataset_config.seq_length")
    gated_linear_unit = Field("bool", False, "Gated MLP (GLU): the first projection is twice as "
                              "wide and split into gate and value.", group="mlp")
    max_position_embeddings = Field(
        "int", None, "Size of the absolute position table (None = seq_length, or 512 without "
        "one).", ge=1, megatron=True,
        derived=lambda c: c.seq_length if c.seq_length is not None else 512,
        derived_doc="seq_length, else 512",
        group="position")
    rotary_base = Field("number", 10000, "Base period of the rotary embedding.", gt=0,
                        megatron=True, group="position")
    rotary_percent = Field("float", 1.0, "Fraction of each head's channels that are rotated.",
                           gt=0.0, le=1.0, megatron=True, group="position")
    rotary_interleaved = Field("bool", False, "Rotate interleaved channel pairs instead of "
                               "halves.", megatron=True, group="position")
    rotary_seq_len_interpolation_factor = Field(
        "float", None, "Divide positions by this factor (linear RoPE scaling).", gt=0.0,
        megatron=True, aliases=("seq_len_interpolation_factor",), group="position")

    # -- links ---------------------------------------------------------------------------------

    def _wire_links(self) -> None:
        from .dataset import DatasetConfig  # pylint: disable=import-outside-toplevel
        from .lora import LoraConfig  # pylint: disable=import-outside-toplevel
        from .moe import MoEConfig  # pylint: disable=import-outside-toplevel
        from .parallel import ModelParallelConfig  # pylint: disable=import-outside-toplevel
        from .training import TrainingConfig  # pylint: disable=import-outside-toplevel
        state = self.__dict__
        training = state.get("training_config")
        if state.get("parallel_config") is None:
            state["parallel_config"] = training.parallel_config if training else \
                ModelParallelConfig()
        if state.get("dataset_config") is None:
            state["dataset_config"] = training.dataset_config if training else DatasetConfig()
        if state.get("lora_config") is None:
            state["lora_config"] = training.lora_config if training else LoraConfig()
        if state.get("moe_config") is None:
            state["moe_config"] = MoEConfig()
        if training is None:
            state["training_config"] = TrainingConfig(
                parallel_config=state["parallel_config"], dataset_config=state["dataset_config"],
                lora_config=state["lora_config"])
        experts = state.get("num_experts")
        moe = state["moe_config"]
        if state.get("_constructing") and experts is not None and \
                "num_experts" not in moe.explicit_fields() and experts != moe.num_experts:
            # TransformerConfig(num_experts=4) without a MoEConfig: the MoE layers read
            # moe_config, so the number goes there.
            moe.num_experts = experts

    # -- umbrella switches ---------------------------------------------------------------------

    def _follow_switches(self) -> None:
        # Megatron's add_bias_linear switches the bias of every linear layer; the layers here
        # read one switch per linear, so an explicit add_bias_linear sets those that were not
        # given themselves (a per-linear switch given explicitly wins, as add_qkv_bias does).
        state = self.__dict__
        if "add_bias_linear" not in state["_explicit"]:
            return
        for name in ("qkv_has_bias", "out_proj_has_bias", "mlp_has_bias"):
            if name not in state["_explicit"]:
                state[name] = state["add_bias_linear"]

    # -- virtual fields ------------------------------------------------------------------------

    def _get_virtual(self, name: str) -> Any:
        return {"rotary_base": self.rotary_base, "rotary_percent": self.rotary_percent,
                "rotary_interleaved": self.rotary_interleaved,
                "seq_len_interpolation_factor": self.rotary_seq_len_interpolation_factor}

    def _apply_virtuals(self, values: Dict[str, Any]) -> None:
        state = self.__dict__
        for key, item in values.get("rotary_config", {}).items():
            name = _ROTARY_KEYS[key]
            if state["_constructing"] and name in state["_explicit"]:
                new = self._fields[name].coerce(item, "TransformerConfig")
                if new != state[name]:
                    raise ConfigValueError("TransformerConfig", name, state[name],
                                           f"the same as rotary_config[{key!r}]={item!r}",
                                           "rotary_config and the field disagree")
            setattr(self, name, item)

    # -- helpers for the model layers ------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: num_query_groups under GQA, else num_attention_heads."""
        if self.group_query_attention:
            return self.num_query_groups
        return self.num_attention_heads

    @property
    def is_gated_mlp(self) -> bool:
        """Whether the MLP is gated (gated_linear_unit, or hidden_act 'swiglu')."""
        return bool(self.gated_linear_unit or self.hidden_act == "swiglu")

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether the 0-based layer ``layer_index`` has an MoE MLP."""
        return self.moe_config.is_moe_layer(layer_index)

    def missing_required(self) -> List[str]:
        """Names of required architecture fields that are still None."""
        missing = [name for name in _REQUIRED if self.__dict__.get(name) is None]
        if self.seq_length is None:
            missing.append("seq_length")
        return missing

    def check_required(self) -> "TransformerConfig":
        """Raise ValueError naming every required field that is still None.

        ``seq_length`` counts as required here (it may come from ``dataset_config``).
        """
        missing = self.missing_required()
        if missing:
            raise ValueError(f"TransformerConfig: missing required fields {', '.join(missing)} "
                             "(set them in model_config)")
        return self

    def check_architecture(self, what: str = "the model") -> "TransformerConfig":
        """Raise ConfigValueError naming every architecture size that is still None.

        The sizes ``vocab_size``, ``num_layers``, ``num_attention_heads`` and ``hidden_size`` may
        stay None while a config is assembled; the model layers call this when they are built,
        so that a missing size is named instead of failing deep inside as ``int(None)``.

        Args:
            what: The layer being built, for the message.
        """
        missing = [name for name in _REQUIRED if self.__dict__.get(name) is None]
        if missing:
            raise ConfigValueError(
                "TransformerConfig", missing[0], None, "an integer >= 1",
                f"building {what} needs the required model_config fields {', '.join(missing)}, "
                "which are not set")
        return self

    # -- rules ---------------------------------------------------------------------------------

    def _cross_check(self) -> None:
        state = self.__dict__
        heads = self.num_attention_heads
        if self.group_query_attention and heads is not None:
            groups = self.num_query_groups
            if groups > heads or heads % groups != 0:
                self._reject("num_query_groups", f"a divisor of num_attention_heads={heads} "
                             "when group_query_attention is True")
        if state.get("kv_channels") is None and heads is not None and self.hidden_size is not \
                None and self.hidden_size % heads != 0:
            self._reject("hidden_size", f"a multiple of num_attention_heads={heads} (or set "
                         "kv_channels)")
        granularity = self.recompute_granularity
        if self.recompute_method is not None and granularity != "full":
            self._reject("recompute_method", "None unless recompute_granularity is 'full'")
        if granularity == "full":
            if self.recompute_method is None:
                self._reject("recompute_method", "'uniform' or 'block' when "
                             "recompute_granularity is 'full'")
            if self.recompute_num_layers is None:
                self._reject("recompute_num_layers", "an integer >= 1 when "
                             "recompute_granularity is 'full'")
        layers = self.num_layers
        if layers is not None and self.recompute_num_layers is not None and \
                self.recompute_num_layers > layers:
            self._reject("recompute_num_layers", f"at most num_layers={layers}")
        self._check_recompute_layers()
        moe = state.get("moe_config")
        if moe is not None:
            raw = state.get("num_experts")
            if raw is not None and raw != moe.num_experts:
                self._reject("num_experts", f"None or moe_config.num_experts={moe.num_experts}")
            freq = moe.moe_layer_freq
            if isinstance(freq, list) and layers is not None and len(freq) != layers:
                raise ConfigValueError("MoEConfig", "moe_layer_freq", freq,
                                       f"a list of {layers} entries (num_layers)")
        self._check_sequence_fields()
        training = state.get("training_config")
        flag_dtype = _flag_compute_dtype(self)
        if "compute_dtype" not in state["_explicit"]:
            # Megatron's --fp16/--bf16 choose the compute dtype; re-derived on every check so
            # that a later change of the flags (validated before training) is followed
            state["compute_dtype"] = flag_dtype
        elif flag_dtype != "float32" and state["compute_dtype"] != flag_dtype:
            flag = "fp16" if training.fp16 else "bf16"
            self._reject("compute_dtype", f"{flag_dtype!r} (or unset) while training_config.{flag} "
                         "is True", f"model_config.compute_dtype={state['compute_dtype']!r} "
                         f"contradicts training_config.{flag}=True")
        parallel = state.get("parallel_config")
        if training is not None and parallel is not None and \
                training.parallel_config is not parallel and training.parallel_config != parallel:
            self._reject("parallel_config", "the same parallel config as training_config's",
                         "model and training configs disagree on parallelism",
                         value=parallel)

    def _check_recompute_layers(self) -> None:
        """model_config's and parallel_config's recompute settings agree on every stage and chunk."""
        parallel = self.__dict__.get("parallel_config")
        if parallel is None:
            return
        pp = parallel.pipeline_model_parallel_size
        vpp = parallel.virtual_pipeline_model_parallel_size
        per_chunk = parallel.num_layers_per_virtual_pipeline_stage
        layers = self.num_layers
        if vpp is None and per_chunk and layers and (layers // pp) % per_chunk == 0:
            vpp = layers // pp // per_chunk
        check_recompute_shapes(parallel_values(parallel), model_values(self), pp_size=pp,
                               vpp_size=vpp,
                               num_layers=max(1, (layers or 1) // pp // (vpp or 1)),
                               sequence_parallel=bool(parallel.sequence_parallel))

    def _check_sequence_fields(self) -> None:
        """One sequence length (Megatron has one ``--seq-length``) and a position table that covers it.

        The data pipeline cuts samples of ``dataset_config.seq_length`` (else the model's) while
        the pipeline transfers and the model are shaped by ``model_config.seq_length`` (else the
        dataset's): two different values would train at one length and send shapes of the other.
        """
        state = self.__dict__
        dataset = state.get("dataset_config")
        model_seq = state.get("seq_length")
        data_seq = dataset.seq_length if dataset is not None else None
        if model_seq is not None and data_seq is not None and model_seq != data_seq:
            raise ConfigValueError(
                "TransformerConfig", "seq_length", model_seq,
                f"the same as dataset_config.seq_length={data_seq}, or None to take it from there",
                f"model_config.seq_length={model_seq} and dataset_config.seq_length={data_seq} are "
                "one sequence length; set one of them (the other follows) or both to the same value")
        seq = self.seq_length
        positions = state.get("max_position_embeddings")
        if self.position_embedding_type == "absolute" and positions is not None and seq is not None \
                and positions < seq:
            raise ConfigValueError(
                "TransformerConfig", "max_position_embeddings", positions,
                f">= seq_length={seq} with position_embedding_type='absolute' (or None: seq_length)",
                f"the absolute position table has {positions} rows but samples have seq_length={seq} "
                "tokens (model_config.seq_length, else dataset_config.seq_length)")


def _flag_compute_dtype(config: TransformerConfig) -> str:
    """The compute dtype Megatron's ``--fp16``/``--bf16`` choose (float32 without either)."""
    training = config.__dict__.get("training_config")
    if training is not None and training.fp16:
        return "float16"
    if training is not None and training.bf16:
        return "bfloat16"
    return "float32"


def _head_dim(config: TransformerConfig):
    heads = config.num_attention_heads
    hidden = config.hidden_size
    if heads is None or hidden is None:
        return None
    return hidden // heads


def _moe_experts(config: TransformerConfig):
    moe = config.__dict__.get("moe_config")
    if moe is None or moe.num_experts <= 1:
        return None
    return moe.num_experts


def _dataset_seq_length(config: TransformerConfig):
    dataset = config.__dict__.get("dataset_config")
    return dataset.seq_length if dataset is not None else None

