"""SAE checkpoints: `sae.safetensors` + `cfg.json` in a directory (any fsspec URL), and SAELens export.

Our layout (`save` / `load`):

    sae.safetensors   W_enc (d_sae, d_in), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,),
                      threshold (d_sae,)            jumprelu: the raw parameter (used as relu(threshold))
                      batchtopk_threshold ()        batchtopk, matryoshka: float64, NaN until trained
                      norm_mean (d_in,)             float32, when saved with an input normalization
    cfg.json          the SAEConfig fields (as sparsify does) plus "format", "format_version",
                      "normalization" ({"scale", "layer", "tokens"} or null: x_n = (x - norm_mean) * scale,
                      the loader's transform) and "extra" (the trainer's JSON: trained_tokens, and the
                      SAE's origin (`origin`): the store URL, layer and token kind it trained on and the
                      identity of the model that made that store, which `load_on_store` checks)

The layouts of other libraries that `actstore export` writes (SAELens, saev) are in sae.export; the formats
`load` reads besides ours are in sae.imports.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load, save as st_save

from actstore.config import redact
from actstore.errors import ActstoreError, ConfigError, CorruptDataError, StoreFormatError, StoreNotFoundError
from actstore.loader import Normalization
from actstore.store import (ActivationStore, LayerSpec, describe_model, filesystem, identity_differences,
                            model_identity, put_bytes)
from sae.config import SAEConfig
from sae.imports import (FORMATS, detect_format, imported_extra, normalization_from_store, pick_checkpoint,
                         read_imported, split_format)
from sae.model import SparseAutoencoder

__all__ = ["FORMAT", "FORMAT_VERSION", "check_origin", "check_saved_origin", "load",
           "load_on_store", "origin", "read_extra", "save"]

FORMAT = "actstore-sae"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "sae.safetensors", "cfg.json"


def save(sae: SparseAutoencoder, url: str, normalization: Normalization | None = None,
         extra: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None) -> None:
    """Write sae.safetensors then cfg.json (each object whole; cfg.json last) into the directory `url`."""
    tensors = {name: t.detach().contiguous() for name, t in sae.state_dict().items()}
    norm_cfg = None
    if normalization is not None:
        tensors["norm_mean"] = normalization.mean.detach().to(torch.float32).reshape(-1).contiguous()
        if tensors["norm_mean"].numel() != sae.cfg.d_in:
            raise ConfigError(f"save: the normalization mean has {tensors['norm_mean'].numel()} values, "
                              f"d_in is {sae.cfg.d_in}")
        norm_cfg = {"scale": float(normalization.scale), "layer": getattr(normalization, "layer", None),
                    "tokens": getattr(normalization, "tokens", None)}
    cfg = {**asdict(sae.cfg), "format": FORMAT, "format_version": FORMAT_VERSION, "normalization": norm_cfg,
           "extra": extra or {}}
    fs, root = filesystem(str(url), storage_options)
    put_bytes(fs, f"{root}/{WEIGHTS}", st_save({k: t.cpu() for k, t in tensors.items()}, metadata={"format": "pt"}))
    put_bytes(fs, f"{root}/{CONFIG}", json.dumps(cfg, indent=2, sort_keys=True).encode())


def load(url: str, device: torch.device | str | None = None, storage_options: dict[str, Any] | None = None
         ) -> tuple[SparseAutoencoder, Normalization | None]:
    """The SAE saved at `url` (in eval mode) and the input normalization it was trained behind, if any."""
    sae, normalization, _ = _load(url, device, storage_options)
    return sae, normalization


def _load(url: str, device: torch.device | str | None, storage_options: dict[str, Any] | None
          ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    fmt, url = _format(url, storage_options)
    if fmt is not None:
        return read_imported(url, fmt, device, storage_options)
    fs, root = filesystem(str(url), storage_options)
    cfg_dict = _config(fs, root, url)
    norm_cfg = cfg_dict.pop("normalization")
    extra = cfg_dict.pop("extra") or {}
    for key in ("format", "format_version"):
        cfg_dict.pop(key)
    try:
        cfg = SAEConfig(**cfg_dict)
    except TypeError as e:
        raise StoreFormatError(f"{url}/{CONFIG}: {e}") from None
    try:
        tensors = st_load(_get(fs, root, WEIGHTS))
    except SafetensorError as e:
        raise CorruptDataError(f"{url}/{WEIGHTS}: not a safetensors file ({e})", key=WEIGHTS) from None
    norm_mean = tensors.pop("norm_mean", None)
    sae = SparseAutoencoder(cfg, device=device)
    try:
        sae.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise StoreFormatError(f"{url}/{WEIGHTS} does not match {CONFIG}: {e}") from None
    normalization = None
    if norm_cfg is not None:
        if norm_mean is None:
            raise StoreFormatError(f"{url}: {CONFIG} has a normalization but {WEIGHTS} has no norm_mean")
        normalization = Normalization(layer=norm_cfg.get("layer"), tokens=norm_cfg.get("tokens"), mean=norm_mean,
                                      scale=float(norm_cfg["scale"]))
    return sae.eval(), normalization, extra


def origin(store: ActivationStore, layer: str | int, tokens: str = "patches") -> dict[str, Any]:
    """What an SAE trained on `layer` of `store` records (in its cfg.json's extra) so that it can be checked wherever
    it is used: the store (redacted URL), the layer, the token kind and the identity of the store's model."""
    return {"store": redact(store.url), "layer": store.layer(layer).name, "tokens": tokens,
            "backbone": model_identity(store.attrs.get("backbone", {}))}


def check_origin(url: str, extra: dict[str, Any], store: ActivationStore, spec: LayerSpec | None,
                 storage_options: dict[str, Any] | None = None, asserted: bool = False) -> None:
    """Refuse, with one line naming both sides, the SAE at `url` (whose cfg.json extra is `extra`) on layer `spec` of
    `store` unless it was trained on that layer of the same model (any dataset). SAEs saved before they recorded the
    model's identity are checked through the store they record. An imported SAE whose format names no model we can
    map is read only on a layer the user named (`asserted`): its model cannot be checked, its layer still is."""
    recorded, layer = extra.get("backbone"), extra.get("layer")
    imported = extra.get("imported")
    if recorded is None and imported:
        if not asserted:
            raise ConfigError(f"{redact(url)} is a {imported.get('format')} SAE of {extra.get('names', '?')}, a model "
                              f"we cannot map to one of ours: pass --layer to read it on a layer of "
                              f"{redact(store.url)} (its model is then not checked)")
        if layer is not None and spec is not None and str(layer) != spec.name:
            raise ConfigError(f"{redact(url)} names layer {layer} ({extra.get('names', '?')}); asked to read layer "
                              f"{spec.name} of {redact(store.url)}")
        return
    if recorded is None and extra.get("store"):
        trained_on = extra["store"]
        try:
            attrs = (store.attrs if trained_on == redact(store.url) else
                     ActivationStore(trained_on, storage_options).attrs)
        except (ActstoreError, OSError) as e:
            raise ConfigError(f"{redact(url)} records its store {trained_on} but not its model, and that store "
                              f"cannot be read ({type(e).__name__}); cannot check it against {redact(store.url)}"
                              ) from None
        recorded = model_identity(attrs.get("backbone", {}))
    if recorded is None:
        raise ConfigError(f"{redact(url)} does not record the model and layer it was trained on, so it cannot be "
                          f"checked against {redact(store.url)}; SAEs from `actstore train` record them (library "
                          "code: save with extra=sae.checkpoint.origin(store, layer))")
    here = model_identity(store.attrs.get("backbone", {}))
    differ = identity_differences(recorded, here)
    if differ:
        raise ConfigError(f"{redact(url)} was trained on layer {layer} of {describe_model(recorded)}; "
                          f"{redact(store.url)} holds {describe_model(here)} ({'; '.join(differ)}): not the same model")
    if layer is not None and spec is not None and str(layer) != spec.name:
        raise ConfigError(f"{redact(url)} was trained on layer {layer} of {describe_model(recorded)}; asked to read "
                          f"layer {spec.name} of {redact(store.url)}")


def check_saved_origin(url: str, store: ActivationStore, storage_options: dict[str, Any] | None = None,
                       layer: str | None = None) -> None:
    """check_origin for the SAE at `url` on `layer` (else the one it records), from its config alone (no weights
    read): for a command that loads the SAE later (serve --steer) and should refuse it at start."""
    if layer is not None:
        url = pick_checkpoint(url, layer, storage_options)
    extra = read_extra(url, storage_options)
    key = layer if layer is not None else extra.get("layer")
    check_origin(url, extra, store, store.layer(key) if key is not None else None, storage_options,
                 asserted=layer is not None)


def load_on_store(url: str, store: ActivationStore, layer: str | int | None = None,
                  device: torch.device | str | None = None, storage_options: dict[str, Any] | None = None
                  ) -> tuple[SparseAutoencoder, Normalization | None, LayerSpec]:
    """The SAE at `url` and the layer of `store` it reads: `layer`, else the one it records; an SAE trained on
    another model or layer (check_origin) or of another width is refused."""
    if layer is not None:
        url = pick_checkpoint(url, layer, storage_options)
    sae, norm, extra = _load(url, device, storage_options)
    key = next((k for k in (layer, extra.get("layer"), norm.layer if norm is not None else None) if k is not None),
               None)
    if key is None:
        raise ConfigError(f"{redact(url)}: the checkpoint does not say which layer it was trained on; pass --layer")
    spec = store.layer(key)
    check_origin(url, extra, store, spec, storage_options, asserted=layer is not None)
    if norm is None and extra.get("imported"):
        norm = normalization_from_store(extra, store, spec)
    if spec.d != sae.cfg.d_in:
        raise ConfigError(f"{redact(url)} reads {sae.cfg.d_in}-wide activations; layer {spec.name} of "
                          f"{redact(store.url)} is {spec.d} wide")
    return sae, norm, spec


def read_extra(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `extra` dict saved with a checkpoint (the trainer's step, metrics, ...), without loading weights; an
    imported SAE's is the origin its format records."""
    fmt, url = _format(url, storage_options)
    if fmt is not None:
        return imported_extra(url, fmt, storage_options)
    fs, root = filesystem(str(url), storage_options)
    return _config(fs, root, url).get("extra", {})


def _format(url: str, storage_options: dict[str, Any] | None) -> tuple[str | None, str]:
    """(the other library's format, the path) of `--sae URL`: named (saelens:PATH) or found from the files; (None,
    url) for our own checkpoints (sparsify's have our file names too: no reader takes a cfg.json that says ours)."""
    fmt, path = split_format(str(url))
    if fmt is None and not _is_ours(*filesystem(path, storage_options)):
        fmt = detect_format(path, storage_options)
    return fmt, path


def _is_ours(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether cfg.json says ours: decided from it alone, so that no reader's look at the files reaches the weights
    (a command may read an SAE's record long before its weights, which may be slow to come)."""
    try:
        return json.loads(fs.cat_file(f"{root}/{CONFIG}")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """Our cfg.json, checked to be ours."""
    try:
        cfg_dict = json.loads(_get(fs, root, CONFIG))
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{url}/{CONFIG}: not JSON ({e})", key=CONFIG) from None
    if cfg_dict.get("format") != FORMAT or cfg_dict.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"{url}: {CONFIG} is not an {FORMAT} v{FORMAT_VERSION} checkpoint "
                               f"(format={cfg_dict.get('format')!r}, version={cfg_dict.get('format_version')!r}), "
                               f"nor an SAE of {', '.join(FORMATS)}")
    return cfg_dict


def _get(fs: fsspec.AbstractFileSystem, root: str, name: str) -> bytes:
    try:
        return fs.cat_file(f"{root}/{name}")
    except (FileNotFoundError, NotADirectoryError):  # a file named where a folder is meant
        raise StoreNotFoundError(f"{root}: no SAE checkpoint there (no {name})") from None


