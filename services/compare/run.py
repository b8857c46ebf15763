"""`actstore compare`: match the features of two SAEs whose stores hold the same images.

Each side is an index folder (its index.json names the store, the SAE and the layer) or SAE_DIR@STORE_URL.
Two ordered passes read both stores in lockstep, block by block:

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget
from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import marked_by, staged_folder
from actstore.store import ActivationStore, LayerSpec, is_local, normalize_url, ok_mask
from sae import SparseAutoencoder, TokenEncoder, positive_entries
from sae.checkpoint import load_on_store
from services.compare.layout import ASSIGNMENT, FORMAT, FORMAT_VERSION, MATCHES, SIMILARITY, SUMMARY
from services.compare.match import COLUMN_BLOCK, Matches, Scan, assign, distribution, jaccard
from services.compare.stream import MaxDiff, PairStats
from services.index.layout import META as INDEX_META
from services.index.layout import read_index_meta

__all__ = ["BY", "GEMM_ROWS", "LEVELS", "CompareConfig", "Plan", "Result", "match_rows", "plan", "run_compare"]

BY = ("activations", "decoder")
LEVELS = ("image", "patch")
TOP_MATCHES = 10
"""Matches printed and kept in summary.json."""


@dataclass(frozen=True)
class CompareConfig:
    """What `actstore compare` matches, and how."""

    a: str
    """Side A: an index folder (from `actstore index`), or SAE_DIR@STORE_URL."""
    b: str
    """Side B, over the same images as A (same image URIs in the same order)."""
    out: str
    """Local folder for the comparison (summary.json, matches_a/b.parquet, assignment.parquet)."""
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


# the two sides -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Side:
    """One side opened: its store, its tokens through its SAE (TokenEncoder), and where they came from."""

    source: str
    index: str | None
    sae_url: str
    encoder: TokenEncoder
    """On the layer the SAE was trained on: its patches (image value = max over patches) or its CLS / pooled token."""
    store: ActivationStore

    @property
    def sae(self) -> SparseAutoencoder:
        return self.encoder.sae

    @property
    def spec(self) -> LayerSpec:
        return self.encoder.spec

    @property
    def tokens(self) -> str:
        return self.encoder.tokens

    def rows(self, x: torch.Tensor, level: str, device: torch.device) -> torch.Tensor:
        """A block's activations (n_img, T, d) -> dense latents: (n_img, F) at image level, (n_img * P, F)
        at patch level."""
        rows, feats, vals = positive_entries(self.encoder.block(x))
        d_sae = self.sae.cfg.d_sae
        n_rows = x.shape[0] * self.encoder.per_image
        if level == "image" and self.tokens == "patches":
            rows, n_rows = rows // self.spec.tokens.n_patches, x.shape[0]
        dense = torch.zeros(n_rows * d_sae, device=device)
        return dense.scatter_reduce_(0, rows * d_sae + feats, vals, reduce="amax").view(n_rows, d_sae)

    def describe(self, fired: torch.Tensor) -> dict[str, Any]:
        backbone = self.store.attrs.get("backbone", {})
        live = int((fired > 0).sum())
        return {"source": redact(self.source), "index": self.index, "sae": redact(self.sae_url),
                "store": redact(self.store.url), "layer": self.spec.name, "tokens": self.tokens,
                "d_sae": self.sae.cfg.d_sae, "backbone": {k: backbone.get(k) for k in ("family", "name")},
                "live": live, "dead": self.sae.cfg.d_sae - live}


def _open_side(spec: str, name: str, cfg: CompareConfig, device: torch.device) -> _Side:
    """An index folder, or SAE_DIR@STORE_URL."""
    index = Path(normalize_url(spec)) if is_local(spec) else None
    if index is not None and (index / INDEX_META).is_file():
        meta = read_index_meta(index)
        sae_url, store_url, layer = meta["sae"], meta["store"], meta["layer"]
        index_path: str | None = str(index.resolve())
    elif "@" in spec:
        sae_url, store_url = spec.rsplit("@", 1)
        layer, index_path = None, None
    else:
        raise ConfigError(f"compare: {name}={spec!r} is neither an index folder (no {INDEX_META}) nor SAE_DIR@STORE_URL")
    store = ActivationStore(store_url, cfg.storage_options)
    sae, norm, layer_spec = load_on_store(sae_url, store, layer, device, cfg.storage_options)
    cls = norm is not None and norm.tokens == "cls" or layer_spec.tokens.n_patches == 0
    return _Side(spec, index_path, sae_url, TokenEncoder(sae, norm, layer_spec, "cls" if cls else "patches"), store)


def _common_images(a: _Side, b: _Side) -> np.ndarray:
    """The images both sides may use (ok in both); refuses stores over different images, naming the first."""
    ta, tb = a.store.images(), b.store.images()
    ua, ub = ta.column("uri").to_pylist(), tb.column("uri").to_pylist()
    if ua != ub:
        i = next((i for i, (x, y) in enumerate(zip(ua, ub)) if x != y), min(len(ua), len(ub)))
        what = (f"image {i} is {ua[i]!r} in A and {ub[i]!r} in B" if i < min(len(ua), len(ub)) else
                f"A has {len(ua)} images, B has {len(ub)}")
        raise ConfigError(f"compare: A and B are not over the same images: {what}")
    return ok_mask(ta) & ok_mask(tb)


def _check_pair(cfg: CompareConfig, a: _Side, b: _Side) -> None:
    if cfg.level == "patch":
        for side, name in ((a, "A"), (b, "B")):
            if side.tokens != "patches":
                raise ConfigError(f"compare: --level patch needs patch SAEs; {name} ({side.sae_url}) reads the "
                                  "CLS / pooled token")
        if a.spec.tokens.grid != b.spec.tokens.grid:
            raise ConfigError(f"compare: --level patch needs the same patch grid; A's layer {a.spec.name} is "
                              f"{'x'.join(map(str, a.spec.tokens.grid))}, B's layer {b.spec.name} is "
                              f"{'x'.join(map(str, b.spec.tokens.grid))}")
    if cfg.by == "decoder":
        ka, kb = (s.store.attrs.get("backbone", {}) for s in (a, b))
        model = ("family", "name", "checkpoint", "init_seed")
        if [ka.get(k) for k in model] != [kb.get(k) for k in model] or a.spec.name != b.spec.name:
            raise ConfigError(f"compare: --by decoder needs SAEs of the same layer of the same model; A is layer "
                              f"{a.spec.name} of {ka.get('family')}:{ka.get('name')}, B is layer {b.spec.name} of "
                              f"{kb.get('family')}:{kb.get('name')}")


# the passes --------------------------------------------------------------------------------------

def _rows(a: _Side, b: _Side, ok: np.ndarray, cfg: CompareConfig, images_per_block: int, device: torch.device,
          desc: str, progress: bool):
    """Both sides' dense latents for the same rows, block by block: (xa, xb, row ids). Rejected images
    (in either store) are left out; patch-level row ids are image * n_patches + patch."""
    ok_t = torch.from_numpy(ok)
    bar = tqdm(total=len(ok), desc=desc, unit="image", unit_scale=True, disable=not progress)
    with torch.inference_mode():
        for (start, xa), (_, xb) in zip(a.store.blocks(a.spec.name, images_per_block, whole_chunks=True),
                                        b.store.blocks(b.spec.name, images_per_block, whole_chunks=True)):
            n_img = xa.shape[0]
            keep = ok_t[start:start + n_img]
            images = torch.arange(start, start + n_img)
            ra, rb = a.rows(xa, cfg.level, device), b.rows(xb, cfg.level, device)
            if cfg.level == "patch":
                p = a.spec.tokens.n_patches
                keep = keep.repeat_interleave(p)
                images = (images.unsqueeze(1) * p + torch.arange(p)).reshape(-1)
            keep = keep.to(device)
            yield ra[keep], rb[keep], images.to(device)[keep]
            bar.update(n_img)
    bar.close()


def _decoder_cosine(wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
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
         image_bytes: int = 0, rows_per_image: int = 1, most_images: int | None = None) -> Plan:
    """The blocks of a comparison of n_a x n_b features within the budget: fixed are both SAEs' `weights`, the
    per-feature statistics, top rows and candidates; then a quarter of the rest stages rows for the GEMM (up to
    GEMM_ROWS), a third of what remains encodes images (`image_bytes` each through both SAEs, giving
    `rows_per_image` dense rows; at most `most_images`, what is worth encoding at once) and the rest holds the
    similarity matrix's tile."""
    budget, width = MemoryBudget.of(memory_gb), n_a + n_b
    fixed = weights + width * (40 + 24 * k + 84 * candidates)
    row = 6 * width  # the staged float32 row and its masks
    rows = budget.rows("compare", fixed=fixed, per_row=row, row="staged row", at_most=GEMM_ROWS, share=1 / 4)
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


