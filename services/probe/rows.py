"""Which rows a probe trains on and is measured on, read block by block: nothing of size images x patches is held.

    targets = Targets(cfg, store, spec)            # per-image arrays only: the ok mask, a cls probe's labels
    counts, present = targets.survey(images)       # usable rows per image, the classes present (one labels pass)
    split = Split.of(counts, cfg)                   # held-out images, the sampled training rows
    for start, t in targets.blocks(images):         # t (n, rows per image): a class per row, -1 left out
        train, test = split.masks(start, t)

A row is an image (cls) or a patch (seg). Images with a usable row are split by a seeded permutation (never by
patch: patches of one image are not independent); the training rows, numbered in (image, row) order, are then
sampled down to max_rows by the same seeded generator, so the same rows are chosen whatever the block size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.store import ActivationStore, LayerSpec, ok_mask

if TYPE_CHECKING:
    from services.probe.train import ProbeConfig

__all__ = ["IMAGE_ARRAY_BYTES", "Split", "Targets", "split_rows"]

IMAGE_ARRAY_BYTES = 40
"""Bytes per store image of the arrays a probe holds whole (ok mask, cls labels, usable rows, split, row numbers)."""


def _table_labels(cfg: ProbeConfig, n_images: int) -> tuple[np.ndarray, list[str]]:
    """(label per image, class names) from cfg.labels' column; -1 where an image has none."""
    path, shown = str(cfg.labels), redact(str(cfg.labels))
    kind = path.rsplit(".", 1)[-1].lower()
    if kind not in ("parquet", "csv"):
        raise ConfigError(f"{shown}: a labels table must be a .parquet or .csv file")
    try:
        with fsspec.open(path, "rb", **cfg.storage_options) as f:
            if kind == "parquet":  # the one column only: a wide table of factors stays on disk
                pf = pq.ParquetFile(f)
                columns = pf.schema_arrow.names
                table = pf.read(columns=[cfg.label_column]) if cfg.label_column in columns else None
            else:
                table = pa_csv.read_csv(f)
                columns = table.column_names
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such labels table") from None
    except pa.ArrowInvalid as e:
        raise ConfigError(f"{shown}: not a readable {kind} table ({' '.join(str(e).split())})") from None
    if table is None or cfg.label_column not in columns:
        raise ConfigError(f"{shown}: no column {cfg.label_column!r}; it has {', '.join(columns)}")
    if table.num_rows != n_images:
        raise ConfigError(f"{shown}: {table.num_rows} rows, the store has {n_images} images "
                          "(one row per store image, in store order)")
    return _column_labels(table.column(cfg.label_column), f"{shown}: column {cfg.label_column!r}")


def _store_labels(cfg: ProbeConfig, store: ActivationStore, images: pa.Table) -> tuple[np.ndarray, list[str]]:
    """(label per image, class names) from one of the store's own label columns; -1 where an image has none."""
    if cfg.label_column not in store.label_columns:
        raise ConfigError(f"{redact(store.url)}: no label column {cfg.label_column!r}; it has "
                          f"{', '.join(['label', *store.label_columns])} (or pass --labels TABLE)")
    return _column_labels(images.column(cfg.label_column), f"{redact(store.url)}: column {cfg.label_column!r}")


def _column_labels(column: pa.ChunkedArray, what: str) -> tuple[np.ndarray, list[str]]:
    """(label per row, class names) of a label column: strings are class names, numbered in sorted order (empty
    or null: no label, -1); integers are class indices (< 0 or null: -1) and name none. `what` names the column
    in the error that refuses any other type."""
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
    raise ConfigError(f"{what} must hold integers or class names, not {column.type}")


