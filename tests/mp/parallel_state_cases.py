"""parallel_state under msrun: the groups exist and communicate, and the seed's examples run.

Usage: parallel_state_cases.py (with 4 workers).
"""

import numpy as np
from mindspore import Tensor

import mindspeed_ms.core.parallel_state as ps
from mindspeed_ms.core.communication import all_reduce, get_rank
from _worker import run_cases


def group_sums():
    """All-reduce each group's global ranks: the sum must equal the sum of the member ranks."""
    out = {}
    for name, getter in [("tp", ps.get_tensor_model_parallel_group), ("pp", ps.get_pipeline_model_parallel_group),
                         ("dp", ps.get_data_parallel_group), ("cp", ps.get_context_parallel_group),
                         ("ep", ps.get_expert_model_parallel_group), ("mp", ps.get_model_parallel_group),
                         ("emb", ps.get_embedding_group),
                         ("edp", ps.get_data_modulo_expert_parallel_group)]:
        grp = getter()
        got = all_reduce(Tensor(np.array([float(get_rank())], np.float32)), grp).asnumpy()[0]
        assert got == sum(grp.ranks), (name, grp.ranks, got)
        out[name] = list(grp.ranks)
    return out


def layout(**kwargs):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(**kwargs)
    return group_sums()


def case_seed_examples():
    # 1.1.8 - 1.1.10 of the reference (init() already ran in the worker set-up)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=1)
    assert ps.get_context_parallel_rank() == 0
    assert ps.get_context_parallel_world_size() == 1
    return [ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()]


def case_tp2_pp2():
    return layout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)


def case_tp2_dp2_ep2():
    return layout(tensor_model_parallel_size=2, expert_model_parallel_size=1) | {
        "ep2": layout(expert_model_parallel_size=2)}


def case_cp4_hybrid():
    groups = layout(context_parallel_size=4, ulysses_degree_in_cp=2)
    uly = ps.get_context_parallel_group_for_hybrid_ulysses()
    ring = ps.get_context_parallel_group_for_hybrid_ring()
    for grp in (uly, ring):
        got = all_reduce(Tensor(np.array([float(get_rank())], np.float32)), grp).asnumpy()[0]
        assert got == sum(grp.ranks)
    return groups | {"ulysses": list(uly.ranks), "ring": list(ring.ranks)}


def case_pp4_vpp():
    return layout(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)


if __name__ == "__main__":
    run_cases({
        "seed_examples": case_seed_examples,
        "tp2_pp2": case_tp2_pp2,
        "tp2_dp2_ep2": case_tp2_dp2_ep2,
        "cp4_hybrid": case_cp4_hybrid,
        "pp4_vpp": case_pp4_vpp,
    })
