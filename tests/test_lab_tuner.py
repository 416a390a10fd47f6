"""mindspeed_lab.tuner: layouts, memory and step-time estimates against hand computations.

The reference model (unless said otherwise): l=2 layers, h=8, a=2 heads, s=4, V=16, b=1, ffn 4h,
one key/value group per head, no gated unit, learned positions, tied output layer.
"""

import pytest

from mindspeed_lab.tuner import (HardwareSpec, Layout, ModelSpec, activation_bytes_per_layer, enumerate_layouts,
                                 estimate, estimate_layouts, layout_errors, model_flops, parameter_counts)


def small(**kw):
    base = dict(num_layers=2, hidden_size=8, num_attention_heads=2, seq_length=4, vocab_size=16)
    base.update(kw)
    return ModelSpec(**base)


HW = HardwareSpec(peak_flops=1e3, flops_efficiency=0.5, intra_node_bandwidth=100.0, inter_node_bandwidth=10.0,
                  devices_per_node=8, memory_gb=None)


def test_parameter_counts_by_hand():
    counts = parameter_counts(small())
    # attention 4h^2 = 256, mlp 8h^2 = 512, norms 4h = 32
    assert (counts["attention"], counts["mlp"], counts["norms"], counts["layer"]) == (256, 512, 32, 800)
    assert counts["embedding"] == 16 * 8 + 4 * 8  # V h + s h
    assert counts["total"] == 2 * 800 + 160 + 16
    gqa = parameter_counts(small(num_attention_heads=4, num_query_groups=2, gated_linear_unit=True, ffn_hidden_size=16,
                                 position_embedding_type="rope", untie_embeddings_and_output_weights=True))
    assert gqa["attention"] == 2 * 64 + 2 * 8 * 4  # kv width = g h / a = 4
    assert gqa["mlp"] == 3 * 8 * 16
    assert gqa["embedding"] == 128 and gqa["output"] == 128
    moe = parameter_counts(small(num_layers=1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16))
    assert moe["mlp"] == 4 * 2 * 8 * 16 + 8 * 4  # experts + router
    assert moe["expert"] == 4 * 2 * 8 * 16


