"""The Explanations section of an index report, when `actstore explain` wrote explanations.parquet into the index:
how well its features are explained, the VLM against the vocabulary baseline, and the best and worst explained
features with their images.

Every score lies in [0, 1] with chance at 0.5. A score that was not computed (null, or NaN) is left out of every
number, never counted as 0. The VLM is set against the vocabulary on the same features: per score, those that both
explainers have that score for. Features are ranked by the first of RANKING that any feature has, so that one page
ranks by one measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actstore.errors import ActstoreError
from services.api.reader import IndexReader
from services.explain.layout import EXPLAINERS, read_explanations
from services.report.config import ReportConfig
from services.report.index import feature_section
from services.report.page import Page
from services.report.plots import paired_plot, scores_plot

__all__ = ["COLOURS", "EXTREMES", "RANKING", "SCORES", "Scored", "explanations_section", "extremes", "paired",
           "ranking", "scored"]

SCORES = (("detection_accuracy", "detection balanced accuracy"), ("detection_auroc", "detection AUROC"),
          ("embedding_auroc", "embedding AUROC"))
"""The score columns of explanations.parquet, with their names on the page."""
RANKING = (("vlm", "detection_accuracy"), ("vlm", "embedding_auroc"),
           ("vocabulary", "detection_accuracy"), ("vocabulary", "embedding_auroc"))
"""What ranks the features, in order of preference: (explainer, score)."""
EXTREMES = 5
"""Best and worst explained features shown (each)."""
COLOURS = {"vocabulary": "#999999", "vlm": "#3b6fb6"}
"""Each explainer's colour in the histograms (any other: OTHER)."""
OTHER = "#c0392b"
_LABELS = dict(SCORES)


@dataclass(frozen=True)
class Scored:
    """One explainer's rows: its features and each score of SCORES per feature (float64, NaN: not scored)."""

    features: np.ndarray
    scores: dict[str, np.ndarray]

    def of(self, score: str) -> np.ndarray:
        """The score where it was computed."""
        s = self.scores[score]
        return s[~np.isnan(s)]


def scored(table: pa.Table) -> dict[str, Scored]:
    """Per explainer present (EXPLAINERS' order, then any other by name), its features and scores."""
    names = sorted(set(table.column("explainer").to_pylist()) - {None}, key=_order)
    out = {}
    for name in names:
        rows = table.filter(pc.equal(table.column("explainer"), name))
        out[name] = Scored(rows.column("feature").to_numpy().astype(np.int64),
                           {s: rows.column(s).cast(pa.float64()).fill_null(math.nan).to_numpy() for s, _ in SCORES})
    return out


