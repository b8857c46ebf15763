"""The image manifest: which images a job reads, in which order, with which labels, whatever the dataset's format.

A source is local or on any fsspec filesystem (s3://..., hf://datasets/... through huggingface_hub). The
manifest fixes the order once: image i of every store built from it is row i here, so the order must not depend
on listing order, thread timing or the machine. Image i is one reference (ImageRef) to where its bytes live.

- Folder of images: if no image sits directly in the folder and its subfolders hold images, it is
  ImageNet-style: each subfolder is a class (label = index of its name in the sorted class names; images found
  recursively below it). Otherwise every image under the folder, recursively, with label -1. Images are
  recognised by extension (IMAGE_EXTENSIONS, any case); hidden files and folders (names starting with ".", such
  as macOS "._x.jpg" resource forks) are skipped. Rows are sorted by relative path, compared component by
  component, so they are grouped by class in class order. An iNat2021 folder (a `<folder>.json` beside it whose
  categories name the class folders) also gets its species names and a label column per taxonomy level.
- List file (.txt, .csv, or .parquet with a `uri` column): rows keep the file's order, which is already an
  explicit order that its author chose. Relative entries are resolved against the list file's folder. Labels
  come from an optional `label` column: integers are used as they are, strings are class names (label = index
  in the sorted distinct names); empty: -1.
- Parquet image dataset (a .parquet file with an image column, a folder of them, or a glob): one image per row,
  files in sorted order; see _parquet.
- WebDataset tar shards (a .tar file, a folder of them, a glob or braces `train-{0000..1023}.tar`): one image
  per sample, shards in sorted order; see _tar.

Integer labels get their class names from the format (a `datasets` ClassLabel, the dataset card) or from a
`class_names` file, one name per line.
"""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from actstore.errors import ConfigError
from actstore.extract.sources._files import IMAGE_EXTENSIONS, LIST_EXTENSIONS, from_folder, from_list
from actstore.extract.sources._inat import TAXONOMY, taxonomy
from actstore.extract.sources._manifest import LabelColumn, Manifest
from actstore.extract.sources._parquet import from_parquet, holds_images
from actstore.extract.sources._refs import ImageRef, image_file, read_bytes
from actstore.extract.sources._tar import IMAGE_MEMBERS, from_tars

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_MEMBERS", "LIST_EXTENSIONS", "TAXONOMY", "ImageRef", "LabelColumn",
           "Manifest", "build_manifest", "image_file", "read_bytes"]

_SHARDS = {".parquet": "parquet", ".tar": "tar"}


def build_manifest(source: str, storage_options: dict[str, Any] | None = None, *, image_column: str | None = None,
                   label_column: str | None = None, class_names: str | None = None,
                   progress: bool = False) -> Manifest:
    """The manifest of a source (see the module docstring); ConfigError when there is nothing usable.

    image_column: a parquet dataset's image column (default: its `Image` feature, else its only binary column).
    label_column: a parquet column, a list file's column, or a tar sample's member or .json field (default:
    `label`, `label`, `cls` when there is one); named and missing, it is refused. class_names: a text file naming
    integer labels, one per line (overrides the format's own names)."""
    options = storage_options or {}
    fs, root = fsspec.core.url_to_fs(str(source), **options)
    root = root.rstrip("/") or root
    columns: dict[str, LabelColumn] = {}
    if fs.isdir(root):
        kind, paths = _folder_kind(fs, root, str(source))
    elif fs.isfile(root):
        kind, paths = _file_kind(fs, root), [root]
    else:
        kind, paths = _pattern(fs, str(source), options)
    if image_column is not None and kind in ("list", "tar"):
        raise ConfigError(f"{source}: --image-column is for parquet datasets")
    if kind == "folder":
        if label_column is not None:
            raise ConfigError(f"{source}: an image folder's labels are its class folders; --label-column is for "
                              "parquet, tar and list sources")
        uris, labels, names = from_folder(fs, root, paths)
        found = taxonomy(fs, root, names, np.asarray(labels, np.int32)) if names else None
        if found is not None:
            names, columns = found
    elif kind == "list":
        uris, labels, names = from_list(fs, root, str(source), label_column or "label", label_column is not None)
    elif kind == "parquet":
        uris, labels, names = from_parquet(fs, paths, str(source), image_column, label_column)
    else:
        uris, labels, names = from_tars(fs, paths, str(source), label_column, progress)
    if not uris:
        raise ConfigError(f"{source}: no {'image URIs' if kind == 'list' else 'images'} found")
    if class_names is not None:
        names = _class_names(class_names, labels, options)
    return Manifest(uris, labels, names, str(source), columns)


