"""Every collective of the communication layer against numpy, forward and backward.

Run by tests/test_communication_mp.py under msrun with 2 and with 4 workers. Each case checks
the world group and sub-groups (including a group whose order differs from the global order).
Inputs are drawn from per-rank seeds so every rank can compute every other rank's input and
hence the numpy reference of the whole collective.
"""

import numpy as np
import mindspore as ms
from mindspore import Tensor

import mindspeed_ms.core.communication as comm
from mindspeed_ms.core.communication import autograd as dcomm
from _worker import run_cases

RTOL, ATOL = 1e-6, 1e-6


def data(rank, shape, salt=0, dtype=np.float32):
    rng = np.random.default_rng(1000 * rank + salt)
    return rng.standard_normal(shape).astype(dtype)


def groups():
    """The groups to test at this world size: world, a reversed world, and disjoint pairs."""
    n = comm.get_world_size()
    out = [comm.world_group(), comm.new_group(list(reversed(range(n))), kind="rev")]
    if n == 4:
        for pairs, kind in (([[0, 1], [2, 3]], "lo"), ([[0, 2], [1, 3]], "st")):
            for ranks in pairs:
                grp = comm.new_group(ranks, kind=kind)
                if comm.get_rank() in ranks:
                    out.append(grp)
    return out


def check(actual, expected, what):
    actual = actual.asnumpy() if hasattr(actual, "asnumpy") else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def grad_of(fn, x, upstream):
    """Gradient of sum(fn(x) * upstream) with respect to x."""
    up = Tensor(upstream)

    def objective(inp):
        return (fn(inp) * up).sum()

    return ms.grad(objective)(Tensor(x))


def case_all_reduce():
    for grp in groups():
        me = comm.get_rank()
        inputs = {r: data(r, (3, 5), 1) for r in grp.ranks}
        x = Tensor(inputs[me])
        check(comm.all_reduce(x, grp), sum(inputs.values()), f"sum {grp}")
        check(comm.all_reduce(x, grp, op="max"), np.max(np.stack(list(inputs.values())), 0), f"max {grp}")
        check(comm.all_reduce(x, grp, op="min"), np.min(np.stack(list(inputs.values())), 0), f"min {grp}")
        check(comm.all_reduce(x, grp, op="avg"), sum(inputs.values()) / grp.size, f"avg {grp}")
        # backward of a sum all-reduce: the sum of every rank's upstream gradient
        ups = {r: data(r, (3, 5), 2) for r in grp.ranks}
        check(grad_of(lambda t: dcomm.all_reduce(t, grp), inputs[me], ups[me]), sum(ups.values()), f"grad {grp}")
    return "ok"


def case_all_reduce_dtypes():
    grp = comm.world_group()
    me = comm.get_rank()
    ints = {r: (np.arange(6, dtype=np.int64) * (r + 1) - 3 + (1 << 40) * r) for r in grp.ranks}
    out = comm.all_reduce(Tensor(ints[me]), grp)
    assert out.dtype == ms.int64, out.dtype
    np.testing.assert_array_equal(out.asnumpy(), sum(ints.values()))
    i32 = comm.all_reduce(Tensor(np.array([me, -5], np.int32)), grp)
    assert i32.dtype == ms.int32
    np.testing.assert_array_equal(i32.asnumpy(), [sum(grp.ranks), -5 * grp.size])
    flags = comm.all_reduce(Tensor(np.array([me == 0, False])), grp, op="max")
    np.testing.assert_array_equal(flags.asnumpy(), [True, False])
    bf = comm.all_reduce(Tensor(np.array([1.5, -2.0], np.float32)).astype(ms.bfloat16), grp)
    assert bf.dtype == ms.bfloat16
    check(bf.astype(ms.float32), np.array([1.5, -2.0]) * grp.size, "bf16")
    half = comm.all_reduce(Tensor(np.array([0.5], np.float16)), grp)
    assert half.dtype == ms.float16
    f64 = comm.all_gather(Tensor(np.array([1.0 + 1e-12 * (me + 1)], np.float64)), grp)
    expected = np.array([1.0 + 1e-12 * (r + 1) for r in grp.ranks])
    np.testing.assert_allclose(f64.asnumpy(), expected, rtol=0, atol=1e-15)
    return "ok"


