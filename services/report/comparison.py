"""The report of a comparison folder (services.compare): how well each side's features are matched on the other
side, and the top matches with both features' top images side by side (from each side's index, when it has one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actstore.errors import ActstoreError
from services.api.reader import IndexReader
from services.compare.layout import MATCHES, read_comparison, read_table, similarity_column
from services.report.config import ReportConfig
from services.report.index import feature_section
from services.report.page import Page
from services.report.plots import similarity_plot

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
            fid, reader = m[f"feature_{side}"], readers[side]
            page.raw(f'<div class="side" data-side="{side}">')
            if isinstance(reader, IndexReader):
                feature_section(page, reader, fid, cfg.images, label=f"{side.upper()} ", level=4)
            else:
                page.heading(f"{side.upper()} feature #{fid}", level=4, feature=fid)
                page.text(reader, note=True)
            page.raw("</div>")
        page.raw("</div>")
    return page
