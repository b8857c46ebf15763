"""saprmarks/dictionary_learning: a run folder `trainer_i/` holding `ae.pt` (the state dict, `torch.save` of
`{k: v.cpu() for k, v in ae.state_dict().items()}`) and `config.json` ({"trainer": the trainer's config, with
dict_class, activation_dim, dict_size, k, layer, lm_name, submodule_name; "buffer": the buffer's}), as training.py's
trainSAE writes them; `--sae dictionary_learning:PATH` names the folder or its ae.pt.

Followed: dictionary-learning 0.1.0 (PyPI), whose dictionary.py, trainers/{top_k,batch_top_k,
matryoshka_batch_top_k}.py and utils.load_dictionary (the peer's loader: it picks the class by dict_class) encode as
upstream's at 60ec6bf (2025-08-20) still does. Upstream added since: k annealing (the saved `k` buffer is the final
k, which config.json's k equals) and a resume backup that overwrites ae.pt until the run ends. Encodings (x raw):

- AutoEncoder: relu(encoder(x - bias)): ours tensor for tensor (W_dec = decoder.weight.T). load_dictionary loads
  it with normalize_decoder=True: where the decoder columns are not unit (torch.allclose to 1; StandardTrainer
  keeps them unit, StandardTrainerAprilUpdate does not) it divides them by their norms and multiplies the encoder
  rows and bias by them; we do the same (in float32, as it does), so the codes are the peer loader's;
- AutoEncoderTopK: relu(encoder(x - b_dec)), then the k largest (ReLU before top-k; zeros fill a token with fewer
  than k positive): our topk. Its `threshold` buffer serves only `encode(use_threshold=True)`, not the default
  encode; a state dict from before it existed (2024-12-22) is read too;
- BatchTopKSAE and MatryoshkaBatchTopKSAE: at inference (`use_threshold=True`, the default) relu(pre) where
  relu(pre) > threshold, pre = (x - b_dec) @ W_enc + b_enc: our batchtopk / matryoshka (group_sizes from the
  state dict's buffer) with that threshold, or 0 when negative (-1: never calibrated, the peer's encode is ReLU);
- JumpReluAutoEncoder: relu(pre * (pre > threshold)), pre = x @ W_enc + b_enc (apply_b_dec_to_input is not saved
  and False on load; its trainer encodes so): our jumprelu (pre > relu(threshold), the same codes), with
  b_enc + W_enc.T b_dec (folded in float64).

Input normalization: none. trainSAE(normalize_activations=True) trains on x / norm_factor (sqrt of the mean ||x||^2
over 100 batches, arXiv 2408.05147 sec. 3.1) and folds the factor into the biases and thresholds (scale_biases)
before writing ae.pt and checkpoints/: a saved SAE reads raw activations (0.1.0 and upstream). The weights are read
into float32, whatever their saved dtype. checkpoints/ae_STEP.pt (no config.json beside it) is not read.

Refused, in one line: GatedAutoEncoder and any other dict_class, a BatchTopK without its threshold (before
2024-12-21 it encoded the batch's top k * batch, coupling tokens), the resume backup (weights before the fold,
mid-training), k, group_sizes or shapes on which config.json and ae.pt disagree, other tensors, and a pickle that
is not plain weights (torch.load weights_only).

The origin: lm_name is a language model we do not map (--layer is required); submodule_name resid_post_layer_N
(the peer's demo: the output of the model's block N, io "out") with trainer.layer N names our layer N.
"""

from __future__ import annotations

import io
import json
import pickle
import posixpath
import re
from typing import Any

import fsspec
import torch

from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from sae.config import SAEConfig
from sae.imports._fold import fold_b_dec
from sae.model import SparseAutoencoder

