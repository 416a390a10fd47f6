"""Deterministic, resumable batch sampling across data-parallel ranks.

A global batch holds ``micro_batch_size * micro_batch_num * data_parallel_size`` sample indices.
Rank ``r`` takes the consecutive slice ``[r * L, (r + 1) * L)`` of it, ``L = micro_batch_size *
micro_batch_num``, which the training loop splits into ``micro_batch_num`` micro-batches of
``micro_batch_size`` along dim 0 (:meth:`DataParallelBatchSampler.micro_batches`). So the union of
the ranks' batches is exactly the global batch a single process would use, in the same order.

Global batch ``k`` (counted from the start of training, across epochs) is a pure function of
``k`` and the arguments: epoch ``e = k // batches_per_epoch`` reads the samples in order
(``shuffle=False``) or in a permutation seeded by ``(seed, e)``. The position is the number of
consumed samples (``k * global_batch_size``); a sampler built with the ``consumed_samples`` of a
checkpoint continues with exactly the batches the uninterrupted run would have used.

With ``drop_remainder=True`` the samples left over at the end of an epoch are skipped; with
``False`` the last batch of the epoch is filled up by wrapping around to the start of that epoch's
order, so every batch has the full shape on every rank.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping

import numpy as np

__all__ = ["DataParallelBatchSampler"]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class DataParallelBatchSampler:
    """Yields this rank's sample indices for each optimizer step.

    Args:
        num_samples: Dataset length.
        micro_batch_size: Samples per micro-batch.
        micro_batch_num: Micro-batches per step (gradient accumulation / pipeline). Default: 1.
        data_parallel_size: Number of data-parallel ranks. Default: 1.
        data_parallel_rank: This rank's data-parallel index. Default: 0.
        drop_remainder: Skip the incomplete last batch of each epoch (else fill it by wrapping).
            Default: True.
        shuffle: Permute the samples each epoch. Default: False.
        seed: Seed of the permutations. Default: 0.
        consumed_samples: Samples already consumed (a multiple of the global batch size), for
            resuming. Default: 0.

    Iterating yields ``np.int64[micro_batch_size * micro_batch_num]`` arrays, from the current
    position to the end of the current epoch, advancing :attr:`consumed_samples` as it goes;
    iterate again for the next epoch. ``len(sampler)`` is the number of steps per epoch.

    Raises:
        ValueError: An argument is out of range, ``consumed_samples`` is not a multiple of the
            global batch size, or (with ``drop_remainder``) the dataset is smaller than one
            global batch.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, micro_batch_num: int = 1,
                 data_parallel_size: int = 1, data_parallel_rank: int = 0, *, drop_remainder: bool = True,
                 shuffle: bool = False, seed: int = 0, consumed_samples: int = 0):
        self.num_samples = _positive_int("num_samples", num_samples)
        self.micro_batch_size = _positive_int("micro_batch_size", micro_batch_size)
        self.micro_batch_num = _positive_int("micro_batch_num", micro_batch_num)
        self.data_parallel_size = _positive_int("data_parallel_size", data_parallel_size)
        self.data_parallel_rank = _positive_int("data_parallel_rank", data_parallel_rank, 0)
        if self.data_parallel_rank >= self.data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} must be < data_parallel_size="
                             f"{data_parallel_size}")
        self.drop_remainder = bool(drop_remainder)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.local_batch_size = self.micro_batch_size * self.micro_batch_num
        self.global_batch_size = self.local_batch_size * self.data_parallel_size
        if self.drop_remainder:
            self.batches_per_epoch = self.num_samples // self.global_batch_size
            if self.batches_per_epoch == 0:
                raise ValueError(f"num_samples={self.num_samples} is smaller than one global batch "
                                 f"({self.global_batch_size} = micro_batch_size {self.micro_batch_size} x "
                                 f"micro_batch_num {self.micro_batch_num} x data_parallel_size "
                                 f"{self.data_parallel_size}) and drop_remainder=True")
        else:
            self.batches_per_epoch = -(-self.num_samples // self.global_batch_size)
        self._order_cache: Dict[int, np.ndarray] = {}
        self.consumed_samples = 0
        self.set_consumed_samples(consumed_samples)

    # -- position ------------------------------------------------------------------------------
    def set_consumed_samples(self, consumed_samples: int) -> None:
        """Move to the position after ``consumed_samples`` samples (a multiple of the global batch)."""
        consumed_samples = _positive_int("consumed_samples", consumed_samples, 0)
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed_samples={consumed_samples} is not a multiple of the global batch size "
                             f"{self.global_batch_size}")
        self.consumed_samples = consumed_samples

    @property
    def step(self) -> int:
        """Global batches consumed so far."""
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.step // self.batches_per_epoch

    # -- batches -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (a seeded permutation when shuffling)."""
        order = self._order_cache.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            order = order.astype(np.int64)
            self._order_cache = {epoch: order}
        return order

    def global_batch(self, step: int) -> np.ndarray:
        """The sample indices of global batch ``step`` (all ranks)."""
        epoch, j = divmod(int(step), self.batches_per_epoch)
        order = self.epoch_order(epoch)
        positions = np.arange(j * self.global_batch_size, (j + 1) * self.global_batch_size)
        return order[positions % self.num_samples]

    def local_batch(self, step: int) -> np.ndarray:
        """This rank's slice of global batch ``step``."""
        start = self.data_parallel_rank * self.local_batch_size
        return self.global_batch(step)[start:start + self.local_batch_size]

    def micro_batches(self, local_batch: np.ndarray) -> List[np.ndarray]:
        """Split a local batch into ``micro_batch_num`` micro-batches of ``micro_batch_size``."""
        return list(np.asarray(local_batch).reshape(self.micro_batch_num, self.micro_batch_size))

    def __iter__(self) -> Iterator[np.ndarray]:
        end = (self.epoch + 1) * self.batches_per_epoch
        while self.step < end:
            batch = self.local_batch(self.step)
            self.consumed_samples += self.global_batch_size
            yield batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The position and the arguments it depends on, JSON-able."""
        return {"consumed_samples": self.consumed_samples, "global_batch_size": self.global_batch_size,
                "num_samples": self.num_samples, "shuffle": self.shuffle, "seed": self.seed,
                "drop_remainder": self.drop_remainder}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position of a :meth:`state_dict`.

        Raises:
            ValueError: The state was written with a different dataset length, global batch size,
                shuffle, seed or drop_remainder (the position would mean other batches).
        """
        for name in ("num_samples", "global_batch_size", "shuffle", "seed", "drop_remainder"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"sampler state has {name}={state[name]!r}, this sampler has "
                                 f"{getattr(self, name)!r}")
        self.set_consumed_samples(state["consumed_samples"])
