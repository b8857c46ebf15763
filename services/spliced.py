"""An SAE back in the model it was trained on: the SAE, its normalization and its backbone, rebuilt from its store.

Shared by `actstore evaluate` and `actstore steer` (and the service's /steer): both splice the SAE into the same
backbone (same family, architecture, weights: hub tag, checkpoint file or the random init's seed) at the same layer.
The SAE is checked to belong to the store (sae.checkpoint.check_origin), and the rebuilt backbone to make the store's
activations (`check_fidelity`): a few of the store's ok images go through it, and every value must equal the stored
one within the storage dtype's rounding, else nothing is computed on a model that is not the one that made the store
(new default weights, another init order or processor defaults after a library upgrade, an edited record).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.extract.decode import decode_image
from actstore.extract.hooked import library_versions
from actstore.extract.sources import read_bytes
from actstore.store import STATUS_OK, ActivationStore, LayerSpec, filesystem
from sae import Normalization, SparseAutoencoder, TokenEncoder, read_extra
from sae.checkpoint import load_on_store
from sae.imports import pick_checkpoint

__all__ = ["FIDELITY_IMAGES", "RUN_CONFIG", "Fidelity", "SAEInModel", "check_fidelity", "decode_images",
           "load_in_model", "sae_record"]

log = logging.getLogger(__name__)

RUN_CONFIG = "train_config.json"
FIDELITY_IMAGES = 4
"""Ok images of the store that a rebuilt backbone runs (spread over the store) before its numbers are trusted."""
RTOL = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 1e-4}
"""Per storage dtype: how far a rebuilt value may be from the stored one, relative to the stored value and to the
layer's RMS value: two steps of the dtype's rounding (float32: what another batch size or device computes)."""


@dataclass(frozen=True)
class Fidelity:
    """The rebuilt backbone against the store: the largest difference (and where) over the images run, or skipped."""

    checked: bool
    images: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    tolerance: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    fidelity: Fidelity
    """How the rebuilt backbone compared with the store's activations (or that the check was skipped)."""

    @property
    def layer(self) -> str:
        return self.spec.name

    def encoder(self, tokens: str = "patches") -> TokenEncoder:
        """The layer's stored tokens of one kind through the SAE (the same inputs as inside the model)."""
        return TokenEncoder(self.sae, self.norm, self.spec, tokens)


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
                  storage_options: dict[str, Any] | None = None, fidelity_check: bool = True,
                  layer: str | None = None, trust_remote_code: bool = False) -> SAEInModel:
    """The SAE at `sae` inside the backbone its store (`store`, else the recorded one) was extracted with, on `layer`
    (else the one it records; another library's SAE may need it named), checked to belong to the store and, unless
    `fidelity_check` is off, to make its activations (see the module docstring). `trust_remote_code`: the backbone
    may run the modeling code its model ships (never taken from the store's record)."""
    options = storage_options or {}
    if layer is not None:
        sae = pick_checkpoint(sae, layer, options)
    store_url, recorded_layer = sae_record(sae, store, options)
    opened = ActivationStore(store_url, options)
    # the layer the SAE records is read by load_on_store itself: passed on, it would count as the user naming it
    if layer is None and read_extra(sae, options).get("layer") is None:
        layer = recorded_layer
    model, norm, spec = load_on_store(sae, opened, layer, device, options)
    meta = opened.attrs.get("backbone", {})
    family, name = meta.get("family"), meta.get("name")
    if not family or not name or family not in ("open_clip", "timm", "hf"):
        raise ConfigError(f"{redact(opened.url)} was not extracted from a backbone we can rebuild "
                          f"(backbone {family}:{name})")
    pretrained = meta.get("checkpoint")
    if family == "timm" and pretrained == "hub" and (meta.get("weights") or {}).get("tag"):
        pretrained = meta["weights"]["tag"]  # what "hub" resolved to then, not timm's default of today
    backbone = load_backbone(BackboneConfig(f"{family}:{name}", layers=(spec.name,), pretrained=pretrained,
                                            init_seed=int(meta.get("init_seed", 0)),
                                            trust_remote_code=trust_remote_code)).to(device)
    rebuilt = backbone.layer_specs()[0]
    if (rebuilt.d, rebuilt.tokens) != (spec.d, spec.tokens):
        raise ConfigError(f"{family}:{name} layer {spec.name} makes {rebuilt.tokens.n_tokens} tokens of width "
                          f"{rebuilt.d}; the store recorded {spec.tokens.n_tokens} of width {spec.d}")
    if fidelity_check:
        fidelity = check_fidelity(backbone, opened, spec.name, options)
    else:
        log.warning("the rebuilt %s:%s was not checked against %s's activations (fidelity check skipped)", family,
                    name, redact(opened.url))
        fidelity = Fidelity(checked=False)
    tokens = norm.tokens if norm is not None and norm.tokens else "patches"
    mean = torch.from_numpy(opened.stats(spec.name, tokens).mean.astype(np.float32))
    opened.close()
    return SAEInModel(model, norm, opened.url, spec, tokens, backbone, mean, fidelity)


