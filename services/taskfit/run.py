"""`actstore taskfit`: which of several models' SAE features fit one labelled image task, against the dense probe.

For each model (an SAE on a layer of a store; all stores over the same images, in the same order) and one task
(the images' labels, one of the stores' label columns, or a labels table: services.probe.rows.Targets), on the
images the dense probe holds out (services.probe.rows.Split, same seed and holdout: the same images for every
number and every model):

    1-D probe       per class, the feature of largest standardized difference between the class and the rest on
                    the training images (services.taskfit.measure); its held-out AUROC and average precision as a
                    one-vs-rest detector, and their means over the classes
    k-sparse        per class, a logistic regression on the class's top k features (k = 1, 4, 16, 64), fit on the
                    training images; the held-out multiclass accuracy of the argmax over the classes' probes (and
                    the balanced accuracy)
    dense           `actstore probe --task cls` on the SAE's layer (its folder is probes/<i>): held-out accuracy

then across models the rank correlation of each feature-based score (mean best 1-D AUROC; k-sparse accuracy at
score_k) with the dense probe's accuracy, with its n and a caveat.

An image's value of a feature is its largest over the image's patches (the CLS / pooled token's for SAEs trained on
it). Memory is bounded by the widths and the budget, never images x features: per model, one pass over the store
folds per-class sums and sums of squares of the features on the training images (classes x features, in tiles of
classes where that does not fit: a pass per tile), which choose each class's features; a second pass keeps only
those features' values for the training and held-out images (images x classes x max k, again in tiles of classes);
the probes are fit on those. Then the dense probe makes its own passes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget
from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import marked_by, staged_folder
from actstore.store import is_local, torch_dtype
from services.probe import ProbeConfig, train_probe
from services.probe.rows import IMAGE_ARRAY_BYTES, Split, Targets, check_classes
from services.taskfit.layout import CLASSES, FORMAT, FORMAT_VERSION, KSPARSE, PROBES, REPORT, SUMMARY
from services.taskfit.measure import (auroc, average_precision, balanced_accuracy, fit_sparse, rank_correlation,
                                      ranked, sparse_logits, standardized_difference)
from services.taskfit.models import Model, check_same_images, distinct_names, open_model

__all__ = ["Plan", "Task", "TaskfitConfig", "run_taskfit"]


@dataclass(frozen=True)
class TaskfitConfig:
    """What `actstore taskfit` measures: one labelled task, several models' SAEs."""

    model: tuple[str, ...]
    """A model: an index folder (from `actstore index`) or SAE_DIR@STORE_URL; repeat for each model. All stores
    must hold the same images in the same order."""
    out: str
    """Local folder for the results (taskfit.json, classes.parquet, ksparse.parquet, probes/, report.html)."""
    labels: str | None = None
    """A table (.parquet or .csv) with one row per store image, in store order, whose label_column is the task
    (default: the stores' image labels)."""
    label_column: str = "label"
    """The column of `labels`, or without `labels` one of the stores' label columns; "label": the images' labels
    with the dataset's class names (as `actstore probe`)."""
    k: tuple[int, ...] = (1, 4, 16, 64)
    """Features per class of the k-sparse probes (k above an SAE's width uses all its features)."""
    score_k: int = 16
    """The k whose k-sparse accuracy is correlated with the dense probe's across models (one of k)."""
    holdout: float = 0.2
    """Fraction of the labelled images held out for every number (the dense probe's seeded split)."""
    max_rows: int = 200_000
    """Training images kept at most, a seeded sample (the dense probe's)."""
    seed: int = 0
    """Seeds the split and the training sample."""
    steps: int = 100
    """L-BFGS iterations of each logistic regression (the k-sparse probes and the dense probe)."""
    weight_decay: float = 1e-3
    """L2 penalty of every probe: this times its squared weights, added to its mean cross-entropy."""
    memory_gb: float | None = None
    """Working memory, in GB: images per block and the tiles of classes follow from it and the widths (default:
    half of this machine's memory)."""
    device: str = "cpu"
    """Where the SAEs encode and the per-class sums live (e.g. "cuda")."""
    overwrite: bool = False
    """Replace an existing taskfit folder at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the stores, SAEs and the labels table."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("taskfit: give at least one --model")
        if not self.k or min(self.k) < 1:
            raise ConfigError(f"taskfit: every k must be >= 1, got {list(self.k)}")
        if self.score_k not in self.k:
            raise ConfigError(f"taskfit: score_k {self.score_k} is not one of k ({', '.join(map(str, self.k))})")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"taskfit: holdout must lie in (0, 1), got {self.holdout}")
        if self.weight_decay < 0:
            raise ConfigError(f"taskfit: weight_decay must be >= 0, got {self.weight_decay}")
        check_at_least(self, "taskfit", {"steps": 1, "max_rows": 1})
        MemoryBudget.of(self.memory_gb)  # > 0
        if not is_local(self.out):
            raise ConfigError(f"taskfit: out must be a local folder, got {redact(self.out)}")


@dataclass(frozen=True)
class Task:
    """The task on one model's store: per-image arrays only."""

    names: list[str]
    labels: np.ndarray
    """(n_images,) int64 class per image, -1: none (unlabelled or rejected)."""
    train: np.ndarray
    """(n_images,) bool: the training images (the dense probe's, sampled to max_rows)."""
    test: np.ndarray
    """(n_images,) bool: the held-out images."""


