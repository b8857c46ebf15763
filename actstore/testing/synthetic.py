"""Synthetic ViT-like activations, for the demo, tests and benchmarks.

Real ViT residual streams are roughly Gaussian per channel with channel-wise
offsets and scales, plus a few "massive" channels whose values are one to
two orders of magnitude larger (they set float16's headroom and defeat
naive compression). These arrays have the same shape of trouble.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from actstore.store import LayerSpec, StoreSpec, StoreWriter, TokenLayout


def vit_like_activations(n_images: int, n_tokens: int, d: int, seed: int = 0, n_heavy: int = 4,
                         heavy_scale: float = 60.0) -> np.ndarray:
    """(n_images, n_tokens, d) float32: Gaussian bulk, channel offsets, a few heavy-tailed channels."""
    rng = np.random.default_rng(seed)
    chan = np.random.default_rng(1234 + d)  # channel structure depends on d only, like one model's layer
    scale = chan.lognormal(0.0, 0.5, d).astype(np.float32)
    offset = chan.normal(0.0, 0.5, d).astype(np.float32)
    heavy = chan.choice(d, size=min(n_heavy, d), replace=False)
    x = rng.standard_normal((n_images, n_tokens, d), dtype=np.float32)
    x *= scale
    x += offset
    # heavy channels: large, positive-skewed magnitudes on a random subset of tokens
    tail = rng.lognormal(0.0, 1.0, (n_images, n_tokens, len(heavy))).astype(np.float32)
    x[..., heavy] += heavy_scale * tail * (rng.random((n_images, n_tokens, 1)) < 0.1)
    return x


def write_synthetic_store(url: str, n_images: int = 512, grid: tuple[int, int] = (14, 14), d: int = 384,
                          layer: int = 10, n_blocks: int = 12, seed: int = 0, progress: bool = True,
                          storage_options: dict[str, Any] | None = None, overwrite: bool = True,
                          **spec_kwargs: Any) -> StoreSpec:
    """Write a complete single-layer store of vit_like_activations (CLS + grid patches)."""
    tokens = TokenLayout(cls=True, grid=grid)
    spec = StoreSpec(n_images=n_images, layers=(LayerSpec(str(layer), d, tokens, layer),),
                     backbone={"family": "synthetic", "name": f"vit-like-d{d}", "n_blocks": n_blocks, "init_seed": seed},
                     dataset={"source": "synthetic", "fingerprint": f"synthetic-{seed}"}, **spec_kwargs)
    writer = StoreWriter.create(url, spec, storage_options, overwrite=overwrite)
    for k in tqdm(range(spec.n_units), desc="write", unit="unit", disable=not progress):
        start, stop = spec.unit_range(k)
        acts = vit_like_activations(stop - start, tokens.n_tokens, d, seed=seed * 100_003 + k)
        writer.write_unit(k, {str(layer): acts})
    writer.finalize()
    return spec


def write_planted_pair(url_a: str, url_b: str, n_images: int = 1200, grid: tuple[int, int] = (2, 2),
                       d: tuple[int, int] = (24, 32), n_shared: int = 6, n_private: int = 4, p_fire: float = 0.15,
                       noise: float = 0.02, seed: int = 0) -> dict[str, np.ndarray]:
    """Two single-layer stores (layer "0", patch tokens only) over the same images, for testing the comparison.

    Each store's patches are sums of atoms of its own dictionary (orthonormal rows, sizes d[0] and d[1]):
    `n_shared` concepts fire on the same images, at the same patch and strength, in both stores; each store
    also has `n_private` concepts of its own that fire independently. Returns the dictionaries
    ({"a": (n_shared + n_private, d_a), "b": ...}, shared atoms first) and the concept strengths per image.
    """
    rng = np.random.default_rng(seed)
    n_patches = grid[0] * grid[1]

    def concepts(n: int) -> tuple[np.ndarray, np.ndarray]:
        strength = np.where(rng.random((n_images, n)) < p_fire, rng.uniform(1, 3, (n_images, n)), 0.0)
        return strength.astype(np.float32), rng.integers(0, n_patches, (n_images, n))

    shared = concepts(n_shared)
    out: dict[str, np.ndarray] = {}
    for name, url, width in (("a", url_a, d[0]), ("b", url_b, d[1])):
        atoms = np.linalg.qr(rng.standard_normal((width, n_shared + n_private)))[0].T.astype(np.float32)
        private = concepts(n_private)
        strength = np.concatenate([shared[0], private[0]], axis=1)
        where = np.concatenate([shared[1], private[1]], axis=1)
        placed = np.zeros((n_images, n_patches, n_shared + n_private), np.float32)
        np.put_along_axis(placed, where[:, None, :], strength[:, None, :], axis=1)  # one patch per concept
        acts = placed @ atoms + noise * rng.standard_normal((n_images, n_patches, width)).astype(np.float32)
        spec = StoreSpec(n_images=n_images, layers=(LayerSpec("0", width, TokenLayout(cls=False, grid=grid), 0),),
                         backbone={"family": "synthetic", "name": f"planted-{name}", "n_blocks": 1},
                         dataset={"source": "synthetic", "fingerprint": f"planted-{seed}"},
                         images_per_shard=min(256, n_images), dtype="float32")
        writer = StoreWriter.create(url, spec, overwrite=True)
        uris = [f"synthetic://planted-{seed}/{i}" for i in range(n_images)]
        for k in range(spec.n_units):
            start, stop = spec.unit_range(k)
            writer.write_unit(k, {"0": acts[start:stop]}, images={"uri": uris[start:stop]})
        writer.finalize()
        out[name] = atoms
        out[f"strength_{name}"] = strength
    return out
