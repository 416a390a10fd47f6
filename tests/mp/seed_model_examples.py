"""The API reference's examples for the parallel layers and the GPT model family, as written.

Usage: seed_model_examples.py (2 workers). Each case is the reference's example with two
adaptations: ``device_target`` is "CPU" instead of "Ascend", and ``init()`` is not called again
(the worker set-up already ran it; msrun launched the job, as the reference recommends). Examples
that initialise TP=2 run with TP=2 here. Each case returns what the example prints.
"""

import os

import numpy as np
import mindspore as ms
import mindspore.common.dtype as mstype
import mindspore.nn as nn
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from _worker import run_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE)


def fresh(**kwargs):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(**kwargs)


def example_column_parallel_linear():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.core.tensor_parallel import ColumnParallelLinear

    class TestNet(nn.Cell):
        def __init__(self, config):
            super(TestNet, self).__init__()
            hidden_size = config.hidden_size
            self.columnlinear = ColumnParallelLinear(input_size=hidden_size, output_size=hidden_size, config=config,
                                                     init_method=config.init_method, bias=config.mlp_has_bias,
                                                     gather_output=False, skip_bias_add=False,
                                                     bias_init=config.bias_init)

        def construct(self, input_):
            output, _ = self.columnlinear(input_)
            return output

    dataset_size, seq_length, hidden_size, tensor_parallel = 1, 2, 4, 1
    ms.set_seed(2024)
    fresh(tensor_model_parallel_size=tensor_parallel)
    input_data = Tensor(np.random.random((dataset_size, seq_length, hidden_size)).astype(np.float32))
    parallel_config = ModelParallelConfig()
    train_config = TrainingConfig(parallel_config=parallel_config)
    model_config = TransformerConfig(vocab_size=40000, num_layers=1, num_attention_heads=1, hidden_size=hidden_size,
                                     ffn_hidden_size=4 * hidden_size, parallel_config=parallel_config,
                                     training_config=train_config, mlp_has_bias=True, gated_linear_unit=False,
                                     hidden_act='gelu', params_dtype='float32', compute_dtype='float32')
    network = TestNet(config=model_config)
    output = network(input_data)
    return list(output.shape)


def example_row_parallel_linear():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.core.tensor_parallel import RowParallelLinear

    class TestNet(nn.Cell):
        def __init__(self, config):
            super(TestNet, self).__init__()
            hidden_size = config.hidden_size
            self.rowlinear = RowParallelLinear(input_size=hidden_size, output_size=hidden_size, config=config,
                                               init_method=config.init_method, bias=config.mlp_has_bias,
                                               input_is_parallel=True, skip_bias_add=False,
                                               bias_init=config.bias_init)

        def construct(self, input_):
            output, _ = self.rowlinear(input_)
            return output

    seq_length, dataset_size, hidden_size, tensor_parallel = 2, 1, 4, 1
    ms.set_seed(2024)
    fresh(tensor_model_parallel_size=tensor_parallel)
    input_data = Tensor(np.random.random((seq_length, dataset_size, hidden_size)).astype(np.float32))
    parallel_config = ModelParallelConfig()
    training_config = TrainingConfig(parallel_config=parallel_config)
    model_config = TransformerConfig(vocab_size=40000, num_layers=1, num_attention_heads=1, hidden_size=hidden_size,
                                     ffn_hidden_size=4 * hidden_size, parallel_config=parallel_config,
                                     training_config=training_config, mlp_has_bias=True, gated_linear_unit=False,
                                     hidden_act='gelu', params_dtype='float32', compute_dtype='float32')
    network = TestNet(config=model_config)
    return list(network(input_data).shape)


def example_vocab_parallel_cross_entropy():
    from mindspore import dtype as mstype_
    from mindspeed_ms.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    fresh()
    loss = VocabParallelCrossEntropy()
    logits = Tensor([[2., 1., 0.2], [2., 1., 0.2]], mstype_.float32)
    labels = Tensor([1, 1], mstype_.int32)
    output = loss(logits, labels)
    return [list(output.shape), str(output)]


