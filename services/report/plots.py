"""The report's figures, drawn with matplotlib on its Agg canvas (no display, no pyplot state): each function
returns the PNG, its size in pixels and the numbers it drew (which the page also records)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

__all__ = ["CURVES", "SCORE_BINS", "Plot", "curves_plot", "density_plot", "groups_plot", "matrix_plot", "paired_plot",
           "population_plot", "profile_plot", "scores_plot", "similarity_plot", "taskfit_plot"]

DPI = 100
LIVE, DEAD = "#3b6fb6", "#999999"
CURVES = (("loss", "loss", True), ("mse", "MSE", True), ("fvu", "FVU", False),
          ("l0", "L0 (active latents per token)", False), ("dead_fraction", "dead fraction", False))
"""The training curves: (metrics.jsonl key, axis label, log scale)."""
SIMILARITY_BINS = np.round(np.linspace(-1, 1, 41), 6)
"""Best-similarity histogram edges: 0.05 wide over [-1, 1] (Pearson and cosine both live there)."""
SCORE_BINS = np.round(np.linspace(0, 1, 21), 6)
"""Explanation score histogram edges: 0.05 wide over [0, 1] (balanced accuracy and AUROC, chance at 0.5)."""

Plot = tuple[bytes, tuple[int, int], dict[str, Any]]
"""(PNG, (width, height) in px, the values drawn)."""


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Figure) -> tuple[bytes, tuple[int, int]]:
    buf = io.BytesIO()
    canvas = FigureCanvasAgg(fig)
    canvas.print_png(buf)
    w, h = canvas.get_width_height()
    return buf.getvalue(), (int(w), int(h))


def density_plot(hist: Mapping[str, Any], title: str, what: str = "patches") -> Plot:
    """Features by log10 firing frequency (0.1-wide bins, as services.index.density_histogram makes them), the dead
    features as a separate grey bar to the left, labelled with their count."""
    edges, counts, dead = np.asarray(hist["edges"], float), np.asarray(hist["counts"], int), int(hist["dead"])
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    width = float(np.diff(edges).min()) if edges.size > 1 else 0.1
    if counts.size:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=LIVE,
               label=f"live: {int(counts.sum())}")
    dead_x = (edges[0] if edges.size else 0.0) - 3 * width
    ax.bar([dead_x], [dead], width=width * 2, align="center", color=DEAD, label=f"dead: {dead}")
    ax.annotate(f"dead\n{dead}", (dead_x, dead), ha="center", va="bottom", fontsize=8)
    ax.set(title=title, xlabel=f"log10 firing frequency (fraction of {what})", ylabel="features")
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    png, size = _png(fig)
    return png, size, {"edges": edges.tolist(), "counts": counts.tolist(), "dead": dead,
                       "n_features": int(hist.get("n_features", counts.sum() + dead))}


def population_plot(active: np.ndarray, d_sae: int, title: str) -> Plot:
    """Tokens by the fraction of the SAE's features active on them (whole-count bins, at most 50)."""
    top = int(active.max()) if active.size else 0
    edges = np.unique(np.round(np.linspace(0, top + 1, min(top + 1, 50) + 1))).astype(np.int64)
    counts = np.histogram(active, bins=edges)[0]
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    ax.bar(edges[:-1] / d_sae, counts, width=np.diff(edges) / d_sae, align="edge", color=LIVE)
    ax.set(title=title, xlabel=f"fraction of the {d_sae} features active", ylabel="tokens")
    png, size = _png(fig)
    return png, size, {"edges": edges.tolist(), "counts": counts.tolist(), "d_sae": d_sae,
                       "mean_active": float(active.mean()) if active.size else 0.0}


def curves_plot(rows: Sequence[Mapping[str, Any]], title: str) -> Plot:
    """Each metric of CURVES over training tokens, one line per SAE of the sweep."""
    names = list(dict.fromkeys(r["sae"] for r in rows))
    fig = _figure(13, 6.4)
    axes = fig.subplots(2, 3).ravel()
    drawn: dict[str, int] = {}
    for name in names:
        mine = [r for r in rows if r["sae"] == name]
        drawn[name] = len(mine)
        tokens = [r["tokens"] for r in mine]
        for ax, (key, label, _) in zip(axes, CURVES):
            ax.plot(tokens, [r.get(key, np.nan) for r in mine], marker="." if len(mine) < 30 else None, label=name)
    for ax, (key, label, log) in zip(axes, CURVES):
        ax.set(title=label, xlabel="training tokens", ylabel=label)
        if log and all(r.get(key, 0) > 0 for r in rows):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter())  # 120, not 1.2 x 10^2
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    legend = axes[-1]
    legend.axis("off")
    legend.legend(*axes[0].get_legend_handles_labels(), loc="center", title="SAE")
    fig.suptitle(title)
    png, size = _png(fig)
    return png, size, {"rows": drawn, "metrics": [key for key, _, _ in CURVES]}


