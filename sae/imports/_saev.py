"""saev (github.com/OSU-NLP-Group/saev, formerly samuelstevens/saev): `sae.pt`, a JSON header line then a torch state
dict, as saev's `nn.dump` writes it; `--sae saev:PATH` names the file or a folder holding it.

The header schemas are those saev's current `nn.load` reads (src/saev/nn/modeling.py at OSU-NLP-Group/saev
3d73f1f7, SCHEMA_VERSION 5): none (saev <= 0.1: the raw SAE config, `d_vit`, `exp_factor`), 1 (the activation
named by `cls`, or a `cfg.activation` {"cls", "params"} payload), 2 to 5 (that payload). Tensors: W_enc
(d_model, d_sae), b_enc, W_dec (d_sae, d_model), b_dec, and BatchTopK's `activation.threshold`. Encoded as:

- no schema and schema 1: pre = (x - b_dec) @ W_enc + b_enc, as the code that wrote them trained them (saev 0.1.0's
  nn.py and modeling.py until e7ca004, 2025-07-31). saev's current loader encodes these without subtracting b_dec
  ("don't remove decoder bias since it's zero by default"), but their b_dec was initialized to the data mean and
  trained: we keep the encoding they were trained with, exactly our convention;
- schema 2 to 5: pre = x @ W_enc + b_enc (saev's current `encode`), ours with b_enc + W_enc.T b_dec (folded in float64).

Activations: Relu -> relu; TopK -> topk with k = min(top_k, d_sae) (saev keeps the k largest pre-activations even when
some are negative, we ReLU them: codes differ only on a token with fewer than k positive pre-activations);
BatchTopK at inference (saev's eval mode) keeps pre > threshold, or pre > 0 when threshold <= 0 -> our batchtopk with
that threshold (clamped at 0). Refused in one line: an unknown schema or activation, a BatchTopK without its
inference threshold (saev before schema 4: its encode couples the tokens of a batch), other tensors, and a pickle
that is not plain weights (torch.load weights_only).

Input normalization: saev <= 0.1 (no schema) and schema 1 trained on (x - mean) / scalar with its DataLoad defaults
scale_mean and scale_norm (saev 0.1.0 activations.py `Dataset.__init__` / `transform`): mean = the mean activation,
scalar = E||x - mean|| / sqrt(d), both from 2**19 random tokens of the training data; the checkpoint records neither.
`normalization` builds the same from the store: the mean from its statistics (all tokens), E||x - mean|| (the mean
norm, not the RMS our own normalization uses) from up to 2**19 patch tokens read in runs spread over the store. A
schema-1 SAE trained between c6a4602 (2025-07-17, saev stopped normalizing) and 8d38c23 (2025-07-31, schema 2) saw raw
activations; the file cannot tell. Schema 2 to 5: raw activations (saev's shuffled loader; scale_norm unimplemented).

Where it came from: sae.pt names no model and no layer (they live in saev's run folders). Three things add them:
- a repo of several checkpoints (the osunlp DINOv3 series: `layer_N/<run>/sae.pt` listed in a `manifest.jsonl` of
  {"run_id", "layer", "l0", "mse", "sha256", "path"} lines, saev's contrib/trait_discovery/scripts/push_dinov3.py):
  `--sae hf://osunlp/SAE_DINOv3_ViT-L-16_IN1K --layer 23` picks the layer's checkpoint (`pick`; a layer with several
  names them, with their L0, to be named by path), and a sae.pt found in a manifest records its layer. saev's layer
  N is the output of block N (0-based, its RecordedTransformer's hooks), our layer "N";
- a published single-checkpoint repo read by its hub id (_PUBLISHED): the model its card names, mapped to our
  backbone, and the layer where its documentation says it (SAE_CLIP_24K_ViT-B-16_IN1K: OpenAI CLIP ViT-B/16,
  "the 11th (second-to-last) layer", `--data.layer -2`, our layer 10: contrib/interactive_interp/classification/
  reproduce.md; the DINOv2 SAE's layer is not documented: --layer, its model still checked);
- an export of ours (`actstore export --to saev`): the header's "actstore_origin".
Otherwise the origin is only "names", and --layer is required. DINOv3 is not one of our backbones: its SAEs record
their layer, not a model.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from typing import Any

import fsspec
import numpy as np
import torch

from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from actstore.store import ActivationStore, LayerSpec, model_identity
from sae.config import SAEConfig
from sae.imports._fold import fold_b_dec
from sae.model import SparseAutoencoder

FILE, MANIFEST = "sae.pt", "manifest.jsonl"
_PUBLISHED = {
    "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K": ({"family": "open_clip", "name": "ViT-B-16", "checkpoint": "openai"}, "10"),
    "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K": ({"family": "hf", "name": "facebook/dinov2-base", "checkpoint": "hub"},
                                            None),
}
"""saev's published single-checkpoint repos: the backbone record of ours that makes the model their card names
(torch hub's dinov2_vitb14 is transformers' facebook/dinov2-base), and the layer where documented."""
SCHEMAS = (None, 1, 2, 3, 4, 5)
_ACTIVATIONS = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}
_SAMPLE_TOKENS = 2**19
"""saev's DataLoad.n_random_samples: the tokens its mean norm was estimated from."""


