"""`actstore abstraction`: each model's features placed in a label hierarchy, written into its own index folder.

The hierarchy comes from one of two sources:

    parents    a CSV of label,parent rows (ImageNet's WordNet tree, any other); an image's node is its class name
               (the index's class names), which the table must name
    columns    the store's per-image label columns, coarse to fine (iNat: kingdom ... species); an image's node is
               "column:value" of its finest value, read down to its first empty one (services.abstraction.profile
               column_nodes); the depth names are the columns

Each index gets abstraction.parquet (feature, node, depth, share, n) and then abstraction.json (the hierarchy's
source, min_share, k, the profile: services.abstraction.layout). Every index is checked and placed before any is
written; an existing pair is replaced only when it is ours and overwrite was asked; nothing else in the index is
touched.
Memory: each index's (features x k) top images and one node per image, and the (nodes x depth) ancestor table;
never images x features.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import check_output
from actstore.store import filesystem, is_local, normalize_url, put_bytes
from services.abstraction.layout import FORMAT, FORMAT_VERSION, INFO, LEVELS, is_ours
from services.abstraction.levels import Hierarchy, Levels
from services.abstraction.profile import column_nodes, image_nodes, index_levels, profile
from services.index.layout import open_array, read_index_meta

__all__ = ["AbstractionConfig", "check_outputs", "run_abstraction"]

log = logging.getLogger(__name__)
WHAT = "an abstraction profile (abstraction.json of actstore abstraction)"


@dataclass(frozen=True)
class AbstractionConfig:
    """Which indexes `actstore abstraction` places in which label hierarchy, and how."""

    index: tuple[str, ...]
    """Feature index folders (from `actstore index`), one per model's SAE, put side by side; each gets its own
    abstraction.parquet and abstraction.json."""
    parents: str | None = None
    """Hierarchy from a CSV file of label,parent rows (ImageNet's WordNet tree, any other; an empty parent: a root):
    each image's node is its class name (the index's class names), which the file must name."""
    columns: tuple[str, ...] | None = None
    """Hierarchy from the store's per-image label columns, coarse to fine (e.g. kingdom,family,species): each image
    sits at its finest value, read down to its first empty one (no species: at its genus; no first column:
    unlabelled). Instead of --parents."""
    min_share: float = 0.5
    """A feature's level is the deepest node holding at least this share of its labelled top images (1: their
    lowest common ancestor)."""
    k: int | None = None
    """Top images per feature to place (default: all the index holds; at most that)."""
    report: str | None = None
    """Also write an HTML report here: the profiles side by side, the table, and example features per depth."""
    examples: int = 3
    """Report: example features shown per depth and model."""
    images: int = 6
    """Report: top images shown per example feature."""
    overwrite: bool = False
    """Replace an earlier abstraction.parquet/json in an index (only ours), and the report when it is ours."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the stores (read for --columns) and the report."""

    def __post_init__(self) -> None:
        index = (self.index,) if isinstance(self.index, str) else self.index
        object.__setattr__(self, "index", tuple(str(i) for i in index))
        columns = (self.columns,) if isinstance(self.columns, str) else self.columns or ()
        object.__setattr__(self, "columns", tuple(c.strip() for text in columns for c in str(text).split(",")))
        check_at_least(self, "abstraction", {"examples": 0, "images": 1})
        if not self.index:
            raise ConfigError("abstraction needs at least one --index")
        if len({str(Path(normalize_url(i)).resolve()) for i in self.index}) < len(self.index):
            raise ConfigError("abstraction: an index is named twice")
        remote = [i for i in self.index if not is_local(i)]
        if remote:
            raise ConfigError(f"abstraction: an index must be a local folder, got {redact(remote[0])}")
        if bool(self.parents) == bool(self.columns):
            raise ConfigError("abstraction needs a hierarchy: either --parents FILE.csv or --columns c1,c2,... "
                              "(the store's label columns, coarse to fine), not both")
        if not all(self.columns) or len(set(self.columns)) < len(self.columns):
            raise ConfigError(f"abstraction: --columns must be distinct, non-empty names, got {list(self.columns)}")
        if not 0 < self.min_share <= 1:
            raise ConfigError(f"abstraction: min_share must be in (0, 1], got {self.min_share}")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"abstraction: k must be >= 1, got {self.k}")


