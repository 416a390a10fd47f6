"""Datasets and sampling: character-level text, memory-mapped tokens (Megatron-style GPT
dataset), synthetic tokens, the data-parallel batch sampler and the model-input helpers.

Every dataset returns ``np.int32`` samples of ``seq_length + 1`` tokens; a training step takes
its indices from :class:`DataParallelBatchSampler`, stacks them (:func:`collate`) and splits them
into model inputs (:func:`build_model_inputs`). Pure numpy: no MindSpore import.
"""

from mindspeed_ms.core.datasets.batch import build_model_inputs, collate, get_ltor_masks_and_position_ids
from mindspeed_ms.core.datasets.char_dataset import CharDataset, CharTokenizer, load_text, tinyshakespeare_path
from mindspeed_ms.core.datasets.gpt_dataset import GPTDataset, parse_split, split_documents
from mindspeed_ms.core.datasets.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, best_token_dtype,
                                                        write_indexed_dataset)
from mindspeed_ms.core.datasets.sampler import DataParallelBatchSampler
from mindspeed_ms.core.datasets.synthetic import SyntheticDataset

__all__ = [
    "CharDataset", "CharTokenizer", "load_text", "tinyshakespeare_path",
    "IndexedDataset", "IndexedDatasetBuilder", "write_indexed_dataset", "best_token_dtype",
    "GPTDataset", "split_documents", "parse_split",
    "SyntheticDataset",
    "DataParallelBatchSampler",
    "build_model_inputs", "collate", "get_ltor_masks_and_position_ids",
]
