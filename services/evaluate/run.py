"""`actstore evaluate`: what the backbone still does when an SAE's reconstruction replaces its activations.

For each batch of images, four forward passes of the backbone the SAE's store was extracted with (same weights:
hub tag, checkpoint file or the random init's seed; same layer and token kind the SAE was trained on):

    clean            the model as it is
    spliced          the layer's tokens replaced by the SAE's reconstruction (sae.splice, replace mode)
    zero_ablation    the same tokens set to zero
    mean_ablation    the same tokens set to the store's mean of them

and, of the model's own final output, per image against the clean pass:

    embedding_cosine  cosine of the pooled / CLS embedding (1 = unchanged)
    kl                KL(clean || other) of the class probabilities (0 = unchanged), where there are classes:
                      the model's classifier (timm), else a zero-shot head over class names (open_clip, transformers
                      CLIP / SigLIP text towers)
    top1_agreement    fraction of images whose top class is the clean one

    recovered = (mean_ablation - spliced) / (mean_ablation - clean), per metric: 1 when splicing loses nothing,
                0 when the SAE is no better than replacing the layer by its mean, (language-model tools' "CE loss
                recovered"); null where ablation itself changes nothing.

FVU and L0 are the SAE's, on the same images' tokens (in its normalized input space; FVU over all the tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.extract.decode import decode_image
from actstore.extract.sources import build_manifest, read_bytes
from actstore.extract.zeroshot import DEFAULT_TEMPLATE, ZeroShot, zero_shot_classifier
from actstore.store import ActivationStore, filesystem, put_bytes
from sae import Normalization, SparseAutoencoder, read_extra
from sae.checkpoint import load_on_store
from sae.splice import SpliceStats, ablate, splice

__all__ = ["FORMAT", "PASSES", "EvaluateConfig", "run_evaluate"]

FORMAT = "actstore-evaluate"
PASSES = ("spliced", "zero_ablation", "mean_ablation")
RUN_CONFIG = "train_config.json"


@dataclass(frozen=True)
class EvaluateConfig:
    """What `actstore evaluate` runs: an SAE spliced into its backbone over a set of images."""

    sae: str
    """SAE folder (cfg.json + sae.safetensors), e.g. a training run's <out>/<name>."""
    images: str
    """Image folder or list file (as `actstore extract --images`); any images, not only the store's."""
    json: str | None = None
    """Write the results here (a JSON file; an existing one is replaced only if it is an evaluate result and
    overwrite is set)."""
    store: str | None = None
    """The store the SAE was trained on (its backbone, weights, layer and mean); default the one the SAE records."""
    classes: str | None = None
    """Text file of class names, one per line, for zero-shot heads (open_clip / transformers CLIP and SigLIP);
    default the image folder's class names (its subfolders). Models with their own classifier (timm) use it."""
    template: str = DEFAULT_TEMPLATE
    """Zero-shot prompt, {} is the class name."""
    batch_size: int = 32
    """Images per forward pass."""
    max_images: int | None = None
    """Evaluate only the first this many images of the source."""
    device: str = "cpu"
    """Where the backbone and the SAE run (e.g. "cuda")."""
    overwrite: bool = False
    """Replace an existing evaluate result at `json`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the SAE, the store and the images."""

    def __post_init__(self) -> None:
        check_at_least(self, "evaluate", {"batch_size": 1, **({"max_images": 1} if self.max_images is not None
                                                                else {})})


@dataclass(frozen=True)
class _Setup:
    """The SAE and where it sits: its backbone (rebuilt from the store's record), layer, token kind and mean."""

    sae: SparseAutoencoder
    norm: Normalization | None
    store_url: str
    layer: str
    tokens: str
    backbone: Backbone
    mean: torch.Tensor