def detect(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """A sae.pt (its JSON header line, then torch's zip), or a repo of them listed in a manifest.jsonl."""
    path = _path(fs, root)
    if path is None:
        return bool(_manifest(fs, root))
    line, head = _first_line(fs, path)
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(header, dict) and ("schema" in header or "d_vit" in header) and head[:2] == b"PK"  # torch zip


def pick(fs: fsspec.AbstractFileSystem, root: str, url: str, layer: str) -> str | None:
    """The URL of the checkpoint trained on `layer` when `url` is a repo of several (a manifest.jsonl); None when it
    is not such a repo."""
    entries = _manifest(fs, root) if _path(fs, root) is None else []
    if not entries:
        return None
    found = [e for e in entries if str(e.get("layer")) == str(layer)]
    if len(found) != 1:
        runs = (", ".join(f"{e.get('path')} (L0 {e.get('l0')})" for e in found) if found else
                "none; its layers: " + ", ".join(sorted({str(e.get("layer")) for e in entries}, key=_natural)))
        raise ConfigError(f"{url}: {len(found)} saev checkpoints of layer {layer} in its {MANIFEST}: name one as "
                          f"{url.rstrip('/')}/<path>; checkpoints: {runs}")
    return f"{url.rstrip('/')}/{found[0]['path']}"


def config(fs: fsspec.AbstractFileSystem, root: str, url: str) -> dict[str, Any]:
    """The header line of sae.pt, the published repo it was read from and the layer a manifest gives it."""
    path = _path(fs, root)
    if path is None:
        entries = _manifest(fs, root)
        if entries:
            layers = sorted({str(e.get("layer")) for e in entries}, key=_natural)
            raise ConfigError(f"{url} holds {len(entries)} saev checkpoints (layers {', '.join(layers)}): pass --layer "
                              f"to pick one, or name one as {url.rstrip('/')}/<path> (listed in its {MANIFEST})")
        raise ConfigError(f"{url}: no saev {FILE} there")
    header = _header(_first_line(fs, path)[0], url)
    return {"header": header, "path": path, **_where(fs, path)}


def extra(cfg: dict[str, Any]) -> dict[str, Any]:
    """The origin: an export's own, else what the repo it came from says (module docstring), else nothing."""
    header, repo, layer = cfg["header"], cfg.get("repo"), cfg.get("layer")
    activation = _activation(header, FILE)[0] if header.get("schema") in SCHEMAS else None
    found: dict[str, Any] = {"names": "a saev SAE (sae.pt names no model or layer)", "tokens": "patches"}
    if isinstance(header.get("actstore_origin"), dict):
        found = dict(header["actstore_origin"])
    elif repo in _PUBLISHED:
        record, layer = _PUBLISHED[repo][0], _PUBLISHED[repo][1] or layer
        found = {"backbone": model_identity(record), "names": f"{repo} ({record['family']}:{record['name']})",
                 "tokens": "patches"}
    elif layer is not None:
        found["names"] = f"{repo or 'a saev repo'} layer {layer} (no model we can map)"
    if layer is not None and "layer" not in found:
        found["layer"] = str(layer)
    return {**found, "imported": {"format": "saev", "version": header.get("lib"), "schema": header.get("schema"),
                                  "activation": activation, "commit": header.get("commit")}}


def read(fs: fsspec.AbstractFileSystem, root: str, url: str, device: torch.device | str | None
         ) -> tuple[SparseAutoencoder, Normalization | None, dict[str, Any]]:
    found = config(fs, root, url)
    cfg, body = found["header"], fs.cat_file(found["path"]).partition(b"\n")[2]
    schema = cfg.get("schema")
    if schema not in SCHEMAS:
        raise ConfigError(f"{url}: saev header schema {schema!r}; we read {', '.join(map(str, SCHEMAS[1:]))} and "
                          "the schema-less header of saev <= 0.1")
    name, top_k = _activation(cfg, url)
    try:
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{url}: its state dict is not plain weights, refused (torch.load weights_only: "
                          f"{str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise CorruptDataError(f"{url}: not a torch state dict after the header ({e})", key=FILE) from None
    kind = _ACTIVATIONS[name]
    wanted = {"W_enc", "W_dec", "b_enc", "b_dec", *(("activation.threshold",) if kind == "batchtopk" else ())}
    if not isinstance(state, dict) or set(state) != wanted:
        found_names = sorted(state) if isinstance(state, dict) else type(state).__name__
        if kind == "batchtopk" and isinstance(state, dict) and "activation.threshold" not in state:
            raise ConfigError(f"{url}: a saev BatchTopK SAE without its inference threshold (saev before schema 4): "
                              "its encode couples the tokens of a batch, which no kind of ours does")
        raise ConfigError(f"{url}: tensors {found_names}, a saev {name} SAE has {sorted(wanted)}")
    W_enc, b_enc, W_dec, b_dec = state["W_enc"].float().t(), state["b_enc"], state["W_dec"], state["b_dec"]
    d_sae, d_in = W_dec.shape
    if schema not in (None, 1):
        b_enc = fold_b_dec(W_enc, b_enc, b_dec)  # saev >= schema 2 encodes x, ours x - b_dec
    settings: dict[str, Any] = {"k": min(top_k, d_sae)} if kind in ("topk", "batchtopk") else {}
    if kind == "batchtopk" and cfg.get("actstore_group_sizes"):  # our matryoshka, exported: it encodes the same
        kind, settings["group_sizes"] = "matryoshka", tuple(int(n) for n in cfg["actstore_group_sizes"])
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, kind=kind, **settings), device=device)
    with torch.no_grad():
        for key, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(sae, key).copy_(value.to(torch.float32))
        if sae.cfg.batch_topk:
            sae.batchtopk_threshold.fill_(max(float(state["activation.threshold"]), 0.0))
    return sae.eval(), None, extra(found)


