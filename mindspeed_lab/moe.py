"""Offline MoE analysis: token counts of a finished run, hot/cold experts and capacity factors.

Counts come from a run's ``moe_tokens`` events or from the ``layer-<L>_<step>.npy`` files of the
token-distribution tool (:func:`load_token_counts` reads either), as a long frame with the
columns of :attr:`mindspeed_lab.events.EventReader.moe_tokens`. From there:

* :func:`global_counts`: one (layer, step) x expert table of the whole global batch;
* :func:`hot_expert_suggestions`: for a ``hot_expert_num``, which experts would be hot (the
  cold/hot monitor's rule: the most tokens in the latest step), how much of the traffic they
  take, and how stable that choice was over the last steps;
* :func:`capacity_for_drop`: the smallest ``moe_expert_capacity_factor`` that drops fewer than a
  given fraction of the routed tokens, per layer (and :func:`drop_fraction` /
  :func:`capacity_curve` for any factor);
* :func:`write_synthetic_run`: a recorded-looking run (event files and npy files) with a router
  that starts skewed and is balanced over time, for notebooks and tests while no MoE run is at hand.

Capacity, as the MoE layer computes it (``moe_utils.get_capacity``): an expert takes at most
``ceil(topk * tokens * factor / num_experts)`` tokens of a batch, where ``topk * tokens`` is the
sum of the batch's counts; with cold/hot experts the cold ones take ``floor(capacity *
cold_token_percent)``. The counts the engine records are summed over the micro batches and ranks
of a step, so the analysis treats a step as one batch: smaller local batches fluctuate more, so
the real drop rate is at least the estimate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd

from .events import MOE_COLUMNS, EventReader, find_events_dir, moe_pivot

__all__ = [
    "load_token_counts",
    "global_counts",
    "hot_expert_suggestions",
    "drop_fraction",
    "capacity_curve",
    "capacity_for_drop",
    "cold_token_percent_for_drop",
    "write_synthetic_run",
]

PathLike = Union[str, os.PathLike]


def _npy_dir(path: Path) -> Optional[Path]:
    """The directory holding layer-<L>_<step>.npy files at or below ``path`` (None if none)."""
    from mindspeed_ms.tools.moe_token_distribution import FILE_PATTERN  # pylint: disable=import-outside-toplevel

    for candidate in (path, path / "token_distribution", path / "output" / "token_distribution"):
        if candidate.is_dir() and any(FILE_PATTERN.match(p.name) for p in candidate.iterdir()):
            return candidate
    return None


def load_token_counts(path: Union[PathLike, EventReader, pd.DataFrame], source: str = "auto") -> pd.DataFrame:
    """Per-expert token counts of a run as a long frame (rank, step, layer, expert, tokens, time).

    Args:
        path: A run, output or events directory; a directory of ``layer-<L>_<step>.npy`` files
            (or a run/output directory holding ``token_distribution/``); an EventReader; or
            such a frame already (returned as is).
        source: 'events', 'npy' or 'auto' (events when there are moe_tokens events, else npy).

    Returns:
        The long frame; rows from npy files have rank 0 and time NaN.

    Raises:
        ValueError: Unknown ``source``.
        FileNotFoundError: When the chosen source has no counts under ``path``.
    """
    if source not in ("auto", "events", "npy"):
        raise ValueError(f"source: got {source!r}; allowed: 'auto', 'events' or 'npy'")
    if isinstance(path, pd.DataFrame):
        return path
    if isinstance(path, EventReader):
        path.poll()
        return path.moe_tokens
    path = Path(path)
    if source in ("auto", "events"):
        events_dir = find_events_dir(path)
        if any(events_dir.glob("rank_*.jsonl")):
            reader = EventReader(events_dir)
            reader.poll()
            if not reader.moe_tokens.empty or source == "events":
                if reader.moe_tokens.empty:
                    raise FileNotFoundError(f"no moe_tokens events under {str(path)!r}")
                return reader.moe_tokens
        elif source == "events":
            raise FileNotFoundError(f"no event files (rank_*.jsonl) under {str(path)!r}")
    npy = _npy_dir(path)
    if npy is None:
        raise FileNotFoundError(f"no MoE token counts under {str(path)!r}: neither moe_tokens events nor "
                                "layer-<L>_<step>.npy files (moe_config.save_token_distribution records them)")
    from mindspeed_ms.tools.moe_token_distribution import load_token_distribution  # pylint: disable=import-outside-toplevel

    rows = []
    for layer, (steps, counts) in load_token_distribution(npy).items():
        for step, vector in zip(steps, counts):
            for expert, tokens in enumerate(vector):
                rows.append((0, int(step), int(layer), expert, int(tokens), float("nan")))
    frame = pd.DataFrame(rows, columns=MOE_COLUMNS)
    return frame.astype({"rank": "int64", "step": "int64", "layer": "int64", "expert": "int64", "tokens": "int64"})


def global_counts(moe: pd.DataFrame, agg: str = "auto", last_steps: Optional[int] = None) -> pd.DataFrame:
    """The global batch's counts: a (layer, step) x expert table of tokens.

    Args:
        moe: The long frame (:func:`load_token_counts`).
        agg: How ranks combine (see :func:`mindspeed_lab.events.moe_pivot`).
        last_steps: Keep only the last this many steps of every layer.
    """
    table = moe_pivot(moe, agg=agg)
    if table.empty:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=["layer", "step"]), dtype="float64")
    out = table.stack().unstack("expert", fill_value=0).sort_index()
    out.columns.name = "expert"
    if last_steps is not None:
        if isinstance(last_steps, bool) or not isinstance(last_steps, int) or last_steps < 1:
            raise ValueError(f"last_steps: got {last_steps!r}; allowed: an integer >= 1 or None")
        out = out.groupby(level="layer", group_keys=False).apply(lambda g: g.iloc[-last_steps:])
    return out


def _hot_of(vector: np.ndarray, k: int) -> List[int]:
    order = sorted(range(len(vector)), key=lambda e: (-vector[e], e))
    return sorted(order[:k])


def hot_expert_suggestions(moe: pd.DataFrame, hot_expert_num: int, window: int = 10) -> pd.DataFrame:
    """Which experts would be hot with ``hot_expert_num`` replicas, per layer.

    The cold/hot monitor picks the experts with the most tokens in the latest step (ties: lower
    index). Over the last ``window`` steps this also says how much of the traffic the hot set
    would take and how often the choice would have been the same.

    Args:
        moe: The long frame.
        hot_expert_num: Hot experts per layer (1 .. num_experts).
        window: Steps looked at for the share and the stability.

    Returns:
        One row per layer: ``layer``, ``num_experts``, ``hot_experts`` (list, ascending),
        ``cold_experts``, ``hot_share_last`` (the hot experts' share of the last step's tokens),
        ``hot_share_window`` (of the window's tokens), ``uniform_share`` (hot_expert_num /
        num_experts: the share under perfect balance), ``stability`` (fraction of the window's
        steps whose own hot set equals the last one), ``max_over_mean_last``.

    Raises:
        ValueError: ``hot_expert_num`` or ``window`` not a positive integer, or more hot experts
            than a layer has.
    """
    for name, value in (("hot_expert_num", hot_expert_num), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 1")
    table = global_counts(moe, last_steps=window)
    rows = []
    for layer, block in table.groupby(level="layer"):
        matrix = block.to_numpy(dtype="float64")
        experts = matrix.shape[1]
        if hot_expert_num > experts:
            raise ValueError(f"hot_expert_num: got {hot_expert_num}; allowed: at most num_experts={experts} "
                             f"(layer {layer})")
        hot = _hot_of(matrix[-1], hot_expert_num)
        same = sum(_hot_of(row, hot_expert_num) == hot for row in matrix)
        last_total, window_total = matrix[-1].sum(), matrix.sum()
        mean_last = last_total / experts
        rows.append({
            "layer": int(layer), "num_experts": experts, "hot_experts": hot,
            "cold_experts": [e for e in range(experts) if e not in hot],
            "hot_share_last": float(matrix[-1, hot].sum() / last_total) if last_total else float("nan"),
            "hot_share_window": float(matrix[:, hot].sum() / window_total) if window_total else float("nan"),
            "uniform_share": hot_expert_num / experts,
            "stability": same / len(matrix),
            "max_over_mean_last": float(matrix[-1].max() / mean_last) if mean_last else float("nan"),
        })
    return pd.DataFrame(rows, columns=["layer", "num_experts", "hot_experts", "cold_experts", "hot_share_last",
                                       "hot_share_window", "uniform_share", "stability", "max_over_mean_last"])


def _dropped(matrix: np.ndarray, factor: float, hot: Optional[Sequence[int]] = None,
             cold_token_percent: float = 1.0) -> np.ndarray:
    """Tokens dropped per step (rows of ``matrix``: steps x experts) at a capacity factor."""
    experts = matrix.shape[1]
    totals = matrix.sum(axis=1)
    capacity = np.ceil(totals * float(factor) / experts)
    caps = np.repeat(capacity[:, None], experts, axis=1)
    if hot is not None:
        cold = [e for e in range(experts) if e not in set(hot)]
        caps[:, cold] = np.floor(caps[:, cold] * float(cold_token_percent))
    return np.clip(matrix - caps, 0, None).sum(axis=1)


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}; allowed: a finite number > 0")
    return float(value)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}: got {value!r}; allowed: a fraction in [0, 1)")
    return float(value)


def drop_fraction(moe: pd.DataFrame, capacity_factor: float, last_steps: Optional[int] = None,
                  hot_experts: Optional[Dict[int, Sequence[int]]] = None,
                  cold_token_percent: float = 1.0) -> Dict[int, float]:
    """Fraction of the routed tokens a capacity factor would drop, per layer.

    Args:
        moe: The long frame.
        capacity_factor: ``moe_expert_capacity_factor`` (> 0).
        last_steps: Only the last this many steps (default: all).
        hot_experts: ``{layer: [hot experts]}``: those keep the full capacity, the others get
            ``cold_token_percent`` of it (the cold/hot expert feature).
        cold_token_percent: The cold experts' share of the capacity.

    Returns:
        ``{layer: dropped tokens / routed tokens}`` over the steps considered.
    """
    factor = _check_factor("capacity_factor", capacity_factor)
    table = global_counts(moe, last_steps=last_steps)
    out = {}
    for layer, block in table.groupby(level="layer"):
        matrix = block.to_numpy(dtype="float64")
        hot = None if hot_experts is None else hot_experts.get(int(layer))
        total = matrix.sum()
        out[int(layer)] = float(_dropped(matrix, factor, hot, cold_token_percent).sum() / total) if total else 0.0
    return out


def capacity_curve(moe: pd.DataFrame, factors: Optional[Iterable[float]] = None,
                   last_steps: Optional[int] = None) -> pd.DataFrame:
    """Drop fraction against capacity factor: columns ``capacity_factor``, ``layer``, ``drop_fraction``.

    Args:
        moe: The long frame.
        factors: Factors to evaluate (default: 0.5 .. 3.0 in steps of 0.05).
        last_steps: Only the last this many steps.
    """
    factors = list(np.round(np.arange(0.5, 3.0001, 0.05), 4)) if factors is None else list(factors)
    rows = []
    for factor in factors:
        for layer, frac in drop_fraction(moe, factor, last_steps=last_steps).items():
            rows.append((float(factor), layer, frac))
    return pd.DataFrame(rows, columns=["capacity_factor", "layer", "drop_fraction"])


def _smallest(predicate, high: float, resolution: float) -> float:
    """Smallest value in (0, high] (rounded up to ``resolution``) where the monotone predicate holds."""
    low = 0.0
    if not predicate(high):
        return float("nan")
    for _ in range(60):
        mid = (low + high) / 2
        if predicate(mid):
            high = mid
        else:
            low = mid
        if high - low < resolution / 4:
            break
    value = math.ceil(high / resolution - 1e-9) * resolution
    # rounding up can only lower the drops (monotone), so the rounded value still satisfies it
    return round(value, 6)


def capacity_for_drop(moe: pd.DataFrame, max_drop: float = 0.01, last_steps: Optional[int] = None,
                      resolution: float = 0.01) -> pd.DataFrame:
    """The smallest capacity factor that drops at most ``max_drop`` of the routed tokens, per layer.

    Args:
        moe: The long frame.
        max_drop: Allowed fraction of dropped tokens, in [0, 1) (0.01: fewer than 1 %).
        last_steps: Only the last this many steps (the router changes during training; the late
            steps say more about the rest of a run).
        resolution: The factor is rounded up to a multiple of this.

    Returns:
        One row per layer: ``layer``, ``capacity_factor`` (the suggestion), ``drop_fraction`` (at
        that factor), ``max_over_mean`` (the largest per-step max/mean load: the factor that
        never drops anything is at most this), plus a row ``layer = -1`` for the factor that
        serves every layer (the config has one factor for all layers).
    """
    max_drop = _check_fraction("max_drop", max_drop)
    table = global_counts(moe, last_steps=last_steps)
    rows = []
    for layer, block in table.groupby(level="layer"):
        matrix = block.to_numpy(dtype="float64")
        total = matrix.sum()
        experts = matrix.shape[1]
        if not total:
            continue

        def ok(factor, m=matrix, t=total):
            return _dropped(m, factor).sum() / t <= max_drop

        factor = _smallest(ok, float(experts), resolution)
        means = matrix.sum(axis=1) / experts
        ratio = float(np.max(np.where(means > 0, matrix.max(axis=1) / np.where(means > 0, means, 1), 0)))
        rows.append({"layer": int(layer), "capacity_factor": factor,
                     "drop_fraction": float(_dropped(matrix, factor).sum() / total), "max_over_mean": ratio})
    frame = pd.DataFrame(rows, columns=["layer", "capacity_factor", "drop_fraction", "max_over_mean"])
    if not frame.empty:
        overall = float(frame["capacity_factor"].max())
        drops = drop_fraction(moe, overall, last_steps=last_steps)
        frame = pd.concat([frame, pd.DataFrame([{"layer": -1, "capacity_factor": overall,
                                                 "drop_fraction": max(drops.values()),
                                                 "max_over_mean": float(frame["max_over_mean"].max())}])],
                          ignore_index=True)
    return frame


def cold_token_percent_for_drop(moe: pd.DataFrame, hot_expert_num: int, capacity_factor: float,
                                max_drop: float = 0.01, window: int = 10, resolution: float = 0.01) -> pd.DataFrame:
    """With ``hot_expert_num`` hot experts at ``capacity_factor``, the smallest
    ``cold_token_percent`` (cold experts' share of the capacity) that drops at most ``max_drop``.

    The hot experts are the ones :func:`hot_expert_suggestions` names (decided at the last step,
    applied to the last ``window`` steps).

    Returns:
        One row per layer: ``layer``, ``hot_experts``, ``cold_token_percent`` (NaN when even
        1.0 drops too much: raise the capacity factor), ``drop_fraction`` at that value.
    """
    factor = _check_factor("capacity_factor", capacity_factor)
    max_drop = _check_fraction("max_drop", max_drop)
    hot_table = hot_expert_suggestions(moe, hot_expert_num, window=window)
    table = global_counts(moe, last_steps=window)
    rows = []
    for layer, block in table.groupby(level="layer"):
        matrix = block.to_numpy(dtype="float64")
        total = matrix.sum()
        hot = hot_table.set_index("layer").loc[int(layer), "hot_experts"]

        def ok(percent, m=matrix, t=total, h=hot):
            return t == 0 or _dropped(m, factor, h, percent).sum() / t <= max_drop

        percent = _smallest(ok, 1.0, resolution)
        drop = (float(_dropped(matrix, factor, hot, percent).sum() / total)
                if total and not math.isnan(percent) else float("nan"))
        rows.append({"layer": int(layer), "hot_experts": hot, "cold_token_percent": percent, "drop_fraction": drop})
    return pd.DataFrame(rows, columns=["layer", "hot_experts", "cold_token_percent", "drop_fraction"])


# ------------------------------------------------------------------------------------------------
# A synthetic run
# ------------------------------------------------------------------------------------------------

def write_synthetic_run(output_dir: PathLike, steps: int = 40, layers: int = 2, num_experts: int = 8,
                        topk: int = 2, tokens_per_step: int = 2048, ranks: int = 2, seed: int = 0,
                        balance_steps: Optional[int] = None, npy: bool = True) -> Path:
    """Write a recorded-looking MoE run: event files (as the engine writes them) and npy files.

    The router starts skewed (a few popular experts per layer, different ones per layer) and an
    auxiliary-loss-like pull evens it out over ``balance_steps``, with noise per step; the loss
    falls as in a short training run. Every rank writes the same global counts, as the engine
    does after all-reducing them.

    Args:
        output_dir: Where ``events/rank_<r>.jsonl`` and ``token_distribution/`` go.
        steps: Training steps.
        layers: MoE layers.
        num_experts: Experts per layer.
        topk: Experts per token (each token counts ``topk`` times).
        tokens_per_step: Tokens of the global batch per step.
        ranks: Ranks writing events.
        seed: Random seed.
        balance_steps: Steps over which the imbalance decays (default: ``steps`` / 2).
        npy: Also write ``token_distribution/layer-<L>_<step>.npy``.

    Returns:
        ``output_dir`` as a Path.
    """
    from mindspeed_ms.training.events import EventWriter  # pylint: disable=import-outside-toplevel

    for name, value in (("steps", steps), ("layers", layers), ("num_experts", num_experts), ("topk", topk),
                        ("tokens_per_step", tokens_per_step), ("ranks", ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 1")
    if topk > num_experts:
        raise ValueError(f"topk: got {topk}; allowed: at most num_experts={num_experts}")
    out = Path(output_dir)
    rng = np.random.default_rng(seed)
    balance = balance_steps or max(1, steps // 2)
    # a few popular experts per layer: a Zipf-like popularity in a layer-specific order
    base = [rng.permutation(num_experts) for _ in range(layers)]
    popularity = [np.empty(num_experts) for _ in range(layers)]
    for layer in range(layers):
        popularity[layer][base[layer]] = 1.0 / np.arange(1, num_experts + 1) ** 1.2
    writers = [EventWriter(out, r) for r in range(ranks)]
    config = {"moe_config": {"num_experts": num_experts, "moe_router_topk": topk},
              "model_config": {"num_layers": layers}, "synthetic": True}
    for r, writer in enumerate(writers):
        writer.run_start(ranks, {"tp": 1, "pp": 1, "dp": ranks, "cp": 1, "ep": 1, "vpp": None}, config,
                         training_iters=steps)
    if npy:
        from mindspeed_ms.tools.moe_token_distribution import save_token_distribution  # pylint: disable=import-outside-toplevel
    for step in range(1, steps + 1):
        mix = math.exp(-step / balance)
        loss = 4.2 * math.exp(-step / (steps * 1.5)) + 0.3 * rng.random() * mix
        for r, writer in enumerate(writers):
            writer.step(0, step, loss, 1e-3, 1.0, None, None, False, 500.0, tokens_per_step / 0.5)
        for layer in range(layers):
            probs = mix * popularity[layer] / popularity[layer].sum() + (1 - mix) / num_experts
            probs = probs * rng.uniform(0.85, 1.15, num_experts)
            counts = rng.multinomial(tokens_per_step * topk, probs / probs.sum())
            for writer in writers:
                writer.moe_tokens(step, layer, counts.tolist())
            if npy:
                save_token_distribution(out / "token_distribution", layer, step, counts)
    for writer in writers:
        writer.run_end("success", None, step=steps)
        writer.close()
    return out