def case_all_gather():
    for grp in groups():
        me = comm.get_rank()
        for dim in (0, 1, -1):
            inputs = {r: data(r, (2, 3, 4), 3 + dim) for r in grp.ranks}
            expected = np.concatenate([inputs[r] for r in grp.ranks], axis=dim)
            check(comm.all_gather(Tensor(inputs[me]), grp, dim), expected, f"fwd {grp} dim {dim}")
            check(dcomm.all_gather(Tensor(inputs[me]), grp, dim), expected, f"dfwd {grp} dim {dim}")
            ups = {r: data(r, expected.shape, 4) for r in grp.ranks}
            total = sum(ups.values())
            mine = np.split(total, grp.size, axis=dim)[grp.rank]
            check(grad_of(lambda t, d=dim: dcomm.all_gather(t, grp, d), inputs[me], ups[me]), mine,
                  f"grad {grp} dim {dim}")
    return "ok"


def case_reduce_scatter():
    for grp in groups():
        me = comm.get_rank()
        n = grp.size
        for dim in (0, 2):
            shape = [2, 3, 4]
            shape[dim] *= n
            inputs = {r: data(r, shape, 5 + dim) for r in grp.ranks}
            expected = np.split(sum(inputs.values()), n, axis=dim)[grp.rank]
            check(comm.reduce_scatter(Tensor(inputs[me]), grp, dim), expected, f"fwd {grp} dim {dim}")
            ups = {r: data(r, expected.shape, 6) for r in grp.ranks}
            gathered = np.concatenate([ups[r] for r in grp.ranks], axis=dim)
            check(grad_of(lambda t, d=dim: dcomm.reduce_scatter(t, grp, d), inputs[me], ups[me]), gathered,
                  f"grad {grp} dim {dim}")
    return "ok"


def numpy_all_to_all(inputs, ranks, me_index, split_dim, concat_dim):
    n = len(ranks)
    pieces = [np.split(inputs[r], n, axis=split_dim)[me_index] for r in ranks]
    return np.concatenate(pieces, axis=concat_dim)


def case_all_to_all():
    for grp in groups():
        me = comm.get_rank()
        n = grp.size
        for split_dim, concat_dim in ((0, 0), (1, 0), (0, 2), (2, 1)):
            shape = [2 * n, 2 * n, 2 * n]
            inputs = {r: data(r, shape, 7 + split_dim * 3 + concat_dim) for r in grp.ranks}
            expected = numpy_all_to_all(inputs, grp.ranks, grp.rank, split_dim, concat_dim)
            check(comm.all_to_all(Tensor(inputs[me]), grp, split_dim, concat_dim), expected,
                  f"fwd {grp} {split_dim}->{concat_dim}")
            ups = {r: data(r, expected.shape, 8) for r in grp.ranks}
            # adjoint: out_r[concat chunk j] = split chunk r of x_j, so dx_me[split chunk r] = up_r[concat chunk me]
            grad = np.concatenate([np.split(ups[r], n, axis=concat_dim)[grp.rank] for r in grp.ranks],
                                  axis=split_dim)
            check(grad_of(lambda t, s=split_dim, c=concat_dim: dcomm.all_to_all(t, grp, s, c), inputs[me], ups[me]),
                  grad, f"grad {grp} {split_dim}->{concat_dim}")
    return "ok"


def splits_matrix(ranks):
    """Uneven, rank-dependent rows sent from each rank to each other rank (including zeros)."""
    n = len(ranks)
    return {src: [((src * 7 + dst * 3) % 4) for dst in range(n)] for src in ranks}


def case_all_to_all_v():
    for grp in groups():
        me = comm.get_rank()
        sends = splits_matrix(grp.ranks)
        inputs = {r: data(r, (sum(sends[r]), 3), 9) for r in grp.ranks}
        recv = [sends[r][grp.rank] for r in grp.ranks]
        expected_rows = []
        for r in grp.ranks:
            start = sum(sends[r][:grp.rank])
            expected_rows.append(inputs[r][start:start + sends[r][grp.rank]])
        expected = np.concatenate(expected_rows, axis=0)
        check(comm.all_to_all_v(Tensor(inputs[me]), sends[me], None, grp), expected, f"fwd {grp} (sizes exchanged)")
        check(comm.all_to_all_v(Tensor(inputs[me]), sends[me], recv, grp), expected, f"fwd {grp} (sizes given)")
        ups = {r: data(r, (sum(sends[s][grp.group_rank(r)] for s in grp.ranks), 3), 10) for r in grp.ranks}
        # gradient rows of my input that went to rank d come back from d's upstream gradient
        grad_rows = []
        for d in grp.ranks:
            d_index = grp.group_rank(d)
            start = sum(sends[s][d_index] for s in grp.ranks[:grp.rank])
            grad_rows.append(ups[d][start:start + sends[me][d_index]])
        grad = np.concatenate(grad_rows, axis=0)
        check(grad_of(lambda t: dcomm.all_to_all_v(t, sends[me], recv, grp), inputs[me], ups[me]), grad,
              f"grad {grp}")
    # mismatched recv_splits are reported, not silently wrong
    grp = comm.world_group()
    try:
        comm.all_to_all_v(Tensor(data(me, (grp.size, 2))), None, [5] * grp.size, grp)
    except ValueError as err:
        assert "expected to receive" in str(err), err
    else:
        raise AssertionError("a wrong recv_splits was accepted")
    return "ok"