def test_model_flops_equal_megatrons_formula():
    model = small()
    flops = model_flops(model, global_batch=1)["model"]
    b, s, l, h, v = 1, 4, 2, 8, 16
    assert flops == pytest.approx(72 * b * s * l * h ** 2 * (1 + s / (6 * h) + v / (12 * l * h)))
    assert flops == pytest.approx(43008)
    big = ModelSpec(num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=2048, vocab_size=50304)
    b = 8
    assert model_flops(big, b)["model"] == pytest.approx(
        72 * b * 2048 * 24 * 2048 ** 2 * (1 + 2048 / (6 * 2048) + 50304 / (12 * 24 * 2048)))
    moe = small(num_layers=1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
    # 8 tokens; per token and layer: 2*(256 + 2*256 + 32) matmul + 4*s*h scores; logits 2hV
    assert model_flops(moe, 2)["model"] == pytest.approx(3 * (8 * (2 * (256 + 512 + 32) + 4 * 4 * 8) + 8 * 2 * 8 * 16))


def test_activations_follow_korthikanti():
    model = small()
    s, b, h, a = 4, 1, 8, 2
    assert activation_bytes_per_layer(model) == s * b * h * (34 + 5 * a * s / h) == 1248
    t = 2
    assert activation_bytes_per_layer(model, tp=t) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert activation_bytes_per_layer(model, tp=t, sequence_parallel=True) == pytest.approx(
        (34 * s * b * h + 5 * a * s * s * b) / t)
    assert activation_bytes_per_layer(model, tp=t, sequence_parallel=True, recompute="selective") == pytest.approx(
        34 * s * b * h / t)
    assert activation_bytes_per_layer(model, tp=t, sequence_parallel=True, recompute="full") == 2 * s * b * h / t
    assert activation_bytes_per_layer(model, tp=t, recompute="full") == 2 * s * b * h
    # context parallelism: s -> s/cp
    assert activation_bytes_per_layer(model, cp=2) == pytest.approx(2 * b * h * (34 + 5 * a * 2 / h))
    # MoE, top-2 of experts with ffn 16: 10sbh + 2sbh + 4sb*kv + 2sbh + k*4sbf + 5as^2b
    moe = small(num_layers=1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
    assert activation_bytes_per_layer(moe) == 320 + 64 + 128 + 64 + 2 * 4 * 4 * 16 + 160
    with pytest.raises(ValueError, match="recompute"):
        activation_bytes_per_layer(model, recompute="some")


def test_single_rank_memory_and_time_by_hand():
    row = estimate(small(), Layout(), HW)
    params = 1776
    assert row["params_per_rank"] == params
    assert row["weights_gb"] * 1024 ** 3 == pytest.approx(2 * params)
    assert row["grads_gb"] * 1024 ** 3 == pytest.approx(4 * params)
    assert row["optimizer_gb"] * 1024 ** 3 == pytest.approx(12 * params)
    act = 2 * 1248 + 4 * 4 * 1 * 16  # two layers + logits 4 s b V
    assert row["activations_gb"] * 1024 ** 3 == pytest.approx(act)
    assert row["total_gb"] * 1024 ** 3 == pytest.approx(18 * params + act)
    assert row["compute_s"] == pytest.approx(43008 / (1e3 * 0.5))
    assert row["comm_s"] == 0 and row["step_time_s"] == pytest.approx(86.016)
    assert row["tokens_per_s"] == pytest.approx(4 / 86.016)
    assert row["mfu"] == pytest.approx(0.5)


def test_tensor_parallel_memory_and_communication_by_hand():
    model = small()
    plain = estimate(model, Layout(tp=2), HW)
    sp = estimate(model, Layout(tp=2, sequence_parallel=True), HW)
    full = estimate(model, Layout(tp=2, sequence_parallel=True, recompute="full"), HW)
    params = 2 * (768 / 2 + 32) + 128 / 2 + 32 + 16  # layers split by t (norms replicated) + embedding/t + pos + norm
    assert plain["params_per_rank"] == pytest.approx(params)
    logits = 4 * 4 * 16 / 2
    assert plain["activations_gb"] * 1024 ** 3 == pytest.approx(2 * 784 + logits)
    assert sp["activations_gb"] * 1024 ** 3 == pytest.approx(2 * 624 + logits)
    assert full["activations_gb"] * 1024 ** 3 == pytest.approx(2 * 32 + 624 + logits)  # + one layer recomputed
    # 4 all-reduces of b s h * 2 bytes per layer; ring: 2 (t-1)/t of the buffer -> 64 bytes each
    assert plain["tp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * 4 * 64)
    assert sp["tp_comm_gb"] == plain["tp_comm_gb"]
    assert full["tp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * 6 * 64)
    assert plain["tp_comm_s"] == pytest.approx(512 / 100.0)  # span 2 <= 8 devices: intra-node bandwidth
    assert plain["compute_s"] == pytest.approx(43008 / (2 * 1e3 * 0.5))
    assert plain["step_time_s"] == pytest.approx(43.008 + 5.12)
    assert full["hardware_tflop"] * 1e12 == pytest.approx(43008 + 13312)  # + one forward of the layers
    sel = estimate(model, Layout(tp=2, sequence_parallel=True, recompute="selective"), HW)
    assert sel["hardware_tflop"] * 1e12 == pytest.approx(43008 + 4 * 4 * 4 * 8 * 2)  # + attention core 4Tshl
    # inter-node bandwidth once the group spans more than one node
    two_per_node = HardwareSpec(peak_flops=1e3, flops_efficiency=0.5, intra_node_bandwidth=100.0,
                                inter_node_bandwidth=10.0, devices_per_node=1, memory_gb=None)
    assert estimate(model, Layout(tp=2), two_per_node)["tp_comm_s"] == pytest.approx(512 / 10.0)


def test_pipeline_memory_bubble_and_transfers_by_hand():
    model = small(micro_batch_num=4)
    row = estimate(model, Layout(pp=2), HW)
    # first stage: 1 layer, min(p, m) = 2 micro batches in flight; params: layer + embedding + positions
    first = (800 + 128 + 32) * 18 + 1248 * 2
    last = (800 + 16 + 128) * 18 + 1248 + 256  # final norm + the tied output copy; 1 micro batch + logits
    assert row["total_gb"] * 1024 ** 3 == pytest.approx(max(first, last)) == first
    assert row["bubble_fraction"] == pytest.approx(1 / 4)
    assert row["compute_s"] == pytest.approx(4 * 43008 / (2 * 1e3 * 0.5) * 1.25)
    assert row["pp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * 4 * 1 * 4 * 8 * 2)
    deep = small(num_layers=4, micro_batch_num=4)
    inter = estimate(deep, Layout(pp=2, vpp=2), HW)
    assert inter["bubble_fraction"] == pytest.approx(1 / (4 * 2))
    assert inter["activations_gb"] * 1024 ** 3 == pytest.approx(1248 * 2 * 2 * (1 + 1 / (2 * 2)))
    assert inter["pp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * 4 * 2 * 4 * 8 * 2)


def test_data_parallel_and_distributed_optimizer_by_hand():
    model = small()
    plain = estimate(model, Layout(dp=2), HW)
    dist = estimate(model, Layout(dp=2, distributed_optimizer=True), HW)
    assert plain["optimizer_gb"] * 1024 ** 3 == pytest.approx(12 * 1776)
    assert dist["optimizer_gb"] * 1024 ** 3 == pytest.approx(12 * 1776 / 2)  # 6 + 12/d bytes per parameter
    assert (dist["weights_gb"] + dist["grads_gb"]) * 1024 ** 3 == pytest.approx(6 * 1776)
    assert plain["dp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * (1 / 2) * 4 * 1776)
    assert dist["dp_comm_gb"] * 1024 ** 3 == pytest.approx((1 / 2) * 4 * 1776 + (1 / 2) * 2 * 1776)
    assert plain["global_batch"] == 2 and plain["model_tflop"] * 1e12 == pytest.approx(2 * 43008)
    fixed = small(global_batch_size=4)
    assert estimate(fixed, Layout(dp=2), HW)["micro_batches"] == 2
    assert estimate(fixed, Layout(dp=4), HW)["micro_batches"] == 1


def test_expert_parallel_by_hand():
    model = small(num_layers=1, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16)
    row = estimate(model, Layout(dp=2, ep=2, distributed_optimizer=True), HW)
    dense = 256 + 32 + 32 + 128 + 32 + 16  # attention, router, norms, embedding, positions, final norm
    expert = 4 * 256 / 2  # half of the experts
    assert row["params_per_rank"] == pytest.approx(dense + expert)
    # dense weights shard their optimizer state over dp=2, experts over dp/ep = 1
    assert row["optimizer_gb"] * 1024 ** 3 == pytest.approx(12 * (dense / 2 + expert))
    # four all-to-alls of the k*b*s*h routed tokens (2 bytes); half leaves the rank
    assert row["ep_comm_gb"] * 1024 ** 3 == pytest.approx(4 * 0.5 * 2 * 4 * 8 * 2)
    assert row["model_tflop"] * 1e12 == pytest.approx(47616)


def test_context_parallel_ring_attention_by_hand():
    row = estimate(small(), Layout(cp=2), HW)
    # per layer: 3 passes (forward, backward twice) x (c-1) K/V chunks of b*(s/c)*kv*2 bytes each, K and V
    assert row["cp_comm_gb"] * 1024 ** 3 == pytest.approx(2 * 3 * 1 * (2 * 1 * 2 * 8 * 2))


def test_layout_rules():
    # the engine's rules (mindspeed_ms.core.config.layout_rules), in the config's field names
    model = small(num_layers=4, num_attention_heads=4, num_query_groups=2, micro_batch_num=3)
    errs = layout_errors(model, 4, Layout(tp=4))
    assert any("num_query_groups=2 must be divisible by tensor_model_parallel_size=4" in e for e in errs)
    assert any("must equal workers" in e for e in layout_errors(model, 8, Layout(tp=2)))
    assert any("divisible by 2 * context_parallel_size" in e for e in layout_errors(small(seq_length=6), 2, Layout(cp=2)))
    assert any("num_layers=4 must be divisible by the 3 pipeline stages" in e
               for e in layout_errors(model, 3, Layout(pp=3)))
    assert any("virtual_pipeline_model_parallel_size=2 needs pipeline_model_parallel_size >= 2" in e
               for e in layout_errors(model, 1, Layout(vpp=2)))
    assert any("micro_batch_num (3) to be a multiple of pipeline_model_parallel_size=2" in e
               for e in layout_errors(model, 2, Layout(pp=2, vpp=2)))
    # sequence parallelism without tensor parallelism has nothing to split: a no-op, as in Megatron
    assert not layout_errors(model, 1, Layout(sequence_parallel=True))
    moe = small(num_experts=6)
    assert any("num_experts=6 must be divisible by expert_model_parallel_size=4" in e
               for e in layout_errors(moe, 4, Layout(dp=4, ep=4)))
    assert any("expert_model_parallel_size=4 must divide the data-parallel size 2" in e
               for e in layout_errors(moe, 2, Layout(dp=2, ep=4)))
    assert any("together with context_parallel_size" in e for e in layout_errors(moe, 4, Layout(dp=2, cp=2, ep=2)))
    assert any("needs MoE" in e for e in layout_errors(small(), 2, Layout(dp=2, ep=2)))
    assert any("needs sequence_parallel=True" in e for e in layout_errors(moe, 2, Layout(tp=2)))
    assert not layout_errors(moe, 2, Layout(tp=2, sequence_parallel=True))
    assert any("not optimizer_type='SGD'" in e for e in
               layout_errors(small(optimizer_type="SGD"), 2, Layout(dp=2, distributed_optimizer=True)))
    with pytest.raises(ValueError, match="invalid layout"):
        estimate(model, Layout(tp=4), HW)


def test_enumeration_small_case_by_hand():
    model = small(micro_batch_num=2)
    names = {lay.name for lay in enumerate_layouts(model, 2, recompute=("none",))}
    assert names == {"tp1 pp1 dp2", "tp1 pp1 dp2 do", "tp1 pp1 dp1 cp2", "tp1 pp1 dp1 cp2 do", "tp1 pp2 dp1",
                     "tp2 pp1 dp1", "tp2 pp1 dp1 sp"}
    all_modes = enumerate_layouts(model, 2)
    assert len(all_modes) == 3 * 7
    moe = small(num_layers=4, num_experts=4, micro_batch_num=4)
    layouts = enumerate_layouts(moe, 4, recompute=("none",), sequence_parallel=(False,), distributed_optimizer=(False,))
    assert Layout(tp=1, pp=1, dp=4, ep=4) in layouts and Layout(tp=1, pp=2, dp=2, vpp=2) in layouts
    assert all(not layout_errors(moe, 4, lay) for lay in layouts)
    assert not any(lay.ep > 1 and lay.cp > 1 for lay in layouts)


def test_estimate_layouts_frame_is_sortable():
    model = ModelSpec(num_layers=8, hidden_size=256, num_attention_heads=8, seq_length=128, vocab_size=1000,
                      micro_batch_num=4, global_batch_size=32)
    table = estimate_layouts(model, 4, hardware=HardwareSpec(memory_gb=0.01))
    assert list(table["tokens_per_s"]) == sorted(table["tokens_per_s"], reverse=True)
    by_memory = estimate_layouts(model, 4, sort_by="total_gb")
    assert list(by_memory["total_gb"]) == sorted(by_memory["total_gb"])
    assert {"layout", "tp", "pp", "dp", "cp", "ep", "vpp", "sequence_parallel", "distributed_optimizer", "recompute",
            "weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "total_gb", "step_time_s",
            "tokens_per_s", "mfu", "fits"} <= set(table.columns)
    fitting = estimate_layouts(model, 4, hardware=HardwareSpec(memory_gb=0.01), only_fitting=True)
    assert len(fitting) < len(table) and fitting["fits"].all()
    with pytest.raises(ValueError, match="sort_by"):
        estimate_layouts(model, 4, sort_by="nope")


def test_model_spec_validation_and_from_dict():
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_attention_heads"):
        small(hidden_size=9)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1, got 0"):
        small(num_layers=0)
    with pytest.raises(ValueError, match="moe_router_topk"):
        small(num_experts=2, moe_router_topk=3)
    spec = ModelSpec.from_dict({"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "seq_length": 4,
                                "padded_vocab_size": 16, "num_moe_experts": 4, "moe_topk": 2, "unrelated": 1})
    assert spec.vocab_size == 16 and spec.num_experts == 4 and spec.moe_router_topk == 2
    with pytest.raises(ValueError, match="flops_efficiency"):
        HardwareSpec(flops_efficiency=0)


def test_layout_table_sorts_filters_and_drives_its_widgets():
    from mindspeed_lab.tuner import LayoutTable  # pylint: disable=import-outside-toplevel

    table = estimate_layouts(small(), 4, hardware=HW)
    table["fits"] = table["total_gb"] < table["total_gb"].max()   # some fit, some do not
    assert table["fits"].any() and not table["fits"].all()
    t = LayoutTable(table, columns=["layout", "total_gb", "step_time_s", "fits"], rows=3)
    assert t.view["step_time_s"].is_monotonic_increasing and len(t.view) == len(table)
    t.sort("total_gb", ascending=False)
    assert t.view["total_gb"].is_monotonic_decreasing
    t.fits_only = True
    assert t.view["fits"].all() and len(t.view) == int(table["fits"].sum())
    assert f"3 of {len(t.view)} layouts, sorted by total_gb (descending)" in t.html()
    assert t.html().count("</tr>") == 4  # header + 3 rows
    # the widgets follow code, and code follows the widgets
    ui = t.ui
    assert t._sort_widget.value == "total_gb" and t._order_widget.value == "descending"  # pylint: disable=protected-access
    assert t._fits_widget.value is True  # pylint: disable=protected-access
    t._sort_widget.value = "step_time_s"  # pylint: disable=protected-access
    t._order_widget.value = "ascending"  # pylint: disable=protected-access
    assert t.sort_by == "step_time_s" and t.ascending and t.fits_only
    assert "sorted by step_time_s (ascending)" in t._html_widget.value  # pylint: disable=protected-access
    t.sort("mfu", ascending=False)
    assert t._sort_widget.value == "mfu" and t._order_widget.value == "descending"  # pylint: disable=protected-access
    assert not t.ascending and ui is t.ui
    with pytest.raises(ValueError, match="allowed: columns of the table"):
        t.sort("nope")
    with pytest.raises(ValueError, match="allowed: columns of the table"):
        LayoutTable(table, columns=["nope"])
