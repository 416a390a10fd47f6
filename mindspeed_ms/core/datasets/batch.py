"""Model inputs from token samples: tokens, labels, loss mask, position ids, attention mask.

Conventions (Megatron's ``get_ltor_masks_and_position_ids``), all numpy arrays:

* ``samples``: ``[b, s + 1]`` token ids; ``tokens = samples[:, :-1]``, ``labels = samples[:, 1:]``
  (int32).
* ``loss_mask``: ``float32[b, s]``, 1 everywhere; with ``eod_mask_loss`` 0 where the *input* token
  is the end-of-document token; with a ``pad_token`` 0 where the *label* is padding (Megatron's
  GPT dataset), and padding ids outside the vocabulary (negative ones, such as Megatron's -1) are
  replaced by 0 in tokens and labels so that the embedding look-up stays valid.
* ``position_ids``: ``int32[b, s]``, ``0 .. s-1``; with ``reset_position_ids`` they restart at 0
  after every end-of-document token.
* ``attention_mask``: ``bool[b', 1, s, s]``, **True = masked out** (may not attend): the causal
  mask (``b' = 1``, broadcast over the batch) or, with ``reset_attention_mask``, per sample
  (``b' = b``) also masking every key before and including an end-of-document token for queries
  after it, so attention stays inside each document.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = ["get_ltor_masks_and_position_ids", "build_model_inputs", "collate"]


def collate(dataset: Any, indices: Sequence[int]) -> np.ndarray:
    """Stack ``dataset[i]`` for ``indices`` into ``int32[len(indices), s + 1]``."""
    return np.stack([np.asarray(dataset[int(i)], dtype=np.int32) for i in indices])


def get_ltor_masks_and_position_ids(tokens: np.ndarray, eod_token: Optional[int] = None,
                                    reset_position_ids: bool = False, reset_attention_mask: bool = False,
                                    eod_mask_loss: bool = False,
                                    build_attention_mask: bool = True
                                    ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Masks and position ids for left-to-right language modelling.

    Args:
        tokens: ``[b, s]`` input token ids.
        eod_token: The end-of-document id (required by the three options below).
        reset_position_ids: Restart positions after each end-of-document token.
        reset_attention_mask: Keep attention inside documents.
        eod_mask_loss: Zero the loss where the input token is the end-of-document token.
        build_attention_mask: Set False to skip the ``[.., s, s]`` mask (returned as ``None``).

    Returns:
        ``(attention_mask, loss_mask, position_ids)`` as described in the module docstring.

    Raises:
        ValueError: ``tokens`` is not 2-D, or an option needs ``eod_token`` and it is None.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be 2-D [batch, seq], got shape {tokens.shape}")
    if eod_token is None and (reset_position_ids or reset_attention_mask or eod_mask_loss):
        raise ValueError("reset_position_ids, reset_attention_mask and eod_mask_loss need eod_token")
    b, s = tokens.shape
    arange = np.arange(s, dtype=np.int64)
    loss_mask = np.ones((b, s), dtype=np.float32)
    position_ids = np.broadcast_to(arange, (b, s)).astype(np.int32)
    causal_masked = arange[None, :] > arange[:, None]  # [s, s]: key after query
    attention_mask = causal_masked[None, None] if build_attention_mask else None
    if eod_token is None:
        return attention_mask, loss_mask, position_ids
    is_eod = tokens == eod_token
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    if reset_position_ids or reset_attention_mask:
        starts = np.zeros((b, s), dtype=bool)
        starts[:, 1:] = is_eod[:, :-1]  # a document starts right after an eod
        if reset_position_ids:
            seg_start = np.maximum.accumulate(np.where(starts, arange[None, :], 0), axis=1)
            position_ids = (arange[None, :] - seg_start).astype(np.int32)
        if reset_attention_mask and build_attention_mask:
            doc = np.cumsum(starts, axis=1)
            other_doc = doc[:, :, None] != doc[:, None, :]  # [b, s_query, s_key]
            attention_mask = (causal_masked[None] | other_doc)[:, None]
    return attention_mask, loss_mask, position_ids


def build_model_inputs(samples: np.ndarray, eod_token: Optional[int] = None, eod_mask_loss: bool = False,
                       reset_position_ids: bool = False, reset_attention_mask: bool = False,
                       build_attention_mask: bool = True,
                       pad_token: Optional[int] = None) -> Dict[str, Optional[np.ndarray]]:
    """Split ``[b, s + 1]`` samples into the model's inputs.

    ``pad_token`` (``dataset_config.pad_token_id``): padded label positions are masked out of the
    loss (see the module docstring).

    Returns:
        ``{"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}`` (see the module
        docstring; ``attention_mask`` is None with ``build_attention_mask=False``).
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] < 2:
        raise ValueError(f"samples must be [batch, seq_length + 1] with seq_length >= 1, got shape {samples.shape}")
    tokens = np.ascontiguousarray(samples[:, :-1], dtype=np.int32)
    labels = np.ascontiguousarray(samples[:, 1:], dtype=np.int32)
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod_token, reset_position_ids, reset_attention_mask, eod_mask_loss, build_attention_mask)
    if pad_token is not None:
        loss_mask[labels == pad_token] = 0.0
        if pad_token < 0:
            tokens[tokens == pad_token] = 0
            labels[labels == pad_token] = 0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "attention_mask": attention_mask}