def case_broadcast():
    for grp in groups():
        me = comm.get_rank()
        for src in grp.ranks:
            inputs = {r: data(r, (4, 2), 11) for r in grp.ranks}
            check(comm.broadcast(Tensor(inputs[me]), src, grp), inputs[src], f"fwd {grp} src {src}")
            ups = {r: data(r, (4, 2), 12) for r in grp.ranks}
            grad = sum(ups.values()) if me == src else np.zeros((4, 2), np.float32)
            check(grad_of(lambda t, s=src: dcomm.broadcast(t, s, grp), inputs[me], ups[me]), grad,
                  f"grad {grp} src {src}")
    return "ok"


def case_barrier():
    for grp in groups():
        comm.barrier(grp)
    return "ok"


def case_point_to_point():
    me, n = comm.get_rank(), comm.get_world_size()
    nxt, prev = (me + 1) % n, (me - 1) % n
    # a ring: everyone sends to the next rank while receiving from the previous one
    got = comm.exchange(sends={nxt: Tensor(data(me, (3, 2), 13))}, recvs={prev: ((3, 2), ms.float32)})
    check(got[prev], data(prev, (3, 2), 13), "ring forward")
    # the reverse ring, with a different shape
    got = comm.exchange(sends={prev: Tensor(data(me, (5,), 14))}, recvs={nxt: ((5,), ms.float32)})
    check(got[nxt], data(nxt, (5,), 14), "ring backward")
    # pairwise send/recv in both directions with one neighbour, different shapes each way
    peer = me ^ 1
    got = comm.exchange(sends={peer: Tensor(data(me, (2, 2 + me % 2), 15))},
                        recvs={peer: ((2, 2 + peer % 2), ms.float32)})
    check(got[peer], data(peer, (2, 2 + peer % 2), 15), "pair exchange")
    # plain send then recv, even ranks first
    if me % 2 == 0:
        comm.send(Tensor(data(me, (4,), 16)), peer)
        check(comm.recv((4,), ms.float32, peer), data(peer, (4,), 17), "recv after send")
    else:
        check(comm.recv((4,), ms.float32, peer), data(peer, (4,), 16), "recv before send")
        comm.send(Tensor(data(me, (4,), 17)), peer)
    # float16 and bfloat16 activations travel unchanged
    got = comm.exchange(sends={peer: Tensor(data(me, (3,), 18)).astype(ms.bfloat16)},
                        recvs={peer: ((3,), ms.bfloat16)})
    assert got[peer].dtype == ms.bfloat16
    check(got[peer].astype(ms.float32), Tensor(data(peer, (3,), 18)).astype(ms.bfloat16).astype(ms.float32),
          "bf16 p2p")
    return "ok"


def case_errors():
    grp = comm.world_group()
    checks = [
        (lambda: comm.all_reduce(Tensor(np.ones(2, np.float32)), grp, op="prod"), "op must be one of"),
        (lambda: comm.reduce_scatter(Tensor(np.ones((grp.size + 1, 2), np.float32)), grp), "not divisible"),
        (lambda: comm.all_to_all(Tensor(np.ones((grp.size + 1, 2), np.float32)), grp), "not divisible"),
        (lambda: comm.broadcast(Tensor(np.ones(2, np.float32)), grp.size + 3, grp), "not in the"),
        (lambda: comm.exchange(sends={comm.get_rank(): Tensor(np.ones(2, np.float32))}), "itself"),
    ]
    for fn, message in checks:
        try:
            fn()
        except ValueError as err:
            assert message in str(err), (message, str(err))
        else:
            raise AssertionError(f"expected a ValueError containing {message!r}")
    return "ok"


if __name__ == "__main__":
    run_cases({
        "all_reduce": case_all_reduce,
        "all_reduce_dtypes": case_all_reduce_dtypes,
        "all_gather": case_all_gather,
        "reduce_scatter": case_reduce_scatter,
        "all_to_all": case_all_to_all,
        "all_to_all_v": case_all_to_all_v,
        "broadcast": case_broadcast,
        "barrier": case_barrier,
        "point_to_point": case_point_to_point,
        "errors": case_errors,
    })
