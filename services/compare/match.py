"""From a similarity matrix to matches: best partners both ways, mutual pairs, top-k overlap, a one-to-one
assignment, and the summary researchers quote.

The similarity matrix S (F_a, F_b) is used in place: dead columns are masked, never copied, so the
matrix is the only F_a x F_b object in memory.

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

__all__ = ["Matches", "assign", "best_matches", "jaccard", "distribution"]

_COLUMN_BLOCK = 1024
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


def best_matches(sim: torch.Tensor, live_a: torch.Tensor, live_b: torch.Tensor) -> Matches:
    """Best partner of every live feature, both ways; `sim` has its dead rows and columns masked in place."""
    for dim, live in ((0, live_a), (1, live_b)):
        dead = torch.ones(sim.shape[dim], dtype=torch.bool, device=sim.device)
        dead[live] = False
        sim.masked_fill_(dead.unsqueeze(1 - dim), -np.inf)
    if not live_a.numel() or not live_b.numel():
        none = torch.zeros(0, dtype=torch.int64, device=sim.device)
        return Matches(live_a, none, none.float(), none.bool(), live_b, none, none.float(), none.bool())
    sim_a, best_b = sim.max(dim=1)
    sim_b, best_a = sim.max(dim=0)
    return Matches(live_a, best_b[live_a], sim_a[live_a], best_a[best_b[live_a]] == live_a,
                   live_b, best_a[live_b], sim_b[live_b], best_b[best_a[live_b]] == live_b)


def jaccard(top_a: torch.Tensor, top_b: torch.Tensor) -> torch.Tensor:
    """Row-wise |A ∩ B| / |A ∪ B| of two (n, k) tables of row ids (-1 = none); 0 when both are empty."""
    valid_a, valid_b = top_a >= 0, top_b >= 0
    inter = ((top_a.unsqueeze(2) == top_b.unsqueeze(1)) & valid_a.unsqueeze(2)).sum((1, 2))
    union = valid_a.sum(1) + valid_b.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter, dtype=torch.float32)).float()


def _candidates(sim: torch.Tensor, c: int) -> tuple[np.ndarray, ...]:
    """(rows, cols, similarity) of each feature's c most similar partners, both ways, similarity > 0 (dead
    features are masked to -inf by best_matches, so they drop out here)."""
    n_a, n_b = sim.shape
    if not n_a or not n_b:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    vals, cols = sim.topk(min(c, n_b), dim=1)
    parts = [(torch.arange(n_a, device=sim.device).unsqueeze(1).expand_as(cols), cols, vals)]
    for start in range(0, n_b, _COLUMN_BLOCK):
        vals, rows = sim[:, start:start + _COLUMN_BLOCK].topk(min(c, n_a), dim=0)
        cols = torch.arange(start, start + rows.shape[1], device=sim.device)
        parts.append((rows, cols.unsqueeze(0).expand_as(rows), vals))
    rows, cols, vals = (torch.cat([p[i].reshape(-1) for p in parts]).cpu().numpy() for i in range(3))
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    _, first = np.unique(rows * n_b + cols, return_index=True)  # a pair picked both ways is one edge
    return rows[first], cols[first], vals[first]


def assign(sim: torch.Tensor, live_a: torch.Tensor, candidates: int) -> pa.Table:
    """The one-to-one pairing of live features maximizing summed similarity (see the module docstring);
    `sim` as best_matches left it (dead features masked)."""
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows, cols, vals = _candidates(sim, candidates)
    n_a, n_b = sim.shape
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
    s = sim[torch.from_numpy(fa).to(sim.device), torch.from_numpy(fb).to(sim.device)].cpu().numpy()
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
