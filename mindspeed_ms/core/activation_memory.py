"""Bytes of activations a training step keeps for its backward pass (PyNative).

MindSpore's autograd hands every tensor it saves for the backward to the innermost active
``mindspore.saved_tensors_hooks`` pack hook, custom ``bprop`` cells (the collectives, flash
attention, recomputed blocks) included. :class:`SavedActivations` installs such a hook for the
forward pass, records each saved tensor once (tensors sharing storage are counted once, at their
largest size) and leaves parameters out: what remains is the activation memory held between the
forward and the backward, the quantity recomputation lowers. Tensors saved inside a block
recomputed with ``use_reentrant=False`` go to that block's own (inner) hook and are replaced by
placeholders, so they are rightly not counted.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import mindspore as ms

__all__ = ["SavedActivations"]


def _storage_key(tensor) -> Optional[int]:
    try:
        return int(tensor.data_ptr())
    except (AttributeError, RuntimeError, TypeError):
        return None


class SavedActivations:
    """Context manager counting the activation bytes saved for the backward.

    Args:
        parameters: Parameters of the network (left out of the count).

    Example::

        counter = SavedActivations(net.trainable_params())
        def forward():
            with counter:
                return net(x).sum()
        loss, grads = ms.value_and_grad(forward, None, params)()
        counter.bytes, counter.count
    """

    def __init__(self, parameters: Iterable = ()):
        self._skip = {key for key in (_storage_key(p) for p in parameters) if key is not None}
        self._sizes: Dict[object, int] = {}
        self._hooks = ms.saved_tensors_hooks(self._pack, lambda saved: saved)

    def _pack(self, tensor):
        key = _storage_key(tensor)
        if key is None:
            key = id(tensor)
        if key not in self._skip:
            nbytes = int(tensor.nbytes) if hasattr(tensor, "nbytes") else int(tensor.size) * tensor.itemsize
            self._sizes[key] = max(self._sizes.get(key, 0), nbytes)
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        """Activation bytes saved (distinct storages, parameters excluded)."""
        return sum(self._sizes.values())

    @property
    def count(self) -> int:
        """Distinct saved activation tensors."""
        return len(self._sizes)