def _probe_config(cfg: TaskfitConfig, model: Model, out: str) -> ProbeConfig:
    return ProbeConfig(store=model.store.url, task="cls", out=out, layer=model.encoder.spec.name, labels=cfg.labels,
                       label_column=cfg.label_column, holdout=cfg.holdout, steps=cfg.steps,
                       weight_decay=cfg.weight_decay, max_rows=cfg.max_rows, memory_gb=cfg.memory_gb, seed=cfg.seed,
                       storage_options=cfg.storage_options)


def _task(pcfg: ProbeConfig, model: Model) -> Task:
    """The labels and the split exactly as the dense probe makes them (services.probe.rows)."""
    targets = Targets(pcfg, model.store, model.encoder.spec)
    n = model.store.n_images
    counts, present = targets.survey(max(n, 1))
    names = targets.class_names(present)
    t = targets.block(0, n)
    train, test = Split.of(counts, pcfg).masks(0, t)
    check_classes(t[train])
    return Task(names, t[:, 0], train[:, 0], test[:, 0])


def _check_same_task(tasks: list[Task]) -> None:
    """Refuses models whose stores label or split the images differently (their rejected images differ)."""
    for i, t in enumerate(tasks[1:], 2):
        for what, a, b in (("labels", tasks[0].labels, t.labels), ("held-out images", tasks[0].test, t.test),
                           ("training images", tasks[0].train, t.train)):
            if not np.array_equal(a, b):
                j = int(np.flatnonzero(a != b)[0])
                raise ConfigError(f"taskfit: model 1 and model {i} differ in their {what} (first at image {j}: "
                                  f"{a[j]} and {b[j]}); their stores reject or label different images")
        if t.names != tasks[0].names:
            raise ConfigError(f"taskfit: model 1 and model {i} name the classes differently "
                              f"({', '.join(tasks[0].names)} and {', '.join(t.names)})")


@dataclass(frozen=True)
class Plan:
    """How one model's passes spend the memory budget."""

    images_per_block: int
    """Images encoded at once."""
    stats_tile: int
    """Classes whose per-class sums one pass folds (all of them: one pass)."""
    column_tile: int
    """Classes whose chosen features' values one pass keeps (and whose probes are fit together)."""


def plan(cfg: TaskfitConfig, model: Model, task: Task, top: int) -> Plan:
    """The blocks and class tiles of one model within the budget: fixed are the SAE's weights, the per-image
    arrays and the held-out logits; a third of the rest encodes images (at most what is worth encoding at once);
    the per-class sums (5 float64 rows of the SAE's width per class) and then the kept values (the kept images
    x `top` float32 per class, and the fit's copies of the training part) take what is left."""
    budget, f, c = MemoryBudget.of(cfg.memory_gb), model.d_sae, len(task.names)
    enc, spec = model.encoder, model.encoder.spec
    n_train, n_test = int(task.train.sum()), int(task.test.sum())
    fixed = (enc.weight_bytes() + IMAGE_ARRAY_BYTES * model.store.n_images + 4 * n_test * c * len(cfg.k)
             + 16 * f)
    stored = spec.tokens.n_tokens * spec.d * torch_dtype(model.store.spec.dtype).itemsize
    image = enc.per_image * enc.token_bytes() + 4 * stored + 28 * f  # encoding, read-ahead, its row (f32, f64, sq)
    images = budget.rows("taskfit", fixed=fixed, per_row=image, row="image", share=1 / 3,
                         at_most=min(enc.most_images(), max(model.store.n_images, 1)))
    fixed += images * image
    stats = budget.rows("taskfit", fixed=fixed, per_row=40 * f, row="class of the per-class sums", at_most=c)
    per_class = 4 * top * (n_train + n_test) + 16 * top * n_train
    columns = budget.rows("taskfit", fixed=fixed, per_row=per_class, row="class of the kept feature values",
                          at_most=c)
    return Plan(images, stats, columns)


