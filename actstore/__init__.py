"""actstore: activation stores for vision SAEs (extract, store, load)."""

from actstore.errors import (ActstoreError, ConfigError, CorruptDataError, DtypeOverflowError, IncompleteStoreError,
                             StoreFormatError, StoreNotFoundError)
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout, verify_store

__version__ = "0.1.0"

__all__ = [
    "ActivationStore", "ActstoreError", "ConfigError", "CorruptDataError", "DtypeOverflowError",
    "IncompleteStoreError", "LayerSpec", "StoreFormatError", "StoreNotFoundError", "StoreSpec", "StoreWriter",
    "TokenLayout", "verify_store",
]