def example_eos_mask():
    from mindspeed_ms.legacy.model.eos_mask import EosMask

    ms.set_seed(2024)
    fresh()
    b, s, eod_token_id = 2, 4, 4
    loss = EosMask(b, s, eod_token_id, reset_position_ids=False)
    input_ids = ms.Tensor(np.random.random((b, s)).astype(np.float32))
    output, mask = loss(input_ids)
    return [list(output.shape), list(mask.shape)]


def example_gpt_model():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, DatasetConfig, TransformerConfig
    from mindspeed_ms.legacy.model.gpt_model import GPTModel

    fresh()
    os.environ['HCCL_BUFFSIZE'] = "200"
    batch_size, seq_length = 8, 32
    parallel_config = ModelParallelConfig()
    data_config = DatasetConfig(batch_size=batch_size)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=128, seq_length=seq_length, num_layers=4, num_attention_heads=4,
                               num_query_groups=32, hidden_size=64, ffn_hidden_size=256,
                               parallel_config=parallel_config, training_config=training_config,
                               dataset_config=data_config)
    gpt_model = GPTModel(config)
    input_data = Tensor(np.random.random((batch_size, seq_length)).astype(np.int32))
    attention_mask = Tensor(np.zeros((batch_size, 1, seq_length, seq_length)).astype(np.int32))
    loss_mask = Tensor(np.random.random((batch_size, seq_length)).astype(np.int32))
    lm_output = gpt_model(tokens=input_data, position_ids=None, attention_mask=attention_mask, loss_mask=loss_mask)
    return list(lm_output.shape)


def example_embedding():
    from mindspeed_ms.core.config import TransformerConfig, ModelParallelConfig
    from mindspeed_ms.legacy.model.language_model import Embedding

    fresh()
    parallel_config = ModelParallelConfig()
    config = TransformerConfig(vocab_size=128, num_layers=1, num_attention_heads=8, num_query_groups=4,
                               hidden_size=256, ffn_hidden_size=128, parallel_config=parallel_config,
                               training_config=None)
    embedding = Embedding(hidden_size=config.hidden_size, vocab_size=128, max_sequence_length=64,
                          embedding_dropout_prob=0.0, config=config)
    shape = (2, 64)
    input_ids = ms.Tensor(np.random.randint(0, 100, size=shape), dtype=ms.int32)
    position_array = np.expand_dims(np.arange(64), axis=0)
    position_array = position_array.repeat(repeats=2, axis=0)
    position_ids = ms.Tensor(position_array, dtype=ms.int32)
    out = embedding(input_ids, position_ids)
    return list(out.shape)


def example_get_language_model():
    from mindspeed_ms.core.config import (init_configs_from_yaml, TrainingConfig, ModelParallelConfig,
                                          TransformerConfig, DatasetConfig)
    from mindspeed_ms.legacy.model.language_model import get_language_model

    os.environ['HCCL_BUFFSIZE'] = "1"
    config_path = os.path.join(REPO, "examples", "configs", "test_language_model.yaml")
    training_config, parallel_config, dataset_config, model_config = init_configs_from_yaml(
        config_path, [TrainingConfig, ModelParallelConfig, DatasetConfig, TransformerConfig])
    fresh()
    batch_size = dataset_config.batch_size
    sq = model_config.seq_length
    language_model, _ = get_language_model(model_config, num_tokentypes=0, add_pooler=False,
                                           encoder_attn_mask_type=None)
    input_data = Tensor(np.random.random((batch_size, sq)).astype(np.int32))
    attention_mask = Tensor(np.zeros((batch_size, 1, sq, sq)).astype(np.int32))
    hidden_states = language_model(input_data, None, attention_mask)
    del training_config, parallel_config
    return list(hidden_states.shape)


def example_module():
    from mindspeed_ms.legacy.model.module import Module

    class CellExample(Module):
        def __init__(self, layers):
            super(CellExample, self).__init__()
            self.layers = layers

        def construct(self, hidden_states, *args, **kwargs):
            for layer in self.layers:
                hidden_states = layer(hidden_states, *args, **kwargs)
            return hidden_states

    cell = CellExample(nn.CellList([nn.Dense(4, 4), nn.Dense(4, 2)]))
    return list(cell(Tensor(np.ones((3, 4), np.float32))).shape)


