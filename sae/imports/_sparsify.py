"""EleutherAI's sparsify (eai-sparsify, and the `sae` package before it): `cfg.json` + `sae.safetensors` in a folder
per hookpoint, as `SparseCoder.save_to_disk` writes them.

sparsify encodes  pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias),  encoder.weight (num_latents, d_in),
then keeps the k largest: our topk kind with our layout, tensor for tensor (W_enc = encoder.weight, b_enc =
encoder.bias, W_dec (num_latents, d_in), b_dec), nothing to fold. normalize_decoder (unit decoder rows) and
multi_topk (a training loss at 4k) leave the encoding unchanged. It records no input normalization.

Our checkpoints have the same two file names: their cfg.json says "format": "actstore-sae", sparsify's has none.

Refused, in one line: skip_connection (W_skip adds a linear map of x to the reconstruction), transcode (a
transcoder predicts another module's output, and encodes x without b_dec), activation "groupmax", and any setting
this reader does not know.

The origin: the hookpoint is the folder's name (`layers.10`; `layers.10/seed0` with several seeds), the model the
run's config.json beside it (when its hookpoints name this one). A hookpoint `layers.N` or `blocks.N` (sparsify's
hookpoints are relative to the model's stack of blocks) is block N's output: our layer N.
"""

from __future__ import annotations

import json
import re
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

CONFIG, WEIGHTS, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
_KNOWN = {"d_in", "activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
          "skip_connection", "transcode"}
"""SparseCoderConfig's fields (1.3.3) and d_in; another setting is refused unless it is off (false, 0, null)."""
_HOOKPOINT = re.compile(r"^(?:layers|blocks)\.(\d+)$")
_SEED = re.compile(r"^seed\d+$")


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """A cfg.json with sparsify's fields and no "format" (ours says "actstore-sae") beside sae.safetensors."""
    if not (fs.isfile(f"{root}/{WEIGHTS}") and fs.isfile(f"{root}/{CONFIG}")):
        return False
    try:
        cfg = json.loads(fs.cat_file(f"{root}/{CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (isinstance(cfg, dict) and "format" not in cfg and {"d_in", "k"} <= cfg.keys()
            and bool({"num_latents", "expansion_factor"} & cfg.keys()))


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """What the files record: the SAE's cfg.json ("sae"), its hookpoint and the run's model (None when unknown)."""
    try:
        cfg = json.loads(fs.cat_file(f"{root}/{CONFIG}"))
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{url}/{CONFIG}: not JSON ({e})", key=CONFIG) from None
    parts = root.rstrip("/").split("/")
    if len(parts) > 1 and _SEED.match(parts[-1]):
        parts = parts[:-1]
    hookpoint, run = parts[-1], "/".join(parts[:-1])
    model = None
    if run and fs.isfile(f"{run}/{RUN_CONFIG}"):
        try:
            run_cfg = json.loads(fs.cat_file(f"{run}/{RUN_CONFIG}"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            run_cfg = None
        if isinstance(run_cfg, dict) and hookpoint in (run_cfg.get("hookpoints") or []):
            model = run_cfg.get("model")
    return {"sae": cfg, "hookpoint": hookpoint, "model": model}


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """The origin: our layer when the hookpoint is a block's output, and no model we can map."""
    sae_cfg, hookpoint = cfg["sae"], cfg["hookpoint"]
    match = _HOOKPOINT.match(hookpoint)
    found = {"layer": match[1]} if match else {}
    return {**found, "names": f"{cfg['model'] or '?'} {hookpoint}",
            "imported": {"format": "sparsify", "version": None, "activation": sae_cfg.get("activation", "topk"),
                         "k": sae_cfg.get("k")}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    found = config(fs, root, url)
    cfg = found["sae"]
    for key, why in (("skip_connection", "adds a linear map of its input (W_skip) to the reconstruction"),
                     ("transcode", "is a transcoder: it predicts another module's output")):
        if cfg.get(key):
            raise ConfigError(f"{url}: a sparsify SAE with {key}=true {why}; no kind of ours does")
    if cfg.get("activation", "topk") != "topk":
        raise ConfigError(f"{url}: a sparsify {cfg['activation']!r} SAE; we read its topk SAEs")
    unknown = sorted(key for key, value in cfg.items() if key not in _KNOWN and value not in (False, 0, None))
    if unknown:
        raise ConfigError(f"{url}/{CONFIG}: sparsify settings this reader does not know: {', '.join(unknown)}")
    try:
        tensors = st_load(fs.cat_file(f"{root}/{WEIGHTS}"))
    except SafetensorError as e:
        raise CorruptDataError(f"{url}/{WEIGHTS}: not a safetensors file ({e})", key=WEIGHTS) from None
    wanted = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if set(tensors) != wanted:
        raise ConfigError(f"{url}/{WEIGHTS}: tensors {sorted(tensors)}, a sparsify SAE has {sorted(wanted)}")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or d_in * int(cfg["expansion_factor"]))
    for name, shape in (("encoder.weight", (d_sae, d_in)), ("encoder.bias", (d_sae,)), ("W_dec", (d_sae, d_in)),
                        ("b_dec", (d_in,))):
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"{url}/{WEIGHTS}: {name} is {tuple(tensors[name].shape)}, {CONFIG} says {shape}")
    dtype = "bfloat16" if tensors["encoder.weight"].dtype == torch.bfloat16 else "float32"
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind="topk", k=int(cfg["k"]), dtype=dtype),
                            device=device)
    with torch.no_grad():
        for ours, theirs in (("W_enc", "encoder.weight"), ("b_enc", "encoder.bias"), ("W_dec", "W_dec"),
                             ("b_dec", "b_dec")):
            getattr(sae, ours).copy_(tensors[theirs].to(getattr(sae, ours).dtype))
    return sae.eval(), None, extra(found)
