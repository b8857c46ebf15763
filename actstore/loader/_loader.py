"""PatchLoader: the epoch's chunk order, read-ahead and decode threads, batches, resume."""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from actstore.errors import ConfigError
from actstore.loader._buffer import ChunkPlan, ShuffleBuffer, copy_rows
from actstore.loader._config import DEFAULT_BUFFER_BYTES, OUT_DTYPES, LoaderConfig, LoaderStats, Normalization
from actstore.store import STATUS_OK, ActivationStore
from actstore.store._encoding import from_storage

_BLOCK_ROWS = 512  # rows per gather block: the 16-bit staging block stays in L2
_POOL_POLLS = 20  # ms to wait for the caller's previous batch before allocating another output array
_ORDER, _DRAWS = 1, 2  # seed-sequence tags of the chunk order and of the buffer's draws


@dataclass
class _Loaded:
    plan: ChunkPlan
    chunk: np.ndarray | None
    nbytes: int


class _Source:
    """The rank's chunks of one epoch, in order: plans only (replay), or decoded chunks read ahead."""

    def __init__(self, loader: PatchLoader, ids: np.ndarray, with_data: bool) -> None:
        self.loader, self.ids, self.with_data = loader, ids, with_data
        self.next_id = 0
        self.consumed = 0
        self.ahead: deque[Future] = deque()

    def _top_up(self) -> None:
        ld = self.loader
        while len(self.ahead) < ld._concurrency and self.next_id < len(self.ids):
            i = int(self.ids[self.next_id])
            self.next_id += 1
            self.ahead.append(ld._io.submit(ld._load if self.with_data else ld._plan, i))

    def peek_rows(self) -> int | None:
        self._top_up()
        if not self.ahead:
            return None
        head = self.ahead[0].result()
        return head.plan.n_rows if self.with_data else head.n_rows

    def pop(self) -> _Loaded:
        head = self.ahead.popleft().result()
        self.consumed += 1
        return head if self.with_data else _Loaded(head, None, 0)

    def close(self) -> None:
        for f in self.ahead:
            f.cancel()
        self.ahead.clear()


