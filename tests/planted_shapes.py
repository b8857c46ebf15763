"""The shapes images with planted features: a store, an SAE and its index whose features are known, for tests.

Every patch token of the store is a sum of orthonormal atoms plus small Gaussian noise. Three atoms are planted,
each one SAE feature (encoder row = decoder row = the atom, a small negative bias so that noise never fires it):

    red       on red shapes: every patch, with strength 2 x the share of the patch the shape's mask covers
    stripes   on striped shapes, the same way
    random    at one random patch of a random ~20% of the images, whatever they show (strength 1 to 3)

The other features are dead (their bias is far below any projection of the noise). The store records what
`actstore extract` records for an image folder (absolute file URIs, labels and class names from the class folders,
a preprocessing record of an exact resize to image_size and no crop), so that the index serves the images whole and
heatmap patch (r, c) covers rows r*H/gh..(r+1)*H/gh and columns c*W/gw..(c+1)*W/gw of the image as generated.

It lives with the tests, not in actstore.testing: it builds an SAE and an index (sae, services), which the
generators, upstream of both, may not import (tests/test_layout.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

from actstore.extract import Manifest, Preprocessor, build_manifest
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.shapes import generate_dataset
from sae import checkpoint
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from services.index import IndexConfig, build_index

__all__ = ["FEATURES", "PlantedShapes", "patch_coverage", "write_planted_shapes"]

FEATURES = {"red": 0, "stripes": 1, "random": 2}
"""The planted features' SAE ids."""
D, D_SAE = 16, 8
"""Width of the store's tokens and of the SAE."""
NOISE, BIAS, DEAD_BIAS = 0.01, -0.06, -10.0
"""Noise std per channel; the planted features' encoder bias (6 noise std: no false firing in ~10^5 patches);
the dead features' bias."""
STRENGTH, RANDOM_SHARE, RANDOM_STRENGTH = 2.0, 0.2, (1.0, 3.0)
"""Planted strength per unit of coverage; share of the images and strength range of the random feature."""
SHARD = 64
"""Images per store unit: a few units at the default size, as a real store has."""


@dataclass(frozen=True)
class PlantedShapes:
    """What write_planted_shapes wrote under its root."""

    images: str
    """The generated shapes dataset folder (actstore.testing.shapes.generate_dataset)."""
    masks: str
    """Its segmentation masks folder (same relative paths as the images)."""
    store: str
    """The activation store over those images (layer "0", patch tokens only, float32)."""
    sae: str
    """Our SAE checkpoint folder (kind relu, no input normalization) whose features FEATURES are the planted ones."""
    index: str
    """`actstore index` of that SAE over that store (services.index.build_index)."""
    features: dict[str, int]
    """{"red": 0, "stripes": 1, "random": 2}."""
    factors: pa.Table
    """The dataset's factors (path, shape, color, texture, ...), row i = store image i."""


def write_planted_shapes(root: str, n_images: int = 240, seed: int = 0, image_size: int = 96,
                         grid: tuple[int, int] = (6, 6), k: int = 16) -> PlantedShapes:
    """Generate the images, write the store and the SAE, index them, all under `root` (a fresh folder)."""
    root = os.path.abspath(root)
    images, masks, store, sae, index = (os.path.join(root, n) for n in ("images", "masks", "store", "sae", "index"))
    generated = generate_dataset(images, n_images, seed, image_size, masks=masks)
    manifest = build_manifest(images)  # what extraction reads: its URIs, labels and class names
    factors = _in_order(generated.factors, manifest.uris, images)
    coverage = np.stack([patch_coverage(np.asarray(Image.open(os.path.join(masks, p))) > 0, grid)
                         for p in factors.column("path").to_pylist()]).reshape(n_images, -1)
    rng = np.random.default_rng(seed)
    atoms = np.linalg.qr(rng.standard_normal((D, D_SAE)))[0].T.astype(np.float32)  # (D_SAE, D), orthonormal rows
    strength = _strengths(factors, coverage, rng)
    acts = strength @ atoms[:len(FEATURES)] + NOISE * rng.standard_normal((*coverage.shape, D)).astype(np.float32)
    _write_store(store, acts, manifest, image_size, grid, seed)
    _write_sae(sae, atoms, ActivationStore(store))
    build_index(IndexConfig(store, sae, out=index, k=k), progress=False)
    return PlantedShapes(images, masks, store, sae, index, dict(FEATURES), factors)