def _folder_kind(fs: fsspec.AbstractFileSystem, root: str, source: str) -> tuple[str, list[str]]:
    """("folder", image paths) when the folder holds images, else the kind of shards it holds and their paths."""
    by_kind: dict[str, list[str]] = {}
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if any(p.startswith(".") for p in rel.split("/")):
            continue
        ext = posixpath.splitext(rel)[1].lower()
        kind = "folder" if ext in IMAGE_EXTENSIONS else _SHARDS.get(ext)
        if kind is not None:
            by_kind.setdefault(kind, []).append(path)
    if "folder" in by_kind:  # images win: a metadata table beside them is no dataset of its own
        return "folder", by_kind["folder"]
    if len(by_kind) > 1:
        raise ConfigError(f"{source}: holds {len(by_kind['parquet'])} parquet files and {len(by_kind['tar'])} tar "
                          "shards; point --images at one kind (a subfolder or a glob)")
    if not by_kind:
        raise ConfigError(f"{source}: no image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}), "
                          "parquet files or tar shards found")
    return next(iter(by_kind.items()))


def _file_kind(fs: fsspec.AbstractFileSystem, path: str) -> str:
    ext = posixpath.splitext(path)[1].lower()
    if path.lower().endswith((".tar.gz", ".tgz", ".tar.zst", ".tar.xz", ".tar.bz2")):
        raise ConfigError(f"{path}: a compressed tar cannot be read by byte range: decompress it (or, for an "
                          "image-folder tarball such as iNat2021's, extract it) first")
    if ext == ".tar":
        return "tar"
    if ext == ".parquet":  # an image dataset when it holds image bytes, else a list of URIs
        schema = pq.read_schema(fs.open(path, "rb"))
        return "parquet" if any(holds_images(f.type) for f in schema) else "list"
    if ext in LIST_EXTENSIONS:
        return "list"
    raise ConfigError(f"{path}: not a folder, a list file ({', '.join(LIST_EXTENSIONS)}), a parquet dataset or a "
                      ".tar shard")


def _pattern(fs: fsspec.AbstractFileSystem, source: str, options: dict[str, Any]) -> tuple[str, list[str]]:
    """The shards a glob or brace pattern names (`train-*.parquet`, `train-{0000..1023}.tar`)."""
    from braceexpand import braceexpand

    if not any(c in source for c in "*?[{"):
        raise ConfigError(f"{source}: no such folder or file")
    paths: set[str] = set()
    for expanded in braceexpand(source):
        efs, path = fsspec.core.url_to_fs(expanded, **options)
        if any(c in path for c in "*?["):
            paths.update(efs.glob(path))
        elif efs.isfile(path):
            paths.add(path)
        else:
            raise ConfigError(f"{source}: {expanded} does not exist")
    kinds = {_SHARDS.get(posixpath.splitext(p)[1].lower()) for p in paths}
    if not paths:
        raise ConfigError(f"{source}: matches no file")
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(f"{source}: a pattern must match only .parquet files or only .tar shards")
    return kinds.pop(), sorted(paths)


def _class_names(path: str, labels: list[int], options: dict[str, Any]) -> list[str]:
    """The lines of a class-names file, checked to name every label."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **options) as f:
            names = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"--class-names {path}: no such file") from None
    top = max(labels, default=-1)
    if top >= len(names):
        raise ConfigError(f"--class-names {path}: {len(names)} names, but labels go up to {top}")
    return names
