"""Chunks into the shuffle buffer: read-ahead on a thread pool, bounded decodes, recycled chunk arrays, and
the epoch's refill-and-draw loop.

Up to `concurrency` chunks are fetched and decoded ahead (at most `threads` decode at once), but they
enter the buffer strictly in the epoch's order, so thread timing never changes the stream. A
resume's replay runs the same loop on chunk plans only; `rehydrate` then reads the rows it left in
the buffer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from actstore.loader._buffer import ChunkPlan, ShuffleBuffer
from actstore.store import ActivationStore


@dataclass
class Loaded:
    """A chunk's plan and, when read, its decoded array and encoded size."""

    plan: ChunkPlan
    chunk: np.ndarray | None
    nbytes: int


class ChunkReads:
    """One layer's chunks, read and decoded on the `io` pool, copied into the buffer on the `asm` pool."""

    def __init__(self, store: ActivationStore, layer: str, plan: Callable[[int], ChunkPlan], threads: int,
                 concurrency: int, io: ThreadPoolExecutor, asm: ThreadPoolExecutor) -> None:
        self.reader = store.shard_reader(layer)
        self.spec, self.plan, self.threads, self.concurrency = store.spec, plan, threads, concurrency
        self.io, self.asm = io, asm
        self._decode_slots = threading.BoundedSemaphore(threads)
        self._spare: list[np.ndarray] = []
        self._spare_lock = threading.Lock()
        self.bytes_read = self.chunks_read = 0

    def reset_counts(self) -> None:
        """Start counting the bytes and chunks read anew (each iteration reports its own)."""
        self.bytes_read = self.chunks_read = 0

    def source(self, ids: np.ndarray, with_data: bool) -> Source:
        """Chunks `ids` in order: decoded (with_data) or as plans only (a resume's replay)."""
        return Source(self, ids, with_data)

    def decode(self, i: int) -> tuple[np.ndarray, int]:
        """Fetch and decode chunk i into a recycled array (CorruptDataError names a bad chunk)."""
        encoded = self.reader.fetch_shard(i // self.spec.chunks_per_shard, [i])[i]
        with self._spare_lock:
            out = self._spare.pop() if self._spare else None
        if out is None:
            out = np.empty(self.reader.chunk_shape, self.reader.dtype)
        with self._decode_slots:
            self.reader.decode(i, encoded, out)
        return out, 0 if encoded is None else int(encoded.size)

    def load(self, i: int) -> Loaded:
        plan = self.plan(i)
        if plan.n_rows == 0:
            return Loaded(plan, None, 0)
        return Loaded(plan, *self.decode(i))

    def _done(self, chunk: np.ndarray, nbytes: int) -> None:
        """Count a chunk copied into the buffer and keep its array for the next decode."""
        with self._spare_lock:
            if len(self._spare) <= self.threads:
                self._spare.append(chunk)
        self.bytes_read += nbytes
        self.chunks_read += 1

    def draws(self, buf: ShuffleBuffer, rng: np.random.Generator, source: Source, batch_size: int,
              drop_last: bool) -> Iterator[np.ndarray]:
        """The epoch's batches as slot arrays: refill with whole chunks while they fit, then draw.

        The buffer holds at least batch_size rows whenever chunks remain (capacity >= batch_size +
        a chunk's rows - 1), so only the drain at the end of the epoch makes batches shorter.
        """
        while True:
            writes = []
            while (n := source.peek_rows()) is not None and n <= buf.n_free:
                loaded = source.pop()
                slots = buf.put(loaded.plan)
                if loaded.chunk is not None:
                    writes.append((slots, loaded))
                if len(writes) == self.threads:  # bounded: decoded chunks are recycled as they are written
                    self.write(buf, writes)
                    writes = []
            self.write(buf, writes)
            k = min(batch_size, buf.n_live)
            if k == 0 or (drop_last and k < batch_size):
                return
            yield buf.take(k, rng)

    def write(self, buf: ShuffleBuffer, writes: list[tuple[np.ndarray, Loaded]]) -> None:
        """Copy admitted chunks into their slots, spread over the assembly threads (disjoint slots)."""
        def work(part: list[tuple[np.ndarray, Loaded]]) -> None:
            for slots, loaded in part:
                buf.write(slots, loaded.plan, loaded.chunk)

        parts = [writes[j::self.threads] for j in range(min(self.threads, len(writes)))]
        futures = [self.asm.submit(work, part) for part in parts[1:]]
        if parts:
            work(parts[0])
        for f in futures:
            f.result()
        for _, loaded in writes:
            self._done(loaded.chunk, loaded.nbytes)

    def rehydrate(self, buf: ShuffleBuffer, stop: threading.Event) -> None:
        """Read the rows a replay left in the buffer (as indices) into their slots."""
        data = buf.allocate()
        slots = buf.live[:buf.n_live].copy()
        ipc = self.spec.images_per_chunk
        chunk_of = buf.img[slots] // ipc
        order = np.argsort(chunk_of, kind="stable")
        slots, chunk_of = slots[order], chunk_of[order]
        ids, starts = np.unique(chunk_of, return_index=True)
        bounds = list(zip(starts, [*starts[1:], len(slots)]))
        pending: deque[tuple[Future, int, int]] = deque()
        for j, i in enumerate(ids):
            pending.append((self.io.submit(self.decode, int(i)), *bounds[j]))
            while len(pending) > self.concurrency or (j == len(ids) - 1 and pending):
                future, a, b = pending.popleft()
                chunk, nbytes = future.result()
                s = slots[a:b]
                data[s] = chunk[buf.img[s] - (buf.img[s[0]] // ipc) * ipc, buf.tok[s]]
                self._done(chunk, nbytes)
                if stop.is_set():
                    return


class Source:
    """The rank's chunks of one epoch, in order: plans only (replay), or decoded chunks read ahead."""

    def __init__(self, reads: ChunkReads, ids: np.ndarray, with_data: bool) -> None:
        self.reads, self.ids, self.with_data = reads, ids, with_data
        self.next_id = 0
        self.consumed = 0
        self.ahead: deque[Future] = deque()

    def _top_up(self) -> None:
        r = self.reads
        while len(self.ahead) < r.concurrency and self.next_id < len(self.ids):
            i = int(self.ids[self.next_id])
            self.next_id += 1
            self.ahead.append(r.io.submit(r.load if self.with_data else r.plan, i))

    def peek_rows(self) -> int | None:
        self._top_up()
        if not self.ahead:
            return None
        head = self.ahead[0].result()
        return head.plan.n_rows if self.with_data else head.n_rows

    def pop(self) -> Loaded:
        head = self.ahead.popleft().result()
        self.consumed += 1
        return head if self.with_data else Loaded(head, None, 0)

    def close(self) -> None:
        for f in self.ahead:
            f.cancel()
        self.ahead.clear()
