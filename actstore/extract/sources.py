"""The image manifest: which images a job reads, in which order, with which labels.

A source is an image folder or a file listing image URIs, local or on any
fsspec filesystem (s3://...). The manifest fixes the order once: image i of
every store built from it is row i here, so the order must not depend on
listing order, thread timing or the machine.

- Folder: if no image sits directly in the folder and its subfolders hold
  images, it is ImageNet-style: each subfolder is a class (label = index of
  its name in the sorted class names; images found recursively below it).
  Otherwise every image under the folder, recursively, with label -1.
  Images are recognised by extension (IMAGE_EXTENSIONS, any case); hidden
  files and folders (names starting with ".", such as macOS "._x.jpg"
  resource forks) are skipped. Rows are sorted by relative path, compared
  component by component, so they are grouped by class in class order.
- List file (.txt, .csv, .parquet): rows keep the file's order, which is
  already an explicit order that its author chose. Relative entries are
  resolved against the list file's folder. Labels come from an optional
  `label` column: integers are used as they are (no class names), strings
  are class names (label = index in the sorted distinct names); empty: -1.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from actstore.errors import ConfigError, StorageError

__all__ = ["IMAGE_EXTENSIONS", "LIST_EXTENSIONS", "Manifest", "build_manifest", "read_bytes"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_EXTENSIONS = (".txt", ".csv", ".parquet")


@dataclass(frozen=True, eq=False)
class Manifest:
    """The ordered images of a dataset; image i is uris[i]. Compare manifests by fingerprint."""

    uris: list[str]
    """Absolute local paths, or fully qualified URLs (s3://bucket/key) for other filesystems."""
    labels: np.ndarray
    """int32 label per image (read-only); -1 where the source gives none."""
    class_names: list[str]
    """Name of each label value (labels index into it); empty when labels are bare integers or absent."""
    source: str
    """The folder or list file the manifest was built from, as given."""
    fingerprint: str = field(init=False)
    """sha256 of uris, labels and class names: equal fingerprints mean the same images in the same order.
    The source string is left out (uris are absolute already) and so are file contents (stat-ing a
    million objects costs minutes on S3)."""

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int32)  # a copy, made read-only: the fingerprint covers it
        labels.flags.writeable = False
        if labels.shape != (len(self.uris),):
            raise ConfigError(f"manifest: {len(self.uris)} uris but labels of shape {labels.shape}")
        h = hashlib.sha256()
        h.update("\0".join(self.uris).encode())
        h.update(b"\1" + labels.astype("<i4").tobytes())
        h.update(b"\1" + "\0".join(self.class_names).encode())
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "fingerprint", h.hexdigest())

    def __len__(self) -> int:
        return len(self.uris)