def example_parallel_attention():
    from mindspeed_ms.legacy.model import ParallelAttention
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig

    class MyNet(nn.Cell):
        def __init__(self, config):
            super(MyNet, self).__init__()
            self.attention = ParallelAttention(layer_number=1, config=config)

        def construct(self, x, attention_mask):
            output, _ = self.attention(x, attention_mask)
            return output

    fresh(tensor_model_parallel_size=2)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=1, num_layers=1, num_attention_heads=8, num_query_groups=4, hidden_size=256,
                               ffn_hidden_size=256, parallel_config=parallel_config, training_config=training_config)
    input_shape = (32, 1024, 256)
    input_ = Tensor(np.random.standard_normal(input_shape).astype(np.float32))
    mask = np.ones((32, 1024, 1024), dtype=np.uint8)
    mask = Tensor(np.expand_dims(mask, axis=1))
    out = MyNet(config=config)(input_, mask)
    return list(out.shape)


def example_parallel_lm_logits():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.legacy.model import ParallelLMLogits

    fresh(tensor_model_parallel_size=2)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(seq_length=16, vocab_size=1, num_layers=1, num_attention_heads=8, num_query_groups=4,
                               hidden_size=256, ffn_hidden_size=256, parallel_config=parallel_config,
                               training_config=training_config)
    model = ParallelLMLogits(config=config, bias=False, compute_dtype=ms.float32)
    input_ = Tensor(np.random.random((2, 3, 6)).astype(np.float32))
    word_emb = Tensor(np.random.random((6, 6)).astype(np.float32))
    logits = model(input_, word_emb, parallel_output=True)
    return list(logits.shape)


def example_parallel_mlp():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.legacy.model.transformer import ParallelMLP

    ms.set_seed(2024)
    fresh()
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=1)
    training_config = TrainingConfig(parallel_config=parallel_config)
    seq_length, dataset_size, hidden_size = 4, 1, 8
    model_config = TransformerConfig(vocab_size=4000, num_layers=1, num_attention_heads=4, hidden_size=hidden_size,
                                     ffn_hidden_size=hidden_size * 4, parallel_config=parallel_config,
                                     training_config=training_config)
    mlp = ParallelMLP(config=model_config)
    input_data = Tensor(np.random.random((seq_length, dataset_size, hidden_size)).astype(np.float32))
    output, _ = mlp(input_data)
    return list(output.shape)


def _transformer_config_tp2():
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig

    fresh(tensor_model_parallel_size=2)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2)
    training_config = TrainingConfig(parallel_config=parallel_config)
    return TransformerConfig(seq_length=16, vocab_size=1, num_layers=1, num_attention_heads=8, num_query_groups=4,
                             hidden_size=256, ffn_hidden_size=256, parallel_config=parallel_config,
                             training_config=training_config)


def example_parallel_transformer():
    from mindspeed_ms.legacy.model import ParallelTransformer

    class MyNet(nn.Cell):
        def __init__(self, config):
            super(MyNet, self).__init__()
            self.transformer = ParallelTransformer(config=config, model_type=None)

        def construct(self, x, attention_mask):
            return self.transformer(x, attention_mask)

    config = _transformer_config_tp2()
    input_ = Tensor(np.random.standard_normal((32, 1024, 256)).astype(np.float32))
    mask = Tensor(np.triu(np.ones((1024, 1024)), 1), mstype.uint8)
    out = MyNet(config=config)(input_, mask).shape
    return list(out)


def example_parallel_transformer_layer():
    from mindspeed_ms.legacy.model import ParallelTransformerLayer

    class MyNet(nn.Cell):
        def __init__(self, config):
            super(MyNet, self).__init__()
            self.layer = ParallelTransformerLayer(layer_number=1, config=config)

        def construct(self, x, attention_mask):
            return self.layer(x, attention_mask)

    config = _transformer_config_tp2()
    input_ = Tensor(np.random.standard_normal((32, 1024, 256)).astype(np.float32))
    mask = Tensor(np.triu(np.ones((1024, 1024)), 1), mstype.uint8)
    out = MyNet(config=config)(input_, mask).shape
    return list(out)


