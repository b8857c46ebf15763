"""The index folder's layout, shared by its writer (services.index.build) and the service (services.api).

Light on purpose (numpy, pyarrow and the standard library): the service imports it without torch.

The image table (IMAGE_TABLE, images.arrow) is what the service reads of images.parquet (uri, label, ok) as one
uncompressed Arrow IPC record batch: every service process memory-maps the same file, so its pages sit once in the
page cache however many workers there are. images.parquet is encoded: reading it gives each process a decoded copy
of its own (~90 MB at 1.28M images; the URIs as Python strings were ~150 MB more). The table records the sha256 of
the images.parquet it was made from: images.parquet stays the table people and tools edit, and a table made from
another images.parquet is not this index's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from actstore.errors import CorruptDataError
from actstore.extract.sources import image_file
from actstore.outputs import read_marker
from actstore.store import normalize_url

__all__ = ["ARRAYS", "FEATURES", "FORMAT", "FORMAT_VERSION", "IMAGES", "IMAGE_TABLE", "META", "check_index",
           "dataset_root", "image_arrays", "images_digest", "made_from", "numpy_view", "open_array",
           "open_image_table", "read_image_columns", "read_index_meta", "write_image_table"]

FORMAT, FORMAT_VERSION = "actstore-index", 1
META, FEATURES, IMAGES, ARRAYS = "index.json", "features.parquet", "images.parquet", "arrays"
IMAGE_TABLE = "images.arrow"
_COLUMNS = pa.schema([("uri", pa.large_string()), ("label", pa.int32()), ("ok", pa.uint8())])
"""The image table's columns (ok: 1 served, 0 rejected at extraction; uint8, so the mapped column is a bool view)."""
_MADE_FROM = b"images.parquet sha256"
"""The image table's schema metadata key: the sha256 of the images.parquet it was made from."""
_LEADING = {"top_images": ("d_sae", "k"), "top_values": ("d_sae", "k"), "heatmaps": ("d_sae", "k", "n_patches"),
            "band_images": ("d_sae",), "band_values": ("d_sae",), "band_counts": ("d_sae",),
            "image_features": ("n_images", "m"), "image_values": ("n_images", "m")}
"""Each index array's leading dimensions, by the index.json entries that size them."""


def read_index_meta(path: str | Path) -> dict[str, Any]:
    """index.json of the index at `path`, checked for format and version."""
    return read_marker(path, META, FORMAT, FORMAT_VERSION, "a feature index", "index")


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


def dataset_root(uris: Iterable[str]) -> str:
    """The deepest folder (local, symlinks resolved) or URL prefix holding every image's file (a loose image,
    a parquet file or a tar shard): the service reads nothing outside it. Fixed when the index is built, so
    editing images.parquet later cannot widen it. Takes the URIs one at a time and keeps only their distinct
    folders (ImageNet's: a thousand)."""
    folders: set[str] = set()
    remote = None
    for ref in uris:
        u = image_file(ref)
        if remote is None:
            remote = "://" in u
        folders.add(posixpath.dirname(u) + "/" if remote else os.path.dirname(os.path.abspath(u)))
    if not folders:
        return ""
    if remote:
        return posixpath.dirname(os.path.commonprefix(sorted(folders))) + "/"
    return os.path.realpath(os.path.commonpath(sorted(folders)))


