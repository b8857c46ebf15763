"""The report of a comparison folder (services.compare): how well each side's features are matched on the other
side, and the top matches with both features' top images side by side (from each side's index, when it has one).

A comparison of several sides gets the matrix across the models, each model's features by how many models share
them, and examples of each group with the feature's top images in every model that has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actstore.errors import ActstoreError
from services.api.reader import IndexReader
from services.compare.layout import (MATCHES, SET_FORMAT, is_comparison_set, read_comparison, read_table,
                                     similarity_column)
from services.report.config import ReportConfig
from services.report.index import feature_section
from services.report.page import Page
from services.report.plots import groups_plot, matrix_plot, similarity_plot

__all__ = ["comparison_report"]

SIDES = ("a", "b")
_MEASURE = {"activations": "Pearson correlation", "decoder": "decoder cosine"}


def _num(value: float | None) -> str:
    """A similarity as shown; n/a where the comparison has none (no live features on a side)."""
    return "n/a" if value is None else f"{value:.3f}"


def _side_label(side: str, s: dict[str, Any]) -> str:
    bb = s.get("backbone") or {}
    return f"{side.upper()}: {bb.get('family')}:{bb.get('name')} layer {s.get('layer')}, {s.get('d_sae')} features"


def _open_index(s: dict[str, Any]) -> IndexReader | str:
    """The side's index, or why there is none to show images from."""
    if not s.get("index"):
        return f"no feature index for this side ({s.get('source')}): build one with `actstore index` to see images"
    try:
        return IndexReader(s["index"])
    except ActstoreError as e:
        return f"its index cannot be read: {' '.join(str(e).split())}"


def comparison_report(cfg: ReportConfig, path: Path, config: dict[str, Any]) -> Page:
    if is_comparison_set(path):
        return _set_report(cfg, path, config)
    summary = read_comparison(path)
    sides = {side: summary[side] for side in SIDES}
    measure = _MEASURE.get(summary.get("by"), summary.get("by"))
    assignment = summary.get("assignment") or {}
    facts: list[tuple[str, Any]] = [("comparison", path)]
    for side, s in sides.items():
        facts += [(f"side {side.upper()}", s.get("source")),
                  (f"{side.upper()} SAE, store", f"{s.get('sae')} on {s.get('store')}"),
                  (f"{side.upper()} features", f"{s.get('live')} live, {s.get('dead')} dead of {s.get('d_sae')}")]
    facts += [("similarity", f"{measure} at {summary.get('level')} level over {summary.get('n_images')} images"),
              ("mutual best matches", summary.get("mutual")),
              ("one-to-one assignment",
               f"{assignment.get('pairs')} pairs, mean similarity {_num(assignment.get('mean'))}")]
    page = Page(f"Comparison report: {path.name}", "comparison", facts, config)

    page.heading("Best matches")
    best = {side: read_table(path, MATCHES[side]).column(similarity_column(summary)).to_numpy(zero_copy_only=False)
            for side in SIDES}
    labels = {side: f"{_side_label(side, s)} -> best on {'B' if side == 'a' else 'A'}" for side, s in sides.items()}
    png, size, values = similarity_plot(best, labels, f"Each live feature's best {measure} on the other side", measure)
    page.plot("best-similarity", png, size, f"live features of each side by the {measure} of their best match",
              values)
    quantiles = ("0.1", "0.25", "0.5", "0.75", "0.9")
    page.table(["side", "live features", "mean", *(f"q{q}" for q in quantiles), "> 0.5", "> 0.7", "> 0.9"],
               [[side.upper(), best[side].size, _num(b.get("mean")),
                 *(_num((b.get("quantiles") or {}).get(q)) for q in quantiles),
                 *((b.get("above") or {}).get(t, "n/a") for t in ("0.5", "0.7", "0.9"))]
                for side, b in ((side, summary.get("best", {}).get(side) or {}) for side in SIDES)], table="best")

    matches = summary.get("top_matches", [])[:cfg.features]
    page.heading(f"Top {len(matches)} matches, top {cfg.images} images of each feature")
    if not matches:
        page.text("the comparison lists no top matches", note=True)
    readers = {side: _open_index(s) for side, s in sides.items()} if matches else {}
    for m in matches:
        page.heading(f"A #{m['feature_a']} <-> B #{m['feature_b']}: {measure} {m['similarity']:.3f}, "
                     f"largest standardized difference {m['max_diff']:.3g}", level=3)
        page.raw('<div class="pair">')
        for side in SIDES:
            _side_column(page, side, readers[side], m[f"feature_{side}"], f"{side.upper()} ", cfg.images)
        page.raw("</div>")
    return page


