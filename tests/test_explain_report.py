"""The Explanations section of `actstore report INDEX` (services/report/explanations.py): on a copy of the service
index with an explanations.parquet written by services.explain.layout, its numbers equal a plain computation of our
own (medians, means, the paired share of features the VLM explains better), the best and worst explained features
come in score order with their images, and the page renders in headless Chromium; with one explainer only, with
scores missing, and without the file (no section)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from test_browser import ARTIFACTS, Node, chromium
from test_report import decoded, plots, report, values

from services.explain.layout import write_explanations
from services.report.explanations import EXTREMES

SCORES = ("detection_accuracy", "detection_auroc", "embedding_auroc")
VOCABULARY, VLM = range(0, 30), range(10, 40)
"""Features each explainer explained: 20 have both."""


def scores_of(features: range, seed: int, null_every: dict[str, int]) -> dict[str, list[float | None]]:
    """Scores on a 0.05 grid (so that some tie), every n-th feature's score null; float32 as the file holds them."""
    rng = np.random.default_rng(seed)
    out = {}
    for score in SCORES:
        grid = np.float32(rng.integers(0, 21, len(features)) / 20).tolist()
        every = null_every.get(score)
        out[score] = [None if every is not None and (every == 1 or f % every == 0) else v
                      for f, v in zip(features, grid)]
    return out


def table_of(rows: dict[str, tuple[range, dict[str, list]]]) -> pa.Table:
    """An explanations table: per explainer, its features and their scores."""
    cols: dict[str, list] = {k: [] for k in ("feature", "explainer", "explanation", "model", "judge", "words",
                                             "word_scores", "shown", "detection_n", *SCORES)}
    for explainer, (features, scores) in rows.items():
        for j, f in enumerate(features):
            judged = scores["detection_accuracy"][j] is not None
            cols["feature"].append(f)
            cols["explainer"].append(explainer)
            cols["explanation"].append(f"{explainer} words for feature {f}")
            cols["model"].append("open_clip:ViT-B-32" if explainer == "vocabulary" else "openai:vlm@127.0.0.1")
            cols["judge"].append("openai:judge@127.0.0.1" if judged else None)
            cols["words"].append([f"w{f}"] if explainer == "vocabulary" else [])
            cols["word_scores"].append([0.25] if explainer == "vocabulary" else [])
            cols["shown"].append([0, 1])
            cols["detection_n"].append(16 if judged else 0)
            for s in SCORES:
                cols[s].append(scores[s][j])
    return pa.table(cols)


def with_explanations(index_dir: Path, tmp_path: Path, table: pa.Table | None) -> Path:
    """A copy of the index (the session's stays untouched), with `table` as its explanations."""
    copy = shutil.copytree(index_dir, tmp_path / "index")
    if table is not None:
        write_explanations(copy, table)
    return copy


def section(page: Node) -> list[Node]:
    return [h for h in page.find_all("h2") if h.attrs.get("data-section") == "explanations"]


def cells(page: Node, name: str) -> list[list[str]]:
    (table,) = [t for t in page.find_all("table") if t.attrs.get("data-table") == name]
    return [[td.all_text() for td in tr.find_all("td")] for tr in table.find_all("tr")[1:]]


def explained(page: Node, rank: str) -> list[int]:
    return [int(d.attrs["data-feature"]) for d in page.find_all("div", "explained") if d.attrs["data-rank"] == rank]


def by_hand(features: range, score: list) -> dict[int, float]:
    return {f: float(v) for f, v in zip(features, score) if v is not None}


def fmt(v: float) -> str:
    return f"{v:.3f}"


@pytest.fixture(scope="module")
def both() -> dict[str, tuple[range, dict[str, list]]]:
    """Vocabulary without detection probabilities (AUROC null) and some nulls; the VLM with nulls elsewhere."""
    return {"vocabulary": (VOCABULARY, scores_of(VOCABULARY, 1, {"detection_accuracy": 7, "detection_auroc": 1,
                                                                   "embedding_auroc": 11})),
            "vlm": (VLM, scores_of(VLM, 2, {"detection_accuracy": 9, "detection_auroc": 4}))}


