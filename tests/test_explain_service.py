"""The features' explanations in the service (services.api.explanations) over real HTTP: each feature's explanations
and scores, the one a list shows, and GET /features?q= ranked as an independent bm25 (SQLite FTS5's formula,
computed here from the written table) ranks it, with paging, density filters and any query string.

The index is a copy of conftest's index_dir with an explanations table written into it (services.explain.layout's
write_explanations): vocabulary words for most features, VLM sentences for a third, and planted words.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from fastapi.testclient import TestClient

from actstore.errors import CorruptDataError
from services.api import create_app
from services.api.schemas import Atlas, Feature, FeaturePage
from services.explain.layout import SCHEMA, write_explanations
from conftest import SERVICE_D_SAE, _serve
from test_api import _free_port, fuzz

VOCABULARY = ("red", "blue", "green", "stripes", "dots", "circle", "square", "grass", "sky", "wood", "metal", "fur",
              "water", "sand", "brick", "glass", "leaf", "cloud", "stone", "rope", "silk", "ice", "smoke", "paper")
PLANTED = {17: "a zebrafish swimming past coral", 42: "zebrafishes schooling in a tank", 5: "café crème foam"}
"""VLM explanations planted: 17 holds the word exactly, 42 a longer word it begins; 99's vocabulary has "zebra"."""
UNEXPLAINED = 200
EMPTY_VLM = 3
"""Feature 3's VLM explanation is empty: lists show its vocabulary words."""


def get(url: str, **kw) -> requests.Response:
    return requests.get(url, timeout=30, **kw)