def match_rows(rows: Rows, n_a: int, n_b: int, *, k: int, candidates: int, plan: Plan, device: torch.device,
               decoders: tuple[torch.Tensor, torch.Tensor] | None = None) -> Result:
    """The comparison of two feature sets from their rows: the statistics pass, similarity (Pearson, or the
    cosine of `decoders` when given) tile by tile into best partners and candidates (a pass over the rows per
    further tile of Pearson), the assignment, then the max_diff pass. This is all of the comparison but reading
    stores and encoding (benchmarks/bench_compare.py runs it on in-memory rows)."""
    tiles = [slice(s, min(n_a, s + plan.tile)) for s in range(0, n_a, plan.tile)] or [slice(0, 0)]
    stats = PairStats(n_a, n_b, k, cross=decoders is None, rows_per_update=plan.rows_per_update, device=device,
                      tile=tiles[0])
    for xa, xb, ids in rows("compare" if len(tiles) == 1 else f"compare, tile 1/{len(tiles)}"):
        stats.update(xa, xb, ids)
    stats.finish()
    live_a, live_b = (s.fired.gt(0).nonzero().squeeze(1) for s in (stats.a, stats.b))
    scan = Scan(live_a, live_b, n_a, n_b, candidates)
    for t, tile in enumerate(tiles):
        if decoders is not None:
            scan.add(tile.start, _decoder_cosine(decoders[0][tile], decoders[1]))
            continue
        if t:
            stats.next_tile(tile)
            for xa, xb, ids in rows(f"compare, tile {t + 1}/{len(tiles)}"):
                stats.update(xa, xb, ids)
            stats.finish()
        scan.add(tile.start, stats.pearson())
    m = scan.matches()
    pairs = assign(scan.edges(), live_a, n_a, n_b)
    del scan
    (mean_a, std_a, _), (mean_b, std_b, _) = stats.a.moments(stats.n), stats.b.moments(stats.n)
    diff = MaxDiff(torch.cat([m.live_a, m.best_a]), torch.cat([m.best_b, m.live_b]), mean_a, std_a, mean_b, std_b)
    for xa, xb, _ in rows("max_diff"):
        diff.update(xa.to(device), xb.to(device))
    max_diff_a, max_diff_b = diff.value[:live_a.numel()], diff.value[live_a.numel():]
    top_a, top_b = stats.a.top.sets(), stats.b.top.sets()
    column = SIMILARITY["activations" if decoders is None else "decoder"]
    tables = {"a": _matches_table("a", m.live_a, m.best_b, m.sim_a, m.mutual_a,
                                  jaccard(top_a[m.live_a], top_b[m.best_b]), max_diff_a, column),
              "b": _matches_table("b", m.live_b, m.best_a, m.sim_b, m.mutual_b,
                                  jaccard(top_b[m.live_b], top_a[m.best_a]), max_diff_b, column)}
    pairs = pairs.rename_columns(["feature_a", "feature_b", column])
    return Result(stats, m, pairs, max_diff_a, tables)


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
    """Run both passes and write the comparison folder; returns its summary (also in summary.json)."""
    with staged_folder(cfg.out, "a comparison", marked_by(SUMMARY), cfg.overwrite) as tmp:
        summary = _compare(cfg, tmp, progress)
    return summary


