"""mindspeed_ms: a Megatron-style parallel LLM training framework on MindSpore.

A re-implementation of the MindSpeed-Core-MS r0.1.0 public API (configs, parallel_state,
tensor/sequence/pipeline/context/expert/data parallelism, the GPT model family, MoE and the
training loop) that runs on Ascend through HCCL and on CPU through MindSpore's collectives.
"""

__version__ = "0.1.0"
