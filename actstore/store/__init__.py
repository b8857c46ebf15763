"""The activation store (format v1): a zarr v3 group at any fsspec URL.

`StoreWriter` creates stores and writes work units; `ActivationStore` reads
them; `verify_store` checks every byte. See DESIGN.md, "The store".
"""

from actstore.store._images import IMAGES_SCHEMA, STATUS_OK, STATUS_REJECTED
from actstore.store._reader import ActivationStore
from actstore.store._spec import (CODECS, DEFAULT_CODEC, DEFAULT_DTYPE, DTYPES, FORMAT_VERSION, LayerSpec,
                                  StoreSpec, TokenLayout)
from actstore.store._stats import LayerStats
from actstore.store._verify import VerifyReport, verify_store
from actstore.store._writer import StoreWriter

__all__ = [
    "CODECS", "DEFAULT_CODEC", "DEFAULT_DTYPE", "DTYPES", "FORMAT_VERSION", "IMAGES_SCHEMA", "STATUS_OK",
    "STATUS_REJECTED", "ActivationStore", "LayerSpec", "LayerStats", "StoreSpec", "StoreWriter", "TokenLayout",
    "VerifyReport", "verify_store",
]