def _values(model: Model, images: int, device: torch.device, desc: str, progress: bool):
    """(first image, (images, features) SAE codes) of each block of the store, in order."""
    spec = model.encoder.spec
    with torch.inference_mode(), tqdm(total=model.store.n_images, desc=desc, unit="img", disable=not progress) as bar:
        for start, x in model.store.blocks(spec.name, images, whole_chunks=True):
            yield start, model.image_values(x.to(device))
            bar.update(x.shape[0])


def _choose(model: Model, task: Task, pl: Plan, top: int, device: torch.device, progress: bool) -> np.ndarray:
    """(classes, top) each class's features, best first, from the per-class sums over the training images."""
    c, f = len(task.names), model.d_sae
    n_class = np.bincount(task.labels[task.train], minlength=c)
    chosen = np.zeros((c, top), dtype=np.int64)
    tiles = range(0, c, pl.stats_tile)
    for t, c0 in enumerate(tiles):
        c1 = min(c, c0 + pl.stats_tile)
        sums = torch.zeros((2, c1 - c0, f), dtype=torch.float64, device=device)
        total = torch.zeros((2, f), dtype=torch.float64, device=device)
        desc = f"taskfit {model.name}: class sums" + (f", tile {t + 1}/{len(tiles)}" if len(tiles) > 1 else "")
        for start, v in _values(model, pl.images_per_block, device, desc, progress):
            train = task.train[start:start + v.shape[0]]
            if not train.any():
                continue
            x = v[torch.from_numpy(train).to(device)].double()
            xx = torch.stack([x, x * x])
            total += xx.sum(1)
            y = torch.from_numpy(task.labels[start:start + v.shape[0]][train]).to(device) - c0
            inside = ((y >= 0) & (y < c1 - c0)).nonzero().squeeze(1)
            onehot = torch.zeros((x.shape[0], c1 - c0), dtype=torch.float64, device=device)
            onehot[inside, y[inside]] = 1
            sums += onehot.T @ xx
        s, tot = sums.cpu().numpy(), total.cpu().numpy()
        d = standardized_difference(s[0], s[1], n_class[c0:c1], tot[0], tot[1], int(task.train.sum()))
        chosen[c0:c1] = ranked(d, top)
    return chosen


