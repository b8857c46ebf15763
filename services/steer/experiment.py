"""Causal checks of SAE features through steering: suppress the features most associated with a label and see
whether a probe's predictions for that label fall more than when as many random live features are suppressed.

    association(steerer, labels, classes)   per class: each feature's mean activation on the class's tokens minus on
                                            the others' (Associations.score), and the live features
    segmentation_suppression(...)           per segmentation class: the IoU and mIoU of a segmentation probe, clean,
                                            with the class's top features set to 0 on its patches, and with random
                                            live ones

Associations come from the SAE on the store's own tokens (every stored patch of the SAE's layer, ok images only),
the labels from the store's per-patch `labels` (segmentation) or any per-image labels (e.g. a colour column). They
stream: one pass over the store, block by block, folds the SAE's positive entries (sae.positive_entries) into
per-class sums of each feature, so nothing of size images x patches x features exists; the blocks follow the memory
budget (`memory_gb`) and the widths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget
from actstore.errors import ConfigError
from actstore.store import ok_mask, torch_dtype
from sae import positive_entries
from sae.edits import FeatureEdit
from sae.tokens import BLOCK_TOKENS
from services.steer.heads import SegHead
from services.steer.run import Steerer

__all__ = ["Associations", "ClassRow", "association", "segmentation_suppression", "top_features"]

COMMAND = "steering experiment"


@dataclass(frozen=True)
class Associations:
    """Per feature, its activation summed over the counted tokens of each listed class and over those of no listed
    class, with the token counts: what `score` compares."""

    classes: tuple[int, ...]
    sums: torch.Tensor
    """(len(classes) + 1, d_sae) float64: activation sums per class; the last row: tokens of no listed class."""
    counts: np.ndarray
    """(len(classes) + 1,) int64: tokens per row of `sums`."""
    live: torch.Tensor
    """The features positive on some counted token, ascending."""

    def score(self, label: int) -> torch.Tensor:
        """(d_sae,) float32: mean activation over the class's tokens minus over the other counted tokens."""
        if label not in self.classes:
            raise ConfigError(f"association: class {label} was not among those summed ({list(self.classes)})")
        k = self.classes.index(label)
        n, rest = int(self.counts[k]), int(self.counts.sum() - self.counts[k])
        if n == 0 or rest == 0:
            raise ConfigError("association needs member and non-member tokens")
        return (self.sums[k] / n - (self.sums.sum(0) - self.sums[k]) / rest).float()


