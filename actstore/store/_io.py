"""Where a store lives: one URL, two views of it.

zarr arrays go through a zarr store (LocalStore for plain paths, FsspecStore
for s3:// and other protocols); the store's other objects (unit records,
parquet tables) and the fast chunk reads go through an fsspec filesystem.
Both are built from the same URL and storage_options, inside the process
that uses them (async filesystems are not fork-safe).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
import fsspec.implementations.local
import zarr
from zarr.storage import FsspecStore, LocalStore

from actstore.errors import StoreNotFoundError
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
