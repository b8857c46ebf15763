"""The feature index: one pass over a store through an SAE (`build`, with its streaming top-n tables
in `topn`), and its folder format (`layout`).

`layout` is light (numpy and the standard library) and is what the service reads; the build names
(`IndexConfig`, `build_index`, ...) load torch and are imported on first use (PEP 562).
"""

from __future__ import annotations

from actstore.lazy import lazy_exports
from services.index.layout import (ARRAYS, FEATURES, FORMAT, FORMAT_VERSION, IMAGES, META, dataset_root, open_array,
                                   read_index_meta)

_LAZY = dict.fromkeys(("BAND_EXPONENTS", "IndexConfig", "build_index", "density_histogram"), "build")
__all__ = sorted(["ARRAYS", "FEATURES", "FORMAT", "FORMAT_VERSION", "IMAGES", "META", "dataset_root", "open_array",
                  "read_index_meta", *_LAZY])
__getattr__ = lazy_exports(__name__, _LAZY)