def check_fidelity(backbone: Backbone, store: ActivationStore, layer: str,
                   storage_options: dict[str, Any] | None = None, n_images: int = FIDELITY_IMAGES) -> Fidelity:
    """Run `n_images` of the store's ok images (spread over it) through `backbone` and compare `layer`'s tokens with
    the stored ones: |rebuilt - stored| <= rtol * (|stored| + rms) everywhere (RTOL of the storage dtype), else a
    one-line ConfigError with the largest difference, the image and what differs between the record and now."""
    table = store.images()
    ok = np.flatnonzero(np.asarray(table.column("status").to_pylist()) == STATUS_OK)
    chosen = [int(i) for i in ok[np.linspace(0, len(ok) - 1, min(n_images, len(ok))).round().astype(int)]]
    uris = [table.column("uri")[i].as_py() for i in chosen]
    pixels, rejected = decode_images(backbone, uris, storage_options)
    where = f"{backbone.cfg.model} (rebuilt from {redact(store.url)}'s record)"
    if pixels is None or rejected:
        raise ConfigError(f"cannot check {where} against the stored activations: image "
                          f"{redact(rejected[0]) if rejected else '?'}; pass --no-fidelity-check to skip the check")
    dtype = store.spec.dtype
    rtol = RTOL[dtype]
    with torch.no_grad():
        rebuilt = backbone(pixels.to(next(backbone.parameters()).device), layers=[layer])[layer].float().cpu()
    stored = torch.cat([store.read(layer, i, i + 1) for i in chosen]).float()
    diff = (rebuilt - stored).abs()
    rms = stored.square().mean().sqrt()
    excess = diff - rtol * (stored.abs() + rms)
    worst = int(excess.argmax())
    i, token, channel = np.unravel_index(worst, excess.shape)
    if float(excess.flatten()[worst]) > 0:
        raise ConfigError(f"{where} does not make the stored activations: layer {layer} differs by "
                          f"{float(diff.flatten()[worst]):.4g} at image {chosen[i]} token {token} channel {channel} "
                          f"(stored {float(stored[i, token, channel]):.4g}, tolerance {dtype} rounding); "
                          f"{_record_changes(backbone, store)}; pass --no-fidelity-check to compute anyway")
    return Fidelity(True, chosen, float(diff.max()), f"{rtol:g} x (|stored| + rms), {dtype}")


def _record_changes(backbone: Backbone, store: ActivationStore) -> str:
    """What differs between the store's record and the model rebuilt today: library versions, resolved weights."""
    recorded = store.attrs.get("backbone", {})
    then, now = recorded.get("versions") or {}, library_versions()
    changes = [f"{lib} {then[lib]} then, {now.get(lib)} now" for lib in then if then[lib] != now.get(lib)]
    weights_then, weights_now = recorded.get("weights") or {}, backbone.resolved_weights()
    changes += [f"weights {k} {weights_then.get(k)} then, {weights_now.get(k)} now"
                for k in sorted(set(weights_then) | set(weights_now)) if weights_then.get(k) != weights_now.get(k)]
    if changes:
        return "since the store was made: " + ", ".join(changes)
    return ("the record and the libraries are as they were: the record does not describe the model that made the "
            "store (was it edited, or its checkpoint file replaced?)" if "versions" in recorded else
            "the store predates version records")


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
