"""actstore: activation stores for vision SAEs, and the stages around them.

    extract/   images -> backbone activations (Ray job)      store/    the format, writer, reader, verify
    loader/    random patch batches for training             testing/  generated data for demo, tests, benchmarks
    config.py  TOML configs    errors.py  the error family    cluster.py  joining Ray

Names are imported on first use (PEP 562), so light modules (errors, extract.decode) load
without torch: the query service starts in well under a second.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("ActstoreError", "ConfigError", "CorruptDataError", "DtypeOverflowError", "IncompleteStoreError",
                     "StoreFormatError", "StoreNotFoundError"), "actstore.errors"),
    **dict.fromkeys(("ActivationStore", "LayerSpec", "StoreSpec", "StoreWriter", "TokenLayout", "verify_store"),
                    "actstore.store"),
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actstore' has no attribute {name!r}")
