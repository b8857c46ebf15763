"""Which rows a rank delivers, and in which order: the epoch's chunk order, rank assignment, chunk plans, draws.

An epoch's chunk order is drawn from (seed, epoch), the same on every rank; rank r takes positions
r, r + world_size, ... of it. The shuffle buffer's draws come from (seed, epoch, rank). A chunk's
plan lists the rows it delivers: its images that are not rejected, the tokens asked for, and, with
a label filter, only the patches whose label is kept.
"""

from __future__ import annotations

import numpy as np

from actstore.errors import ConfigError
from actstore.loader._buffer import ChunkPlan
from actstore.loader._config import LoaderConfig
from actstore.store import ActivationStore, LayerSpec, ok_mask

_ORDER, _DRAWS = 1, 2  # seed-sequence tags of the chunk order and of the buffer's draws


class Selection:
    """The rows of one layer that a loader delivers (tokens, label filter, no rejected images), and their order."""

    def __init__(self, store: ActivationStore, layer: LayerSpec, cfg: LoaderConfig) -> None:
        spec, layout = store.spec, layer.tokens
        t0, t1 = {"patches": (int(layout.cls), layout.n_tokens), "cls": (0, int(layout.cls)),
                  "all": (0, layout.n_tokens)}[cfg.tokens]
        if t1 <= t0:
            raise ConfigError(f"layer {layer.name} has no {cfg.tokens} tokens")
        if cfg.label_filter is not None and not spec.has_labels:
            raise ConfigError(f"{store.url}: label_filter needs a store with per-patch labels; it has none")
        if cfg.world_size > spec.n_chunks:
            raise ConfigError(f"world_size {cfg.world_size} exceeds the store's {spec.n_chunks} chunks")
        self.store, self.spec, self.cfg, self.n_tokens = store, spec, cfg, layout.n_tokens
        self.tokens = (t0, t1)
        self.labels = None if cfg.label_filter is None else np.array(cfg.label_filter, np.int32)
        if store.attrs.get("summary", {}).get("n_rejected") == 0:  # no need to read the images table
            self.ok = np.ones(spec.n_images, bool)
        else:
            self.ok = ok_mask(store.images())
        self.max_chunk_rows = spec.images_per_chunk * (t1 - t0)
        starts = np.arange(0, spec.n_images, spec.images_per_chunk)
        # rows per chunk before the label filter (exact without one)
        self.upper_rows = (np.add.reduceat(self.ok.astype(np.int64), starts) * (t1 - t0)).astype(np.int64)
        self._rows: np.ndarray | None = None

    def most_rows(self) -> int:
        """An upper bound on a rank's rows per epoch: as many of the fullest chunks as a rank gets at most."""
        share = -(-self.spec.n_chunks // self.cfg.world_size)
        return int(np.sort(self.upper_rows)[::-1][:share].sum())

    def order(self, epoch: int) -> np.ndarray:
        """This rank's chunks of `epoch`, in stream order."""
        perm = np.random.default_rng([_ORDER, self.cfg.seed, epoch]).permutation(self.spec.n_chunks)
        return perm[self.cfg.rank::self.cfg.world_size]

    def draws(self, epoch: int) -> np.random.Generator:
        """The generator of this rank's buffer draws in `epoch`."""
        return np.random.default_rng([_DRAWS, self.cfg.seed, epoch, self.cfg.rank])

    def plan(self, i: int) -> ChunkPlan:
        """The rows chunk i delivers, in stream order (reads its labels when filtering)."""
        c0, c1 = self.spec.chunk_range(i)
        ok = self.ok[c0:c1]
        t0, t1 = self.tokens
        if self.labels is None and ok.all():
            n, nt = c1 - c0, t1 - t0
            return ChunkPlan(i, c0, np.repeat(np.arange(c0, c1, dtype=np.int32), nt),
                             np.tile(np.arange(t0, t1, dtype=np.int32), n), (n, t0, t1))
        keep = np.zeros((c1 - c0, self.n_tokens), bool)
        if self.labels is None:
            keep[ok, t0:t1] = True
        else:
            keep[:, t0:t1] = np.isin(self.store.labels(c0, c1), self.labels) & ok[:, None]
        img, tok = np.nonzero(keep)
        return ChunkPlan(i, c0, (img + c0).astype(np.int32), tok.astype(np.int32), None)

    def chunk_rows(self) -> np.ndarray:
        """Rows delivered per chunk (reads the labels once when filtering)."""
        if self._rows is None:
            if self.labels is None:
                self._rows = self.upper_rows
            else:
                ipc = self.spec.images_per_chunk
                rows, step = [], ipc * 256
                for a in range(0, self.spec.n_images, step):
                    b = min(a + step, self.spec.n_images)
                    keep = np.isin(self.store.labels(a, b), self.labels) & self.ok[a:b, None]
                    rows.append(np.add.reduceat(keep.sum(1), np.arange(0, b - a, ipc)))
                self._rows = np.concatenate(rows).astype(np.int64)
        return self._rows

    def epoch_rows(self) -> list[int]:
        """Rows this rank delivers in each epoch."""
        rows = self.chunk_rows()
        if self.cfg.world_size == 1:
            return [int(rows.sum())] * self.cfg.epochs
        return [int(rows[self.order(e)].sum()) for e in range(self.cfg.epochs)]
