"""Embeddings and the transformer language model."""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from mindspeed_ms.core import parallel_state as ps
from mindspeed_ms.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding, dropout, get_rng_tracker
from mindspeed_ms.core.tensor_parallel.layers import init_partitioned_parameter, sequence_dim
from mindspeed_ms.core.tensor_parallel.mappings import ScatterToRegion
from mindspeed_ms.core.tensor_parallel.random import MODEL_PARALLEL_RNG
from mindspeed_ms.core.precision import readable, resolve_dtype, to_compute_dtype
from mindspeed_ms.legacy.model.enums import AttnMaskType, LayerType, ModelType
from mindspeed_ms.legacy.model.module import Module
from mindspeed_ms.legacy.model.rotary_pos_embedding import RotaryEmbedding
from mindspeed_ms.legacy.model.transformer import ParallelTransformer, _init_method

__all__ = ["Embedding", "Pooler", "TransformerLanguageModel", "get_language_model"]


class Embedding(Module):
    """Word, absolute-position and token-type embeddings.

    The word embedding is vocabulary-parallel. The position embedding is replicated (or
    vocabulary-parallel with ``parallel_position_embedding``); with sequence parallelism the sum is
    scattered along the sequence afterwards.

    Args:
        hidden_size: Hidden size.
        vocab_size: Vocabulary size.
        max_sequence_length: Number of absolute positions.
        embedding_dropout_prob: Dropout after the sum.
        config: TransformerConfig.
        num_tokentypes: Token-type embeddings (0: none).

    Inputs:
        - **input_ids** (Tensor) - ``(B, S)`` int.
        - **position_ids** (Tensor) - ``(B, S)``; None means ``0..S-1``.
        - **tokentype_ids** (Tensor, optional) - ``(B, S)``.

    Outputs:
        ``(B, S, H)`` (``(S, B, H)`` with the SBH layout; the sequence split over tensor-parallel ranks
        with sequence parallelism).

    Raises:
        NotImplementedError: ``clone_scatter_output_in_embedding``.
        RuntimeError: token-type ids given without token-type embeddings, or the reverse.
    """

    def __init__(self, hidden_size, vocab_size, max_sequence_length, embedding_dropout_prob, config,
                 num_tokentypes=0, **kwargs):
        super().__init__(config=None)
        del kwargs
        if config.clone_scatter_output_in_embedding:
            raise NotImplementedError("clone_scatter_output_in_embedding is not supported for now.")
        self.config = config
        self.hidden_size = int(hidden_size)
        self.num_tokentypes = int(num_tokentypes)
        self.embedding_dropout_prob = float(embedding_dropout_prob)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, hidden_size, init_method=_init_method(config),
                                                      config=config, init_key="embedding.word_embeddings")
        self.add_position_embedding = config.position_embedding_type == "absolute"
        self.parallel_position_embedding = bool(config.parallel_position_embedding)
        dtype = resolve_dtype(config.embedding_init_dtype)
        if self.add_position_embedding:
            if self.parallel_position_embedding:
                self.position_embeddings = VocabParallelEmbedding(
                    max_sequence_length, hidden_size, init_method=_init_method(config), config=config,
                    init_key="embedding.position_embeddings")
            else:
                self.position_embeddings = _ReplicatedEmbedding(max_sequence_length, hidden_size, config, dtype,
                                                                "embedding.position_embeddings")
        self.tokentype_embeddings = None
        if self.num_tokentypes > 0:
            self.tokentype_embeddings = _ReplicatedEmbedding(self.num_tokentypes, hidden_size, config, dtype,
                                                             "embedding.tokentype_embeddings")
        self.sequence_parallel = bool(config.parallel_config.sequence_parallel) \
            and ps.get_tensor_model_parallel_world_size() > 1
        self.sequence_scatter = None
        if self.sequence_parallel:
            self.sequence_scatter = ScatterToRegion(ps.get_tensor_model_parallel_group(), sequence_dim(config))
        self.batch_first = sequence_dim(config) == 1
        self.compute_dtype = resolve_dtype(config.compute_dtype)

    def construct(self, input_ids, position_ids=None, tokentype_ids=None):
        if tokentype_ids is not None and self.tokentype_embeddings is None:
            raise RuntimeError("tokentype_ids were given but the embedding has no token-type embeddings")
        if tokentype_ids is None and self.tokentype_embeddings is not None:
            raise RuntimeError("the embedding has token-type embeddings but no tokentype_ids were given")
        if not self.batch_first:  # (B, S) ids -> (S, B, H) embeddings
            input_ids = input_ids.swapaxes(0, 1)
            position_ids = None if position_ids is None else position_ids.swapaxes(0, 1)
            tokentype_ids = None if tokentype_ids is None else tokentype_ids.swapaxes(0, 1)
        embeddings = self.word_embeddings(input_ids)
        if self.add_position_embedding:
            if position_ids is None:
                seq = input_ids.shape[1] if self.batch_first else input_ids.shape[0]
                positions = np.arange(seq, dtype=np.int32)
                position_ids = Tensor(positions.reshape(1, -1) if self.batch_first else positions.reshape(-1, 1))
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            embeddings = embeddings + self.tokentype_embeddings(tokentype_ids)
        embeddings = to_compute_dtype(embeddings, self.compute_dtype)
        if self.sequence_parallel:
            embeddings = self.sequence_scatter(embeddings)
            if self.embedding_dropout_prob > 0 and self.training:
                with get_rng_tracker().fork(MODEL_PARALLEL_RNG):
                    embeddings = dropout(embeddings, self.embedding_dropout_prob)
        elif self.embedding_dropout_prob > 0 and self.training:
            embeddings = dropout(embeddings, self.embedding_dropout_prob)
        return embeddings