def build_manifest(source: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The manifest of an image folder or list file; ConfigError when there is nothing usable."""
    fs, root = fsspec.core.url_to_fs(str(source), **(storage_options or {}))
    root = root.rstrip("/") or root
    if fs.isdir(root):
        uris, labels, class_names = _from_folder(fs, root)
        what = "image files (" + ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + ")"
    elif fs.isfile(root):
        uris, labels, class_names = _from_list(fs, root, str(source))
        what = "image URIs"
    else:
        raise ConfigError(f"{source}: no such folder or file")
    if not uris:
        raise ConfigError(f"{source}: no {what} found")
    return Manifest(uris, labels, class_names, str(source))


_NOT_THERE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
"""Read errors that say something about the image itself (it is not there): recorded, not raised."""


def read_bytes(uris: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[bytes | Exception]:
    """The bytes of each URI, or the exception saying it is not there (a missing image is data, not a
    crash); any other read failure (access denied, an endpoint that keeps failing) raises StorageError.

    One filesystem call per protocol: async filesystems (s3) fetch the whole list concurrently.
    storage_options apply to the remote protocols, not to local paths.
    """
    out: list[bytes | Exception | None] = [None] * len(uris)
    groups: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        groups.setdefault(fsspec.core.split_protocol(uri)[0] or "file", []).append(i)
    for protocol, idx in groups.items():
        try:
            fs = fsspec.filesystem(protocol, **({} if protocol in ("file", "local") else storage_options or {}))
        except Exception as e:  # unknown protocol or missing driver: every URI of it fails alike
            for i in idx:
                out[i] = e
            continue
        paths = [fs._strip_protocol(uris[i]) for i in idx]
        # cat_ranges, not cat: cat expands globs ("img[1].jpg") and deduplicates; this keeps one result per URI
        for i, got in zip(idx, fs.cat_ranges(paths, None, None, on_error="return")):
            if isinstance(got, Exception) and not isinstance(got, _NOT_THERE):
                # a transient failure that outlasted the retries is no verdict on the image: fail the unit
                # (not recorded, so a rerun redoes it) instead of rejecting the image for good
                raise StorageError(f"{uris[i]}: read failed ({type(got).__name__}: {got}); "
                                   "rerun to resume") from got
            out[i] = got
    return out  # type: ignore[return-value]


def _from_folder(fs: fsspec.AbstractFileSystem, root: str) -> tuple[list[str], list[int], list[str]]:
    rels = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        parts = rel.split("/")
        if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS and not any(p.startswith(".") for p in parts):
            rels.append(parts)
    rels.sort()
    prefix = root if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(root)
    uris = [prefix.rstrip("/") + "/" + "/".join(parts) for parts in rels]
    if not rels or any(len(parts) == 1 for parts in rels):
        return uris, [-1] * len(rels), []
    class_names = sorted({parts[0] for parts in rels})
    index = {name: k for k, name in enumerate(class_names)}
    return uris, [index[parts[0]] for parts in rels], class_names


def _from_list(fs: fsspec.AbstractFileSystem, path: str, source: str) -> tuple[list[str], list[int], list[str]]:
    ext = posixpath.splitext(path)[1].lower()
    if ext == ".txt":
        with fs.open(path, "rt", encoding="utf-8") as f:
            entries = [line.strip() for line in f]
        table = pa.table({"uri": pa.array([e for e in entries if e and not e.startswith("#")], pa.string())})
    elif ext == ".csv":
        with fs.open(path, "rb") as f:
            table = pa_csv.read_csv(f)
        table = _csv_uri_column(table, source)
    elif ext == ".parquet":
        table = pq.read_table(path, filesystem=fs)
        if "uri" not in table.column_names:
            raise ConfigError(f"{source}: no 'uri' column (columns: {', '.join(table.column_names)})")
    else:
        raise ConfigError(f"{source}: not a folder, nor a list file ({', '.join(LIST_EXTENSIONS)})")
    if table.num_rows == 0:
        return [], [], []
    if not _is_text(table.column("uri").type):
        raise ConfigError(f"{source}: the uri column holds {table.column('uri').type}, not URIs")
    entries = [(u or "").strip() for u in table.column("uri").to_pylist()]
    if "" in entries:
        raise ConfigError(f"{source}: row {entries.index('')} has an empty uri")
    base = posixpath.dirname(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(posixpath.dirname(path))
    uris = [_resolve(u, base) for u in entries]
    if "label" not in table.column_names:
        return uris, [-1] * len(uris), []
    labels, class_names = _parse_labels(table.column("label"), source)
    return uris, labels, class_names


def _csv_uri_column(table: pa.Table, source: str) -> pa.Table:
    """The table with its URIs in column 'uri': that column, or else the first one if it holds text."""
    if "uri" in table.column_names:
        return table
    first = table.column_names[0]
    if posixpath.splitext(first)[1].lower() in IMAGE_EXTENSIONS:
        raise ConfigError(f"{source}: the first line {first!r} is an image, not a header: add a line 'uri' on top")
    if first == "label" or (table.num_rows and not _is_text(table.column(first).type)):
        raise ConfigError(f"{source}: no 'uri' column, and the first column {first!r} does not hold URIs")
    return table.rename_columns(["uri", *table.column_names[1:]])


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _resolve(uri: str, base: str) -> str:
    """An absolute path or full URL for one list entry; relative entries are relative to the list's folder."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri or uri.startswith("/"):
        return uri
    protocol, _, path = base.rpartition("://")
    joined = posixpath.normpath(posixpath.join(path, uri))
    return f"{protocol}://{joined}" if protocol else joined


def _parse_labels(column: pa.ChunkedArray, source: str) -> tuple[list[int], list[str]]:
    if pa.types.is_integer(column.type) or pa.types.is_null(column.type):
        labels = [-1 if v is None else int(v) for v in column.to_pylist()]
        if labels and not -1 <= min(labels) <= max(labels) < 2**31:
            raise ConfigError(f"{source}: labels must lie in [-1, 2**31), found {min(labels)}..{max(labels)}")
        return labels, []
    if _is_text(column.type):
        values = column.to_pylist()
        class_names = sorted({v for v in values if v})
        index = {name: k for k, name in enumerate(class_names)}
        return [index[v] if v else -1 for v in values], class_names
    raise ConfigError(f"{source}: labels must be integers or class names, not {column.type}")
