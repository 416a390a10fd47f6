"""mindspeed_lab.events: following event files while another process or thread writes them."""

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mindspeed_lab.events import (EventReader, find_events_dir, hot_experts, moe_imbalance, moe_layer_matrix,
                                  moe_pivot, read_events, step_summary)


def step_record(rank, step, **extra):
    rec = {"kind": "step", "time": 1000.0 + step, "rank": rank, "epoch": 0, "step": step, "loss": 10.0 / step,
           "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1024.0, "scale_window": 20, "overflow": False,
           "step_time_ms": 100.0 + rank, "tokens_per_s": 1000.0}
    rec.update(extra)
    return rec


# A writer in another process: per record it writes the line in two pieces with a pause in between,
# so the reader regularly sees a half-written last line. rank_1 appears only after a while.
WRITER = r"""
import json, os, sys, time
out = sys.argv[1]
n = int(sys.argv[2])
os.makedirs(out, exist_ok=True)
files = {}
for step in range(1, n + 1):
    for rank in (0, 1):
        if rank == 1 and step < n // 3:
            continue
        if rank not in files:
            files[rank] = open(os.path.join(out, f"rank_{rank}.jsonl"), "a")
        rec = {"kind": "step", "time": time.time(), "rank": rank, "epoch": 0, "step": step, "loss": 1.0 / step,
               "lr": 0.1, "grad_norm": None, "loss_scale": 2.0 ** 10, "scale_window": 5, "overflow": step % 4 == 0,
               "step_time_ms": 1.0, "tokens_per_s": 2.0, "note": "x" * (step % 7)}
        line = json.dumps(rec) + "\n"
        cut = len(line) // 2
        files[rank].write(line[:cut]); files[rank].flush()
        time.sleep(0.004)
        files[rank].write(line[cut:]); files[rank].flush()
    if step % 10 == 0:
        for rank in files:
            files[rank].write(json.dumps({"kind": "moe_tokens", "time": time.time(), "rank": rank, "step": step,
                                          "layer": 0, "counts": [step, 2 * step, 0, 1]}) + "\n")
            files[rank].flush()
print("done", flush=True)
"""


