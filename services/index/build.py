"""The feature index: one ordered pass over a store's patches through a trained SAE.

`build_index(IndexConfig(store=..., sae=..., out=...))` reads every patch token of the SAE's layer,
image block by image block in store order, encodes it, and folds the latents into accumulators
whose size depends on the SAE and k, never on the number of images (streaming merges):

    per feature         patches and images it fires on, sum and max of its activation
    top images          per feature the k distinct images with the strongest patch (ties: lower image
                        first), each with the feature's value at every patch (the heatmap)
    value bands         per feature and octave of activation value [2^e, 2^(e+1)), a uniform random
                        sample of the images whose strongest patch falls in it (bottom-r of a hash of
                        (seed, image, feature): the same sample whatever the block size), and its count
    per image           its m strongest features (computed per block, nothing to merge)

The index is a local folder (see the README, "Feature index"):

    index.json          format, provenance (store, sae, layer), shapes, the density histogram; written last
    features.parquet    id, n_patches_fired, n_images_fired, freq_patches, freq_images, mean_act, max_act
    images.parquet      index, uri, label, status of the store's images (what the service may serve)
    images.arrow        the same uri, label and ok as one uncompressed Arrow file, that every service worker
                        memory-maps (one copy in the page cache, services.index.layout.write_image_table)
    arrays/             zarr v3 arrays with one uncompressed chunk each, so the service memory-maps
                        them (`open_array`) and plain zarr reads them too:
        top_images (F, k) int32, -1 pads    top_values (F, k) float32    heatmaps (F, k, P) float16
        band_images (F, B, r) int32         band_values (F, B, r) float32    band_counts (F, B) int64
        image_features (N, m) int32         image_values (N, m) float32
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from tqdm.auto import tqdm

from actstore.budget import MemoryBudget
from actstore.config import check_at_least, public_config, redact
from actstore.errors import ConfigError
from actstore.outputs import marked_by, staged_folder
from actstore.store import ActivationStore, is_local, normalize_url, ok_mask, torch_dtype
from sae import TokenEncoder, positive_entries
from sae.checkpoint import load_on_store
from services.index.layout import (ARRAYS, FEATURES, FORMAT, FORMAT_VERSION, IMAGES, META, dataset_root,
                                   write_image_table)
from services.index.topn import TopTable, hash_keys, key_values, value_keys

__all__ = ["IndexConfig", "build_index", "density_histogram"]

BAND_EXPONENTS = (-16, 16)
"""Octaves [2^e, 2^(e+1)) for e in [-16, 16); values outside fall into the end octaves."""
HISTOGRAM_BIN = 0.1
"""Width of a density histogram bin, in log10 firing frequency."""


@dataclass(frozen=True)
class IndexConfig:
    """What `actstore index` reads, writes and keeps."""

    store: str
    """Activation store URL (local or any fsspec URL)."""
    sae: str
    """SAE checkpoint directory, as the trainer writes it, or another library's (SAELens; FORMAT:PATH names it)."""
    out: str
    """Local folder for the index (the service memory-maps it)."""
    layer: str | int | None = None
    """Store layer; default the one the SAE was trained on (its normalization's layer)."""
    k: int = 32
    """Top images per feature."""
    m: int = 16
    """Top features per image."""
    per_band: int = 4
    """Random example images kept per feature and activation octave."""
    memory_gb: float | None = None
    """Working memory of the pass, in GB (on top of the Python process): the images encoded at once follow from
    it and the widths (default: half of this machine's memory)."""
    seed: int = 0
    """Seeds the band samples' hash."""
    device: str = "cpu"
    """Where the SAE encodes (e.g. "cuda"); accumulators stay on the same device."""
    overwrite: bool = False
    """Replace an existing index at `out`."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store and the SAE."""

    def __post_init__(self) -> None:
        check_at_least(self, "index", dict.fromkeys(("k", "m", "per_band"), 1))
        if not is_local(self.out):
            raise ConfigError(f"index: out must be a local folder (the service memory-maps it), got {self.out}")