def read_image_columns(index: str | Path) -> pa.RecordBatch:
    """What the service reads of the index's images.parquet (uri, label, status), as the image table's columns in
    one contiguous record batch; a CorruptDataError when it cannot be read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(normalize_url(str(index))) / IMAGES
    try:  # ParquetFile and a regex, not read_table and equal(column, "ok"): both import pandas (see numpy_view)
        images = pq.ParquetFile(path).read(columns=["uri", "label", "status"], use_threads=False)
        columns = (images.column("uri").cast(pa.large_string()), images.column("label").cast(pa.int32()),
                   pc.match_substring_regex(images.column("status"), pattern="^ok$").cast(pa.uint8()))
        batch = pa.RecordBatch.from_arrays([c.combine_chunks() for c in columns], schema=_COLUMNS)
    except (OSError, pa.ArrowException, KeyError) as e:
        raise CorruptDataError(f"{path}: unreadable ({' '.join(str(e).split())})", key=IMAGES) from None
    del images, columns
    pa.default_memory_pool().release_unused()  # the pool would keep what decoding took (~200 MB at 1.28M images)
    return batch


def image_arrays(batch: pa.RecordBatch) -> dict[str, Any]:
    """The image table's columns as the service indexes them, without a copy: {uri: Arrow string array,
    label: int32 array, ok: bool array}."""
    return {"uri": batch.column("uri"), "label": numpy_view(batch.column("label")),
            "ok": numpy_view(batch.column("ok")).view(bool)}


def numpy_view(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric Arrow column without nulls as a read-only numpy array over its buffer (one chunk: no copy).
    Not Array.to_numpy: its first call imports pandas (~30 MB more in every service process, 0.3 s)."""
    a = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if a.null_count:
        raise ValueError(f"{a.null_count} nulls in a column of numbers")
    t = a.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise ValueError(f"a column of {t}, not of numbers")
    kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
    dtype = np.dtype(f"<{kind}{t.bit_width // 8}")
    return np.frombuffer(a.buffers()[1], dtype, len(a), a.offset * dtype.itemsize)


def images_digest(index: str | Path) -> str:
    """The sha256 of the index's images.parquet: which images.parquet an image table was made from."""
    path = Path(normalize_url(str(index))) / IMAGES
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CorruptDataError(f"{path}: unreadable ({type(e).__name__})", key=IMAGES) from None


def write_image_table(index: str | Path, out: str | Path | None = None) -> Path:
    """The image table of the index's images.parquet, written to `out` (default: the index's images.arrow) under a
    temporary name and renamed into place, so that a reader never maps half a table."""
    root = Path(normalize_url(str(index)))
    out = root / IMAGE_TABLE if out is None else Path(out)
    batch, digest = read_image_columns(root), images_digest(root)
    part = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with pa.OSFile(str(part), "wb") as sink, ipc.new_file(sink, _COLUMNS.with_metadata({_MADE_FROM: digest})) as w:
            w.write_batch(batch)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    del batch
    pa.default_memory_pool().release_unused()  # the table too: the process that starts the workers keeps none of it
    return out


def made_from(path: str | Path) -> str | None:
    """The sha256 of the images.parquet the image table at `path` was made from; None when there is no such file
    (a CorruptDataError when there is one that cannot be read)."""
    if not Path(path).exists():
        return None
    try:
        schema = ipc.open_file(pa.memory_map(str(path))).schema
    except (OSError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    return (schema.metadata or {}).get(_MADE_FROM, b"").decode()


def open_image_table(path: str | Path, digest: str, n_images: int) -> dict[str, Any]:
    """The image table at `path` memory-mapped read-only (image_arrays: no copy, so the processes that map it share
    its pages), checked: it reads whole (offsets inside their data, UTF-8), has the image table's columns and
    `n_images` rows, and was made from the images.parquet whose sha256 is `digest`; a CorruptDataError naming the
    file otherwise."""
    batch, arrays = None, {}
    try:
        reader = ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches == 1 and reader.schema.remove_metadata().equals(_COLUMNS):
            batch = reader.get_batch(0)
            batch.validate(full=True)
            arrays = image_arrays(batch)  # a null where a number should be fails here
    except (OSError, ValueError, pa.ArrowException) as e:
        raise _unreadable(path, e) from None
    if batch is None:
        raise CorruptDataError(f"{path}: not an image table (one record batch of {', '.join(_COLUMNS.names)})",
                               key=IMAGE_TABLE)
    if batch.num_rows != n_images:
        raise CorruptDataError(f"{path}: {batch.num_rows} rows, index.json says n_images={n_images}", key=IMAGE_TABLE)
    if (reader.schema.metadata or {}).get(_MADE_FROM, b"").decode() != digest:
        raise CorruptDataError(f"{path}: made from another images.parquet than the index's", key=IMAGE_TABLE)
    return arrays


def _unreadable(path: str | Path, e: Exception) -> CorruptDataError:
    return CorruptDataError(f"{path}: unreadable image table ({' '.join(str(e).split())})", key=IMAGE_TABLE)
