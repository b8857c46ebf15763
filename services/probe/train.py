"""`actstore probe`: a linear probe on one layer of a store, what a concept looks like linearly in its tokens.

    cls   one row per image: its CLS token (the mean of its patches where the layer has none); targets are the
          images' labels (images.parquet, or a column of a table with one row per image in store order)
    seg   one row per patch token; targets are the store's per-patch labels (ignore_index left out)

Images are split into training and held-out ones by a seeded permutation (never by patch: patches of one
image are not independent). Two ordered passes over the store: the first gathers the training rows (at most
max_rows, a seeded sample), whose mean and std standardize the inputs and on which a multinomial logistic
regression is fit (full-batch L-BFGS, L2 penalty); the second runs the trained probe, exactly as `load_probe`
gives it, on the held-out images' rows. Metrics: held-out accuracy (patch accuracy for seg; plus per-class
IoU and their mean over the classes present in the held-out patches), against chance: the accuracy of
always answering the training split's most frequent class. Rejected images take no part.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import check_output
from actstore.store import ActivationStore, LayerSpec, filesystem, ok_mask, put_bytes
from services.probe.model import (FORMAT, FORMAT_VERSION, META, POOLS, TASKS, WEIGHTS, Probe, probe_inputs,
                                  read_probe_meta)

__all__ = ["ProbeConfig", "split_rows", "train_probe"]

MIN_STD = 1e-6
"""Input dimensions whose training std is below this are centred, not scaled (a constant one would blow up)."""


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
    """Column of `labels` to use: strings are class names (numbered in sorted order; empty: no label), integers
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
    bounds memory and time."""
    batch_size: int = 256
    """Images read from the store at once."""
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
        if self.task == "seg" and self.labels is not None:
            raise ConfigError("probe: --labels is for cls probes; seg probes use the store's per-patch labels")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"probe: holdout must lie in (0, 1), got {self.holdout}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"probe: need lr > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        check_at_least(self, "probe", {"steps": 1, "max_rows": 1, "batch_size": 1})


# targets ---------------------------------------------------------------------------------------------

def _table_labels(cfg: ProbeConfig, n_images: int) -> tuple[np.ndarray, list[str]]:
    """(label per image, class names) from cfg.labels' column; -1 where an image has none."""
    path, shown = str(cfg.labels), redact(str(cfg.labels))
    kind = path.rsplit(".", 1)[-1].lower()
    if kind not in ("parquet", "csv"):
        raise ConfigError(f"{shown}: a labels table must be a .parquet or .csv file")
    try:
        with fsspec.open(path, "rb", **cfg.storage_options) as f:
            table = pq.read_table(f) if kind == "parquet" else pa_csv.read_csv(f)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such labels table") from None
    except pa.ArrowInvalid as e:
        raise ConfigError(f"{shown}: not a readable {kind} table ({' '.join(str(e).split())})") from None
    if cfg.label_column not in table.column_names:
        raise ConfigError(f"{shown}: no column {cfg.label_column!r}; it has {', '.join(table.column_names)}")
    if table.num_rows != n_images:
        raise ConfigError(f"{shown}: {table.num_rows} rows, the store has {n_images} images "
                          "(one row per store image, in store order)")
    column = table.column(cfg.label_column)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_integer(column.type):
        labels = np.asarray(column.fill_null(-1).to_numpy(), dtype=np.int64)
        return np.maximum(labels, -1), []
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        values = column.to_pylist()
        names = sorted({v for v in values if v})
        index = {name: k for k, name in enumerate(names)}
        return np.array([index[v] if v else -1 for v in values], dtype=np.int64), names
    raise ConfigError(f"{shown}: column {cfg.label_column!r} must hold integers or class names, not {column.type}")


def _targets(cfg: ProbeConfig, store: ActivationStore, spec: LayerSpec) -> tuple[np.ndarray, list[str]]:
    """(targets (n_images, rows per image), class names): a class index per row, -1 for the rows left out
    (unlabelled images or ignored patches, and every row of a rejected image)."""
    dataset, images = store.attrs.get("dataset", {}), store.images()
    if cfg.task == "seg":
        if not store.spec.has_labels:
            raise ConfigError(f"{redact(store.url)} has no per-patch labels: a seg probe needs a store extracted "
                              "with them (or train a cls probe)")
        if spec.tokens.n_patches == 0:
            raise ConfigError(f"layer {spec.name} of {redact(store.url)} has no patch tokens for a seg probe")
        raw = store.labels().astype(np.int64)
        targets, given = np.where((raw >= 0) & (raw != cfg.ignore_index), raw, -1), dataset.get("mask_classes")
    elif cfg.labels is not None:
        labels, given = _table_labels(cfg, store.n_images)
        targets = labels[:, None]
    else:
        labels = images.column("label").to_numpy().astype(np.int64)
        targets, given = np.maximum(labels, -1)[:, None], dataset.get("class_names")
    targets[~ok_mask(images)] = -1
    present = np.unique(targets[targets >= 0])
    if present.size < 2:
        what = f"{cfg.task} probe: the store's usable {'patches' if cfg.task == 'seg' else 'images'}"
        raise ConfigError(f"{what} have {present.size} class(es); a probe needs at least 2"
                          + (" (pass --labels TABLE --label-column COLUMN)" if cfg.task == "cls" else ""))
    n_classes = int(present.max()) + 1
    names = list(given or [])
    return targets, names if len(names) >= n_classes else [str(k) for k in range(n_classes)]


