"""ModelParallelConfig: how the world is split (tensor, pipeline, context, expert parallelism)."""

from __future__ import annotations

from typing import Any

from ._checks import int_list, parse_literal, plain_data
from .base import BaseConfig
from .fields import Field, Invalid
from .recompute import check_recompute_shapes, parallel_values

__all__ = ["ModelParallelConfig", "CONTEXT_PARALLEL_ALGOS", "ZERO_LEVELS"]

CONTEXT_PARALLEL_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")
ZERO_LEVELS = ("z1", "z2", "z3")


def _layer_list(value: Any):
    """num_layer_list: layers per pipeline stage, or one row per virtual chunk of per-stage counts."""
    value = parse_literal(value)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise Invalid("expected a non-empty list of layer counts per pipeline stage",
                      type_error=not isinstance(value, (list, tuple)))
    nested = [isinstance(item, (list, tuple)) for item in value]
    if any(nested) and not all(nested):
        raise Invalid("mix of numbers and lists; use one list per stage or a flat list")
    if all(nested):
        out = [int_list(0, allow_str_csv=False)(list(item)) for item in value]
        if len({len(item) for item in out}) != 1 or not out[0]:
            raise Invalid("every virtual chunk's row needs the same (non-zero) number of stage counts")
        return out
    return int_list(0, allow_str_csv=False)(list(value))


def _recompute_value(value: Any):
    """recompute/select_recompute: a switch (bool), a layer count, a name or per-stage lists."""
    if isinstance(value, dict):
        raise Invalid("expected a bool, an integer, a string or a list", type_error=True)
    return plain_data(value)