class Targets:
    """A probe's targets, a class index per row (-1: left out: unlabelled images, ignored patches and every row of
    a rejected image), read for any block of images: seg from the store's per-patch labels, cls from the images'
    labels (images.parquet's label, one of the store's label columns, or cfg.labels' column), held whole (one
    number per image)."""

    def __init__(self, cfg: ProbeConfig, store: ActivationStore, spec: LayerSpec) -> None:
        dataset, images = store.attrs.get("dataset", {}), store.images()
        self.store, self.task, self.ignore_index = store, cfg.task, cfg.ignore_index
        self.ok = ok_mask(images)
        self.image_labels: np.ndarray | None = None
        if cfg.task == "seg":
            if not store.spec.has_labels:
                raise ConfigError(f"{redact(store.url)} has no per-patch labels: a seg probe needs a store extracted "
                                  "with them (or train a cls probe)")
            if spec.tokens.n_patches == 0:
                raise ConfigError(f"layer {spec.name} of {redact(store.url)} has no patch tokens for a seg probe")
            self.given, self.per_image = dataset.get("mask_classes"), spec.tokens.n_patches
        else:
            if cfg.labels is not None:
                labels, self.given = _table_labels(cfg, store.n_images)
            elif cfg.label_column != "label":
                labels, self.given = _store_labels(cfg, store, images)
            else:
                labels, self.given = images.column("label").to_numpy().astype(np.int64), dataset.get("class_names")
            self.image_labels, self.per_image = np.maximum(labels, -1), 1

    @property
    def bytes_per_image(self) -> int:
        """Working bytes of one image's targets in a block: the stored labels, int64 targets and a few masks."""
        return self.per_image * 32

    def block(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, rows per image) int64 targets of images [start, stop)."""
        if self.image_labels is None:
            raw = self.store.labels(start, stop).astype(np.int64)
            t = np.where((raw >= 0) & (raw != self.ignore_index), raw, -1)
        else:
            t = self.image_labels[start:stop, None].copy()
        t[~self.ok[start:stop]] = -1
        return t

    def blocks(self, images: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first image, targets) of consecutive blocks of `images` images, in store order."""
        n = len(self.ok)
        for start in range(0, n, images):
            yield start, self.block(start, min(n, start + images))

    def survey(self, images: int) -> tuple[np.ndarray, np.ndarray]:
        """(usable rows per image (n_images,), the classes present, sorted), in blocks of `images` images."""
        counts, present = np.zeros(len(self.ok), dtype=np.int64), np.zeros(0, dtype=np.int64)
        for start, t in self.blocks(images):
            counts[start:start + len(t)] = (t >= 0).sum(1)
            present = np.union1d(present, t[t >= 0])
        return counts, present

    def class_names(self, present: np.ndarray) -> list[str]:
        """Names of classes 0..max present: the store's (or the table's) where it names them all, else numbers;
        refuses fewer than 2 classes."""
        if present.size < 2:
            what = f"{self.task} probe: the store's usable {'patches' if self.task == 'seg' else 'images'}"
            raise ConfigError(f"{what} have {present.size} class(es); a probe needs at least 2"
                              + (" (pass --labels TABLE --label-column COLUMN)" if self.task == "cls" else ""))
        n_classes, names = int(present.max()) + 1, list(self.given or [])
        return names if len(names) >= n_classes else [str(k) for k in range(n_classes)]


@dataclass(frozen=True)
class Split:
    """The training and held-out rows, as per-image arrays and the sampled training rows' numbers: enough to make
    either mask for any block of images (see the module docstring)."""

    held: np.ndarray
    """(n_images,) bool: the held-out images."""
    train_before: np.ndarray
    """(n_images + 1,) int64: the training rows (before sampling) of the images before each, in (image, row) order."""
    sample: np.ndarray | None
    """The kept training rows' numbers, ascending, when there were more than max_rows; None: all are kept."""
    n_test_rows: int

    @classmethod
    def of(cls, counts: np.ndarray, cfg: ProbeConfig) -> Split:
        """The split of images with `counts` (n_images,) usable rows: cfg.holdout of those with any held out, then
        at most cfg.max_rows training rows (cfg.seed seeds both)."""
        images = np.flatnonzero(counts > 0)
        if images.size < 2:
            raise ConfigError(f"probe: {images.size} usable image(s); a training and a held-out split need 2")
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(images)
        n_test = min(images.size - 1, max(1, round(cfg.holdout * images.size)))
        held = np.zeros(len(counts), dtype=bool)
        held[order[:n_test]] = True
        train_before = np.concatenate([[0], np.cumsum(np.where(held, 0, counts))])
        total = int(train_before[-1])
        sample = np.sort(rng.choice(total, cfg.max_rows, replace=False)) if total > cfg.max_rows else None
        return cls(held, train_before, sample, int(counts[held].sum()))

    @property
    def n_train_rows(self) -> int:
        return int(self.train_before[-1]) if self.sample is None else len(self.sample)

    def n_images(self) -> tuple[int, int]:
        """(training, held-out) images: those with a kept training row, those held out (each has a usable row)."""
        if self.sample is None:
            n_train = int((np.diff(self.train_before) > 0).sum())
        else:
            n_train = np.unique(np.searchsorted(self.train_before, self.sample, side="right") - 1).size
        return n_train, int(self.held.sum())

    def masks(self, start: int, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, test) bool masks of the block of images from `start` with targets `t` (n, rows per image)."""
        valid, held = t >= 0, self.held[start:start + len(t), None]
        train, test = valid & ~held, valid & held
        if self.sample is not None:
            first, rows = int(self.train_before[start]), np.flatnonzero(train)  # row-major: the rows' numbering
            lo, hi = np.searchsorted(self.sample, [first, first + rows.size])
            train = np.zeros_like(train)
            train.reshape(-1)[rows[self.sample[lo:hi] - first]] = True
        return train, test


def check_classes(y: np.ndarray) -> None:
    """Refuses a training split with fewer than two classes."""
    if np.unique(y).size < 2:
        raise ConfigError("probe: the training split holds only one class; use more images or another --seed")


def split_rows(targets: np.ndarray, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) masks over targets held whole (n_images, rows per image; -1: left out): Split's, for a small
    store or a later stage that must tell the images a probe never saw."""
    train, test = Split.of((targets >= 0).sum(1), cfg).masks(0, targets)
    check_classes(targets[train])
    return train, test
