"""Limits of MindSpore's graph compiler that the compiled training step has to respect."""

from __future__ import annotations

import mindspore as ms

__all__ = ["allow_call_depth"]

_BASE = 1000  # MindSpore's default max_call_depth
_PER_ITEM = 8


def allow_call_depth(num_items: int) -> int:
    """Raise MindSpore's graph call-depth limit so that a graph looping over ``num_items`` compiles.

    The graph parser unrolls a Python loop over a tuple into nested calls: the compiled gradient
    split (``ops.split`` checks each section in such a loop, about four calls per section) and the
    gradient norm's loop over the parameters (about two) exceed the default limit of 1000 at 290
    parameters (a 24-layer GPT) and 578 (48 layers), measured ("Exceed function call depth limit
    1000"). The limit becomes ``1000 + 8 * num_items`` when this process has not raised it that
    far already (``mindspore.set_recursion_limit`` has no getter, so the highest limit set here is
    remembered; it is never lowered).

    Returns:
        The limit in force.
    """
    needed = _BASE + _PER_ITEM * int(num_items)
    if needed > _SET[0]:
        ms.set_recursion_limit(needed)
        _SET[0] = needed
    return _SET[0]


_SET = [_BASE]
