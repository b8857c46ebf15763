"""actstore: activation stores for vision SAEs, and the stages around them.

    extract/   images -> backbone activations (Ray job)      store/    the format, writer, reader, verify
    loader/    random patch batches for training             testing/  generated data for demo, tests, benchmarks
    config.py  TOML configs    errors.py  the error family    cluster.py  joining Ray    lazy.py  lazy exports
    outputs.py what a command may replace (check_output) and folders that appear whole (staged_folder)

Names are imported on first use (PEP 562), so light modules (errors, extract.decode) load
without torch: the query service starts in well under a second.
"""

from __future__ import annotations

from actstore.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("ActstoreError", "ConfigError", "CorruptDataError", "DtypeOverflowError", "IncompleteStoreError",
                     "StoreFormatError", "StoreNotFoundError"), "errors"),
    **dict.fromkeys(("ActivationStore", "LayerSpec", "StoreSpec", "StoreWriter", "TokenLayout", "verify_store"),
                    "store"),
    **dict.fromkeys(("check_output", "marked_by", "staged_folder"), "outputs"),
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