WEIGHTS, CONFIG = "ae.pt", "config.json"
_LINEAR, _PARAMS = ("encoder.weight", "encoder.bias", "decoder.weight"), ("W_enc", "b_enc", "W_dec")
_CLASSES = {  # dict_class: (our kind, tensors it has, tensors it may lack)
    "AutoEncoder": ("relu", {*_LINEAR, "bias"}, set()),
    "AutoEncoderTopK": ("topk", {*_LINEAR, "b_dec", "k", "threshold"}, {"k", "threshold"}),
    "BatchTopKSAE": ("batchtopk", {*_LINEAR, "b_dec", "k", "threshold"}, {"k"}),
    "MatryoshkaBatchTopKSAE": ("matryoshka", {*_PARAMS, "b_dec", "k", "threshold", "group_sizes"}, {"k"}),
    "JumpReluAutoEncoder": ("jumprelu", {*_PARAMS, "b_dec", "threshold"}, set()),
}
_RESID_POST = re.compile(r"^resid_post_layer_(\d+)$")


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """ae.pt beside a config.json whose "trainer" names a dict_class (config.json alone is read)."""
    folder = _folder(fs, root)
    if folder is None:
        return False
    try:
        cfg = json.loads(fs.cat_file(f"{folder}/{CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("trainer"), dict) and "dict_class" in cfg["trainer"]


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """config.json: {"trainer": ..., "buffer": ...}."""
    folder = _folder(fs, root)
    if folder is None:
        raise ConfigError(f"{url}: no dictionary_learning {WEIGHTS} + {CONFIG} there")
    try:
        cfg = json.loads(fs.cat_file(f"{folder}/{CONFIG}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{url}: {CONFIG} is not JSON ({e})", key=CONFIG) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("trainer"), dict):
        raise CorruptDataError(f"{url}: {CONFIG} has no \"trainer\" object", key=CONFIG)
    return cfg


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our layer when submodule_name is block N's output and trainer.layer agrees; the model is not mapped."""
    trainer, buffer = cfg["trainer"], cfg.get("buffer") or {}
    submodule, layer = trainer.get("submodule_name"), trainer.get("layer")
    match = _RESID_POST.match(submodule or "")
    found = {"layer": match[1]} if match and str(layer) == match[1] and buffer.get("io", "out") == "out" else {}
    return {**found, "names": f"{trainer.get('lm_name') or '?'} {submodule or f'layer {layer}'}",
            "imported": {"format": "dictionary_learning", "version": None, "dict_class": trainer.get("dict_class"),
                         "trainer_class": trainer.get("trainer_class"), "k": trainer.get("k")}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    cfg = config(fs, root, url)
    trainer = cfg["trainer"]
    name = trainer.get("dict_class")
    if name not in _CLASSES:
        why = " (gated: a gate and a magnitude path, no kind of ours)" if name == "GatedAutoEncoder" else ""
        raise ConfigError(f"{url}: a dictionary_learning {name!r}{why}; we read {', '.join(_CLASSES)}")
    kind, known, optional = _CLASSES[name]
    state = _state_dict(fs, _folder(fs, root), url)
    where = f"{url}/{WEIGHTS}"
    if kind == "batchtopk" and "threshold" not in state:
        raise ConfigError(f"{where}: a BatchTopKSAE without its inference threshold (before 2024-12-21): its encode "
                          "keeps the batch's top k * batch, coupling the tokens, which no kind of ours does")
    if not known - optional <= state.keys() <= known:
        raise ConfigError(f"{where}: tensors {sorted(state)}, a dictionary_learning {name} has {sorted(known)}")
    linear = "encoder.weight" in state
    W_enc = (state["encoder.weight"] if linear else state["W_enc"].t()).float()
    b_enc = state["encoder.bias" if linear else "b_enc"].float()
    W_dec = (state["decoder.weight"].t() if linear else state["W_dec"]).float()
    b_dec = state["bias" if kind == "relu" else "b_dec"].float()
    d_sae, d_in = int(trainer.get("dict_size", -1)), int(trainer.get("activation_dim", -1))
    for key, value, shape in (("encoder", W_enc, (d_sae, d_in)), ("encoder bias", b_enc, (d_sae,)),
                              ("decoder", W_dec, (d_sae, d_in)), ("decoder bias", b_dec, (d_in,))):
        if tuple(value.shape) != shape:
            raise ConfigError(f"{where}: the {key} is {tuple(value.shape)} (as (dict_size, activation_dim)), "
                              f"{CONFIG} says {shape}")
    settings: dict[str, Any] = {}
    if kind in ("topk", "batchtopk", "matryoshka"):
        settings["k"] = _k(trainer, state, where)
    if kind == "matryoshka":
        settings["group_sizes"] = tuple(int(g) for g in state["group_sizes"].tolist())
        if list(settings["group_sizes"]) != list(trainer.get("group_sizes", settings["group_sizes"])):
            raise ConfigError(f"{where}: group_sizes {list(settings['group_sizes'])}, {CONFIG} says "
                              f"{trainer['group_sizes']}")
    if kind == "relu":  # load_dictionary's AutoEncoder.from_pretrained(normalize_decoder=True)
        norms = W_dec.norm(dim=1)  # as the peer does it, in float32
        if not torch.allclose(norms, torch.ones_like(norms)):
            W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if kind == "jumprelu":
        b_enc = fold_b_dec(W_enc, b_enc, b_dec)  # the peer encodes x, ours x - b_dec
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, **settings), device=device)
    with torch.no_grad():
        for key, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, key).copy_(value.to(torch.float32))
        if kind == "jumprelu":
            sae.threshold.copy_(state["threshold"].to(torch.float32))
        if sae.cfg.batch_topk:
            sae.batchtopk_threshold.fill_(max(float(state["threshold"]), 0.0))
    return sae.eval(), None, extra(cfg)


def _folder(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The run folder: `root` holding ae.pt and config.json, or the folder of `root` when it is that ae.pt."""
    root = root.rstrip("/")
    folder = posixpath.dirname(root) if posixpath.basename(root) == WEIGHTS and fs.isfile(root) else root
    return folder if fs.isfile(f"{folder}/{WEIGHTS}") and fs.isfile(f"{folder}/{CONFIG}") else None


def _state_dict(fs: fsspec.AbstractFileSystem, folder: str, url: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(fs.cat_file(f"{folder}/{WEIGHTS}")), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{url}/{WEIGHTS}: not plain weights, refused (torch.load weights_only: "
                          f"{str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise CorruptDataError(f"{url}/{WEIGHTS}: not a torch state dict ({str(e).splitlines()[0]})",
                               key=WEIGHTS) from None
    if isinstance(state, dict) and {"ae", "optimizer"} <= state.keys():
        raise ConfigError(f"{url}/{WEIGHTS}: the resume backup of a dictionary_learning run stopped at step "
                          f"{state.get('step')}, not its trained SAE (weights before the norm_factor fold)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{url}/{WEIGHTS}: not a state dict of tensors ({type(state).__name__})")
    return state


def _k(trainer: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> int:
    """The state dict's k buffer, which load_dictionary requires to equal config.json's k."""
    saved, told = (int(state["k"]) if "k" in state else None), trainer.get("k")
    if saved is not None and told is not None and saved != told:
        raise ConfigError(f"{where}: k is {saved}, {CONFIG} says {told}")
    if saved is None and not isinstance(told, int):
        raise ConfigError(f"{where}: neither it nor {CONFIG} records k")
    return saved if saved is not None else told