# the pass ----------------------------------------------------------------------------------------

@dataclass
class _Accumulators:
    """Everything the pass keeps; sized by the SAE and the config, not by the number of images."""

    n_patches_fired: torch.Tensor
    n_images_fired: torch.Tensor
    act_sum: torch.Tensor
    act_max: torch.Tensor
    band_counts: torch.Tensor
    top: TopTable
    bands: TopTable

    @classmethod
    def empty(cls, d_sae: int, n_patches: int, cfg: IndexConfig, device: torch.device) -> _Accumulators:
        n_bands = BAND_EXPONENTS[1] - BAND_EXPONENTS[0]
        return cls(n_patches_fired=torch.zeros(d_sae, dtype=torch.int64, device=device),
                   n_images_fired=torch.zeros(d_sae, dtype=torch.int64, device=device),
                   act_sum=torch.zeros(d_sae, dtype=torch.float64, device=device),
                   act_max=torch.zeros(d_sae, dtype=torch.float32, device=device),
                   band_counts=torch.zeros((d_sae, n_bands), dtype=torch.int64, device=device),
                   top=TopTable(d_sae, cfg.k, ((n_patches,), torch.float16), device),
                   bands=TopTable(d_sae * n_bands, cfg.per_band, ((1,), torch.float32), device))

    def features(self, n_ok: int, n_patches: int) -> pa.Table:
        """features.parquet: per feature its firing counts and frequencies (over the ok images), mean and max."""
        fired_p, fired_i = self.n_patches_fired.cpu().numpy(), self.n_images_fired.cpu().numpy()
        return pa.table({
            "id": np.arange(fired_p.size, dtype=np.int32),
            "n_patches_fired": fired_p, "n_images_fired": fired_i,
            "freq_patches": fired_p / max(n_ok * n_patches, 1), "freq_images": fired_i / max(n_ok, 1),
            "mean_act": (self.act_sum.cpu().numpy() / np.maximum(fired_p, 1)).astype(np.float32),
            "max_act": self.act_max.cpu().numpy()})

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-feature index arrays (the per-image ones are written during the pass)."""
        d_sae, n_bands = self.band_counts.shape
        per_band = self.bands.n
        return {
            "top_images": self.top.ids(), "top_values": key_values(self.top.key).cpu().numpy(),
            "heatmaps": self.top.payload.cpu().numpy(),
            "band_images": self.bands.ids().reshape(d_sae, n_bands, per_band),
            "band_values": self.bands.payload.cpu().numpy().reshape(d_sae, n_bands, per_band),
            "band_counts": self.band_counts.cpu().numpy(),
        }


def _fold(acc: _Accumulators, start: int, n_img: int, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor,
          n_patches: int, d_sae: int, m: int, seed: int, image_top: tuple[np.ndarray, np.ndarray]) -> None:
    """Fold one block's latents (rows = local image * n_patches + patch) into the accumulators."""
    dev = vals.device
    acc.n_patches_fired += torch.bincount(feats, minlength=d_sae)
    acc.act_sum += torch.bincount(feats, weights=vals.double(), minlength=d_sae)
    acc.act_max.scatter_reduce_(0, feats, vals, reduce="amax")
    # (image, feature) pairs: the image's strongest patch for the feature, through a dense
    # (images, features) block (a few MB), which leaves the pairs sorted by (image, feature)
    entry_key = (rows // n_patches) * d_sae + feats
    block_max = torch.zeros(n_img * d_sae, dtype=torch.float32, device=dev).scatter_reduce_(
        0, entry_key, vals, reduce="amax")
    pair_keys = block_max.nonzero().squeeze(1)
    pair_max = block_max[pair_keys]
    pair_feat, pair_img = pair_keys % d_sae, pair_keys // d_sae + start
    acc.n_images_fired += torch.bincount(pair_feat, minlength=d_sae)
    # top images: candidates that beat the current k-th, with their heatmaps
    order_key = value_keys(pair_max)
    cand = acc.top.admits(pair_feat, order_key, pair_img).nonzero().squeeze(1)
    if cand.numel():
        cand_of_key = torch.full((n_img * d_sae,), -1, dtype=torch.int64, device=dev)
        cand_of_key[pair_keys[cand]] = torch.arange(cand.numel(), device=dev)
        entry_cand = cand_of_key[entry_key]
        hit = entry_cand >= 0
        heat = torch.zeros((cand.numel(), n_patches), dtype=acc.top.payload.dtype, device=dev)
        heat[entry_cand[hit], rows[hit] % n_patches] = vals[hit].to(heat.dtype)
        acc.top.push(pair_feat[cand], order_key[cand], pair_img[cand], heat)
    # value bands: octave of the pair's value, reservoir by hash key
    lo, hi = BAND_EXPONENTS
    octave = torch.floor(torch.log2(pair_max)).clamp_(lo, hi - 1).long() - lo
    band_slot = pair_feat * (hi - lo) + octave
    acc.band_counts.view(-1).add_(torch.bincount(band_slot, minlength=acc.band_counts.numel()))
    keys = hash_keys(seed, pair_img, pair_feat)
    cand = acc.bands.admits(band_slot, keys, pair_img).nonzero().squeeze(1)
    acc.bands.push(band_slot[cand], keys[cand], pair_img[cand], pair_max[cand].unsqueeze(1))
    # per image: its m strongest features (ties in any order; -1 past the features that fired)
    values, features = block_max.view(n_img, d_sae).topk(min(m, d_sae), dim=1)
    feats_out, vals_out = image_top
    feats_out[start:start + n_img, :values.shape[1]] = torch.where(values > 0, features, -1).cpu().numpy()
    vals_out[start:start + n_img, :values.shape[1]] = values.cpu().numpy()


@dataclass(frozen=True)
class _Source:
    """What the pass reads: the store, and its patch tokens through the SAE (the layer it was trained on)."""

    encoder: TokenEncoder
    store: ActivationStore


def _open_source(cfg: IndexConfig, device: torch.device) -> _Source:
    """Load the SAE and open the store, checking that the layer has patch tokens of the SAE's width."""
    store = ActivationStore(cfg.store, cfg.storage_options)
    sae, norm, spec = load_on_store(cfg.sae, store, cfg.layer, device, cfg.storage_options)
    if norm is not None and norm.tokens == "cls":
        raise ConfigError(f"{cfg.sae} was trained on CLS tokens; the index needs patch tokens (heatmaps)")
    if spec.tokens.n_patches == 0:
        raise ConfigError(f"layer {spec.name} of {cfg.store} has no patch tokens to index")
    return _Source(TokenEncoder(sae, norm, spec, "patches"), store)


def block_bytes(src: _Source, cfg: IndexConfig) -> tuple[int, int]:
    """(fixed, per image) working bytes of the pass: its blocks of images follow from these and the budget.

    Fixed: the SAE, the accumulators (the top images' heatmaps twice: a merge may move every held one) and
    three store chunks (the one read and the two read ahead). Per image: its patches through the encoder
    (TokenEncoder.token_bytes), its dense (feature,) maxima and candidate slots, and its (image, feature)
    pairs with their heatmap rows, as many as the features that may fire on it."""
    enc, store, k = src.encoder, src.store, cfg.k
    f, p, d = enc.sae.cfg.d_sae, enc.spec.tokens.n_patches, enc.spec.d
    n_bands = BAND_EXPONENTS[1] - BAND_EXPONENTS[0]
    raw_image = enc.spec.tokens.n_tokens * d * torch_dtype(store.spec.dtype).itemsize
    accumulators = f * (28 + 8 * n_bands + k * (2 * 2 * p + 80) + n_bands * cfg.per_band * 90)
    fixed = enc.weight_bytes() + accumulators + 3 * store.spec.images_per_chunk * raw_image
    pairs = min(f, p * (enc.sae.cfg.k if enc.sae.cfg.sparse else f))
    return fixed, p * enc.token_bytes() + 12 * f + pairs * (2 * p + 96) + 3 * raw_image


def images_per_block(src: _Source, cfg: IndexConfig) -> int:
    """Images encoded and folded at once: as many as cfg.memory_gb holds (a one-line error if not one), up to
    what is worth encoding at once (TokenEncoder.most_images)."""
    fixed, per_image = block_bytes(src, cfg)
    return MemoryBudget.of(cfg.memory_gb).rows("index", fixed=fixed, per_row=per_image, row="image",
                                               at_most=min(src.store.n_images, src.encoder.most_images()))


def _run_pass(src: _Source, cfg: IndexConfig, block: int, ok: torch.Tensor, acc: _Accumulators,
              image_top: tuple[np.ndarray, np.ndarray], progress: bool) -> None:
    """Encode every patch, block by block in store order, and fold the latents of ok images into acc."""
    spec, store, d_sae = src.encoder.spec, src.store, src.encoder.sae.cfg.d_sae
    n_patches = spec.tokens.n_patches
    bar = tqdm(total=store.n_images * n_patches, desc="index", unit="patch", unit_scale=True, disable=not progress)
    with torch.inference_mode():
        for start, x in store.blocks(spec.name, block, whole_chunks=True):
            n_img = x.shape[0]
            rows, feats, vals = positive_entries(src.encoder.block(x))
            keep = ok[start:start + n_img].to(rows.device)[rows // n_patches]
            _fold(acc, start, n_img, rows[keep], feats[keep], vals[keep], n_patches, d_sae, cfg.m,
                  cfg.seed, image_top)
            del rows, feats, vals, keep
            bar.update(n_img * n_patches)
    bar.close()


def _ok_uris(uris: pa.ChunkedArray, ok: np.ndarray, rows: int = 65536) -> Iterator[str]:
    """The URIs of the ok images, a slice at a time (never a Python list of every image's)."""
    for s in range(0, len(uris), rows):
        yield from uris.slice(s, rows).filter(pa.array(ok[s:s + rows])).to_pylist()


def _index_meta(cfg: IndexConfig, src: _Source, uris: pa.ChunkedArray, ok: torch.Tensor,
                freq: np.ndarray) -> dict[str, Any]:
    """index.json: format, provenance, shapes, the density histogram and what the service needs to show images."""
    store, spec, sae = src.store, src.encoder.spec, src.encoder.sae
    backbone, dataset = store.attrs.get("backbone", {}), store.attrs.get("dataset", {})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "config": public_config(cfg),
        "store": redact(store.url), "sae": redact(cfg.sae), "sae_kind": sae.cfg.kind, "layer": spec.name,
        "tokens": "patches",
        "grid": list(spec.tokens.grid), "n_patches": spec.tokens.n_patches, "n_images": store.n_images,
        "n_images_ok": int(ok.sum()), "d_sae": sae.cfg.d_sae, "k": cfg.k, "m": cfg.m, "per_band": cfg.per_band,
        "band_exponents": list(BAND_EXPONENTS), "histogram": density_histogram(freq),
        "class_names": list(dataset.get("class_names", [])), "dataset_source": dataset.get("source"),
        "dataset_root": dataset_root(_ok_uris(uris, ok.numpy())),
        "preprocessing": backbone.get("preprocessing"), "backbone": {k: backbone.get(k) for k in ("family", "name")},
    }


def build_index(cfg: IndexConfig, progress: bool = True) -> Path:
    """Run the pass and write the index folder (built in a temporary sibling of this run's and renamed into
    place: a reader never sees half an index, two runs never clear each other's work); returns its path."""
    out = Path(normalize_url(cfg.out))
    with staged_folder(out, "a feature index", marked_by(META), cfg.overwrite) as tmp:
        _build(cfg, tmp, progress)
    return out


def _build(cfg: IndexConfig, tmp: Path, progress: bool) -> None:
    """The pass, writing the index into the folder `tmp`."""
    device = torch.device(cfg.device)
    src = _open_source(cfg, device)
    block = images_per_block(src, cfg)  # refuses a budget too small before anything is made
    n_images, n_patches = src.store.n_images, src.encoder.spec.tokens.n_patches
    table = src.store.images()
    ok = torch.from_numpy(ok_mask(table))
    acc = _Accumulators.empty(src.encoder.sae.cfg.d_sae, n_patches, cfg, device)
    # the per-image arrays grow with the dataset: written straight into the index's files, not held
    group = zarr.open_group(tmp / ARRAYS, mode="w")
    image_top = (_file_array(group, "image_features", (n_images, cfg.m), np.int32, -1),
                 _file_array(group, "image_values", (n_images, cfg.m), np.float32, 0))
    _run_pass(src, cfg, block, ok, acc, image_top, progress)
    src.store.close()
    for a in image_top:
        a.flush()
    features = acc.features(int(ok.sum()), n_patches)
    meta = _index_meta(cfg, src, table.column("uri"), ok, features.column("freq_patches").to_numpy())
    _write(tmp, group, meta, features, table.select(["index", "uri", "label", "status"]), acc.arrays())


def density_histogram(freq: np.ndarray) -> dict[str, Any]:
    """Histogram of log10 firing frequency of the features that fired; `dead` counts the rest."""
    fired = freq[freq > 0]
    if fired.size == 0:
        return {"edges": [], "counts": [], "dead": int(freq.size), "n_features": int(freq.size)}
    logf = np.log10(fired)
    lo = math.floor(logf.min() / HISTOGRAM_BIN) * HISTOGRAM_BIN
    n_bins = max(1, math.ceil((0 - lo) / HISTOGRAM_BIN - 1e-9))
    edges = np.round(lo + HISTOGRAM_BIN * np.arange(n_bins + 1), 6)
    counts = np.histogram(logf, bins=edges)[0]
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int(freq.size - fired.size),
            "n_features": int(freq.size)}