def similarity_plot(best: Mapping[str, np.ndarray], labels: Mapping[str, str], title: str, by: str) -> Plot:
    """Per side, its live features by the similarity of their best match on the other side."""
    fig = _figure(12, 3.6)
    axes = fig.subplots(1, len(best), sharey=True, squeeze=False)[0]
    values: dict[str, Any] = {"edges": SIMILARITY_BINS.tolist()}
    for ax, (side, sims) in zip(axes, best.items()):
        finite = sims[np.isfinite(sims)]
        counts = np.histogram(np.clip(finite, -1, 1), bins=SIMILARITY_BINS)[0]
        ax.bar(SIMILARITY_BINS[:-1], counts, width=np.diff(SIMILARITY_BINS), align="edge", color=LIVE)
        if finite.size:
            ax.axvline(float(np.median(finite)), color="#c0392b", lw=1, label=f"median {np.median(finite):.3f}")
            ax.legend(fontsize=8, loc="upper left")
        ax.set(title=labels[side], xlabel=f"best {by}", ylabel="live features")
        values[side] = {"counts": counts.tolist(), "undefined": int(sims.size - finite.size)}
    fig.suptitle(title)
    png, size = _png(fig)
    return png, size, values


def scores_plot(scores: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str],
                colours: Mapping[str, str], title: str) -> Plot:
    """One panel per score: each group's values of it (finite, in [0, 1]) by SCORE_BINS, its median dashed, chance
    (0.5) dotted."""
    fig = _figure(13, 3.6)
    values: dict[str, Any] = {"edges": SCORE_BINS.tolist()}
    for ax, (score, groups) in zip(fig.subplots(1, len(scores), squeeze=False)[0], scores.items()):
        values[score] = {}
        for group, got in groups.items():
            counts = np.histogram(np.clip(got, 0, 1), bins=SCORE_BINS)[0]
            values[score][group] = counts.tolist()
            if got.size:
                median = float(np.median(got))
                ax.stairs(counts, SCORE_BINS, fill=True, alpha=0.45, color=colours[group],
                          label=f"{group}: {got.size}, median {median:.3f}")
                ax.axvline(median, color=colours[group], ls="--", lw=1)
        ax.axvline(0.5, color="#444444", ls=":", lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "not scored", ha="center", va="center", transform=ax.transAxes, color=DEAD)
        ax.set(title=labels[score], xlabel="score (dotted: chance, dashed: median)", ylabel="features", xlim=(0, 1))
    fig.suptitle(title)
    png, size = _png(fig)
    return png, size, values


def paired_plot(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], labels: Mapping[str, str], x: str, y: str,
                title: str) -> Plot:
    """One panel per score: y's value against x's, a point per feature, over [0, 1] with the diagonal; its title
    counts the points above it (y higher)."""
    fig = _figure(13, 4.2)
    values: dict[str, Any] = {}
    for ax, (score, (xs, ys)) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs.items()):
        above = int((ys > xs).sum())
        values[score] = {"n": int(xs.size), "above": above}
        ax.plot([0, 1], [0, 1], color="#444444", ls=":", lw=1)
        if xs.size:
            ax.scatter(xs, ys, s=16 if xs.size < 1000 else 4, alpha=0.5, color=LIVE, linewidths=0)
        ax.set_title(f"{labels[score]}: {y} higher on {above} of {xs.size}" if xs.size
                     else f"{labels[score]}: no feature scored by both", fontsize=10)
        ax.set(xlabel=x, ylabel=y, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    fig.suptitle(title)
    png, size = _png(fig)
    return png, size, values


def matrix_plot(matrices: Mapping[str, Sequence[Sequence[float | None]]], names: Sequence[str], fmt: str,
                title: str) -> Plot:
    """One heatmap per matrix (row model by column model), each cell written in; None (the diagonal) blank."""
    n = len(names)
    fig = _figure(min(16.0, 1.0 + (1.2 + 0.7 * n) * len(matrices)), 1.6 + 0.6 * n)
    values: dict[str, Any] = {"names": list(names)}
    for ax, (label, rows) in zip(fig.subplots(1, len(matrices), squeeze=False)[0], matrices.items()):
        grid = np.array([[np.nan if v is None else v for v in row] for row in rows], float)
        ax.imshow(grid, vmin=0, vmax=1, cmap="Blues")
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="white" if v > 0.6 else "black")
        ax.set_xticks(range(n), names, rotation=30, ha="right")
        ax.set_yticks(range(n), names)
        ax.set(title=label, xlabel="in this model", ylabel="features of this model")
        values[label] = [[None if not np.isfinite(v) else float(v) for v in row] for row in grid]
    fig.suptitle(title)
    png, size = _png(fig)
    return png, size, values