def _sae_record(cfg: EvaluateConfig) -> tuple[str, str | None]:
    """(store URL, layer) the SAE was trained on: --store, else what the SAE's config records, else its run's."""
    extra = read_extra(cfg.sae, cfg.storage_options)
    store, layer = extra.get("store"), extra.get("layer")
    if store is None:  # SAEs saved before the trainer recorded it: the run folder around the SAE
        fs, root = filesystem(cfg.sae, cfg.storage_options)
        run = root.rstrip("/").rsplit("/", 1)[0]
        if fs.exists(f"{run}/{RUN_CONFIG}"):
            run_cfg = json.loads(fs.cat_file(f"{run}/{RUN_CONFIG}"))
            store, layer = run_cfg.get("store"), layer if layer is not None else run_cfg.get("layer")
    store = cfg.store or store
    if store is None:
        raise ConfigError(f"{redact(cfg.sae)}: the SAE does not record its store; pass --store")
    return store, layer


def _setup(cfg: EvaluateConfig) -> _Setup:
    store_url, recorded_layer = _sae_record(cfg)
    store = ActivationStore(store_url, cfg.storage_options)
    sae, norm, spec = load_on_store(cfg.sae, store, recorded_layer, cfg.device, cfg.storage_options)
    meta = store.attrs.get("backbone", {})
    family, name = meta.get("family"), meta.get("name")
    if not family or not name or family not in ("open_clip", "timm", "hf"):
        raise ConfigError(f"{redact(store.url)} was not extracted from a backbone we can rebuild "
                          f"(backbone {family}:{name})")
    backbone = load_backbone(BackboneConfig(f"{family}:{name}", layers=(spec.name,), pretrained=meta.get("checkpoint"),
                                            init_seed=int(meta.get("init_seed", 0)))).to(cfg.device)
    rebuilt = backbone.layer_specs()[0]
    if (rebuilt.d, rebuilt.tokens) != (spec.d, spec.tokens):
        raise ConfigError(f"{family}:{name} layer {spec.name} makes {rebuilt.tokens.n_tokens} tokens of width "
                          f"{rebuilt.d}; the store recorded {spec.tokens.n_tokens} of width {spec.d}")
    tokens = norm.tokens if norm is not None and norm.tokens else "patches"
    mean = torch.from_numpy(store.stats(spec.name, tokens).mean.astype(np.float32))
    store.close()
    return _Setup(sae, norm, store.url, spec.name, tokens, backbone, mean)


def _images(cfg: EvaluateConfig, backbone: Backbone) -> tuple[Iterator[torch.Tensor], int, list[str], list[str]]:
    """Batches of preprocessed uint8 images, the number to evaluate, the rejected ones' reasons, the class names."""
    manifest = build_manifest(cfg.images, cfg.storage_options)
    uris = manifest.uris[:cfg.max_images]
    rejected: list[str] = []

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(uris), cfg.batch_size):
            chunk = uris[start:start + cfg.batch_size]
            pixels = []
            for uri, data in zip(chunk, read_bytes(chunk, cfg.storage_options)):
                decoded = decode_image(data) if isinstance(data, bytes) else None
                if decoded is None or decoded.image is None:
                    rejected.append(f"{uri}: {decoded.reason if decoded else data}")
                    continue
                pixels.append(backbone.preprocessor(decoded.image))
            if pixels:
                yield torch.stack(pixels)
    return batches(), len(uris), rejected, list(manifest.class_names)


def _class_names(cfg: EvaluateConfig, from_folder: list[str]) -> list[str]:
    if cfg.classes is None:
        return from_folder
    with fsspec.open(cfg.classes, "r", **cfg.storage_options) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ConfigError(f"{cfg.classes}: no class names in it")
    return names


