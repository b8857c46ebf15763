"""An index's features placed in a label hierarchy: each feature's top images (the index's `top_images`), their
class names (the index's images table and class names), and their level (services.abstraction.levels).

    hierarchy, levels = index_levels("./index", Hierarchy.from_table("wordnet.csv"), min_share=0.5)
    depth_counts(levels, hierarchy)      # features per depth: the model's abstraction profile

Reads (features x k) image ids and one label per image: memory follows the index's widths, not images x features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from actstore.errors import ConfigError
from actstore.store import normalize_url
from services.abstraction.levels import Hierarchy, Levels, feature_levels
from services.index.layout import IMAGES, open_array, read_index_meta

__all__ = ["depth_counts", "image_nodes", "index_levels"]


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


def index_levels(index: str, hierarchy: Hierarchy, min_share: float = 0.5, k: int | None = None) -> Levels:
    """Each of the index's features' level in `hierarchy`, from its top `k` images (default all the index holds)."""
    top = open_array(index, "top_images")
    if k is not None:
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        top = top[:, :k]
    nodes = image_nodes(index, hierarchy)
    return feature_levels(np.where(top >= 0, nodes[np.maximum(top, 0)], -1), hierarchy, min_share)


def depth_counts(levels: Levels, hierarchy: Hierarchy) -> np.ndarray:
    """(max depth + 1,) int64: how many features sit at each depth (features with no level are left out)."""
    placed = levels.depth[levels.depth >= 0]
    return np.bincount(placed, minlength=int(hierarchy.depths.max(initial=0)) + 1)