def patch_coverage(inside: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw) share of each patch that the boolean (H, W) mask covers; patch (r, c) holds rows r*H//gh up to
    (r+1)*H//gh and columns c*W//gw up to (c+1)*W//gw."""
    (h, w), (gh, gw) = inside.shape, grid
    rows, cols = np.arange(gh) * h // gh, np.arange(gw) * w // gw
    sums = np.add.reduceat(np.add.reduceat(inside.astype(np.float64), rows, axis=0), cols, axis=1)
    heights, widths = np.diff([*rows, h]), np.diff([*cols, w])
    return sums / np.outer(heights, widths)


def _in_order(factors: pa.Table, uris: list[str], images: str) -> pa.Table:
    """The factors' rows in the manifest's (= the store's) order."""
    row = {path: i for i, path in enumerate(factors.column("path").to_pylist())}
    return factors.take([row[os.path.relpath(uri, images).replace(os.sep, "/")] for uri in uris])


def _strengths(factors: pa.Table, coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n_images, n_patches, len(FEATURES)) float32: each planted atom's strength at each patch."""
    n_images, n_patches = coverage.shape
    out = np.zeros((n_images, n_patches, len(FEATURES)), np.float32)
    red = np.array(factors.column("color").to_pylist()) == "red"
    stripes = np.array(factors.column("texture").to_pylist()) == "stripes"
    out[red, :, FEATURES["red"]] = STRENGTH * coverage[red]
    out[stripes, :, FEATURES["stripes"]] = STRENGTH * coverage[stripes]
    chosen = np.flatnonzero(rng.random(n_images) < RANDOM_SHARE)
    where = rng.integers(0, n_patches, chosen.size)
    out[chosen, where, FEATURES["random"]] = rng.uniform(*RANDOM_STRENGTH, chosen.size)
    return out


def _write_store(url: str, acts: np.ndarray, manifest: Manifest, image_size: int, grid: tuple[int, int],
                 seed: int) -> None:
    """A one-layer store of `acts` recording the images as `actstore extract` records an image folder."""
    # the model's input: an exact resize to the images' own size, no crop, so the service shows each image whole
    model_input = Compose([Resize((image_size, image_size), InterpolationMode.BICUBIC), ToTensor(),
                           Normalize((0.5,) * 3, (0.5,) * 3)])
    backbone = {"family": "synthetic", "name": "planted-shapes", "n_blocks": 1, "init_seed": seed,
                "preprocessing": Preprocessor.from_transform(model_input, image_size).describe()}
    dataset = {"source": manifest.source, "fingerprint": manifest.fingerprint,
               "class_names": list(manifest.class_names)}
    layer = LayerSpec("0", acts.shape[-1], TokenLayout(cls=False, grid=grid), 0)
    spec = StoreSpec(n_images=len(manifest), layers=(layer,), dtype="float32",
                     images_per_shard=min(SHARD, len(manifest)), backbone=backbone, dataset=dataset)
    writer = StoreWriter.create(url, spec)
    for u in range(spec.n_units):
        a, b = spec.unit_range(u)
        rows = {"uri": manifest.uris[a:b], "label": manifest.labels[a:b].tolist(),
                "width": [image_size] * (b - a), "height": [image_size] * (b - a)}
        writer.write_unit(u, {"0": acts[a:b]}, images=rows)
    writer.finalize()


def _write_sae(url: str, atoms: np.ndarray, store: ActivationStore) -> None:
    """A relu SAE whose encoder and decoder rows are the atoms: feature j reads atom j's strength minus a margin."""
    sae = SparseAutoencoder(SAEConfig(d_in=atoms.shape[1], d_sae=atoms.shape[0], kind="relu"))
    bias = np.full(atoms.shape[0], DEAD_BIAS, np.float32)
    bias[:len(FEATURES)] = BIAS
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(atoms))
        sae.W_dec.copy_(torch.from_numpy(atoms))
        sae.b_enc.copy_(torch.from_numpy(bias))
    checkpoint.save(sae, url, extra=checkpoint.origin(store, "0"))
