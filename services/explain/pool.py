"""The images a feature does not fire on, known exactly: a seeded pool of the store's ok images, every patch encoded.

The index keeps what fired (top images, band samples, each image's strongest features), not what did not: an image
absent from a feature's top list may still fire it weakly. So the pool's images are read from the store chunk by
chunk and encoded through the same SAE the index used, a block of images at a time (TokenEncoder.most_images); for
each chosen feature, the pool images on which it is zero at every patch are its candidates for non-activating
examples. Memory: one (pool images, chosen features) bitmap, one chunk of tokens and one block's latents, the block
sized by the run's --memory-gb (images_per_block).
"""

from __future__ import annotations

import numpy as np
import torch

from actstore.budget import MemoryBudget
from actstore.store import ActivationStore, ok_mask, torch_dtype
from sae import TokenEncoder, positive_entries

__all__ = ["SilentPool", "images_per_block", "silent_pool"]


class SilentPool:
    """Per chosen feature, the pool images on which it is silent."""

    def __init__(self, images: np.ndarray, features: np.ndarray, fired: np.ndarray) -> None:
        self.images, self._column = images, {int(f): j for j, f in enumerate(features)}
        self._fired = fired  # (pool images, chosen features) bool

    def silent(self, fid: int) -> np.ndarray:
        """Image ids of the pool on which feature `fid` is zero at every patch."""
        return self.images[~self._fired[:, self._column[fid]]]


def images_per_block(store: ActivationStore, encoder: TokenEncoder, n_pool: int, n_features: int,
                     memory_gb: float | None) -> int:
    """Pool images encoded at once: as many as `memory_gb` holds (a one-line error if not one) beside the fixed part
    (the SAE, the bitmap, one chunk of tokens as stored), up to what is worth encoding at once."""
    spec = store.spec
    chunk = spec.images_per_chunk * encoder.spec.tokens.n_tokens * encoder.spec.d * torch_dtype(spec.dtype).itemsize
    fixed = encoder.weight_bytes() + n_pool * n_features + chunk
    return MemoryBudget.of(memory_gb).rows("explain", fixed=fixed, per_row=encoder.per_image * encoder.token_bytes(),
                                           row="image", at_most=encoder.most_images())


def silent_pool(store: ActivationStore, encoder: TokenEncoder, features: np.ndarray, n_pool: int, seed: int,
                step: int) -> SilentPool:
    """Draw `n_pool` ok images of `store` (seeded), encode their patches `step` images at a time
    (images_per_block) and record which chosen features fire."""
    ok = np.flatnonzero(ok_mask(store.images()))
    images = np.sort(np.random.default_rng(seed).choice(ok, min(n_pool, ok.size), replace=False))
    column = torch.full((encoder.sae.cfg.d_sae,), -1, dtype=torch.int64)
    column[torch.from_numpy(features.astype(np.int64))] = torch.arange(features.size)
    fired = np.zeros((images.size, features.size), bool)
    spec, n_patches = store.spec, encoder.spec.tokens.n_patches
    chunks = images // spec.images_per_chunk
    for c in np.unique(chunks):
        start, _ = spec.chunk_range(int(c))
        rows_here = np.flatnonzero(chunks == c)
        x = store.read_chunk(encoder.spec.name, int(c))[torch.from_numpy(images[rows_here] - start)]
        for s in range(0, rows_here.size, step):
            with torch.inference_mode():
                rows, feats, _ = positive_entries(encoder.block(x[s:s + step]))
            col = column[feats.cpu()]
            keep = col >= 0
            fired[rows_here[s + (rows.cpu()[keep] // n_patches).numpy()], col[keep].numpy()] = True
    return SilentPool(images, features, fired)
