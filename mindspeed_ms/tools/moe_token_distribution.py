"""MoE token distribution: per-layer, per-step expert token counts as ``.npy`` files, and charts.

Files: ``<dir>/layer-<L>_<step>.npy``, one per MoE layer ``L`` (the layer's index in the model,
0-based like MindFormers' ``cur_layer``) per step, each a 1-D integer vector with one count per
expert (tokens the router sent there before capacity dropping; with top-k each token counts k
times). The MoE layer writes them with :func:`save_token_distribution`.

Command line::

    python -m mindspeed_ms.tools.moe_token_distribution --num_layers N --hot_expert_num K \\
        --npy_files_load_path DIR --save_path_prefix PREFIX

For each layer ``0 .. N-1`` that has files it draws a stacked area chart of tokens per expert
over the steps (x: step, y: tokens, one band per expert, legend ``expert-i``, title
``Layer-L_Token_Distribution``; rendered with matplotlib's Agg canvas), saves it as ``PREFIX/layer-L_token_distribution.png`` and prints
the ``K`` hot experts (most tokens in the last step, ties to the lower index). Layers without files
(dense layers between MoE layers) are skipped and reported. File names are parsed with an anchored
regular expression, so ``layer-1_`` never matches ``layer-10_``; steps are sorted numerically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["save_token_distribution", "load_token_distribution", "hot_experts", "plot_token_distribution",
           "main", "FILE_PATTERN"]

FILE_PATTERN = re.compile(r"^layer-(\d+)_(\d+)\.npy$")


def save_token_distribution(directory: Union[str, os.PathLike], layer: int, step: int, counts) -> Path:
    """Write one layer's per-expert token counts of one step to ``<directory>/layer-<L>_<step>.npy``.

    The file is written under a temporary name and renamed, so readers never see a partial file.

    Args:
        directory: Target directory (created if needed), e.g. ``<output_dir>/token_distribution``.
        layer: The MoE layer's index (>= 0).
        step: The training step (>= 0).
        counts: One count per expert (a 1-D sequence, numpy array or Tensor with ``asnumpy()``).

    Returns:
        The written file's path.

    Raises:
        ValueError: ``layer``/``step`` negative, or ``counts`` not a non-empty 1-D vector of
            non-negative integers.
    """
    for name, value in (("layer", layer), ("step", step)):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if hasattr(counts, "asnumpy"):
        counts = counts.asnumpy()
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D vector (one count per expert), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise ValueError(f"counts must be non-negative integers, got {arr.tolist()}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"layer-{int(layer)}_{int(step)}.npy"
    tmp = directory / f".layer-{int(layer)}_{int(step)}.npy.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, arr.astype(np.int64), allow_pickle=False)
    os.replace(tmp, path)
    return path


def load_token_distribution(directory: Union[str, os.PathLike]) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """Read every ``layer-<L>_<step>.npy`` in ``directory`` (not recursive).

    Returns:
        ``{layer: (steps int64[S], counts int64[S, E])}`` with steps ascending.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: A file is not a 1-D vector, or a layer's vectors differ in length.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"npy_files_load_path {str(directory)!r} is not a directory")
    found: Dict[int, Dict[int, Path]] = {}
    for entry in directory.iterdir():
        match = FILE_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = entry
    result = {}
    for layer, files in sorted(found.items()):
        steps = sorted(files)
        rows = []
        for step in steps:
            vec = np.load(files[step], allow_pickle=False)
            if vec.ndim != 1:
                raise ValueError(f"{files[step].name} holds shape {vec.shape}, expected a 1-D vector per expert")
            if rows and vec.shape != rows[0].shape:
                raise ValueError(f"{files[step].name} has {vec.shape[0]} experts, {files[steps[0]].name} has "
                                 f"{rows[0].shape[0]}")
            rows.append(vec)
        result[layer] = (np.asarray(steps, dtype=np.int64), np.stack(rows).astype(np.int64))
    return result


def hot_experts(last_counts: Sequence[int], hot_expert_num: int) -> List[int]:
    """Indices of the ``hot_expert_num`` experts with the most tokens (ties: lower index first)."""
    order = np.argsort(-np.asarray(last_counts), kind="stable")
    return [int(i) for i in order[:hot_expert_num]]


