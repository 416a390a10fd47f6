"""The pretraining guide's nested YAML layout, routed onto the flat config fields.

The guide writes three blocks that have no section of their own here:

* ``train_config``: ``ms_training_config`` (any :class:`TrainingConfig` field, e.g.
  ``resume_training``, ``wrap_with_ddp``, ``bucket_size``) and ``recompute_config`` (the
  ``recompute`` / ``select_recompute`` / ``select_comm_recompute`` mapping of
  ``parallel_config.recompute_config``);
* ``accelerate_config.precision``: dtypes and the fused/not-fused operator lists;
* ``model_config.llm``: ``tokenizer``, ``embedding``, ``position``, ``blocks`` (``layernorm``,
  ``attention``, ``ffn``) and ``head``.

Each key lands on one field (the tables below). A key that means nothing in this framework is
refused with its full YAML path, its value and the keys that are supported; nothing is dropped.
Keys left empty in the YAML (``noop_layers:``) mean "not set", as the guide's comments say.
"""

from __future__ import annotations

import difflib

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .fields import ConfigTypeError, ConfigValueError

__all__ = ["collect_train_config", "collect_precision", "collect_llm", "FUSED_OPERATORS"]


class _To:
    """One guide key -> one field, optionally with a conversion of the value.

    Args:
        section: Target section (``model_config``, ...).
        field: Target field name.
        convert: ``(value, path) -> value``; raises with the YAML path on a bad value.
    """

    def __init__(self, section: str, field: str, convert: Optional[Callable[[Any, str], Any]] = None):
        self.section = section
        self.field = field
        self.convert = convert


class _Refuse:
    """A guide key with no meaning in this framework: refused with the reason."""

    def __init__(self, reason: str, allowed: str):
        self.reason = reason
        self.allowed = allowed