def explanation_rows(n_features: int, seed: int = 0) -> list[dict]:
    """Vocabulary rows (3 words) for every feature but UNEXPLAINED, VLM rows for every third one and the planted
    ones; scores random, some null."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n_features):
        if f == UNEXPLAINED:
            continue
        words = [str(w) for w in rng.choice(VOCABULARY, 3, replace=False)] + (["zebra"] if f == 99 else [])
        scored = bool(rng.random() < 0.8)
        rows.append({"feature": f, "explainer": "vocabulary", "explanation": ", ".join(words), "model": "clip:tiny",
                     "judge": None, "words": words, "word_scores": sorted(rng.random(len(words)).tolist())[::-1],
                     "shown": [1, 2], "detection_accuracy": None, "detection_auroc": None, "detection_n": 0,
                     "embedding_auroc": float(rng.random()) if scored else None})
        if f % 3 == 0 or f in PLANTED:
            text = PLANTED.get(f, "" if f == EMPTY_VLM else f"a {words[0]} {words[1]} texture")
            rows.append({"feature": f, "explainer": "vlm", "explanation": text, "model": "openai:m@127.0.0.1",
                         "judge": "openai:j@127.0.0.1", "words": [], "word_scores": [], "shown": [3],
                         "detection_accuracy": float(rng.random()), "detection_auroc": float(rng.random()) if scored
                         else None, "detection_n": 20, "embedding_auroc": None})
    return rows


def explained_copy(index: Path, out: Path, rows: list[dict]) -> Path:
    """A copy of the index (the session's stays untouched) with `rows` as its explanations table."""
    shutil.copytree(index, out)
    write_explanations(out, pa.Table.from_pylist(rows, schema=SCHEMA))
    return out


@pytest.fixture(scope="module")
def explained(index_dir, tmp_path_factory):
    """(service URL, index folder, the rows written) of an explained copy of index_dir."""
    rows = explanation_rows(SERVICE_D_SAE)
    index = explained_copy(index_dir, tmp_path_factory.mktemp("explained") / "index", rows)
    for url in _serve(create_app(index)):
        yield url, index, rows


# ---- an independent search: FTS5's bm25 over the same documents ----------------------------------------------

def words_of(text: str) -> list[str]:
    """unicode61 with remove_diacritics: lower case, accents dropped, runs of letters and digits."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return re.findall(r"[^\W_]+", plain)


def expected_hits(rows: list[dict], q: str, k1: float = 1.2, b: float = 0.75) -> list[tuple[int, float]]:
    """(feature, score) of every feature whose row holds each word of q whole or as a prefix, at its best row's
    bm25 (summed over the phrases "word" and "word"*), best first, ties by feature."""
    docs = [words_of(" ".join([r["explanation"], *(w for w in r["words"] if w not in r["explanation"])]))
            for r in rows]
    avgdl = sum(map(len, docs)) / len(docs)
    terms = words_of(q)[:16]
    if not terms:
        return []
    phrases = [p for t in terms for p in ((lambda w, t=t: w == t), (lambda w, t=t: w.startswith(t)))]
    tf = np.array([[sum(map(p, d)) for p in phrases] for d in docs], dtype=np.float64)
    n = (tf > 0).sum(0)
    idf = np.log((len(docs) - n + 0.5) / (n + 0.5))
    idf[idf <= 0] = 1e-6  # as FTS5 clamps it
    best: dict[int, float] = {}
    for r, d, f in zip(rows, docs, tf):
        if all(f[2 * i + 1] > 0 for i in range(len(terms))):
            score = float((idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(d) / avgdl))).sum())
            best[r["feature"]] = max(best.get(r["feature"], -math.inf), score)
    return sorted(best.items(), key=lambda fs: (-round(fs[1], 9), fs[0]))


def search(url: str, q: str, **params) -> dict:
    r = get(f"{url}/features", params={"q": q, "limit": 1000, **params})
    assert r.status_code == 200, (q, r.text)
    return r.json()


# ---- tests ----------------------------------------------------------------------------------------------------

def test_a_feature_shows_its_explanations_and_scores(explained):
    url, _, rows = explained
    for fid in (0, 17, 99, EMPTY_VLM, 4):
        body = get(f"{url}/features/{fid}").json()
        Feature.model_validate(body)
        want = sorted((r for r in rows if r["feature"] == fid), key=lambda r: r["explainer"])  # "vlm" first
        got = body["explanations"]
        assert [x["explainer"] for x in got] == [r["explainer"] for r in want], fid
        for x, r in zip(got, want):
            assert {k: x[k] for k in ("explanation", "model", "judge", "words", "detection_n")} == \
                {k: r[k] for k in ("explanation", "model", "judge", "words", "detection_n")}
            for k in ("detection_accuracy", "detection_auroc", "embedding_auroc"):
                assert (x[k] is None) == (r[k] is None) and (x[k] is None or x[k] == pytest.approx(r[k], rel=1e-6))
            assert x["word_scores"] == pytest.approx(r["word_scores"], rel=1e-6)
            assert "shown" not in x
        by = {r["explainer"]: r["explanation"] for r in want}
        assert body["explanation"] == (by.get("vlm") or by["vocabulary"]), fid
    assert get(f"{url}/features/{UNEXPLAINED}").json()["explanations"] == []
    assert get(f"{url}/features/{EMPTY_VLM}").json()["explanation"] == next(
        r["explanation"] for r in rows if r["feature"] == EMPTY_VLM and r["explainer"] == "vocabulary")


def test_the_list_shows_each_features_explanation(explained):
    url, _, rows = explained
    page = get(f"{url}/features", params={"limit": 1000}).json()
    FeaturePage.model_validate(page)
    by = {(r["feature"], r["explainer"]): r["explanation"] for r in rows}
    want = [by.get((f, "vlm")) or by.get((f, "vocabulary")) for f in range(SERVICE_D_SAE)]
    assert [f["explanation"] for f in page["features"]] == want
    assert page["features"][UNEXPLAINED]["explanation"] is None and "match" not in page["features"][0]


@pytest.mark.parametrize("q", ["zebrafish", "zebra", "red", "Red stripes", "texture", "café", "CAFE", "cr"])
def test_search_ranks_as_bm25_does(explained, q):
    url, _, rows = explained
    body = search(url, q)
    FeaturePage.model_validate(body)
    want = expected_hits(rows, q)
    assert body["total"] == len(want) > 0
    assert [f["id"] for f in body["features"]] == [f for f, _ in want]
    assert [f["match"]["score"] for f in body["features"]] == pytest.approx([s for _, s in want], rel=1e-6)
    for f in body["features"]:  # the matched explanation is one of the feature's and holds every word
        m = f["match"]
        row = next(r for r in rows if r["feature"] == f["id"] and r["explainer"] == m["explainer"])
        assert m["explanation"] == row["explanation"]
        text = words_of(" ".join([row["explanation"], *row["words"]]))
        assert all(any(w.startswith(t) for w in text) for t in words_of(q)), (q, m)


def test_a_whole_word_ranks_first(explained):
    url, _, _ = explained
    assert [f["id"] for f in search(url, "zebrafish")["features"]] == [17, 42]
    assert [f["id"] for f in search(url, "zebra")["features"]] == [99, 17, 42]
    assert [f["id"] for f in search(url, "coral ZEBRAFISH")["features"]] == [17]
    assert [f["id"] for f in search(url, "cafe")["features"]] == [5]


def test_search_pages_and_filters_by_density(explained):
    url, index, rows = explained
    everything = search(url, "red")
    ids = [f["id"] for f in everything["features"]]
    assert len(ids) > 10
    pages = [search(url, "red", offset=o, limit=4) for o in range(0, len(ids) + 4, 4)]
    assert [f["id"] for p in pages for f in p["features"]] == ids
    assert all(p["total"] == len(ids) and p["limit"] == 4 for p in pages) and pages[-1]["features"] == []
    freq = pq.read_table(index / "features.parquet").column("freq_patches").to_numpy()
    lo, hi = np.quantile(freq[freq > 0], [0.25, 0.75])
    filtered = search(url, "red", min_freq=lo, max_freq=hi, sort="-freq")  # the sort is unused with q
    want = [f for f, _ in expected_hits(rows, "red") if lo <= freq[f] <= hi]
    assert filtered["total"] == len(want) and [f["id"] for f in filtered["features"]] == want
    assert 0 < len(want) < len(ids)


@pytest.mark.parametrize("q", ['"', '""', '"zebrafish', "zebrafish*", "*", "(", ")", "(zebrafish", "zebrafish OR coral",
                               "OR", "AND", "NOT", "NEAR", "NEAR(zebrafish coral)", "NEAR(zebrafish coral, 2)",
                               "zebrafish NOT coral", "-zebrafish", "+red", "^red", "text:red", "{text}: red", "'",
                               "\\", "\x00red", "red\u0301", "🦓", "日本語", "zebrafish " * 16 + "unmatched",
                               "a" * 200, " ", "_", "red_stripes"])
def test_any_query_is_words(explained, q):
    """FTS5 syntax in a query is words and separators, never operators: no 5xx, the hits of its words."""
    url, _, rows = explained
    body = search(url, q)
    assert [f["id"] for f in body["features"]] == [f for f, _ in expected_hits(rows, q)], q
    if q.startswith("zebrafish " * 16):  # words past the 16th are not searched
        assert [f["id"] for f in body["features"]] == [17, 42]


def test_bad_queries_are_422_and_an_empty_one_browses(explained):
    url, _, _ = explained
    r = get(f"{url}/features", params={"q": "a" * 201})
    assert r.status_code == 422 and r.json()["detail"].startswith("query.q")
    assert get(f"{url}/features", params={"q": ""}).json() == get(f"{url}/features").json()


def test_fuzz_the_feature_routes_with_explanations(explained):
    url, _, _ = explained
    assert fuzz(url, max_examples=60, paths=("/features", "/features/{fid}")) == 2


def test_without_explanations_a_search_is_404(api_url):
    """The documented behaviour: the features come without explanations, and a search says how to make them."""
    r = get(f"{api_url}/features", params={"q": "red"})
    assert r.status_code == 404 and "actstore explain --index" in r.json()["detail"]
    assert get(f"{api_url}/features/0").json()["explanations"] == []
    assert {f["explanation"] for f in get(f"{api_url}/features").json()["features"]} == {None}


def test_the_atlas_carries_the_explanations(atlas_index_dir, tmp_path):
    rows = explanation_rows(64)
    index = explained_copy(atlas_index_dir, tmp_path / "index", rows)
    body = TestClient(create_app(index)).get("/atlas").json()
    Atlas.model_validate(body)
    by = {(r["feature"], r["explainer"]): r["explanation"] for r in rows}
    assert body["explanation"] == [by.get((f, "vlm")) or by.get((f, "vocabulary")) for f in range(64)]


def test_explanations_of_features_the_sae_lacks_refuse_to_start(index_dir, tmp_path):
    rows = explanation_rows(4)
    rows[-1]["feature"] = SERVICE_D_SAE
    index = explained_copy(index_dir, tmp_path / "index", rows)
    with pytest.raises(CorruptDataError, match=r"explanations\.parquet: feature ids"):
        create_app(index)


def test_the_service_process_imports_no_torch(explained, tmp_path):
    """`actstore serve` over the explained index, searched and asked for a feature: its import log (python -X
    importtime) names neither torch nor pandas."""
    _, index, _ = explained
    port, log = _free_port(), tmp_path / "imports.log"
    cmd = [sys.executable, "-X", "importtime", "-m", "actstore_cli", "serve", "--index", str(index),
           "--port", str(port)]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
        while True:
            try:
                get(f"{url}/healthz")
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() - t0 < 60, "the service did not start"
                time.sleep(0.05)
        assert [f["id"] for f in search(url, "zebrafish")["features"]] == [17, 42]
        assert get(f"{url}/features/17").json()["explanations"]
    finally:
        proc.terminate()
        proc.wait(10)
    imported = {line.rsplit("|", 1)[1].strip() for line in log.read_text().splitlines()
                if line.startswith("import time:")}
    assert "services.api.explanations" in imported and "sqlite3" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "pandas")}
