"""PatchLoader: the loader's configuration, lifecycle, position, and the background thread that makes batches.

Which rows, in which order: _order; chunks read into the shuffle buffer: _reads; a batch assembled: _gather.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from actstore.errors import ConfigError
from actstore.loader._buffer import ShuffleBuffer
from actstore.loader._config import DEFAULT_BUFFER_BYTES, LoaderConfig, LoaderStats, Normalization
from actstore.loader._gather import BatchAssembler
from actstore.loader._order import Selection
from actstore.loader._reads import ChunkReads
from actstore.store import ActivationStore, is_local


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
        self.layer = self.store.layer(cfg.layer)
        self.spec, self.d = self.store.spec, self.layer.d
        self._select = Selection(self.store, self.layer, cfg)
        threads = cfg.decode_threads or min(8, os.cpu_count() or 1)
        self.decode_threads = threads
        """Chunks decoded at once (cfg.decode_threads, resolved)."""
        remote = not is_local(self.store.url)
        self.concurrency = cfg.concurrency or (max(16, 2 * threads) if remote else 2 * threads)
        """Chunks read ahead (cfg.concurrency, resolved)."""
        self.device = None if device is None else torch.device(device)
        on_device = self.device is not None and self.device.type != "cpu"
        self._out_dtype = getattr(torch, cfg.dtype)
        self._pin = cfg.pin_memory and torch.cuda.is_available()
        self._norm_host = cfg.normalize and not on_device
        capacity = self._capacity(cfg)
        self._position = (0, 0)
        self._active = False
        self._normalization: Normalization | None = None
        self._counters = {"patches": 0, "batches": 0, "fill": 0.0, "wait": 0.0, "t0": 0.0, "t1": None}
        self._io = ThreadPoolExecutor(self.concurrency, thread_name_prefix="actstore-loader-io")
        self._asm = ThreadPoolExecutor(max(1, threads - 1), thread_name_prefix="actstore-loader-asm")
        self._reads = ChunkReads(self.store, self.layer.name, self._select.plan, threads, self.concurrency,
                                 self._io, self._asm)
        self._buffer = ShuffleBuffer(capacity, self.d, self._reads.reader.dtype)
        host_dtype = self.store.dtype if on_device else self._out_dtype  # on a device: converted there
        self._batches = BatchAssembler(self.d, self.spec.dtype, host_dtype, self._pin, cfg.batch_size, cfg.prefetch,
                                       threads, self._asm)

    def _capacity(self, cfg: LoaderConfig) -> int:
        """Shuffle buffer rows: buffer_bytes' worth, at most the rank's rows, at least a batch and a chunk's rows."""
        most = self._select.most_rows()
        row_bytes = self.d * self.spec.itemsize
        capacity = min(cfg.buffer_bytes // row_bytes, most)
        needed = min(cfg.batch_size + self._select.max_chunk_rows - 1, most)
        if capacity < needed:
            raise ConfigError(f"buffer_bytes {cfg.buffer_bytes:,} holds {capacity:,} rows; batches of "
                              f"{cfg.batch_size} need at least {needed:,} rows ({needed * row_bytes:,} bytes)")
        return max(capacity, 1)

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
            self._batches.release()

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

    @property
    def n_patches(self) -> int:
        """Rows this rank delivers over all epochs of one iteration (drop_last ignored)."""
        return sum(self._select.epoch_rows())

    def __len__(self) -> int:
        """Batches this rank delivers over all epochs of one iteration."""
        b = self.config.batch_size
        return sum(r // b if self.config.drop_last else -(-r // b) for r in self._select.epoch_rows())

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
                           self._reads.bytes_read, self._reads.chunks_read, c["fill"], c["wait"])

    # batches ----------------------------------------------------------------------------
    def _epoch(self, epoch: int, skip: int, stop: threading.Event, ahead: threading.Semaphore) -> Iterator[tuple]:
        buf, ids, reads = self._buffer, self._select.order(epoch), self._reads
        buf.reset()
        rng = self._select.draws(epoch)
        b, drop_last = self.config.batch_size, self.config.drop_last
        norm = self.normalization if self._norm_host else None
        done = 0
        if skip:
            replay = reads.source(ids, with_data=False)
            for _ in reads.draws(buf, rng, replay, b, drop_last):
                done += 1
                if done == skip or stop.is_set():
                    break
            replay.close()
            ids = ids[replay.consumed:]
            reads.rehydrate(buf, stop)
        buf.allocate()
        source = reads.source(ids, with_data=True)
        try:
            for slots in reads.draws(buf, rng, source, b, drop_last):
                while not ahead.acquire(timeout=0.1):  # at most `prefetch` batches ahead of the consumer
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                # yielded without a local name, so this frame does not keep the batch from being recycled
                yield (self._batches.gather(buf, slots, norm), buf.img[slots], buf.tok[slots], epoch, done,
                       (buf.n_live + len(slots)) / buf.capacity)
                done += 1
        finally:
            source.close()

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
        self._counters.update(patches=0, batches=0, fill=0.0, wait=0.0, t0=time.perf_counter(), t1=None)
        self._reads.reset_counts()
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
