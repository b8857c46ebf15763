"""Extraction: images -> backbone activations -> a store (DESIGN.md, "Data flow").

Modules in the order data meets them: `sources` (image manifests), `decode` (bytes to RGB,
bad images recorded), `preprocess` (the model's resize/crop to uint8, split from its
normalization), `backbones` (models with hooked layers), `job` (the Ray Data pipeline and
`run_extract`). Names load on first use (PEP 562): the query
service imports `decode` without torch.
"""

from __future__ import annotations

from actstore.lazy import lazy_exports

_LAZY = {
    **dict.fromkeys(("ExtractConfig", "ExtractResult", "run_extract"), "job"),
    **dict.fromkeys(("Backbone", "BackboneConfig", "load_backbone"), "backbones"),
    "Preprocessor": "preprocess",
    **dict.fromkeys(("DecodedImage", "decode_image"), "decode"),
    **dict.fromkeys(("Manifest", "build_manifest", "read_bytes"), "sources"),
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
