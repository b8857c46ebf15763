"""Batch assembly: the drawn buffer rows gathered into a host batch, converted (and normalized) in parallel.

Output arrays are pooled: one is reused once nothing outside the pool references it, so a caller
that keeps its batches never sees them overwritten.
"""

from __future__ import annotations

import sys
import time
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
        self.out_pool: list[np.ndarray] = []

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
            arr = self._free_output()
            polls = _POOL_POLLS if len(self.out_pool) > self.prefetch else 0
            while arr is None and polls:  # the caller lets go of its last batch right after next() returns
                time.sleep(0.001)
                polls -= 1
                arr = self._free_output()
        if arr is None:  # the pool grows to prefetch + 1 arrays: the caller's batch and those ahead of it
            arr = np.empty((n, self.d), np_dtype)
            if n == self.batch_size and len(self.out_pool) <= self.prefetch:
                self.out_pool.append(arr)
        t = torch.from_numpy(arr)
        return (t.view(torch.bfloat16) if np_dtype is np.uint16 else t), arr

    def _free_output(self) -> np.ndarray | None:
        for j in range(len(self.out_pool)):
            if sys.getrefcount(self.out_pool[j]) == 2:  # only the pool's reference (and the argument's)
                return self.out_pool[j]
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
