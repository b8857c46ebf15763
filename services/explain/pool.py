"""The images a feature does not fire on, known exactly: a seeded pool of the store's ok images, every patch encoded.

The index keeps what fired (top images, band samples, each image's strongest features), not what did not: an image
absent from a feature's top list may still fire it weakly. So the pool's images are read from the store chunk by
chunk and encoded through the same SAE the index used, a block of images at a time (TokenEncoder.most_images); for
each chosen feature, the pool images on which it is zero at every patch are its candidates for non-activating
examples. Memory: one (pool images, chosen features) bitmap, one chunk of tokens and one block's latents.
"""

from __future__ import annotations

import numpy as np
import torch

from actstore.store import ActivationStore, ok_mask
from sae import TokenEncoder, positive_entries

__all__ = ["SilentPool", "pool_bytes", "silent_pool"]


class SilentPool:
    """Per chosen feature, the pool images on which it is silent."""

    def __init__(self, images: np.ndarray, features: np.ndarray, fired: np.ndarray) -> None:
        self.images, self._column = images, {int(f): j for j, f in enumerate(features)}
        self._fired = fired  # (pool images, chosen features) bool

    def silent(self, fid: int) -> np.ndarray:
        """Image ids of the pool on which feature `fid` is zero at every patch."""
        return self.images[~self._fired[:, self._column[fid]]]


def pool_bytes(n_pool: int, n_features: int) -> int:
    """The bitmap's bytes (the chosen features' column map aside)."""
    return n_pool * n_features


def silent_pool(store: ActivationStore, encoder: TokenEncoder, features: np.ndarray, n_pool: int, seed: int
                ) -> SilentPool:
    """Draw `n_pool` ok images of `store` (seeded), encode their patches and record which chosen features fire."""
    ok = np.flatnonzero(ok_mask(store.images()))
    images = np.sort(np.random.default_rng(seed).choice(ok, min(n_pool, ok.size), replace=False))
    column = torch.full((encoder.sae.cfg.d_sae,), -1, dtype=torch.int64)
    column[torch.from_numpy(features.astype(np.int64))] = torch.arange(features.size)
    fired = np.zeros((images.size, features.size), bool)
    spec, n_patches = store.spec, encoder.spec.tokens.n_patches
    chunks, step = images // spec.images_per_chunk, encoder.most_images()
    for c in np.unique(chunks):
        start, _ = spec.chunk_range(int(c))
        rows_here = np.flatnonzero(chunks == c)
        x = store.read_chunk(encoder.spec.name, int(c))[torch.from_numpy(images[rows_here] - start)]
        for s in range(0, rows_here.size, step):  # as many images at once as the encoder's budget holds
            with torch.inference_mode():
                rows, feats, _ = positive_entries(encoder.block(x[s:s + step]))
            col = column[feats.cpu()]
            keep = col >= 0
            fired[rows_here[s + (rows.cpu()[keep] // n_patches).numpy()], col[keep].numpy()] = True
    return SilentPool(images, features, fired)
