"""The report of a training run (sae.train): the logged curves, and each SAE's firing statistics on a sample.

The run logs batch metrics (metrics.jsonl) but keeps no per-feature firing record, so the lifetime and
population sparsity come from a fresh sample: `tokens` patch tokens of the run's store drawn by a PatchLoader
(seeded; the layer and tokens the SAEs were trained on), normalized as each SAE's checkpoint records, encoded
by every SAE of the sweep. A feature is dead here when it fires on none of the sampled tokens; with the whole
store sampled (tokens >= its patches) that is exactly the features that never fire on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from tqdm.auto import tqdm

from actstore.errors import ConfigError
from actstore.loader import DEFAULT_BUFFER_BYTES, Normalization, PatchLoader
from actstore.store import ActivationStore
from sae import SparseAutoencoder, load, positive_entries, read_extra
from sae.train import sae_name
from sae.train.sinks import read_metrics
from services.index import density_histogram
from services.report.build import RUN_CONFIG, SAE_FILES, is_sae_folder
from services.report.config import ReportConfig
from services.report.page import Page
from services.report.plots import curves_plot, density_plot, population_plot

__all__ = ["Firing", "Run", "open_run", "sample_firing", "training_report"]

BATCH = 8192
"""Sampled tokens encoded at once."""


@dataclass(frozen=True)
class Run:
    """A training run folder, and the SAEs of it to report (all of the sweep's saved ones, or the one given)."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    config: dict[str, Any]
    members: tuple[str, ...]

    def member_url(self, name: str) -> str:
        return self.fs.unstrip_protocol(f"{self.root}/{name}")


def open_run(fs: fsspec.AbstractFileSystem, root: str) -> Run:
    """The run at `root` (a folder with train_config.json), or the run around the SAE folder `root`."""
    member = None
    if not fs.exists(f"{root}/{RUN_CONFIG}"):  # an SAE folder of a run (report_kind checked which)
        root, member = root.rsplit("/", 1)
    config = json.loads(fs.cat_file(f"{root}/{RUN_CONFIG}"))
    names = [member] if member else [s.get("name") or sae_name(s) for s in config.get("sae", [])]
    saved = tuple(n for n in names if is_sae_folder(fs, f"{root}/{n}"))
    url = fs.unstrip_protocol(root)
    if not saved:
        raise ConfigError(f"{url}: no SAE of the run is saved yet (no <name>/{SAE_FILES[0]}); "
                          "a run saves its SAEs at each checkpoint")
    return Run(url, fs, root, config, saved)


@dataclass
class Firing:
    """One SAE on the sample: per feature on how many tokens it fires, per token how many features fire."""

    counts: np.ndarray
    """(d_sae,) int64"""
    active: np.ndarray
    """(tokens,) int64"""

    @property
    def frequency(self) -> np.ndarray:
        return self.counts / max(self.active.size, 1)


def sample_firing(saes: dict[str, tuple[SparseAutoencoder, Normalization | None]], store_url: str, layer: str | int,
                  tokens: str, n: int, seed: int, storage_options: dict[str, Any] | None, device: torch.device,
                  progress: bool = False) -> tuple[dict[str, Firing], int, int]:
    """Encode min(n, the store's) tokens drawn by a seeded PatchLoader with every SAE; returns
    ({name: Firing}, tokens sampled, tokens the store holds)."""
    store = ActivationStore(store_url, storage_options)
    try:  # a shuffle buffer for the sample: twice its rows, a batch and a chunk (at most the loader's default)
        spec = store.layer(layer)
        rows = 2 * min(n, store.n_images * spec.tokens.n_tokens) + BATCH + store.spec.images_per_chunk * \
            spec.tokens.n_tokens
        buffer = min(DEFAULT_BUFFER_BYTES, rows * spec.d * store.spec.itemsize)
    finally:
        store.close()
    loader = PatchLoader(store_url, spec.name, min(BATCH, n), tokens, seed=seed, buffer_bytes=buffer,
                         storage_options=storage_options, device=device)
    total = loader.n_patches
    take = min(n, total)
    counts = {name: torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=device) for name, (sae, _) in saes.items()}
    active: dict[str, list[np.ndarray]] = {name: [] for name in saes}
    done = 0
    bar = tqdm(total=take, desc="report", unit="tok", unit_scale=True, disable=not progress)
    with loader, torch.inference_mode():
        for x in loader:
            x = x[:take - done].float()
            for name, (sae, norm) in saes.items():
                rows, feats, _ = positive_entries(sae.encode(norm.apply(x) if norm is not None else x))
                counts[name] += torch.bincount(feats, minlength=sae.cfg.d_sae)
                active[name].append(torch.bincount(rows, minlength=x.shape[0]).cpu().numpy())
            done += x.shape[0]
            bar.update(x.shape[0])
            if done >= take:
                break
    bar.close()
    return {name: Firing(counts[name].cpu().numpy(), np.concatenate(active[name])) for name in saes}, done, total


