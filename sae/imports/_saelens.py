"""SAELens (>= 6): `cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes them.

SAELens encodes  pre = (n(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc,  W_enc (d_in, d_sae), where n is its
`normalize_activations`; then ReLU (standard), ReLU of the k largest (topk; with rescale_acts_by_decoder_norm the
pre-activations are first multiplied by each latent's decoder norm), or ReLU where pre > threshold (jumprelu: its
BatchTopK and Matryoshka SAEs are saved as these for inference). Mapped onto ours, exactly:

- apply_b_dec_to_input false: our encoder subtracts b_dec, so b_enc + b_dec @ W_enc takes its place;
- rescale_acts_by_decoder_norm: W_enc and b_enc times the decoder norms, W_dec divided by them (the codes are
  SAELens's rescaled codes, the reconstruction the same);
- expected_average_only_in with its `norm_scaling_factor` (from a SAELens release's cfg): our input normalization
  with mean 0 and that scale; none: no normalization.

Refused, in one line: constant_norm_rescale and layer_norm (a per-token transform we do not have),
covariance_whitening not folded in, expected_average_only_in without its factor, and the architectures we have no
kind for (gated, matching pursuit, temporal, transcoders, ...).
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
from sae.imports._fold import fold_b_dec
from sae.model import SparseAutoencoder

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
_KINDS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
"""TransformerLens / ViT-Prisma's residual stream after block i: our layer i (the block's output)."""


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    return fs.isfile(f"{root}/{WEIGHTS}") and fs.isfile(f"{root}/{CONFIG}")


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    try:
        return json.loads(fs.cat_file(f"{root}/{CONFIG}"))
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{url}/{CONFIG}: not JSON ({e})", key=CONFIG) from None


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """The origin the SAE records: ours when we exported it, else the layer its hook names (no model we can map)."""
    metadata = cfg.get("metadata") or {}
    if isinstance(metadata.get("actstore_origin"), dict):
        found = dict(metadata["actstore_origin"])
    else:
        hook = metadata.get("hook_name") or cfg.get("hook_name") or ""
        match = _HOOK.match(hook)
        found = {"layer": match[1]} if match else {}
        found["names"] = f"{metadata.get('model_name') or cfg.get('model_name') or '?'} {hook or '?'}"
    return {**found, "imported": {"format": "saelens", "version": metadata.get("sae_lens_version"),
                                  "architecture": cfg.get("architecture")}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    cfg = config(fs, root, url)
    architecture = cfg.get("architecture") or "standard"
    if architecture not in _KINDS:
        raise ConfigError(f"{url}: a SAELens {architecture!r} SAE; we read {', '.join(_KINDS)} (no kind of ours "
                          "encodes the others)")
    norm_kind = cfg.get("normalize_activations") or "none"
    if norm_kind not in ("none", "expected_average_only_in"):
        raise ConfigError(f"{url}: SAELens normalize_activations={norm_kind!r} transforms each token on its own; we "
                          "read none and expected_average_only_in (a constant scale)")
    factor = cfg.get("norm_scaling_factor")
    if norm_kind == "expected_average_only_in" and factor is None:
        raise ConfigError(f"{url}: normalize_activations='expected_average_only_in' but cfg.json has no "
                          "norm_scaling_factor: the scale its inputs need is unknown")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise ConfigError(f"{url}: SAELens reshape_activations={cfg['reshape_activations']!r} (attention heads) "
                          "does not apply to a vision model's token vectors")
    try:
        tensors = {k: v.float() for k, v in st_load(fs.cat_file(f"{root}/{WEIGHTS}")).items()}
    except SafetensorError as e:
        raise CorruptDataError(f"{url}/{WEIGHTS}: not a safetensors file ({e})", key=WEIGHTS) from None
    kind = _KINDS[architecture]
    wanted = {"W_enc", "W_dec", "b_enc", "b_dec", *(("threshold",) if kind == "jumprelu" else ())}
    if set(tensors) != wanted:
        raise ConfigError(f"{url}/{WEIGHTS}: tensors {sorted(tensors)}, a SAELens {architecture} SAE has "
                          f"{sorted(wanted)}")
    W_enc, W_dec, b_enc, b_dec = tensors["W_enc"].t(), tensors["W_dec"], tensors["b_enc"], tensors["b_dec"]
    d_sae, d_in = W_dec.shape
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = fold_b_dec(W_enc, b_enc, b_dec)
    if kind == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    dtype = "bfloat16" if cfg.get("dtype") in ("bfloat16", "torch.bfloat16") else "float32"
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, dtype=dtype,
                                      **({"k": int(cfg["k"])} if kind == "topk" else {})), device=device)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec),
                            *((("threshold", tensors["threshold"]),) if kind == "jumprelu" else ())):
            getattr(sae, name).copy_(value.to(getattr(sae, name).dtype))
    normalization = None
    if norm_kind == "expected_average_only_in":
        normalization = Normalization(None, None, torch.zeros(d_in), float(factor))
    return sae.eval(), normalization, extra(cfg)
