"""`actstore probe`: a linear probe on one layer of a store, what a concept looks like linearly in its tokens.

    cls   one row per image: its CLS token (the mean of its patches where the layer has none); targets are the
          images' labels (images.parquet's label or one of the store's label columns, or a column of a table with one
          row per image in store order)
    seg   one row per patch token; targets are the store's per-patch labels (ignore_index left out)

Images are split into training and held-out ones by a seeded permutation (never by patch: patches of one
image are not independent; services.probe.rows). Everything streams, block by block in store order, with blocks
sized by the memory budget (--memory-gb) and the widths: a pass over the labels finds the usable rows and the
classes, a second gathers the training rows' targets (at most max_rows, a seeded sample); then two passes over
the activations: the first gathers the training rows, whose mean and std standardize the inputs and on which a
multinomial logistic regression is fit (full-batch L-BFGS, L2 penalty); the second runs the trained probe, exactly
as `load_probe` gives it, on the held-out images' rows. The block size changes no number: the same rows are chosen
and folded in the same order. The training rows are held whole for the fit, so max_rows x d must fit the budget.

Metrics: held-out accuracy (patch accuracy for seg; plus per-class IoU and their mean over the classes present in
the held-out patches), against chance: the accuracy of always answering the training split's most frequent class.
Rejected images take no part.
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
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget, format_bytes
from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import check_output
from actstore.store import ActivationStore, LayerSpec, filesystem, put_bytes, torch_dtype
from services.probe.model import (FORMAT, FORMAT_VERSION, META, POOLS, TASKS, WEIGHTS, Probe, probe_inputs,
                                  read_probe_meta)
from services.probe.rows import IMAGE_ARRAY_BYTES, Split, Targets, check_classes

__all__ = ["ProbeConfig", "train_probe"]

MIN_STD = 1e-6
"""Input dimensions whose training std is below this are centred, not scaled (a constant one would blow up)."""
BLOCK_BYTES = 8 << 20
"""A block's stored tokens (or labels) in bytes, about, whatever the budget (which is a ceiling, not a target): a
larger block reads no faster, and the store's read path holds a few times a block."""


@dataclass(frozen=True)
class ProbeConfig:
    """What `actstore probe` trains on which store, and where it writes it."""

    store: str
    """Activation store URL (local or any fsspec URL)."""
    task: str = field(metadata={"choices": TASKS})
    """cls: a linear classifier on each image's CLS token (the mean of its patches where the layer has none);
    seg: a linear head on every patch token, trained on the store's per-patch labels."""
    out: str
    """Probe folder (probe.safetensors, then probe.json), local or any fsspec URL."""
    layer: str | int | None = None
    """Store layer (name or block index); default the store's first."""
    pool: str | None = field(default=None, metadata={"choices": POOLS})
    """cls only: the image's row, its CLS token ("cls", the default where the layer has one) or the mean of its
    patches ("mean": what patch edits reach directly)."""
    labels: str | None = None
    """cls only: a table (.parquet or .csv) with one row per store image, in store order, whose label_column
    replaces the store's image labels."""
    label_column: str = "label"
    """cls only: the column of `labels` to use, or without `labels` one of the store's own label columns (e.g.
    family, in a store whose extraction declared taxonomy levels); "label" without `labels` is the images' label
    with the dataset's class names. Strings are class names (numbered in sorted order; empty: no label), integers
    are class indices (< 0: no label)."""
    holdout: float = 0.2
    """Fraction of the usable images held out for the metrics (a seeded split by image, never by patch)."""
    steps: int = 100
    """L-BFGS iterations (full batch)."""
    lr: float = 1.0
    """L-BFGS step size (with a strong-Wolfe line search)."""
    weight_decay: float = 1e-3
    """L2 penalty: this times the squared sum of the weights, added to the mean cross-entropy."""
    max_rows: int = 200_000
    """Training rows (images for cls, patches for seg) kept at most, a seeded sample of the training split's:
    bounds memory and time. They are held whole for the fit: a budget (--memory-gb) that cannot hold them is
    refused, with the largest max_rows it holds (never a smaller sample behind your back)."""
    memory_gb: float | None = None
    """Working memory of the pass, in GB: block sizes follow from it and the widths (default: half of this
    machine's memory)."""
    seed: int = 0
    """Seeds the split and the row sample."""
    ignore_index: int = 255
    """seg: the patch label left out of training and metrics."""
    overwrite: bool = False
    """Replace an existing probe at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store, the labels table and `out`."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"probe: task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"probe: pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.task == "seg" and self.pool is not None:
            raise ConfigError("probe: --pool is for cls probes; seg probes read every patch")
        if self.task == "seg" and (self.labels is not None or self.label_column != "label"):
            raise ConfigError(f"probe: {'--labels' if self.labels is not None else '--label-column'} is for cls "
                              "probes; seg probes use the store's per-patch labels")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"probe: holdout must lie in (0, 1), got {self.holdout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"probe: need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        check_at_least(self, "probe", {"steps": 1, "max_rows": 1})
        MemoryBudget.of(self.memory_gb)  # > 0


# the passes -----------------------------------------------------------------------------------------

def _image_bytes(store: ActivationStore, spec: LayerSpec, targets: Targets, n_classes: int) -> int:
    """Working bytes of one image in a pass over the activations, as measured (peak RSS of a pass, width 384): its
    tokens six times in the store's dtype (the block, the two read ahead, the reader's decode buffers) and twice in
    float32 (probe_inputs' copy, the allocator's churn), its rows twice in float32 (gathered, or standardized), their
    logits and their targets."""
    t, d, rows = spec.tokens.n_tokens, spec.d, targets.per_image
    return (t * d * (6 * torch_dtype(store.spec.dtype).itemsize + 8) + rows * (8 * d + 8 * n_classes)
            + targets.bytes_per_image)


def _row_bytes(d: int, n_classes: int) -> int:
    """Working bytes of one training row held for the fit: its float32 inputs, its target and sample number, and
    the fit's (rows, classes) float32 buffers (logits, probabilities, their gradients)."""
    return 4 * d + 16 + 16 * n_classes


