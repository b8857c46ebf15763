"""Batch assembly: the drawn buffer rows gathered into a host batch, converted (and normalized) in parallel.

Output arrays are pooled without counting references: each batch is a fresh numpy view of a pooled
array, and a weakref finalizer on that view puts the array back once the view is gone, which is when
no batch tensor, slice or storage made from it is left. A caller that keeps its batches never sees
them overwritten; one that drops them gets its memory reused.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from actstore.loader._buffer import ShuffleBuffer, copy_rows
from actstore.loader._config import OUT_DTYPES, Normalization
from actstore.store import from_storage, torch_dtype

_BLOCK_ROWS = 512  # rows per gather block: the 16-bit staging block stays in L2
_POOL_POLLS = 20  # ms to wait for the caller's previous batch before allocating another output array


class BatchAssembler:
    """Gathers batches of `d`-wide rows stored as `stored` (a store dtype name) into `host_dtype` tensors."""

    def __init__(self, d: int, stored: str, host_dtype: torch.dtype, pin: bool, batch_size: int, prefetch: int,
                 threads: int, pool: ThreadPoolExecutor) -> None:
        self.d, self.stored, self.host_dtype, self.pin = d, stored, host_dtype, pin
        self.same_dtype = host_dtype == torch_dtype(stored)  # gathers are plain copies unless normalizing
        self.batch_size, self.prefetch, self.threads, self.pool = batch_size, prefetch, threads, pool
        self._free: deque[np.ndarray] = deque()  # pooled arrays no batch refers to (appended by finalizers)
        self._pooled = 0  # arrays in the pool: the caller's batch and those ahead of it, prefetch + 1

    def gather(self, buf: ShuffleBuffer, slots: np.ndarray, norm: Normalization | None) -> torch.Tensor:
        """data[slots] converted to the host dtype (normalized on the host when `norm`), in parallel blocks."""
        x, out = self._out(len(slots))
        parts = np.array_split(np.arange(len(slots)), self.threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
        futures = [self.pool.submit(self._gather_part, buf.data, slots, out, norm, a, b) for a, b in bounds[1:]]
        self._gather_part(buf.data, slots, out, norm, *bounds[0])
        for f in futures:
            f.result()
        return x

    def _out(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """A host batch tensor and a numpy view to write it; pooled arrays are reused once unreferenced."""
        np_dtype = OUT_DTYPES[self.host_dtype]
        if self.pin:
            t = torch.empty((n, self.d), dtype=self.host_dtype, pin_memory=True)
            view = t.view(torch.int16).numpy().view(np.uint16) if np_dtype is np.uint16 else t.numpy()
            return t, view
        arr = None
        if n == self.batch_size:
            arr = self._take_free()
            polls = _POOL_POLLS if self._pooled > self.prefetch else 0
            while arr is None and polls:  # the caller lets go of its last batch right after next() returns
                time.sleep(0.001)
                polls -= 1
                arr = self._take_free()
            if arr is None and self._pooled <= self.prefetch:
                arr = np.empty((n, self.d), np_dtype)
                self._pooled += 1
        if arr is None:  # a partial batch, or every pooled array still held: fresh memory
            view = np.empty((n, self.d), np_dtype)
        else:
            view = arr[:]
            weakref.finalize(view, self._free.append, arr)  # back in the pool once the batch is gone
        t = torch.from_numpy(view)
        return (t.view(torch.bfloat16) if np_dtype is np.uint16 else t), view

    def release(self) -> None:
        """Drop the pooled arrays no batch refers to (the loader is closing)."""
        self._free.clear()

    def _take_free(self) -> np.ndarray | None:
        try:
            return self._free.popleft()
        except IndexError:
            return None

    def _gather_part(self, data: np.ndarray, slots: np.ndarray, out: np.ndarray, norm: Normalization | None,
                     a: int, b: int) -> None:
        """Rows a:b of the batch, in blocks that stay in cache: take (mode="clip": numpy buffers `out`
        under the default mode), then convert (and normalize) into the output."""
        if norm is None and self.same_dtype:
            np.take(data, slots[a:b], axis=0, out=out[a:b], mode="clip")
            return
        tmp = np.empty((min(_BLOCK_ROWS, b - a), self.d), data.dtype)
        dst = torch.from_numpy(out)
        if self.host_dtype == torch.bfloat16:
            dst = dst.view(torch.bfloat16)
        for s in range(a, b, _BLOCK_ROWS):
            e = min(s + _BLOCK_ROWS, b)
            np.take(data, slots[s:e], axis=0, out=tmp[:e - s], mode="clip")
            if norm is None and self.stored == "bfloat16" and self.host_dtype == torch.float32:
                # bfloat16 -> float32 is a 16-bit shift of the bits: one numpy ufunc, no torch call
                np.left_shift(tmp[:e - s], 16, out=out[s:e].view(np.uint32), dtype=np.uint32)
                continue
            copy_rows(dst[s:e], from_storage(tmp[:e - s], self.stored), norm)
