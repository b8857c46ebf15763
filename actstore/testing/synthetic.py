"""Synthetic ViT-like activations, for the demo, tests and benchmarks.

Real ViT residual streams are roughly Gaussian per channel with channel-wise
offsets and scales, plus a few "massive" channels whose values are one to
two orders of magnitude larger (they set float16's headroom and defeat
naive compression). These arrays have the same shape of trouble.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
    """Two single-layer stores (layer "0", patch tokens only) over the same images, for testing the comparison:
    `n_shared` concepts in both, `n_private` of each store's own (write_planted_models). Returns the dictionaries
    ({"a": (n_shared + n_private, d_a), "b": ...}, shared atoms first) and the concept strengths per image."""
    concepts = [("a", "b")] * n_shared + [("a",)] * n_private + [("b",)] * n_private
    return write_planted_models({"a": url_a, "b": url_b}, concepts, n_images=n_images, grid=grid,
                                d={"a": d[0], "b": d[1]}, p_fire=p_fire, noise=noise, seed=seed)


def write_planted_models(urls: Mapping[str, str], concepts: Sequence[Collection[str]], n_images: int = 1200,
                         grid: tuple[int, int] = (2, 2), d: Mapping[str, int] | int = 24, p_fire: float = 0.15,
                         noise: float = 0.02, seed: int = 0) -> dict[str, np.ndarray]:
    """Single-layer stores (layer "0", patch tokens only), one per model of `urls`, over the same images, for
    testing comparisons: concept c fires on the same images, at the same patch and strength, in every model that
    `concepts[c]` names, and is absent from the others. Each model's patches are sums of atoms of its own
    dictionary (orthonormal rows, one per concept it has, width d[model]) plus Gaussian noise.

    Returns per model its dictionary ({model: (its concepts, d)}, in concept order) and its concepts' strengths
    per image ({"strength_<model>": (n_images, its concepts)})."""
    rng = np.random.default_rng(seed)
    n_patches = grid[0] * grid[1]
    strength = np.where(rng.random((n_images, len(concepts))) < p_fire,
                        rng.uniform(1, 3, (n_images, len(concepts))), 0.0).astype(np.float32)
    where = rng.integers(0, n_patches, (n_images, len(concepts)))
    uris = [f"synthetic://planted-{seed}/{i}" for i in range(n_images)]
    out: dict[str, np.ndarray] = {}
    for name, url in urls.items():
        width = d if isinstance(d, int) else d[name]
        mine = [c for c, models in enumerate(concepts) if name in models]
        atoms = np.linalg.qr(rng.standard_normal((width, len(mine))))[0].T.astype(np.float32)
        placed = np.zeros((n_images, n_patches, len(mine)), np.float32)
        np.put_along_axis(placed, where[:, None, mine], strength[:, None, mine], axis=1)  # one patch per concept
        acts = placed @ atoms + noise * rng.standard_normal((n_images, n_patches, width)).astype(np.float32)
        spec = StoreSpec(n_images=n_images, layers=(LayerSpec("0", width, TokenLayout(cls=False, grid=grid), 0),),
                         backbone={"family": "synthetic", "name": f"planted-{name}", "n_blocks": 1},
                         dataset={"source": "synthetic", "fingerprint": f"planted-{seed}"},
                         images_per_shard=min(256, n_images), dtype="float32")
        writer = StoreWriter.create(url, spec, overwrite=True)
        for k in range(spec.n_units):
            start, stop = spec.unit_range(k)
            writer.write_unit(k, {"0": acts[start:stop]}, images={"uri": uris[start:stop]})
        writer.finalize()
        out[name] = atoms
        out[f"strength_{name}"] = strength[:, mine]
    return out
