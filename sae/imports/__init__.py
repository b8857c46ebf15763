"""SAEs trained by other libraries, read into our SparseAutoencoder with their encoding kept exact.

Every `--sae` (and sae.checkpoint.load) takes one: found from its files, or named, `--sae saelens:PATH`. A reader
returns the SAE in our conventions (pre = (x - b_dec) @ W_enc.T + b_enc), the input normalization the format
records, and the origin it records, with `imported` saying from which format and version; what we cannot
represent exactly is refused in one line, never approximated. Formats: FORMATS (one module each).

A reader module has detect(fs, root) (from small files only: no weights), config(fs, root, url) (what its small files
record), extra(config) (the origin: "layer", a mapped "backbone", "names", "tokens", "imported"), read(fs, root, url,
device) -> (SAE, Normalization | None, extra); optionally normalization(extra, store, spec) (a format whose library
normalized its training data by statistics it did not save: rebuilt from the store) and pick(fs, root, url, layer)
(a repo of several checkpoints: the URL of the one trained on `layer`).
"""

from __future__ import annotations

from typing import Any

import torch

from actstore.errors import ConfigError
from actstore.loader import Normalization
from actstore.store import ActivationStore, LayerSpec, filesystem
from sae.imports import _dictionary_learning, _overcomplete, _prisma, _saelens, _saev, _sparsify
from sae.imports._fold import fold_b_dec
from sae.model import SparseAutoencoder

__all__ = ["FORMATS", "detect_format", "fold_b_dec", "imported_extra", "normalization_from_store", "pick_checkpoint",
           "read_imported", "split_format"]

_READERS = {
    "dictionary_learning": _dictionary_learning,
    "overcomplete": _overcomplete,
    "prisma": _prisma,
    "saelens": _saelens,
    "saev": _saev,
    "sparsify": _sparsify,
}
FORMATS = tuple(_READERS)
"""The formats `--sae FORMAT:PATH` names."""


def split_format(url: str) -> tuple[str | None, str]:
    """("saelens", "/path") for "saelens:/path"; (None, url) for a URL without a format prefix (s3://... too)."""
    head, sep, rest = str(url).partition(":")
    return (head, rest) if sep and head in _READERS else (None, str(url))


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The format whose files lie at `url`, None when none does: our own checkpoints are what no reader claims."""
    fs, root = filesystem(url, storage_options)
    return next((name for name, reader in _READERS.items() if reader.detect(fs, root)), None)


def read_imported(url: str, fmt: str, device: torch.device | str | None = None,
                  storage_options: dict[str, Any] | None = None
                  ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    """(SAE in eval mode, the input normalization it records, the origin it records) of a `fmt` SAE at `url`."""
    reader = _reader(fmt)
    fs, root = filesystem(url, storage_options)
    if not reader.detect(fs, root):
        raise ConfigError(f"{url}: no {fmt} SAE there")
    return reader.read(fs, root, url, device)


def imported_extra(url: str, fmt: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The origin a `fmt` SAE at `url` records, from its config alone (no weights read)."""
    fs, root = filesystem(url, storage_options)
    return _reader(fmt).extra(_reader(fmt).config(fs, root, url))


def pick_checkpoint(url: str, layer: str | int, storage_options: dict[str, Any] | None = None) -> str:
    """`url`, or for a repo of several checkpoints (saev's manifest.jsonl) the URL of the one trained on `layer`."""
    fmt, path = split_format(str(url))
    fs, root = filesystem(path, storage_options)
    for name, reader in _READERS.items():
        if hasattr(reader, "pick") and fmt in (None, name):
            picked = reader.pick(fs, root, path, str(layer))
            if picked is not None:
                return f"{name}:{picked}"
    return str(url)


def normalization_from_store(extra: dict[str, Any], store: ActivationStore, spec: LayerSpec
                             ) -> Normalization | None:
    """The input normalization an imported SAE needs when its format records none but its library normalized the
    training data from the data's statistics (the reader's `normalization(extra, store, spec)`, which says how);
    None when it needs none."""
    fmt = (extra.get("imported") or {}).get("format")
    reader = _READERS.get(fmt) if fmt else None
    return reader.normalization(extra, store, spec) if hasattr(reader, "normalization") else None


def _reader(fmt: str) -> Any:
    if fmt not in _READERS:
        raise ConfigError(f"unknown SAE format {fmt!r}; formats: {', '.join(FORMATS)}")
    return _READERS[fmt]