class _ReplicatedEmbedding(nn.Cell):
    """An embedding table held whole by every rank."""

    def __init__(self, num, hidden, config, dtype, key):
        super().__init__()
        self.weight = init_partitioned_parameter((num, hidden), None, _init_method(config), config=config,
                                                 dtype=dtype, name="weight", key=key + ".weight")

    def construct(self, ids):
        return ops.gather(readable(self.weight), ids.astype(ms.int32), 0)


class Pooler(nn.Cell):
    """``tanh(W h_i + b)`` of the token at ``sequence_index`` (BERT-style pooling)."""

    def __init__(self, hidden_size, config):
        super().__init__()
        self.dense = nn.Dense(hidden_size, hidden_size)
        self.batch_first = sequence_dim(config) == 1

    def construct(self, hidden_states, sequence_index=0):
        pooled = hidden_states[:, sequence_index] if self.batch_first else hidden_states[sequence_index]
        return ops.tanh(self.dense(pooled))


class TransformerLanguageModel(Module):
    """Embedding, transformer encoder and (untied) output layer for this pipeline stage.

    Args:
        config: TransformerConfig.
        encoder_attn_mask_type: ``AttnMaskType`` of the encoder (None: padding).
        num_tokentypes: Token-type embeddings.
        add_encoder: Build the encoder.
        add_decoder: Not supported (a decoder stack).
        decoder_attn_mask_type: Decoder mask type.
        add_pooler: Build a pooler.
        pre_process: First pipeline stage (embedding).
        post_process: Last pipeline stage (final norm, output layer).
        visual_encoder: Not supported.

    Inputs:
        ``enc_input_ids (B, S)``, ``enc_position_ids (B, S)`` or None, ``enc_attn_mask``; the other
        documented inputs must be None (not supported).

    Outputs:
        Encoder output ``(B, S, H)`` (``(S, B, H)`` with SBH).

    Raises:
        ValueError: untied embeddings together with a decoder.
        RuntimeError: ``set_input_tensor`` with a list of length other than 1.
        NotImplementedError: retro, visual encoder, decoder, unsupported inputs, output_enc_hidden.
    """

    def __init__(self, config, encoder_attn_mask_type, num_tokentypes=0, add_encoder=True, add_decoder=False,
                 decoder_attn_mask_type=AttnMaskType.causal, add_pooler=False, pre_process=True, post_process=True,
                 visual_encoder=None, **kwargs):
        super().__init__(config=None, share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights)
        del kwargs
        if config.untie_embeddings_and_output_weights and add_decoder:
            raise ValueError("untie_embeddings_and_output_weights is not supported together with add_decoder")
        if config.retro_add_retriever:
            raise NotImplementedError("retro_add_retriever is not supported for now.")
        if visual_encoder is not None or add_decoder:
            raise NotImplementedError("visual_encoder and add_decoder are not supported for now.")
        self.config = config
        self.pre_process = pre_process
        self.post_process = post_process
        self.add_encoder = add_encoder
        self.add_pooler = add_pooler
        self.encoder_attn_mask_type = encoder_attn_mask_type if encoder_attn_mask_type is not None \
            else AttnMaskType.padding
        self.untie = bool(config.untie_embeddings_and_output_weights)
        max_positions = int(config.max_position_embeddings)
        if pre_process:
            self.embedding = Embedding(config.hidden_size, config.vocab_size, max_positions,
                                       float(config.hidden_dropout), config, num_tokentypes)
        self.use_rotary = config.position_embedding_type == "rope"
        if self.use_rotary:
            # rotary_config (the seed's one-mapping form) is stored in the rotary_* fields
            self.rotary_pos_emb = RotaryEmbedding(
                int(config.kv_channels), rotary_percent=float(config.rotary_percent),
                seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
                rotary_base=config.rotary_base)
        if add_encoder:
            self.encoder = ParallelTransformer(config, ModelType.encoder_or_decoder, LayerType.encoder,
                                               self.encoder_attn_mask_type, pre_process=pre_process,
                                               post_process=post_process)
        if post_process and add_pooler:
            self.pooler = Pooler(config.hidden_size, config)
        if post_process and self.untie:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.vocab_size, config=config, init_method=_init_method(config), bias=False,
                gather_output=False, skip_bias_add=True, init_key="output_layer")
        self.input_tensor = None
        self.seq_dim = sequence_dim(config)
        # parallel sizes fixed here, not looked up in construct (which then compiles under ms.jit)
        tp = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel_factor = tp if tp > 1 and bool(config.parallel_config.sequence_parallel) else 1
        self.cp_size = ps.get_context_parallel_world_size()

    def set_input_tensor(self, input_tensor):
        """Hidden states from the previous pipeline stage (a tensor or a one-element list)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise RuntimeError(f"input_tensor should be a single tensor for the encoder, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor
        if self.add_encoder:
            self.encoder.set_input_tensor(input_tensor)

    def construct(self, enc_input_ids, enc_position_ids, enc_attn_mask, dec_input_ids=None, dec_position_ids=None,
                  dec_attn_mask=None, retriever_input_ids=None, retriever_position_ids=None, retriever_attn_mask=None,
                  enc_dec_attn_mask=None, tokentype_ids=None, inference_params=None, pooling_sequence_index=0,
                  enc_hidden_states=None, output_enc_hidden=False, input_image=None, delimiter_position=None,
                  image_embedding=None):
        for name, value in (("dec_input_ids", dec_input_ids), ("dec_position_ids", dec_position_ids),
                            ("dec_attn_mask", dec_attn_mask), ("retriever_input_ids", retriever_input_ids),
                            ("retriever_position_ids", retriever_position_ids),
                            ("retriever_attn_mask", retriever_attn_mask), ("enc_dec_attn_mask", enc_dec_attn_mask),
                            ("input_image", input_image), ("delimiter_position", delimiter_position),
                            ("image_embedding", image_embedding), ("inference_params", inference_params)):
            if value is not None:
                raise NotImplementedError(f"{name} is not supported for now.")
        if output_enc_hidden:
            raise NotImplementedError("output_enc_hidden is not supported for now.")
        if self.pre_process:
            hidden_states = self.embedding(enc_input_ids, enc_position_ids, tokentype_ids=tokentype_ids)
        else:
            hidden_states = enc_hidden_states if enc_hidden_states is not None else self.input_tensor
        rotary = None
        if self.use_rotary:
            rotary = self._rotary_angles(enc_input_ids, hidden_states, enc_position_ids)
        if not self.add_encoder:
            return hidden_states
        output = self.encoder(hidden_states, enc_attn_mask, rotary_pos_emb=rotary)
        if self.post_process and self.add_pooler:
            return output, self.pooler(output, pooling_sequence_index)
        return output

    def _rotary_angles(self, input_ids, hidden_states, position_ids):
        """RoPE angles for the full sequence, or the two position chunks under context parallelism."""
        if input_ids is not None:
            seq = input_ids.shape[1]
        else:
            seq = hidden_states.shape[self.seq_dim] * self.sequence_parallel_factor
        if self.cp_size > 1:
            return self._context_parallel_rotary_angles(seq)
        return self.rotary_pos_emb(seq)

    def _context_parallel_rotary_angles(self, seq):
        from mindspeed_ms.core.context_parallel import local_positions  # pylint: disable=import-outside-toplevel

        full = self.rotary_pos_emb(seq * self.cp_size)
        return ops.gather(full, Tensor(local_positions(seq * self.cp_size)), 0)


def get_language_model(config, num_tokentypes, add_pooler, encoder_attn_mask_type, add_encoder=True,
                       add_decoder=False, decoder_attn_mask_type=None, pre_process=True, post_process=True):
    """Build the language model.

    Returns:
        ``(language_model, language_model_key)`` with the key ``'language_model'``.
    """
    language_model = TransformerLanguageModel(
        config, encoder_attn_mask_type, num_tokentypes=num_tokentypes, add_encoder=add_encoder,
        add_decoder=add_decoder, decoder_attn_mask_type=decoder_attn_mask_type or AttnMaskType.causal,
        add_pooler=add_pooler, pre_process=pre_process, post_process=post_process)
    return language_model, "language_model"
