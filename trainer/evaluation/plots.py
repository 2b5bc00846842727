"""PNG figures for a run's evaluation and training curves (logged as MLflow artifacts).

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas), never through ``pyplot``:
no global backend switch, no figure registry, safe from a background thread. Rank arrays are
1-based ranks of the true item per query (``ops.metrics`` ``t2v_ranks`` / ``v2t_ranks``) and may
be torch tensors or numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

DIRECTIONS = ("t2v", "v2t")
MAX_K = 100


def _as_numpy(ranks: Any) -> np.ndarray:
    if hasattr(ranks, "detach"):  # torch.Tensor, without importing torch here
        ranks = ranks.detach().cpu().numpy()
    arr = np.asarray(ranks, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("plots: got an empty rank array; evaluate on at least one query")
    if np.any(arr < 1):
        raise ValueError(f"plots: ranks must start at 1 (best), got min {arr.min():g}")
    return arr


def _new_figure(width: float = 7.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def recall_at_k(ranks: Any, max_k: int = MAX_K) -> tuple[np.ndarray, np.ndarray]:
    """(K = 1..max_k, recall@K in percent) for one rank array."""
    arr = _as_numpy(ranks)
    ks = np.arange(1, max_k + 1)
    sorted_ranks = np.sort(arr)
    recall = np.searchsorted(sorted_ranks, ks, side="right") / arr.size * 100.0
    return ks, recall


def plot_recall_curves(ranks: Mapping[str, Any], path: Path, title: str) -> Path:
    """Recall@K for K = 1..100 on a log-x axis, one line per variant (e.g. "con t2v", "gen t2v")."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, variant_ranks in ranks.items():
        ks, recall = recall_at_k(variant_ranks)
        ax.plot(ks, recall, label=f"{name} (R@1 {recall[0]:.1f})", linewidth=1.8)
    ax.set_xscale("log")
    ax.set_xlim(1, MAX_K)
    ax.set_ylim(0, 100)
    for k in (1, 5, 10, 50):
        ax.axvline(k, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left")  # recall rises to the right: the upper left stays empty
    return _save(fig, path)


def plot_rank_histograms(ranks: Mapping[str, Any], path: Path, title: str) -> Path:
    """Distribution of the true item's rank per variant; log-spaced integer bins, rank 1 alone."""
    arrays = {name: _as_numpy(r) for name, r in ranks.items()}
    max_rank = max(a.max() for a in arrays.values()) if arrays else 1.0
    # log-spaced but integer-aligned edges, so no bin falls between two integers and shows empty
    edges = np.unique(np.round(np.geomspace(1.0, max_rank + 1.0, 30))) - 0.5
    if edges.size < 2:
        edges = np.array([0.5, 1.5])
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, arr in arrays.items():
        ax.hist(arr, bins=edges, histtype="step", linewidth=1.8,
                label=f"{name} (MdR {np.median(arr):g}, MnR {arr.mean():.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("rank of the true item (log scale, 1 = best)")
    ax.set_ylabel("queries")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if arrays:
        ax.legend(loc="best")
    return _save(fig, path)


def _metric_value(variant_metrics: Mapping[str, Any], direction: str, key: str) -> float | None:
    """Accept flat ``{"t2v_R1": ..}`` / ``{"t2v/R1": ..}`` or nested ``{"t2v": {"R1": ..}}``."""
    nested = variant_metrics.get(direction)
    if isinstance(nested, Mapping):
        value = nested.get(key)
    else:
        value = variant_metrics.get(f"{direction}_{key}", variant_metrics.get(f"{direction}/{key}"))
    return None if value is None else float(value)


def plot_stage_comparison(metrics: Mapping[str, Mapping[str, Any]], path: Path,
                          keys: Sequence[str] = ("R1", "R5", "R10")) -> Path:
    """Grouped bars, one panel per direction (t2v, v2t side by side): metric on x, one bar per
    variant ("con", "gen_rerank", ...), each bar annotated with its value.

    ``metrics[variant]`` is flat (``"t2v_R1"``) or nested (``{"t2v": {"R1": ..}}``, the shape
    ``ops.metrics.retrieval_metrics`` returns).
    """
    variants = list(metrics)
    directions = [d for d in DIRECTIONS
                  if any(_metric_value(metrics[v], d, k) is not None for v in variants for k in keys)]
    if not directions:
        raise ValueError(f"plot_stage_comparison: no t2v/v2t values for keys {list(keys)} in "
                         f"variants {variants}; expected keys like 't2v_R1' or nested {{'t2v': {{'R1': ..}}}}")
    fig = _new_figure(width=6.0 * len(directions), height=4.5)
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(keys))
    top = 0.0
    axes = []
    for col, direction in enumerate(directions):
        ax = fig.add_subplot(1, len(directions), col + 1)
        axes.append(ax)
        for i, variant in enumerate(variants):
            values = [_metric_value(metrics[variant], direction, k) for k in keys]
            heights = [np.nan if v is None else v for v in values]
            bars = ax.bar(x + (i - (len(variants) - 1) / 2) * width, heights, width, label=variant)
            ax.bar_label(bars, labels=["" if v is None else f"{v:.1f}" for v in values],
                         fontsize=8, padding=2)
            top = max([top] + [v for v in values if v is not None])
        ax.set_xticks(x, [k.replace("R", "R@") if k[1:].isdigit() else k for k in keys])
        ax.set_xlabel("metric")
        ax.set_ylabel("value (%)" if all(k[:1] == "R" for k in keys) else "value")
        ax.set_title(f"{direction}: " + " vs ".join(variants))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper left")
    for ax in axes:  # same scale in both panels, headroom for the value labels
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    return _save(fig, path)


def plot_loss_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """Loss vs step, one line per series (e.g. "con/loss", "gen/loss"); log-y when the series
    span more than two decades."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    finite_values = []
    for name, points in history.items():
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, label=name, linewidth=1.5)
        finite_values.extend(v for v in values if np.isfinite(v))
    if finite_values and min(finite_values) > 0 and max(finite_values) / min(finite_values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(True, alpha=0.3)
    if finite_values:
        ax.legend(loc="upper right")
    return _save(fig, path)
