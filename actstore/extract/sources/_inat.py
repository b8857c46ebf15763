"""iNat2021: a class-folder tree (`train/00000_Animalia_..._Lumbricus_terrestris/*.jpg`) beside its COCO-style
JSON (`train.json`), whose categories name each folder (`image_dir_name`) and give its taxonomy.

The class names become the species' names, and every taxonomy level a label column of its own, so a probe can
be trained on any level (`actstore probe --label-column family`). Only the JSON's `categories` array is parsed:
train.json lists 2.7M images before it, which are read past, never held.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import numpy as np

from actstore.errors import ConfigError
from actstore.extract.sources._manifest import LabelColumn

TAXONOMY = ("supercategory", "kingdom", "phylum", "class", "order", "family", "genus", "species")
"""The label columns an iNat2021 folder gets; `species` is the category's name (genus and epithet)."""
_READ = 1 << 22


def taxonomy(fs: fsspec.AbstractFileSystem, root: str, class_folders: list[str],
             labels: np.ndarray) -> tuple[list[str], dict[str, LabelColumn]] | None:
    """(class names, label columns) from the `<folder>.json` beside the class folders, or None when there is no
    such file or its categories do not name folders (it is some other JSON)."""
    path = f"{root.rstrip('/')}.json"
    if not fs.isfile(path):
        return None
    categories = _categories(fs, path)
    by_folder = {c["image_dir_name"]: c for c in categories or [] if isinstance(c, dict) and "image_dir_name" in c}
    if not by_folder:
        return None
    missing = [f for f in class_folders if f not in by_folder]
    if missing:
        raise ConfigError(f"{path}: no category for the class folder {missing[0]!r} "
                          f"({len(missing)} of {len(class_folders)} folders have none)")
    chosen = [by_folder[f] for f in class_folders]
    columns = {}
    for level in TAXONOMY:
        values = [str(c.get("name" if level == "species" else level) or "") for c in chosen]
        names = sorted({v for v in values if v})
        index = {v: k for k, v in enumerate(names)}
        per_class = np.array([index.get(v, -1) for v in values], np.int32)
        columns[level] = LabelColumn(np.where(labels >= 0, per_class[np.maximum(labels, 0)], -1).astype(np.int32),
                                     names)
    return [str(c.get("name") or f) for c, f in zip(chosen, class_folders)], columns


def _categories(fs: fsspec.AbstractFileSystem, path: str) -> list[Any] | None:
    """The value of the top-level "categories" key, read from where it starts (None without one)."""
    with fs.open(path, "rb") as f:
        head = b""
        while (at := head.find(b'"categories"')) < 0 or not head[at + 12:].lstrip()[:1]:
            chunk = f.read(_READ)
            if not chunk:
                return None
            head = head[-64:] + chunk if at < 0 else head + chunk
        text = head[at + 12:].lstrip()
        if not text.startswith(b":"):
            return None
        while True:
            try:
                return json.JSONDecoder().raw_decode(text[1:].decode("utf-8", "ignore").lstrip())[0]
            except ValueError:
                chunk = f.read(_READ)
                if not chunk:
                    return None
                text += chunk
