"""The feature index against a brute-force numpy computation over the same store and SAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.budget import GB
from actstore.errors import ConfigError, CorruptDataError
from actstore.loader import Normalization
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from sae import checkpoint
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from services.index import BAND_EXPONENTS, IndexConfig, build_index
from services.index.build import _open_source, block_bytes
from services.index.layout import open_array, read_index_meta

N, GRID, D, F = 52, (3, 4), 16, 48
P = GRID[0] * GRID[1]
REJECTED = (5, 17, 40, 48, 49, 50, 51)  # the last unit (images 48-51) is all rejected


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """52 images (7 rejected: the last unit wholly) of CLS + 3x4 patches, d=16, in units of 16 and chunks of 4 images."""
    url = str(tmp_path_factory.mktemp("index") / "store")
    spec = StoreSpec(n_images=N, layers=(LayerSpec("3", D, TokenLayout(cls=True, grid=GRID), 3),),
                     backbone={"family": "synthetic", "name": "test", "n_blocks": 4},
                     dataset={"source": "synthetic", "fingerprint": "t"}, images_per_shard=16, images_per_chunk=4)
    writer = StoreWriter.create(url, spec)
    rng = np.random.default_rng(0)
    for k in range(spec.n_units):
        start, stop = spec.unit_range(k)
        status = ["rejected" if i in REJECTED else "ok" for i in range(start, stop)]
        acts = rng.standard_normal((stop - start, 1 + P, D)).astype(np.float32) * rng.uniform(0.2, 3, (1, 1, D))
        writer.write_unit(k, {"3": acts}, images={"status": status,
                                                 "reason": ["bad: test" if s != "ok" else "" for s in status]})
    writer.finalize()
    return url


def save_sae(store: str, path: str, kind: str, seed: int = 0, tokens: str = "patches") -> SparseAutoencoder:
    s = ActivationStore(store)
    norm = Normalization.from_stats(s.stats("3", "patches"), "3", tokens)
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=F, kind=kind, k=5, init_seed=seed))
    with torch.no_grad():  # spread the biases so features differ in density
        sae.b_enc.copy_(torch.linspace(-1.5, 0.5, F))
        sae.b_enc[0] = -1e3  # a dead feature
    checkpoint.save(sae, path, normalization=norm, extra=checkpoint.origin(s, "3", tokens))
    return sae


def brute_force(store: str, sae: SparseAutoencoder) -> dict[str, np.ndarray]:
    """Dense latents of every patch, then everything the index claims, by plain numpy."""
    s = ActivationStore(store)
    norm = Normalization.from_stats(s.stats("3", "patches"), "3", "patches")
    x = s.read("3")[:, 1:].reshape(-1, D).float()
    with torch.no_grad():
        acts = sae.encode(norm.apply(x))
        dense = (acts.to_dense() if hasattr(acts, "to_dense") else acts).numpy().reshape(N, P, F)
    ok = np.array([i not in REJECTED for i in range(N)])
    dense = np.where(ok[:, None, None], np.maximum(dense, 0), 0)
    per_image = dense.max(axis=1)  # (N, F)
    return {"dense": dense, "per_image": per_image, "ok": ok}


def splitmix_key(seed: int, image: int, feature: int) -> int:
    """The band samples' hash, written independently with Python integers."""
    m = (1 << 64) - 1
    x = (image * 0x9E3779B1 + feature * 0x85EBCA77 + seed * 0xC2B2AE3D) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    x ^= x >> 31
    return x & 0xFFFFFFFF


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_index_equals_brute_force(store, tmp_path, kind):
    sae = save_sae(store, str(tmp_path / "sae"), kind)
    k, m, per_band = 6, 5, 3
    out = build_index(IndexConfig(store, str(tmp_path / "sae"), str(tmp_path / "index"), k=k, m=m, per_band=per_band,
                                  seed=7), progress=False)
    ref = brute_force(store, sae)
    dense, per_image, ok = ref["dense"], ref["per_image"], ref["ok"]
    meta = read_index_meta(out)
    assert (meta["n_images"], meta["n_images_ok"], meta["d_sae"], meta["grid"]) == (N, N - len(REJECTED), F, list(GRID))

    import pyarrow.parquet as pq
    feats = pq.read_table(out / "features.parquet").to_pydict()
    fired = (dense > 0).sum(axis=(0, 1))
    np.testing.assert_array_equal(feats["n_patches_fired"], fired)
    np.testing.assert_array_equal(feats["n_images_fired"], (per_image > 0).sum(0))
    np.testing.assert_allclose(feats["freq_patches"], fired / (ok.sum() * P))
    np.testing.assert_allclose(feats["freq_images"], (per_image > 0).sum(0) / ok.sum())
    np.testing.assert_allclose(feats["max_act"], dense.max(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(feats["mean_act"], dense.sum(axis=(0, 1)) / np.maximum(fired, 1), rtol=1e-4)
    assert 0 < (fired > 0).sum() < F, "the test SAE should have dead and live features"

    top_images, top_values, heat = (open_array(out, n) for n in ("top_images", "top_values", "heatmaps"))
    band_images, band_values, band_counts = (open_array(out, n) for n in ("band_images", "band_values", "band_counts"))
    lo, hi = BAND_EXPONENTS
    for f in range(F):
        live = np.flatnonzero(per_image[:, f] > 0)
        order = live[np.lexsort((live, -per_image[live, f]))][:k]  # value desc, then image asc
        np.testing.assert_array_equal(top_images[f, :order.size], order)
        assert (top_images[f, order.size:] == -1).all()
        np.testing.assert_allclose(top_values[f, :order.size], per_image[order, f], rtol=1e-6)
        np.testing.assert_allclose(heat[f, :order.size], dense[order, :, f], rtol=2e-3, atol=1e-3)
        octave = np.clip(np.floor(np.log2(per_image[live, f])), lo, hi - 1).astype(int) - lo
        np.testing.assert_array_equal(band_counts[f], np.bincount(octave, minlength=hi - lo))
        for b in range(hi - lo):
            members = live[octave == b]
            want = sorted(members, key=lambda i: (splitmix_key(7, int(i), f), i))[:per_band]
            got = band_images[f, b][band_images[f, b] >= 0]
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(band_values[f, b, :len(got)], per_image[got, f], rtol=1e-6)

    image_features, image_values = open_array(out, "image_features"), open_array(out, "image_values")
    for i in range(N):
        live = np.flatnonzero(per_image[i] > 0)
        order = live[np.lexsort((live, -per_image[i, live]))][:m]
        np.testing.assert_array_equal(image_features[i, :order.size], order)
        assert (image_features[i, order.size:] == -1).all()
        np.testing.assert_allclose(image_values[i, :order.size], per_image[i, order], rtol=1e-6)

    hist = meta["histogram"]
    assert sum(hist["counts"]) == (fired > 0).sum() and hist["dead"] == (fired == 0).sum()
    logf = np.log10(fired[fired > 0] / (ok.sum() * P))
    np.testing.assert_array_equal(hist["counts"], np.histogram(logf, bins=hist["edges"])[0])


def test_block_size_and_layout_do_not_change_the_index(store, tmp_path):
    """Merges across blocks give what one block gives; plain zarr reads the memory-mapped arrays."""
    save_sae(store, str(tmp_path / "sae"), "topk", seed=1)
    fixed, per_image = _block_bytes(store, tmp_path / "sae")
    # a budget of one image and a half per block (53 blocks, most inside a store chunk), and one of every image
    outs = [build_index(IndexConfig(store, str(tmp_path / "sae"), str(tmp_path / f"i{n}"), k=4,
                                    memory_gb=(fixed + n * per_image) / GB), progress=False) for n in (1.5, 10_000)]
    for name in ("top_images", "top_values", "heatmaps", "band_images", "band_values", "band_counts",
                 "image_features", "image_values"):
        a, b = open_array(outs[0], name), open_array(outs[1], name)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(zarr.open_array(outs[0] / "arrays" / name, mode="r")[...], a)


def _block_bytes(store: str, sae: Path) -> tuple[int, int]:
    """The index pass's (fixed, per image) working bytes on this store and SAE."""
    cfg = IndexConfig(store, str(sae), "unused")
    return block_bytes(_open_source(cfg, torch.device("cpu")), cfg)


def test_bad_inputs_are_refused_with_one_line(store, tmp_path):
    save_sae(store, str(tmp_path / "sae"), "topk")
    fixed, _ = _block_bytes(store, tmp_path / "sae")
    with pytest.raises(ConfigError, match=r"^index: --memory-gb \S+ is too small: .* per image; give at least"):
        build_index(IndexConfig(store, str(tmp_path / "sae"), str(tmp_path / "small"), memory_gb=fixed / GB),
                    progress=False)
    assert not (tmp_path / "small").exists()
    out = build_index(IndexConfig(store, str(tmp_path / "sae"), str(tmp_path / "index"), k=2), progress=False)
    with pytest.raises(ConfigError, match="already there"):
        build_index(IndexConfig(store, str(tmp_path / "sae"), str(out)), progress=False)
    with pytest.raises(ConfigError, match="local folder"):
        IndexConfig(store, str(tmp_path / "sae"), "s3://bucket/index")
    with pytest.raises(ConfigError, match="k must be"):
        IndexConfig(store, str(tmp_path / "sae"), str(out), k=0)
    other = SparseAutoencoder(SAEConfig(d_in=D + 1, d_sae=F, kind="topk", k=2))
    checkpoint.save(other, str(tmp_path / "wide"), normalization=Normalization("3", "patches", torch.zeros(D + 1), 1.0),
                    extra=checkpoint.origin(ActivationStore(store), "3"))
    with pytest.raises(ConfigError, match="reads 17-wide activations; layer 3 of"):
        build_index(IndexConfig(store, str(tmp_path / "wide"), str(tmp_path / "x")), progress=False)
    save_sae(store, str(tmp_path / "cls"), "topk", tokens="cls")
    with pytest.raises(ConfigError, match="CLS"):
        build_index(IndexConfig(store, str(tmp_path / "cls"), str(tmp_path / "y")), progress=False)
    chunk = out / "arrays" / "heatmaps" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(CorruptDataError, match="heatmaps"):
        open_array(out, "heatmaps")
    (out / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(Exception, match="not an actstore-index"):
        read_index_meta(out)
