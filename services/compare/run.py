"""`actstore compare`: match the features of SAEs whose stores hold the same images: two (--a, --b), or every
pair of several (--side, services.compare.many).

Each side is an index folder (its index.json names the store, the SAE and the layer) or SAE_DIR@STORE_URL
(services.compare.sides). Two ordered passes read the stores in lockstep, block by block:

    1. every image (or patch) through both SAEs: per-feature sums, top-k rows, and the cross products
       of the two sides' activations (services.compare.stream.PairStats), so the Pearson correlation of
       every feature of A with every feature of B comes out of one pass, in memory bounded by the two
       SAEs' widths (4 * F_a * F_b bytes), never by the number of images;
    2. the same rows again for each best pair's largest standardized difference (max_diff).

Image level: a feature's value on an image is its largest value over the image's patches, or its value
on the CLS / pooled token for an SAE trained on those (a ResNet's attnpool layer has only that token).
Patch level (`level="patch"`): rows are patches, and both sides need the same patch grid.
`by="decoder"`: similarity is the cosine of decoder directions (two SAEs of one layer of one model,
e.g. two seeds); pass 1 still runs for liveness, top-k overlap and max_diff.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actstore.budget import MemoryBudget
from actstore.config import check_at_least, public_config
from actstore.errors import ConfigError
from actstore.outputs import marked_by, staged_folder
from actstore.store import is_local
from services.compare.layout import ASSIGNMENT, FORMAT, FORMAT_VERSION, MATCHES, SIMILARITY, SUMMARY
from services.compare.match import COLUMN_BLOCK, Matches, Scan, assign, distribution, jaccard
from services.compare.sides import Side, check_pair, common_images, open_side, side_rows
from services.compare.stream import MaxDiff, PairStats

__all__ = ["BY", "GEMM_ROWS", "LEVELS", "CompareConfig", "Pair", "Plan", "Result", "compare_pair", "match_many",
           "match_pairs", "match_rows", "pair_plan", "plan", "run_compare", "write_pair"]

BY = ("activations", "decoder")
LEVELS = ("image", "patch")
TOP_MATCHES = 10
"""Matches printed and kept in summary.json."""


@dataclass(frozen=True)
class CompareConfig:
    """What `actstore compare` matches, and how."""

    out: str
    """Local folder for the comparison (summary.json, matches_a/b.parquet, assignment.parquet; with --side, each
    pair's comparison under pairs/ and shared.parquet)."""
    a: str | None = None
    """Side A: an index folder (from `actstore index`), or SAE_DIR@STORE_URL."""
    b: str | None = None
    """Side B, over the same images as A (same image URIs in the same order)."""
    side: tuple[str, ...] = ()
    """Instead of --a/--b: every side of a comparison of several models (two or more, each an index folder or
    SAE_DIR@STORE_URL, all over the same images), e.g. --side clip-index --side siglip-index --side dino-index:
    every pair matched, a matrix of them, and which models share each feature."""
    name: tuple[str, ...] = ()
    """With --side: each side's name in the tables and the report, in order (default: its backbone's name)."""
    threshold: float = 0.7
    """With --side: a feature has a partner in another model when its best match there is above this; the models
    where it has one are the feature's group ("shared by all", "by CLIP and SigLIP only", "unique")."""
    by: str = field(default="activations", metadata={"choices": BY})
    """activations: Pearson correlation of the features' activations over the images; decoder: cosine of the
    decoder directions (two SAEs of the same layer of the same model, e.g. two seeds or widths)."""
    level: str = field(default="image", metadata={"choices": LEVELS})
    """image: a feature's value on an image is its largest over the patches (or the CLS/pooled token for SAEs
    trained on it); patch: every patch is a row (both sides need the same patch grid)."""
    k: int = 16
    """Top images (patches at patch level) per feature, for jaccard_topk."""
    candidates: int = 32
    """Most similar partners per feature, both ways, that the one-to-one assignment may choose from."""
    min_images: int = 10
    """Printed top matches: both features fire on at least this many images (rarer ones correlate by chance)
    and on at most half of them (dense features correlate through image-wide statistics)."""
    memory_gb: float | None = None
    """Working memory of the comparison, in GB (on top of the Python process): the images encoded at once, the
    rows per cross-product update and the tiles of the F_a x F_b matrix follow from it and the widths; a matrix
    that does not fit is computed in tiles of A's features, one more pass over both stores each (default: half
    of this machine's memory)."""
    device: str = "cpu"
    """Where the SAEs encode and the matrices live (e.g. "cuda")."""
    overwrite: bool = False
    """Replace an existing comparison at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the stores and SAEs."""

    def __post_init__(self) -> None:
        check_at_least(self, "compare", dict.fromkeys(("k", "candidates", "min_images"), 1))
        if self.by not in BY:
            raise ConfigError(f"compare: by must be one of {', '.join(BY)}, got {self.by!r}")
        if self.level not in LEVELS:
            raise ConfigError(f"compare: level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if not is_local(self.out):
            raise ConfigError(f"compare: out must be a local folder, got {self.out}")
        if self.side and (self.a or self.b):
            raise ConfigError("compare: give the sides as --a and --b, or as --side (two or more), not both")
        if not self.side and not (self.a and self.b):
            raise ConfigError("compare: needs --a and --b, or two or more --side")
        if self.side and len(self.side) < 2:
            raise ConfigError(f"compare: --side needs two or more sides, got {len(self.side)}")
        if self.name and len(self.name) != len(self.side):
            raise ConfigError(f"compare: --name names each --side, in order: {len(self.name)} names for "
                              f"{len(self.side)} sides")
        if len(set(self.name)) != len(self.name) or not all(n.strip() for n in self.name):
            raise ConfigError(f"compare: --name takes distinct, non-empty names, got {list(self.name)}")
        if not -1 <= self.threshold < 1:
            raise ConfigError(f"compare: threshold must lie in [-1, 1), got {self.threshold}")


# the matching ------------------------------------------------------------------------------------

def decoder_cosine(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(F_a, F_b) cosines of two decoders' directions."""
    wa = torch.nn.functional.normalize(wa.detach().float(), dim=1)
    wb = torch.nn.functional.normalize(wb.detach().float(), dim=1)
    return wa @ wb.T


@dataclass(frozen=True)
class Result:
    """What the comparison found, before it is written: the first pass's statistics, the matches, the
    assignment, and each side's matches table."""

    stats: PairStats
    matches: Matches
    pairs: pa.Table
    max_diff_a: torch.Tensor
    tables: dict[str, pa.Table]


GEMM_ROWS = 4096
"""Most rows staged for one cross-product update: deeper GEMMs add no speed."""


@dataclass(frozen=True)
class Plan:
    """How the comparison spends its memory budget (see `plan`)."""

    images_per_block: int
    """Images encoded at once per side."""
    rows_per_update: int
    """Rows staged for one cross-product update (the GEMM's depth)."""
    tile: int
    """A's features per cross-product tile: n_a for the whole matrix in one pass, else one pass per tile."""


def plan(n_a: int, n_b: int, *, k: int, candidates: int, memory_gb: float | None, weights: int = 0,
         image_bytes: int = 0, rows_per_image: int = 1, most_images: int | None = None,
         rows_per_update: int | None = None) -> Plan:
    """The blocks of a comparison of n_a x n_b features within the budget: fixed are both SAEs' `weights`, the
    per-feature statistics, top rows and candidates; then a quarter of the rest stages rows for the GEMM (up to
    GEMM_ROWS; exactly `rows_per_update` where the caller fixes it, since the staged rows set the order in which the
    sums are added), a third of what remains encodes images (`image_bytes` each through both SAEs, giving
    `rows_per_image` dense rows; at most `most_images`, what is worth encoding at once) and the rest holds the
    similarity matrix's tile."""
    budget, width = MemoryBudget.of(memory_gb), n_a + n_b
    fixed = weights + width * (40 + 24 * k + 84 * candidates)
    row = 6 * width  # the staged float32 row and its masks
    if rows_per_update is None:
        rows = budget.rows("compare", fixed=fixed, per_row=row, row="staged row", at_most=GEMM_ROWS, share=1 / 4)
    else:
        rows = rows_per_update
        budget.rows("compare", fixed=fixed, per_row=rows * row, row=f"{rows} staged rows")
    fixed += rows * row
    image = image_bytes + rows_per_image * 16 * width  # encoding, its dense rows, the max_diff pass's
    images = budget.rows("compare", fixed=fixed, per_row=image, row="image", share=1 / 3,
                         at_most=max(1, min(rows // rows_per_image, most_images or rows)))
    fixed += images * image
    tile = budget.rows("compare", fixed=fixed, per_row=4 * n_b + 12 * min(COLUMN_BLOCK, n_b) + 24 * candidates,
                       row="feature of A in the similarity tile", at_most=n_a)
    return Plan(images, rows, tile)


Rows = Callable[[str], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
"""rows(description) -> the blocks (xa (n, F_a), xb (n, F_b), row ids) of one pass over the rows, in order."""

SideRows = Callable[[str], Iterable[tuple[Sequence[torch.Tensor], torch.Tensor]]]
"""rows(description) -> the blocks ([x_i (n, F_i) for every side], row ids) of one pass over the rows, in order."""

Pair = tuple[int, int]


def match_rows(rows: Rows, n_a: int, n_b: int, *, k: int, candidates: int, plan: Plan, device: torch.device,
               decoders: tuple[torch.Tensor, torch.Tensor] | None = None) -> Result:
    """The comparison of two feature sets from their rows (match_pairs for the one pair). This is all of the
    comparison but reading stores and encoding (benchmarks/bench_compare.py runs it on in-memory rows)."""
    return match_pairs(lambda desc: (((xa, xb), ids) for xa, xb, ids in rows(desc)), [n_a, n_b], {(0, 1): plan},
                       k=k, candidates=candidates, device=device, decoders=decoders)[(0, 1)]


def match_pairs(rows: SideRows, widths: Sequence[int], plans: dict[Pair, Plan], *, k: int, candidates: int,
                device: torch.device, decoders: Sequence[torch.Tensor] | None = None) -> dict[Pair, Result]:
    """The comparisons of pairs (i, j) of feature sets from the same rows of every side: the statistics pass,
    similarity (Pearson, or the cosine of the sides' `decoders` when given) tile by tile into best partners and
    candidates (a further pass over the rows per further tile of Pearson, every pair with a tile left reading it),
    the assignments, then the max_diff pass. A pair's tiles and staging are its plan's."""
    cross = decoders is None
    tiles = {(i, j): [slice(s, min(widths[i], s + pl.tile)) for s in range(0, widths[i], pl.tile)] or [slice(0, 0)]
             for (i, j), pl in plans.items()}
    n_passes = max(len(t) for t in tiles.values()) if cross else 1
    stats = {(i, j): pair_stats(widths[i], widths[j], k, pl, device, cross, tiles[(i, j)][0])
             for (i, j), pl in plans.items()}
    scans: dict[Pair, Scan] = {}
    for t in range(n_passes):
        now = {p: st for p, st in stats.items() if t < len(tiles[p])}  # the pairs with a tile left
        for p, st in now.items():
            if t:
                st.next_tile(tiles[p][t])
        what = f", {len(now)} pairs" if len(plans) > 1 else ""
        for xs, ids in rows("compare" + what + (f", tile {t + 1}/{n_passes}" if n_passes > 1 else "")):
            for (i, j), st in now.items():
                st.update(xs[i], xs[j], ids)
        for (i, j), st in now.items():
            st.finish()
            if not t:
                scans[(i, j)] = live_scan(st, candidates)
            if cross:
                scans[(i, j)].add(tiles[(i, j)][t].start, st.pearson())
                continue
            for tile in tiles[(i, j)]:
                scans[(i, j)].add(tile.start, decoder_cosine(decoders[i][tile], decoders[j]))
    matched = {p: Matched.of(st, scans.pop(p)) for p, st in stats.items()}
    del stats
    for xs, _ in rows("max_diff"):
        for (i, j), m in matched.items():
            m.diff.update(xs[i].to(device), xs[j].to(device))
    return {p: m.result(SIMILARITY["activations" if cross else "decoder"]) for p, m in matched.items()}


def pair_stats(n_a: int, n_b: int, k: int, plan: Plan, device: torch.device, cross: bool,
               tile: slice | None = None) -> PairStats:
    """The first pass's accumulator of a pair, sized by the plan."""
    return PairStats(n_a, n_b, k, cross=cross, rows_per_update=plan.rows_per_update, device=device, tile=tile)


def live_scan(stats: PairStats, candidates: int) -> Scan:
    """After the first pass: the scan of the similarity matrix over the features that fired on both sides."""
    live_a, live_b = (s.fired.gt(0).nonzero().squeeze(1) for s in (stats.a, stats.b))
    return Scan(live_a, live_b, stats.a.shift.numel(), stats.b.shift.numel(), candidates)


@dataclass(frozen=True)
class Matched:
    """A pair after its similarity scan: best partners, the assignment, and the max_diff pass still to run
    (`diff.update` on the same rows), then `result`."""

    stats: PairStats
    matches: Matches
    pairs: pa.Table
    diff: MaxDiff

    @classmethod
    def of(cls, stats: PairStats, scan: Scan) -> Matched:
        m = scan.matches()
        pairs = assign(scan.edges(), scan.live_a, scan.dead_a.numel(), scan.dead_b.numel())
        (mean_a, std_a, _), (mean_b, std_b, _) = stats.a.moments(stats.n), stats.b.moments(stats.n)
        diff = MaxDiff(torch.cat([m.live_a, m.best_a]), torch.cat([m.best_b, m.live_b]), mean_a, std_a, mean_b,
                       std_b)
        return cls(stats, m, pairs, diff)

    def result(self, column: str) -> Result:
        """The pair's tables, once the max_diff pass is done; `column` names the similarity."""
        m, n_live = self.matches, self.matches.live_a.numel()
        max_diff_a, max_diff_b = self.diff.value[:n_live], self.diff.value[n_live:]
        top_a, top_b = self.stats.a.top.sets(), self.stats.b.top.sets()
        tables = {"a": _matches_table("a", m.live_a, m.best_b, m.sim_a, m.mutual_a,
                                      jaccard(top_a[m.live_a], top_b[m.best_b]), max_diff_a, column),
                  "b": _matches_table("b", m.live_b, m.best_a, m.sim_b, m.mutual_b,
                                      jaccard(top_b[m.live_b], top_a[m.best_a]), max_diff_b, column)}
        return Result(self.stats, m, self.pairs.rename_columns(["feature_a", "feature_b", column]), max_diff_a,
                      tables)


def _matches_table(side: str, live: torch.Tensor, best: torch.Tensor, sim: torch.Tensor, mutual: torch.Tensor,
                   jac: torch.Tensor, max_diff: torch.Tensor, column: str) -> pa.Table:
    other = "b" if side == "a" else "a"
    return pa.table({f"feature_{side}": live.cpu().numpy().astype(np.int32),
                     f"best_{other}": best.cpu().numpy().astype(np.int32),
                     column: sim.cpu().numpy().astype(np.float32), "mutual": mutual.cpu().numpy(),
                     "jaccard_topk": jac.cpu().numpy(), "max_diff": max_diff.cpu().numpy().astype(np.float32)})


def _top_matches(r: Result, n_images: int, cfg: CompareConfig) -> list[dict[str, Any]]:
    """The strongest mutual matches of features that fire neither rarely nor densely (see min_images)."""
    m, stats, max_diff_a = r.matches, r.stats, r.max_diff_a
    fired_a, fired_b = stats.a.fired[m.live_a], stats.b.fired[m.best_b]
    ceiling = n_images // 2 if cfg.level == "image" else stats.n // 2
    ok = m.mutual_a & (fired_a >= cfg.min_images) & (fired_b >= cfg.min_images) & (fired_a <= ceiling) & \
        (fired_b <= ceiling)
    idx = ok.nonzero().squeeze(1)
    idx = idx[m.sim_a[idx].argsort(descending=True, stable=True)][:TOP_MATCHES]
    return [{"feature_a": int(m.live_a[i]), "feature_b": int(m.best_b[i]), "similarity": float(m.sim_a[i]),
             "max_diff": float(max_diff_a[i])} for i in idx.tolist()]


def run_compare(cfg: CompareConfig, progress: bool = True) -> dict[str, Any]:
    """Run the passes and write the comparison folder; returns its summary (also in summary.json). With
    cfg.side, every pair of the sides (services.compare.many)."""
    with staged_folder(cfg.out, "a comparison", marked_by(SUMMARY), cfg.overwrite) as tmp:
        if cfg.side:
            from services.compare.many import compare_many

            return compare_many(cfg, tmp, progress)
        device = torch.device(cfg.device)
        a, b = (open_side(str(spec), name, cfg.storage_options, device) for spec, name in ((cfg.a, "a"), (cfg.b, "b")))
        ok = common_images([a, b], ("A", "B"))
        check_pair(cfg, a, b)
        pl = pair_plan(cfg, a, b)
        summary = write_pair(cfg, a, b, compare_pair(cfg, a, b, ok, pl, progress), ok, pl, tmp)
        for s in (a, b):
            s.store.close()
    return summary


def compare_pair(cfg: CompareConfig, a: Side, b: Side, ok: np.ndarray, pl: Plan, progress: bool,
                 desc: str = "") -> Result:
    """Both sides' rows (the images `ok`) through match_pairs, as `pl` plans them; `desc` prefixes the progress."""
    return match_many(cfg, [a, b], {(0, 1): pl}, ok, progress, desc)[(0, 1)]


def match_many(cfg: CompareConfig, sides: Sequence[Side], plans: dict[Pair, Plan], ok: np.ndarray, progress: bool,
               desc: str = "") -> dict[Pair, Result]:
    """The pairs of `sides` that `plans` names, from the same passes over all their stores (the images `ok`, in
    the smallest of the plans' blocks); `desc` prefixes the progress."""
    device = torch.device(cfg.device)
    block = min(pl.images_per_block for pl in plans.values())
    return match_pairs(lambda what: side_rows(sides, ok, cfg.level, block, device, desc + what, progress),
                       [s.sae.cfg.d_sae for s in sides], plans, k=cfg.k, candidates=cfg.candidates, device=device,
                       decoders=[s.sae.W_dec for s in sides] if cfg.by == "decoder" else None)


def pair_plan(cfg: CompareConfig, a: Side, b: Side, memory_gb: float | None = None,
              rows_per_update: int | None = None) -> Plan:
    """The comparison's blocks and tiles, from the budget (cfg's, or `memory_gb`) and both sides' widths (the staged
    rows fixed where `rows_per_update` is given)."""
    per_image = [s.encoder.per_image for s in (a, b)]
    return plan(a.sae.cfg.d_sae, b.sae.cfg.d_sae, k=cfg.k, candidates=cfg.candidates,
                memory_gb=cfg.memory_gb if memory_gb is None else memory_gb,
                weights=a.encoder.weight_bytes() + b.encoder.weight_bytes(),
                image_bytes=sum(n * s.encoder.token_bytes() for n, s in zip(per_image, (a, b))),
                rows_per_image=max(per_image) if cfg.level == "patch" else 1,
                most_images=min(a.encoder.most_images(), b.encoder.most_images()), rows_per_update=rows_per_update)


def write_pair(cfg: CompareConfig, a: Side, b: Side, r: Result, ok: np.ndarray, pl: Plan, folder: Path
               ) -> dict[str, Any]:
    """A pair's comparison folder (its tables, then summary.json); returns the summary. `cfg` is the pair's
    (its a and b are the sides' sources)."""
    n_images = int(ok.sum())
    assigned = r.pairs.column(2).to_numpy()
    summary = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": public_config(cfg),
        "by": cfg.by, "level": cfg.level, "a": a.describe(r.stats.a.fired), "b": b.describe(r.stats.b.fired),
        "n_images": n_images, "n_rows": r.stats.n, "k": cfg.k,
        "plan": {**asdict(pl), "passes": -(-a.sae.cfg.d_sae // pl.tile) + 1 if cfg.by == "activations" else 2},
        "best": {"a": distribution(r.matches.sim_a.cpu().numpy()), "b": distribution(r.matches.sim_b.cpu().numpy())},
        "mutual": int(r.matches.mutual_a.sum()),
        "assignment": {"pairs": int(assigned.size), "mean": float(assigned.mean()) if assigned.size else None},
        "top_matches": _top_matches(r, n_images, cfg),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for side, table in r.tables.items():
        pq.write_table(table, folder / MATCHES[side])
    pq.write_table(r.pairs, folder / ASSIGNMENT)
    (folder / SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary
