"""Named random-number streams for dropout under model parallelism (Megatron's RNG tracker).

Dropout must draw the *same* mask where activations are replicated (hidden dropout on the full
hidden state, identical on every tensor-parallel rank) and *different* masks where they are
sharded (attention-probability dropout on this rank's heads, expert computations). Megatron keeps
one RNG stream per purpose and forks into the right one; so does :class:`RNGStatesTracker`:

* ``default`` stream: seeded with ``seed + 100 * pp_rank``; the same on all tensor-parallel ranks.
* ``model-parallel-rng``: ``seed + 2718 + tp_rank``; differs across tensor-parallel ranks.
* ``expert-parallel-rng``: ``seed + 2718 + 100 * ep_rank + tp_rank``.

Streams are numpy ``Generator`` objects (PCG64): MindSpore's seeded generator kernels do not run on
CPU, and numpy states are plain data, so checkpoints can save and restore them exactly. On a
device the masks are generated on the host and copied; with ``dropout == 0`` nothing is drawn.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import numpy as np
from mindspore import Tensor, ops

__all__ = [
    "RNGStatesTracker",
    "get_rng_tracker",
    "get_cuda_rng_tracker",
    "model_parallel_seed",
    "model_parallel_cuda_manual_seed",
    "dropout",
    "DEFAULT_RNG",
    "MODEL_PARALLEL_RNG",
    "EXPERT_PARALLEL_RNG",
]

DEFAULT_RNG = "default"
MODEL_PARALLEL_RNG = "model-parallel-rng"
EXPERT_PARALLEL_RNG = "expert-parallel-rng"


class RNGStatesTracker:
    """Named random streams and a ``fork`` context that switches the current one."""

    def __init__(self):
        self._streams: Dict[str, np.random.Generator] = {}
        self._seeds: Dict[str, int] = {}
        self._current = DEFAULT_RNG
        self.add(DEFAULT_RNG, 1234)

    def reset(self) -> None:
        """Forget every stream except a freshly seeded default one."""
        self._streams.clear()
        self._seeds.clear()
        self._current = DEFAULT_RNG
        self.add(DEFAULT_RNG, 1234)

    def add(self, name: str, seed: int) -> None:
        """Create (or re-seed) the stream ``name``."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"RNG stream {name!r}: seed must be a non-negative integer, got {seed!r}")
        self._streams[name] = np.random.Generator(np.random.PCG64(int(seed)))
        self._seeds[name] = int(seed)

    @property
    def current(self) -> str:
        """Name of the stream dropout draws from right now."""
        return self._current

    def names(self):
        """Names of the existing streams."""
        return list(self._streams)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Draw from stream ``name`` inside the ``with`` block.

        The model- and expert-parallel streams are created on first use (from the default seed
        and this rank's position, as :func:`model_parallel_seed` would) when nothing seeded them,
        so models work without an explicit seeding call.
        """
        if name not in self._streams and name in (MODEL_PARALLEL_RNG, EXPERT_PARALLEL_RNG):
            self.add(name, _derived_seed(self._seeds.get(DEFAULT_RNG, 1234), name))
        if name not in self._streams:
            raise KeyError(f"RNG stream {name!r} does not exist; known: {self.names()}")
        previous = self._current
        self._current = name
        try:
            yield
        finally:
            self._current = previous

    def uniform(self, shape) -> np.ndarray:
        """Uniform [0, 1) float32 samples from the current stream."""
        return self._streams[self._current].random(tuple(shape), dtype=np.float32)

    def get_states(self) -> Dict[str, dict]:
        """JSON-serialisable states of every stream (for checkpoints)."""
        return {name: gen.bit_generator.state for name, gen in self._streams.items()}

    def set_states(self, states: Dict[str, dict]) -> None:
        """Restore states from :meth:`get_states`."""
        for name, state in states.items():
            gen = np.random.Generator(np.random.PCG64())
            gen.bit_generator.state = state
            self._streams[name] = gen


def _derived_seed(base: int, name: str) -> int:
    """The seed :func:`model_parallel_seed` gives stream ``name`` on this rank, from the default seed."""
    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel

    tp_rank = ps.get_tensor_model_parallel_rank()
    seed = int(base) - 100 * ps.get_pipeline_model_parallel_rank()
    if name == MODEL_PARALLEL_RNG:
        return seed + 2718 + tp_rank
    return seed + 2718 + 100 * ps.get_expert_model_parallel_rank() + tp_rank


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker."""
    return _TRACKER


get_cuda_rng_tracker = get_rng_tracker  # Megatron's name


def model_parallel_seed(seed: int) -> None:
    """Seed every stream from one user seed and this rank's position in the grid.

    Also sets MindSpore's and numpy's global seeds (weight initialisation uses them).
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    from mindspeed_ms.core import parallel_state as ps  # pylint: disable=import-outside-toplevel

    seed = int(seed)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    default_seed = seed + 100 * pp_rank
    _TRACKER.reset()
    _TRACKER.add(DEFAULT_RNG, default_seed)
    _TRACKER.add(MODEL_PARALLEL_RNG, _derived_seed(default_seed, MODEL_PARALLEL_RNG))
    _TRACKER.add(EXPERT_PARALLEL_RNG, _derived_seed(default_seed, EXPERT_PARALLEL_RNG))
    ms.set_seed(default_seed)
    np.random.seed(default_seed % (2 ** 32))
    _SEEDS.update(user=seed, global_seed=default_seed)


model_parallel_cuda_manual_seed = model_parallel_seed  # Megatron's name

# The user seed given to model_parallel_seed and the global seed it set from it.
_SEEDS: Dict[str, Optional[int]] = {"user": None, "global_seed": None}


def weight_init_seed() -> Optional[int]:
    """The base seed of layout-independent weight initialisation.

    MindSpore's global seed, except while it is still the one :func:`model_parallel_seed` set:
    that one is offset by the pipeline stage (so stages draw different dropout masks), and weights
    must not depend on the stage that holds them, so the user seed is returned instead.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel

    current = ms.get_seed()
    if _SEEDS["global_seed"] is not None and current == _SEEDS["global_seed"]:
        return _SEEDS["user"]
    return current


def dropout(x: Tensor, p: float, training: bool = True, stream: Optional[str] = None) -> Tensor:
    """Inverted dropout with a mask from the tracker's current (or the given) stream.

    Args:
        x: Input.
        p: Drop probability in [0, 1).
        training: No-op when False.
        stream: Draw from this stream instead of the current one.

    Returns:
        ``x * mask / (1 - p)``; gradients flow through the same mask.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    ctx = _TRACKER.fork(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        keep = _TRACKER.uniform(x.shape) >= p
    scale = np.asarray(1.0 / (1.0 - p), dtype=np.float32)
    mask = Tensor((keep * scale).astype(np.float32))
    return x * ops.cast(mask, x.dtype)
