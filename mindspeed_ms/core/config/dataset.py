"""DatasetConfig: what the data loader produces (batch sizes, sequence layout, data source)."""

from __future__ import annotations

import re
from typing import Any, Tuple

from .base import BaseConfig
from .fields import Field, Invalid, _to_float

__all__ = ["DatasetConfig", "DATASET_TYPES", "DATA_LAYOUTS"]

DATASET_TYPES = ("char", "mmap", "synthetic")
DATA_LAYOUTS = ("BSH", "SBH")


def _parse_split(value: Any) -> Tuple[float, ...]:
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,/\s]+", value.strip()) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise Invalid("expected a string like '90,10,0' or a list of numbers", type_error=True)
    if not 1 <= len(parts) <= 3:
        raise Invalid("expected 1 to 3 parts (train, validation, test)")
    numbers = tuple(_to_float(p) for p in parts)
    if any(n < 0 for n in numbers) or sum(numbers) <= 0:
        raise Invalid("parts must be >= 0 with a positive sum")
    return numbers


def _check_split(value: Any) -> Any:
    _parse_split(value)
    if isinstance(value, str):
        return value.strip()
    return [_to_float(v) for v in value]


def _check_data_path(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and
                                               not isinstance(v, bool) for v in value):
        # Megatron blends are lists like [weight, path, weight, path]; keep them as given.
        return list(value)
    raise Invalid("expected a path or a list of paths (optionally with weights)", type_error=True)


class DatasetConfig(BaseConfig):
    """Dataset configuration.

    ``batch_size`` is the micro-batch size (Megatron's ``micro_batch_size``): samples per
    micro batch on one data-parallel rank. One optimizer step consumes ``micro_batch_num``
    micro batches per data-parallel rank, i.e. ``batch_size * micro_batch_num * dp`` samples.

    Args:
        dataset_dir (str): Dataset directory. Default: './dataset'.
        shuffle (bool): Shuffle the dataset. Default: False.
        batch_size (int): Samples per (micro) batch. Default: 1.
        micro_batch_num (int): Micro batches per step (pipeline micro batches or gradient
            accumulation steps). Default: 1.
        train_samples (int): Number of training samples (0 = all). Default: 0.
        data_layout (str): Input layout 'BSH' or 'SBH'. Default: 'BSH'.
        eos_token_id (int): End-of-sequence token id. Default: 0.
        kwargs (dict): Extra options; unknown ones are kept and reported with a warning.

    Examples:
        >>> from mindspeed_ms.core.config import DatasetConfig
        >>> dataset_config = DatasetConfig()
    """

    section = "dataset_config"

    dataset_dir = Field("str", "./dataset", "Dataset directory: a relative data_path is read from "
                        "here when it exists there (else relative to the working directory).",
                        group="source")
    shuffle = Field("bool", False, "Shuffle the samples.", group="loader")
    batch_size = Field(
        "int", 1, "Samples per micro batch on one data-parallel rank (Megatron "
        "micro_batch_size).", ge=1, megatron=("micro_batch_size",),
        aliases=("micro_batch_size",), group="batch")
    micro_batch_num = Field(
        "int", 1, "Micro batches per optimizer step: pipeline micro batches, or gradient "
        "accumulation steps without pipelining.", ge=1, megatron=True,
        aliases=("gradient_accumulation_steps",), group="batch")
    train_samples = Field(
        "int", 0, "Number of training samples to use (0 = the whole dataset).", ge=0,
        group="source")
    data_layout = Field(
        "str", "BSH", "Layout of the model input: batch-sequence-hidden or "
        "sequence-batch-hidden.", choices=DATA_LAYOUTS, group="batch")
    eos_token_id = Field(
        "int", 0, "End-of-sequence (EoD) token id.", ge=0, megatron=True, group="tokens")

    # Beyond the documented signature.
    seq_length = Field(
        "int", None, "Tokens per sample; None = the model's seq_length.", ge=1, group="batch")
    dataset_type = Field(
        "str", "synthetic", "Kind of dataset: 'char' (character-level text file), 'mmap' "
        "(memory-mapped token ids) or 'synthetic' (random tokens).", choices=DATASET_TYPES,
        group="source")
    data_path = Field(
        "any", None, "Path of the data file (char: a text file; mmap: the token file prefix), or "
        "a Megatron blend list [weight, path, ...].", check=_check_data_path,
        type_name="Union[str, list]", python_type=(str, list),
        allowed="None, a path or a list of paths",
        megatron=True, group="source")
    split = Field(
        "any", "90,10,0", "Train/validation/test proportions, e.g. '90,10,0' or [0.9, 0.1, 0].",
        check=_check_split, type_name="Union[str, list[float]]", python_type=(str, list),
        nullable=False,
        allowed="a string like '90,10,0' or a list of up to 3 non-negative numbers",
        megatron=True, group="source")
    pad_token_id = Field(
        "int", None, "Padding token id: label positions holding it are masked out of the loss "
        "(None = no padding token).", megatron=True, group="tokens")
    reset_attention_mask = Field(
        "bool", False, "Reset the attention mask after every EoD token (documents do not see "
        "each other).", megatron=True, group="tokens")
    reset_position_ids = Field(
        "bool", False, "Restart position ids after every EoD token.", megatron=True,
        group="tokens")
    eod_mask_loss = Field(
        "bool", False, "Do not compute the loss on EoD tokens.", megatron=True, group="tokens")
    drop_remainder = Field(
        "bool", True, "Drop the last incomplete batch.", megatron=True, group="loader")
    num_workers = Field(
        "int", 1, "Data loading worker processes/threads (0 = in the main process).", ge=0,
        group="loader")
    seed = Field(
        "int", 1234, "Seed of the data shuffling and of synthetic data.", ge=0, group="loader")

    def split_fractions(self) -> Tuple[float, float, float]:
        """The split as three fractions (train, validation, test) summing to 1."""
        parts = list(_parse_split(self.split)) + [0.0, 0.0]
        total = sum(parts[:3])
        return tuple(p / total for p in parts[:3])  # type: ignore[return-value]
