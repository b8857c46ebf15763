"""From a similarity matrix to matches: best partners both ways, mutual pairs, top-k overlap, a one-to-one
assignment, and the summary researchers quote.

The similarity matrix S (F_a, F_b) arrives in tiles of rows (`Scan.add`), each used in place (dead features
masked, never copied) and dropped: only each feature's best partner and `candidates` most similar partners,
both ways, are kept, so the whole matrix need never be in memory. One tile of every row is the whole matrix.

The assignment maximizes the summed similarity of a one-to-one pairing (a pair with similarity <= 0
adds nothing and is left out). It is solved as a minimum-weight full matching on a sparse graph
(scipy's LAPJVsp): each live feature's `candidates` most similar partners, both ways, plus one
"unpaired" edge per feature of A; weights 2 - s, and 2 for staying unpaired. With candidates >= the
number of live features this is exactly the dense assignment (tests compare it with
scipy.optimize.linear_sum_assignment); with fewer it is the dense one wherever the optimal partner of a
feature is among its candidates, which is the case for every match worth reporting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

__all__ = ["COLUMN_BLOCK", "Matches", "Scan", "assign", "distribution", "jaccard"]

COLUMN_BLOCK = 1024
"""Columns per slice when picking column-wise candidates (bounds the temporary to F_a x 1024)."""


@dataclass(frozen=True)
class Matches:
    """Both sides' best partners over the live features (all indices are feature ids)."""

    live_a: torch.Tensor
    best_b: torch.Tensor
    sim_a: torch.Tensor
    mutual_a: torch.Tensor
    live_b: torch.Tensor
    best_a: torch.Tensor
    sim_b: torch.Tensor
    mutual_b: torch.Tensor