class ModelParallelConfig(BaseConfig):
    """Model parallel configuration.

    Args:
        tensor_model_parallel_size (int): Tensor-parallel size. Default: 1.
        pipeline_model_parallel_size (int): Number of pipeline stages. Default: 1.
        context_parallel_size (int): Context-parallel size. Default: 1.
        context_parallel_algo (str): 'ulysses_cp_algo', 'megatron_cp_algo' (ring attention) or
            'hybrid_cp_algo'. Default: 'ulysses_cp_algo'.
        ulysses_degree_in_cp (int): Ulysses degree inside hybrid context parallelism (ring size is
            context_parallel_size // ulysses_degree_in_cp). Default: None.
        expert_model_parallel_size (int): Expert-parallel size. Default: 1.
        virtual_pipeline_model_parallel_size (int): Virtual pipeline (interleaved) chunks per
            stage. Default: None.
        sequence_parallel (bool): Megatron sequence parallelism. Default: False.
        recv_dtype (str): dtype of pipeline p2p transfers. Default: 'float32'.
        zero_level (str): ZeRO level 'z1', 'z2', 'z3' or None (no ZeRO). Default: None.
        standalone_embedding_stage (bool): Embedding alone on the first stage. Default: False.
        overlap_grad_reduce (bool): Overlap gradient reduction. Default: False.
        gradient_accumulation_fusion (bool): Fuse weight-gradient accumulation. Default: False.
        overlap_p2p_comm (bool): Overlap p2p in interleaved pipelining. Default: True.
        use_cpu_initialization (bool): Initialise weights on CPU. Default: False.
        deterministic_mode (bool): Deterministic computation. Default: False.
        num_layer_list (list): Custom layers per pipeline stage. Default: None.
        recompute_config (dict): Recompute configuration. Default: None.
        recompute (str): Full recompute. Default: None.
        select_recompute (str): Selective recompute. Default: None.
        select_comm_recompute (str): Selective communication recompute. Default: None.
        variable_seq_lengths (bool): Variable sequence lengths. Default: False.
        lazy_inline (bool): ``mindspore.lazy_inline`` on the transformer layers of a compiled
            model; None follows MindFormers' ENABLE_LAZY_INLINE rules. Default: None.
        kwargs (dict): Extra options; unknown ones are kept and reported with a warning.

    Examples:
        >>> from mindspeed_ms.core.config import ModelParallelConfig
        >>> parallel_config = ModelParallelConfig()
    """

    section = "parallel_config"

    tensor_model_parallel_size = Field(
        "int", 1, "Tensor-parallel size (weights of each layer split over this many ranks).",
        ge=1, megatron=True, aliases=("model_parallel",), group="sizes")
    pipeline_model_parallel_size = Field(
        "int", 1, "Number of pipeline stages.", ge=1, megatron=True,
        aliases=("pipeline_stage",), group="sizes")
    context_parallel_size = Field(
        "int", 1, "Context-parallel size (the sequence is split over this many ranks).", ge=1,
        megatron=True, group="sizes")
    context_parallel_algo = Field(
        "str", "ulysses_cp_algo", "Context-parallel algorithm: Ulysses all-to-all, ring "
        "attention (megatron_cp_algo) or both (hybrid_cp_algo).",
        choices=CONTEXT_PARALLEL_ALGOS, megatron=True, group="context")
    ulysses_degree_in_cp = Field(
        "int", None, "Ulysses degree inside hybrid_cp_algo (ring size = context_parallel_size "
        "// this); must divide context_parallel_size.", ge=1, megatron=True, group="context")
    expert_model_parallel_size = Field(
        "int", 1, "Expert-parallel size (experts split over this many ranks).", ge=1,
        megatron=True, aliases=("expert_parallel",), group="sizes")
    virtual_pipeline_model_parallel_size = Field(
        "int", None, "Virtual pipeline chunks per stage (interleaved 1F1B); None = not "
        "interleaved.", ge=1, megatron=True, group="pipeline")
    sequence_parallel = Field(
        "bool", False, "Megatron sequence parallelism: split activations outside attention/MLP "
        "along the sequence over the tensor-parallel ranks.", megatron=True,
        aliases=("use_seq_parallel",), group="sizes")
    recv_dtype = Field(
        "dtype", "float32", "dtype of the activations sent between pipeline stages.",
        group="pipeline")
    zero_level = Field(
        "str", None, "ZeRO level of the distributed optimizer (z1: optimizer states, z2: + "
        "gradients, z3: + parameters); None = no ZeRO.", choices=(None,) + ZERO_LEVELS,
        group="optimizer")
    standalone_embedding_stage = Field(
        "bool", False, "Put the input embedding alone on the first pipeline stage.",
        group="pipeline")
    overlap_grad_reduce = Field(
        "bool", False, "Overlap data-parallel gradient reduction with the backward pass.",
        group="communication")
    gradient_accumulation_fusion = Field(
        "bool", False, "Fuse weight-gradient accumulation into the linear layers' backward.",
        group="communication")
    overlap_p2p_comm = Field(
        "bool", True, "Overlap pipeline p2p transfers with computation (interleaved schedule).",
        group="pipeline")
    use_cpu_initialization = Field(
        "bool", False, "Initialise weights on the CPU.", group="misc")
    deterministic_mode = Field(
        "bool", False, "Deterministic computation: mindspore.set_deterministic(True) (context "
        "deterministic='ON') when the worker or the trainer starts.", group="misc")
    num_layer_list = Field(
        "any", None, "Layers per pipeline stage, e.g. [3, 3, 2]; with virtual pipelining one "
        "row per virtual chunk with one count per stage. None = even split.", megatron=True,
        check=_layer_list, type_name="Union[list[int], list[list[int]]]", python_type=list,
        group="pipeline",
        allowed="None or a list of layer counts (one per stage, or one row of per-stage counts per virtual chunk)")
    recompute_config = Field(
        "dict", None, "Recompute configuration (recompute, select_recompute, "
        "select_comm_recompute keys).", check=plain_data, group="recompute")
    recompute = Field(
        "any", None, "Full recompute (per layer): True, a layer count or per-stage lists.",
        megatron=True, check=_recompute_value, type_name="Union[bool, int, str, list]",
        python_type=(bool, int, str, list), group="recompute",
        allowed="None, a bool, an integer, a string or a list")
    select_recompute = Field(
        "any", None, "Selective (per operator) recompute.", megatron=True,
        check=_recompute_value, type_name="Union[bool, int, str, list]",
        python_type=(bool, int, str, list), group="recompute",
        allowed="None, a bool, an integer, a string or a list")
    select_comm_recompute = Field(
        "any", None, "Selective communication recompute.", megatron=True,
        check=_recompute_value, type_name="Union[bool, int, str, list]",
        python_type=(bool, int, str, list), group="recompute",
        allowed="None, a bool, an integer, a string or a list")
    variable_seq_lengths = Field(
        "bool", False, "Sequences of different lengths between micro batches (pipeline "
        "transfers exchange shapes first).", group="pipeline")

    # Beyond the documented signature.
    num_layers_per_virtual_pipeline_stage = Field(
        "int", None, "Layers per virtual pipeline chunk (alternative to "
        "virtual_pipeline_model_parallel_size = num_layers / pp / this).", ge=1, megatron=True,
        aliases=("num_layers_per_vpp",), group="pipeline")
    noop_layers = Field(
        "any", None, "Indices (0-based) of layers replaced by identity layers, e.g. to even out "
        "pipeline stages.", check=int_list(0), type_name="list[int]", python_type=list,
        group="pipeline",
        allowed="None or a list of layer indices >= 0")
    lazy_inline = Field(
        "bool", None, "mindspore.lazy_inline on the transformer layers of a compiled model (each "
        "distinct layer parsed once: shorter compilation). None = MindFormers' rule: on with "
        "pipeline parallelism, ENABLE_LAZY_INLINE=0 off, ENABLE_LAZY_INLINE_NO_PIPELINE=1 on "
        "without it.", group="misc")

    @property
    def model_parallel_size(self) -> int:
        """tensor x pipeline x context parallel size: ranks that hold one model replica."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def ulysses_degree(self) -> int:
        """Ulysses (all-to-all) degree of context parallelism for the chosen algorithm."""
        algo = self.context_parallel_algo
        if algo == "ulysses_cp_algo":
            return self.context_parallel_size
        if algo == "hybrid_cp_algo":
            return self.ulysses_degree_in_cp or 1
        return 1

    @property
    def ring_degree(self) -> int:
        """Ring-attention degree of context parallelism for the chosen algorithm."""
        return self.context_parallel_size // self.ulysses_degree

    def _cross_check(self) -> None:
        cp = self.context_parallel_size
        pp = self.pipeline_model_parallel_size
        if self.context_parallel_algo == "hybrid_cp_algo":
            degree = self.ulysses_degree_in_cp
            if degree is None or cp % degree != 0:
                self._reject("ulysses_degree_in_cp",
                             f"a divisor of context_parallel_size={cp}",
                             "hybrid_cp_algo needs ulysses_degree_in_cp dividing "
                             "context_parallel_size", value=degree)
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1 and pp < 2:
            self._reject("virtual_pipeline_model_parallel_size",
                         "None or 1 while pipeline_model_parallel_size is 1",
                         "interleaved pipelining needs at least 2 pipeline stages")
        if self.num_layers_per_virtual_pipeline_stage is not None and pp < 2:
            self._reject("num_layers_per_virtual_pipeline_stage",
                         "None while pipeline_model_parallel_size is 1",
                         "interleaved pipelining needs at least 2 pipeline stages")
        if self.standalone_embedding_stage and pp < 2:
            self._reject("standalone_embedding_stage", "False while pipeline_model_parallel_size "
                         "is 1", "a standalone embedding stage needs at least 2 stages")
        # every stage and chunk resolves its recompute lists here, before any worker starts
        check_recompute_shapes(parallel_values(self), pp_size=pp, vpp_size=vpp,
                               sequence_parallel=bool(self.sequence_parallel))
        layers = self.num_layer_list
        if layers is not None:
            # MindSpeed-Core-MS's layout: a flat list per stage, or (vpp, pp) rows per virtual chunk
            nested = isinstance(layers[0], list)
            if not nested and len(layers) != pp:
                self._reject("num_layer_list", f"one entry per pipeline stage ({pp})",
                             f"got {len(layers)} entries")
            if nested and (len(layers[0]) != pp or vpp is not None and len(layers) != vpp):
                self._reject("num_layer_list",
                             f"one row per virtual chunk ({vpp if vpp is not None else len(layers)}), "
                             f"each with one count per pipeline stage ({pp})",
                             f"got {len(layers)} row(s) of {len(layers[0])}")