def _kept(model: Model, task: Task, features: np.ndarray, pl: Plan, device: torch.device, desc: str,
          progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) values (images, len(features)) float32 of the given features, in image order."""
    keep = task.train | task.test
    cols = np.empty((int(keep.sum()), features.size), dtype=np.float32)
    feats, pos = torch.from_numpy(features).to(device), 0
    for start, v in _values(model, pl.images_per_block, device, desc, progress):
        k = torch.from_numpy(keep[start:start + v.shape[0]]).to(device)
        rows = v[k][:, feats].cpu().numpy()
        cols[pos:pos + rows.shape[0]] = rows
        pos += rows.shape[0]
    return cols[task.train[keep]], cols[task.test[keep]]


def _measure(cfg: TaskfitConfig, model: Model, task: Task, device: torch.device, progress: bool
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One model's feature-based numbers: (its summary, its per-class rows)."""
    c, top = len(task.names), min(max(cfg.k), model.d_sae)
    pl = plan(cfg, model, task, top)
    chosen = _choose(model, task, pl, top, device, progress)
    y_train, y_test = task.labels[task.train], task.labels[task.test]
    logits = {k: np.zeros((y_test.size, c), dtype=np.float32) for k in cfg.k}
    rows: list[dict[str, Any]] = []
    tiles = range(0, c, pl.column_tile)
    for t, c0 in enumerate(tiles):
        c1 = min(c, c0 + pl.column_tile)
        features, pos = np.unique(chosen[c0:c1], return_inverse=True)
        pos = pos.reshape(c1 - c0, top)
        desc = f"taskfit {model.name}: chosen features" + (f", tile {t + 1}/{len(tiles)}" if len(tiles) > 1 else "")
        x_train, x_test = _kept(model, task, features, pl, device, desc, progress)
        for j, cl in enumerate(range(c0, c1)):
            best, positive = x_test[:, pos[j, 0]], y_test == cl
            trained = bool((y_train == cl).any())
            rows.append({"class": cl, "name": task.names[cl], "n_train": int((y_train == cl).sum()),
                         "n_test": int(positive.sum()), "feature": int(chosen[cl, 0]) if trained else -1,
                         "auroc": auroc(best, positive) if trained else float("nan"),
                         "ap": average_precision(best, positive) if trained else float("nan"),
                         "features": chosen[cl].tolist()})
        target = torch.from_numpy(y_train[:, None] == np.arange(c0, c1)).float()
        for k in cfg.k:
            sel = pos[:, :min(k, top)]
            probe = fit_sparse(torch.from_numpy(x_train[:, sel]), target, cfg.steps, cfg.weight_decay)
            logits[k][:, c0:c1] = sparse_logits(torch.from_numpy(x_test[:, sel]), *probe).numpy()
    predictions = {k: logits[k].argmax(1) for k in cfg.k}
    scored = [r for r in rows if np.isfinite(r["auroc"])]
    summary = {
        **model.describe(), "n_train": int(task.train.sum()), "n_test": int(y_test.size),
        "plan": {**asdict(pl), "passes": -(-c // pl.stats_tile) + -(-c // pl.column_tile)},
        "one_d": {"mean_auroc": float(np.mean([r["auroc"] for r in scored])) if scored else None,
                  "mean_ap": float(np.mean([r["ap"] for r in scored])) if scored else None,
                  "classes_scored": len(scored)},
        "ksparse": {str(k): {"accuracy": float(np.mean(p == y_test)), "balanced_accuracy": balanced_accuracy(y_test, p),
                             "features": min(k, top)} for k, p in predictions.items()},
    }
    return summary, rows


def run_taskfit(cfg: TaskfitConfig, progress: bool = True) -> dict[str, Any]:
    """Measure every model and write the taskfit folder; returns its summary (also in taskfit.json)."""
    with staged_folder(cfg.out, "a taskfit folder", marked_by(SUMMARY), cfg.overwrite) as tmp:
        summary = _taskfit(cfg, tmp, progress)
    return summary


def _taskfit(cfg: TaskfitConfig, tmp: Path, progress: bool) -> dict[str, Any]:
    device = torch.device(cfg.device)
    models = distinct_names([open_model(spec, i, device, cfg.storage_options) for i, spec in enumerate(cfg.model, 1)])
    check_same_images(models)
    probes = [_probe_config(cfg, m, str(tmp / PROBES / str(i))) for i, m in enumerate(models)]
    tasks = [_task(p, m) for p, m in zip(probes, models)]
    _check_same_task(tasks)
    results, class_rows, k_rows = [], [], []
    for i, (m, task, pcfg) in enumerate(zip(models, tasks, probes)):
        summary, rows = _measure(cfg, m, task, device, progress)
        meta = train_probe(pcfg, progress)
        summary["dense"] = {"accuracy": meta["metrics"]["accuracy"], "chance": meta["metrics"]["chance"],
                            "pool": meta["pool"], "probe": f"{PROBES}/{i}", "n_test": meta["n_test"]}
        results.append(summary)
        class_rows += [{"model": i, "model_name": m.name, **r} for r in rows]
        k_rows += [{"model": i, "model_name": m.name, "k": int(k), **v} for k, v in summary["ksparse"].items()]
        m.store.close()
    dense = [r["dense"]["accuracy"] for r in results]
    auc = [r["one_d"]["mean_auroc"] for r in results]
    correlations = [rank_correlation(auc, dense, "mean best 1-D AUROC") if None not in auc else
                    {"score": "mean best 1-D AUROC", "against": "dense probe accuracy", "n": len(auc), "rho": None,
                     "note": "a model has no class scored on its held-out images"},
                    rank_correlation([r["ksparse"][str(cfg.score_k)]["accuracy"] for r in results], dense,
                                     f"k-sparse accuracy at k={cfg.score_k}")]
    config = public_config(cfg)
    config["model"] = redact(list(cfg.model))
    summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config,
               "n_images": models[0].store.n_images, "n_train": int(tasks[0].train.sum()),
               "n_test": int(tasks[0].test.sum()), "class_names": tasks[0].names, "k": list(cfg.k),
               "score_k": cfg.score_k, "models": results, "correlations": correlations}
    pq.write_table(pa.Table.from_pylist(class_rows), tmp / CLASSES)
    pq.write_table(pa.Table.from_pylist(k_rows), tmp / KSPARSE)
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1))
    from services.report.taskfit import taskfit_page

    (tmp / REPORT).write_text(taskfit_page(tmp, Path(cfg.out).name, config).html())
    return summary

