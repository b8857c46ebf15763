"""`actstore compare --side S1 --side S2 --side S3 ...`: several SAEs over the same images (CLIP, SigLIP, DINOv2,
V-JEPA, ...), every pair matched exactly as the two-sided comparison matches it, then summed up across the models:
what they share and what is unique to each.

    matrix      per ordered pair (row model, column model): the mean best similarity of the row model's live
                features in the column model, the share of them with a partner above 0.5 / 0.7 / 0.9 there, and
                per pair the mutual best matches
    groups      per feature, the models where its best match is above `threshold`, with its own: "shared by all",
                "CLIP+SigLIP", "unique"; counted per model, a few examples of each kept for the report

The budget is split evenly between the pairs, and every pair's similarity matrix is cut into as many tiles (T) as
the tightest pair needs in its share: the stores are read together, block by block, once per tile for every pair
(the first pass also gathers every pair's statistics) and once more for max_diff: T + 1 passes whatever the number
of sides, two when every matrix fits whole. Where that reads and encodes the stores more often than the pairs one
after another would (every pass reads every store; a pair's passes read two), or a share holds not even one row,
the pairs run one after another, each planned as the two-sided comparison plans it.
Either way each pair's numbers are those of `actstore compare --a I --b J` over the images every side may use (an
image rejected in any store is left out of every pair): bit for bit where its tiles are the same, else up to float32
rounding. Memory: each pair's (F_i, F_j) matrix or its tile, and per side a few numbers per feature; never images x
features.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actstore.budget import default_memory_gb
from actstore.config import public_config
from actstore.errors import ConfigError
from services.compare.layout import FORMAT_VERSION, PAIRS, SET_FORMAT, SHARED, SUMMARY
from services.compare.run import CompareConfig, Pair, Plan, Result, compare_pair, match_many, pair_plan, write_pair
from services.compare.sides import Side, check_pair, common_images, open_side

__all__ = ["THRESHOLDS", "compare_many", "joint_plans", "side_names"]

THRESHOLDS = ("0.5", "0.7", "0.9")
"""The matrix's shares of features with a partner above these."""
EXAMPLES = 4
"""Example features kept per side and group."""



def side_names(cfg: CompareConfig, sides: list[Side]) -> list[str]:
    """cfg.name, or each side's backbone name (with its layer, then its number, where that is not enough)."""
    if cfg.name:
        return list(cfg.name)
    names = [str(s.store.attrs.get("backbone", {}).get("name") or f"side {i + 1}") for i, s in enumerate(sides)]
    if len(set(names)) < len(names):
        names = [f"{n}@{s.spec.name}" for n, s in zip(names, sides)]
    if len(set(names)) < len(names):
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return names


