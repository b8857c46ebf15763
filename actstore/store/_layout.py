"""Object keys inside a store, in one place (DESIGN.md, "The store")."""

from __future__ import annotations

IMAGES_TABLE = "images.parquet"
UNITS_DIR = "_units"
LABELS = "labels"


def acts_path(layer: str) -> str:
    return f"layers/{layer}/acts"


def stats_path(layer: str, kind: str) -> str:
    return f"layers/{layer}/stats/{kind}"


def shard_key(array_path: str, shard: int, ndim: int) -> str:
    """zarr v3 default chunk key of shard `shard` along axis 0 (other axes are one shard wide)."""
    return "/".join([array_path, "c", str(shard), *["0"] * (ndim - 1)])


def unit_record_key(k: int) -> str:
    return f"{UNITS_DIR}/{k}.json"


def unit_images_key(k: int) -> str:
    return f"{UNITS_DIR}/{k}.parquet"


def unit_stats_key(k: int) -> str:
    """Unit k's partial sums (safetensors); stores written before it exists keep them in the record's JSON."""
    return f"{UNITS_DIR}/{k}.stats.safetensors"
