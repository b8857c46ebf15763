"""An index's features placed in a label hierarchy: each feature's top images (the index's `top_images`), their
class names (the index's images table and class names), and their level (services.abstraction.levels).

    hierarchy, levels = index_levels("./index", Hierarchy.from_table("wordnet.csv"), min_share=0.5)
    depth_counts(levels, hierarchy)      # features per depth: the model's abstraction profile
    hierarchy, nodes = column_nodes(store.images(), ("kingdom", "family", "species"))   # from label columns
    profile(levels, hierarchy, held)     # the counts, shares, mean depth and unplaced features abstraction.json holds
    profile_table({"dinov2": info_a, "clip": info_b})     # models side by side, as printed and reported

Reads (features x k) image ids and one node per image: memory follows the index's widths, not images x features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actstore.errors import ConfigError
from actstore.store import normalize_url
from services.abstraction.levels import Hierarchy, Levels, feature_levels
from services.index.layout import IMAGES, open_array, read_index_meta

__all__ = ["column_nodes", "depth_counts", "image_nodes", "index_levels", "profile", "profile_table"]


def image_nodes(index: str, hierarchy: Hierarchy) -> np.ndarray:
    """(n_images,) int64: the hierarchy node of each image's class (by the index's class names), -1 for a rejected
    or unlabelled image. A class the hierarchy does not name is refused in one line."""
    meta = read_index_meta(index)
    names = list(meta.get("class_names") or [])
    if not names:
        raise ConfigError(f"{index}: its images have no class names to place in a hierarchy")
    images = pq.ParquetFile(Path(normalize_url(index)) / IMAGES).read(columns=["label", "status"])
    labels = images.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    ok = np.asarray(images.column("status").to_pylist()) == "ok"
    nodes = np.concatenate([hierarchy.index(names), [-1]])
    return np.where(ok & (labels >= 0) & (labels < len(names)), nodes[np.clip(labels, -1, len(names))], -1)


def column_nodes(images: pa.Table, columns: Sequence[str]) -> tuple[Hierarchy, np.ndarray]:
    """The hierarchy of a store's label columns (coarse to fine, nodes "column:value": Hierarchy.from_columns) and
    each image's node (n_images,): its finest value read down to its first empty one ("" or null), so an image
    without a species sits at its genus (it counts towards the nodes above it, never below); -1 for an image with
    no first column or rejected at extraction. Works on each column's distinct values, never one Python row per
    image."""
    codes, values = [], []
    for column in columns:
        encoded = pc.dictionary_encode(images.column(column)).combine_chunks()
        names = encoded.dictionary.to_pylist()
        code = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        codes.append(np.where(np.isin(code, [i for i, v in enumerate(names) if not v]), -1, code))
        values.append(names)
    table = np.stack(codes, 1) if codes else np.zeros((images.num_rows, 0), np.int64)
    table[np.logical_or.accumulate(table < 0, axis=1)] = -1  # below the first empty value: nothing
    which = np.zeros(images.num_rows, np.int64)  # each image's distinct row of codes, one column at a time
    for j, names in enumerate(values):  # (rows so far) x (values + 1) < images x values: no int64 overflow
        which = np.unique(which * (len(names) + 1) + table[:, j] + 1, return_inverse=True)[1].reshape(-1)
    first = np.unique(which, return_index=True)[1]
    paths = [[values[j][c] for j, c in enumerate(row) if c >= 0] for row in table[first].tolist()]
    hierarchy = Hierarchy.from_columns(paths, columns)
    labelled = [i for i, p in enumerate(paths) if p]
    ends = np.full(len(paths), -1, np.int64)
    ends[labelled] = hierarchy.index([f"{columns[len(paths[i]) - 1]}:{paths[i][-1]}" for i in labelled])
    ok = np.asarray(images.column("status").to_pylist()) == "ok"
    return hierarchy, np.where(ok, ends[which], -1)


def index_levels(index: str, hierarchy: Hierarchy, min_share: float = 0.5, k: int | None = None,
                 nodes: np.ndarray | None = None) -> Levels:
    """Each of the index's features' level in `hierarchy`, from its top `k` images (default all the index holds);
    `nodes`: each image's node (default by its class name: image_nodes)."""
    top = open_array(index, "top_images")
    if k is not None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        top = top[:, :k]
    nodes = image_nodes(index, hierarchy) if nodes is None else nodes
    return feature_levels(np.where(top >= 0, nodes[np.maximum(top, 0)], -1), hierarchy, min_share)


def depth_counts(levels: Levels, hierarchy: Hierarchy) -> np.ndarray:
    """(max depth + 1,) int64: how many features sit at each depth (features with no level are left out)."""
    placed = levels.depth[levels.depth >= 0]
    return np.bincount(placed, minlength=int(hierarchy.depths.max(initial=0)) + 1)


def profile(levels: Levels, hierarchy: Hierarchy, held: np.ndarray) -> dict[str, Any]:
    """A model's abstraction profile: features per depth (counts), their share of the placed features, the mean
    depth of those; `held`: each feature's top images; `no_images`: features with none (dead), `unplaced`: features
    with top images that no node holds min_share of (their labels spread over several roots, or none labelled)."""
    counts = depth_counts(levels, hierarchy)
    placed, dead = int(counts.sum()), int((np.asarray(held) == 0).sum())
    return {"features": int(levels.depth.size), "placed": placed, "no_images": dead,
            "unplaced": int(levels.depth.size) - placed - dead, "counts": counts.tolist(),
            "share": (counts / placed).tolist() if placed else [0.0] * counts.size,
            "mean_depth": float(levels.depth[levels.depth >= 0].mean()) if placed else None}


def profile_table(infos: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Models side by side (one column each, named by the keys of `infos`, their abstraction.json contents): a row
    per depth (features and their share of the placed ones), then the mean depth and the features left out."""
    depths = max(len(i["profile"]["counts"]) for i in infos.values()) if infos else 0
    names = next((i["depth_names"] for i in infos.values() if i.get("depth_names")), None) or []
    rows = []
    for d in range(depths):
        cells = []
        for info in infos.values():
            p = info["profile"]
            cells.append(f"{p['counts'][d]} ({p['share'][d]:.1%})" if d < len(p["counts"]) else "-")
        rows.append([f"depth {d}" + (f" {names[d]}" if d < len(names) else ""), *cells])
    for label, value in (("placed features", lambda p: str(p["placed"])),
                         ("mean depth", lambda p: "-" if p["mean_depth"] is None else f"{p['mean_depth']:.2f}"),
                         ("unplaced (live)", lambda p: str(p["unplaced"])),
                         ("no top images (dead)", lambda p: str(p["no_images"]))):
        rows.append([label, *(value(i["profile"]) for i in infos.values())])
    return ["", *infos], rows