def split_rows(targets: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) masks over targets (n_images, rows per image; -1: left out): a seeded split of the images
    with a usable row (cfg.holdout of them held out), then at most cfg.max_rows training rows (a seeded sample).
    Public so that later stages can tell the images a probe never saw."""
    valid = targets >= 0
    images = np.flatnonzero(valid.any(1))
    if images.size < 2:
        raise ConfigError(f"probe: {images.size} usable image(s); a training and a held-out split need 2")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(images)
    n_test = min(images.size - 1, max(1, round(cfg.holdout * images.size)))
    held = np.zeros(len(targets), dtype=bool)
    held[order[:n_test]] = True
    train, test = valid & ~held[:, None], valid & held[:, None]
    rows = np.flatnonzero(train)
    if rows.size > cfg.max_rows:
        train = np.zeros_like(train)
        train.reshape(-1)[rng.choice(rows, cfg.max_rows, replace=False)] = True
    if np.unique(targets[train]).size < 2:
        raise ConfigError("probe: the training split holds only one class; use more images or another --seed")
    return train, test


# the passes -----------------------------------------------------------------------------------------

def _blocks(store: ActivationStore, spec: LayerSpec, cfg: ProbeConfig, desc: str,
            progress: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """(first image, raw tokens) of whole store chunks, in store order, with a progress bar."""
    per_chunk = store.spec.images_per_chunk
    size = per_chunk * max(1, cfg.batch_size // per_chunk)
    with tqdm(total=store.n_images, desc=desc, unit="img", disable=not progress) as bar:
        for start, x in store.blocks(spec.name, size):
            yield start, x
            bar.update(x.shape[0])


def _gather(store: ActivationStore, spec: LayerSpec, cfg: ProbeConfig, train: np.ndarray,
            progress: bool) -> torch.Tensor:
    """The probe inputs of the training rows (n_rows, d) float32, in row-major (image, row) order."""
    x_train = torch.empty((int(train.sum()), spec.d), dtype=torch.float32)
    pos = 0
    for start, x in _blocks(store, spec, cfg, "probe: training rows", progress):
        keep = torch.from_numpy(train[start:start + x.shape[0]])
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


def _confusion(store: ActivationStore, spec: LayerSpec, cfg: ProbeConfig, probe: Probe, targets: np.ndarray,
               test: np.ndarray, progress: bool) -> np.ndarray:
    """(true, predicted) counts of the held-out rows, the probe run as load_probe gives it."""
    c = probe.n_classes
    counts = np.zeros(c * c, dtype=np.int64)
    with torch.inference_mode():
        for start, x in _blocks(store, spec, cfg, "probe: held-out rows", progress):
            n = x.shape[0]
            keep = test[start:start + n]
            if keep.any():
                pred = probe.logits(x).reshape(n, keep.shape[1], c)[torch.from_numpy(keep)].argmax(-1).numpy()
                counts += np.bincount(targets[start:start + n][keep] * c + pred, minlength=c * c)
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
    with ActivationStore(cfg.store, cfg.storage_options) as store:
        spec = store.layer(cfg.layer) if cfg.layer is not None else store.layers[0]
        targets, names = _targets(cfg, store, spec)
        train, test = split_rows(targets, cfg)
        x = _gather(store, spec, cfg, train, progress)
        y = torch.from_numpy(targets[train])
        var, mean = torch.var_mean(x, 0, correction=0)
        std = torch.where(var.sqrt() > MIN_STD, var.sqrt(), 1.0)
        x.sub_(mean).div_(std)  # = standardize(x, mean, std), in place
        weight, bias = _fit(x, y, len(names), cfg)
        del x
        probe = Probe(task=cfg.task, layer=spec.name, layout=spec.tokens, class_names=tuple(names),
                      ignore_index=cfg.ignore_index, weight=weight, bias=bias, mean=mean, std=std,
                      pool=_pool(cfg, spec))
        confusion = _confusion(store, spec, cfg, probe, targets, test, progress)
        backbone = store.attrs.get("backbone", {})
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "task": cfg.task, "layer": spec.name,
            "store": redact(store.url), "backbone": {k: backbone.get(k) for k in ("family", "name")},
            "pool": probe.pool, "layout": spec.tokens.to_dict(), "d": spec.d, "class_names": names,
            "ignore_index": cfg.ignore_index,
            "n_train": int(train.any(1).sum()), "n_test": int(test.any(1).sum()),
            "n_train_rows": int(train.sum()), "n_test_rows": int(test.sum()),
            "metrics": _metrics(confusion, int(np.bincount(y.numpy()).argmax()), cfg.task, names),
            "config": public_config(cfg),
        }
    _write(cfg, probe, meta)
    return meta
