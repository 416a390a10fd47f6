"""Base cell of the model family, with pipeline-stage flags and the tied word embedding.

With pipeline parallelism and tied input/output embeddings, the first stage holds the word
embedding and the last stage needs the same matrix for the logits. The last stage therefore keeps
its own copy (``self.word_embeddings``), created zero-filled and then summed with the first stage's
weights over the embedding group, so both start equal; their gradients are all-reduced over that
group every step (see ``mindspeed_ms.core.distributed``), so they stay equal.
"""

from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

from mindspeed_ms.core import communication as comm
from mindspeed_ms.core import parallel_state as ps

__all__ = ["Module"]


class Module(nn.Cell):
    """A cell that knows its pipeline stage and can share the embedding with the output layer.

    Args:
        config: Model config. If given, ``pre_process``/``post_process`` follow the pipeline stage.
        share_embeddings_and_output_weights: Whether the word embedding is the output weight.

    Raises:
        RuntimeError: more than one weight of a stage is marked shared; a single weight is marked
            shared across a pipeline where sharing needs one on the first and one on the last
            stage; :meth:`shared_embedding_or_output_weight` or :meth:`initialize_word_embeddings`
            called without sharing.
        ValueError: the last stage's copy of the embedding is not zero before synchronisation.
    """

    def __init__(self, config=None, share_embeddings_and_output_weights=True, **kwargs):
        super().__init__()
        del kwargs
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        if config is not None:
            self.config = config
            self.pre_process = ps.is_pipeline_first_stage()
            self.post_process = ps.is_pipeline_last_stage()
        else:
            self.pre_process = True
            self.post_process = True

    def shared_embedding_or_output_weight(self):
        """The word-embedding matrix used as the output weight on this stage."""
        if not self.share_embeddings_and_output_weights:
            raise RuntimeError("shared_embedding_or_output_weight() needs share_embeddings_and_output_weights=True")
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        if not hasattr(self, "word_embeddings"):
            raise RuntimeError("the output stage has no word embedding copy: call initialize_word_embeddings() first")
        return self.word_embeddings.weight

    def initialize_word_embeddings(self):
        """Create the last stage's copy of the word embedding and synchronise it with the first stage."""
        if not self.share_embeddings_and_output_weights:
            raise RuntimeError("initialize_word_embeddings() needs share_embeddings_and_output_weights=True")
        if ps.get_pipeline_model_parallel_world_size() == 1:
            self.shared_embedding_or_output_weight().shared_embedding = True
            return
        if self.pre_process and self.post_process:
            # interleaving can put first and last chunks on one rank: nothing to synchronise
            self.shared_embedding_or_output_weight().shared_embedding = True
            return
        if self.post_process and not self.pre_process:
            from mindspeed_ms.core.tensor_parallel import VocabParallelEmbedding  # pylint: disable=import-outside-toplevel

            config = self.config
            self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, init_method="zeros",
                                                          config=config, init_key="shared_word_embeddings_copy")
            weight = self.word_embeddings.weight
            if float(np.abs(weight.asnumpy()).sum()) != 0.0:
                raise ValueError("the output stage's word embedding copy must be zero before synchronisation")
        if self.pre_process or self.post_process:
            weight = self.shared_embedding_or_output_weight()
            weight.shared_embedding = True
            self._check_shared_weights()
            group = ps.get_embedding_group()
            if group.size > 1:
                # a fresh copy: the collective's result can be a view of its buffer, and in-place
                # optimizer kernels (AdamWeightDecay) silently leave a parameter holding a view unchanged
                synced = comm.all_reduce(weight.value(), group)
                weight.set_data(Tensor(synced.asnumpy()).astype(weight.dtype))

    def _check_shared_weights(self):
        shared = [p for p in self.get_parameters() if getattr(p, "shared_embedding", False)]
        if len(shared) > 1:
            raise RuntimeError(f"more than one weight of this pipeline stage is marked shared: "
                               f"{[p.name for p in shared]}")
        if len(shared) == 1 and ps.get_embedding_group().size < 2:
            raise RuntimeError("a weight is marked shared, but sharing needs a weight on the first and one on the "
                               "last pipeline stage")
