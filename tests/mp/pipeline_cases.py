"""Pipeline-parallel training runs under msrun, reporting losses and final weight statistics.

Usage: pipeline_cases.py <cases-json> (a JSON list of [name, config-dict] pairs, each trained in
this job with the parallel state re-initialised per case), plus the built-in case
``p2p_primitives`` when the job has 2 workers: Megatron's named transfers (P2PPrimitive), the
shape exchange of variable sequence lengths, and packing of several tensors for one peer.
"""

import json
import sys

import numpy as np
from mindspore import Tensor

from _worker import run_cases
import pipeline_training as P


def make_case(data):
    return lambda: P.train(data)


class _Config:
    """The fields P2PPrimitive reads, without a whole TransformerConfig."""

    def __init__(self, variable):
        class Parallel:
            recv_dtype = "float32"
            variable_seq_lengths = variable
            sequence_parallel = False
        self.parallel_config = Parallel()


def p2p_primitives():
    from mindspeed_ms.core import communication as comm
    from mindspeed_ms.core import parallel_state as ps
    from mindspeed_ms.core.pipeline_parallel.p2p_communication import P2PPrimitive, exchange_tensors

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(pipeline_model_parallel_size=2)
    try:
        me = comm.get_rank()
        other = 1 - me
        out = {}
        fixed = P2PPrimitive(_Config(False))
        act = Tensor(np.arange(6, dtype=np.float32).reshape(1, 2, 3) + 10 * me)
        if me == 0:
            fixed.send_forward(act)
            out["grad"] = fixed.recv_backward((1, 2, 3)).asnumpy().tolist()
            out["recv_forward_first_stage"] = fixed.recv_forward((1, 2, 3))
        else:
            out["act"] = fixed.recv_forward((1, 2, 3)).asnumpy().tolist()
            fixed.send_backward(act * 2)
            out["send_forward_last_stage"] = fixed.send_forward_recv_backward(act, (1, 2, 3))
        variable = P2PPrimitive(_Config(True))
        length = 5 if me == 0 else 7
        sent = Tensor(np.full((1, length, 3), float(me + 1), np.float32))
        # both directions with one peer (next == prev with two stages) in one batch
        from_prev, from_next = variable.send_forward_backward_recv_forward_backward(
            sent if me == 0 else None, sent if me == 1 else None, recv_prev=me == 1, recv_next=me == 0,
            tensor_shape=None)
        received = from_prev if me == 1 else from_next
        out["variable_shape"] = list(received.shape)
        out["variable_value"] = float(received.asnumpy().mean())
        packed = exchange_tensors([(other, Tensor(np.float32([1, 2]) + me)), (other, Tensor(np.float32([[3]]) + me))],
                                  [(other, (2,), sent.dtype), (other, (1, 1), sent.dtype)])
        out["packed"] = [t.asnumpy().tolist() for t in packed]
        return out
    finally:
        ps.destroy_model_parallel()


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    table = {name: make_case(data) for name, data in cases}
    if len(sys.argv) > 2 and sys.argv[2] == "--p2p":
        table = {"p2p_primitives": p2p_primitives, **table}
    run_cases(table)
