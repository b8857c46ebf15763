"""`actstore export`: one of our SAEs (or any SAE `--sae` reads) written in another library's layout.

The folder written is recognised as ours by its cfg.json (`metadata.exported_by`), so that `--overwrite` replaces
an earlier export and nothing else. The SAE's origin (its store's model and layer) goes into the metadata, and the
input normalization is folded into the weights (sae.checkpoint.export_saelens), so the export reads raw backbone
activations and, read back by `--sae`, is checked against a store like the SAE it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import fsspec

from actstore.config import redact
from actstore.outputs import check_output
from sae import checkpoint

__all__ = ["EXPORTS", "ExportConfig", "run_export"]

EXPORTS = ("saelens",)
"""The layouts `--to` writes."""
_ORIGIN = ("store", "layer", "tokens", "backbone")


@dataclass(frozen=True)
class ExportConfig:
    """What `actstore export` writes."""

    sae: str
    """The SAE to export: ours, or another library's (any `--sae`)."""
    out: str
    """Folder to write (local or s3://); refused if it holds anything but an earlier export of ours."""
    to: str = field(default="saelens", metadata={"choices": EXPORTS})
    """The layout: saelens (cfg.json + sae_weights.safetensors, SAELens >= 6's `SAE.load_from_disk`)."""
    overwrite: bool = False
    """Replace an earlier export at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the SAE and `out`."""


def _is_export(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        cfg = json.loads(fs.cat_file(f"{path.rstrip('/')}/{checkpoint.CONFIG}"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (cfg.get("metadata") or {}).get("exported_by") == checkpoint.FORMAT


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the export; returns what was written (layout, kind, widths, the origin kept)."""
    check_output(cfg.out, "an SAE export of ours", _is_export, cfg.overwrite, cfg.storage_options)
    sae, normalization = checkpoint.load(cfg.sae, storage_options=cfg.storage_options)
    extra = checkpoint.read_extra(cfg.sae, cfg.storage_options)
    origin = {k: extra[k] for k in _ORIGIN if k in extra} or None
    checkpoint.export_saelens(sae, cfg.out, normalization, storage_options=cfg.storage_options, origin=origin)
    return {"out": redact(cfg.out), "to": cfg.to, "kind": sae.cfg.kind, "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae, "origin": origin}
