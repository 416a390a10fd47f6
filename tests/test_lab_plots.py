"""mindspeed_lab.plots: figures carry the expected artists; the dashboard redraws in place, bounded."""

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from mindspeed_lab.events import read_events
from mindspeed_lab.plots import (COLD_COLOR, HOT_COLOR, LiveDashboard, estimates_figure, figure_png, grad_norm_figure,
                                 loss_figure, loss_scale_figure, lr_figure, moe_distribution_figure,
                                 moe_imbalance_figure, save_figure, throughput_figure, training_figure)
from mindspeed_lab.tuner import ModelSpec, estimate_layouts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_events(events: Path, steps=6, ranks=2, layers=(0, 1), experts=4, overflow_steps=(3,)):
    events.mkdir(parents=True, exist_ok=True)
    scale, window = 1024.0, 2
    rng = np.random.default_rng(0)
    files = {r: open(events / f"rank_{r}.jsonl", "a", encoding="utf-8") for r in range(ranks)}  # noqa: SIM115
    try:
        for step in range(1, steps + 1):
            over = step in overflow_steps
            scale = scale / 2 if over else scale * 2
            window = 1 if over else window + 1
            for r, f in files.items():
                f.write(json.dumps({"kind": "step", "time": step, "rank": r, "epoch": 0, "step": step,
                                    "loss": 5.0 / step, "lr": 1e-3 * step, "grad_norm": None if over else 1.0,
                                    "loss_scale": scale, "scale_window": window, "overflow": over,
                                    "step_time_ms": 50.0, "tokens_per_s": 2000.0 + step}) + "\n")
                for layer in layers:
                    counts = rng.integers(0, 20, size=experts).tolist()
                    counts[step % experts] = 100  # one clearly hot expert per step
                    f.write(json.dumps({"kind": "moe_tokens", "time": step, "rank": r, "step": step,
                                        "layer": layer, "counts": counts}) + "\n")
                if step % 3 == 0:
                    f.write(json.dumps({"kind": "eval", "time": step, "rank": r, "step": step,
                                        "val_loss": 6.0 / step}) + "\n")
    finally:
        for f in files.values():
            f.close()


@pytest.fixture
def run(tmp_path):
    write_events(tmp_path / "events")
    return read_events(tmp_path / "events")


def labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_training_figures(run):
    fig = training_figure(run.steps, run.evals, title="demo")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    loss_ax = fig.axes[0]
    assert labels(loss_ax) == ["train loss", "validation loss"]
    train, val = loss_ax.get_lines()
    assert train.get_xdata().tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(train.get_ydata(), [5.0 / s for s in range(1, 7)])
    assert val.get_xdata().tolist() == [3, 6]
    assert fig._suptitle.get_text() == "demo"  # pylint: disable=protected-access
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "gradient norm", "throughput"]
    # grad norm: overflowed step 3 has none
    assert fig.axes[2].get_lines()[0].get_xdata().tolist() == [1, 2, 4, 5, 6]
    for fn, label in ((lr_figure, "lr"), (grad_norm_figure, "grad_norm"), (throughput_figure, "tokens_per_s")):
        single = fn(run.steps)
        assert len(single.axes) == 1 and labels(single.axes[0]) == [label]
    assert labels(loss_figure(run.steps).axes[0]) == ["train loss"]


def test_loss_scale_figure_marks_overflows_and_window(run):
    fig = loss_scale_figure(run.steps)
    ax, twin = fig.axes
    assert ax.get_yscale() == "log"
    assert labels(ax) == ["loss scale"]
    assert ax.get_lines()[0].get_drawstyle() == "steps-post"
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(scatters) == 1 and scatters[0].get_label() == "overflow (step skipped)"
    np.testing.assert_allclose(scatters[0].get_offsets(), [[3, 2048.0]])  # 2048 at step 1, 4096, halved at 3
    assert labels(twin) == ["scale window"]
    assert twin.get_lines()[0].get_ydata().tolist() == [3, 4, 1, 2, 3, 4]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["loss scale", "overflow (step skipped)", "scale window"]