def example_rotary_embedding():
    from mindspeed_ms.legacy.model.rotary_pos_embedding import RotaryEmbedding
    from mindspeed_ms.core.config import ModelParallelConfig, TrainingConfig, TransformerConfig

    class MyNet(nn.Cell):
        def __init__(self, config):
            super(MyNet, self).__init__()
            self.rotary_embedding = RotaryEmbedding(config.seq_length)

        def construct(self, x):
            return self.rotary_embedding(x.shape[1])

    fresh(tensor_model_parallel_size=1, context_parallel_size=1)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=1)
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(seq_length=16, vocab_size=1, num_layers=1, num_attention_heads=16, hidden_size=256,
                               ffn_hidden_size=256, parallel_config=parallel_config, training_config=training_config)
    net = MyNet(config)
    output = net(Tensor(np.random.standard_normal((2, 16, 256)).astype(np.float32)))
    return list(output.shape)


def example_core_attention():
    from mindspeed_ms.legacy.model.transformer import CoreAttention
    from mindspeed_ms.core.config import ModelParallelConfig, TransformerConfig

    class MyNet(nn.Cell):
        def __init__(self, config):
            super(MyNet, self).__init__()
            self.core_attn = CoreAttention(layer_number=1, config=config)

        def construct(self, x, mask):
            return self.core_attn(x, x, x, mask)

    fresh(tensor_model_parallel_size=2)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=2)
    config = TransformerConfig(vocab_size=1, num_layers=1, num_attention_heads=8, num_query_groups=4, hidden_size=256,
                               ffn_hidden_size=256, parallel_config=parallel_config, training_config=None)
    input_ = Tensor(np.random.standard_normal((1024, 1, 4, 32)).astype(np.float32))
    mask = Tensor(np.expand_dims(np.ones((1, 1024, 1024), dtype=np.uint8), axis=1))
    out = MyNet(config=config)(input_, mask)
    return list(out.shape)


def example_transformer_language_model():
    from mindspeed_ms.legacy.model import TransformerLanguageModel
    from mindspeed_ms.core.config import (init_configs_from_yaml, TrainingConfig, ModelParallelConfig,
                                          TransformerConfig, DatasetConfig)

    os.environ['HCCL_BUFFSIZE'] = "1"
    config_path = os.path.join(REPO, "examples", "configs", "test_language_model.yaml")
    training_config, parallel_config, dataset_config, model_config = init_configs_from_yaml(
        config_path, [TrainingConfig, ModelParallelConfig, DatasetConfig, TransformerConfig])
    fresh()
    batch_size = dataset_config.batch_size
    sq = model_config.seq_length
    language_model = TransformerLanguageModel(model_config, encoder_attn_mask_type=None)
    input_data = Tensor(np.random.random((batch_size, sq)).astype(np.int32))
    attention_mask = Tensor(np.zeros((batch_size, 1, sq, sq)).astype(np.int32))
    hidden_states = language_model(input_data, None, attention_mask)
    del training_config, parallel_config
    return list(hidden_states.shape)


def example_loss_with_mask():
    from mindspore import dtype as mstype_
    from mindspeed_ms.training.loss_func import LossWithMask

    ms.set_seed(2024)
    fresh()
    loss = LossWithMask(nn.CrossEntropyLoss())
    logits = Tensor(np.array([[3, 5, 6, 9, 12, 33, 42, 12, 32, 72]]), mstype_.float32)
    labels = Tensor(np.array([1]).astype(np.int32))
    input_mask = Tensor(np.ones(1).astype(np.float32))
    output = loss(logits, labels, input_mask)
    return str(output)


EXAMPLES = {name[len("example_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("example_")}

if __name__ == "__main__":
    run_cases(EXAMPLES)
