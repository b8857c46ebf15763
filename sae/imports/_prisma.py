"""ViT-Prisma (github.com/Prisma-Multimodal/ViT-Prisma): a folder holding `config.json` (VisionModelSAERunnerConfig's
`save_config`) and the weights, `weights.pt` on the hub (another `.pt` name is taken when it is the folder's only
one); `--sae prisma:PATH` names the folder or the `.pt`. Read as Prisma's current loader reads them
(`SparseAutoencoder.load_from_pretrained` in src/vit_prisma/sae/sae.py and `load_config` in sae/config.py, at
Prisma-Multimodal/ViT-Prisma aa5ff6ad, 2025-05-23): config.json's fields, Prisma's defaults for those it lacks, and a
`.pt` of plain weights. The registry's vit-prisma (<= 0.1.4) has no sae module.

Prisma's StandardSparseAutoencoder encodes  pre = (n(x) - b_dec) @ W_enc + b_enc,  W_enc (d_in, d_sae), always
subtracting b_dec; then ReLU (activation_fn_str "relu") or TopK (ReLU of the k largest pre-activations): our relu and
topk kinds, W_enc transposed, the rest tensor for tensor, nothing folded. n is normalize_activations: "layer_norm" and
"constant_norm_rescale" transform each token on its own (refused); "none" (or null) is the identity, and Prisma's
trainer feeds the hook's raw activations: no input normalization. Weights are read into float32, as Prisma does for
its `_dtype` float32 (another `_dtype` is refused).

Refused, in one line: other architectures (gated) and transcoders, other activations (tanh-relu, leaky_relu), topk
without k, a normalize_activations we do not know or that config.json lacks (Prisma's default is layer_norm), a head
index, a `.pt` that is not plain weights (torch.load weights_only), among them what Prisma's trainer writes,
`save_model`'s n_images_N.pt, which pickles the config object beside the state dict (the hub's weights.pt are plain
state dicts: in Prisma's demos/2_Train_SAE.ipynb their loader reads config.json for them, which it does only then),
and Prisma's `.pkl`/`.pkl.gz` (plain pickles).

The origin: the hook is `blocks.{hook_point_layer}.{layer_subtype}` (configs written before layer_subtype name it in
`hook_point`, which we keep; Prisma now reads those with its default subtype). `blocks.N.hook_resid_post`, block N's
output, is our layer N; any other hook (hook_mlp_out, attention, resid_pre/mid, ln2) is none of our layers (our
stores hold block outputs): refused when read. The model (model_name, such as
"open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K") is named, not mapped: --layer is required. "tokens" says what
it was trained on: cls_token_only -> "cls", use_patches_only -> "patches", else "all" (it encodes any token).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from typing import Any

import fsspec
import torch

from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

CONFIG, WEIGHTS = "config.json", "weights.pt"
_FIELDS = {"d_in", "expansion_factor", "hook_point_layer", "activation_fn_str"}
"""What every Prisma config.json holds (save_config writes all of VisionModelSAERunnerConfig's fields)."""
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_FLOAT32 = ("float32", "float", "torch.float32", "torch.float")
"""Prisma's dtype_mapping names of float32."""
_SIDE_FILE = "_log_feature_sparsity.pt"
"""The trainer's per-checkpoint latent frequencies, beside n_images_N.pt: not an SAE."""


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """A config.json with Prisma's fields (and no "format": ours say "actstore-sae") in the folder `root` or beside
    the file `root`."""
    folder = root.rsplit("/", 1)[0] if fs.isfile(root) else root
    if not fs.isfile(f"{folder}/{CONFIG}"):
        return False
    try:
        cfg = json.loads(fs.cat_file(f"{folder}/{CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "format" not in cfg and _FIELDS <= cfg.keys()


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """config.json, beside the .pt that `root` names or in the folder `root`."""
    folder = root.rsplit("/", 1)[0] if fs.isfile(root) else root
    try:
        return json.loads(fs.cat_file(f"{folder}/{CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{url}: Prisma's {CONFIG} is not JSON ({e})", key=CONFIG) from None


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """The origin: our layer when the hook is a block's output; the model named, not mapped."""
    hook = _hook(cfg)
    match = _HOOK.match(hook)
    tokens = "cls" if cfg.get("cls_token_only") else "patches" if cfg.get("use_patches_only") else "all"
    activation = cfg.get("activation_fn_str", "topk")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") if activation == "topk" else None
    return {**({"layer": match[1]} if match else {}), "names": f"{cfg.get('model_name') or '?'} {hook}",
            "tokens": tokens, "imported": {"format": "prisma", "version": None, "activation": activation, "k": k}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    cfg = config(fs, root, url)
    kind, k = _check(cfg, url)
    path = _weights(fs, root, url)
    try:
        state = torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{url}: {path.rsplit('/', 1)[-1]} is not plain weights, refused (torch.load weights_only: "
                          f"{str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise CorruptDataError(f"{url}: {path.rsplit('/', 1)[-1]} is not a torch file ({e})",
                               key=path.rsplit("/", 1)[-1]) from None
    wanted = {"W_enc", "b_enc", "W_dec", "b_dec"}
    if not isinstance(state, dict) or set(state) != wanted:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{url}: {path.rsplit('/', 1)[-1]} holds {found}; a Prisma standard SAE's state dict is "
                          f"{sorted(wanted)}")
    d_in = int(cfg["d_in"])
    d_sae = d_in * int(cfg["expansion_factor"])
    for name, shape in (("W_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("W_dec", (d_sae, d_in)), ("b_dec", (d_in,))):
        if not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != shape:
            found = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
            raise ConfigError(f"{url}: {name} is {found}; {CONFIG} (d_in {d_in}, expansion_factor "
                              f"{cfg['expansion_factor']}) says {shape}")
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, **({"k": k} if k else {})), device=device)
    with torch.no_grad():
        for ours, value in (("W_enc", state["W_enc"].t()), ("b_enc", state["b_enc"]), ("W_dec", state["W_dec"]),
                            ("b_dec", state["b_dec"])):
            getattr(sae, ours).copy_(value.to(torch.float32))
    return sae.eval(), None, extra(cfg)


def _hook(cfg: dict[str, Any]) -> str:
    """Prisma's hook_point; a config without layer_subtype names its hook in `hook_point` (else Prisma's default)."""
    subtype = cfg.get("layer_subtype")
    if subtype is None and isinstance(cfg.get("hook_point"), str):
        return cfg["hook_point"]
    return f"blocks.{cfg.get('hook_point_layer')}.{subtype or 'ln2.hook_normalized'}"


def _check(cfg: dict[str, Any], url: str) -> tuple[str, int | None]:
    """(our kind, k) of what config.json describes, or a one-line refusal of what we cannot encode exactly."""
    architecture = cfg.get("architecture", "standard")
    if architecture != "standard" or cfg.get("is_transcoder"):
        what = "transcoder" if cfg.get("is_transcoder") else f"{architecture!r} SAE"
        raise ConfigError(f"{url}: a Prisma {what}; we read its standard SAEs (relu, topk)")
    activation, kwargs = cfg.get("activation_fn_str", "topk"), cfg.get("activation_fn_kwargs") or {}
    if activation not in ("relu", "topk"):
        raise ConfigError(f"{url}: a Prisma SAE with activation_fn_str {activation!r}; we read relu and topk")
    if activation == "topk" and (not isinstance(kwargs.get("k"), int) or "postact_fn" in kwargs):
        raise ConfigError(f"{url}: a Prisma topk SAE with activation_fn_kwargs {kwargs}; we read an integer k and "
                          "the default ReLU after the selection")
    norm = cfg.get("normalize_activations", "layer_norm")
    if norm in ("layer_norm", "constant_norm_rescale"):
        missing = "" if "normalize_activations" in cfg else f" (its default: {CONFIG} does not say)"
        raise ConfigError(f"{url}: Prisma normalize_activations={norm!r}{missing} transforms each token on its own, "
                          "which no input normalization of ours does")
    if norm not in (None, "none"):
        raise ConfigError(f"{url}: Prisma normalize_activations={norm!r}, not one this reader knows (none, "
                          "layer_norm, constant_norm_rescale)")
    if cfg.get("_dtype", "float32") not in _FLOAT32:
        raise ConfigError(f"{url}: a Prisma SAE of _dtype {cfg['_dtype']!r}; we read float32 ones exactly")
    if cfg.get("hook_point_head_index") is not None:
        raise ConfigError(f"{url}: a Prisma SAE of head {cfg['hook_point_head_index']} of its hook; our stores hold "
                          "whole block outputs")
    hook = _hook(cfg)
    legacy = cfg.get("hook_point")
    if isinstance(legacy, str) and legacy != hook:
        raise ConfigError(f"{url}: {CONFIG} says hook_point {legacy!r} but hook_point_layer and layer_subtype name "
                          f"{hook!r}")
    if not _HOOK.match(hook):
        raise ConfigError(f"{url}: a Prisma SAE of {hook}, not a block's output (blocks.N.hook_resid_post): our "
                          "stores hold only block outputs, so none of our layers is its input")
    return ("topk", kwargs["k"]) if activation == "topk" else ("relu", None)


def _weights(fs: fsspec.AbstractFileSystem, root: str, url: str) -> str:
    """The .pt `root` names, else the folder's weights.pt, else its only .pt; Prisma's pickles are refused."""
    if fs.isfile(root):
        path = root
    elif fs.isfile(f"{root}/{WEIGHTS}"):
        path = f"{root}/{WEIGHTS}"
    else:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
        found = [n for n in names if n.endswith(".pt") and not n.endswith(_SIDE_FILE)]
        found = found or [n for n in names if n.endswith((".pkl", ".pkl.gz"))][:1]
        if len(found) != 1:
            raise ConfigError(f"{url}: no {WEIGHTS} beside Prisma's {CONFIG}, and "
                              f"{'several .pt: ' + ', '.join(found) + '; name one' if found else 'no .pt'}")
        path = f"{root}/{found[0]}"
    if not path.endswith(".pt"):
        raise ConfigError(f"{url}: {path.rsplit('/', 1)[-1]} is not a .pt; Prisma's .pkl and .pkl.gz are plain "
                          "pickles, which we do not load")
    return path
