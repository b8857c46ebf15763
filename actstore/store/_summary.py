"""What a store holds and what it costs on disk, as one JSON-ready dict (`actstore info`)."""

from __future__ import annotations

from typing import Any

from actstore.store._reader import ActivationStore


def store_summary(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `actstore info` prints, as a dict."""
    with ActivationStore(url, storage_options, allow_partial=True) as store:
        spec = store.spec
        stored, logical = store.nbytes_stored(), store.nbytes_logical()
        n_values = logical // spec.itemsize
        return {
            "url": store.url,
            "complete": store.complete,
            "units_done": len(store.units_done()),
            "n_units": spec.n_units,
            "backbone": spec.backbone,
            "dataset": spec.dataset,
            "n_images": spec.n_images,
            "n_rejected": store.attrs.get("summary", {}).get("n_rejected"),
            "layers": [{"name": l.name, "index": l.index, "shape": list(spec.shape(l.name)),
                        "tokens": l.tokens.to_dict()} for l in spec.layers],
            "dtype": spec.dtype,
            "codec": spec.codec,
            "images_per_chunk": spec.images_per_chunk,
            "images_per_shard": spec.images_per_shard,
            "bytes_stored": stored,
            "bytes_logical": logical,
            "compression_ratio": logical / stored if stored else None,
            "bytes_per_value": stored / n_values if n_values else None,
        }
