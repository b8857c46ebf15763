"""Reading a store: metadata, statistics, the images table, and activations."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from actstore.errors import IncompleteStoreError, StoreFormatError
from actstore.store import _layout as L
from actstore.store._encoding import from_storage, torch_dtype
from actstore.store._images import parse_label_columns
from actstore.store._io import cat_many, filesystem, list_units, normalize_url, read_attrs, zarr_store
from actstore.store._shards import ShardReader
from actstore.store._spec import ATTRS_KEY, STORAGE_DTYPES, LayerSpec, StoreSpec
from actstore.store._stats import TOKEN_KINDS, LayerStats, merge_sums


class ActivationStore:
    """A read-only view of an activation store at any fsspec URL.

    Refuses a store whose extraction has not finished unless allow_partial;
    `threads` decode chunks in parallel (default: one per core, at most 8).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *,
                 allow_partial: bool = False, threads: int | None = None) -> None:
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self.attrs = read_attrs(self.url, self.storage_options, ATTRS_KEY)
        self.spec = StoreSpec.from_attrs(self.attrs, self.url)
        self.complete = bool(self.attrs.get("complete", False))
        self.fs, self.root = filesystem(self.url, self.storage_options)
        if not self.complete and not allow_partial:
            done = len(self.units_done())
            raise IncompleteStoreError(f"{self.url}: incomplete store ({done} of {self.spec.n_units} units "
                                       "done, not finalized); finish the extraction or pass allow_partial=True")
        self._pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="actstore-read")
        self._shards: dict[str, ShardReader] = {}
        self._group: zarr.Group | None = None

    def __repr__(self) -> str:
        return f"ActivationStore({self.url!r}, n_images={self.n_images}, layers={[l.name for l in self.layers]})"

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # metadata ---------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return self.spec.n_images

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.spec.layers

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.spec.dtype)

    def layer(self, key: str | int) -> LayerSpec:
        return self.spec.layer(key)

    def shape(self, layer: str | int) -> tuple[int, int, int]:
        return self.spec.shape(layer)

    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(zarr_store(self.url, self.storage_options, read_only=True), mode="r")
        return self._group

    def units_done(self) -> list[int]:
        return list_units(self.fs, self.root, L.UNITS_DIR)

    def unit_record(self, k: int) -> dict[str, Any]:
        return json.loads(self.fs.cat_file(f"{self.root}/{L.unit_record_key(k)}"))

    def nbytes_stored(self) -> int:
        """Bytes of every object under the store's root."""
        return int(self.fs.du(self.root, total=True))

    def nbytes_logical(self) -> int:
        """Bytes of the activations at the store's dtype, uncompressed."""
        return sum(int(np.prod(self.shape(l.name))) * self.spec.itemsize for l in self.layers)

    # derived tables ---------------------------------------------------------------------
    def stats(self, layer: str | int, tokens: str = "patches") -> LayerStats:
        """Statistics of one token kind ("cls", "patches" or "all") of a complete store."""
        if not self.complete:
            raise IncompleteStoreError(f"{self.url}: statistics exist only once the store is finalized")
        name = self.layer(layer).name
        kinds = [k for k in TOKEN_KINDS if tokens in (k, "all")]
        if not kinds:
            raise ValueError(f"tokens must be 'cls', 'patches' or 'all', got {tokens!r}")
        found = []
        for kind in kinds:
            try:
                g = self.group()[L.stats_path(name, kind)]
            except KeyError:
                continue
            found.append(LayerStats(int(g.attrs["count"]), g["mean"][:], g["var"][:]).to_sums())
        merged = merge_sums(found)
        if merged is None:
            raise StoreFormatError(f"{self.url}: layer {name} has no '{tokens}' tokens")
        return LayerStats.from_sums(merged)

    @property
    def label_columns(self) -> tuple[str, ...]:
        """The extra per-image label columns the store declares (its dataset's label_columns)."""
        return parse_label_columns(self.spec.dataset)

    def images(self) -> pa.Table:
        """The images table (index, uri, label, width, height, status, reason, then the label columns)."""
        if self.complete:
            return pq.read_table(io.BytesIO(self.fs.cat_file(f"{self.root}/{L.IMAGES_TABLE}")))
        data = cat_many(self.fs, [f"{self.root}/{L.unit_images_key(k)}" for k in self.units_done()])
        for d in data:
            if isinstance(d, Exception):
                raise d
        return pa.concat_tables([pq.ParquetFile(io.BytesIO(d)).read() for d in data]) if data else pa.table({})

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """Per-patch labels of images [start, stop), or None when the store has none."""
        if not self.spec.has_labels:
            return None
        return self.group()[L.LABELS][start:stop]

    # activations ------------------------------------------------------------------------
    def shard_reader(self, layer: str | int) -> ShardReader:
        """The fast chunk path of one layer (fetch_shard, decode), for readers that schedule their own reads."""
        name = self.layer(layer).name
        if name not in self._shards:
            self._shards[name] = ShardReader(self.fs, self.root, self.spec, name, self._pool)
        return self._shards[name]

    def read(self, layer: str | int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Activations of images [start, stop) as (n, n_tokens, d) in the store's dtype."""
        stop = self.n_images if stop is None else stop
        if not 0 <= start <= stop <= self.n_images:
            raise IndexError(f"image range [{start}, {stop}) outside [0, {self.n_images})")
        out = np.empty((stop - start, *self.shape(layer)[1:]), STORAGE_DTYPES[self.spec.dtype])
        if stop > start:
            self.shard_reader(layer).read_range(start, stop, out)
        return from_storage(out, self.spec.dtype)

    def blocks(self, layer: str | int, images_per_block: int, whole_chunks: bool = False
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first image, activations) of consecutive blocks of images in store order; the next two reads are
        made while the caller works on this block (ordered passes: the index, the comparison). With
        `whole_chunks`, reads are whole store chunks (each chunk decoded once) cut into blocks of at most
        images_per_block: what a pass whose memory budget holds fewer images than a chunk wants."""
        n, size = self.n_images, max(1, images_per_block)
        per_read = self.spec.images_per_chunk * max(1, size // self.spec.images_per_chunk) if whole_chunks else size
        starts = list(range(0, n, per_read))
        with ThreadPoolExecutor(1, thread_name_prefix="store-blocks") as pool:
            ahead = [pool.submit(self.read, layer, s, min(n, s + per_read)) for s in starts[:2]]
            for i, s in enumerate(starts):
                x = ahead.pop(0).result()
                if i + 2 < len(starts):
                    ahead.append(pool.submit(self.read, layer, starts[i + 2], min(n, starts[i + 2] + per_read)))
                for offset in range(0, x.shape[0], size):
                    yield s + offset, x[offset:offset + size]

    def read_chunk(self, layer: str | int, i: int) -> torch.Tensor:
        """Chunk i of a layer (images chunk_range(i)), the loader's read unit."""
        return self.read(layer, *self.spec.chunk_range(i))

    def chunk_name(self, layer: str | int, i: int) -> str:
        return self.shard_reader(layer).chunk_name(i)
