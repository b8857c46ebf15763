"""The comparison the service was started with (`--compare DIR`, from `actstore compare`), without HTTP.

The served index must be side A or side B of the comparison (its recorded index folder, compared as absolute
paths); the other side is "the other SAE". `MatchReader` holds, per feature of the served SAE, its best match
(matches_<side>.parquet) and its assigned partner (assignment.parquet) as dense arrays, and opens the other
side's index, when the comparison recorded one, for the matched features' top images and heatmaps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from actstore.errors import ConfigError, CorruptDataError, NotFoundError
from services.api.reader import IndexReader
from services.compare import ASSIGNMENT, MATCHES, read_comparison, read_table, similarity_column

__all__ = ["MatchReader"]

OTHER = {"a": "b", "b": "a"}


class MatchReader:
    """Each feature's matches in the other SAE of a comparison whose side A or B is the served index."""

    def __init__(self, path: str | Path, served: IndexReader, storage_options: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.summary = read_comparison(self.path)
        here = served.path.resolve()
        sides = [s for s in ("a", "b") if (index := self.summary[s].get("index")) and Path(index).resolve() == here]
        if not sides:
            raise ConfigError(f"{self.path}: the served index {here} is neither side of this comparison "
                              f"(a: {self.summary['a'].get('index')}, b: {self.summary['b'].get('index')})")
        self.side, self.other_side = sides[0], OTHER[sides[0]]
        if int(self.summary[self.side]["d_sae"]) != served.n_features:
            raise CorruptDataError(f"{self.path}: side {self.side} has d_sae={self.summary[self.side]['d_sae']}, "
                                   f"the served index {served.n_features}", key="summary.json")
        other_index = self.summary[self.other_side].get("index")  # None: matches come without images
        self.other = IndexReader(other_index, storage_options) if other_index else None
        self.best, self.best_stats = self._best(served.n_features)
        self.partner, self.partner_similarity = self._assignment(served.n_features)

    def _best(self, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per served feature: its best match (-1: none, a dead feature) and that match's statistics."""
        table = read_table(self.path, MATCHES[self.side])
        rows = table.column(f"feature_{self.side}").to_numpy().astype(np.int64)
        self._check_ids(rows, n, MATCHES[self.side])
        best = np.full(n, -1, np.int64)
        best[rows] = table.column(f"best_{self.other_side}").to_numpy()
        stats = {}
        column = similarity_column(self.summary)
        for name, dtype in (("similarity", np.float32), ("mutual", bool), ("jaccard_topk", np.float32),
                            ("max_diff", np.float32)):
            stats[name] = np.zeros(n, dtype)
            stats[name][rows] = table.column(column if name == "similarity" else name).to_numpy()
        return best, stats

    def _assignment(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per served feature: its partner in the one-to-one assignment (-1: none) and their similarity."""
        table = read_table(self.path, ASSIGNMENT)
        rows = table.column(f"feature_{self.side}").to_numpy().astype(np.int64)
        self._check_ids(rows, n, ASSIGNMENT)
        partner, similarity = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        partner[rows] = table.column(f"feature_{self.other_side}").to_numpy()
        similarity[rows] = table.column(similarity_column(self.summary)).to_numpy()
        return partner, similarity

    def _check_ids(self, rows: np.ndarray, n: int, name: str) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise CorruptDataError(f"{self.path / name}: feature ids outside [0, {n})", key=name)

    def images(self) -> IndexReader:
        """The other side's index, whose dataset its images are served from."""
        if self.other is None:
            raise NotFoundError(f"side {self.other_side} of the comparison has no index: no images to show")
        return self.other

    def describe(self) -> dict[str, Any]:
        """The other SAE: its side, SAE, store, layer, backbone, width, and index (null: no images)."""
        o = self.summary[self.other_side]
        return {"side": self.other_side, "sae": o.get("sae"), "store": o.get("store"), "layer": str(o.get("layer")),
                "backbone": o.get("backbone") or {}, "d_sae": int(o["d_sae"]), "index": o.get("index")}

    def matches(self, fid: int, k: int | None) -> dict[str, Any]:
        """The feature's best match in the other SAE and, when different, its assigned partner, each with the
        other index's top images (at most k); no matches for a feature the comparison has no row for (dead)."""
        found = []
        best, partner = int(self.best[fid]), int(self.partner[fid])
        if best >= 0:
            s = self.best_stats
            found.append({"feature": best, "similarity": float(s["similarity"][fid]), "best": True,
                          "assigned": partner == best, "mutual": bool(s["mutual"][fid]),
                          "jaccard_topk": float(s["jaccard_topk"][fid]), "max_diff": float(s["max_diff"][fid])})
        if partner >= 0 and partner != best:
            found.append({"feature": partner, "similarity": float(self.partner_similarity[fid]), "best": False,
                          "assigned": True, "mutual": None, "jaccard_topk": None, "max_diff": None})
        for m in found:
            m.update(self._other_feature(m["feature"], k))
        return {"id": fid, "side": self.side, "by": self.summary.get("by"), "level": self.summary.get("level"),
                "other": self.describe(), "matches": found}

    def _other_feature(self, g: int, k: int | None) -> dict[str, Any]:
        """The other index's view of its feature g: density, max activation, patch grid, top images."""
        if self.other is None:
            return {"freq_patches": None, "max_act": None, "grid": None, "top_images": []}
        self.other.check_feature(g)
        f = self.other.features
        return {"freq_patches": float(f["freq_patches"][g]), "max_act": float(f["max_act"][g]),
                "grid": self.other.meta["grid"], "top_images": self.other.top_images(g, k)}