def groups_plot(groups: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str], title: str) -> Plot:
    """Per model, its live features stacked by how many models share them (its own included): unique at the left,
    shared by all at the right."""
    n = len(names)
    fig = _figure(9, 1.4 + 0.5 * n)
    ax = fig.subplots()
    counts = np.zeros((n, n), int)  # model, n_models - 1
    for i, model_groups in enumerate(groups):
        for g in model_groups:
            counts[i, g["n_models"] - 1] += g["features"]
    left = np.zeros(n)
    colours = [f"C{m}" for m in range(n)]
    for m in range(n):
        label = "unique" if m == 0 else "shared by all" if m == n - 1 else f"shared by {m + 1} models"
        ax.barh(range(n), counts[:, m], left=left, color=colours[m], label=label)
        left += counts[:, m]
    ax.set_yticks(range(n), names)
    ax.invert_yaxis()
    ax.set(title=title, xlabel="live features")
    ax.legend(fontsize=8, loc="lower right")
    png, size = _png(fig)
    return png, size, {"names": list(names), "by_models": counts.tolist()}


def profile_plot(shares: Mapping[str, Sequence[float]], depths: Sequence[str], title: str) -> Plot:
    """Models side by side: per depth (a group), one bar per model, the share of its placed features at that depth
    (each model's bars sum to 1)."""
    fig = _figure(max(6.4, 1.2 + 0.5 * len(depths) * max(len(shares), 1)), 3.8)
    ax = fig.subplots()
    width = 0.8 / max(len(shares), 1)
    x = np.arange(len(depths))
    for j, (model, share) in enumerate(shares.items()):
        padded = np.zeros(len(depths))
        padded[:len(share)] = share
        ax.bar(x - 0.4 + width * (j + 0.5), padded, width=width, label=model)
    ax.set_xticks(x, depths)
    ax.set(title=title, xlabel="depth in the hierarchy (0: its roots)", ylabel="share of placed features", ylim=(0, 1))
    ax.legend(fontsize=8, title="model")
    png, size = _png(fig)
    return png, size, {"depths": list(depths), "share": {m: list(map(float, s)) for m, s in shares.items()}}


def taskfit_plot(summary: Mapping[str, Any]) -> Plot:
    """Three panels: each model's k-sparse accuracy against k (its dense accuracy dashed, same colour); its best
    1-D probes' mean AUROC and AP; the k-sparse accuracy at score_k against the dense accuracy, a point per model."""
    models, ks, score_k = summary["models"], summary["k"], summary["score_k"]
    fig = _figure(13, 4.2)
    curve, bars, scatter = fig.subplots(1, 3)
    colours = [f"C{i % 10}" for i in range(len(models))]
    values: dict[str, Any] = {"k": ks, "models": [m["name"] for m in models], "ksparse": {}, "dense": {},
                              "auroc": {}, "ap": {}}
    for m, colour in zip(models, colours):
        acc = [m["ksparse"][str(k)]["accuracy"] for k in ks]
        values["ksparse"][m["name"]], values["dense"][m["name"]] = acc, m["dense"]["accuracy"]
        values["auroc"][m["name"]], values["ap"][m["name"]] = m["one_d"]["mean_auroc"], m["one_d"]["mean_ap"]
        curve.plot(ks, acc, marker="o", color=colour, label=m["name"])
        curve.axhline(m["dense"]["accuracy"], color=colour, ls="--", lw=1)
    curve.set_xscale("log", base=2)
    curve.set_xticks(ks, [str(k) for k in ks])
    curve.set(title="k-sparse probes (dashed: dense)", xlabel="features per class (k)",
              ylabel="held-out accuracy", ylim=(0, 1.02))
    curve.legend(fontsize=8)
    x = np.arange(len(models))
    for offset, key, label in ((-0.2, "mean_auroc", "AUROC"), (0.2, "mean_ap", "AP")):
        got = [m["one_d"][key] if m["one_d"][key] is not None else np.nan for m in models]
        bars.bar(x + offset, got, width=0.4, color=colours, alpha=1.0 if key == "mean_auroc" else 0.5, label=label)
    bars.set_xticks(x, [m["name"] for m in models], rotation=20, ha="right", fontsize=8)
    bars.set(title="best feature: AUROC (solid), AP (light)", ylabel="held-out", ylim=(0, 1.02))
    for m, colour in zip(models, colours):
        score = m["ksparse"][str(score_k)]["accuracy"]
        scatter.scatter([score], [m["dense"]["accuracy"]], color=colour, s=40)
        scatter.annotate(m["name"], (score, m["dense"]["accuracy"]), fontsize=8, xytext=(4, 4),
                         textcoords="offset points")
    scatter.plot([0, 1], [0, 1], color="#444444", ls=":", lw=1)
    scatter.set(title=f"k-sparse (k={score_k}) against dense", xlabel=f"k-sparse accuracy, k={score_k}",
                ylabel="dense probe accuracy", xlim=(0, 1.02), ylim=(0, 1.02), aspect="equal")
    png, size = _png(fig)
    return png, size, values
