"""The index folder's layout, shared by its writer (services.index.build) and the service (services.api).

Light on purpose (numpy and the standard library): the service imports it without torch.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actstore.errors import CorruptDataError, StoreFormatError, StoreNotFoundError
from actstore.store import normalize_url

__all__ = ["ARRAYS", "FEATURES", "FORMAT", "FORMAT_VERSION", "IMAGES", "META", "check_index", "dataset_root",
           "open_array", "read_index_meta"]

FORMAT, FORMAT_VERSION = "actstore-index", 1
META, FEATURES, IMAGES, ARRAYS = "index.json", "features.parquet", "images.parquet", "arrays"
_LEADING = {"top_images": ("d_sae", "k"), "top_values": ("d_sae", "k"), "heatmaps": ("d_sae", "k", "n_patches"),
            "band_images": ("d_sae",), "band_values": ("d_sae",), "band_counts": ("d_sae",),
            "image_features": ("n_images", "m"), "image_values": ("n_images", "m")}
"""Each index array's leading dimensions, by the index.json entries that size them."""


def read_index_meta(path: str | Path) -> dict[str, Any]:
    """index.json of the index at `path`, checked for format and version."""
    p = Path(normalize_url(str(path))) / META
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise StoreNotFoundError(f"{p.parent}: not a feature index (no {META}; run `actstore index`)") from None
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{p}: not JSON ({e})", key=META) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"{p.parent}: not an {FORMAT} v{FORMAT_VERSION} index")
    return meta


def check_index(path: str | Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every index array opened and checked against index.json (bytes on disk, leading dimensions), and the
    row counts of both tables; a CorruptDataError naming the first bad file. Returns the arrays."""
    import pyarrow.parquet as pq  # only the service's start-up needs it here

    root = Path(normalize_url(str(path)))
    arrays = {}
    for name, dims in _LEADING.items():
        try:
            arrays[name] = a = open_array(root, name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            if isinstance(e, CorruptDataError):
                raise
            raise CorruptDataError(f"{root / ARRAYS / name}: unreadable array ({e})", key=name) from None
        want = tuple(int(meta[d]) for d in dims)
        if a.shape[:len(dims)] != want:
            raise CorruptDataError(f"{root / ARRAYS / name}: shape {a.shape}, index.json says "
                                   f"({', '.join(f'{d}={w}' for d, w in zip(dims, want))}, ...)", key=name)
    for table, rows in ((FEATURES, "d_sae"), (IMAGES, "n_images")):
        try:
            n = pq.read_metadata(root / table).num_rows
        except (OSError, ValueError) as e:
            raise CorruptDataError(f"{root / table}: unreadable ({' '.join(str(e).split())})", key=table) from None
        if n != int(meta[rows]):
            raise CorruptDataError(f"{root / table}: {n} rows, index.json says {rows}={meta[rows]}", key=table)
    return arrays


def open_array(path: str | Path, name: str) -> np.ndarray:
    """Memory-map one index array (read-only): its single uncompressed zarr chunk is the raw C-order array."""
    root = Path(normalize_url(str(path))) / ARRAYS / name
    meta = json.loads((root / "zarr.json").read_text())
    dtype, shape = np.dtype(meta["data_type"]).newbyteorder("<"), tuple(meta["shape"])
    if 0 in shape:
        return np.empty(shape, dtype)
    chunk = root.joinpath("c", *["0"] * len(shape))
    size = chunk.stat().st_size if chunk.exists() else -1
    if size != dtype.itemsize * math.prod(shape):
        raise CorruptDataError(f"{chunk}: {size} bytes, expected {dtype.itemsize * math.prod(shape)} "
                               f"for {shape} {dtype}", key=str(chunk))
    # a plain ndarray view of the map: memmap's own __getitem__ costs ~5 us a call on the service's hot path
    return np.memmap(chunk, dtype=dtype, mode="r", shape=shape).view(np.ndarray)


def dataset_root(uris: Sequence[str]) -> str:
    """The deepest folder (local, symlinks resolved) or URL prefix holding every image: the service reads
    nothing outside it. Fixed when the index is built, so editing images.parquet later cannot widen it."""
    if not uris:
        return ""
    if "://" in uris[0]:
        return posixpath.dirname(os.path.commonprefix([posixpath.dirname(u) + "/" for u in uris])) + "/"
    return os.path.realpath(os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u in uris]))
