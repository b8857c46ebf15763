"""`actstore export`: one of our SAEs (or any SAE `--sae` reads) written in another library's layout.

Neither SAELens nor saev has a mean-subtracting input normalization, so an input normalization is folded into the
exported weights, exactly: with x_n = (x - mean) * s, W_enc' = s * W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s +
mean (b_enc and thresholds unchanged) gives the same pre-activations on raw x and x_hat' = x_hat / s + mean. The
export then reads raw backbone activations. Folding is done in float64 a block of rows at a time, then cast to the
SAE's dtype (a 65,536 x 768 SAE is not widened whole).

SAELens layout (`export_saelens`, SAELens >= 6 reads it with `SAE.load_from_disk(dir)`):

    sae_weights.safetensors   W_enc (d_in, d_sae) = our W_enc.T      <- the one transpose
                              W_dec (d_sae, d_in) = our W_dec
                              b_enc (d_sae,), b_dec (d_in,)
                              threshold (d_sae,)  jumprelu: relu(threshold); batchtopk, matryoshka:
                                                  the global threshold on every latent (SAELens saves
                                                  BatchTopK and Matryoshka BatchTopK SAEs as JumpReLU
                                                  SAEs for inference too)
    cfg.json                  architecture ("standard" for relu, "topk", "jumprelu" for jumprelu,
                              batchtopk and matryoshka), d_in, d_sae, dtype, device,
                              apply_b_dec_to_input (true: we encode x - b_dec), normalize_activations
                              ("none"), reshape_activations, k and rescale_acts_by_decoder_norm (false)
                              for topk, metadata (matryoshka: its group_sizes and the prefix ends as
                              SAELens's matryoshka_widths; exported_by; actstore_origin); and the pre-6 keys
                              activation_fn / activation_fn_kwargs ({"k": k} for topk).

saev layout (`export_saev`, saev's current `saev.nn.load` reads it: header schema 5, OSU-NLP-Group/saev 3d73f1f7):

    sae.pt      one JSON line {"schema": 5, "cfg": {d_model, d_sae, activation {"cls", "params"}, ...}, "commit",
                "lib", "exported_by", "actstore_origin"}, then torch.save of the state dict: W_enc (d_in, d_sae) =
                our W_enc.T, b_enc = ours - W_enc b_dec (saev encodes x @ W_enc + b_enc, without b_dec), W_dec,
                b_dec, and BatchTopK's "activation.threshold" (a scalar)

relu -> Relu, batchtopk and matryoshka -> BatchTopK with the inference threshold (saev encodes in eval mode with
pre > threshold, exactly ours; matryoshka's group sizes go into the header's "actstore_group_sizes"), topk -> TopK:
saev's TopK keeps the k largest pre-activations even when some are negative, we ReLU them, so saev's codes differ
from ours on a token with fewer than k positive pre-activations (the same caveat as reading saev's TopK). jumprelu is
refused: saev has no per-latent thresholds.

The folder written is recognised as ours (cfg.json's `metadata.exported_by`, sae.pt's header `exported_by`), so that
`--overwrite` replaces an earlier export and nothing else. The SAE's origin (its store's model and layer) goes in, so
that the export, read back by `--sae`, is checked against a store like the SAE it came from.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
import torch
from safetensors.torch import save as st_save

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.loader import Normalization
from actstore.outputs import check_output
from actstore.store import filesystem, put_bytes
from sae import checkpoint
from sae.imports import fold_b_dec
from sae.model import SparseAutoencoder

__all__ = ["EXPORTS", "ExportConfig", "export_saelens", "export_saev", "run_export"]

SAELENS_WEIGHTS, SAEV_FILE = "sae_weights.safetensors", "sae.pt"
_SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                         "matryoshka": "jumprelu"}
_SAEV_ACTIVATION = {"relu": "Relu", "topk": "TopK", "batchtopk": "BatchTopK", "matryoshka": "BatchTopK"}
_ORIGIN = ("store", "layer", "tokens", "backbone")
_ROWS = 8192
"""Rows of a weight matrix widened to float64 at once."""


def export_saelens(sae: SparseAutoencoder, url: str, normalization: Normalization | None = None,
                   metadata: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None,
                   origin: dict[str, Any] | None = None) -> None:
    """Write the SAE in SAELens's layout (module docstring), the normalization folded in; `origin`
    (sae.checkpoint.origin) goes into its metadata as actstore_origin, so that reading it back keeps the identity
    check."""
    cfg = sae.cfg
    if origin is not None:
        metadata = {**(metadata or {}), "actstore_origin": origin}
    weights = _raw_weights(sae, normalization)
    tensors = {**weights, "W_enc": weights["W_enc"].t()}  # st_save makes it contiguous: one copy
    if cfg.kind == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().double().relu()
    elif cfg.batch_topk:
        tensors["threshold"] = _batchtopk_threshold(sae, "export_saelens").expand(cfg.d_sae)
    tensors = {k: t.to(cfg.torch_dtype).contiguous().cpu() for k, t in tensors.items()}
    architecture = _SAELENS_ARCHITECTURE[cfg.kind]
    if cfg.kind == "matryoshka":
        metadata = {"group_sizes": list(cfg.group_sizes), "matryoshka_widths": list(cfg.prefix_ends),
                    **(metadata or {})}
    saelens_cfg: dict[str, Any] = {
        "architecture": architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "exported_by": checkpoint.FORMAT, **(metadata or {})},
        "activation_fn": "topk" if architecture == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if architecture == "topk" else {},
    }
    if architecture == "topk":
        saelens_cfg |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    fs, root = filesystem(str(url), storage_options)
    put_bytes(fs, f"{root}/{SAELENS_WEIGHTS}", st_save(tensors, metadata={"format": "pt"}))
    put_bytes(fs, f"{root}/{checkpoint.CONFIG}", json.dumps(saelens_cfg, indent=2).encode())


def export_saev(sae: SparseAutoencoder, url: str, normalization: Normalization | None = None,
                storage_options: dict[str, Any] | None = None, origin: dict[str, Any] | None = None) -> None:
    """Write the SAE as saev's `sae.pt` (module docstring) into the folder `url`, the normalization folded in."""
    cfg = sae.cfg
    if cfg.kind not in _SAEV_ACTIVATION:
        raise ConfigError(f"export_saev: a {cfg.kind} SAE; saev has no per-latent thresholds (it reads relu, topk, "
                          "batchtopk and matryoshka)")
    weights = _raw_weights(sae, normalization)
    state = {"W_enc": weights["W_enc"].t(), "W_dec": weights["W_dec"], "b_dec": weights["b_dec"],
             "b_enc": -fold_b_dec(weights["W_enc"], -weights["b_enc"], weights["b_dec"])}  # b_enc - W_enc b_dec
    name = _SAEV_ACTIVATION[cfg.kind]
    params: dict[str, Any] = {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {
        "key": "l1-sparsity", "coeff": cfg.l1_coeff}}, "aux": {"cls": "NoAux", "params": {"key": "no-aux"}}}
    if name != "Relu":
        params = {"key": "top-k" if name == "TopK" else "batch-top-k", "top_k": cfg.k,
                  "sparsity": {"cls": "NoSparsity", "params": {"key": "no-sparsity"}},
                  "aux": {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 1 / 32}},
                  **({"momentum": cfg.batchtopk_threshold_lr} if name == "BatchTopK" else {})}
    if name == "BatchTopK":
        state["activation.threshold"] = _batchtopk_threshold(sae, "export_saev")
    header: dict[str, Any] = {
        "schema": 5, "commit": "unknown", "lib": "actstore-sae", "exported_by": checkpoint.FORMAT,
        "cfg": {"d_model": cfg.d_in, "d_sae": cfg.d_sae, "activation": {"cls": name, "params": params},
                "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True, "remove_parallel_grads": True,
                "normalize_w_dec": True},
        **({"actstore_origin": origin} if origin is not None else {}),
        **({"actstore_group_sizes": list(cfg.group_sizes)} if cfg.kind == "matryoshka" else {})}
    body = io.BytesIO(json.dumps(header).encode() + b"\n")
    body.seek(0, io.SEEK_END)
    torch.save({k: t.to(torch.float32).cpu() for k, t in state.items()}, body)  # a transposed view saves as is
    fs, root = filesystem(str(url), storage_options)
    put_bytes(fs, f"{root}/{SAEV_FILE}", body.getvalue())