def paired(a: Scored, b: Scored, score: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, a's score, b's score) on the features both have that score for, by feature id."""
    common, ia, ib = np.intersect1d(a.features, b.features, return_indices=True)
    sa, sb = a.scores[score][ia], b.scores[score][ib]
    ok = ~np.isnan(sa) & ~np.isnan(sb)
    return common[ok], sa[ok], sb[ok]


def ranking(rows: dict[str, Scored], n_features: int) -> tuple[str, str, np.ndarray, np.ndarray] | None:
    """(explainer, score, features, their scores) of the first of RANKING that some feature of the SAE has."""
    for explainer, score in RANKING:
        if explainer in rows:
            f, s = rows[explainer].features, rows[explainer].scores[score]
            ok = ~np.isnan(s) & (f >= 0) & (f < n_features)
            if ok.any():
                return explainer, score, f[ok], s[ok]
    return None


def extremes(features: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k features (highest score first) and the worst k (lowest first), ties by feature id; disjoint:
    with fewer than 2k features the best take the larger half."""
    best = np.lexsort((features, -scores))[:min(k, (features.size + 1) // 2)]
    worst = np.lexsort((features, scores))
    worst = worst[~np.isin(worst, best)][:k]
    return features[best], features[worst]


def _num(value: float | None) -> str:
    """A score as shown; n/a where there is none."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _order(explainer: str | None) -> tuple[int, str]:
    """EXPLAINERS' order, then any other explainer by name."""
    return (EXPLAINERS.index(explainer) if explainer in EXPLAINERS else len(EXPLAINERS), explainer or "")


def _stats(values: np.ndarray) -> dict[str, Any]:
    if not values.size:
        return {"n": 0, "median": None, "mean": None}
    return {"n": int(values.size), "median": float(np.median(values)), "mean": float(np.mean(values))}


def explanations_section(page: Page, reader: IndexReader, cfg: ReportConfig) -> None:
    """The section, when the index has explanations.parquet; nothing at all when it has none."""
    try:
        table = read_explanations(reader.path)
    except ActstoreError as e:
        page.heading("Explanations", section="explanations")
        page.text(f"explanations.parquet cannot be read: {' '.join(str(e).split())}", note=True)
        return
    if table is None:
        return
    page.heading("Explanations", section="explanations")
    rows = scored(table)
    if not rows:
        page.text("explanations.parquet holds no explanations", note=True)
        return
    page.facts([(f"{name} explanations", _about(table, name, r)) for name, r in rows.items()])
    _distributions(page, rows)
    _baseline(page, rows)
    _extremes(page, reader, cfg, table, rows)


def _about(table: pa.Table, name: str, r: Scored) -> str:
    mine = table.filter(pc.equal(table.column("explainer"), name))
    models = sorted(set(mine.column("model").to_pylist()) - {None})
    judges = sorted(set(mine.column("judge").to_pylist()) - {None})
    return (f"{np.unique(r.features).size} features by {', '.join(models) or '?'}"
            + (f"; judged by {', '.join(judges)}" if judges else "; no detection judge"))


def _distributions(page: Page, rows: dict[str, Scored]) -> None:
    page.heading("Score distributions", level=3)
    got = {score: {name: r.of(score) for name, r in rows.items()} for score, _ in SCORES}
    png, size, counts = scores_plot(got, _LABELS, {name: COLOURS.get(name, OTHER) for name in rows},
                                    "Explanation scores per explainer")
    values: dict[str, Any] = {"edges": counts["edges"]}
    for score, by_name in got.items():
        values[score] = {name: {**_stats(v), "missing": int(rows[name].features.size - v.size),
                                "counts": counts[score][name]} for name, v in by_name.items()}
    page.plot("explanation-scores", png, size, "features by each score of their explanation, per explainer; "
              "dashed: the median, dotted: chance", values)
    page.table(["explainer", "score", "features scored", "not scored", "median", "mean"],
               [[name, label, v["n"], v["missing"], _num(v["median"]), _num(v["mean"])]
                for score, label in SCORES for name, v in values[score].items()], table="explanation-scores")


def _baseline(page: Page, rows: dict[str, Scored]) -> None:
    page.heading("The VLM against the vocabulary baseline", level=3)
    if "vlm" not in rows or "vocabulary" not in rows:
        page.text(f"only {', '.join(rows)} explanations: nothing to set the VLM against the vocabulary", note=True)
        return
    vlm, vocabulary = rows["vlm"], rows["vocabulary"]
    pairs = {score: paired(vocabulary, vlm, score)[1:] for score, _ in SCORES}
    png, size, _ = paired_plot(pairs, _LABELS, "vocabulary", "VLM", "VLM against the vocabulary baseline, per "
                               "feature (above the diagonal: the VLM explains it better)")
    values = {score: _versus(v, b) for score, (b, v) in pairs.items()}
    both = np.intersect1d(vlm.features, vocabulary.features).size
    page.text(f"{both} features have both explanations; each score is compared on those that both have it for")
    page.plot("vlm-vs-vocabulary", png, size, "each feature's VLM score against its vocabulary score", values)
    page.table(["score", "features", "VLM median", "vocabulary median", "VLM mean", "vocabulary mean",
                "VLM better", "ties"],
               [[label, v["n"], *(_num(v[e][m]) for m in ("median", "mean") for e in ("vlm", "vocabulary")),
                 _share(v["vlm_wins"], v["n"]), _share(v["ties"], v["n"])]
                for score, label in SCORES for v in [values[score]]], table="vlm-vs-vocabulary")


def _versus(vlm: np.ndarray, vocabulary: np.ndarray) -> dict[str, Any]:
    """One score on the features both have it for: how often the VLM's is higher or equal, each side's median and
    mean."""
    n, wins = int(vlm.size), int((vlm > vocabulary).sum())
    return {"n": n, "vlm_wins": wins, "win_share": wins / n if n else None, "ties": int((vlm == vocabulary).sum()),
            "vlm": _stats(vlm), "vocabulary": _stats(vocabulary)}


def _share(count: int, n: int) -> str:
    return f"{count / n:.1%} ({count} of {n})" if n else "n/a"


def _extremes(page: Page, reader: IndexReader, cfg: ReportConfig, table: pa.Table, rows: dict[str, Scored]) -> None:
    page.heading("Best and worst explained features", level=3)
    ranked = ranking(rows, reader.n_features)
    if ranked is None:
        page.text("no explanation of the SAE's features has a score: nothing to rank", note=True)
        return
    explainer, score, features, scores = ranked
    best, worst = extremes(features, scores, EXTREMES)
    page.text(f"ranked by the {explainer} explanation's {_LABELS[score]} ({features.size} features scored; "
              f"ties by feature id); top {cfg.images} images each")
    by_feature = dict(zip(features.tolist(), scores.tolist()))
    shown = table.filter(pc.is_in(table.column("feature"), pa.array(np.concatenate([best, worst]), pa.int32())))
    for side, chosen in (("best", best), ("worst", worst)):
        for i, fid in enumerate(chosen.tolist(), 1):
            page.raw(f'<div class="explained" data-rank="{side}" data-position="{i}" data-feature="{fid}">')
            feature_section(page, reader, fid, cfg.images, label=f"{side} {i} ({_num(by_feature[fid])}): ", level=4)
            _explanations_table(page, shown, fid)
            page.raw("</div>")


def _explanations_table(page: Page, table: pa.Table, fid: int) -> None:
    """The feature's explanations, one row per explainer, with their scores."""
    mine = table.filter(pc.equal(table.column("feature"), fid)).to_pylist()
    page.table(["explainer", "explanation", "model", *(label for _, label in SCORES), "images judged"],
               [[r["explainer"], r["explanation"], r["model"], *(_num(r[s]) for s, _ in SCORES), r["detection_n"]]
                for r in sorted(mine, key=lambda r: _order(r["explainer"]))], table="explanations", feature=fid)
