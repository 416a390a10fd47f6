"""LoraConfig: low-rank adapters on selected linear layers."""

from __future__ import annotations

import re
from typing import Any, List

from .base import BaseConfig
from .fields import Field, Invalid

__all__ = ["LoraConfig"]


def _patterns(value: Any) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise Invalid("expected a list of cell-name patterns", type_error=True)
    out = []
    for item in value:
        if not isinstance(item, str):
            raise Invalid(f"patterns must be strings, got {item!r}", type_error=True)
        try:
            re.compile(item)
        except (re.error, RecursionError, OverflowError) as err:
            raise Invalid(f"{item!r} is not a valid regular expression: {err}") from None
        out.append(item)
    return out


class LoraConfig(BaseConfig):
    """LoRA (low-rank adaptation) configuration.

    A linear layer whose cell name matches one of ``target_cells`` (``re.fullmatch`` on the
    dotted cell name, e.g. ``'.*attention\\.qkv_proj'``) gets frozen weights plus a trainable
    update ``(lora_alpha / lora_rank) * B @ A`` with ``A: rank x in``, ``B: out x rank``.

    Args:
        use_lora (bool): Enable LoRA. Default: False.
        lora_rank (int): Rank of the update. Default: 8.
        lora_alpha (float): Scaling numerator. Default: 16.
        lora_dropout (float): Dropout on the LoRA branch input. Default: 0.0.
        target_cells (list[str]): Regular expressions selecting the adapted cells. Default: [].
        kwargs (dict): Extra options; unknown ones are kept and reported with a warning.

    Examples:
        >>> from mindspeed_ms.core.config import LoraConfig
        >>> lora_config = LoraConfig(use_lora=True, target_cells=[".*qkv.*"])
    """

    section = "lora_config"

    use_lora = Field("bool", False, "Train low-rank adapters instead of the full weights.",
                     group="lora")
    lora_rank = Field("int", 8, "Rank r of the low-rank update B @ A.", ge=1, group="lora")
    lora_alpha = Field("number", 16, "Scaling numerator: the update is scaled by alpha / rank.",
                       gt=0, group="lora")
    lora_dropout = Field("float", 0.0, "Dropout probability on the LoRA branch input.", ge=0.0,
                         lt=1.0, group="lora")
    target_cells = Field(
        "any", [], "Regular expressions (full match on the dotted cell name) selecting the "
        "linear cells that get adapters.", check=_patterns, type_name="list[str]", python_type=list,
        nullable=False, allowed="a list of regular expressions", group="lora")

    def _cross_check(self) -> None:
        if self.use_lora and not self.target_cells:
            self._reject("target_cells", "at least one pattern when use_lora is True",
                         value=self.target_cells)