class PatchLoader:
    """Iterable of random (batch_size, d) patch batches from a store; see the module docstring.

    `device` receives the batches (16-bit on the host, converted and normalized there; non_blocking
    with pin_memory); `storage_options` go to fsspec. Iterating runs from the current position to the
    end of the last epoch; iterating again continues after the last batch delivered (a finished
    loader has nothing left; `load_state_dict({"epoch": 0, "batch": 0})` rewinds it). `state_dict()` and
    `load_state_dict()` save and restore the position (epoch, batches delivered): a restored
    loader replays the epoch up to there on index arrays only (no activations read, labels read
    when filtering), then reads just the chunks whose rows are still in the buffer (at most the
    last ~8 buffer-lengths of the epoch) and continues with exactly the stream it would have
    delivered. Batches of one loader are deterministic given the config and numpy's Generator.

    Ranks get disjoint chunks that together cover the store; their counts differ by at most one
    chunk per epoch, so their batch counts (`len`) may differ: data-parallel trainers should run
    min(len) steps. Rejected images are never delivered. The batch tensors are fresh to the
    caller; their memory is recycled only once nothing references it.
    """

    def __init__(self, url: str, layer: str | int = -2, batch_size: int = 16384, tokens: str = "patches", *,
                 seed: int = 0, epochs: int = 1, rank: int = 0, world_size: int = 1,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, concurrency: int | None = None,
                 decode_threads: int | None = None, dtype: torch.dtype | str = torch.float32,
                 normalize: bool = False, return_indices: bool = False,
                 label_filter: int | Sequence[int] | None = None, drop_last: bool = False, prefetch: int = 1,
                 storage_options: dict[str, Any] | None = None, device: torch.device | str | None = None,
                 pin_memory: bool = False) -> None:
        config = LoaderConfig(layer, batch_size, tokens, seed, epochs, rank, world_size, buffer_bytes, concurrency,
                              decode_threads, dtype, normalize, return_indices, label_filter, drop_last, prefetch,
                              pin_memory)
        self.config = cfg = config
        self._io: ThreadPoolExecutor | None = None
        self.store = ActivationStore(url, storage_options, threads=1)
        try:
            self._setup(cfg, device)
        except BaseException:
            self.store.close()
            raise

    def _setup(self, cfg: LoaderConfig, device: torch.device | str | None) -> None:
        spec = self.store.spec
        self.layer = self.store.layer(cfg.layer)
        self.spec, self.d = spec, self.layer.d
        layout = self.layer.tokens
        t0, t1 = {"patches": (int(layout.cls), layout.n_tokens), "cls": (0, int(layout.cls)),
                  "all": (0, layout.n_tokens)}[cfg.tokens]
        if t1 <= t0:
            raise ConfigError(f"layer {self.layer.name} has no {cfg.tokens} tokens")
        if cfg.label_filter is not None and not spec.has_labels:
            raise ConfigError(f"{self.store.url}: label_filter needs a store with per-patch labels; it has none")
        if cfg.world_size > spec.n_chunks:
            raise ConfigError(f"world_size {cfg.world_size} exceeds the store's {spec.n_chunks} chunks")
        self._tokens = (t0, t1)
        self._labels = None if cfg.label_filter is None else np.array(cfg.label_filter, np.int32)
        if self.store.attrs.get("summary", {}).get("n_rejected") == 0:  # no need to read the images table
            self._ok = np.ones(spec.n_images, bool)
        else:
            status = self.store.images().column("status").to_numpy(zero_copy_only=False)
            self._ok = np.asarray(status == STATUS_OK, bool)
        self._reader = self.store.shard_reader(self.layer.name)
        self._chunk_shape = self._reader.chunk_shape

        threads = cfg.decode_threads or min(8, os.cpu_count() or 1)
        remote = "://" in self.store.url
        self._threads = threads
        self._concurrency = cfg.concurrency or (max(16, 2 * threads) if remote else 2 * threads)
        self._decode_slots = threading.BoundedSemaphore(threads)
        self._spare: list[np.ndarray] = []
        self._spare_lock = threading.Lock()

        self.device = None if device is None else torch.device(device)
        on_device = self.device is not None and self.device.type != "cpu"
        self._out_dtype = getattr(torch, cfg.dtype)
        self._host_dtype = self.store.dtype if on_device else self._out_dtype
        self._pin = cfg.pin_memory and torch.cuda.is_available()
        self._out_pool: list[np.ndarray] = []
        self._norm_host = cfg.normalize and not on_device

        n_tok = t1 - t0
        self._max_chunk_rows = spec.images_per_chunk * n_tok
        starts = np.arange(0, spec.n_images, spec.images_per_chunk)
        per_chunk = np.add.reduceat(self._ok.astype(np.int64), starts) * n_tok
        self._upper_rows = per_chunk.astype(np.int64)  # exact without a label filter
        share = -(-spec.n_chunks // cfg.world_size)
        most = int(np.sort(self._upper_rows)[::-1][:share].sum())
        row_bytes = self.d * spec.itemsize
        capacity = min(cfg.buffer_bytes // row_bytes, most)
        needed = min(cfg.batch_size + self._max_chunk_rows - 1, most)
        if capacity < needed:
            raise ConfigError(f"buffer_bytes {cfg.buffer_bytes:,} holds {capacity:,} rows; batches of "
                              f"{cfg.batch_size} need at least {needed:,} rows ({needed * row_bytes:,} bytes)")
        self._buffer = ShuffleBuffer(max(capacity, 1), self.d, self._reader.dtype)
        self._position = (0, 0)
        self._active = False
        self._normalization: Normalization | None = None
        self._rows: np.ndarray | None = None
        self._counters = {"patches": 0, "batches": 0, "bytes": 0, "chunks": 0, "fill": 0.0, "wait": 0.0, "t0": 0.0,
                          "t1": None}
        self._io = ThreadPoolExecutor(self._concurrency, thread_name_prefix="actstore-loader-io")
        self._asm = ThreadPoolExecutor(max(1, threads - 1), thread_name_prefix="actstore-loader-asm")

    @classmethod
    def from_config(cls, url: str, config: LoaderConfig, storage_options: dict[str, Any] | None = None,
                    device: torch.device | str | None = None) -> PatchLoader:
        return cls(url, storage_options=storage_options, device=device, **asdict(config))

    def __repr__(self) -> str:
        c = self.config
        return (f"PatchLoader({self.store.url!r}, layer={self.layer.name}, tokens={c.tokens}, "
                f"batch_size={c.batch_size}, epochs={c.epochs}, rank={c.rank}/{c.world_size})")

    # lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the threads and release the buffer (also on garbage collection and `with`)."""
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)
            self._asm.shutdown(wait=False, cancel_futures=True)
            self._io = None
            self.store.close()
            self._buffer.data = None
            self._out_pool.clear()

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_io", None) is not None:
            self.close()

    # sizes, normalization, position, stats ------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Rows the shuffle buffer holds."""
        return self._buffer.capacity

    def _chunk_rows(self) -> np.ndarray:
        """Rows delivered per chunk (reads the labels once when filtering)."""
        if self._rows is None:
            if self._labels is None:
                self._rows = self._upper_rows
            else:
                ipc = self.spec.images_per_chunk
                rows, step = [], ipc * 256
                for a in range(0, self.spec.n_images, step):
                    b = min(a + step, self.spec.n_images)
                    keep = np.isin(self.store.labels(a, b), self._labels) & self._ok[a:b, None]
                    rows.append(np.add.reduceat(keep.sum(1), np.arange(0, b - a, ipc)))
                self._rows = np.concatenate(rows).astype(np.int64)
        return self._rows

    def _epoch_rows(self) -> list[int]:
        rows = self._chunk_rows()
        if self.config.world_size == 1:
            return [int(rows.sum())] * self.config.epochs
        return [int(rows[self._order(e)].sum()) for e in range(self.config.epochs)]

    @property
    def n_patches(self) -> int:
        """Rows this rank delivers over all epochs of one iteration (drop_last ignored)."""
        return sum(self._epoch_rows())

    def __len__(self) -> int:
        """Batches this rank delivers over all epochs of one iteration."""
        b = self.config.batch_size
        return sum(r // b if self.config.drop_last else -(-r // b) for r in self._epoch_rows())

    @property
    def normalization(self) -> Normalization | None:
        """The transform applied to every batch (None unless normalize=True)."""
        if self.config.normalize and self._normalization is None:
            stats = self.store.stats(self.layer.name, self.config.tokens)
            self._normalization = Normalization.from_stats(stats, self.layer.name, self.config.tokens)
        return self._normalization

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        return {"store": self.store.attrs.get("dataset", {}).get("fingerprint"), "n_images": self.spec.n_images,
                "layer": self.layer.name, "tokens": c.tokens, "seed": c.seed, "epochs": c.epochs, "rank": c.rank,
                "world_size": c.world_size, "batch_size": c.batch_size, "capacity": self.capacity,
                "drop_last": c.drop_last, "label_filter": None if c.label_filter is None else list(c.label_filter)}

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches delivered in it) and what the stream depends on; JSON-friendly."""
        epoch, batch = self._position
        return {"epoch": epoch, "batch": batch, "stream": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the loader must deliver the same stream as the one saved."""
        mine = self._fingerprint()
        for key, value in state.get("stream", {}).items():
            if mine.get(key) != value:
                raise ConfigError(f"loader state was saved with {key}={value!r}, this loader has {mine.get(key)!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not (0 <= epoch <= self.config.epochs and batch >= 0):
            raise ConfigError(f"loader state position (epoch {epoch}, batch {batch}) is out of range")
        self._position = (epoch, batch)

    @property
    def stats(self) -> LoaderStats:
        c = self._counters
        end = c["t1"] if c["t1"] is not None else time.perf_counter()
        return LoaderStats(c["patches"], c["batches"], max(0.0, end - c["t0"]) if c["t0"] else 0.0,
                           c["bytes"], c["chunks"], c["fill"], c["wait"])

    # reading ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        """This rank's chunks of `epoch`, in stream order."""
        perm = np.random.default_rng([_ORDER, self.config.seed, epoch]).permutation(self.spec.n_chunks)
        return perm[self.config.rank::self.config.world_size]

    def _plan(self, i: int) -> ChunkPlan:
        c0, c1 = self.spec.chunk_range(i)
        ok = self._ok[c0:c1]
        t0, t1 = self._tokens
        if self._labels is None and ok.all():
            n, nt = c1 - c0, t1 - t0
            return ChunkPlan(i, c0, np.repeat(np.arange(c0, c1, dtype=np.int32), nt),
                         np.tile(np.arange(t0, t1, dtype=np.int32), n), (n, t0, t1))
        keep = np.zeros((c1 - c0, self.layer.tokens.n_tokens), bool)
        if self._labels is None:
            keep[ok, t0:t1] = True
        else:
            keep[:, t0:t1] = np.isin(self.store.labels(c0, c1), self._labels) & ok[:, None]
        img, tok = np.nonzero(keep)
        return ChunkPlan(i, c0, (img + c0).astype(np.int32), tok.astype(np.int32), None)

    def _decode(self, i: int) -> tuple[np.ndarray, int]:
        """Fetch and decode chunk i into a recycled array (CorruptDataError names a bad chunk)."""
        encoded = self._reader.fetch_shard(i // self.spec.chunks_per_shard, [i])[i]
        with self._spare_lock:
            out = self._spare.pop() if self._spare else None
        if out is None:
            out = np.empty(self._chunk_shape, self._reader.dtype)
        with self._decode_slots:
            self._reader.decode(i, encoded, out)
        return out, 0 if encoded is None else int(encoded.size)

    def _recycle(self, chunk: np.ndarray) -> None:
        with self._spare_lock:
            if len(self._spare) <= self._threads:
                self._spare.append(chunk)

    def _load(self, i: int) -> _Loaded:
        plan = self._plan(i)
        if plan.n_rows == 0:
            return _Loaded(plan, None, 0)
        return _Loaded(plan, *self._decode(i))

    def _rehydrate(self, buf: ShuffleBuffer, stop: threading.Event) -> None:
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
            pending.append((self._io.submit(self._decode, int(i)), *bounds[j]))
            while len(pending) > self._concurrency or (j == len(ids) - 1 and pending):
                future, a, b = pending.popleft()
                chunk, nbytes = future.result()
                s = slots[a:b]
                data[s] = chunk[buf.img[s] - (buf.img[s[0]] // ipc) * ipc, buf.tok[s]]
                self._recycle(chunk)
                self._counters["bytes"] += nbytes
                self._counters["chunks"] += 1
                if stop.is_set():
                    return

    # batches ----------------------------------------------------------------------------
    def _draws(self, buf: ShuffleBuffer, rng: np.random.Generator, source: _Source) -> Iterator[np.ndarray]:
        """The epoch's batches as slot arrays: refill with whole chunks while they fit, then draw.

        The buffer holds at least batch_size rows whenever chunks remain (capacity >= batch_size +
        a chunk's rows - 1), so only the drain at the end of the epoch makes batches shorter.
        """
        b = self.config.batch_size
        while True:
            writes = []
            while (n := source.peek_rows()) is not None and n <= buf.n_free:
                loaded = source.pop()
                slots = buf.put(loaded.plan)
                if loaded.chunk is not None:
                    writes.append((slots, loaded))
                if len(writes) == self._threads:  # bounded: decoded chunks are recycled as they are written
                    self._write(buf, writes)
                    writes = []
            self._write(buf, writes)
            k = min(b, buf.n_live)
            if k == 0 or (self.config.drop_last and k < b):
                return
            yield buf.take(k, rng)

    def _write(self, buf: ShuffleBuffer, writes: list[tuple[np.ndarray, _Loaded]]) -> None:
        """Copy admitted chunks into their slots, spread over the assembly threads (disjoint slots)."""
        def work(part: list[tuple[np.ndarray, _Loaded]]) -> None:
            for slots, loaded in part:
                buf.write(slots, loaded.plan, loaded.chunk)

        parts = [writes[j::self._threads] for j in range(min(self._threads, len(writes)))]
        futures = [self._asm.submit(work, part) for part in parts[1:]]
        if parts:
            work(parts[0])
        for f in futures:
            f.result()
        for _, loaded in writes:
            self._recycle(loaded.chunk)
            self._counters["bytes"] += loaded.nbytes
            self._counters["chunks"] += 1

    def _epoch(self, epoch: int, skip: int, stop: threading.Event, ahead: threading.Semaphore) -> Iterator[tuple]:
        buf, ids = self._buffer, self._order(epoch)
        buf.reset()
        rng = np.random.default_rng([_DRAWS, self.config.seed, epoch, self.config.rank])
        done = 0
        if skip:
            replay = _Source(self, ids, with_data=False)
            for _ in self._draws(buf, rng, replay):
                done += 1
                if done == skip or stop.is_set():
                    break
            replay.close()
            ids = ids[replay.consumed:]
            self._rehydrate(buf, stop)
        buf.allocate()
        source = _Source(self, ids, with_data=True)
        try:
            for slots in self._draws(buf, rng, source):
                while not ahead.acquire(timeout=0.1):  # at most `prefetch` batches ahead of the consumer
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                # yielded without a local name, so this frame does not keep the batch from being recycled
                yield (self._gather(buf, slots), buf.img[slots], buf.tok[slots], epoch, done,
                       (buf.n_live + len(slots)) / buf.capacity)
                done += 1
        finally:
            source.close()

    def _out(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """A host batch tensor and a numpy view to write it; pooled arrays are reused once unreferenced."""
        np_dtype = OUT_DTYPES[self._host_dtype]
        if self._pin:
            t = torch.empty((n, self.d), dtype=self._host_dtype, pin_memory=True)
            view = t.view(torch.int16).numpy().view(np.uint16) if np_dtype is np.uint16 else t.numpy()
            return t, view
        arr = None
        if n == self.config.batch_size:
            arr = self._free_output()
            polls = _POOL_POLLS if len(self._out_pool) > self.config.prefetch else 0
            while arr is None and polls:  # the caller lets go of its last batch right after next() returns
                time.sleep(0.001)
                polls -= 1
                arr = self._free_output()
        if arr is None:  # the pool grows to prefetch + 1 arrays: the caller's batch and those ahead of it
            arr = np.empty((n, self.d), np_dtype)
            if n == self.config.batch_size and len(self._out_pool) <= self.config.prefetch:
                self._out_pool.append(arr)
        t = torch.from_numpy(arr)
        return (t.view(torch.bfloat16) if np_dtype is np.uint16 else t), arr

    def _free_output(self) -> np.ndarray | None:
        for j in range(len(self._out_pool)):
            if sys.getrefcount(self._out_pool[j]) == 2:  # only the pool's reference (and the argument's)
                return self._out_pool[j]
        return None

    def _gather(self, buf: ShuffleBuffer, slots: np.ndarray) -> torch.Tensor:
        """data[slots] converted to the host dtype (normalized on the host when asked), in parallel blocks."""
        x, out = self._out(len(slots))
        parts = np.array_split(np.arange(len(slots)), self._threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
        futures = [self._asm.submit(self._gather_part, buf.data, slots, out, a, b) for a, b in bounds[1:]]
        self._gather_part(buf.data, slots, out, *bounds[0])
        for f in futures:
            f.result()
        return x

    def _gather_part(self, data: np.ndarray, slots: np.ndarray, out: np.ndarray, a: int, b: int) -> None:
        """Rows a:b of the batch, in blocks that stay in cache: take (mode="clip": numpy buffers `out`
        under the default mode), then convert (and normalize) into the output."""
        norm = self.normalization if self._norm_host else None
        if norm is None and self._host_dtype == self.store.dtype:
            np.take(data, slots[a:b], axis=0, out=out[a:b], mode="clip")
            return
        tmp = np.empty((min(_BLOCK_ROWS, b - a), self.d), data.dtype)
        dst = torch.from_numpy(out)
        if self._host_dtype == torch.bfloat16:
            dst = dst.view(torch.bfloat16)
        for s in range(a, b, _BLOCK_ROWS):
            e = min(s + _BLOCK_ROWS, b)
            np.take(data, slots[s:e], axis=0, out=tmp[:e - s], mode="clip")
            if norm is None and self.spec.dtype == "bfloat16" and self._host_dtype == torch.float32:
                # bfloat16 -> float32 is a 16-bit shift of the bits: one numpy ufunc, no torch call
                np.left_shift(tmp[:e - s], 16, out=out[s:e].view(np.uint32), dtype=np.uint32)
                continue
            copy_rows(dst[s:e], from_storage(tmp[:e - s], self.spec.dtype), norm)

    # iteration --------------------------------------------------------------------------
    def _produce(self, start: tuple[int, int], q: queue.Queue, stop: threading.Event,
                 ahead: threading.Semaphore) -> None:
        """The background thread: every remaining batch into `q`, then None (or the error that stopped it)."""
        try:
            for epoch in range(start[0], self.config.epochs):
                for item in self._epoch(epoch, start[1] if epoch == start[0] else 0, stop, ahead):
                    q.put(item)
                    del item  # let the batch's array be recycled once the consumer drops it
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    def __iter__(self) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._io is None:
            raise ConfigError("this loader is closed")
        if self._active:
            raise RuntimeError("this PatchLoader is already being iterated; finish or close that iteration first")
        self._active = True
        norm = self.normalization  # computed here, before the assembly threads read it
        device_norm = None if self._norm_host else norm
        self._counters.update(patches=0, batches=0, bytes=0, chunks=0, fill=0.0, wait=0.0, t0=time.perf_counter(),
                              t1=None)
        q: queue.Queue = queue.Queue()
        stop, ahead = threading.Event(), threading.Semaphore(self.config.prefetch)
        worker = threading.Thread(target=self._produce, args=(self._position, q, stop, ahead), daemon=True,
                                  name="actstore-loader")
        worker.start()
        try:
            while True:
                t = time.perf_counter()
                item = q.get()
                self._counters["wait"] += time.perf_counter() - t
                if item is None:
                    self._position = (self.config.epochs, 0)
                    return
                if isinstance(item, BaseException):
                    raise item
                x, img, tok, epoch, batch, fill = item
                del item
                ahead.release()
                if self.device is not None and self.device.type != "cpu":
                    x = x.to(self.device, non_blocking=self._pin).to(self._out_dtype)
                    if device_norm is not None:
                        x = device_norm.apply(x)
                self._position = (epoch, batch + 1)
                c = self._counters
                c["patches"] += len(x)
                c["batches"] += 1
                c["fill"] = fill
                if self.config.return_indices:
                    yield x, torch.from_numpy(img.astype(np.int64)), torch.from_numpy(tok.astype(np.int64))
                else:
                    yield x
        finally:
            self._counters["t1"] = time.perf_counter()
            stop.set()
            while worker.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._active = False
