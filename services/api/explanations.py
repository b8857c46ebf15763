"""A feature index's explanations (explanations.parquet, from `actstore explain`), without HTTP: each feature's
explanations with their scores, the one a list shows, and ranked full-text search over them.

The table stays an Arrow table sorted by feature (a feature's rows are one slice), without the images the explainers
saw, plus one int64 per feature (the row a list shows): ~16 MB at 65,536 features x 2 explainers. Arrow is driven
without Python scalars or `pa.array` here (their first use imports pandas, as Array.to_numpy's does:
services.index.layout.numpy_view). Search is SQLite's FTS5 from the standard library: an in-memory table of one
document per row (its explanation, and any of its vocabulary words the explanation does not already hold), built once
per worker process on its first query (under a lock; ~25 MB at 65,536 x 2), ranked by bm25.

The user's query is never FTS5 syntax: it is cut into words (runs of letters and digits; the rest separates them,
at most MAX_TERMS words), each one searched as a quoted string, whole or as a prefix, so that `"`, `*`, `(`, `OR`
or `NEAR` are plain words or separators. Every word must match; a whole word scores above a longer one it begins
("red" finds "reddish" below "red"). Hits are features, each at its best-ranked explanation.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actstore.errors import CorruptDataError, NotFoundError
from services.explain.layout import EXPLANATIONS, read_explanations
from services.index.layout import numpy_view

__all__ = ["LISTED", "MAX_TERMS", "NO_EXPLANATIONS", "Explanations", "Hits", "search_terms"]

NO_EXPLANATIONS = "this index has no explanations: run `actstore explain --index DIR` on it, then restart the service"
MAX_TERMS = 16
"""Words of a query searched; the rest are ignored."""
LISTED = ("vlm", "vocabulary")
"""Which of a feature's explanations the feature list and the atlas show: the first of these it has."""
SHOWN = ("explainer", "explanation", "model", "judge", "words", "word_scores", "detection_accuracy",
         "detection_auroc", "detection_n", "embedding_auroc")
"""A feature's explanation as GET /features/{fid} gives it (the images the explainer saw are left out)."""
_FLOAT32 = ("detection_accuracy", "detection_auroc", "embedding_auroc")
_WORD = re.compile(r"[^\W_]+")


def search_terms(q: str) -> list[str]:
    """The words of a query, as searched: runs of letters and digits, at most MAX_TERMS."""
    return _WORD.findall(q)[:MAX_TERMS]


def _indices(rows: np.ndarray) -> pa.Array:
    """Row numbers as an Arrow array, without pa.array."""
    rows = np.ascontiguousarray(rows, np.int64)
    return pa.Array.from_buffers(pa.int64(), rows.size, [None, pa.py_buffer(rows)])


def _feature_ids(table: pa.Table, n_features: int) -> np.ndarray:
    """The table's feature column; a CorruptDataError when one is null or not a feature of the SAE."""
    try:
        feature = numpy_view(table.column("feature")).astype(np.int64)
    except ValueError:  # a null
        feature = None
    if feature is None or feature.min() < 0 or feature.max() >= n_features:
        raise CorruptDataError(f"{EXPLANATIONS}: feature ids null or outside [0, {n_features})", key=EXPLANATIONS)
    return feature


def _f32(v: float | None) -> float | None:
    """A float32 as its shortest decimal (0.9, not 0.8999999761581543); None stays None."""
    return None if v is None else float(str(np.float32(v)))


@dataclass(frozen=True)
class Hits:
    """Features found by a search, best first: each feature's best-ranked row of the table and its score
    (bm25 negated: higher is better)."""

    features: np.ndarray
    rows: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.features.size)

    def where(self, keep: np.ndarray) -> Hits:
        """The hits whose feature `keep` (one bool per feature) holds, in the same order."""
        inside = keep[self.features]
        return Hits(self.features[inside], self.rows[inside], self.scores[inside])

    def page(self, offset: int, limit: int) -> Hits:
        s = slice(offset, offset + limit)
        return Hits(self.features[s], self.rows[s], self.scores[s])


_NONE = Hits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))