def _single_chunk(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: Any) -> zarr.Array:
    """An index array: one uncompressed chunk, so its chunk file is the raw C-order array."""
    return group.create_array(name, shape=shape, chunks=shape if 0 not in shape else None, dtype=dtype,
                              compressors=None, filters=None, config={"write_empty_chunks": True})


def _file_array(group: zarr.Group, name: str, shape: tuple[int, int], dtype: Any, fill: int) -> np.memmap:
    """A single-chunk index array written in place through a memory map of its chunk file."""
    _single_chunk(group, name, shape, dtype)
    chunk = Path(group.store.root) / group.path / name / "c" / "0" / "0"
    chunk.parent.mkdir(parents=True, exist_ok=True)
    a = np.memmap(chunk, dtype=np.dtype(dtype).newbyteorder("<"), mode="w+", shape=shape)
    a[:] = fill
    return a


def _write(tmp: Path, group: zarr.Group, meta: dict[str, Any], features: pa.Table, images: pa.Table,
           arrays: dict[str, np.ndarray]) -> None:
    pq.write_table(features, tmp / FEATURES)
    pq.write_table(images, tmp / IMAGES)
    write_image_table(tmp)
    for name, a in arrays.items():
        _single_chunk(group, name, a.shape, a.dtype)
        if a.size:  # the chunk file is the raw array: written straight from it, no encoded copy
            chunk = Path(group.store.root) / group.path / name / "c" / "/".join(["0"] * a.ndim)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tofile(chunk)
    (tmp / META).write_text(json.dumps(meta, indent=1))
