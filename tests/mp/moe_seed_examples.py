"""The API reference's examples for the MoE classes (sections 1.1.20-1.1.23), as written.

Usage: moe_seed_examples.py (2 workers; msrun launched the job, as the reference recommends).
Adaptations: ``device_target`` is "CPU" instead of "Ascend", ``init()`` is not called again (the
worker set-up ran it), and ``initialize_model_parallel`` is preceded by
``destroy_model_parallel`` because the examples run one after another in one process. Each case
returns the lines the example prints.
"""

import contextlib
import io

import mindspeed_ms.core.parallel_state as ps
from _worker import run_cases


def printed(example):
    """Run ``example`` and return what it printed, one string per line."""
    def run():
        ps.destroy_model_parallel()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            example()
        return buffer.getvalue().splitlines()
    return run


def example_sequential_mlp():
    import numpy as np
    import mindspore as ms
    from mindspeed_ms.core.config import TransformerConfig, ModelParallelConfig, TrainingConfig
    from mindspeed_ms.legacy.model.moe.experts import SequentialMLP
    from mindspeed_ms.core.parallel_state import initialize_model_parallel
    ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE, deterministic='ON')
    initialize_model_parallel()
    parallel_config = ModelParallelConfig()
    training_config = TrainingConfig(parallel_config=parallel_config)
    config = TransformerConfig(vocab_size=128,
                               num_layers=1,
                               num_attention_heads=8,
                               num_query_groups=4,
                               hidden_size=64,
                               ffn_hidden_size=128,
                               parallel_config=parallel_config,
                               training_config=training_config)
    expert = SequentialMLP(num_local_experts=2, config=config)
    shape = (32, 64)
    tokens_per_expert = [20, 12]
    permuted_local_hidden_states = ms.Tensor(np.random.standard_normal(shape).astype(np.float32))
    output_local, output_bias_local = expert(permuted_local_hidden_states, tokens_per_expert)
    print(output_local.shape)


def example_moe_layer():
    import numpy as np
    import mindspore as ms
    from mindspeed_ms.core.config import TransformerConfig, ModelParallelConfig, TrainingConfig, MoEConfig
    from mindspeed_ms.core.parallel_state import initialize_model_parallel
    from mindspeed_ms.legacy.model.moe.moe_layer import MoELayer
    ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE, deterministic='ON')
    initialize_model_parallel()
    parallel_config = ModelParallelConfig()
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_config = MoEConfig(num_experts=4,
                           moe_router_topk=2)
    config = TransformerConfig(vocab_size=128,
                               num_layers=1,
                               num_attention_heads=1,
                               num_query_groups=1,
                               hidden_size=64,
                               ffn_hidden_size=128,
                               parallel_config=parallel_config,
                               training_config=training_config,
                               moe_config=moe_config)
    mlp = MoELayer(config)
    shape = (8, 2, 64)
    hidden_states = ms.Tensor(np.random.standard_normal(shape).astype(np.float32))
    output, mlp_bias = mlp(hidden_states)
    print(output.shape)


def example_topk_router():
    import numpy as np
    from mindspeed_ms.core.config import ModelParallelConfig, MoEConfig, TrainingConfig, TransformerConfig
    from mindspeed_ms.legacy.model.moe.router import TopKRouter
    from mindspeed_ms.core.parallel_state import initialize_model_parallel
    import mindspore as ms
    import mindspore.common.dtype as mstype
    ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE, deterministic='ON')
    initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1)
    parallel_config = ModelParallelConfig(tensor_model_parallel_size=1)
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_cfg = MoEConfig(num_experts=4, moe_router_topk=2)
    model_cfg = TransformerConfig(
        vocab_size=1,
        num_layers=1,
        num_attention_heads=1,
        seq_length=8,
        hidden_size=16,
        ffn_hidden_size=64,
        gated_linear_unit=True,
        param_init_type=mstype.float32,
        parallel_config=parallel_config,
        moe_config=moe_cfg,
        training_config=training_config,
    )
    router = TopKRouter(model_cfg)
    data = ms.Tensor(np.random.random((32, 16)).astype(np.float32))
    scores, indices = router(data)
    print(scores.shape)


def example_token_dispatcher():
    import numpy as np
    import mindspore as ms
    from mindspeed_ms.core.config import TransformerConfig, ModelParallelConfig, TrainingConfig, MoEConfig
    from mindspeed_ms.core.parallel_state import initialize_model_parallel
    from mindspeed_ms.legacy.model.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    num_local_experts = 4
    ms.set_seed(1024)
    ms.set_context(device_target="CPU", mode=ms.PYNATIVE_MODE, deterministic='ON')
    initialize_model_parallel()
    parallel_config = ModelParallelConfig()
    training_config = TrainingConfig(parallel_config=parallel_config)
    moe_config = MoEConfig(num_experts=num_local_experts,
                           moe_router_topk=2)
    config = TransformerConfig(vocab_size=128,
                               num_layers=1,
                               num_attention_heads=1,
                               num_query_groups=1,
                               hidden_size=64,
                               ffn_hidden_size=128,
                               parallel_config=parallel_config,
                               training_config=training_config,
                               moe_config=moe_config)
    dispatcher = MoEAlltoAllTokenDispatcher(num_local_experts=num_local_experts,
                                            local_expert_indices=range(num_local_experts),
                                            config=config)
    hidden_states = ms.Tensor(np.random.standard_normal((8, 2, 64)).astype(np.float32))
    hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
    scores_first_column = np.random.rand(16, 1)
    complementary_scores = 1 - scores_first_column
    scores = ms.Tensor(np.hstack((scores_first_column, complementary_scores)))
    indices_array = np.array([np.random.choice(num_local_experts, size=2, replace=False) for _ in range(16)])
    indices = ms.Tensor(indices_array, dtype=ms.int32)
    dispatched_input, tokens_per_expert = dispatcher.token_permutation(hidden_states, scores, indices)
    print(dispatched_input.shape)
    print(tokens_per_expert)
    expert_output = ms.Tensor(np.random.standard_normal((32, 64)).astype(np.float32))
    output, _ = dispatcher.token_unpermutation(expert_output, bias=None)
    print(output.shape)


EXAMPLES = {name[len("example_"):]: printed(fn) for name, fn in sorted(globals().items())
            if name.startswith("example_")}

if __name__ == "__main__":
    run_cases(EXAMPLES)