def check_outputs(cfg: AbstractionConfig) -> list[Path]:
    """The index folders (checked to be indexes), after checking that each may take a profile: nothing there yet,
    or ours and overwrite asked; a one-line ConfigError naming the first that may not, before anything is written."""
    roots = []
    for index in cfg.index:
        root = Path(normalize_url(index))
        read_index_meta(root)
        ours = is_ours(root / INFO)
        for name in (INFO, LEVELS):
            check_output(root / name, WHAT, lambda fs, path: ours, cfg.overwrite, file=True, option="--index")
        roots.append(root)
    return roots


def _hierarchy_nodes(cfg: AbstractionConfig, root: Path, meta: dict[str, Any],
                     table: Hierarchy | None) -> tuple[Hierarchy, np.ndarray]:
    """The hierarchy and each image's node: by class name in the parents table, or from the store's label columns."""
    if table is not None:
        return table, image_nodes(str(root), table)
    from actstore.store import ActivationStore  # torch: only a run that reads label columns needs it

    store = ActivationStore(meta["store"], cfg.storage_options)
    columns = cfg.columns or ()
    missing = [c for c in columns if c not in store.label_columns]
    if missing:
        has = ", ".join(store.label_columns) or "none"
        raise ConfigError(f"{redact(store.url)}: no label column {missing[0]!r} (its label columns: {has})")
    images = store.images()
    if images.num_rows != int(meta["n_images"]):
        raise ConfigError(f"{redact(store.url)} holds {images.num_rows} images, the index {root} {meta['n_images']}")
    return column_nodes(images, columns)


def _write(root: Path, levels: Levels, hierarchy: Hierarchy, info: dict[str, Any]) -> None:
    """abstraction.parquet, then abstraction.json (last: it marks the pair complete and ours), each whole."""
    names = np.array([*hierarchy.names, None], dtype=object)
    table = pa.table({"feature": np.arange(levels.node.size, dtype=np.int32),
                      "node": pa.array(names[levels.node], pa.string()),
                      "depth": levels.depth.astype(np.int16), "share": levels.share.astype(np.float32),
                      "n": levels.n.astype(np.int32)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    put_bytes(*filesystem(str(root / LEVELS), None), sink.getvalue().to_pybytes())
    put_bytes(*filesystem(str(root / INFO), None), json.dumps(info, indent=1).encode())


def run_abstraction(cfg: AbstractionConfig, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Place every index's features, then write each index's profile (so bad input anywhere writes nothing);
    returns {index: its abstraction.json content}."""
    roots = check_outputs(cfg)
    table = Hierarchy.from_table(cfg.parents) if cfg.parents else None
    source = ({"source": "parents", "file": str(Path(cfg.parents).resolve())} if cfg.parents
              else {"source": "columns", "columns": list(cfg.columns or ())})
    placed = []
    for root in tqdm(roots, desc="abstraction", unit="index", disable=not progress):
        meta = read_index_meta(root)
        hierarchy, nodes = _hierarchy_nodes(cfg, root, meta, table)
        top = open_array(root, "top_images")
        k = top.shape[1] if cfg.k is None else min(cfg.k, top.shape[1])
        levels = index_levels(str(root), hierarchy, cfg.min_share, k, nodes)
        held = (np.asarray(top[:, :k]) >= 0).sum(1)
        backbone = meta.get("backbone") or {}
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "index": str(root.resolve()),
                "store": redact(meta["store"]), "sae": redact(meta["sae"]), "layer": meta["layer"],
                "backbone": {key: backbone.get(key) for key in ("family", "name")},
                "hierarchy": {**source, "nodes": len(hierarchy.names),
                              "depth": int(hierarchy.depths.max(initial=0)) + 1},
                "depth_names": list(cfg.columns or ()) or None, "min_share": cfg.min_share, "k": k,
                "profile": profile(levels, hierarchy, held), "config": public_config(cfg)}
        log.info("%s: %s of %s features placed", root, info["profile"]["placed"], levels.node.size)
        placed.append((root, levels, hierarchy, info))
    for root, levels, hierarchy, info in placed:
        _write(root, levels, hierarchy, info)
    return {str(root): info for root, _, _, info in placed}