class _Totals:
    """Per-pass sums over images of the embedding cosine, the KL and the top-1 agreement."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = {p: {"embedding_cosine": 0.0, "kl": 0.0, "top1_agreement": 0.0} for p in PASSES}

    def add(self, name: str, clean: tuple[torch.Tensor, torch.Tensor | None],
            other: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        s = self.sums[name]
        s["embedding_cosine"] += float(F.cosine_similarity(clean[0].double(), other[0].double(), dim=-1).sum())
        if clean[1] is not None:
            log_p, log_q = clean[1].double().log_softmax(-1), other[1].double().log_softmax(-1)
            s["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
            s["top1_agreement"] += float((clean[1].argmax(-1) == other[1].argmax(-1)).sum())

    def metric(self, key: str, has_classes: bool) -> dict[str, float | None]:
        if key != "embedding_cosine" and not has_classes or not self.n:
            return dict.fromkeys(PASSES)
        return {p: self.sums[p][key] / self.n for p in PASSES}


def _recovered(metric: dict[str, float | None], clean: float) -> float | None:
    ablated, spliced = metric["mean_ablation"], metric["spliced"]
    if ablated is None or spliced is None or abs(ablated - clean) < 1e-12:
        return None
    return (ablated - spliced) / (ablated - clean)


def _check_out(cfg: EvaluateConfig) -> None:
    """The JSON path is new, or an evaluate result that overwrite may replace; anything else is refused."""
    if cfg.json is None:
        return
    fs, path = filesystem(cfg.json, cfg.storage_options)
    if not fs.exists(path):
        return
    try:
        ours = json.loads(fs.cat_file(path)).get("format") == FORMAT
    except (ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{redact(cfg.json)} exists and is not an evaluate result; refusing to replace it")
    if not cfg.overwrite:
        raise ConfigError(f"{redact(cfg.json)}: an evaluate result exists; pass --overwrite to replace it")


def run_evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """Run the four passes over the images; returns the results (also written to cfg.json when given)."""
    _check_out(cfg)
    s = _setup(cfg)
    batches, n_images, rejected, folder_classes = _images(cfg, s.backbone)
    names = _class_names(cfg, folder_classes)
    head: ZeroShot | None = None
    head_name: str | None = None  # "model" (its own classifier), "zeroshot", or None: embeddings only

    def outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        embedding, logits = s.backbone.outputs(x)
        return embedding, logits if head is None else head(embedding)

    totals, stats = _Totals(), SpliceStats()
    with tqdm(total=n_images, desc="evaluate", unit="img", disable=not progress) as bar:
        for x in batches:
            x = x.to(cfg.device)
            clean = outputs(x)
            if not totals.n:  # the first batch tells whether the model has a classifier of its own
                if clean[1] is not None:
                    head_name = "model"
                elif names:
                    head, head_name = zero_shot_classifier(s.backbone.cfg, names, cfg.template), "zeroshot"
                    clean = (clean[0], head(clean[0]))
            with splice(s.backbone, s.sae, s.norm, layer=s.layer, tokens=s.tokens, mode="replace", stats=stats):
                totals.add("spliced", clean, outputs(x))
            with ablate(s.backbone, layer=s.layer, tokens=s.tokens):
                totals.add("zero_ablation", clean, outputs(x))
            with ablate(s.backbone, layer=s.layer, tokens=s.tokens, value=s.mean):
                totals.add("mean_ablation", clean, outputs(x))
            totals.n += x.shape[0]
            bar.update(x.shape[0])
    if not totals.n:
        raise ConfigError(f"{cfg.images}: no image could be decoded ({len(rejected)} rejected)")
    has_classes = head_name is not None
    cosine, kl = totals.metric("embedding_cosine", True), totals.metric("kl", has_classes)
    result = {
        "format": FORMAT, "n_images": totals.n, "n_rejected": len(rejected), "rejected": rejected[:20],
        "fvu": stats.fvu, "l0": stats.l0,
        "embedding_cosine": cosine, "kl": kl, "top1_agreement": totals.metric("top1_agreement", has_classes),
        "recovered": {"embedding_cosine": _recovered(cosine, 1.0), "kl": _recovered(kl, 0.0)},
        "head": head_name, "n_classes": len(names) if head_name == "zeroshot" else None,
        "backbone": s.backbone.cfg.model, "layer": s.layer, "tokens": s.tokens, "sae_kind": s.sae.cfg.kind,
        "d_sae": s.sae.cfg.d_sae, "store": redact(s.store_url), "config": public_config(cfg),
    }
    if cfg.json is not None:
        fs, path = filesystem(cfg.json, cfg.storage_options)
        put_bytes(fs, path, json.dumps(result, indent=2).encode())
    return result
