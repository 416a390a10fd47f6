"""The compiled gradient-buffer split of a deep model compiles (MindSpore's call-depth limit)."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from mindspeed_ms.core.distributed import distributed_data_parallel as ddp
from mindspeed_ms.core import graph_limits
from mindspeed_ms.core.graph_limits import allow_call_depth

ms.set_device("CPU")

SECTIONS = 300  # a 24-layer GPT has 290 parameters


@pytest.fixture
def default_limit():
    before = graph_limits._SET[0]
    ms.set_recursion_limit(1000)
    graph_limits._SET[0] = 1000
    yield
    ms.set_recursion_limit(before)
    graph_limits._SET[0] = before


def _split():
    flat = Tensor(np.arange(2 * SECTIONS, dtype=np.float32))
    pieces = ddp._compiled_unflatten(flat, (2,) * SECTIONS, ((2,),) * SECTIONS)
    return np.stack([p.asnumpy() for p in pieces])


@pytest.mark.slow  # two compilations of a 300-section split (~100 s on two cores)
def test_split_of_many_sections_needs_and_gets_a_higher_limit(default_limit):
    with pytest.raises(RuntimeError, match="call depth"):
        _split()
    assert allow_call_depth(SECTIONS) >= 1000 + 4 * SECTIONS
    assert allow_call_depth(10) == allow_call_depth(SECTIONS)  # never lowered
    np.testing.assert_array_equal(_split(), np.arange(2 * SECTIONS, dtype=np.float32).reshape(SECTIONS, 2))
