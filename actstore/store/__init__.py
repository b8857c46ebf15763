"""The activation store (format v1): a zarr v3 group at any fsspec URL.

`StoreWriter` creates stores and writes work units; `ActivationStore` reads
them; `verify_store` checks every byte. See DESIGN.md, "The store".
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    **dict.fromkeys(("IMAGES_SCHEMA", "STATUS_OK", "STATUS_REJECTED"), "_images"),
    "ActivationStore": "_reader",
    **dict.fromkeys(("CODECS", "DEFAULT_CODEC", "DEFAULT_DTYPE", "DTYPES", "FORMAT_VERSION", "LayerSpec", "StoreSpec",
                     "TokenLayout"), "_spec"),
    "LayerStats": "_stats",
    **dict.fromkeys(("VerifyReport", "verify_store"), "_verify"),
    "StoreWriter": "_writer",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import on first use (PEP 562): the images table constants load without torch and zarr."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"actstore.store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'actstore.store' has no attribute {name!r}")
