"""MoEConfig: mixture-of-experts routing, dispatch and the MindFormers MoE features."""

from __future__ import annotations

from typing import Any, List

from ._checks import parse_literal
from .base import BaseConfig
from .fields import Field, Invalid, _to_int

__all__ = ["MoEConfig"]


def _layer_freq(value: Any):
    value = parse_literal(value)
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            flag = _to_int(item)
            if flag not in (0, 1):
                raise Invalid("a per-layer list holds 0 (dense) or 1 (MoE) for every layer")
            out.append(flag)
        if not out:
            raise Invalid("the per-layer list is empty")
        return out
    number = _to_int(value)
    if number < 1:
        raise Invalid("an interval must be >= 1")
    return number


class MoEConfig(BaseConfig):
    """Mixture of Experts configuration.

    MoE is active when ``num_experts > 1``. MindFormers spellings are accepted as aliases
    (``expert_num`` for ``num_experts``, ``capacity_factor`` for ``moe_expert_capacity_factor``).

    Args:
        num_experts (int): Number of experts. Default: 1.
        moe_grouped_gemm (bool): Grouped GEMM for the experts. Default: False.
        moe_router_topk (int): Experts per token. Default: 2.
        moe_router_load_balancing_type (str): 'aux_loss' or 'none'. Default: 'none'.
        moe_token_dispatcher_type (str): 'alltoall'. Default: 'alltoall'.
        use_self_defined_alltoall (bool): Use a custom all-to-all operator. Default: False.
        moe_expert_capacity_factor (float): Capacity factor per expert; None = no capacity
            limit (no token dropping). Default: None.
        moe_pad_expert_input_to_capacity (bool): Pad each expert's input to its capacity.
            Default: False.
        moe_token_drop_policy (str): Which tokens to drop beyond capacity: 'probs' (lowest
            router probability) or 'position' (latest). Default: 'probs'.
        moe_aux_loss_coeff (float): Auxiliary load-balancing loss coefficient. Default: 0.0.
        moe_z_loss_coeff (float): Router z-loss coefficient. Default: None.
        moe_input_jitter_eps (float): Multiplicative jitter on the router input. Default: None.
        kwargs (dict): Extra options; unknown ones are kept and reported with a warning.

    Examples:
        >>> from mindspeed_ms.core.config import MoEConfig
        >>> moe_config = MoEConfig(num_experts=4, moe_router_topk=2)
    """

    section = "moe_config"

    num_experts = Field("int", 1, "Number of experts (MoE is active when > 1).", ge=1,
                        megatron=True, aliases=("expert_num",), group="experts")
    moe_grouped_gemm = Field("bool", False, "Compute the local experts with one grouped GEMM.",
                             megatron=True, group="experts")
    moe_router_topk = Field("int", 2, "Experts each token is routed to.", ge=1, megatron=True,
                            group="router")
    moe_router_load_balancing_type = Field(
        "str", "none", "Load balancing of the router: auxiliary loss or none.",
        choices=("aux_loss", "none"), megatron=True, group="router")
    moe_token_dispatcher_type = Field(
        "str", "alltoall", "How tokens reach experts on other ranks.", choices=("alltoall",),
        megatron=True, group="dispatch")
    use_self_defined_alltoall = Field(
        "bool", False, "Use the self-defined all-to-all operator.", group="dispatch")
    moe_expert_capacity_factor = Field(
        "float", None, "Capacity factor: each expert takes at most ceil(topk * tokens * factor "
        "/ num_experts) tokens; None = no limit.", gt=0, megatron=True,
        aliases=("capacity_factor",), group="capacity")
    moe_pad_expert_input_to_capacity = Field(
        "bool", False, "Pad every expert's input to its capacity (needs a capacity factor).",
        megatron=True, group="capacity")
    moe_token_drop_policy = Field(
        "str", "probs", "Tokens dropped beyond capacity: lowest probability ('probs') or "
        "latest in the sequence ('position').", choices=("probs", "position"), megatron=True,
        group="capacity")
    moe_aux_loss_coeff = Field("float", 0.0, "Coefficient of the auxiliary load-balancing loss.",
                               ge=0, megatron=True, group="router")
    moe_z_loss_coeff = Field("float", None, "Coefficient of the router z-loss (None = off).",
                             ge=0, megatron=True, group="router")
    moe_input_jitter_eps = Field(
        "float", None, "Multiplicative uniform jitter [1-eps, 1+eps] on the router input "
        "(None = off).", ge=0, megatron=True, group="router")

    # Beyond the documented signature: MindFormers features and layer placement.
    moe_layer_freq = Field(
        "any", 1, "Which layers are MoE: 1 = every layer, k = every k-th layer (0, k, 2k, ...), "
        "or a list with 0/1 per layer.", check=_layer_freq, nullable=False,
        type_name="Union[int, list[int]]", python_type=(int, list), megatron=True,
        allowed="an integer >= 1 or a list of 0/1 per layer", group="experts")
    save_token_distribution = Field(
        "bool", False, "Record the tokens routed to each expert, per MoE layer and step "
        "(event stream and token_distribution/*.npy).", group="monitoring")
    enable_cold_hot_expert = Field(
        "bool", False, "Replicate the most used (hot) experts on every expert-parallel rank; cold "
        "experts get capacity factor * cold_token_percent.", group="cold_hot")
    hot_expert_num = Field("int", 0, "Number of hot experts (<= num_experts).", ge=0,
                           group="cold_hot")
    cold_token_percent = Field(
        "float", 1.0, "Capacity of cold experts as a fraction of the hot experts' capacity.",
        gt=0.0, le=1.0, group="cold_hot")
    update_step = Field(
        "int", 10000, "Re-choose the hot experts at steps 1, 2, 4, ... below this and at "
        "multiples of it.", ge=1, group="cold_hot")

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether the 0-based layer ``layer_index`` has an MoE MLP (False when MoE is off)."""
        if self.num_experts <= 1:
            return False
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            return 0 <= layer_index < len(freq) and bool(freq[layer_index])
        return layer_index % freq == 0

    def moe_layer_pattern(self, num_layers: int) -> List[bool]:
        """:meth:`is_moe_layer` for every layer of a ``num_layers``-layer model."""
        return [self.is_moe_layer(i) for i in range(num_layers)]

    def _cross_check(self) -> None:
        experts = self.num_experts
        if experts > 1 and self.moe_router_topk > experts:
            self._reject("moe_router_topk", f"at most num_experts={experts}")
        if self.hot_expert_num > experts:
            self._reject("hot_expert_num", f"at most num_experts={experts}")
        if self.enable_cold_hot_expert:
            if experts <= 1:
                self._reject("enable_cold_hot_expert", "False while num_experts is 1",
                             "cold/hot experts need MoE (num_experts > 1)")
            if self.hot_expert_num < 1:
                self._reject("hot_expert_num", f"1..{experts} when enable_cold_hot_expert is True")
            if self.moe_expert_capacity_factor is None:
                self._reject("moe_expert_capacity_factor", "a number > 0 when "
                             "enable_cold_hot_expert is True",
                             "hot and cold capacities are derived from it")
        if self.moe_pad_expert_input_to_capacity and self.moe_expert_capacity_factor is None:
            self._reject("moe_expert_capacity_factor", "a number > 0 when "
                         "moe_pad_expert_input_to_capacity is True")
