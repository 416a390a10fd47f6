"""Models built on the core parallel layers (the reference's "legacy" Megatron model family)."""
