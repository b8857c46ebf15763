"""The activation store (format v1): a zarr v3 group at any fsspec URL.

`StoreWriter` creates stores and writes work units; `ActivationStore` reads
them; `verify_store` checks every byte; `store_summary` describes one. See
DESIGN.md, "The store".

The other stages use only the names below: the URL helpers (`filesystem`,
`put_bytes`, `is_local`, `normalize_url`), the storage dtype (`to_storage`,
`from_storage`, `torch_dtype`), the images table (`ok_mask`, the statuses),
the object keys that tools check (`unit_record_key`) and the identity of the
model a store records (`model_identity`, `identity_differences`,
`describe_model`). The `_` modules are private.
"""

from __future__ import annotations

from actstore.lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(("IMAGES_SCHEMA", "STATUS_OK", "STATUS_REJECTED", "ok_mask"), "_images"),
    **dict.fromkeys(("from_storage", "to_storage", "torch_dtype"), "_encoding"),
    **dict.fromkeys(("filesystem", "put_bytes"), "_io"),
    **dict.fromkeys(("is_local", "normalize_url"), "_url"),
    "unit_record_key": "_layout",
    **dict.fromkeys(("describe_model", "identity_differences", "model_identity"), "_identity"),
    "ActivationStore": "_reader",
    **dict.fromkeys(("CODECS", "DEFAULT_CODEC", "DEFAULT_DTYPE", "DTYPES", "FORMAT_VERSION", "LayerSpec", "StoreSpec",
                     "TokenLayout"), "_spec"),
    "LayerStats": "_stats",
    **dict.fromkeys(("VerifyReport", "verify_store"), "_verify"),
    "StoreWriter": "_writer",
    "store_summary": "_summary",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
