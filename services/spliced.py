"""An SAE back in the model it was trained on: the SAE, its normalization and its backbone, rebuilt from its store.

Shared by `actstore evaluate` and `actstore steer` (and the service's /steer): both splice the SAE into the same
backbone (same family, architecture, weights: hub tag, checkpoint file or the random init's seed) at the same layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.extract.decode import decode_image
from actstore.extract.sources import read_bytes
from actstore.store import ActivationStore, LayerSpec, filesystem
from sae import Normalization, SparseAutoencoder, read_extra
from sae.checkpoint import load_on_store

__all__ = ["RUN_CONFIG", "SAEInModel", "decode_images", "load_in_model", "sae_record"]

RUN_CONFIG = "train_config.json"


@dataclass(frozen=True)
class SAEInModel:
    """The SAE and where it sits: its backbone (rebuilt from the store's record), layer, token kind and mean."""

    sae: SparseAutoencoder
    norm: Normalization | None
    store_url: str
    spec: LayerSpec
    tokens: str
    """The token kind the SAE was trained on ("patches", "cls" or "all")."""
    backbone: Backbone
    mean: torch.Tensor
    """The store's mean of the layer's tokens of that kind (d,) float32: what mean ablation writes."""

    @property
    def layer(self) -> str:
        return self.spec.name


def sae_record(sae: str, store: str | None = None, storage_options: dict[str, Any] | None = None
               ) -> tuple[str, str | None]:
    """(store URL, layer) the SAE was trained on: `store`, else what the SAE's config records, else its run's."""
    extra = read_extra(sae, storage_options)
    recorded, layer = extra.get("store"), extra.get("layer")
    if recorded is None:  # SAEs saved before the trainer recorded it: the run folder around the SAE
        fs, root = filesystem(sae, storage_options or {})
        run = root.rstrip("/").rsplit("/", 1)[0]
        if fs.exists(f"{run}/{RUN_CONFIG}"):
            run_cfg = json.loads(fs.cat_file(f"{run}/{RUN_CONFIG}"))
            recorded, layer = run_cfg.get("store"), layer if layer is not None else run_cfg.get("layer")
    recorded = store or recorded
    if recorded is None:
        raise ConfigError(f"{redact(sae)}: the SAE does not record its store; pass --store")
    return recorded, layer


def load_in_model(sae: str, store: str | None = None, device: str = "cpu",
                  storage_options: dict[str, Any] | None = None) -> SAEInModel:
    """The SAE at `sae` inside the backbone its store (`store`, else the recorded one) was extracted with."""
    options = storage_options or {}
    store_url, recorded_layer = sae_record(sae, store, options)
    opened = ActivationStore(store_url, options)
    model, norm, spec = load_on_store(sae, opened, recorded_layer, device, options)
    meta = opened.attrs.get("backbone", {})
    family, name = meta.get("family"), meta.get("name")
    if not family or not name or family not in ("open_clip", "timm", "hf"):
        raise ConfigError(f"{redact(opened.url)} was not extracted from a backbone we can rebuild "
                          f"(backbone {family}:{name})")
    backbone = load_backbone(BackboneConfig(f"{family}:{name}", layers=(spec.name,), pretrained=meta.get("checkpoint"),
                                            init_seed=int(meta.get("init_seed", 0)))).to(device)
    rebuilt = backbone.layer_specs()[0]
    if (rebuilt.d, rebuilt.tokens) != (spec.d, spec.tokens):
        raise ConfigError(f"{family}:{name} layer {spec.name} makes {rebuilt.tokens.n_tokens} tokens of width "
                          f"{rebuilt.d}; the store recorded {spec.tokens.n_tokens} of width {spec.d}")
    tokens = norm.tokens if norm is not None and norm.tokens else "patches"
    mean = torch.from_numpy(opened.stats(spec.name, tokens).mean.astype(np.float32))
    opened.close()
    return SAEInModel(model, norm, opened.url, spec, tokens, backbone, mean)


def decode_images(backbone: Backbone, uris: Sequence[str], storage_options: dict[str, Any] | None = None
                  ) -> tuple[torch.Tensor | None, list[str]]:
    """The images at `uris` as the backbone's preprocessing makes them, uint8 (n, 3, H, W) (None when none
    decodes), and "uri: reason" for each one that could not be read or decoded (left out)."""
    pixels, rejected = [], []
    for uri, data in zip(uris, read_bytes(list(uris), storage_options or {})):
        decoded = decode_image(data) if isinstance(data, bytes) else None
        if decoded is None or decoded.image is None:
            rejected.append(f"{uri}: {decoded.reason if decoded else data}")
            continue
        pixels.append(backbone.preprocessor(decoded.image))
    return (torch.stack(pixels) if pixels else None), rejected
