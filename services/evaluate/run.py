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

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone
from actstore.extract.sources import build_manifest
from actstore.extract.zeroshot import DEFAULT_TEMPLATE, ZeroShot, zero_shot_classifier
from sae.splice import SpliceStats, ablate, splice
from services.results import check_result_path, write_result
from services.spliced import decode_images, load_in_model

__all__ = ["FORMAT", "PASSES", "EvaluateConfig", "run_evaluate"]

log = logging.getLogger(__name__)

FORMAT = "actstore-evaluate"
PASSES = ("spliced", "zero_ablation", "mean_ablation")


@dataclass(frozen=True)
class EvaluateConfig:
    """What `actstore evaluate` runs: an SAE spliced into its backbone over a set of images."""

    sae: str
    """SAE folder (cfg.json + sae.safetensors), e.g. a training run's <out>/<name>."""
    images: str
    """Any dataset `actstore extract --images` reads (a folder, a list, parquet files, tar shards); any images, not
    only the store's."""
    json: str | None = None
    """Write the results here (a JSON file; an existing one is replaced only if it is an evaluate result and
    overwrite is set)."""
    store: str | None = None
    """The store the SAE was trained on (its backbone, weights, layer and mean); default the one the SAE records."""
    layer: str | None = None
    """The store's layer the SAE reads; default the one it records. Another library's SAE that names no model we can
    map needs it (its layer is then checked, its model not)."""
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
    fidelity_check: bool = True
    """Run a few of the store's images through the rebuilt backbone first and refuse to go on unless it makes the
    stored activations (--no-fidelity-check skips it; the result then says so)."""
    overwrite: bool = False
    """Replace an existing evaluate result at `json`."""
    trust_remote_code: bool = False
    """Run the modeling code an hf: model ships (auto_map in its config.json: actstore.extract.remote_vlm); the store
    never records it, so each command that loads such a model needs it."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the SAE, the store and the images."""

    def __post_init__(self) -> None:
        check_at_least(self, "evaluate", {"batch_size": 1, **({"max_images": 1} if self.max_images is not None
                                                                else {})})


def _images(cfg: EvaluateConfig, backbone: Backbone) -> tuple[Iterator[torch.Tensor], int, list[str], list[str]]:
    """Batches of preprocessed uint8 images, the number to evaluate, the rejected ones' reasons, the class names."""
    manifest = build_manifest(cfg.images, cfg.storage_options)
    uris = manifest.uris[:cfg.max_images]
    rejected: list[str] = []

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(uris), cfg.batch_size):
            pixels, bad = decode_images(backbone, uris[start:start + cfg.batch_size], cfg.storage_options)
            rejected.extend(bad)
            if pixels is not None:
                yield pixels
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


def run_evaluate(cfg: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """Run the four passes over the images; returns the results (also written to cfg.json when given)."""
    check_result_path(cfg.json, FORMAT, "an evaluate result", cfg.overwrite, cfg.storage_options)
    s = load_in_model(cfg.sae, cfg.store, cfg.device, cfg.storage_options, cfg.fidelity_check, cfg.layer,
                      cfg.trust_remote_code)
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
                    try:
                        head, head_name = zero_shot_classifier(s.backbone.cfg, names, cfg.template), "zeroshot"
                        clean = (clean[0], head(clean[0]))
                    except ConfigError as e:  # no text tower (a VLM's, DINOv2): no class metrics, unless asked
                        if cfg.classes:
                            raise
                        log.warning("evaluate: no class metrics (the folder's classes need a zero-shot head): %s", e)
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
        "d_sae": s.sae.cfg.d_sae, "store": redact(s.store_url), "fidelity": s.fidelity.to_dict(),
        "config": public_config(cfg),
    }
    if cfg.json is not None:
        write_result(cfg.json, result, cfg.storage_options)
    return result
