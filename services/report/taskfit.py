"""The report of a taskfit folder (services.taskfit): per model its feature-based scores and its dense probe's
accuracy in one table, a figure of them (k-sparse accuracy against k with each dense accuracy, the best 1-D probes'
mean AUROC and AP, the feature-based score against the dense accuracy), the rank correlations with their n and
caveat, and per model each class's best single feature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from services.report.config import ReportConfig
from services.report.page import Page
from services.report.plots import taskfit_plot
from services.taskfit.layout import CLASSES, read_table, read_taskfit

__all__ = ["scores_table", "taskfit_page", "taskfit_report"]


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
