"""mindspeed_lab.moe: offline MoE analysis checked against hand-computed values; the synthetic run;
the capacity and layout-run figures."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from mindspeed_lab import moe
from mindspeed_lab.events import MOE_COLUMNS, moe_pivot
from mindspeed_lab.plots import capacity_figure, layout_runs_figure
from mindspeed_lab.report import write_report
from mindspeed_lab.tuner import LayoutRuns
from mindspeed_ms.tools.moe_token_distribution import save_token_distribution


def frame(rows):
    """Long frame from ``[(rank, step, layer, [counts])]``."""
    out = [(r, s, l, e, c, float(s)) for r, s, l, counts in rows for e, c in enumerate(counts)]
    return pd.DataFrame(out, columns=MOE_COLUMNS)


def test_ranks_reporting_the_global_count_are_counted_once():
    # identical reports (the engine all-reduces before writing) -> one copy; different -> summed
    data = frame([(0, 1, 0, [6, 2, 0, 0]), (1, 1, 0, [6, 2, 0, 0]),
                  (0, 2, 0, [1, 1, 1, 1]), (1, 2, 0, [3, 1, 0, 0])])
    table = moe.global_counts(data)
    assert table.loc[(0, 1)].tolist() == [6, 2, 0, 0]
    assert table.loc[(0, 2)].tolist() == [4, 2, 1, 1]
    assert moe_pivot(data, agg="sum")[1].tolist() == [12, 4, 0, 0]
    assert moe.global_counts(data, last_steps=1).index.tolist() == [(0, 2)]


def test_capacity_and_drops_by_hand():
    # one step, 4 experts, 8 routed tokens: capacity(f) = ceil(8 f / 4) = ceil(2 f)
    data = frame([(0, 1, 0, [6, 2, 0, 0])])
    assert moe.drop_fraction(data, 1.0) == {0: 4 / 8}      # capacity 2: expert 0 drops 4
    assert moe.drop_fraction(data, 2.0) == {0: 2 / 8}      # capacity 4
    assert moe.drop_fraction(data, 2.5) == {0: 1 / 8}      # capacity 5
    assert moe.drop_fraction(data, 2.51) == {0: 0.0}       # capacity ceil(5.02) = 6
    table = moe.capacity_for_drop(data, 0.0).set_index("layer")
    assert table.loc[0, "capacity_factor"] == pytest.approx(2.51)
    assert table.loc[0, "max_over_mean"] == 3.0 and table.loc[-1, "capacity_factor"] == pytest.approx(2.51)
    # fewer than 20 % dropped: 1/8 = 12.5 % at 2.5 and just above 2.0 (capacity 5)
    assert moe.capacity_for_drop(data, 0.2).set_index("layer").loc[0, "capacity_factor"] == pytest.approx(2.01)
    curve = moe.capacity_curve(data, [1.0, 2.0, 3.0])
    assert curve["drop_fraction"].tolist() == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match=r"max_drop: got 1.5; allowed: a fraction in \[0, 1\)"):
        moe.capacity_for_drop(data, 1.5)
    with pytest.raises(ValueError, match="capacity_factor: got 0"):
        moe.drop_fraction(data, 0)


def test_hot_experts_and_cold_token_percent_by_hand():
    data = frame([(0, 1, 0, [1, 5, 1, 1]), (0, 2, 0, [6, 1, 1, 0]), (0, 2, 3, [2, 2, 2, 2])])
    hot = moe.hot_expert_suggestions(data, 1, window=2).set_index("layer")
    assert hot.loc[0, "hot_experts"] == [0] and hot.loc[0, "cold_experts"] == [1, 2, 3]
    assert hot.loc[0, "hot_share_last"] == 6 / 8 and hot.loc[0, "hot_share_window"] == 7 / 16
    assert hot.loc[0, "stability"] == 0.5  # step 1 alone would have picked expert 1
    assert hot.loc[0, "max_over_mean_last"] == 3.0
    assert hot.loc[3, "hot_experts"] == [0]  # ties: the lower index
    with pytest.raises(ValueError, match="hot_expert_num: got 5; allowed: at most num_experts=4"):
        moe.hot_expert_suggestions(data, 5)

    # last step of layer 0: [6, 1, 1, 0], hot [0], factor 4 -> capacity 8; cold capacity floor(8 p):
    # no drop needs floor(8 p) >= 1, i.e. p >= 0.125
    one = frame([(0, 1, 0, [6, 1, 1, 0])])
    table = moe.cold_token_percent_for_drop(one, 1, 4.0, max_drop=0.0, window=1).set_index("layer")
    assert table.loc[0, "cold_token_percent"] == pytest.approx(0.13)
    assert table.loc[0, "drop_fraction"] == 0.0
    assert moe.drop_fraction(one, 4.0, hot_experts={0: [0]}, cold_token_percent=0.1) == {0: 2 / 8}
    # hot expert over its own capacity: no cold percentage helps
    assert math.isnan(moe.cold_token_percent_for_drop(one, 1, 0.5, max_drop=0.0, window=1)["cold_token_percent"][0])


def test_counts_from_npy_files_and_events_agree(tmp_path):
    for step, counts in ((1, [3, 1]), (2, [0, 4]), (10, [2, 2])):
        save_token_distribution(tmp_path / "run" / "output" / "token_distribution", 1, step, counts)
    npy = moe.load_token_counts(tmp_path / "run", source="npy")
    assert moe.global_counts(npy).loc[1].to_numpy().tolist() == [[3, 1], [0, 4], [2, 2]]
    events = tmp_path / "run" / "output" / "events"
    events.mkdir()
    with open(events / "rank_0.jsonl", "w", encoding="utf-8") as f:
        for step, counts in ((1, [3, 1]), (2, [0, 4]), (10, [2, 2])):
            f.write(json.dumps({"kind": "moe_tokens", "time": 1.0, "rank": 0, "step": step, "layer": 1,
                                "counts": counts}) + "\n")
    auto = moe.load_token_counts(tmp_path / "run")  # events first
    assert np.array_equal(moe.global_counts(auto).to_numpy(), moe.global_counts(npy).to_numpy())
    with pytest.raises(FileNotFoundError, match="no MoE token counts"):
        moe.load_token_counts(tmp_path / "empty", source="npy")
    with pytest.raises(ValueError, match="source: got 'x'"):
        moe.load_token_counts(tmp_path, source="x")


def test_synthetic_run_report_and_figures(tmp_path):
    run = moe.write_synthetic_run(tmp_path / "syn", steps=12, layers=2, num_experts=4, topk=2, tokens_per_step=256,
                                  ranks=2, seed=1)
    counts = moe.load_token_counts(run)
    table = moe.global_counts(counts)
    assert table.shape == (24, 4) and (table.sum(axis=1) == 512).all()  # counted once, not per rank
    npy = moe.load_token_counts(run, source="npy")
    assert np.array_equal(moe.global_counts(npy).to_numpy(), table.to_numpy())
    # the router is balanced over time: the late steps need a smaller capacity factor
    early = moe.capacity_for_drop(counts.query("step <= 3"), 0.01).set_index("layer").loc[-1, "capacity_factor"]
    late = moe.capacity_for_drop(counts, 0.01, last_steps=3).set_index("layer").loc[-1, "capacity_factor"]
    assert late < early

    fig = capacity_figure(counts, 0.01, last_steps=5)
    assert isinstance(fig, Figure)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "layer 0" in labels and "layer 1" in labels and "1.0%" in labels
    assert any(label.startswith("layer 0: ") for label in labels)

    files = write_report(run, dpi=30)
    assert {"moe_tokens", "moe_imbalance", "moe_capacity", "summary"} <= set(files)
    assert "capacity factor 1pct" in files["summary"].read_text()


def test_layout_runs_figure():
    curves = pd.DataFrame({"tp1 pp1 dp2": [4.2, 4.0, 3.9], "tp2 pp1 dp1": [4.2, 4.0, 3.9000001]},
                          index=pd.Index([1, 2, 3], name="step"))
    table = pd.DataFrame({"layout": list(curves.columns), "step_time_s": [0.5, 0.9], "est_step_time_s": [0.01, 0.02],
                          "peak_rss_gb": [0.7, 0.7], "est_memory_gb": [0.001, 0.0005]})
    runs = LayoutRuns(table=table, curves=curves, jobs={}, estimates=pd.DataFrame())
    assert runs.same_loss(1e-3) and not runs.same_loss(1e-9)
    fig = layout_runs_figure(runs)
    loss_ax, time_ax, mem_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == list(curves.columns)
    for ax in (time_ax, mem_ax):
        assert sum(isinstance(c, BarContainer) for c in ax.containers) == 2 and ax.get_yscale() == "log"