def _token_labels(steerer: Steerer, labels: np.ndarray | None, ok: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(stop - start, n_patches) int64: the class of each patch of images [start, stop), -1 where not counted (a
    rejected image, a negative label): `labels` per image, broadcast to its patches, or the store's per-patch ones."""
    if labels is None:
        t = steerer.store.labels(start, stop).astype(np.int64)
    else:
        t = np.repeat(labels[start:stop, None].astype(np.int64), steerer.layout.n_patches, 1)
    t[(t < 0) | ~ok[start:stop, None]] = -1
    return t


def _label_blocks(steerer: Steerer, labels: np.ndarray | None, ok: np.ndarray,
                  budget: MemoryBudget) -> Iterator[tuple[int, np.ndarray]]:
    """(first image, token labels) of consecutive blocks, as many images each as the budget holds (labels only)."""
    n, p = len(ok), steerer.layout.n_patches
    size = budget.rows(COMMAND, fixed=0, per_row=24 * p, row="image", at_most=min(n, max(1, BLOCK_TOKENS // p)))
    for start in range(0, n, size):
        yield start, _token_labels(steerer, labels, ok, start, min(n, start + size))


def _images_per_block(steerer: Steerer, budget: MemoryBudget, n_sums: int) -> int:
    """Images encoded and folded at once: as many as the budget holds beside the SAE and the sums (up to what is
    worth encoding at once, TokenEncoder.most_images): each image's patches through the encoder
    (TokenEncoder.token_bytes), its tokens six times in the store's dtype (the block, the two read ahead, the
    reader's buffers), its labels."""
    encoder, store, p = steerer.model.encoder("patches"), steerer.store, steerer.layout.n_patches
    d_sae = encoder.sae.cfg.d_sae
    raw_image = steerer.layout.n_tokens * encoder.spec.d * torch_dtype(store.spec.dtype).itemsize
    fixed = encoder.weight_bytes() + n_sums * d_sae * 8 + d_sae
    return budget.rows(COMMAND, fixed=fixed, per_row=p * (encoder.token_bytes() + 32) + 6 * raw_image, row="image",
                       at_most=min(store.n_images, encoder.most_images()))


def association(steerer: Steerer, labels: np.ndarray | None = None, classes: Sequence[int] | None = None, *,
                memory_gb: float | None = None, progress: bool = False) -> Associations:
    """Per-class sums of every feature's activation over the ok images' stored patch tokens, in one pass over the
    store (see the module docstring). `labels`: a class per image (n_images,), which each of its patches takes
    (< 0: the image is left out); None: the store's per-patch labels. `classes`: those to keep sums for (default:
    every class found); the tokens of the others count as non-members of each."""
    ok = ok_mask(steerer.images)
    if labels is None and not steerer.store.spec.has_labels:
        raise ConfigError("association: the store has no per-patch labels (extract --masks); pass a label per image")
    if labels is not None and len(labels) != len(ok):
        raise ConfigError(f"association: {len(labels)} labels for {len(ok)} images (one per store image)")
    budget = MemoryBudget.of(memory_gb)
    if classes is None:
        found = [np.unique(t[t >= 0]) for _, t in _label_blocks(steerer, labels, ok, budget)]
        classes = np.unique(np.concatenate(found)).tolist()
    keys = np.asarray(sorted(int(c) for c in classes), dtype=np.int64)
    if keys.size == 0:
        raise ConfigError("association: no class to sum (no labelled token, or an empty list of classes)")
    m = steerer.model
    encoder, d_sae = m.encoder("patches"), m.sae.cfg.d_sae
    sums = torch.zeros((len(keys) + 1) * d_sae, dtype=torch.float64)
    counts = np.zeros(len(keys) + 1, dtype=np.int64)
    live = torch.zeros(d_sae, dtype=torch.bool)
    images = _images_per_block(steerer, budget, len(keys) + 1)
    with torch.inference_mode(), tqdm(total=len(ok), desc="association", unit="img", disable=not progress) as bar:
        for start, x in steerer.store.blocks(m.layer, images, whole_chunks=True):
            t = _token_labels(steerer, labels, ok, start, start + x.shape[0]).reshape(-1)
            at = np.minimum(np.searchsorted(keys, t), len(keys) - 1)
            slot = np.where(t < 0, -1, np.where(keys[at] == t, at, len(keys)))  # the last row: no listed class
            counts += np.bincount(slot[slot >= 0], minlength=len(keys) + 1)
            rows, feats, vals = (v.cpu() for v in positive_entries(encoder.block(x)))
            token_slot = torch.from_numpy(slot)[rows]
            keep = token_slot >= 0
            feats = feats[keep]
            sums.index_add_(0, token_slot[keep] * d_sae + feats, vals[keep].double())
            live[feats] = True
            bar.update(x.shape[0])
    return Associations(tuple(int(c) for c in keys), sums.reshape(len(keys) + 1, d_sae), counts,
                        torch.nonzero(live).flatten())


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


def _images_by_class(steerer: Steerer, ok: np.ndarray, budget: MemoryBudget, max_images: int | None
                     ) -> dict[int, list[int]]:
    """{class: the ok images whose per-patch labels hold it (the first max_images)}, from one pass over the labels."""
    found: dict[int, list[int]] = {}
    for start, t in _label_blocks(steerer, None, ok, budget):
        for c in np.unique(t[t >= 0]):
            have = found.setdefault(int(c), [])
            if max_images is None or len(have) < max_images:
                have.extend(int(i) + start for i in np.flatnonzero((t == c).any(1)))
    return {c: have[:max_images] for c, have in found.items()}


def segmentation_suppression(steerer: Steerer, head: SegHead, *, n_features: int = 8, n_random: int = 3,
                             seed: int = 0, max_images: int | None = None, ignore_index: int = 255,
                             classes: Sequence[int] | None = None, memory_gb: float | None = None,
                             progress: bool = True) -> list[ClassRow]:
    """Per class (present in the store's labels): the segmentation head on the images containing it, clean, with its
    `n_features` most associated features set to 0 on its patches, and with as many random live features (mean over
    `n_random` draws) set to 0 on the same patches. `memory_gb` bounds the passes over the store (default: half of
    this machine's memory)."""
    if not steerer.store.spec.has_labels:
        raise ConfigError("the segmentation experiment needs a store with per-patch labels (extract --masks)")
    ok, budget, n_classes = ok_mask(steerer.images), MemoryBudget.of(memory_gb), len(head.classes)
    images_of = _images_by_class(steerer, ok, budget, max_images)
    present = sorted(c for c in images_of if c != ignore_index and c < n_classes)
    classes = present if classes is None else [int(c) for c in classes]
    assoc = association(steerer, classes=classes, memory_gb=memory_gb, progress=progress)
    rng = np.random.default_rng(seed)
    rows = []
    for c in classes:
        top = top_features(assoc.score(c), n_features)
        images = images_of.get(c, [])
        others = assoc.live[~torch.isin(assoc.live, torch.tensor(top))].numpy()
        draws = [[int(f) for f in rng.choice(others, n_features, replace=False)] for _ in range(n_random)]
        conf = {"clean": 0, "top": 0, "random": 0}
        patches = 0
        for i in tqdm(images, desc=f"class {head.classes[c]}", disable=not progress):
            x = steerer.image(i)
            true = steerer.store.labels(i, i + 1)[0].astype(np.int64)
            where = tuple(int(p) for p in np.flatnonzero(true == c))
            patches += len(where)

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
        rows.append(ClassRow(head.classes[c], c, len(images), patches, top,
                             float(iou["clean"][c]), float(iou["top"][c]), float(iou["random"][c]),
                             *(float(np.nan_to_num(iou[k][truth]).mean()) for k in ("clean", "top", "random"))))
    return rows