def _mapping(value: Any, path: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{path} must be a mapping, got {type(value).__name__} {value!r:.60}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(*_split(path), value, "True or False")
    return value


def _split(path: str) -> Tuple[str, str]:
    head, _, tail = path.rpartition(".")
    return head, tail


def _unknown(path: str, value: Any, table: Mapping) -> ConfigValueError:
    head, key = _split(path)
    return ConfigValueError(head, key, value, "keys " + ", ".join(table),
                            f"{key!r} has no meaning in this framework")


def _walk(collector, table: Mapping, value: Any, path: str) -> None:
    """Put every key of ``value`` (a mapping at ``path``) where ``table`` says, else refuse."""
    for key, item in _mapping(value, path).items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: option names must be strings, got {key!r}")
        sub = f"{path}.{key}"
        target = table.get(key)
        if target is None:
            raise _unknown(sub, item, table)
        if isinstance(target, dict):
            _walk(collector, target, item, sub)
        elif isinstance(target, _Refuse):
            if item is not None:
                head, name = _split(sub)
                raise ConfigValueError(head, name, item, target.allowed, target.reason)
        elif isinstance(target, _To):
            if item is None:
                continue
            _put(collector, target.section, target.field, item, sub, target.convert)
        else:
            target(collector, item, sub)


def _put(collector, section: str, field: str, value: Any, path: str,
         convert: Optional[Callable[[Any, str], Any]] = None) -> None:
    from .all_config import SECTIONS  # pylint: disable=import-outside-toplevel
    shown = None
    if convert is not None:
        converted = convert(value, path)
        if converted is not value:
            shown = f"{path}={value!r} (-> {section}.{field}={converted!r})"
        value = converted
    cls = SECTIONS[section]
    spec = cls._fields.get(field)  # pylint: disable=protected-access
    if spec is not None:
        # checked here so that the error names the YAML path (and the field it stands for)
        try:
            spec.coerce(value, cls.__name__)
        except (ConfigValueError, ConfigTypeError) as err:
            raise type(err)(*_split(path), value, err.allowed,
                            f"-> {err.config}.{err.field}") from None
    collector.put(section, field, value, path, shown=shown)


# ----------------------------------------------------------------------------------------------
# train_config
# ----------------------------------------------------------------------------------------------

_RECOMPUTE_KEYS = ("recompute", "select_recompute", "select_comm_recompute")


def _ms_training_config(collector, value: Any, path: str) -> None:
    from .training import TrainingConfig  # pylint: disable=import-outside-toplevel
    fields = list(TrainingConfig._fields)  # pylint: disable=protected-access
    for key, item in _mapping(value, path).items():
        sub = f"{path}.{key}"
        canon = TrainingConfig.canonical_name(key) if isinstance(key, str) else None
        if canon is None or canon in TrainingConfig._links:  # pylint: disable=protected-access
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigValueError(path, str(key), item, "a TrainingConfig field (" +
                                   ", ".join(fields[:6]) + ", ...; see docs/config.md)",
                                   "not a training option" + hint)
        if item is not None:
            _put(collector, "training_config", canon, item, sub)


def _recompute_config(collector, value: Any, path: str) -> None:
    out = {}
    for key, item in _mapping(value, path).items():
        if key not in _RECOMPUTE_KEYS:
            raise _unknown(f"{path}.{key}", item, dict.fromkeys(_RECOMPUTE_KEYS))
        if item is not None:
            out[key] = item
    if out:
        collector.put("parallel_config", "recompute_config", out, path)


_TRAIN_CONFIG = {"ms_training_config": _ms_training_config, "recompute_config": _recompute_config}


def collect_train_config(collector, value: Any, path: str = "train_config") -> None:
    """Route the guide's ``train_config`` block (see the module docstring)."""
    _walk(collector, _TRAIN_CONFIG, value, path)


# ----------------------------------------------------------------------------------------------
# accelerate_config.precision
# ----------------------------------------------------------------------------------------------

#: Operator names of ``fused_operators`` / ``nofused_operators`` -> (section, field).
#: ``rmsnorm`` selects the normalisation itself (see :func:`_rmsnorm_fusion`).
FUSED_OPERATORS: Dict[str, Optional[Tuple[str, str]]] = {
    "flash_attention": ("model_config", "use_flash_attention"),
    "rope": ("model_config", "apply_rope_fusion"),
    "swiglu": ("model_config", "apply_swiglu_fusion"),
    "rmsnorm": None,
    "masked_softmax": ("model_config", "masked_softmax_fusion"),
    "bias_dropout": ("model_config", "bias_dropout_fusion"),
    "gradient_accumulation": ("parallel_config", "gradient_accumulation_fusion"),
}


def _operator_names(value: Any, path: str) -> List[str]:
    # The guide writes a comma-separated string; a YAML list is the same.
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise ConfigTypeError(*_split(path), value, "a comma-separated string or a list of "
                              "operator names (" + ", ".join(FUSED_OPERATORS) + ")")
    for name in names:
        if name.lower() not in FUSED_OPERATORS:
            raise ConfigValueError(*_split(path), value, "operator names " +
                                   ", ".join(FUSED_OPERATORS), f"unknown operator {name!r}")
    return [name.lower() for name in names]


def _operators(fused: bool):
    def collect(collector, value: Any, path: str) -> None:
        if value is None:
            return
        for name in _operator_names(value, path):
            target = FUSED_OPERATORS[name]
            shown = f"{path} {'lists' if fused else 'lists as not fused'} {name!r}"
            if target is None:
                collector.post_checks.append(_rmsnorm_fusion(fused, path, shown))
                # the same operator in both lists is refused like any other key given twice
                collector.claim("model_config", "rmsnorm operator fusion", fused, shown)
            else:
                collector.put(target[0], target[1], fused, path, shown=shown + f" (-> "
                              f"{target[0]}.{target[1]}={fused})")
    return collect


def _rmsnorm_fusion(fused: bool, path: str, shown: str):
    """Fused RMSNorm is the normalisation 'FusedRMSNorm' (the RMSNorm kernel of upstream)."""
    def check(all_config) -> None:
        model = all_config.model_config
        explicit = "normalization" in model.explicit_fields()
        if fused:
            if explicit and model.normalization == "LayerNorm":
                raise ConfigValueError("TransformerConfig", "normalization", model.normalization,
                                       "RMSNorm or FusedRMSNorm",
                                       f"{shown}, which is an RMSNorm kernel")
            model.normalization = "FusedRMSNorm"
        elif explicit and model.normalization == "FusedRMSNorm":
            raise ConfigValueError("TransformerConfig", "normalization", model.normalization,
                                   "RMSNorm or LayerNorm", f"{shown}")
    return check


def _logits_dtype(value: Any, path: str) -> bool:
    # The logits matmul runs in compute_dtype; the loss is computed in float32 unless
    # fp16_lm_cross_entropy (gpt_model.post_language_model_processing): those are the two choices.
    name = value.strip().lower() if isinstance(value, str) else value
    if name in ("float32", "fp32"):
        return False
    if name in ("float16", "fp16"):
        return True
    raise ConfigValueError(*_split(path), value, "float32 (cross entropy in float32) or float16 "
                           "(fp16_lm_cross_entropy: needs compute_dtype float16)",
                           "the cross entropy runs in float32 or in float16 only")


def _logits(collector, value: Any, path: str) -> None:
    if value is None:
        return
    _put(collector, "model_config", "fp16_lm_cross_entropy", value, path, _logits_dtype)
    if _logits_dtype(value, path):
        def check(all_config) -> None:
            compute = all_config.model_config.compute_dtype
            if compute != "float16":
                raise ConfigValueError(*_split(path), value, "float32 while compute_dtype is "
                                       f"{compute}", "float16 logits need compute_dtype float16")
        collector.post_checks.append(check)


def _grad_accumulation_dtype(value: Any, path: str) -> bool:
    # Gradients are accumulated in the parameters' dtype, or in float32 with Megatron's
    # accumulate_allreduce_grads_in_fp32; no third dtype exists.
    name = value.strip().lower() if isinstance(value, str) else value
    if name in ("float32", "fp32"):
        return True
    raise ConfigValueError(*_split(path), value, "float32 (accumulate_allreduce_grads_in_fp32); "
                           "leave it out to accumulate in params_dtype",
                           "gradients accumulate in params_dtype or in float32")


_PRECISION = {
    "param_init_dtype": _To("model_config", "params_dtype"),
    "compute_dtype": _To("model_config", "compute_dtype"),
    "softmax_compute_dtype": _To("model_config", "softmax_compute_dtype"),
    "logits_compute_dtype": _logits,
    "grad_accumulation_dtype": _To("training_config", "accumulate_allreduce_grads_in_fp32",
                                   _grad_accumulation_dtype),
    "residual-connection": _To("model_config", "residual_connection_dtype"),
    "residual_connection": _To("model_config", "residual_connection_dtype"),
    "residual_connection_dtype": _To("model_config", "residual_connection_dtype"),
    "fused_operators": _operators(True),
    "nofused_operators": _operators(False),
}


def collect_precision(collector, value: Any, path: str = "accelerate_config.precision") -> None:
    """Route the guide's ``accelerate_config.precision`` block (see the module docstring)."""
    _walk(collector, _PRECISION, value, path)


# ----------------------------------------------------------------------------------------------
# model_config.llm
# ----------------------------------------------------------------------------------------------

def _attention_type(collector, value: Any, path: str) -> None:
    if value is None:
        return
    name = value.strip().upper() if isinstance(value, str) else value
    if name not in ("GQA", "MHA", "MQA"):
        raise ConfigValueError(*_split(path), value, "GQA, MHA or MQA",
                               "grouped-query, multi-head or multi-query attention")
    shown = f"{path}={value!r} (-> model_config.group_query_attention={name != 'MHA'})"
    collector.put("model_config", "group_query_attention", name != "MHA", path, shown=shown)
    if name == "MQA":  # one key/value head for every query head
        collector.put("model_config", "num_query_groups", 1, path,
                      shown=f"{path}='MQA' (-> model_config.num_query_groups=1)")


def _inverted(value: Any, path: str) -> bool:
    return not _bool(value, path)


def _divided_by(collector, value: Any, path: str) -> None:
    # Megatron pads the tokenizer's vocabulary up to a multiple of make_vocab_size_divisible_by;
    # this framework reads no tokenizer and takes the padded size as given, so the divisor is a
    # check on it.
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigValueError(*_split(path), value, "an integer >= 1")

    def check(all_config) -> None:
        vocab = all_config.model_config.vocab_size
        if vocab is None:
            raise ConfigValueError(*_split(path), value, "set together with tokenizer.padded_size "
                                   "(or model_config.vocab_size)", "there is no vocabulary size "
                                   "to pad: this framework loads no tokenizer")
        if vocab % value != 0:
            raise ConfigValueError("TransformerConfig", "vocab_size", vocab,
                                   f"a multiple of {path}={value}",
                                   "the padded vocabulary size must be divisible by divided_by")
    collector.post_checks.append(check)


def _embedding_init_std(collector, value: Any, path: str) -> None:
    # The word embedding is initialised with init_method_std, as in Megatron, with the std of the
    # blocks: a separate embedding std does not exist, so only that same value is accepted (it
    # must not change the blocks' initialisation either).
    if value is None:
        return
    from .transformer import TransformerConfig  # pylint: disable=import-outside-toplevel
    spec = TransformerConfig._fields["init_method_std"]  # pylint: disable=protected-access
    try:
        std = spec.coerce(value, "TransformerConfig")
    except (ConfigValueError, ConfigTypeError) as err:
        raise type(err)(*_split(path), value, err.allowed, "an init std") from None

    def check(all_config) -> None:
        blocks = all_config.model_config.init_method_std
        if std != blocks:
            where = collector.given_as("model_config", "init_method_std") or \
                f"the default init_method_std={blocks!r}"
            raise ConfigValueError(*_split(path), value, f"the std of the blocks ({where})",
                                   "the word embedding is initialised with init_method_std like "
                                   "the blocks; there is no separate embedding std")
    collector.post_checks.append(check)


_LLM = {
    "tokenizer": {
        "padded_size": _To("model_config", "vocab_size"),
        "divided_by": _divided_by,
        "use_fast": _Refuse("this framework loads no tokenizer: the data are token ids, so "
                            "use_fast has no effect; remove it", "no tokenizer options"),
    },
    "embedding": {
        "hidden_size": _To("model_config", "hidden_size"),
        "init_std": _embedding_init_std,
    },
    "position": {
        "type": _To("model_config", "position_embedding_type"),
        "max_size": _To("model_config", "max_position_embeddings"),
        "rope_base": _To("model_config", "rotary_base"),
    },
    "blocks": {
        "num_layers": _To("model_config", "num_layers"),
        "init_std": _To("model_config", "init_method_std"),
        "sandwich_norm": _To("model_config", "use_sandwich_norm"),
        "layernorm": {
            "norm_type": _To("model_config", "normalization"),
            "epsilon": _To("model_config", "norm_epsilon"),
        },
        "attention": {
            "attention_type": _attention_type,
            "head_num": _To("model_config", "num_attention_heads"),
            "kv_group_size": _To("model_config", "num_query_groups"),
            "qkv_bias": _To("model_config", "qkv_has_bias"),
            "projection_bias": _To("model_config", "out_proj_has_bias"),
            "dropout_rate": _To("model_config", "attention_dropout"),
            "post_norm_scale": _To("model_config", "attn_post_norm_scale"),
        },
        "ffn": {
            "hidden_size": _To("model_config", "ffn_hidden_size"),
            "activation": _To("model_config", "hidden_act"),
            # Megatron's hidden_dropout: on the MLP output (and on the attention output).
            "dropout_rate": _To("model_config", "hidden_dropout"),
            "mlp_bias": _To("model_config", "mlp_has_bias"),
            "post_norm_scale": _To("model_config", "ffn_post_norm_scale"),
        },
    },
    "head": {
        "shared_embedding": _To("model_config", "untie_embeddings_and_output_weights", _inverted),
    },
}


def collect_llm(collector, value: Any, path: str = "model_config.llm") -> None:
    """Route the guide's ``model_config.llm`` block (see the module docstring)."""
    _walk(collector, _LLM, value, path)
