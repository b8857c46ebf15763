"""The atlas: a 2-D map of an SAE's features, from its decoder directions, kept in the feature index.

`build_atlas(AtlasConfig(index=DIR))` loads the SAE the index recorded, takes its decoder rows W_dec
(d_sae, d_in) as unit directions and lays them out twice:

    UMAP    umap-learn on the cosine k-nearest-neighbour graph of the directions (seeded, so the same
            seed gives the same map). The graph is computed here, exactly, with one matrix product per
            block of rows, and handed to UMAP as `precomputed_knn`: exact, bounded memory, and it skips
            umap-learn's own neighbour search (and ~10 s of its numba compilation).
    PCA     the two leading principal components of the unit directions (numpy SVD), each axis signed so
            that its largest loading is positive.

and writes `atlas.parquet` into the index folder (whole, through a temporary file and a rename), one row per
feature: id, umap_x, umap_y, pca_x, pca_y, log10_density (log10 of features.parquet's freq_patches; null
for a feature that never fired), dead. The parquet's key-value metadata (key "actstore") holds the format,
the config, the SAE and PCA's explained variance ratios. Nothing else in the folder is touched.

`read_atlas` is the service's side: light (numpy and pyarrow; torch and umap are imported by the build only).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget
from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError, CorruptDataError, StoreFormatError
from actstore.outputs import check_output
from actstore.store import filesystem, is_local, normalize_url, put_bytes
from services.index.layout import FEATURES, read_index_meta

__all__ = ["ATLAS", "AtlasConfig", "build_atlas", "knn_cosine", "pca_2d", "read_atlas"]

ATLAS = "atlas.parquet"
"""The atlas's file in the index folder."""
FORMAT, FORMAT_VERSION = "actstore-atlas", 1
META_KEY = b"actstore"
"""The parquet key-value metadata entry holding the atlas's format, config and PCA variance."""
MIN_FEATURES = 4
"""UMAP's spectral layout needs more points than its 2 dimensions + 1."""
UMAP_BYTES_PER_EDGE = 128
"""UMAP's graph and layout, per neighbour edge (its sparse fuzzy graph, several COO copies, the epochs)."""


@dataclass(frozen=True)
class AtlasConfig:
    """What `actstore atlas` reads and writes."""

    index: str
    """Feature index folder (from `actstore index`); the atlas is written into it as atlas.parquet."""
    sae: str | None = None
    """SAE checkpoint directory; default the one the index recorded (index.json's "sae")."""
    n_neighbors: int = 15
    """UMAP's neighbourhood size (at most d_sae): larger keeps more global structure."""
    min_dist: float = 0.1
    """UMAP's minimum distance between points of the map, in [0, 1]."""
    seed: int = 0
    """Seeds UMAP: the same seed gives the same map."""
    memory_gb: float | None = None
    """Working memory, in GB (on top of the Python process): the rows of the exact neighbour search and of PCA's
    covariance taken at once follow from it and d_sae (default: half of this machine's memory)."""
    overwrite: bool = False
    """Replace an existing atlas.parquet in the index."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for reading the SAE."""

    def __post_init__(self) -> None:
        check_at_least(self, "atlas", {"n_neighbors": 2})
        if not 0 <= self.min_dist <= 1:
            raise ConfigError(f"atlas: min_dist must be in [0, 1], got {self.min_dist}")
        if not is_local(self.index):
            raise ConfigError(f"atlas: index must be a local folder, got {self.index}")


def unit_rows(w: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), float32."""
    w = np.asarray(w, dtype=np.float32)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def knn_cosine(u: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances), each (n, k): every unit row's k nearest rows by cosine distance, itself first,
    nearest first (ties to the lower index); k <= n. Exact, one (block, n) distance matrix at a time, in float64
    rounded to float32: the same distances whatever the block (UMAP's layout amplifies a last-bit change)."""
    n = u.shape[0]
    idx, dist = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    u64 = u.astype(np.float64)
    for s in range(0, n, block):
        d = np.clip(1.0 - u64[s:s + block] @ u64.T, 0.0, 2.0).astype(np.float32)
        rows = np.arange(d.shape[0])
        d[rows, s + rows] = -1.0  # itself first, even next to an exact duplicate
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        near = np.take_along_axis(d, part, 1)
        order = np.lexsort((part, near), axis=1)
        idx[s:s + block] = np.take_along_axis(part, order, 1)
        dist[s:s + block] = np.maximum(np.take_along_axis(near, order, 1), 0.0)
    return idx, dist