def _side_column(page: Page, side: str | int, reader: IndexReader | str, fid: int, label: str, images: int) -> None:
    """One side's feature in a row of sides: its top images from the side's index, or why there are none."""
    page.raw(f'<div class="side" data-side="{side}">')
    if isinstance(reader, IndexReader):
        feature_section(page, reader, fid, images, label=label, level=4)
    else:
        page.heading(f"{label}feature #{fid}", level=4, feature=fid)
        page.text(reader, note=True)
    page.raw("</div>")


def _set_report(cfg: ReportConfig, path: Path, config: dict[str, Any]) -> Page:
    """Several models: the matrix, the groups, and examples of each group with their top images."""
    summary = read_comparison(path, SET_FORMAT)
    names, sides, n = summary["names"], summary["sides"], len(summary["names"])
    measure, threshold = _MEASURE.get(summary.get("by"), summary.get("by")), summary["threshold"]
    facts: list[tuple[str, Any]] = [("comparison", path)]
    for name, s in zip(names, sides):
        bb = s.get("backbone") or {}
        facts.append((name, f"{bb.get('family')}:{bb.get('name')} layer {s.get('layer')}: {s.get('live')} live of "
                            f"{s.get('d_sae')} features; {s.get('sae')} on {s.get('store')}"))
    facts += [("similarity", f"{measure} at {summary.get('level')} level over {summary.get('n_images')} images"),
              ("partner", f"a best match above {threshold:g} in another model"),
              ("pairs", f"{len(summary['pairs'])}, in {summary['passes']} passes over the stores; each pair's "
                        "comparison is under pairs/ (`actstore report` draws one)")]
    page = Page(f"Comparison of {n} models: {path.name}", "comparison", facts, config)
    matrix = summary["matrix"]
    page.heading("Across the models")
    above = f"{threshold:g}" if f"{threshold:g}" in matrix["above"] else "0.7"
    png, size, values = matrix_plot({f"mean best {measure}": matrix["mean_best"],
                                     f"share with a partner above {above}": matrix["above"][above]}, names, "{:.2f}",
                                    "Each model's live features (rows) matched in every other model (columns)")
    page.plot("matrix", png, size, f"row model's features by their best {measure} in the column model", values)
    rows = zip(names, matrix["mean_best"])
    page.table(["features of", *(f"in {m}" for m in names)],
               [[name, *("-" if v is None else f"{v:.3f}" for v in row)] for name, row in rows], table="mean-best")
    page.table(["pair", "mutual best matches", "one-to-one pairs", "mean similarity of the pairs"],
               [[f"{names[p['a']]} - {names[p['b']]}", p["mutual"], p["assignment"]["pairs"],
                 _num(p["assignment"]["mean"])] for p in summary["pairs"]], table="pairs")

    page.heading("What the models share")
    png, size, values = groups_plot(summary["groups"], names, f"Live features by the models where they have a "
                                                              f"partner above {threshold:g}")
    page.plot("groups", png, size, "each model's live features by how many models share them", values)
    labels = list(dict.fromkeys(g["group"] for model in summary["groups"] for g in model))
    counts = [{g["group"]: g["features"] for g in model} for model in summary["groups"]]
    page.table(["models sharing the feature", *names],
               [[label, *(c.get(label, "") for c in counts)] for label in labels], table="groups")

    page.heading(f"Examples of each group, top {cfg.images} images in each model")
    readers = {i: _open_index(s) for i, s in enumerate(sides)}
    per_group: dict[tuple[int, str], int] = {}
    for e in summary["examples"]:
        key = (e["side"], e["group"])
        if per_group.setdefault(key, 0) >= max(1, cfg.features // max(1, len(labels))):
            continue
        per_group[key] += 1
        who = "shared by all" if e["n_models"] == n else "unique" if e["n_models"] == 1 else f"shared by {e['group']}"
        page.heading(f"{names[e['side']]} #{e['feature']}: {who}", level=3)
        page.raw('<div class="pair">')
        for side, fid, sim in [(e["side"], e["feature"], None),
                               *((p["side"], p["feature"], p["similarity"]) for p in e["partners"])]:
            label = f"{names[side]} " + ("" if sim is None else f"({measure} {sim:.3f}) ")
            _side_column(page, side, readers[side], fid, label, cfg.images)
        page.raw("</div>")
    return page
