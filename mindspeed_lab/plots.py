"""Figures of a run (pure functions of DataFrames) and a live dashboard for notebooks.

Every ``*_figure`` function takes frames from :class:`mindspeed_lab.events.EventReader` (or
:mod:`mindspeed_lab.tuner`) and returns a new :class:`matplotlib.figure.Figure`; ``layout`` is the
matplotlib layout engine ('constrained' by default; None uses fixed margins, which draws about twice
as fast and is what the dashboard uses). The figures are
built with the object API, not pyplot: they are not registered with pyplot, so a notebook never
draws them a second time, they need no ``plt.close``, and they can be rendered in a background
thread. Empty frames give a figure that says it is waiting for data.

:class:`LiveDashboard` follows a job's event files (it never talks to the workers), redraws at a
bounded rate, and updates one output in place: ``display(Image, display_id=True)`` once, then
``handle.update(Image(png))``. The PNG is rendered explicitly with ``savefig``
because with ``MPLBACKEND=Agg`` ``display(fig)`` only produces text.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .events import EventReader, eval_summary, hot_experts, moe_imbalance, moe_pivot, step_summary

__all__ = [
    "loss_figure",
    "lr_figure",
    "grad_norm_figure",
    "throughput_figure",
    "training_figure",
    "loss_scale_figure",
    "moe_distribution_figure",
    "moe_imbalance_figure",
    "estimates_figure",
    "capacity_figure",
    "layout_runs_figure",
    "figure_png",
    "figure_rgba",
    "rgba_png",
    "stack_images",
    "save_figure",
    "show",
    "LiveDashboard",
    "PANELS",
    "PANEL_KINDS",
]

HOT_COLOR = "#d62728"
COLD_COLOR = "#1f77b4"
OVERFLOW_COLOR = "#d62728"


def _finish(fig: Figure, layout: Optional[str]) -> Figure:
    """Without a layout engine (cheaper to draw: the dashboard's choice), use fixed margins."""
    if layout is None:
        fig.subplots_adjust(left=0.08, right=0.9, bottom=0.12, top=0.88, wspace=0.4, hspace=0.55)
    return fig


def _marker(data: pd.DataFrame) -> Optional[str]:
    """Points are marked while there are few of them (a single step would otherwise be invisible)."""
    return "." if len(data) < 30 else None


def _waiting(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"waiting for {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def _summary(steps: pd.DataFrame) -> pd.DataFrame:
    return step_summary(steps) if "rank" in steps.columns else steps


def _eval_points(evals: pd.DataFrame) -> pd.DataFrame:
    return eval_summary(evals) if "rank" in evals.columns else evals


# ------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------

def _draw_loss(ax, summary: pd.DataFrame, evals: Optional[pd.DataFrame]) -> None:
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = summary.dropna(subset=["loss"]) if not summary.empty else summary
    if data.empty:
        _waiting(ax, "step events")
        return
    ax.plot(data["step"], data["loss"], label="train loss", color="#1f77b4", marker=_marker(data))
    if evals is not None and not evals.empty:
        ev = _eval_points(evals)
        ax.plot(ev["step"], ev["val_loss"], "o-", label="validation loss", color="#ff7f0e")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)


def _draw_series(ax, summary: pd.DataFrame, column: str, title: str, ylabel: str, color: str,
                 log: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data = summary.dropna(subset=[column]) if not summary.empty else summary
    if data.empty:
        _waiting(ax, f"{column} values")
        return
    ax.plot(data["step"], data[column], color=color, label=column, marker=_marker(data))
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def loss_figure(steps: pd.DataFrame, evals: Optional[pd.DataFrame] = None, figsize=(6, 4),
                layout: Optional[str] = "constrained") -> Figure:
    """Training loss over steps (mean over the ranks that report it), with the validation loss.

    Artists: a line labelled 'train loss'; with evals, a line with markers 'validation loss'.
    """
    fig = Figure(figsize=figsize, layout=layout)
    _draw_loss(fig.add_subplot(), _summary(steps), evals)
    return _finish(fig, layout)


def lr_figure(steps: pd.DataFrame, figsize=(6, 4), layout: Optional[str] = "constrained") -> Figure:
    """Learning rate over steps (one line, label 'lr')."""
    fig = Figure(figsize=figsize, layout=layout)
    _draw_series(fig.add_subplot(), _summary(steps), "lr", "learning rate", "lr", "#2ca02c")
    return _finish(fig, layout)


def grad_norm_figure(steps: pd.DataFrame, figsize=(6, 4), layout: Optional[str] = "constrained") -> Figure:
    """Gradient norm (before clipping) over steps; skipped steps have none (one line, 'grad_norm')."""
    fig = Figure(figsize=figsize, layout=layout)
    _draw_series(fig.add_subplot(), _summary(steps), "grad_norm", "gradient norm", "grad norm", "#9467bd")
    return _finish(fig, layout)


def throughput_figure(steps: pd.DataFrame, figsize=(6, 4), layout: Optional[str] = "constrained") -> Figure:
    """Tokens per second over steps (one line, 'tokens_per_s')."""
    fig = Figure(figsize=figsize, layout=layout)
    _draw_series(fig.add_subplot(), _summary(steps), "tokens_per_s", "throughput", "tokens/s", "#8c564b")
    return _finish(fig, layout)


def training_figure(steps: pd.DataFrame, evals: Optional[pd.DataFrame] = None, title: Optional[str] = None,
                    figsize=(11, 7), layout: Optional[str] = "constrained") -> Figure:
    """The four training curves in a 2x2 grid: loss (+ validation), learning rate, grad norm, throughput."""
    fig = Figure(figsize=figsize, layout=layout)
    axes = fig.subplots(2, 2)
    summary = _summary(steps)
    _draw_loss(axes[0, 0], summary, evals)
    _draw_series(axes[0, 1], summary, "lr", "learning rate", "lr", "#2ca02c")
    _draw_series(axes[1, 0], summary, "grad_norm", "gradient norm", "grad norm", "#9467bd")
    _draw_series(axes[1, 1], summary, "tokens_per_s", "throughput", "tokens/s", "#8c564b")
    if title:
        fig.suptitle(title)
    return _finish(fig, layout)


def loss_scale_figure(steps: pd.DataFrame, figsize=(9, 4), title: Optional[str] = None,
                      layout: Optional[str] = "constrained") -> Figure:
    """The loss scale on a log axis, overflow (skipped) steps marked, and the scale window.

    Artists: on the main axes (log y) a step line 'loss scale' and, when a step overflowed, a
    scatter 'overflow (step skipped)' at the scale that step reported; on a second y axis
    (``twinx``) a dashed step line 'scale window'.
    """
    fig = Figure(figsize=figsize, layout=layout)
    ax = fig.add_subplot()
    ax.set_title(title or "loss scale")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    summary = _summary(steps)
    data = summary.dropna(subset=["loss_scale"]) if not summary.empty else summary
    if data.empty:
        _waiting(ax, "loss-scale values")
        return _finish(fig, layout)
    ax.plot(data["step"], data["loss_scale"], drawstyle="steps-post", color="#1f77b4", label="loss scale")
    ax.set_yscale("log", base=2)
    ax.set_ylabel("loss scale (log)")
    over = data[data["overflow"].astype(bool)]
    handles, labels = ax.get_legend_handles_labels()
    if not over.empty:
        sc = ax.scatter(over["step"], over["loss_scale"], marker="v", s=40, color=OVERFLOW_COLOR, zorder=3,
                        label="overflow (step skipped)")
        handles.append(sc)
        labels.append("overflow (step skipped)")
    window = data.dropna(subset=["scale_window"]) if "scale_window" in data else data.iloc[:0]
    if not window.empty:
        ax2 = ax.twinx()
        (line,) = ax2.plot(window["step"], window["scale_window"], drawstyle="steps-post", linestyle="--",
                           color="#7f7f7f", label="scale window")
        ax2.set_ylabel("scale window (steps)")
        # from 0 and with headroom: a constant window is a level line in the middle, not an axis
        # zoomed onto one value
        ax2.set_ylim(0, 2 * float(window["scale_window"].max()) + 1)
        handles.append(line)
        labels.append("scale window")
    # 'best' keeps the legend off the scale line and the overflow markers (often top left)
    ax.legend(handles, labels, loc="best", framealpha=0.85)
    ax.grid(alpha=0.3)
    return _finish(fig, layout)


# ------------------------------------------------------------------------------------------------
# MoE token distribution
# ------------------------------------------------------------------------------------------------

def _layers(table: pd.DataFrame, layers: Optional[Iterable[int]], max_layers: int) -> List[int]:
    present = sorted(set(int(v) for v in table.index.get_level_values("layer")))
    if layers is not None:
        wanted = [int(v) for v in layers]
        missing = [v for v in wanted if v not in present]
        if missing:
            raise ValueError(f"layers {missing} have no moe_tokens records; present: {present}")
        return wanted
    return present[:max_layers]


def moe_distribution_figure(moe: pd.DataFrame, layers: Optional[Sequence[int]] = None, step: Optional[int] = None,
                            hot_expert_num: int = 1, agg: str = "auto", max_layers: int = 8,
                            row_height: float = 2.4, layout: Optional[str] = "constrained") -> Figure:
    """Per MoE layer: an experts x steps heatmap of routed tokens, and the bars of one step.

    Args:
        moe: Long frame from :attr:`EventReader.moe_tokens`.
        layers: Layers to draw (default: the first ``max_layers`` present).
        step: The step of the bar charts (default: the last one).
        hot_expert_num: Number of hot experts highlighted in the bars (most tokens at ``step``).
        agg: How ranks combine ('auto', 'sum' or 'mean'; see :func:`mindspeed_lab.events.moe_pivot`).
        max_layers: Cap on the number of rows.
        row_height: Inches per layer row.

    Artists: per layer row, an image (``imshow``, with a colorbar) on the left and a bar
    container on the right whose hot bars have color :data:`HOT_COLOR` and the rest
    :data:`COLD_COLOR`.
    """
    table = moe_pivot(moe, agg=agg)
    if table.empty:
        fig = Figure(figsize=(10, 3), layout=layout)
        ax = fig.add_subplot()
        ax.set_axis_off()
        _waiting(ax, "moe_tokens events")
        return _finish(fig, layout)
    chosen = _layers(table, layers, max_layers)
    fig = Figure(figsize=(11, row_height * len(chosen) + 0.6), layout=layout)
    axes = np.atleast_2d(fig.subplots(len(chosen), 2, width_ratios=[3, 2], squeeze=False))
    hot = hot_experts(moe, hot_expert_num, step=step, agg=agg)
    for row, layer in enumerate(chosen):
        matrix = table.loc[layer]
        experts = [int(e) for e in matrix.index]
        steps_ = [int(s) for s in matrix.columns]
        ax_h, ax_b = axes[row]
        image = ax_h.imshow(matrix.to_numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                            extent=(steps_[0] - 0.5, steps_[-1] + 0.5, experts[0] - 0.5, experts[-1] + 0.5))
        fig.colorbar(image, ax=ax_h, label="tokens")
        ax_h.set_title(f"layer {layer}: tokens per expert")
        ax_h.set_xlabel("step")
        ax_h.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_h.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_h.set_ylabel("expert")
        col = matrix.columns.max() if step is None else step
        counts = matrix[col].to_numpy() if col in matrix.columns else np.zeros(len(experts))
        hot_set = set(hot.get(layer, []))
        colors = [HOT_COLOR if e in hot_set else COLD_COLOR for e in experts]
        ax_b.bar(experts, counts, color=colors)
        ax_b.set_title(f"layer {layer}, step {col}  (hot: {sorted(hot_set)})")
        ax_b.set_xlabel("expert")
        ax_b.set_ylabel("tokens")
        ax_b.set_xticks(experts)
        mean = counts.mean() if len(counts) else 0.0
        ax_b.axhline(mean, color="gray", linestyle=":", label="mean")
    return _finish(fig, layout)


def moe_imbalance_figure(moe: pd.DataFrame, hot_expert_num: int = 1, agg: str = "auto", step: Optional[int] = None,
                         figsize=(13, 4), layout: Optional[str] = "constrained") -> Figure:
    """Load imbalance per layer over steps, and the current step's expert shares with hot experts boxed.

    Axes: (1) busiest expert's load / mean load per layer over steps (one line per layer,
    'layer L'); (2) coefficient of variation per layer over steps; (3) an image layers x
    experts of each expert's share of the layer's tokens at ``step`` (default: last), with a
    :class:`~matplotlib.patches.Rectangle` around every hot expert.
    """
    fig = Figure(figsize=figsize, layout=layout)
    ax_ratio, ax_cv, ax_share = fig.subplots(1, 3, width_ratios=[1, 1, 1.2])
    stats = moe_imbalance(moe, agg=agg)
    ax_ratio.set_title("max / mean expert load")
    ax_cv.set_title("coefficient of variation")
    ax_share.set_title("share of tokens (hot experts boxed)")
    if stats.empty:
        for ax in (ax_ratio, ax_cv, ax_share):
            _waiting(ax, "moe_tokens events")
        return _finish(fig, layout)
    for layer, group in stats.groupby("layer"):
        ax_ratio.plot(group["step"], group["max_over_mean"], label=f"layer {layer}")
        ax_cv.plot(group["step"], group["cv"], label=f"layer {layer}")
    ax_ratio.axhline(1.0, color="gray", linestyle=":")
    for ax in (ax_ratio, ax_cv):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    table = moe_pivot(moe, agg=agg)
    layers = sorted(set(int(v) for v in table.index.get_level_values("layer")))
    col = table.columns.max() if step is None else step
    num_experts = max(len(table.loc[layer]) for layer in layers)
    share = np.full((len(layers), num_experts), np.nan)
    for i, layer in enumerate(layers):
        counts = table.loc[layer][col].to_numpy() if col in table.columns else np.zeros(0)
        total = counts.sum()
        if total > 0:
            share[i, : len(counts)] = counts / total
    image = ax_share.imshow(share, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
    fig.colorbar(image, ax=ax_share, label=f"share at step {col}")
    ax_share.set_xlabel("expert")
    ax_share.set_ylabel("layer")
    ax_share.set_xticks(range(num_experts))
    ax_share.set_yticks(range(len(layers)), [str(v) for v in layers])
    for i, layer in enumerate(layers):
        for expert in hot_experts(moe, hot_expert_num, step=col, agg=agg).get(layer, []):
            ax_share.add_patch(Rectangle((expert - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#2ca02c", linewidth=2))
    return _finish(fig, layout)


# ------------------------------------------------------------------------------------------------
# Tuner
# ------------------------------------------------------------------------------------------------

def estimates_figure(estimates: pd.DataFrame, memory_limit_gb: Optional[float] = None, top: int = 10,
                     figsize=(8, 5), layout: Optional[str] = "constrained") -> Figure:
    """Estimated step time against estimated memory per rank, one point per layout.

    Args:
        estimates: A frame from :func:`mindspeed_lab.tuner.estimate_layouts`.
        memory_limit_gb: Draws a vertical line at the device memory.
        top: The fastest ``top`` layouts are labelled.

    Artists: one scatter (points colored by pipeline size) and annotations for the fastest.
    """
    fig = Figure(figsize=figsize, layout=layout)
    ax = fig.add_subplot()
    ax.set_title("estimated step time vs memory per rank")
    ax.set_xlabel("memory per rank (GB)")
    ax.set_ylabel("step time (s)")
    if estimates.empty:
        _waiting(ax, "layouts")
        return _finish(fig, layout)
    sc = ax.scatter(estimates["total_gb"], estimates["step_time_s"], c=estimates["pp"], cmap="viridis", s=25,
                    alpha=0.8)
    fig.colorbar(sc, ax=ax, label="pp")
    if memory_limit_gb is not None:
        ax.axvline(memory_limit_gb, color=HOT_COLOR, linestyle="--", label="device memory")
        ax.legend()
    for _, row in estimates.nsmallest(top, "step_time_s").iterrows():
        ax.annotate(row["layout"], (row["total_gb"], row["step_time_s"]), fontsize=7, alpha=0.8,
                    xytext=(3, 3), textcoords="offset points")
    ax.grid(alpha=0.3)
    return _finish(fig, layout)


def capacity_figure(moe: pd.DataFrame, max_drop: float = 0.01, last_steps: Optional[int] = None,
                    factors: Optional[Sequence[float]] = None, figsize=(7, 4),
                    layout: Optional[str] = "constrained") -> Figure:
    """Fraction of routed tokens dropped against the capacity factor, one line per MoE layer.

    A dotted horizontal line marks ``max_drop`` and a dashed vertical line per layer the smallest
    factor below it (:func:`mindspeed_lab.moe.capacity_for_drop`).

    Artists: one line per layer labelled ``layer L``, the ``max_drop`` line, and one vertical line
    per layer labelled ``layer L: <factor>``.
    """
    from .moe import capacity_curve, capacity_for_drop  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=figsize, layout=layout)
    ax = fig.add_subplot()
    ax.set_title(f"tokens dropped vs capacity factor (target < {max_drop:.1%})")
    ax.set_xlabel("moe_expert_capacity_factor")
    ax.set_ylabel("dropped / routed tokens")
    curve = capacity_curve(moe, factors, last_steps=last_steps) if not moe.empty else pd.DataFrame()
    if curve.empty:
        _waiting(ax, "moe_tokens events")
        return _finish(fig, layout)
    suggestion = capacity_for_drop(moe, max_drop, last_steps=last_steps).set_index("layer")
    colors = [f"C{i}" for i in range(10)]
    for i, (layer, group) in enumerate(curve.groupby("layer")):
        color = colors[i % len(colors)]
        ax.plot(group["capacity_factor"], group["drop_fraction"], color=color, label=f"layer {layer}")
        if layer in suggestion.index:
            factor = suggestion.loc[layer, "capacity_factor"]
            ax.axvline(factor, color=color, linestyle="--", alpha=0.7, label=f"layer {layer}: {factor:.2f}")
    ax.axhline(max_drop, color="gray", linestyle=":", label=f"{max_drop:.1%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _finish(fig, layout)


def layout_runs_figure(runs, figsize=(13, 4), layout: Optional[str] = "constrained") -> Figure:
    """Real runs of several layouts (:func:`mindspeed_lab.tuner.run_layouts`) next to the estimates.

    Axes: (1) the loss curves of every layout on one plot (different markers, so curves that
    coincide stay visible); (2) step time, measured and estimated, per layout (log axis: the
    estimates are for the model's FLOPs and traffic, the measurement includes every overhead);
    (3) memory per rank: peak RSS of a worker and the estimate (log axis).
    """
    fig = Figure(figsize=figsize, layout=layout)
    ax_loss, ax_time, ax_mem = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    ax_loss.set_title(f"loss (max difference {runs.max_loss_diff():.2e})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    markers = ["o", "x", "s", "^", "v", "+", "D", "*"]
    for i, name in enumerate(runs.curves.columns):
        series = runs.curves[name].dropna()
        ax_loss.plot(series.index, series.to_numpy(), marker=markers[i % len(markers)], linestyle="-" if i == 0 else "--",
                     label=name, alpha=0.85)
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")
    table = runs.table
    x = np.arange(len(table))
    names = table["layout"].tolist()
    for ax, measured, estimated, title, unit in (
            (ax_time, table["step_time_s"], table["est_step_time_s"], "step time", "s"),
            (ax_mem, table["peak_rss_gb"], table["est_memory_gb"], "memory per rank", "GB")):
        ax.bar(x - 0.2, measured, width=0.4, label="measured", color="#1f77b4")
        ax.bar(x + 0.2, estimated, width=0.4, label="estimated", color="#ff7f0e")
        ax.set_xticks(x, names, rotation=20, fontsize="small")
        ax.set_yscale("log")
        ax.set_title(f"{title} ({unit}, log)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
    return _finish(fig, layout)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def figure_rgba(fig: Figure, dpi: int = 80) -> np.ndarray:
    """Render a figure to an RGBA ``uint8`` array (height x width x 4)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    array = np.asarray(canvas.buffer_rgba()).copy()
    _close_if_pyplot(fig)
    return array


def rgba_png(array: np.ndarray) -> bytes:
    """Encode an RGBA array as PNG bytes."""
    from matplotlib.image import imsave  # pylint: disable=import-outside-toplevel
    buf = io.BytesIO()
    imsave(buf, array, format="png")
    return buf.getvalue()


def stack_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack RGBA images vertically, left-aligned on a white background."""
    if not arrays:
        return np.full((1, 1, 4), 255, dtype=np.uint8)
    width = max(a.shape[1] for a in arrays)
    rows = []
    for array in arrays:
        if array.shape[1] < width:
            pad = np.full((array.shape[0], width - array.shape[1], 4), 255, dtype=np.uint8)
            array = np.concatenate([array, pad], axis=1)
        rows.append(array)
    return np.concatenate(rows, axis=0)


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """Render a figure to PNG bytes (works under any backend, in any thread)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _close_if_pyplot(fig)
    return buf.getvalue()


def show(fig: Figure, dpi: int = 80, width: Optional[int] = None) -> None:
    """Display a figure in a notebook as a PNG image.

    ``display(fig)`` shows nothing but text when ``MPLBACKEND=Agg`` is set (as in headless runs),
    and a pyplot-free figure has no inline hook: rendering it to PNG works everywhere.
    """
    from IPython.display import display  # pylint: disable=import-outside-toplevel
    from IPython.display import Image  # pylint: disable=import-outside-toplevel
    display(Image(data=figure_png(fig, dpi=dpi), format="png", width=width))


def save_figure(fig: Figure, path: Union[str, os.PathLike], dpi: int = 100) -> Path:
    """Write a figure to ``path`` (atomically: a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    os.replace(tmp, path)
    _close_if_pyplot(fig)
    return path


def _close_if_pyplot(fig: Figure) -> None:
    """Figures made by user panels through pyplot must be closed, or the notebook draws them again."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def _panel_training(reader: EventReader, title: Optional[str]) -> Figure:
    return training_figure(reader.step_summary(), reader.evals, title=title, layout=None)


class _LiveTrainingPanel:
    """The dashboard's training panel: built once, then redrawn with new data on the same artists.

    Building the four axes (ticks, labels, legend) is most of a redraw's cost; while the panel's
    structure stays the same (which series have data, whether there are validation points,
    whether points are marked) only the lines' data, the limits and the title change. A change
    of structure builds the figure again with :func:`training_figure`.
    """

    _SERIES = (("loss", "train loss"), ("lr", "lr"), ("grad_norm", "grad_norm"), ("tokens_per_s", "tokens_per_s"))

    def __init__(self):
        self.figure: Optional[Figure] = None
        self._structure: Optional[tuple] = None
        self._lines: Dict[str, Any] = {}

    @staticmethod
    def _structure_of(summary: pd.DataFrame, evals: pd.DataFrame, title: Optional[str]) -> tuple:
        present = tuple(bool(column in summary and summary[column].notna().any())
                        for column, _ in _LiveTrainingPanel._SERIES)
        return present + (not evals.empty, len(summary) < 30, bool(title))

    def __call__(self, reader: EventReader, title: Optional[str]) -> Figure:
        summary = reader.step_summary()
        evals = reader.evals
        structure = self._structure_of(summary, evals, title)
        if self.figure is None or structure != self._structure:
            self.figure = training_figure(summary, evals, title=title, layout=None)
            self._structure = structure
            self._lines = {line.get_label(): line for ax in self.figure.axes for line in ax.get_lines()}
            return self.figure
        for column, label in self._SERIES:
            line = self._lines.get(label)
            if line is not None:
                data = summary.dropna(subset=[column])
                line.set_data(data["step"].to_numpy(), data[column].to_numpy())
        if "validation loss" in self._lines:
            ev = _eval_points(evals)
            self._lines["validation loss"].set_data(ev["step"].to_numpy(), ev["val_loss"].to_numpy())
        for ax in self.figure.axes:
            ax.relim()
            ax.autoscale_view()
        if title:
            self.figure.suptitle(title)  # replaces the text of the existing title
        return self.figure


def _panel_loss_scale(reader: EventReader, title: Optional[str]) -> Figure:  # pylint: disable=unused-argument
    return loss_scale_figure(reader.step_summary(), layout=None)


def _panel_moe(reader: EventReader, title: Optional[str]) -> Figure:  # pylint: disable=unused-argument
    return moe_distribution_figure(reader.moe_tokens, layout=None)


def _panel_moe_imbalance(reader: EventReader, title: Optional[str]) -> Figure:  # pylint: disable=unused-argument
    return moe_imbalance_figure(reader.moe_tokens, layout=None)


#: Named dashboard panels: ``name -> function(reader, title) -> Figure``.
PANELS: Dict[str, Callable[[EventReader, Optional[str]], Figure]] = {
    "training": _panel_training,
    "loss_scale": _panel_loss_scale,
    "moe": _panel_moe,
    "moe_imbalance": _panel_moe_imbalance,
}
#: Event kinds each built-in panel draws: a panel is redrawn only when those changed (the
#: training panel also when the job's status changes: its title shows it).
PANEL_KINDS: Dict[str, tuple] = {
    "training": ("step", "eval"),
    "loss_scale": ("step",),
    "moe": ("moe_tokens",),
    "moe_imbalance": ("moe_tokens",),
}
_MOE_PANELS = ("moe", "moe_imbalance")


def _ipython_display(obj):
    from IPython.display import display  # pylint: disable=import-outside-toplevel
    return display(obj, display_id=True)


def _ipython_image(png: bytes):
    from IPython.display import Image  # pylint: disable=import-outside-toplevel
    return Image(data=png, format="png")


def _lower_thread_priority(increment: int) -> None:
    """Raise the calling thread's ``nice`` value by ``increment`` (Linux: per thread; elsewhere a no-op)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except (AttributeError, OSError):  # pragma: no cover - no permission or no such call
        pass


class LiveDashboard:
    """Live plots of a run, read from its event files and redrawn at a bounded rate.

    Args:
        source: A :class:`mindspeed_lab.launcher.Job` (the dashboard stops when it ends), an
            events/run/output directory, or an :class:`EventReader`.
        panels: Names from :data:`PANELS` or ``(name, function(reader, title) -> Figure)``
            pairs. Default: training curves, the loss scale (left out once steps arrive without
            one: the run does not scale its loss), and the MoE panels once ``moe_tokens`` events
            appear.
        interval_s: Smallest time between the starts of two redraws (>= 0.2 s; default 1 s, so
            that with the CPU bound below a step reaches the plot within about 2 s, see
            docs/performance.md).
        max_cpu_fraction: Upper bound on the CPU time spent drawing, as a share of one core:
            after a redraw that used r seconds of CPU the next one waits at least
            ``r / max_cpu_fraction``.
        nice: How much lower than the caller's the scheduling priority of the thread that
            :meth:`start` runs is (Linux ``nice`` increment; 0 leaves it). Training processes
            keep the cores when they need them and the drawing uses what they leave: measured on
            2 cores, drawing at 25 % of a core added ~6.5 % to the step time at the same
            priority and nothing measurable at ``nice`` 10 (docs/performance.md).
        dpi: PNG resolution.
        display: ``display(obj) -> handle`` with ``handle.update(obj)``; default IPython's
            ``display(obj, display_id=True)``. Pass ``False`` to render without displaying.
        image: ``image(png_bytes) -> obj`` for ``display``; default ``IPython.display.Image``.
        save_dir: Also write each panel as ``<save_dir>/<panel>.png`` when it is redrawn.

    The panels are stacked into one image, shown once and then replaced in place (one output,
    whatever panels appear later). A panel is redrawn only when the events it draws changed
    (built-in panels, see :data:`PANEL_KINDS`; custom panels on any new event). Use in a notebook cell:
    ``dash = job.dashboard(); dash.run()`` (blocks until the job ends, redrawing in place), or
    ``dash.start()`` to redraw from a background thread while the cell returns; ``dash.stop()``
    ends it.
    """

    def __init__(self, source: Any, panels: Optional[Sequence[Union[str, tuple]]] = None, interval_s: float = 1.0,
                 max_cpu_fraction: float = 0.25, nice: int = 10, dpi: int = 80, display: Any = None,
                 image: Optional[Callable[[bytes], Any]] = None, save_dir: Optional[Union[str, os.PathLike]] = None):
        if not interval_s >= 0.2:
            raise ValueError(f"interval_s must be >= 0.2 (redraws are bounded), got {interval_s!r}")
        if not 0 < max_cpu_fraction <= 1:
            raise ValueError(f"max_cpu_fraction must be in (0, 1], got {max_cpu_fraction!r}")
        self.job = None
        if isinstance(source, EventReader):
            self.reader = source
        elif hasattr(source, "events_dir") and hasattr(source, "status"):
            self.job = source
            self.reader = EventReader(source.events_dir)
        elif isinstance(source, (str, os.PathLike)):
            self.reader = EventReader(source)
        else:
            raise TypeError(f"source must be a Job, a directory or an EventReader, got {type(source).__name__}")
        self._auto_moe = panels is None
        self.panels: Dict[str, Callable] = {}
        self._kinds: Dict[str, Optional[tuple]] = {}
        for item in (panels if panels is not None else ("training", "loss_scale", "moe", "moe_imbalance")):
            if isinstance(item, str):
                if item not in PANELS:
                    raise ValueError(f"unknown panel {item!r}; known panels: {sorted(PANELS)}")
                # the training panel keeps its figure between redraws: one per dashboard
                self.panels[item] = _LiveTrainingPanel() if item == "training" else PANELS[item]
                self._kinds[item] = PANEL_KINDS[item]
            else:
                name, fn = item
                self.panels[str(name)] = fn
                self._kinds[str(name)] = None
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an integer in [0, 19], got {nice!r}")
        self.interval_s = float(interval_s)
        self.max_cpu_fraction = float(max_cpu_fraction)
        self.nice = nice
        self.dpi = dpi
        self._display = _ipython_display if display is None else display
        self._image = image or _ipython_image
        self.save_dir = Path(save_dir) if save_dir is not None else None
        #: The display handle of the dashboard's one output (None until first shown).
        self.handle: Any = None
        self._arrays: Dict[str, np.ndarray] = {}
        self.redraws = 0
        self.last_render_s: Optional[float] = None
        self.last_render_cpu_s: Optional[float] = None
        self._next_draw = 0.0
        self._drawn: Dict[str, Any] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.error: Optional[BaseException] = None

    def _title(self) -> str:
        summary = self.reader.step_summary()
        parts = []
        if self.job is not None:
            parts.append(f"{self.job.name}: {self.job.status}")
        if not summary.empty:
            last = summary.iloc[-1]
            parts.append(f"step {int(last['step'])}")
            if pd.notna(last["loss"]):
                parts.append(f"loss {last['loss']:.4f}")
            if pd.notna(last["tokens_per_s"]):
                parts.append(f"{last['tokens_per_s']:.0f} tokens/s")
        return "  |  ".join(parts)

    def _active_panels(self) -> List[str]:
        names = list(self.panels)
        if self._auto_moe and not self.reader.counts().get("moe_tokens"):
            names = [n for n in names if n not in _MOE_PANELS]
        if self._auto_moe and self._without_loss_scale():
            names = [n for n in names if n != "loss_scale"]
        return names

    def _without_loss_scale(self) -> bool:
        """Whether the run reports steps but no loss scale (it trains without loss scaling)."""
        steps = self.reader.steps
        return not steps.empty and "loss_scale" in steps and not steps["loss_scale"].notna().any()

    def _panel_key(self, name: str, status: Optional[str]) -> tuple:
        key = self.reader.change_key(self._kinds[name])
        return key + ((status,) if name == "training" or self._kinds[name] is None else ())

    def _render_arrays(self, names: Sequence[str]) -> None:
        title = self._title()
        for name in names:
            array = figure_rgba(self.panels[name](self.reader, title), dpi=self.dpi)
            self._arrays[name] = array
            if self.save_dir is not None:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                path = self.save_dir / f"{name}.png"
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(rgba_png(array))
                os.replace(tmp, path)

    def render(self, names: Optional[Sequence[str]] = None) -> Dict[str, bytes]:
        """Poll the events and render panels (default: every active one) to PNG bytes; no display."""
        self.reader.poll()
        names = self._active_panels() if names is None else list(names)
        self._render_arrays(names)
        return {name: rgba_png(self._arrays[name]) for name in names}

    def image_png(self) -> bytes:
        """The dashboard's single image: the active panels as last rendered, stacked vertically."""
        return rgba_png(stack_images([self._arrays[n] for n in self._active_panels() if n in self._arrays]))

    def update(self, force: bool = False) -> bool:
        """Redraw the panels whose events changed (all with ``force``), unless the last redraw is
        too recent (see ``interval_s`` and ``max_cpu_fraction``), and replace the displayed image.
        Returns whether it drew."""
        if not force and time.monotonic() < self._next_draw:
            return False
        self.reader.poll()
        status = self.job.status if self.job is not None else None
        names = [n for n in self._active_panels()
                 if force or n not in self._drawn or self._drawn[n] != self._panel_key(n, status)]
        if not names:
            return False
        keys = {n: self._panel_key(n, status) for n in names}
        started, t0, cpu0 = time.monotonic(), time.perf_counter(), time.thread_time()
        self._render_arrays(names)
        png = self.image_png()
        self.last_render_s = time.perf_counter() - t0
        # the bound is on CPU time: at a lower priority a redraw's wall time also counts the
        # time it waited for a core, which costs the run nothing
        self.last_render_cpu_s = time.thread_time() - cpu0
        # counted from this redraw's start: a step that arrives while it renders waits at most
        # one period plus one redraw (counted from the end it would wait for two redraws)
        self._next_draw = started + max(self.interval_s, self.last_render_cpu_s / self.max_cpu_fraction)
        self._drawn.update(keys)
        self.redraws += 1
        if self._display is False:
            return True
        obj = self._image(png)
        if self.handle is None:
            self.handle = self._display(obj)
        else:
            self.handle.update(obj)
        return True

    def _finished(self) -> bool:
        return self.job is not None and self.job.done

    def run(self, timeout: Optional[float] = None) -> None:
        """Redraw until the job ends (or ``timeout`` seconds, or :meth:`stop`), then draw once more.

        Without a job, runs until ``timeout`` or :meth:`stop`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                self.update()
                if self._finished():
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._stop.wait(min(max(0.05, self._next_draw - time.monotonic()), self.interval_s))
        finally:
            self._next_draw = 0.0
            self.update()

    def start(self) -> "LiveDashboard":
        """Show the dashboard now, then redraw it from a daemon thread (returns at once).

        The first drawing happens in the calling thread, so the output belongs to the calling
        notebook cell; the thread only replaces it (output created from a thread would land in
        whichever cell is executing at that moment).
        """
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the dashboard is already running; call stop() first")
        self._stop.clear()
        self.update(force=True)

        def target():
            try:
                _lower_thread_priority(self.nice)
                self.run()
            except BaseException as exc:  # pylint: disable=broad-except
                self.error = exc

        self._thread = threading.Thread(target=target, name="mindspeed-dashboard", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background redraws (after one final redraw of what changed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for the background thread (it ends when the job ends)."""
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()