EXPORTS = {"saelens": export_saelens, "saev": export_saev}
"""The layouts `--to` writes."""


@dataclass(frozen=True)
class ExportConfig:
    """What `actstore export` writes."""

    sae: str
    """The SAE to export: ours, or another library's (any `--sae`)."""
    out: str
    """Folder to write (local or s3://); refused if it holds anything but an earlier export of ours."""
    to: str = field(default="saelens", metadata={"choices": tuple(EXPORTS)})
    """The layout: saelens (cfg.json + sae_weights.safetensors, SAELens >= 6's `SAE.load_from_disk`) or saev
    (sae.pt, saev's `saev.nn.load`)."""
    overwrite: bool = False
    """Replace an earlier export at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the SAE and `out`."""


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the export; returns what was written (layout, kind, widths, the origin kept)."""
    if cfg.to not in EXPORTS:
        raise ConfigError(f"export: --to {cfg.to!r}; layouts: {', '.join(EXPORTS)}")
    check_output(cfg.out, "an SAE export of ours", _is_export, cfg.overwrite, cfg.storage_options)
    sae, normalization = checkpoint.load(cfg.sae, storage_options=cfg.storage_options)
    extra = checkpoint.read_extra(cfg.sae, cfg.storage_options)
    origin = {k: extra[k] for k in _ORIGIN if k in extra} or None
    EXPORTS[cfg.to](sae, cfg.out, normalization, storage_options=cfg.storage_options, origin=origin)
    return {"out": redact(cfg.out), "to": cfg.to, "kind": sae.cfg.kind, "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae, "origin": origin}


def _raw_weights(sae: SparseAutoencoder, normalization: Normalization | None) -> dict[str, torch.Tensor]:
    """W_enc (d_sae, d_in) and W_dec in the SAE's dtype, float64 b_enc and b_dec, reading raw activations: the
    normalization folded in."""
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    b_enc, b_dec = sae.b_enc.detach().double(), sae.b_dec.detach().double()
    if normalization is None:
        return {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    scale, mean = float(normalization.scale), normalization.mean.detach().to(b_dec.device, torch.float64)
    return {"W_enc": _rows(W_enc, lambda w: w * scale), "W_dec": _rows(W_dec, lambda w: w / scale), "b_enc": b_enc,
            "b_dec": b_dec / scale + mean}


def _rows(W: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn of W in float64, a block of rows at a time, back in W's dtype."""
    return torch.cat([fn(W[i:i + _ROWS].double()).to(W.dtype) for i in range(0, W.shape[0], _ROWS)])


def _batchtopk_threshold(sae: SparseAutoencoder, who: str) -> torch.Tensor:
    threshold = sae.batchtopk_threshold.detach()
    if torch.isnan(threshold):
        raise ConfigError(f"{who}: this BatchTopK SAE has no inference threshold yet (never trained)")
    return threshold


def _is_export(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """An earlier export of ours: a SAELens cfg.json or a saev sae.pt header that says exported_by us."""
    root = path.rstrip("/")
    try:
        cfg = json.loads(fs.cat_file(f"{root}/{checkpoint.CONFIG}"))
        return isinstance(cfg, dict) and (cfg.get("metadata") or {}).get("exported_by") == checkpoint.FORMAT
    except (OSError, ValueError):
        pass
    try:
        header = json.loads(fs.cat_file(f"{root}/{SAEV_FILE}", start=0, end=1 << 16).partition(b"\n")[0])
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("exported_by") == checkpoint.FORMAT