def pca_2d(u: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates (n, 2), explained variance ratios (2,)) of the rows on their two leading principal axes (the
    top eigenvectors of the float64 covariance, summed `block` rows at a time: d x d, never an n x d float64
    copy), each axis signed so that its largest loading is positive."""
    mean = u.mean(axis=0, dtype=np.float64)
    cov = np.zeros((u.shape[1], u.shape[1]))
    for s in range(0, u.shape[0], block):
        x = u[s:s + block].astype(np.float64) - mean
        cov += x.T @ x
    values, vectors = np.linalg.eigh(cov)
    values, vt = values[::-1].clip(0), vectors[:, ::-1].T
    axes = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(axis=1)])[:, None]
    coords = np.concatenate([(u[s:s + block].astype(np.float64) - mean) @ axes.T for s in range(0, u.shape[0], block)])
    total = float(values.sum())
    return coords.astype(np.float32), (values[:2] / total if total > 0 else np.zeros(2))


def umap_2d(u: np.ndarray, n_neighbors: int, min_dist: float, seed: int, block: int) -> np.ndarray:
    """UMAP coordinates (n, 2) of the unit rows over their exact cosine neighbour graph."""
    import umap  # numba and pynndescent: seconds to import, only when a map is made

    idx, dist = knn_cosine(u, n_neighbors, block)
    model = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine", random_state=seed, n_jobs=1,
                      precomputed_knn=(idx, dist, None))
    with warnings.catch_warnings():  # no search index: only transform() of new points would need one
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        return model.fit_transform(u).astype(np.float32)


def block_rows(cfg: AtlasConfig, n: int, d: int, n_neighbors: int) -> int:
    """Rows of the neighbour search (and of PCA) at once: fixed are the SAE's weights and their unit rows (float32
    and float64), the
    covariance and UMAP's graph; a row costs its distances to every feature and their partition (~36 n bytes)."""
    fixed = 20 * n * d + 8 * d * d + n * n_neighbors * UMAP_BYTES_PER_EDGE
    return MemoryBudget.of(cfg.memory_gb).rows("atlas", fixed=fixed, per_row=36 * n + 8 * d,
                                               row="row of the neighbour search", at_most=n)


def build_atlas(cfg: AtlasConfig, progress: bool = True) -> Path:
    """Make the atlas of the index's SAE and write it into the index folder; returns the atlas's path."""
    index = Path(normalize_url(cfg.index))
    meta = read_index_meta(index)
    out = index / ATLAS
    check_output(out, "an atlas", lambda fs, path: fs.isfile(path), cfg.overwrite, file=True, option="--index")
    if int(meta["d_sae"]) < MIN_FEATURES:
        raise ConfigError(f"{index}: an atlas needs at least {MIN_FEATURES} features, the SAE has {meta['d_sae']}")
    sae_url = cfg.sae or meta["sae"]
    bar = tqdm(total=3, desc="atlas", unit="step", disable=not progress)
    bar.set_postfix_str("loading the SAE")
    u = unit_rows(_decoder(sae_url, int(meta["d_sae"]), cfg.storage_options))
    n_neighbors = min(cfg.n_neighbors, u.shape[0])
    block = block_rows(cfg, *u.shape, n_neighbors)
    freq = pq.read_table(index / FEATURES, columns=["freq_patches"]).column("freq_patches").to_numpy()
    bar.update()
    bar.set_postfix_str("PCA")
    pca, explained = pca_2d(u, block)
    bar.update()
    bar.set_postfix_str("UMAP")
    emb = umap_2d(u, n_neighbors, cfg.min_dist, cfg.seed, block)
    bar.update()
    bar.close()
    dead = freq <= 0
    table = pa.table({
        "id": np.arange(u.shape[0], dtype=np.int32),
        "umap_x": emb[:, 0], "umap_y": emb[:, 1], "pca_x": pca[:, 0], "pca_y": pca[:, 1],
        "log10_density": pa.array(np.log10(np.where(dead, 1.0, freq)).astype(np.float32), mask=dead),
        "dead": dead,
    })
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": public_config(cfg), "sae": redact(sae_url),
            "n_neighbors": n_neighbors, "pca_explained": [float(e) for e in explained]}
    table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    put_bytes(*filesystem(str(out), None), sink.getvalue().to_pybytes())  # whole: a reader never sees half of it
    return out


def _decoder(url: str, d_sae: int, storage_options: dict[str, Any]) -> np.ndarray:
    """The SAE's decoder rows (d_sae, d_in), checked against the index's d_sae."""
    from sae import load  # torch: only the build needs it

    sae, _ = load(url, device="cpu", storage_options=storage_options)
    if sae.cfg.d_sae != d_sae:
        raise ConfigError(f"{url}: d_sae={sae.cfg.d_sae} but the index has {d_sae} features; pass the index's SAE "
                          "with --sae")
    return sae.W_dec.detach().float().cpu().numpy()


def read_atlas(index: str | Path, d_sae: int) -> dict[str, Any] | None:
    """The index's atlas as the service sends it (columns as lists, null density for dead features), or None
    when the index has none; a CorruptDataError when it is not one of d_sae rows."""
    path = Path(normalize_url(str(index))) / ATLAS
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        info = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{path}: unreadable ({' '.join(str(e).split())})", key=ATLAS) from None
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"{path}: not an {FORMAT} v{FORMAT_VERSION} file (rerun `actstore atlas --overwrite`)")
    if table.num_rows != d_sae:
        raise CorruptDataError(f"{path}: {table.num_rows} rows, index.json says d_sae={d_sae}", key=ATLAS)
    columns = {name: table.column(name).to_pylist() for name in
               ("id", "umap_x", "umap_y", "pca_x", "pca_y", "log10_density", "dead")}
    return {"n_features": d_sae, "n_dead": int(sum(columns["dead"])), "n_neighbors": info["n_neighbors"],
            "min_dist": info["config"]["min_dist"], "seed": info["config"]["seed"],
            "pca_explained": info["pca_explained"], **columns}
