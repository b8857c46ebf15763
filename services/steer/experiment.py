"""Causal checks of SAE features through steering: suppress the features most associated with a label and see
whether a probe's predictions for that label fall more than when as many random live features are suppressed.

    association(steerer, member)     per feature: mean activation on the member tokens minus on the others
    segmentation_suppression(...)    per segmentation class: the IoU and mIoU of a segmentation probe, clean, with
                                     the class's top features set to 0 on its patches, and with random live ones

Associations come from the SAE on the store's own tokens (every stored patch of the SAE's layer), the labels from
the store's per-patch `labels` (segmentation) or any per-image labels (e.g. a colour column).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.errors import ConfigError
from actstore.store import ok_mask
from sae.edits import FeatureEdit
from services.steer.heads import SegHead
from services.steer.run import Steerer

__all__ = ["ClassRow", "association", "patch_latents", "segmentation_suppression", "top_features"]


def patch_latents(steerer: Steerer, block_images: int = 64) -> torch.Tensor:
    """(n_images, n_patches, d_sae) dense latents of the SAE on every stored patch token of its layer (zeros for
    rejected images)."""
    m, layout = steerer.model, steerer.layout
    encoder = m.encoder("patches")
    out = torch.zeros(steerer.images.num_rows, layout.n_patches, m.sae.cfg.d_sae)
    for start, block in steerer.store.blocks(m.layer, block_images):
        acts = encoder.block(block)
        dense = acts.to_dense() if hasattr(acts, "to_dense") else acts
        out[start:start + block.shape[0]] = dense.float().cpu().reshape(block.shape[0], layout.n_patches, -1)
    return out


def association(latents: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """(d_sae,) mean activation over the member rows minus over the others; `latents` (rows, d_sae), `member`
    (rows,) bool."""
    if not member.any() or member.all():
        raise ConfigError("association needs member and non-member tokens")
    return latents[member].mean(0) - latents[~member].mean(0)


def top_features(score: torch.Tensor, m: int) -> list[int]:
    return [int(f) for f in score.topk(m).indices]


@dataclass(frozen=True)
class ClassRow:
    """One class of the segmentation experiment (IoU of the class itself, mIoU over the classes in the labels of the
    images that contain it)."""

    name: str
    label: int
    images: int
    patches: int
    features: list[int]
    iou_clean: float
    iou_top: float
    iou_random: float
    miou_clean: float
    miou_top: float
    miou_random: float

    @property
    def drop_top(self) -> float:
        return self.iou_clean - self.iou_top

    @property
    def drop_random(self) -> float:
        return self.iou_clean - self.iou_random

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "drop_top": self.drop_top, "drop_random": self.drop_random}


def _confusion(pred: np.ndarray, true: np.ndarray, n: int, ignore: int) -> np.ndarray:
    keep = true != ignore
    return np.bincount(true[keep] * n + pred[keep], minlength=n * n).reshape(n, n)


def _iou(confusion: np.ndarray) -> np.ndarray:
    """Per class IoU (nan where the class is neither true nor predicted)."""
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def segmentation_suppression(steerer: Steerer, head: SegHead, *, n_features: int = 8, n_random: int = 3,
                             seed: int = 0, max_images: int | None = None, ignore_index: int = 255,
                             classes: Sequence[int] | None = None, progress: bool = True) -> list[ClassRow]:
    """Per class (present in the store's labels): the segmentation head on the images containing it, clean, with its
    `n_features` most associated features set to 0 on its patches, and with as many random live features (mean over
    `n_random` draws) set to 0 on the same patches."""
    labels = steerer.store.labels()
    if labels is None:
        raise ConfigError("the segmentation experiment needs a store with per-patch labels (extract --masks)")
    ok = ok_mask(steerer.images)
    latents = patch_latents(steerer)
    flat, flat_labels = latents[ok].reshape(-1, latents.shape[-1]), torch.from_numpy(labels[ok].reshape(-1))
    live = torch.nonzero(flat.amax(0) > 0).flatten()
    rng = np.random.default_rng(seed)
    n_classes = len(head.classes)
    present = sorted(int(c) for c in np.unique(labels[ok]) if c != ignore_index and c < n_classes)
    rows = []
    for c in (present if classes is None else classes):
        top = top_features(association(flat, flat_labels == c), n_features)
        images = [int(i) for i in np.flatnonzero(ok & (labels == c).any(1))][:max_images]
        others = live[~torch.isin(live, torch.tensor(top))].numpy()
        draws = [[int(f) for f in rng.choice(others, n_features, replace=False)] for _ in range(n_random)]
        conf = {"clean": 0, "top": 0, "random": 0}
        for i in tqdm(images, desc=f"class {head.classes[c]}", disable=not progress):
            x = steerer.image(i)
            where = tuple(int(p) for p in np.flatnonzero(labels[i] == c))
            true = labels[i]

            def predict(features: list[int] | None) -> np.ndarray:
                edits = [] if features is None else [FeatureEdit(f, "set", 0.0, where) for f in features]
                out = steerer.steer(x, edits, head)["after"]
                return np.asarray(out["mask"]).reshape(-1)
            conf["clean"] = conf["clean"] + _confusion(predict(None), true, n_classes, ignore_index)
            conf["top"] = conf["top"] + _confusion(predict(top), true, n_classes, ignore_index)
            conf["random"] = conf["random"] + sum(_confusion(predict(d), true, n_classes, ignore_index)
                                                  for d in draws) / n_random
        iou = {k: _iou(v) for k, v in conf.items()}
        truth = conf["clean"].sum(1) > 0  # mIoU over the classes in these images' labels (the same for every run)
        rows.append(ClassRow(head.classes[c], c, len(images), int((labels[images] == c).sum()), top,
                             float(iou["clean"][c]), float(iou["top"][c]), float(iou["random"][c]),
                             *(float(np.nan_to_num(iou[k][truth]).mean()) for k in ("clean", "top", "random"))))
    return rows