def _block_images(budget: MemoryBudget, store: ActivationStore, *, fixed: int, per_image: int, stored: int) -> int:
    """Images per block: as many as the budget holds beside `fixed` bytes, at `per_image` working bytes each, but
    no more than about BLOCK_BYTES of `stored` bytes (what an image reads) nor fewer than a store chunk where the
    budget holds one; whole store chunks where it does."""
    per_chunk = store.spec.images_per_chunk
    images = budget.rows("probe", fixed=fixed, per_row=per_image, row="image",
                         at_most=min(store.n_images, max(per_chunk, BLOCK_BYTES // stored)))
    return per_chunk * (images // per_chunk) if images >= per_chunk else images


def _images_per_block(budget: MemoryBudget, store: ActivationStore, spec: LayerSpec, targets: Targets,
                      split: Split, n_classes: int) -> int:
    """Images per block of the passes over the activations, beside the training rows held for the fit. Training
    rows that do not fit are refused, with the largest max_rows that does."""
    arrays, per_image = IMAGE_ARRAY_BYTES * store.n_images, _image_bytes(store, spec, targets, n_classes)
    n_rows, per_row = split.n_train_rows, _row_bytes(spec.d, n_classes)
    fits = budget.rows("probe", fixed=arrays + per_image, per_row=per_row, row="training row")
    if fits < n_rows:
        raise ConfigError(f"probe: {n_rows} training rows of width {spec.d} need {format_bytes(n_rows * per_row)}, "
                          f"more than --memory-gb {budget.gb:g} holds beside one image; pass --max-rows {fits} "
                          "or a larger --memory-gb")
    stored = spec.tokens.n_tokens * spec.d * torch_dtype(store.spec.dtype).itemsize
    return _block_images(budget, store, fixed=arrays + n_rows * per_row, per_image=per_image, stored=stored)


def _blocks(store: ActivationStore, spec: LayerSpec, targets: Targets, images: int, desc: str,
            progress: bool) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
    """(first image, raw tokens, targets) of consecutive blocks of `images` images, in store order, with a
    progress bar."""
    with tqdm(total=store.n_images, desc=desc, unit="img", disable=not progress) as bar:
        for start, x in store.blocks(spec.name, images):
            yield start, x, targets.block(start, start + x.shape[0])
            bar.update(x.shape[0])


def _gather(store: ActivationStore, spec: LayerSpec, cfg: ProbeConfig, targets: Targets, split: Split, images: int,
            progress: bool) -> torch.Tensor:
    """The probe inputs of the training rows (n_rows, d) float32, in row-major (image, row) order."""
    x_train = torch.empty((split.n_train_rows, spec.d), dtype=torch.float32)
    pos = 0
    for start, x, t in _blocks(store, spec, targets, images, "probe: training rows", progress):
        keep = torch.from_numpy(split.masks(start, t)[0])
        rows = probe_inputs(x, spec.tokens, cfg.task, _pool(cfg, spec)).reshape(x.shape[0], keep.shape[1], spec.d)[keep]
        x_train[pos:pos + rows.shape[0]] = rows
        pos += rows.shape[0]
    return x_train


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardized rows: weight (C, d), bias (C,)."""
    w = torch.zeros((n_classes, x.shape[1]), requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=cfg.lr, max_iter=cfg.steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + cfg.weight_decay * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _confusion(store: ActivationStore, spec: LayerSpec, probe: Probe, targets: Targets, split: Split, images: int,
               progress: bool) -> np.ndarray:
    """(true, predicted) counts of the held-out rows, the probe run as load_probe gives it."""
    c = probe.n_classes
    counts = np.zeros(c * c, dtype=np.int64)
    with torch.inference_mode():
        for start, x, t in _blocks(store, spec, targets, images, "probe: held-out rows", progress):
            keep = split.masks(start, t)[1]
            if keep.any():
                pred = probe.logits(x).reshape(len(t), keep.shape[1], c)[torch.from_numpy(keep)].argmax(-1).numpy()
                counts += np.bincount(t[keep] * c + pred, minlength=c * c)
    return counts.reshape(c, c)


def _metrics(confusion: np.ndarray, majority: int, task: str, names: list[str]) -> dict[str, Any]:
    """Held-out accuracy and chance (always the training split's majority class); seg adds per-class IoU of
    the classes present in the held-out rows and their mean."""
    total = int(confusion.sum())
    m: dict[str, Any] = {"accuracy": float(np.trace(confusion) / total),
                         "chance": float(confusion[majority].sum() / total), "majority_class": names[majority]}
    if task == "seg":
        hits = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - hits
        iou = {names[k]: float(hits[k] / union[k]) for k in np.flatnonzero(confusion.sum(1))}
        m.update(iou=iou, miou=float(np.mean(list(iou.values()))))
    return m


# the folder ----------------------------------------------------------------------------------------

def _check_out(cfg: ProbeConfig) -> None:
    """`out` is new, empty, or a probe folder that overwrite may replace (one left without its probe.json by an
    interrupted run holds no probe: a rerun needs no overwrite); anything else is refused, untouched."""
    fs, root = filesystem(cfg.out, cfg.storage_options)
    complete = fs.isdir(root) and read_probe_meta(cfg.out, cfg.storage_options) is not None

    def is_probe_folder(fs: fsspec.AbstractFileSystem, root: str) -> bool:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.isdir(root) else {""}
        return names <= {META, WEIGHTS} and (complete or META not in names)

    check_output(cfg.out, "a probe", is_probe_folder, cfg.overwrite or not complete, cfg.storage_options)


def _write(cfg: ProbeConfig, probe: Probe, meta: dict[str, Any]) -> None:
    """probe.safetensors, then probe.json (its presence means complete; an old one goes first)."""
    fs, root = filesystem(cfg.out, cfg.storage_options)
    if fs.exists(f"{root}/{META}"):
        fs.rm_file(f"{root}/{META}")
    tensors = {name: getattr(probe, name).contiguous() for name in ("weight", "bias", "mean", "std")}
    put_bytes(fs, f"{root}/{WEIGHTS}", st_save(tensors, metadata={"format": "pt"}))
    put_bytes(fs, f"{root}/{META}", json.dumps(meta, indent=1).encode())


def _pool(cfg: ProbeConfig, spec: LayerSpec) -> str | None:
    if cfg.task == "seg":
        return None
    if cfg.pool == "cls" and not spec.tokens.cls:
        raise ConfigError(f"probe: layer {spec.name} has no CLS token; use --pool mean")
    return cfg.pool or ("cls" if spec.tokens.cls else "mean")


def train_probe(cfg: ProbeConfig, progress: bool = True) -> dict[str, Any]:
    """Train the probe, measure it on the held-out images and write its folder; returns probe.json's content."""
    _check_out(cfg)
    budget = MemoryBudget.of(cfg.memory_gb)
    with ActivationStore(cfg.store, cfg.storage_options) as store:
        spec = store.layer(cfg.layer) if cfg.layer is not None else store.layers[0]
        pool = _pool(cfg, spec)
        targets = Targets(cfg, store, spec)
        label_images = _block_images(budget, store, fixed=IMAGE_ARRAY_BYTES * store.n_images,
                                     per_image=targets.bytes_per_image, stored=targets.bytes_per_image)
        counts, present = targets.survey(label_images)
        names = targets.class_names(present)
        split = Split.of(counts, cfg)
        images = _images_per_block(budget, store, spec, targets, split, len(names))
        y = np.concatenate([t[split.masks(start, t)[0]] for start, t in targets.blocks(label_images)])
        check_classes(y)
        x = _gather(store, spec, cfg, targets, split, images, progress)
        var, mean = torch.var_mean(x, 0, correction=0)
        std = torch.where(var.sqrt() > MIN_STD, var.sqrt(), 1.0)
        x.sub_(mean).div_(std)  # = standardize(x, mean, std), in place
        weight, bias = _fit(x, torch.from_numpy(y), len(names), cfg)
        del x
        probe = Probe(task=cfg.task, layer=spec.name, layout=spec.tokens, class_names=tuple(names),
                      ignore_index=cfg.ignore_index, weight=weight, bias=bias, mean=mean, std=std, pool=pool)
        confusion = _confusion(store, spec, probe, targets, split, images, progress)
        backbone = store.attrs.get("backbone", {})
        n_train, n_test = split.n_images()
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "task": cfg.task, "layer": spec.name,
            "store": redact(store.url), "backbone": {k: backbone.get(k) for k in ("family", "name")},
            "pool": probe.pool, "layout": spec.tokens.to_dict(), "d": spec.d, "class_names": names,
            "label_column": cfg.label_column if cfg.task == "cls" else None,  # of config.labels, or the store's
            "ignore_index": cfg.ignore_index, "n_train": n_train, "n_test": n_test,
            "n_train_rows": split.n_train_rows, "n_test_rows": split.n_test_rows,
            "metrics": _metrics(confusion, int(np.bincount(y).argmax()), cfg.task, names),
            "config": public_config(cfg),
        }
    _write(cfg, probe, meta)
    return meta
