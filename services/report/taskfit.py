"""The report of a taskfit folder (services.taskfit): per model its feature-based scores and its dense probe's
accuracy in one table, a figure of them (k-sparse accuracy against k with each dense accuracy, the best 1-D probes'
mean AUROC and AP, the feature-based score against the dense accuracy), the rank correlations with their n and
caveat, and per model each class's best single feature."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.report.config import ReportConfig
from services.report.page import Page
from services.taskfit.layout import CLASSES, read_table, read_taskfit

__all__ = ["scores_table", "taskfit_page", "taskfit_plot", "taskfit_report"]


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def scores_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the models' scores, as the report and the command line show them."""
    ks = summary["k"]
    header = ["model", "layer", "features", "train", "held-out", "1-D AUROC", "1-D AP",
              *(f"k={k}" for k in ks), "dense", "chance"]
    rows = [[m["name"], m["layer"], str(m["d_sae"]), str(m["n_train"]), str(m["n_test"]),
             _num(m["one_d"]["mean_auroc"]), _num(m["one_d"]["mean_ap"]),
             *(_num(m["ksparse"][str(k)]["accuracy"]) for k in ks), _num(m["dense"]["accuracy"]),
             _num(m["dense"]["chance"])] for m in summary["models"]]
    return header, rows


def taskfit_plot(summary: dict[str, Any]) -> tuple[bytes, tuple[int, int], dict[str, Any]]:
    """Three panels: each model's k-sparse accuracy against k (its dense accuracy dashed, same colour); its best
    1-D probes' mean AUROC and AP; the k-sparse accuracy at score_k against the dense accuracy, a point per model."""
    models, ks, score_k = summary["models"], summary["k"], summary["score_k"]
    fig = Figure(figsize=(13, 4.2), dpi=100, layout="constrained")
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
    buf = io.BytesIO()
    canvas = FigureCanvasAgg(fig)
    canvas.print_png(buf)
    w, h = canvas.get_width_height()
    return buf.getvalue(), (int(w), int(h)), values


def taskfit_page(path: Path, name: str, config: dict[str, Any]) -> Page:
    """The page of the taskfit folder at `path` (shown as `name`)."""
    summary = read_taskfit(path)
    facts: list[tuple[str, Any]] = [("taskfit", name), ("models", len(summary["models"])),
                                    ("classes", len(summary["class_names"])),
                                    ("images", f"{summary['n_train']} training, {summary['n_test']} held out "
                                               f"(every number is on the held-out images)")]
    page = Page(f"Task fit report: {name}", "taskfit", facts, config)
    page.heading("Scores per model")
    header, rows = scores_table(summary)
    page.table(header, rows, table="scores")
    page.text("1-D: each class's best single feature (chosen on the training images) as a one-vs-rest detector, "
              "mean over the classes; k=...: multiclass accuracy of the argmax over per-class logistic probes on "
              "each class's top k features; dense: the linear probe on the raw layer; chance: always the "
              "training split's most frequent class.")
    png, size, values = taskfit_plot(summary)
    page.plot("taskfit", png, size, "k-sparse accuracy against k, best 1-D probes, k-sparse against dense", values)
    page.heading("Rank correlation across models")
    for c in summary["correlations"]:
        rho = "not computed" if c["rho"] is None else f"Spearman rho = {c['rho']:.3f}"
        page.text(f"{c['score']} against {c['against']}: {rho} (n = {c['n']})", note=False)
        page.text(c["note"], note=True)
    classes = read_table(path, CLASSES).to_pylist()
    for i, m in enumerate(summary["models"]):
        page.heading(f"{m['name']}: best single feature per class", level=3, model=i)
        page.table(["class", "training", "held-out", "feature", "AUROC", "AP"],
                   [[r["name"], r["n_train"], r["n_test"], r["feature"], _num(r["auroc"]), _num(r["ap"])]
                    for r in classes if r["model"] == i], table=f"classes-{i}")
    return page


def taskfit_report(cfg: ReportConfig, path: Path, config: dict[str, Any]) -> Page:
    """`actstore report` on a taskfit folder (marked by taskfit.json)."""
    return taskfit_page(path, path.name, config)
