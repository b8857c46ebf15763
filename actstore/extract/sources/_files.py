"""Loose image files: a folder (class subfolders give labels) or a list file of URIs (.txt, .csv, .parquet)."""

from __future__ import annotations

import posixpath

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from actstore.errors import ConfigError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
LIST_EXTENSIONS = (".txt", ".csv", ".parquet")


def from_folder(fs: fsspec.AbstractFileSystem, root: str,
                paths: list[str]) -> tuple[list[str], list[int], list[str]]:
    """(URIs, labels, class names) of the images `paths` found under the folder `root`."""
    rels = sorted(path[len(root):].lstrip("/").split("/") for path in paths)
    prefix = spelled(fs, root)
    uris = [prefix.rstrip("/") + "/" + "/".join(parts) for parts in rels]
    if not rels or any(len(parts) == 1 for parts in rels):
        return uris, [-1] * len(rels), []
    class_names = sorted({parts[0] for parts in rels})
    index = {name: k for k, name in enumerate(class_names)}
    return uris, [index[parts[0]] for parts in rels], class_names


def from_list(fs: fsspec.AbstractFileSystem, path: str, source: str, label_column: str = "label",
              named: bool = False) -> tuple[list[str], list[int], list[str]]:
    """(URIs, labels, class names) of a list file; labels from `label_column` if it has one (`named`: it must)."""
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
            raise ConfigError(f"{source}: no 'uri' column and no column of image bytes "
                              f"(columns: {', '.join(table.column_names)})")
    else:
        raise ConfigError(f"{source}: not a folder, nor a list file ({', '.join(LIST_EXTENSIONS)})")
    if named and label_column not in table.column_names:
        raise ConfigError(f"{source}: no label column {label_column!r} (columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        return [], [], []
    if not _is_text(table.column("uri").type):
        raise ConfigError(f"{source}: the uri column holds {table.column('uri').type}, not URIs")
    entries = [(u or "").strip() for u in table.column("uri").to_pylist()]
    if "" in entries:
        raise ConfigError(f"{source}: row {entries.index('')} has an empty uri")
    base = spelled(fs, posixpath.dirname(path))
    uris = [_resolve(u, base) for u in entries]
    if label_column not in table.column_names:
        return uris, [-1] * len(uris), []
    labels, class_names = parse_labels(table.column(label_column), source)
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


def spelled(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as manifests spell it: local paths bare, others with their protocol (s3://b/k)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


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


def parse_labels(column: pa.ChunkedArray, source: str) -> tuple[list[int], list[str]]:
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
