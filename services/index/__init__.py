"""The feature index: one pass over a store through an SAE (`build`, with its streaming top-n tables
in `topn`), and its folder format (`layout`).

`layout` is light (numpy and the standard library) and is what the service reads; the build names
(`IndexConfig`, `build_index`, ...) load torch and are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

from services.index.layout import (ARRAYS, FEATURES, FORMAT, FORMAT_VERSION, IMAGES, META, dataset_root, open_array,
                                   read_index_meta)

_LAZY = dict.fromkeys(("BAND_EXPONENTS", "IndexConfig", "build_index", "density_histogram"), "build")
__all__ = sorted(["ARRAYS", "FEATURES", "FORMAT", "FORMAT_VERSION", "IMAGES", "META", "dataset_root", "open_array",
                  "read_index_meta", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"services.index.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'services.index' has no attribute {name!r}")