def joint_plans(cfg: CompareConfig, sides: list[Side], pairs: list[Pair]) -> dict[Pair, Plan] | None:
    """Each pair's plan within an even share of the budget, every pair's matrix in as many tiles as the tightest
    pair needs (T), when reading all the stores together in T + 1 passes reads and encodes no more than the pairs one
    after another; None otherwise. Unless it costs more tiles, each pair stages as many rows per update as it would
    alone, so that its sums are added in the same order (with the same tiles, its tables are those of its own
    comparison, bit for bit); else fewer (the same numbers up to float32 rounding)."""
    share = (cfg.memory_gb or default_memory_gb()) / len(pairs)
    cross, width = cfg.by == "activations", {p: sides[p[0]].sae.cfg.d_sae for p in pairs}

    def passes(plans: dict[Pair, Plan]) -> int:
        """A pair's passes over the stores under its plan, the most of them."""
        return max((-(-width[p] // pl.tile) if cross else 1) + 1 for p, pl in plans.items())

    try:
        alone = {p: pair_plan(cfg, sides[p[0]], sides[p[1]]) for p in pairs}
    except ConfigError:
        return None
    options = []
    for own_rows in (True, False):
        try:
            options.append({p: pair_plan(cfg, sides[p[0]], sides[p[1]], share,
                                         rows_per_update=alone[p].rows_per_update if own_rows else None)
                            for p in pairs})
        except ConfigError:
            continue
    if not options:
        return None
    plans = min(options, key=passes)  # the pairs' own staging where it costs no more tiles
    tiles = passes(plans) - 1
    # each pass reads and encodes every store: together, (T + 1) x sides; one after another, 2 per pass of a pair
    if (tiles + 1) * len(sides) > sum(2 * passes({p: pl}) for p, pl in alone.items()):
        return None
    block = min(pl.images_per_block for pl in plans.values())
    return {p: replace(pl, images_per_block=block, tile=max(1, -(-width[p] // tiles)) if tiles > 1 else pl.tile)
            for p, pl in plans.items()}


def compare_many(cfg: CompareConfig, tmp: Path, progress: bool) -> dict[str, Any]:
    """Every pair of cfg.side, written into the folder `tmp` (see the module docstring); returns the summary."""
    device = torch.device(cfg.device)
    sides = [open_side(spec, f"side {i + 1}", cfg.storage_options, device) for i, spec in enumerate(cfg.side)]
    names = side_names(cfg, sides)
    ok = common_images(sides, names)
    pairs = list(itertools.combinations(range(len(sides)), 2))
    for i, j in pairs:
        check_pair(cfg, sides[i], sides[j], (names[i], names[j]))
    plans = joint_plans(cfg, sides, pairs)
    joint = plans is not None
    if plans is not None:
        results = match_many(cfg, sides, plans, ok, progress)
    else:
        plans = {(i, j): pair_plan(cfg, sides[i], sides[j]) for i, j in pairs}
        results = {(i, j): compare_pair(cfg, sides[i], sides[j], ok, plans[(i, j)], progress,
                                        f"{names[i]} x {names[j]}: ") for i, j in pairs}
    summaries = {}
    for (i, j), r in results.items():
        folder = f"{PAIRS}/{i + 1}-{j + 1}"
        pair_cfg = replace(cfg, a=cfg.side[i], b=cfg.side[j], side=(), name=(), out=str(Path(cfg.out) / folder))
        summaries[(i, j)] = write_pair(pair_cfg, sides[i], sides[j], r, ok, plans[(i, j)], tmp / folder)
    table, groups, examples = _shared(results, names, cfg.threshold)
    pq.write_table(table, tmp / SHARED)
    summary = {
        "format": SET_FORMAT, "format_version": FORMAT_VERSION, "config": public_config(cfg),
        "by": cfg.by, "level": cfg.level, "threshold": cfg.threshold, "n_images": int(ok.sum()),
        "names": names,
        "sides": [{"name": names[i], **side.describe(_fired(results, i))} for i, side in enumerate(sides)],
        "joint": joint, "passes": (max(s["plan"]["passes"] for s in summaries.values()) if joint
                                   else sum(s["plan"]["passes"] for s in summaries.values())),
        "pairs": [{"a": i, "b": j, "folder": f"{PAIRS}/{i + 1}-{j + 1}", "mutual": s["mutual"],
                   "assignment": s["assignment"], "plan": s["plan"]} for (i, j), s in summaries.items()],
        "matrix": _matrix(summaries, len(sides)), "groups": groups, "examples": examples,
    }
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
    for s in sides:
        s.store.close()
    return summary


def _fired(results: dict[Pair, Result], side: int) -> torch.Tensor:
    """Rows each feature of `side` fired on (the same in every pair it is in: the same rows)."""
    for (i, j), r in results.items():
        if side in (i, j):
            return (r.stats.a if side == i else r.stats.b).fired
    raise ValueError(f"side {side} is in no pair")


def _matrix(summaries: dict[Pair, dict[str, Any]], n: int) -> dict[str, Any]:
    """Row model r, column model c: the mean best similarity of r's live features in c, the share of them with
    a partner above each of THRESHOLDS in c; mutual best matches per pair (symmetric). None on the diagonal."""
    mean: list[list[float | None]] = [[None] * n for _ in range(n)]
    above: dict[str, list[list[float | None]]] = {t: [[None] * n for _ in range(n)] for t in THRESHOLDS}
    mutual: list[list[int | None]] = [[None] * n for _ in range(n)]
    for (i, j), s in summaries.items():
        for r, c, side in ((i, j, "a"), (j, i, "b")):
            best = s["best"][side]
            mean[r][c] = best["mean"]
            for t in THRESHOLDS:
                above[t][r][c] = best["above"][t] / best["n"] if best["n"] else None
        mutual[i][j] = mutual[j][i] = s["mutual"]
    return {"mean_best": mean, "above": above, "mutual": mutual}


def _partners(results: dict[Pair, Result], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per side i: (partner (n, d_sae_i) int64, similarity (n, d_sae_i) float32) of each of its features in each
    side (-1 and NaN on its own side and for dead features)."""
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32))] * n
    for side in range(n):
        d = _fired(results, side).numel()
        out[side] = (np.full((n, d), -1, np.int64), np.full((n, d), np.nan, np.float32))
    for (i, j), r in results.items():
        for me, other, table in ((i, j, r.tables["a"]), (j, i, r.tables["b"])):
            feature, best, sim = (table.column(c).to_numpy() for c in range(3))
            out[me][0][other, feature] = best
            out[me][1][other, feature] = sim
    return out


def _shared(results: dict[Pair, Result], names: list[str], threshold: float
            ) -> tuple[pa.Table, list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """shared.parquet; each side's groups (the models joined by "+", how many, its features; most first);
    examples of each group: shared ones by their weakest partner's similarity, unique ones by how often they fire."""
    n = len(names)
    parts, groups, examples = [], [], []
    for side, (partner, sim) in enumerate(_partners(results, n)):
        fired = _fired(results, side).cpu().numpy()
        live = np.flatnonzero(fired > 0)
        member = sim[:, live] > threshold  # NaN (own side) is False
        member[side] = True
        label = np.array(["+".join(names[k] for k in np.flatnonzero(col)) for col in member.T], dtype=object)
        count = member.sum(0)
        labels, first, counts = np.unique(label, return_index=True, return_counts=True)
        groups.append([{"group": str(labels[g]), "n_models": int(count[first[g]]), "features": int(counts[g])}
                       for g in np.argsort(-counts, kind="stable")])
        weakest = np.where(member, sim[:, live], np.inf)
        weakest[side] = np.inf
        key = np.where(count > 1, weakest.min(0), fired[live].astype(np.float64))
        for g in labels:
            at = np.flatnonzero(label == g)
            for pos in at[np.argsort(-key[at], kind="stable")][:EXAMPLES]:
                f = int(live[pos])
                examples.append({"side": side, "feature": f, "group": str(g), "n_models": int(count[pos]),
                                 "fired": int(fired[f]),
                                 "partners": [{"side": int(k), "feature": int(partner[k, f]),
                                               "similarity": float(sim[k, f])}
                                              for k in np.flatnonzero(member[:, pos]) if k != side]})
        columns: dict[str, Any] = {"side": pa.array([names[side]] * live.size, pa.string()),
                                   "feature": live.astype(np.int32), "fired": fired[live].astype(np.int64),
                                   "group": pa.array(label.tolist(), pa.string()), "n_models": count.astype(np.int8)}
        for k in range(n):
            columns[f"partner_{k + 1}"] = partner[k, live].astype(np.int32)
            columns[f"sim_{k + 1}"] = sim[k, live]
        parts.append(pa.table(columns))
    return pa.concat_tables(parts), groups, examples
