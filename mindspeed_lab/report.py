"""A run's plots as PNG files and a short HTML summary, from its event files.

``write_report(DIR)`` (and ``python -m mindspeed_lab report DIR``) reads the events of a run
directory, output directory or events directory and writes, into ``out_dir`` (default: ``DIR``):
``training.png``, ``loss_scale.png``, ``moe_tokens.png``, ``moe_imbalance.png`` and
``moe_capacity.png`` (the last three only when the run recorded MoE token counts),
``top_operators.csv`` (only for a profiled run: ``training_config.profile``; also a table in the
page) and ``summary.html``.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from .events import eval_summary, find_events_dir, hot_experts, moe_imbalance, read_events, step_summary
from .plots import (capacity_figure, loss_scale_figure, moe_distribution_figure, moe_imbalance_figure, save_figure,
                    training_figure)

__all__ = ["summarize", "write_report"]


def _num(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def summarize(reader) -> Dict[str, Any]:
    """Key numbers of a run from an :class:`~mindspeed_lab.events.EventReader` (already polled).

    Returns:
        ``status``, ``world_size``, ``parallel``, ``steps`` (last step), ``first_loss``,
        ``final_loss``, ``final_val_loss``, ``mean_tokens_per_s``, ``mean_step_time_ms``,
        ``overflow_steps``, ``final_loss_scale``, ``checkpoints``, ``duration_s``, ``errors``,
        ``hot_experts`` (last step, top 1 per layer), ``max_over_mean`` (last step, per layer),
        ``capacity_factor_1pct`` (per layer, the smallest capacity factor that would drop fewer
        than 1 % of the routed tokens over the run's last 10 steps).
    """
    info = reader.run_info()
    summary = step_summary(reader.steps)
    losses = summary["loss"].dropna()
    evals = eval_summary(reader.evals)
    out: Dict[str, Any] = {
        "status": info["status"], "world_size": info["world_size"], "parallel": info["parallel"],
        "steps": int(summary["step"].max()) if not summary.empty else 0,
        "first_loss": _num(losses.iloc[0]) if len(losses) else None,
        "final_loss": _num(losses.iloc[-1]) if len(losses) else None,
        "final_val_loss": _num(evals["val_loss"].iloc[-1]) if not evals.empty else None,
        "mean_tokens_per_s": _num(summary["tokens_per_s"].mean()) if not summary.empty else None,
        "mean_step_time_ms": _num(summary["step_time_ms"].mean()) if not summary.empty else None,
        "overflow_steps": int(summary["overflow"].sum()) if not summary.empty else 0,
        "final_loss_scale": _num(summary["loss_scale"].dropna().iloc[-1])
        if not summary.empty and summary["loss_scale"].notna().any() else None,
        "checkpoints": int(reader.checkpoints["step"].nunique()) if not reader.checkpoints.empty else 0,
        "duration_s": (info["end_time"] - info["start_time"])
        if info["end_time"] is not None and info["start_time"] is not None else None,
        "errors": info["errors"],
        "hot_experts": hot_experts(reader.moe_tokens, 1) if not reader.moe_tokens.empty else {},
    }
    stats = moe_imbalance(reader.moe_tokens)
    if not stats.empty:
        last = stats[stats["step"] == stats["step"].max()]
        out["max_over_mean"] = {int(r.layer): float(r.max_over_mean) for r in last.itertuples()}
        from .moe import capacity_for_drop  # pylint: disable=import-outside-toplevel
        table = capacity_for_drop(reader.moe_tokens, 0.01, last_steps=10)
        out["capacity_factor_1pct"] = {int(r.layer): float(r.capacity_factor) for r in table.itertuples()
                                       if r.layer >= 0}
    else:
        out["max_over_mean"] = {}
        out["capacity_factor_1pct"] = {}
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


def _top_operators_of(profile: Path, n: int = 15):
    """The slowest operator types of the run's profiled steps (rank 0, else the first rank
    profiled), or None when the run was not profiled (``training_config.profile``)."""
    if not profile.is_dir():
        return None
    from .profiling import profile_runs, top_operators  # pylint: disable=import-outside-toplevel

    ranks = sorted(profile.glob("rank_*"), key=lambda p: (not p.name == "rank_0", p.name))
    for where in ranks + [profile]:
        if profile_runs(where):
            try:
                return top_operators(where, n=n)
            except FileNotFoundError:
                return None  # stopped without analysis (profile_offline_analyse)
    return None


def write_report(path: Union[str, os.PathLike], out_dir: Optional[Union[str, os.PathLike]] = None,
                 dpi: int = 100) -> Dict[str, Path]:
    """Write the plots and ``summary.html`` of the run at ``path``.

    Args:
        path: A run directory, output directory or events directory.
        out_dir: Where to write (default: ``path``).
        dpi: PNG resolution.

    Returns:
        ``{name: path}`` of the files written (``summary`` is the HTML page).

    Raises:
        FileNotFoundError: When no ``rank_*.jsonl`` file is found under ``path``.
    """
    path = Path(path)
    events_dir = find_events_dir(path)
    if not any(events_dir.glob("rank_*.jsonl")):
        raise FileNotFoundError(f"no events (rank_*.jsonl) under {str(path)!r}: give a run directory, its output "
                                "directory or its events directory")
    out = Path(out_dir) if out_dir is not None else path
    out.mkdir(parents=True, exist_ok=True)
    reader = read_events(events_dir)
    facts = summarize(reader)
    files: Dict[str, Path] = {}
    files["training"] = save_figure(training_figure(reader.steps, reader.evals), out / "training.png", dpi=dpi)
    files["loss_scale"] = save_figure(loss_scale_figure(reader.steps), out / "loss_scale.png", dpi=dpi)
    if not reader.moe_tokens.empty:
        files["moe_tokens"] = save_figure(moe_distribution_figure(reader.moe_tokens), out / "moe_tokens.png", dpi=dpi)
        files["moe_imbalance"] = save_figure(moe_imbalance_figure(reader.moe_tokens), out / "moe_imbalance.png",
                                             dpi=dpi)
        files["moe_capacity"] = save_figure(capacity_figure(reader.moe_tokens, 0.01, last_steps=10),
                                            out / "moe_capacity.png", dpi=dpi)

    config = reader.run_info()["config"]
    training = (config or {}).get("training_config") or {}
    operators = _top_operators_of(Path(training.get("profile_save_path") or events_dir.parent / "profile"))
    operators_html = ""
    if operators is not None:
        csv_path = out / "top_operators.csv"
        operators.to_csv(csv_path, index=False)
        files["top_operators"] = csv_path
        operators_html = ("<h2>top operators (profiled steps)</h2>"
                          + operators.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))

    job_file = next((p for p in (path / "job.json", path.parent / "job.json", events_dir.parent.parent / "job.json")
                     if p.is_file()), None)
    job = json.loads(job_file.read_text()) if job_file else {}
    rows = [("run", str(path.resolve())), ("status", facts["status"])]
    if job:
        rows += [("job", job.get("name")), ("launcher status", job.get("status")),
                 ("launcher error", job.get("error"))]
    rows += [(key.replace("_", " "), facts[key]) for key in
             ("world_size", "parallel", "steps", "first_loss", "final_loss", "final_val_loss", "mean_tokens_per_s",
              "mean_step_time_ms", "overflow_steps", "final_loss_scale", "checkpoints", "duration_s", "errors",
              "hot_experts", "max_over_mean", "capacity_factor_1pct")]
    table = "\n".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    images = "\n".join(f'<h2>{html.escape(name.replace("_", " "))}</h2><img src="{html.escape(p.name)}" alt="{name}">'
                       for name, p in files.items() if p.suffix == ".png")
    config_html = (f"<h2>config</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>"
                   if config else "")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mindspeed_lab report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}th{{text-align:left;padding-right:1em}}
td,th{{border-bottom:1px solid #ddd;padding:2px 6px}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>Run summary</h1>
<table>
{table}
</table>
{images}
{operators_html}
{config_html}
<p><small>written by mindspeed_lab {stamp}</small></p>
</body></html>
"""
    summary_path = out / "summary.html"
    tmp = out / "summary.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, summary_path)
    files["summary"] = summary_path
    return files
