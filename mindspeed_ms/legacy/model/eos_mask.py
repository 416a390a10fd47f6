"""Attention masks and position ids from end-of-document tokens."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

__all__ = ["EosMask", "eod_masks_and_position_ids"]


def eod_masks_and_position_ids(tokens: np.ndarray, eod_token_id: int, reset_position_ids: bool,
                               reset_attention_mask: bool = True):
    """Causal masks that stop attention at document boundaries, and position ids.

    A token may attend to earlier tokens of its own document (the end-of-document token belongs to
    the document it ends). With ``reset_position_ids`` positions restart after every eod token.

    Args:
        tokens: ``(B, S)`` token ids.
        eod_token_id: The end-of-document id.
        reset_position_ids: Restart positions after each eod.
        reset_attention_mask: Stop attention at documents (else plain causal).

    Returns:
        ``(position_ids (B, S) int32, mask (B, S, S) uint8)`` where 1 means masked out.
    """
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    idx = np.arange(seq)
    causal = idx[None, :] <= idx[:, None]
    # document index of every token: eod tokens close their document
    is_eod = (tokens == eod_token_id)
    doc = np.concatenate([np.zeros((batch, 1), np.int64), np.cumsum(is_eod, axis=1)[:, :-1]], axis=1)
    if reset_attention_mask:
        allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
    else:
        allowed = np.broadcast_to(causal, (batch, seq, seq))
    if reset_position_ids:
        starts = np.zeros((batch, seq), np.int64)
        for b in range(batch):
            start = 0
            for i in range(seq):
                starts[b, i] = start
                if is_eod[b, i]:
                    start = i + 1
        position_ids = idx[None, :] - starts
    else:
        position_ids = np.broadcast_to(idx, (batch, seq))
    return position_ids.astype(np.int32), (~allowed).astype(np.uint8)


class EosMask(nn.Cell):
    """Generate the attention mask and position ids of end-of-document-separated sequences.

    Args:
        batch_size: Batch size.
        seq_len: Sequence length.
        eod_token_id: End-of-document token id.
        reset_position_ids: Restart positions after each eod token.

    Inputs:
        - **input_ids** (Tensor) - ``(B, S)``.

    Outputs:
        ``(position_ids (B, S), mask (B, S, S))``; in the mask 1 means masked out
        (``1 - allowed``).
    """

    def __init__(self, batch_size, seq_len, eod_token_id, reset_position_ids):
        super().__init__()
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.eod_token_id = int(eod_token_id)
        self.reset_position_ids = bool(reset_position_ids)

    def construct(self, input_ids):
        tokens = input_ids.asnumpy()
        if tokens.shape != (self.batch_size, self.seq_len):
            raise ValueError(f"EosMask expects input_ids of shape {(self.batch_size, self.seq_len)}, got "
                             f"{tokens.shape}")
        position_ids, mask = eod_masks_and_position_ids(tokens, self.eod_token_id, self.reset_position_ids)
        return Tensor(position_ids), Tensor(mask)
