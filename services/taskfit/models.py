"""The models taskfit compares: each an SAE on the layer of a store it was trained on, opened from an index folder
(its index.json names the SAE, the store and the layer) or SAE_DIR@STORE_URL, as `actstore compare` opens a side;
and each image's SAE code: a feature's value on an image is its largest over the image's patches, or its value on
the CLS / pooled token for an SAE trained on that token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.store import ActivationStore, is_local, normalize_url
from sae import TokenEncoder, positive_entries
from sae.checkpoint import load_on_store
from services.index.layout import META as INDEX_META
from services.index.layout import read_index_meta

__all__ = ["Model", "check_same_images", "distinct_names", "open_model"]


@dataclass(frozen=True)
class Model:
    """One model opened: its store, the SAE behind its normalization on its layer, and where they came from."""

    source: str
    sae_url: str
    encoder: TokenEncoder
    store: ActivationStore
    name: str

    @property
    def d_sae(self) -> int:
        return self.encoder.sae.cfg.d_sae

    def image_values(self, x: torch.Tensor) -> torch.Tensor:
        """A block of the store (images, layer tokens, d) -> (images, features) float32: each feature's largest value
        over an image's tokens of the SAE's kind (its patches, or its one CLS / pooled token); 0 where it never
        fires."""
        rows, feats, vals = positive_entries(self.encoder.block(x))
        n, f = x.shape[0], self.d_sae
        dense = torch.zeros(n * f, device=vals.device)
        dense.scatter_reduce_(0, (rows // self.encoder.per_image) * f + feats, vals, reduce="amax")
        return dense.view(n, f)

    def describe(self) -> dict[str, Any]:
        backbone = self.store.attrs.get("backbone", {})
        return {"name": self.name, "source": redact(self.source), "sae": redact(self.sae_url),
                "store": redact(self.store.url), "layer": self.encoder.spec.name, "tokens": self.encoder.tokens,
                "d_sae": self.d_sae, "backbone": {k: backbone.get(k) for k in ("family", "name")}}


def open_model(spec: str, i: int, device: torch.device, storage_options: dict[str, Any]) -> Model:
    """Model i (from 1, as messages name it): an index folder, or SAE_DIR@STORE_URL."""
    index = Path(normalize_url(spec)) if is_local(spec) else None
    if index is not None and (index / INDEX_META).is_file():
        meta = read_index_meta(index)
        sae_url, store_url, layer = meta["sae"], meta["store"], meta["layer"]
    elif "@" in spec:
        sae_url, store_url = spec.rsplit("@", 1)
        layer = None
    else:
        raise ConfigError(f"taskfit: model {i} ({redact(spec)}) is neither an index folder (no {INDEX_META}) nor "
                          "SAE_DIR@STORE_URL")
    store = ActivationStore(store_url, storage_options)
    sae, norm, layer_spec = load_on_store(sae_url, store, layer, device, storage_options)
    cls = norm is not None and norm.tokens == "cls" or layer_spec.tokens.n_patches == 0
    encoder = TokenEncoder(sae, norm, layer_spec, "cls" if cls else "patches")
    name = f"{store.attrs.get('backbone', {}).get('name', 'model')}/{layer_spec.name}"
    return Model(spec, sae_url, encoder, store, name)


def distinct_names(models: Sequence[Model]) -> list[Model]:
    """The models, those whose names repeat an earlier one's numbered (#2, #3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        out.append(m if seen[m.name] == 1 else replace(m, name=f"{m.name}#{seen[m.name]}"))
    return out


def check_same_images(models: Sequence[Model]) -> None:
    """Refuses models whose stores are not over the same images (same URIs, same order), naming the first
    difference."""
    first = models[0].store.images().column("uri").to_pylist()
    for i, m in enumerate(models[1:], 2):
        uris = m.store.images().column("uri").to_pylist()
        if uris == first:
            continue
        j = next((j for j, (a, b) in enumerate(zip(first, uris)) if a != b), min(len(first), len(uris)))
        what = (f"image {j} is {first[j]!r} in model 1 and {uris[j]!r} in model {i}" if j < min(len(first), len(uris))
                else f"model 1 has {len(first)} images, model {i} has {len(uris)}")
        raise ConfigError(f"taskfit: model 1 and model {i} are not over the same images: {what}")