class Scan:
    """Best partners and candidate partners of the live features, from the similarity matrix tile by tile."""

    def __init__(self, live_a: torch.Tensor, live_b: torch.Tensor, n_a: int, n_b: int, candidates: int) -> None:
        dev = live_a.device
        self.live_a, self.live_b, self.c = live_a, live_b, candidates
        self.dead_a = torch.ones(n_a, dtype=torch.bool, device=dev)
        self.dead_a[live_a] = False
        self.dead_b = torch.ones(n_b, dtype=torch.bool, device=dev)
        self.dead_b[live_b] = False
        self.sim_a = torch.full((n_a,), -np.inf, device=dev)
        self.best_b = torch.zeros(n_a, dtype=torch.int64, device=dev)
        self.sim_b = torch.full((n_b,), -np.inf, device=dev)
        self.best_a = torch.zeros(n_b, dtype=torch.int64, device=dev)
        self.col_vals = torch.full((0, n_b), -np.inf, device=dev)  # each column's c best rows so far
        self.col_rows = torch.zeros((0, n_b), dtype=torch.int64, device=dev)
        self._row_edges: list[tuple[np.ndarray, ...]] = []

    def add(self, start: int, sim: torch.Tensor) -> None:
        """Rows start .. start + len(sim) of the similarity matrix (used in place), in increasing order."""
        n_rows, n_b = sim.shape
        sim.masked_fill_(self.dead_a[start:start + n_rows].unsqueeze(1), -np.inf)
        sim.masked_fill_(self.dead_b.unsqueeze(0), -np.inf)
        if not n_rows or not n_b:
            return
        self.sim_a[start:start + n_rows], self.best_b[start:start + n_rows] = sim.max(dim=1)
        col_max, col_arg = sim.max(dim=0)
        better = col_max > self.sim_b  # ties keep the earlier row, as one max over the whole matrix does
        self.sim_b = torch.where(better, col_max, self.sim_b)
        self.best_a = torch.where(better, col_arg + start, self.best_a)
        vals, cols = sim.topk(min(self.c, n_b), dim=1)
        rows = torch.arange(start, start + n_rows, device=sim.device).unsqueeze(1).expand_as(cols)
        self._row_edges.append(tuple(t.reshape(-1).cpu().numpy() for t in (rows, cols, vals)))
        parts_v, parts_r = [], []
        for c0 in range(0, n_b, COLUMN_BLOCK):
            v, r = sim[:, c0:c0 + COLUMN_BLOCK].topk(min(self.c, n_rows), dim=0)
            parts_v.append(v)
            parts_r.append(r + start)
        vals = torch.cat([self.col_vals, torch.cat(parts_v, dim=1)])
        rows = torch.cat([self.col_rows, torch.cat(parts_r, dim=1)])
        self.col_vals, pick = vals.topk(min(self.c, vals.shape[0]), dim=0)
        self.col_rows = rows.gather(0, pick)

    def matches(self) -> Matches:
        """Best partner of every live feature, both ways."""
        live_a, live_b = self.live_a, self.live_b
        if not live_a.numel() or not live_b.numel():
            none = torch.zeros(0, dtype=torch.int64, device=live_a.device)
            return Matches(live_a, none, none.float(), none.bool(), live_b, none, none.float(), none.bool())
        best_b, best_a = self.best_b, self.best_a
        return Matches(live_a, best_b[live_a], self.sim_a[live_a], best_a[best_b[live_a]] == live_a,
                       live_b, best_a[live_b], self.sim_b[live_b], best_b[best_a[live_b]] == live_b)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, similarity) of each live feature's c most similar partners, both ways, similarity > 0,
        each pair once, sorted by (row, col)."""
        n_b = self.dead_b.numel()
        cols = torch.arange(n_b, device=self.col_rows.device).unsqueeze(0).expand_as(self.col_rows)
        parts = [*self._row_edges, tuple(t.reshape(-1).cpu().numpy() for t in (self.col_rows, cols, self.col_vals))]
        rows, cols, vals = (np.concatenate([p[i] for p in parts]) for i in range(3))
        keep = vals > 0
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        _, first = np.unique(rows * n_b + cols, return_index=True)  # a pair picked both ways is one edge
        return rows[first], cols[first], vals[first]


def jaccard(top_a: torch.Tensor, top_b: torch.Tensor) -> torch.Tensor:
    """Row-wise |A ∩ B| / |A ∪ B| of two (n, k) tables of row ids (-1 = none); 0 when both are empty."""
    valid_a, valid_b = top_a >= 0, top_b >= 0
    inter = ((top_a.unsqueeze(2) == top_b.unsqueeze(1)) & valid_a.unsqueeze(2)).sum((1, 2))
    union = valid_a.sum(1) + valid_b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter, dtype=torch.float32)).float()


def assign(edges: tuple[np.ndarray, np.ndarray, np.ndarray], live_a: torch.Tensor, n_a: int, n_b: int) -> pa.Table:
    """The one-to-one pairing of live features maximizing summed similarity (see the module docstring), over the
    candidate edges of Scan.edges."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols, vals = edges
    # edges a -> b at weight 2 - s (in [1, 2) for s in (0, 1]; scipy drops zero weights), and a -> its own
    # "unpaired" column at weight 2: every matching pairs every a once, so the least total weight is the
    # largest summed similarity
    a_ids = live_a.cpu().numpy()
    graph = coo_array((np.concatenate([2 - vals.astype(np.float64), np.full(a_ids.size, 2.0)]),
                       (np.concatenate([rows, a_ids]), np.concatenate([cols, n_b + a_ids]))),
                      shape=(n_a, n_b + n_a)).tocsr()
    graph = graph[a_ids]  # only live rows take part
    if graph.shape[0] == 0:
        return _pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    fa, fb = a_ids[matched_rows], matched_cols
    paired = fb < n_b
    fa, fb = fa[paired], fb[paired]
    s = vals[np.searchsorted(rows * n_b + cols, fa * n_b + fb)]  # edges are sorted by (row, col)
    order = np.argsort(-s, kind="stable")
    return _pairs(fa[order], fb[order], s[order])


def _pairs(fa: np.ndarray, fb: np.ndarray, s: np.ndarray) -> pa.Table:
    return pa.table({"feature_a": fa.astype(np.int32), "feature_b": fb.astype(np.int32),
                     "similarity": s.astype(np.float32)})


def distribution(best: np.ndarray) -> dict[str, object]:
    """The distribution of best similarities as researchers report it: mean, median, quantiles, counts above."""
    if best.size == 0:
        return {"n": 0, "mean": None, "median": None, "quantiles": {}, "above": {"0.5": 0, "0.7": 0, "0.9": 0}}
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    return {"n": int(best.size), "mean": float(best.mean()), "median": float(np.median(best)),
            "quantiles": {str(q): float(v) for q, v in zip(qs, np.quantile(best, qs))},
            "above": {t: int((best > float(t)).sum()) for t in ("0.5", "0.7", "0.9")}}