def _expert_colors(num_experts: int):
    """Distinct band colours: the default cycle up to 10 experts, tab20 up to 20, then a gradient."""
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
    if num_experts <= 10:
        return None
    if num_experts <= 20:
        return [colormaps["tab20"](i) for i in range(num_experts)]
    return [colormaps["turbo"](x) for x in np.linspace(0.0, 1.0, num_experts)]


def plot_token_distribution(num_layers: int, hot_expert_num: int, npy_files_load_path: Union[str, os.PathLike],
                            save_path_prefix: Union[str, os.PathLike], first_layer: int = 0,
                            out=None) -> Dict[int, List[int]]:
    """Draw and save one chart per layer; print and return the hot experts per layer.

    Args:
        num_layers: Number of layers to look at (layers ``first_layer .. first_layer + num_layers - 1``).
        hot_expert_num: How many hot experts to report per layer (clamped to the expert count).
        npy_files_load_path: Directory with the ``layer-<L>_<step>.npy`` files.
        save_path_prefix: Directory for ``layer-<L>_token_distribution.png`` (created if needed).
        first_layer: Index of the first layer (0 for MindFormers-style 0-based layer indices).
        out: Text stream for the report (default: stdout).

    Returns:
        ``{layer: [hot expert indices]}`` for the layers that have files.

    Raises:
        ValueError: ``num_layers < 1``, ``hot_expert_num < 0``, or no layer in range has files.
        FileNotFoundError: ``npy_files_load_path`` does not exist.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (safe in notebooks).
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    out = sys.stdout if out is None else out
    if isinstance(num_layers, bool) or int(num_layers) != num_layers or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(hot_expert_num, bool) or int(hot_expert_num) != hot_expert_num or hot_expert_num < 0:
        raise ValueError(f"hot_expert_num must be an int >= 0, got {hot_expert_num!r}")
    data = load_token_distribution(npy_files_load_path)
    layers = range(int(first_layer), int(first_layer) + int(num_layers))
    missing = [layer for layer in layers if layer not in data]
    outside = sorted(layer for layer in data if layer not in layers)
    if outside:
        print(f"Ignoring files of layer(s) {outside}: outside layers {layers.start}..{layers.stop - 1}", file=out)
    if len(missing) == len(layers):
        raise ValueError(f"no layer-<L>_<step>.npy files for layers {layers.start}..{layers.stop - 1} in "
                         f"npy_files_load_path={str(npy_files_load_path)!r}")
    if missing:
        print(f"Skipped layer(s) without token distribution files (dense layers?): {missing}", file=out)
    save_dir = Path(save_path_prefix)
    save_dir.mkdir(parents=True, exist_ok=True)
    result = {}
    for layer in layers:
        if layer not in data:
            continue
        steps, counts = data[layer]
        num_experts = counts.shape[1]
        fig = Figure(figsize=(10, 5))
        ax = fig.subplots()
        ax.stackplot(steps, counts.T, labels=[f"expert-{i}" for i in range(num_experts)],
                     colors=_expert_colors(num_experts))
        ax.set_title(f"Layer-{layer}_Token_Distribution")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small",
                  ncol=max(1, -(-num_experts // 24)))
        fig.tight_layout()
        fig.savefig(save_dir / f"layer-{layer}_token_distribution.png", dpi=100)
        k = min(int(hot_expert_num), num_experts)
        hot = hot_experts(counts[-1], k)
        result[layer] = hot
        print(f"Layer-{layer} hot experts (top {k} of {num_experts} at step {int(steps[-1])}): {hot}", file=out)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mindspeed_ms.tools.moe_token_distribution",
        description="Plot the per-expert token distribution of each MoE layer and report its hot experts.")
    parser.add_argument("--num_layers", type=int, required=True, help="number of layers of the model")
    parser.add_argument("--hot_expert_num", type=int, required=True,
                        help="how many hot experts (most tokens in the last step) to report per layer")
    parser.add_argument("--npy_files_load_path", required=True, help="directory with layer-<L>_<step>.npy files")
    parser.add_argument("--save_path_prefix", required=True, help="directory for layer-<L>_token_distribution.png")
    parser.add_argument("--first_layer", type=int, default=0, help="index of the first layer (default 0)")
    args = parser.parse_args(argv)
    try:
        plot_token_distribution(args.num_layers, args.hot_expert_num, args.npy_files_load_path,
                                args.save_path_prefix, first_layer=args.first_layer)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