def _member_facts(run: Run, name: str, sae: SparseAutoencoder, rows: list[dict[str, Any]],
                  opts: dict[str, Any] | None) -> list[tuple[str, Any]]:
    c = sae.cfg
    knob = {"topk": f"k {c.k}", "batchtopk": f"k {c.k}", "matryoshka": f"k {c.k}, groups {c.group_sizes}",
            "relu": f"L1 {c.l1_coeff:g}", "jumprelu": f"L0 {c.l0_coeff:g}"}
    facts = [("SAE", f"{run.member_url(name)}: {c.kind}, {knob[c.kind]}, {c.d_in} -> {c.d_sae}"),
             ("trained tokens", read_extra(run.member_url(name), opts).get("trained_tokens", "?"))]
    last = [r for r in rows if r["sae"] == name][-1:]
    if last:
        r = last[0]
        facts.append((f"last logged (step {r['step']})",
                      f"FVU {r['fvu']:.4f}, MSE {r['mse']:.4g}, L0 {r['l0']:.1f}, dead {r['dead_fraction']:.1%}"))
    return facts


def training_report(cfg: ReportConfig, run: Run, config: dict[str, Any], progress: bool) -> Page:
    opts = dict(cfg.storage_options) or None
    device = torch.device(cfg.device)
    saes = {name: load(run.member_url(name), device=device, storage_options=opts) for name in run.members}
    norm = next(iter(saes.values()))[1]
    store = run.config["store"]
    layer = norm.layer if norm is not None and norm.layer is not None else run.config.get("layer", -2)
    kind = norm.tokens if norm is not None and norm.tokens else "patches"
    try:
        rows = [r for r in read_metrics(run.fs, run.root) if r.get("sae") in saes]
    except FileNotFoundError:
        rows = []
    firing, sampled, total = sample_firing(saes, store, layer, kind, cfg.tokens, cfg.seed, opts, device,
                                           progress)
    page = Page(f"Training run report: {run.url.rstrip('/').rsplit('/', 1)[-1]}", "training", [
        ("run", run.url), ("store, layer", f"{store}, layer {layer} ({kind})"),
        ("SAEs", ", ".join(f"{n} ({s.cfg.kind}, {s.cfg.d_sae} features)" for n, (s, _) in saes.items())),
        ("training", (f"{run.config.get('tokens')} tokens in batches of {run.config.get('batch_size')}; "
                      f"{len(rows)} metric rows logged")),
        ("firing sample", f"{sampled} of the store's {total} tokens ({kind}; seed {cfg.seed})")], config)
    page.heading("Training curves")
    if rows:
        png, size, values = curves_plot(rows, "Training metrics against tokens")
        page.plot("curves", png, size, "loss, MSE, FVU, L0 and dead fraction as logged (metrics.jsonl)", values)
    else:
        page.text("no metrics logged yet (metrics.jsonl is missing or empty)", note=True)
    for name, (sae, _) in saes.items():
        f = firing[name]
        page.heading(f"SAE {name}", sae=name)
        page.facts(_member_facts(run, name, sae, rows, opts))
        hist = density_histogram(f.frequency)
        png, size, values = density_plot(hist, f"Lifetime sparsity: {name}", f"{sampled} sampled tokens")
        page.plot("lifetime-sparsity", png, size, f"features by log10 firing frequency over {sampled} sampled tokens; "
                  f"{hist['dead']} fired on none of them", values, sae=name)
        png, size, values = population_plot(f.active, sae.cfg.d_sae, f"Population sparsity: {name}")
        page.plot("population-sparsity", png, size, f"sampled tokens by the fraction of features active on them "
                  f"(mean {f.active.mean():.1f} of {sae.cfg.d_sae})", values, sae=name)
    return page
