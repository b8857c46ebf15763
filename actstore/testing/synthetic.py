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