def _plan(cfg: CompareConfig, a: _Side, b: _Side) -> Plan:
    """The comparison's blocks and tiles, from the budget and both sides' widths."""
    per_image = [s.encoder.per_image for s in (a, b)]
    return plan(a.sae.cfg.d_sae, b.sae.cfg.d_sae, k=cfg.k, candidates=cfg.candidates, memory_gb=cfg.memory_gb,
                weights=a.encoder.weight_bytes() + b.encoder.weight_bytes(),
                image_bytes=sum(n * s.encoder.token_bytes() for n, s in zip(per_image, (a, b))),
                rows_per_image=max(per_image) if cfg.level == "patch" else 1,
                most_images=min(a.encoder.most_images(), b.encoder.most_images()))


def _compare(cfg: CompareConfig, tmp: Path, progress: bool) -> dict[str, Any]:
    """Both passes, writing the comparison into the folder `tmp`; returns the summary."""
    device = torch.device(cfg.device)
    a, b = _open_side(cfg.a, "a", cfg, device), _open_side(cfg.b, "b", cfg, device)
    ok = _common_images(a, b)
    _check_pair(cfg, a, b)
    pl = _plan(cfg, a, b)
    r = match_rows(lambda desc: _rows(a, b, ok, cfg, pl.images_per_block, device, desc, progress), a.sae.cfg.d_sae,
                   b.sae.cfg.d_sae, k=cfg.k, candidates=cfg.candidates, plan=pl, device=device,
                   decoders=(a.sae.W_dec, b.sae.W_dec) if cfg.by == "decoder" else None)
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
    for side, table in r.tables.items():
        pq.write_table(table, tmp / MATCHES[side])
    pq.write_table(r.pairs, tmp / ASSIGNMENT)
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
    for s in (a, b):
        s.store.close()
    return summary
