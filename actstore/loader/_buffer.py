"""The shuffle buffer: row slots in the stored dtype, uniform draws without replacement, exact bookkeeping.

Everything here works on whole index arrays (numpy), never on one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actstore.loader._config import Normalization

TORCH_GRAIN = 32767
"""torch runs element-wise ops on fewer elements serially, in the calling thread."""


def copy_rows(dst: torch.Tensor, src: torch.Tensor, norm: Normalization | None = None) -> None:
    """dst[:] = src (normalized), converting dtype, in the calling thread.

    Row blocks stay below torch's parallel grain (32768 elements): larger element-wise ops start an
    OpenMP team per call, which spin-waits for cores and slows a busy machine down by 10x or more.
    """
    step = max(1, TORCH_GRAIN // dst.shape[1])
    for s in range(0, len(dst), step):
        x = src[s:s + step]
        if norm is not None:
            x = (x.float() - norm.mean) * norm.scale
        dst[s:s + step].copy_(x)


@dataclass(frozen=True)
class ChunkPlan:
    """Which rows of chunk `chunk` (first image `start`) are delivered, in stream order."""

    chunk: int
    start: int
    img: np.ndarray
    tok: np.ndarray
    block: tuple[int, int, int] | None
    """(n_images, t0, t1) when the rows are exactly chunk[:n_images, t0:t1] (no copy needed)."""

    @property
    def n_rows(self) -> int:
        return len(self.img)

    def rows(self, chunk: np.ndarray) -> np.ndarray:
        if self.block is not None:
            n, t0, t1 = self.block
            return chunk[:n, t0:t1]
        return chunk[self.img - self.start, self.tok]


class ShuffleBuffer:
    """Row slots (stored dtype) with their (image, token); `live[:n_live]` lists the occupied slots.

    Every operation works on index arrays; a resume's replay runs only the bookkeeping (put, take,
    never write), with exactly the same random draws.
    """

    def __init__(self, capacity: int, d: int, dtype: np.dtype) -> None:
        self.capacity, self.d, self.dtype = capacity, d, dtype
        self.data: np.ndarray | None = None
        self.img = np.empty(capacity, np.int32)
        self.tok = np.empty(capacity, np.int32)
        self.live = np.empty(capacity, np.int32)  # capacity < 2**31 rows (3 TB of bf16 rows of 768)
        self.free = np.empty(capacity, np.int32)
        self.reset()

    def reset(self) -> None:
        self.n_live, self.n_free = 0, self.capacity
        self.free[:] = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)

    def allocate(self) -> np.ndarray:
        if self.data is None:
            self.data = np.empty((self.capacity, self.d), self.dtype)
        return self.data

    def put(self, plan: ChunkPlan) -> np.ndarray:
        """Admit a chunk's rows: the slots they take (in order), recorded as live; `write` fills them."""
        n = plan.n_rows
        slots = self.free[self.n_free - n:self.n_free].copy()
        self.n_free -= n
        self.img[slots], self.tok[slots] = plan.img, plan.tok
        self.live[self.n_live:self.n_live + n] = slots
        self.n_live += n
        return slots

    def write(self, slots: np.ndarray, plan: ChunkPlan, chunk: np.ndarray) -> None:
        """Copy a decoded chunk's rows into the slots `put` gave them (chunks of one refill may go in parallel)."""
        rows = plan.rows(chunk)
        self.data[slots.reshape(rows.shape[:-1])] = rows

    def take(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct occupied slots, uniformly at random and in random order; they become free.

        rng.choice(n, k, replace=False) is exact and costs O(k) (Floyd's algorithm) while k <= n/50,
        the steady state of a large buffer, and O(n) only when the buffer is small or draining.
        The drawn places are refilled from the last k places of `live` (vectorized swap-remove).
        """
        pos = rng.choice(self.n_live, k, replace=False)
        slots = self.live[pos]
        rest = self.n_live - k
        in_tail = np.ones(k, bool)
        in_tail[pos[pos >= rest] - rest] = False
        self.live[pos[pos < rest]] = self.live[rest:self.n_live][in_tail]  # swap-remove
        self.n_live = rest
        self.free[self.n_free:self.n_free + k] = slots
        self.n_free += k
        return slots
