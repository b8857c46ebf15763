"""Parquet image datasets (the hub's layout): an image column holding the files' bytes, a label column beside it.

Image i is a row: files in sorted order, rows in file order. Only the footers and the label column are read to
list them; the decode tasks read image bytes a row group at a time (sources._refs).
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.errors import ConfigError, CorruptDataError
from actstore.extract.sources._files import parse_labels, spelled
from actstore.extract.sources._refs import ImageRef, open_exact

_READERS = 16
"""Files whose footers and labels are read at once: remote reads wait on the network, not the CPU."""


def from_parquet(fs: fsspec.AbstractFileSystem, paths: list[str], source: str, image_column: str | None,
                 label_column: str | None) -> tuple[list[str], list[int], list[str]]:
    """(references, labels, class names) of the rows of `paths` (sorted here), as the module docstring says."""
    paths = sorted(paths)
    first = _open(fs, paths[0])
    features = _hf_features(first.schema_arrow)
    column = _image_column(first.schema_arrow, features, image_column, paths[0])
    names = first.schema_arrow.names
    if label_column is not None and label_column not in names:
        raise ConfigError(f"{source}: no label column {label_column!r} (columns: {', '.join(names)})")
    label = label_column if label_column is not None else "label" if "label" in names else None

    def listing(path: str) -> tuple[int, pa.ChunkedArray | None]:
        pf = first if path == paths[0] else _open(fs, path)
        missing = [c for c in (column, label) if c is not None and c not in pf.schema_arrow.names]
        if missing:
            raise ConfigError(f"{spelled(fs, path)}: no column {missing[0]!r}, which {spelled(fs, paths[0])} has")
        try:
            labels = None if label is None else pf.read(columns=[label], use_threads=False).column(0)
        except (OSError, pa.ArrowException) as e:
            raise CorruptDataError(f"{spelled(fs, path)}: unreadable parquet ({' '.join(str(e).split())})",
                                   key=path) from None
        return pf.metadata.num_rows, labels

    with ThreadPoolExecutor(min(_READERS, len(paths))) as pool:
        listed = list(pool.map(listing, paths))
    uris = [str(ImageRef(spelled(fs, path), column=column, row=r)) for path, (n, _) in zip(paths, listed)
            for r in range(n)]
    if label is None:
        return uris, [-1] * len(uris), []
    values = pa.chunked_array([c for _, c in listed for c in c.chunks], type=listed[0][1].type)
    labels, class_names = parse_labels(values, source)
    if not class_names and pa.types.is_integer(values.type):
        class_names = _class_label_names(features, label) or _card_names(fs, paths[0], label)
    return uris, labels, class_names


def _open(fs: fsspec.AbstractFileSystem, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(open_exact(fs, path))
    except (OSError, pa.ArrowException) as e:
        raise CorruptDataError(f"{spelled(fs, path)}: unreadable parquet ({' '.join(str(e).split())})",
                               key=path) from None


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    """The `datasets` features that `datasets` writes into the schema metadata ({} without them)."""
    try:
        return json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}


def holds_images(type_: pa.DataType) -> bool:
    """A binary column, or a struct with a binary `bytes` field (the `datasets` Image feature)."""
    if pa.types.is_struct(type_):
        k = type_.get_field_index("bytes")
        return k >= 0 and holds_images(type_.field(k).type)
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def _image_column(schema: pa.Schema, features: dict[str, Any], given: str | None, path: str) -> str:
    """The column holding the images: the one named, else the `Image` feature, else the only binary column."""
    if given is not None:
        if given not in schema.names:
            raise ConfigError(f"{path}: no image column {given!r} (columns: {', '.join(schema.names)})")
        if not holds_images(schema.field(given).type):
            raise ConfigError(f"{path}: column {given!r} holds {schema.field(given).type}, not image bytes")
        return given
    tagged = [n for n, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image" and n in schema.names]
    found = tagged or [f.name for f in schema if holds_images(f.type)]
    if len(found) == 1 or (found and tagged):
        return found[0]
    what = f"several image columns ({', '.join(found)})" if found else "no image column"
    raise ConfigError(f"{path}: {what} among {', '.join(schema.names)}; name one with --image-column")


def _class_label_names(features: dict[str, Any], label: str) -> list[str]:
    feature = features.get(label)
    return list(feature["names"]) if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else []


def _card_names(fs: fsspec.AbstractFileSystem, path: str, label: str) -> list[str]:
    """The label's ClassLabel names from the dataset card (README.md's `dataset_info`), looked for beside the
    files and up to two folders above them (the hub's `data/` folder sits below the card)."""
    import yaml

    folder = posixpath.dirname(path)
    for _ in range(3):
        card = f"{folder}/README.md"
        if fs.isfile(card):
            text = fs.cat_file(card).decode("utf-8", "replace")
            head = text.split("---")[1] if text.startswith("---") and text.count("---") >= 2 else ""
            try:
                info = (yaml.safe_load(head) or {}).get("dataset_info", [])
            except yaml.YAMLError:
                return []
            for config in info if isinstance(info, list) else [info]:
                for feature in (config or {}).get("features") or []:
                    dtype = feature.get("dtype") if isinstance(feature, dict) else None
                    if feature.get("name") == label and isinstance(dtype, dict):
                        names = (dtype.get("class_label") or {}).get("names")
                        if isinstance(names, dict):
                            return [str(names[k]) for k in sorted(names, key=int)]
            return []
        folder = posixpath.dirname(folder)
    return []