class Explanations:
    """The explanations of an index's features (`table`: services.explain.layout's, or None when the index has
    none); a CorruptDataError when the table names features the SAE does not have."""

    def __init__(self, table: pa.Table | None, n_features: int) -> None:
        self.table: pa.Table | None = None
        self.feature = np.zeros(0, np.int64)
        self.listed = np.full(n_features, -1, np.int64)  # per feature, the row a list shows (-1: none)
        self._fts: sqlite3.Connection | None = None
        self._lock = Lock()
        if table is None:
            return
        order = pc.sort_indices(table, [("feature", "ascending"), ("explainer", "ascending")])  # "vlm" first
        self.table = table.take(order).select(SHOWN)
        self.feature = _feature_ids(table, n_features)[numpy_view(order)] if table.num_rows else self.feature
        explainer = pc.dictionary_encode(self.table.column("explainer"), null_encoding="encode").combine_chunks()
        codes, names = numpy_view(explainer.indices), explainer.dictionary.to_pylist()
        has_text = np.array([bool(t) for t in self.table.column("explanation").to_pylist()], dtype=bool)
        for name in reversed(LISTED):  # the first of LISTED written last
            rows = np.flatnonzero(has_text & (codes == names.index(name))) if name in names else []
            self.listed[self.feature[rows]] = rows

    @classmethod
    def read(cls, index: str | Path, n_features: int) -> Explanations:
        """The index's explanations (none when it has no explanations.parquet), with the memory that reading and
        sorting them took given back to the system (Arrow's pool keeps it otherwise: ~70 MB at 65,536 x 2 rows)."""
        explanations = cls(read_explanations(index), n_features)
        pa.default_memory_pool().release_unused()
        return explanations

    def of(self, fid: int) -> list[dict[str, Any]]:
        """The feature's explanations (SHOWN's fields; nulls as None), in explainer order; [] when it has none."""
        if self.table is None:
            return []
        lo, hi = np.searchsorted(self.feature, [fid, fid + 1]).tolist()
        return [self._public(row) for row in self.table.slice(lo, hi - lo).to_pylist()]

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, **{c: _f32(row[c]) for c in _FLOAT32}, "words": row["words"] or [],
                "word_scores": [_f32(v) for v in row["word_scores"] or []], "detection_n": row["detection_n"] or 0}

    def listed_of(self, ids: np.ndarray) -> list[str | None]:
        """The explanation a list shows for each of the features `ids` (LISTED's first), None where none."""
        if self.table is None:
            return [None] * len(ids)
        rows = self.listed[ids]
        found = iter(self.table.column("explanation").take(_indices(rows[rows >= 0])).to_pylist())
        return [next(found) if r >= 0 else None for r in rows.tolist()]

    def matches(self, hits: Hits) -> list[dict[str, Any]]:
        """What each hit matched: the explanation's explainer, its text, the score."""
        if not len(hits):
            return []
        picked = self.table.select(["explainer", "explanation"]).take(_indices(hits.rows)).to_pylist()
        return [{**p, "score": s} for p, s in zip(picked, hits.scores.tolist())]

    def search(self, q: str) -> Hits:
        """The features whose explanations hold every word of `q`, best first (bm25; ties by feature id);
        a NotFoundError when the index has no explanations."""
        if self.table is None:
            raise NotFoundError(NO_EXPLANATIONS)
        terms = search_terms(q)
        if not terms:
            return _NONE
        query = " AND ".join(f'("{t}" OR "{t}"*)' for t in terms)
        with self._lock:
            found = self._index().execute("SELECT rowid, rank FROM docs WHERE docs MATCH ? ORDER BY rank, rowid",
                                          (query,)).fetchall()
        if not found:
            return _NONE
        rows = np.array([r for r, _ in found], np.int64)
        scores = -np.array([s for _, s in found], np.float64)
        features = self.feature[rows]
        _, first = np.unique(features, return_index=True)  # each feature at its best row
        first.sort()
        return Hits(features[first], rows[first], scores[first])

    def _index(self) -> sqlite3.Connection:
        """The FTS5 table of the explanations, built on first use (the caller holds the lock)."""
        if self._fts is None:
            db = sqlite3.connect(":memory:", check_same_thread=False)
            db.execute("CREATE VIRTUAL TABLE docs USING fts5(text, tokenize='unicode61 remove_diacritics 2')")
            texts = self.table.column("explanation").to_pylist()
            words = self.table.column("words").to_pylist()
            db.executemany("INSERT INTO docs(rowid, text) VALUES (?, ?)",
                           ((i, " ".join([t or "", *(w for w in ws or [] if w not in (t or ""))]))
                            for i, (t, ws) in enumerate(zip(texts, words))))
            db.commit()
            self._fts = db
        return self._fts