def normalization(extra: dict[str, Any], store: ActivationStore, spec: LayerSpec) -> Normalization | None:
    """saev <= 0.1's and schema 1's (x - mean) / (E||x - mean|| / sqrt(d)) from the store (module docstring)."""
    if (extra.get("imported") or {}).get("schema") not in (None, 1):
        return None
    mean = torch.from_numpy(store.stats(spec.name, "patches").mean.astype(np.float32))
    per_image = spec.tokens.n_patches
    first = 1 if spec.tokens.cls else 0
    n_images = min(store.n_images, math.ceil(_SAMPLE_TOKENS / per_image))
    runs = min(64, n_images)
    run = math.ceil(n_images / runs)
    total, count = 0.0, 0
    for start in np.linspace(0, store.n_images - run, runs).astype(int).tolist():
        x = store.read(spec.name, start, start + run)[:, first:].reshape(-1, spec.d).double()
        total += float((x - mean.double()).norm(dim=1).sum())
        count += x.shape[0]
    return Normalization(spec.name, "patches", mean, math.sqrt(spec.d) * count / total)


def _path(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """sae.pt: `root` itself (any file name) or in the folder `root`."""
    if fs.isfile(root):
        return root
    return f"{root}/{FILE}" if fs.isfile(f"{root}/{FILE}") else None


def _first_line(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, bytes]:
    """(sae.pt's header line, the bytes after it) from its first 64 KiB, or 1 MiB for a long header: one ranged
    read (fsspec's remote files have no readline(size))."""
    for size in (1 << 16, 1 << 20):
        line, sep, rest = fs.cat_file(path, start=0, end=size).partition(b"\n")
        if sep:
            break
    return line, rest


def _manifest(fs: fsspec.AbstractFileSystem, root: str) -> list[dict[str, Any]]:
    """The entries of `root`/manifest.jsonl that name a checkpoint's layer and path; [] when there is none."""
    try:
        lines = fs.cat_file(f"{root}/{MANIFEST}").decode().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return []
    return [e for e in entries if isinstance(e, dict) and "layer" in e and isinstance(e.get("path"), str)]


def _where(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    """{"repo": the hub repo id (hf:// only), "layer": what a manifest.jsonl up to three folders above says}."""
    parts = path.split("/")
    hub = "hf" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    repo = f"{parts[0]}/{parts[1].split('@')[0]}" if hub and len(parts) > 2 else None
    for up in range(1, min(4, len(parts) - (1 if hub else 0))):  # on the hub, not above the repo
        base = "/".join(parts[:-up])
        entry = next((e for e in _manifest(fs, base) if e["path"] == "/".join(parts[-up:])), None)
        if entry is not None:
            return {"repo": repo, "layer": entry["layer"]}
    return {"repo": repo, "layer": None}


def _natural(layer: str) -> tuple[int, str]:
    return (int(layer), "") if layer.isdigit() else (1 << 30, layer)


def _header(line: bytes, url: str) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptDataError(f"{url}: the first line of a saev {FILE} is a JSON header ({e})", key=FILE) from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{url}: the first line of a saev {FILE} is a JSON object", key=FILE)
    return header


def _activation(header: dict[str, Any], url: str) -> tuple[str, int]:
    """(saev's activation class, its top_k) as saev's nn.load finds them in each schema."""
    schema = header.get("schema")
    if schema is None:
        return "Relu", 0
    cfg = header.get("cfg") or {}
    if schema == 1 and header.get("cls", "SparseAutoencoderConfig") != "SparseAutoencoderConfig":
        name, params = header["cls"], {"top_k": cfg.get("top_k", 32)}  # schema 1 as first written
    elif isinstance(cfg.get("activation"), dict):
        name, params = cfg["activation"].get("cls"), cfg["activation"].get("params") or {}
    else:
        name, params = None, {}
    if name not in _ACTIVATIONS:
        raise ConfigError(f"{url}: a saev {name!r} activation; we read {', '.join(_ACTIVATIONS)}")
    return name, int(params.get("top_k", 32))