def test_moe_distribution_figure(run):
    fig = moe_distribution_figure(run.moe_tokens, hot_expert_num=1)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2  # one heatmap per layer
    assert all(isinstance(im, AxesImage) and im.get_array().shape == (4, 6) for im in images)
    bars = [c for ax in fig.axes for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2
    for container in bars:
        colors = [tuple(np.round(p.get_facecolor()[:3], 3)) for p in container.patches]
        hot = [i for i, c in enumerate(colors) if c == tuple(np.round(_rgb(HOT_COLOR), 3))]
        assert hot == [6 % 4]  # the last step's hot expert
        assert sum(c == tuple(np.round(_rgb(COLD_COLOR), 3)) for c in colors) == 3
    one = moe_distribution_figure(run.moe_tokens, layers=[1], step=2, hot_expert_num=2)
    assert len([im for ax in one.axes for im in ax.get_images()]) == 1
    with pytest.raises(ValueError, match="layers"):
        moe_distribution_figure(run.moe_tokens, layers=[7])


def _rgb(color):
    from matplotlib.colors import to_rgb  # pylint: disable=import-outside-toplevel
    return to_rgb(color)


def test_moe_imbalance_figure(run):
    fig = moe_imbalance_figure(run.moe_tokens, hot_expert_num=2)
    ratio_ax, cv_ax, share_ax = fig.axes[:3]
    assert labels(ratio_ax)[:2] == ["layer 0", "layer 1"]
    assert labels(cv_ax) == ["layer 0", "layer 1"]
    assert all(len(line.get_xdata()) == 6 for line in cv_ax.get_lines())
    assert share_ax.get_images()[0].get_array().shape == (2, 4)
    boxes = [p for p in share_ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 2 * 2  # hot experts per layer x layers
    assert all(ratio >= 1.0 for line in ratio_ax.get_lines()[:2] for ratio in line.get_ydata())


def test_empty_frames_give_waiting_figures(tmp_path):
    empty = read_events(tmp_path / "none")
    for fig in (training_figure(empty.steps, empty.evals), loss_scale_figure(empty.steps),
                moe_distribution_figure(empty.moe_tokens), moe_imbalance_figure(empty.moe_tokens)):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("waiting for") for t in texts)
        assert figure_png(fig).startswith(PNG_MAGIC)


def test_estimates_figure_and_saving(tmp_path):
    model = ModelSpec(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=100)
    table = estimate_layouts(model, 4)
    fig = estimates_figure(table, memory_limit_gb=1.0, top=3)
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == len(table)
    assert len(ax.texts) == 3
    path = save_figure(fig, tmp_path / "x" / "est.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


class FakeHandle:
    def __init__(self, log):
        self.log = log

    def update(self, obj):
        self.log.append(("update", obj))


def test_dashboard_updates_in_place_at_a_bounded_rate(tmp_path):
    events = tmp_path / "events"
    log = []
    dash = LiveDashboard(tmp_path, interval_s=0.3, display=lambda obj: log.append(("display", obj)) or FakeHandle(log),
                         image=lambda png: png, save_dir=tmp_path / "png", dpi=30)
    # nothing yet: the training and loss-scale panels, stacked into the one output
    assert dash.update(force=True)
    assert [kind for kind, _ in log] == ["display"]
    stop = threading.Event()

    def writer():
        for _ in range(10):
            write_events(events, steps=1, ranks=1)
            time.sleep(0.1)
        stop.set()

    thread = threading.Thread(target=writer)
    t0 = time.monotonic()
    thread.start()
    dash.start()
    thread.join()
    time.sleep(0.5)
    dash.stop()
    elapsed = time.monotonic() - t0
    assert not dash.running and dash.error is None
    displays = [obj for kind, obj in log if kind == "display"]
    assert len(displays) == 1  # one output, replaced in place, also when the MoE panels appeared
    assert all(obj.startswith(PNG_MAGIC) for _, obj in log)
    first, last = _png_size(log[0][1]), _png_size(log[-1][1])
    assert last[1] > first[1]  # taller: the MoE panels were stacked below
    assert 2 <= dash.redraws <= elapsed / 0.3 + 3  # bounded by interval_s
    assert sorted(os.listdir(tmp_path / "png")) == ["loss_scale.png", "moe.png", "moe_imbalance.png", "training.png"]
    assert dash.update() is False  # nothing new: no redraw


def _png_size(png):
    """(width, height) from the PNG header."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_dashboard_stops_when_the_job_ends(tmp_path):
    write_events(tmp_path / "events", steps=3)

    class FakeJob:
        name = "fake"
        events_dir = tmp_path / "events"
        status = "running"
        done = False

    job = FakeJob()
    dash = LiveDashboard(job, interval_s=0.2, display=False, panels=["training"])
    dash.start()
    time.sleep(0.5)
    assert dash.running
    job.status, job.done = "succeeded", True
    dash.join(timeout=10)
    assert not dash.running
    assert dash.redraws >= 2  # the first one and the final one after the job ended
    png = dash.render()["training"]
    assert png.startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="interval_s"):
        LiveDashboard(job, interval_s=0.01)
    with pytest.raises(ValueError, match="unknown panel"):
        LiveDashboard(job, panels=["nope"])


NOTEBOOK_CELL = """
import json, os, threading, time
from mindspeed_lab.plots import LiveDashboard
events = {events!r}
os.makedirs(events, exist_ok=True)
def write():
    with open(os.path.join(events, "rank_0.jsonl"), "a") as f:
        for step in range(1, 8):
            f.write(json.dumps({{"kind": "step", "time": step, "rank": 0, "epoch": 0, "step": step, "loss": 1.0 / step,
                                "lr": 0.1, "grad_norm": 1.0, "loss_scale": 2.0 ** step, "scale_window": 2,
                                "overflow": False, "step_time_ms": 1.0, "tokens_per_s": 1.0}}) + "\\n")
            f.flush()
            time.sleep(0.3)
threading.Thread(target=write).start()
dash = LiveDashboard(events, interval_s=0.5)
dash.run(timeout=3.5)
print("redraws", dash.redraws)
"""


@pytest.mark.notebook
def test_dashboard_in_a_real_kernel_updates_one_output(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(NOTEBOOK_CELL.format(events=str(tmp_path / "events"))))
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # the case where display(fig) would give text only
    try:
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(Path(__file__).resolve().parents[1])}}).execute()
    finally:
        if env_backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backend
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if o.get("output_type") == "display_data"]
    assert len(images) == 1, [o.get("output_type") for o in outputs]  # one output, updated in place
    assert all("image/png" in o["data"] for o in images)
    redraws = int([o for o in outputs if o.get("output_type") == "stream"][0]["text"].split()[-1])
    assert redraws >= 2  # the first one and at least one update of the same outputs


BACKGROUND_CELL = """
import json, os, threading, time
from mindspeed_lab.plots import LiveDashboard
events = {events!r}
os.makedirs(events, exist_ok=True)
def write():
    with open(os.path.join(events, "rank_0.jsonl"), "a") as f:
        for step in range(1, 8):
            f.write(json.dumps({{"kind": "step", "time": step, "rank": 0, "epoch": 0, "step": step, "loss": 1.0 / step,
                                "lr": 0.1, "grad_norm": 1.0, "loss_scale": 2.0 ** step, "scale_window": 2,
                                "overflow": False, "step_time_ms": 1.0, "tokens_per_s": 1.0}}) + "\\n")
            f.flush()
            time.sleep(0.3)
writer = threading.Thread(target=write)
writer.start()
dash = LiveDashboard(events, interval_s=0.5, panels=["loss_scale"])
dash.start()
"""

LATER_CELL = """
import hashlib
writer.join()
time.sleep(1.0)
dash.stop()
print(dash.redraws, hashlib.md5(dash.image_png()).hexdigest())
"""


@pytest.mark.notebook
def test_dashboard_thread_keeps_its_output_in_the_calling_cell(tmp_path):
    """start() shows the image in the cell that called it; the thread's redraws replace it there,
    also while later cells run."""
    import base64  # pylint: disable=import-outside-toplevel
    import hashlib  # pylint: disable=import-outside-toplevel
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(BACKGROUND_CELL.format(events=str(tmp_path / "events"))))
    nb.cells.append(nbformat.v4.new_code_cell(LATER_CELL))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(__file__).resolve().parents[1])}}).execute()
    first = [o for o in nb.cells[0].outputs if o.get("output_type") == "display_data"]
    assert len(first) == 1
    assert not [o for o in nb.cells[1].outputs if o.get("output_type") == "display_data"]
    redraws, digest = [o for o in nb.cells[1].outputs if o.get("output_type") == "stream"][0]["text"].split()
    assert int(redraws) >= 2
    # the output in the first cell is the dashboard's last image
    assert hashlib.md5(base64.b64decode(first[0]["data"]["image/png"])).hexdigest() == digest


def _step_record(step, loss):
    return json.dumps({"kind": "step", "time": step, "rank": 0, "epoch": 0, "step": step, "loss": loss, "lr": 1e-3,
                       "grad_norm": 1.0, "loss_scale": None, "scale_window": None, "overflow": False,
                       "step_time_ms": 50.0, "tokens_per_s": 1000.0}) + "\n"


def test_training_panel_redraws_new_data_on_the_same_figure(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    path = events / "rank_0.jsonl"
    path.write_text("".join(_step_record(s, 10.0 / s) for s in range(1, 41)))
    dash = LiveDashboard(tmp_path, display=False, dpi=30)
    dash.update(force=True)
    panel = dash.panels["training"]
    figure = panel.figure
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(_step_record(s, 10.0 / s) for s in range(41, 61)))
    assert dash.update(force=True)
    assert panel.figure is figure  # the same figure, new data on its lines
    loss_ax = figure.axes[0]
    (train,) = [line for line in loss_ax.get_lines() if line.get_label() == "train loss"]
    np.testing.assert_array_equal(train.get_xdata(), np.arange(1, 61))
    np.testing.assert_allclose(train.get_ydata(), 10.0 / np.arange(1, 61))
    assert loss_ax.get_xlim()[1] >= 60  # the limits follow the data
    assert "step 60" in figure.get_suptitle()
    # a validation point changes the panel's structure: the figure is built again, with it
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "eval", "time": 61, "rank": 0, "step": 60, "val_loss": 0.5}) + "\n")
    assert dash.update(force=True)
    assert panel.figure is not figure
    assert "validation loss" in labels(panel.figure.axes[0])
    # a second dashboard has its own panel
    assert LiveDashboard(tmp_path, display=False).panels["training"] is not panel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_dashboard_thread_draws_at_a_lower_priority(tmp_path):
    write_events(tmp_path / "events", steps=2, ranks=1)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    dash = LiveDashboard(tmp_path, display=False, dpi=30, nice=5).start()
    try:
        deadline = time.monotonic() + 10
        while dash._thread.native_id is None and time.monotonic() < deadline:  # pylint: disable=protected-access
            time.sleep(0.01)
        tid = dash._thread.native_id  # pylint: disable=protected-access
        expected = min(19, base + 5)
        while os.getpriority(os.PRIO_PROCESS, tid) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.getpriority(os.PRIO_PROCESS, tid) == expected
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller keeps its own
        assert dash.last_render_cpu_s is not None and dash.last_render_cpu_s > 0
    finally:
        dash.stop()


@pytest.mark.parametrize("nice", [-1, 20, 2.5, True])
def test_dashboard_rejects_a_bad_nice(tmp_path, nice):
    with pytest.raises(ValueError, match=r"nice must be an integer in \[0, 19\]"):
        LiveDashboard(tmp_path, display=False, nice=nice)
