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

__all__ = ["ARRAYS", "FEATURES", "FORMAT", "FORMAT_VERSION", "IMAGES", "META", "dataset_root", "open_array",
           "read_index_meta"]

FORMAT, FORMAT_VERSION = "actstore-index", 1
META, FEATURES, IMAGES, ARRAYS = "index.json", "features.parquet", "images.parquet", "arrays"


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