def test_reader_follows_files_written_by_another_process(tmp_path):
    events = tmp_path / "events"
    n = 90
    reader = EventReader(events)  # the directory does not exist yet
    assert reader.poll() == 0 and reader.steps.empty
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(events), str(n)], stdout=subprocess.PIPE, text=True)
    try:
        counts = []
        while proc.poll() is None:
            reader.poll()
            steps = reader.steps
            counts.append(len(steps))
            # never a broken record: every row read so far is complete and valid
            assert steps["loss"].notna().all()
            assert (steps["loss"] == 1.0 / steps["step"]).all()
            time.sleep(0.01)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.poll()
    expected_rank1 = n - (n // 3 - 1)
    # some polls saw part of the records: the reader followed the files while they were written
    # (not a fixed sample: on a busy machine the writer may start late)
    assert counts == sorted(counts) and any(0 < c < n + expected_rank1 for c in counts)
    steps = reader.steps
    assert len(steps) == n + expected_rank1
    assert steps.groupby("rank")["step"].apply(list).to_dict() == {
        0: list(range(1, n + 1)), 1: list(range(n // 3, n + 1))}
    assert steps["overflow"].dtype == bool and steps["overflow"].sum() == (n // 4) + len(
        [s for s in range(n // 3, n + 1) if s % 4 == 0])
    assert steps["grad_norm"].isna().all()
    assert "note" in steps.columns  # extra fields become columns
    # every 10 steps, for the files that exist then: rank 0 at steps 10..90, rank 1 from step 30
    assert len(reader.moe_tokens) == 4 * (9 + 7)
    assert reader.bad_lines == 0


def test_partial_line_is_read_once_complete_and_a_thread_writer(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    path = events / "rank_0.jsonl"
    line = json.dumps(step_record(0, 1))
    reader = EventReader(events)
    with open(path, "w", encoding="utf-8") as f:
        f.write(line[:10])
        f.flush()
        assert reader.poll() == 0 and reader.steps.empty
        f.write(line[10:] + "\n" + json.dumps(step_record(0, 2))[:5])
        f.flush()
        assert reader.poll() == 1
        assert reader.steps["step"].tolist() == [1]
        f.write(json.dumps(step_record(0, 2))[5:] + "\n")
        f.flush()
    assert reader.poll() == 1
    assert reader.steps["step"].tolist() == [1, 2]

    # a thread appending while the reader polls from this thread
    stop = threading.Event()

    def write():
        with open(events / "rank_1.jsonl", "a", encoding="utf-8") as f:
            for step in range(1, 201):
                text = json.dumps(step_record(1, step)) + "\n"
                for i in range(0, len(text), 37):
                    f.write(text[i:i + 37])
                    f.flush()
        stop.set()

    thread = threading.Thread(target=write)
    thread.start()
    while not stop.is_set():
        reader.poll()
        assert reader.steps[reader.steps["rank"] == 1]["step"].tolist() == list(
            range(1, 1 + (reader.steps["rank"] == 1).sum()))
    thread.join()
    reader.poll()
    assert (reader.steps["rank"] == 1).sum() == 200


def test_bad_lines_truncation_and_unknown_kinds(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    path = events / "rank_3.jsonl"
    path.write_text(json.dumps(step_record(3, 1)) + "\nnot json\n[1, 2]\n" +
                    json.dumps({"kind": "custom", "time": 1.0, "value": 7}) + "\n" +
                    json.dumps({"time": 2.0}) + "\n")
    reader = read_events(tmp_path)  # a run/output directory works too
    assert reader.ranks == [3]
    assert len(reader.steps) == 1 and reader.bad_lines == 3
    assert reader.other["value"].tolist() == [7]
    path.write_text(json.dumps(step_record(3, 5)) + "\n")  # shorter: a new run replaced the file
    reader.poll()
    assert reader.steps["step"].tolist() == [5]


def test_frames_types_and_empty_frames(tmp_path):
    reader = EventReader(tmp_path / "nothing")
    reader.poll()
    for frame in (reader.steps, reader.evals, reader.moe_tokens, reader.checkpoints, reader.run_starts,
                  reader.run_ends):
        assert frame.empty
    assert list(reader.steps.columns[:4]) == ["rank", "epoch", "step", "time"]
    assert step_summary(reader.steps).empty
    assert moe_pivot(reader.moe_tokens).empty
    assert hot_experts(reader.moe_tokens) == {}
    assert moe_imbalance(reader.moe_tokens).empty
    assert reader.run_info()["status"] == "not started"


def write_run(events, records_by_rank):
    events.mkdir(parents=True, exist_ok=True)
    for rank, records in records_by_rank.items():
        with open(events / f"rank_{rank}.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                rec.setdefault("rank", rank)
                f.write(json.dumps(rec) + "\n")


def test_step_summary_over_pipeline_ranks(tmp_path):
    # ranks 0/1: first pipeline stage (loss null); ranks 2/3: last stage
    recs = {r: [] for r in range(4)}
    for step in (1, 2):
        for rank in range(4):
            recs[rank].append(step_record(rank, step, loss=None if rank < 2 else 2.0 + rank,
                                          overflow=(step == 2 and rank == 3), grad_norm=None if rank == 0 else 0.5,
                                          step_time_ms=100.0 + 10 * rank, lr=0.01 * (rank + 1)))
    write_run(tmp_path / "events", recs)
    reader = read_events(tmp_path / "events")
    summary = step_summary(reader.steps)
    assert summary["step"].tolist() == [1, 2]
    assert summary["loss"].tolist() == [4.5, 4.5]  # mean of rank 2's 4.0 and rank 3's 5.0
    assert summary["overflow"].tolist() == [False, True]
    assert summary["grad_norm"].tolist() == [0.5, 0.5]  # rank 0 reports none
    assert summary["step_time_ms"].tolist() == [130.0, 130.0]
    assert summary["lr"].tolist() == [0.01, 0.01]
    assert summary["ranks"].tolist() == [4, 4]


def test_run_info_and_statuses(tmp_path):
    start = {"kind": "run_start", "time": 5.0, "world_size": 2, "parallel": {"tp": 1, "dp": 2}, "config": {"a": 1}}
    write_run(tmp_path / "a", {0: [dict(start)], 1: [dict(start)]})
    info = read_events(tmp_path / "a").run_info()
    assert info["status"] == "running" and info["world_size"] == 2 and info["config"] == {"a": 1}
    end_ok = {"kind": "run_end", "time": 9.0, "status": "success", "error": None}
    end_bad = {"kind": "run_end", "time": 8.0, "status": "failed", "error": "boom"}
    write_run(tmp_path / "b", {0: [dict(start), dict(end_ok)], 1: [dict(start), dict(end_ok)]})
    assert read_events(tmp_path / "b").run_info()["status"] == "success"
    write_run(tmp_path / "c", {0: [dict(start), dict(end_ok)], 1: [dict(start), dict(end_bad)]})
    info = read_events(tmp_path / "c").run_info()
    assert info["status"] == "failed" and info["errors"] == {1: "boom"} and info["end_time"] == 9.0


def test_moe_pivot_hot_experts_and_imbalance_by_hand(tmp_path):
    recs = {
        0: [{"kind": "moe_tokens", "time": 1.0, "step": 1, "layer": 0, "counts": [4, 0, 2, 2]},
            {"kind": "moe_tokens", "time": 1.0, "step": 1, "layer": 11, "counts": [1, 1, 1, 1]},
            {"kind": "moe_tokens", "time": 2.0, "step": 2, "layer": 0, "counts": [1, 5, 1, 1]}],
        1: [{"kind": "moe_tokens", "time": 1.0, "step": 1, "layer": 0, "counts": [0, 0, 2, 2]},
            {"kind": "moe_tokens", "time": 2.0, "step": 2, "layer": 0, "counts": [1, 1, 1, 1]}],
    }
    write_run(tmp_path / "events", recs)
    moe = read_events(tmp_path / "events").moe_tokens
    assert list(moe.columns) == ["rank", "step", "layer", "expert", "tokens", "time"]
    assert len(moe) == 4 * 5
    table = moe_pivot(moe)
    assert table.loc[(0, 0)].tolist() == [4.0, 2.0]
    assert table.loc[(0, 1)].tolist() == [0.0, 6.0]
    assert moe_layer_matrix(moe, 0).shape == (4, 2)
    assert moe_pivot(moe, agg="mean").loc[(0, 2)].tolist() == [2.0, 1.0]
    assert moe_pivot(moe, ranks=[1]).loc[(0, 1)].tolist() == [0.0, 1.0]
    # layer 11 has step 1 only; it must not be mixed up with layer 1
    assert set(table.index.get_level_values("layer")) == {0, 11}
    with pytest.raises(KeyError, match="layer 1 "):
        moe_layer_matrix(moe, 1)
    with pytest.raises(ValueError, match="agg"):
        moe_pivot(moe, agg="max")

    # last step (2), layer 0 totals: [2, 6, 2, 2] -> hot expert 1, then ties broken by index
    assert hot_experts(moe, 1) == {0: [1], 11: [0]}
    assert hot_experts(moe, 2) == {0: [1, 0], 11: [0, 1]}
    assert hot_experts(moe, 2, step=1) == {0: [0, 2], 11: [0, 1]}  # step 1, layer 0: [4, 0, 4, 4]
    with pytest.raises(ValueError, match="hot_expert_num"):
        hot_experts(moe, 0)

    stats = moe_imbalance(moe).set_index(["layer", "step"])
    # layer 0 step 1: [4, 0, 4, 4], mean 3, max 4, std sqrt(((1+9+1+1)/4)) = sqrt(3)
    assert stats.loc[(0, 1), "tokens"] == 12
    assert stats.loc[(0, 1), "max_over_mean"] == pytest.approx(4 / 3)
    assert stats.loc[(0, 1), "cv"] == pytest.approx(np.sqrt(3) / 3)
    # layer 0 step 2: [2, 6, 2, 2], mean 3, std sqrt((1+9+1+1)/4) = sqrt(3)
    assert stats.loc[(0, 2), "max_over_mean"] == pytest.approx(2.0)
    assert stats.loc[(11, 1), "cv"] == pytest.approx(0.0)


def test_find_events_dir(tmp_path):
    run = tmp_path / "run"
    (run / "output" / "events").mkdir(parents=True)
    assert find_events_dir(run) == run / "output" / "events"
    (run / "output" / "events" / "rank_0.jsonl").write_text("")
    assert find_events_dir(run) == run / "output" / "events"
    assert find_events_dir(run / "output") == run / "output" / "events"
    assert find_events_dir(run / "output" / "events") == run / "output" / "events"


def test_nonfinite_values_and_the_engines_writer(tmp_path):
    """Records of mindspeed_ms.training.events.EventWriter read back, NaN/inf included."""
    events_mod = pytest.importorskip("mindspeed_ms.training.events")
    with events_mod.EventWriter(tmp_path, rank=0) as writer:
        writer.run_start(world_size=1, parallel={"tp": 1, "pp": 1, "dp": 1, "cp": 1, "ep": 1, "vpp": None},
                         config={"seed": 1})
        writer.step(0, 1, loss=float("nan"), lr=1e-3, grad_norm=float("inf"), loss_scale=1024.0, scale_window=2,
                    overflow=True, step_time_ms=40.0, tokens_per_s=100.0)
        writer.step(0, 2, loss=3.0, lr=1e-3, grad_norm=1.0, loss_scale=1024.0, scale_window=2,
                    overflow=False, step_time_ms=40.0, tokens_per_s=100.0)
        writer.run_end("success")
    reader = read_events(tmp_path)
    steps = reader.steps
    assert np.isnan(steps["loss"][0]) and steps["grad_norm"][0] == float("inf")
    assert steps["loss"][1] == 3.0 and steps["overflow"].tolist() == [True, False]
    assert reader.run_info()["status"] == "success"
    path = tmp_path / "events" / "rank_1.jsonl"
    path.write_text('{"kind": "moe_tokens", "time": 1, "rank": 1, "step": 1, "layer": 0, "counts": [1, null], '
                    '"nonfinite": {"counts.1": "inf"}}\n')
    reader.poll()
    assert reader.moe_tokens["tokens"].tolist() == [1.0, float("inf")]
