"""Where a store lives: one URL, two views of it.

zarr arrays go through a zarr store (LocalStore for plain paths, FsspecStore
for s3:// and other protocols); the store's other objects (unit records,
parquet tables) and the fast chunk reads go through an fsspec filesystem.
Both are built from the same URL and storage_options, inside the process
that uses them (async filesystems are not fork-safe).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.implementations.local
import zarr
from zarr.storage import FsspecStore, LocalStore

from actstore.errors import StoreNotFoundError
from actstore.store import _layout as L
from actstore.store._url import is_local, normalize_url


def zarr_store(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> LocalStore | FsspecStore:
    url = normalize_url(url)
    if is_local(url):
        return LocalStore(url, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """A synchronous fsspec filesystem and the store's root path on it."""
    return fsspec.core.url_to_fs(normalize_url(url), **(storage_options or {}))


def read_attrs(url: str, storage_options: dict[str, Any] | None, key: str) -> dict[str, Any]:
    """The store's attrs[key], or StoreNotFoundError saying what is there instead."""
    try:
        group = zarr.open_group(zarr_store(url, storage_options, read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.BaseZarrError, ValueError) as e:
        if not is_local(url):
            _check_bucket(url, storage_options)
        nothing = isinstance(e, FileNotFoundError) and not isinstance(e, zarr.errors.BaseZarrError)
        raise StoreNotFoundError(f"{url}: not an activation store ({'nothing' if nothing else 'no zarr group'} "
                                 "there)") from None
    attrs = group.attrs.asdict()
    if key not in attrs:
        raise StoreNotFoundError(f"{url}: a zarr group, but not an activation store (no '{key}' attrs)")
    return dict(attrs[key])


def _check_bucket(url: str, storage_options: dict[str, Any] | None) -> None:
    """StoreNotFoundError naming the bucket when the URL's bucket (its first path part) does not exist."""
    fs, root = filesystem(url, storage_options)
    bucket = root.split("/", 1)[0]
    if bucket and not fs.exists(bucket):
        raise StoreNotFoundError(f"{url}: bucket '{bucket}' does not exist (or these credentials cannot see it)")


def list_units(fs: fsspec.AbstractFileSystem, root: str, units_dir: str) -> list[int]:
    """Indices k of the unit records `<root>/<units_dir>/<k>.json`, fresh from storage."""
    fs.invalidate_cache(f"{root}/{units_dir}")
    try:
        names = fs.ls(f"{root}/{units_dir}", detail=False)
    except FileNotFoundError:
        return []
    stems = (n.rsplit("/", 1)[-1] for n in names)
    return sorted(int(s[:-5]) for s in stems if s.endswith(".json") and s[:-5].isdigit())


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one object whole: object stores PUT atomically; local files are renamed into place."""
    if not isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def cat_many(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | Exception]:
    """The whole contents of many small objects, in the order given; a failed read is its exception.

    One mechanism for every filesystem: fsspec's `cat_ranges` (ordered, and no glob expansion of the paths as
    `cat` would do). Object stores (async filesystems: s3fs, gcsfs) run the requests concurrently in batches of
    fsspec's size; the local filesystem reads the files in turn, which is faster there than a thread pool
    (~30 us a small file from the page cache, ~50 us through 8 threads). Each read is the range from byte 0
    (to the end): s3fs then sends one GET, where a whole-object read first looks up the size (a HEAD request,
    or a scan of a cached listing: quadratic over a folder of 15,000 unit objects). Empty objects do not read.
    """
    return fs.cat_ranges(paths, 0, None, on_error="return") if paths else []


_UNITS_PER_READ = 256
"""Units whose objects are read at once: requests enough to keep an object store busy, and at most ~100 MB of
stats files in memory (256 units of 12 layers of width 1024)."""


@dataclass(frozen=True)
class UnitObjects:
    """What a unit left beside its shards, as read; a read (or, for the record, parse) that failed is its
    exception, and an object not read (the record failed; stats of a record from before stats files) is None."""

    record: dict[str, Any] | Exception
    table: bytes | Exception | None
    stats: bytes | Exception | None


def read_units(fs: fsspec.AbstractFileSystem, root: str, units: Sequence[int]) -> Iterator[tuple[int, UnitObjects]]:
    """(k, record, images table and stats file of unit k) in the order of `units`, read concurrently a few
    hundred units at a time: their records first, then the other objects of the units whose record read (a
    record without `stats_crc32c` carries its stats itself)."""
    for first in range(0, len(units), _UNITS_PER_READ):
        batch = units[first:first + _UNITS_PER_READ]
        yield from zip(batch, _read_batch(fs, root, batch))


def _read_batch(fs: fsspec.AbstractFileSystem, root: str, units: Sequence[int]) -> list[UnitObjects]:
    records: list[dict[str, Any] | Exception] = []
    for data in cat_many(fs, [f"{root}/{L.unit_record_key(k)}" for k in units]):
        try:
            records.append(data if isinstance(data, Exception) else json.loads(data))
        except ValueError as e:
            records.append(e)
    readable = [k for k, r in zip(units, records) if not isinstance(r, Exception)]
    with_stats = [k for k, r in zip(units, records) if not isinstance(r, Exception) and "stats_crc32c" in r]
    data = cat_many(fs, [f"{root}/{L.unit_images_key(k)}" for k in readable]
                    + [f"{root}/{L.unit_stats_key(k)}" for k in with_stats])
    tables = dict(zip(readable, data))
    stats = dict(zip(with_stats, data[len(readable):]))
    return [UnitObjects(r, tables.get(k), stats.get(k)) for k, r in zip(units, records)]