def test_numbers_order_and_rendering(index_dir, tmp_path, both):
    out = tmp_path / "index.html"
    page = report(with_explanations(index_dir, tmp_path, table_of(both)), out, features=1, images=2)
    assert len(section(page)) == 1

    # the distributions: counts, nulls and medians per explainer and score, as the table and the plot say
    (hist,) = plots(page, "explanation-scores")
    drawn = values(hist)
    table = {(r[0], r[1]): r[2:] for r in cells(page, "explanation-scores")}
    labels = {"detection_accuracy": "detection balanced accuracy", "detection_auroc": "detection AUROC",
              "embedding_auroc": "embedding AUROC"}
    for explainer, (features, scores) in both.items():
        for s in SCORES:
            got = np.array([v for v in scores[s] if v is not None], dtype=np.float64)
            d = drawn[s][explainer]
            assert (d["n"], d["missing"]) == (got.size, len(features) - got.size), (explainer, s)
            assert d["counts"] == np.histogram(got, bins=drawn["edges"])[0].tolist()
            if got.size:
                assert d["median"] == pytest.approx(np.median(got), abs=1e-12)
                want = [str(got.size), str(len(features) - got.size), fmt(np.median(got)), fmt(np.mean(got))]
            else:
                assert d["median"] is None
                want = ["0", str(len(features)), "n/a", "n/a"]
            assert table[(explainer, labels[s])] == want, (explainer, s)

    # the VLM against the vocabulary: paired per score on the features both have it for
    (scatter,) = plots(page, "vlm-vs-vocabulary")
    paired_rows = {r[0]: r[1:] for r in cells(page, "vlm-vs-vocabulary")}
    for s in SCORES:
        vlm, voc = by_hand(VLM, both["vlm"][1][s]), by_hand(VOCABULARY, both["vocabulary"][1][s])
        common = sorted(set(vlm) & set(voc))
        d, row = values(scatter)[s], paired_rows[labels[s]]
        assert d["n"] == len(common) == int(row[0])
        if not common:  # the vocabulary has no detection AUROC
            assert s == "detection_auroc" and d["win_share"] is None and row[1:] == ["n/a"] * 6
            continue
        v, b = np.array([vlm[f] for f in common]), np.array([voc[f] for f in common])
        wins = sum(vlm[f] > voc[f] for f in common)
        assert d["vlm_wins"] == wins and d["win_share"] == pytest.approx(wins / len(common))
        assert d["ties"] == sum(vlm[f] == voc[f] for f in common)
        assert d["vlm"]["median"] == pytest.approx(np.median(v)) and d["vocabulary"]["mean"] == pytest.approx(b.mean())
        assert row[1:5] == [fmt(np.median(v)), fmt(np.median(b)), fmt(v.mean()), fmt(b.mean())]
        assert row[5] == f"{wins / len(common):.1%} ({wins} of {len(common)})"

    # best and worst: by the VLM's detection accuracy, ties by feature id, each with its explanations and images
    ranked = by_hand(VLM, both["vlm"][1]["detection_accuracy"])
    assert len(set(ranked.values())) < len(ranked), "the scores tie somewhere (the grid is coarse)"
    best = sorted(ranked, key=lambda f: (-ranked[f], f))[:EXTREMES]
    worst = [f for f in sorted(ranked, key=lambda f: (ranked[f], f)) if f not in best][:EXTREMES]
    assert explained(page, "best") == best and explained(page, "worst") == worst
    for div in page.find_all("div", "explained"):
        fid = int(div.attrs["data-feature"])
        assert f"({fmt(ranked[fid])}): feature #{fid}" in div.find_all("h4")[0].all_text()
        rows = cells(div, "explanations")
        assert [r[0] for r in rows] == [e for e in ("vocabulary", "vlm") if fid in both[e][0]]
        assert rows[-1][1] == f"vlm words for feature {fid}" and rows[-1][3] == fmt(ranked[fid])
        images = [decoded(img) for img in div.find_all("img")]
        assert 0 < len(images) <= 2 and all(int(t.attrs["data-feature"]) == fid for t in div.find_all("figure"))
    # rendered from disk: the lower half of a tall shot (the best and worst features' tiles) is not blank
    shot = tmp_path / "shot.png"
    chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1400,6000")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-explanations.png")
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)[3000:]
    assert np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size > 500, "rendered nearly blank"


def test_extremes_are_disjoint_with_few_features():
    from services.report.explanations import extremes

    best, worst = extremes(np.array([7, 3, 5]), np.array([0.5, 0.9, 0.5]), 5)
    assert best.tolist() == [3, 5] and worst.tolist() == [7]
    best, worst = extremes(np.array([4]), np.array([0.2]), 5)
    assert best.tolist() == [4] and worst.tolist() == []


def test_only_vocabulary_ranks_by_its_embedding_auroc_without_a_judge(index_dir, tmp_path):
    scores = scores_of(VOCABULARY, 3, {"detection_accuracy": 1, "detection_auroc": 1, "embedding_auroc": 4})
    page = report(with_explanations(index_dir, tmp_path, table_of({"vocabulary": (VOCABULARY, scores)})),
                  tmp_path / "index.html", features=1, images=1)
    assert not plots(page, "vlm-vs-vocabulary")
    assert "only vocabulary explanations: nothing to set the VLM against" in page.all_text()
    assert "ranked by the vocabulary explanation's embedding AUROC (22 features scored" in page.all_text()
    ranked = by_hand(VOCABULARY, scores["embedding_auroc"])
    assert explained(page, "best") == sorted(ranked, key=lambda f: (-ranked[f], f))[:EXTREMES]
    table = {(r[0], r[1]): r[2:] for r in cells(page, "explanation-scores")}
    assert table[("vocabulary", "detection balanced accuracy")] == ["0", "30", "n/a", "n/a"]


def test_only_vlm_without_judge_ranks_by_its_embedding_auroc(index_dir, tmp_path):
    scores = scores_of(VLM, 4, {"detection_accuracy": 1, "detection_auroc": 1})
    page = report(with_explanations(index_dir, tmp_path, table_of({"vlm": (VLM, scores)})),
                  tmp_path / "index.html", features=1, images=1)
    assert "only vlm explanations" in page.all_text() and not plots(page, "vlm-vs-vocabulary")
    ranked = by_hand(VLM, scores["embedding_auroc"])
    assert explained(page, "worst") == sorted(ranked, key=lambda f: (ranked[f], f))[:EXTREMES]


def test_no_scores_at_all_ranks_nothing(index_dir, tmp_path):
    scores = scores_of(VLM, 5, {s: 1 for s in SCORES})
    page = report(with_explanations(index_dir, tmp_path, table_of({"vlm": (VLM, scores)})),
                  tmp_path / "index.html", features=1, images=1)
    assert len(section(page)) == 1 and not page.find_all("div", "explained")
    assert "no explanation of the SAE's features has a score: nothing to rank" in page.all_text()


def test_no_explanations_no_section(index_dir, tmp_path):
    page = report(with_explanations(index_dir, tmp_path, None), tmp_path / "index.html", features=1, images=1)
    assert not section(page) and not plots(page, "explanation-scores") and not page.find_all("div", "explained")
    assert len(plots(page, "density")) == 1, "the rest of the index report is there"
