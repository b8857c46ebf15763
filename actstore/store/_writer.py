"""Creating a store, writing work units, and finalizing.

A work unit is one shard's image range across every layer. `write_unit`
writes the unit's shards whole (zarr never reads-modifies-writes a shard it
fully covers), then its rows of the images table, then its record, last.
Units are independent, so any number of processes may write them at once;
rewriting a unit with the same input gives the same bytes. `finalize`
merges the per-unit statistics and tables and marks the store complete; it
reads the units' objects concurrently, a few hundred units at a time.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr

from actstore.config import redact
from actstore.errors import ConfigError, CorruptDataError, IncompleteStoreError, StoreFormatError, StoreNotFoundError
from actstore.outputs import check_output
from actstore.store import _layout as L
from actstore.store._encoding import from_storage, to_storage, zarr_compressors
from actstore.store._images import STATUS_OK, ok_mask, parse_label_columns, unit_table
from actstore.store._io import filesystem, list_units, normalize_url, put_bytes, read_attrs, read_units, zarr_store
from actstore.store._spec import ATTRS_KEY, STORAGE_DTYPES, StoreSpec
from actstore.store._stats import TOKEN_KINDS, LayerStats, Sums, add_sums, pack_unit_sums, partial_sums, unit_sums

log = logging.getLogger(__name__)

_LABELS_DTYPE = "<i4"


def _is_store(url: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether `url` holds an activation store: `overwrite` replaces nothing else."""
    try:
        read_attrs(url, storage_options, ATTRS_KEY)
    except StoreNotFoundError:
        return False
    return True


def _spec_json(spec: StoreSpec) -> str:
    return json.dumps(spec.to_attrs(), sort_keys=True)


class StoreWriter:
    """Writes work units into an existing store; picklable, so Ray tasks can carry it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self.spec = StoreSpec.from_attrs(read_attrs(self.url, self.storage_options, ATTRS_KEY), self.url)
        self.label_columns = parse_label_columns(self.spec.dataset)
        self._handles: dict[str, Any] = {}

    @classmethod
    def create(cls, url: str, spec: StoreSpec, storage_options: dict[str, Any] | None = None,
               overwrite: bool = False) -> StoreWriter:
        """Create a store, or reopen one with the same spec to resume writing units."""
        url = normalize_url(url)
        parse_label_columns(spec.dataset)  # refused before anything is written
        if not overwrite:
            try:
                existing = read_attrs(url, storage_options, ATTRS_KEY)
            except StoreNotFoundError:
                existing = None
            if existing is not None:
                found = {k: v for k, v in existing.items() if k not in ("complete", "summary")}
                if json.dumps(found, sort_keys=True) != _spec_json(spec):
                    raise StoreFormatError(f"{redact(url)}: a store with a different spec is already there; pass "
                                           "--overwrite to replace it, or choose another --out")
                return cls(url, storage_options)
        if check_output(url, "an activation store", lambda fs, root: _is_store(url, storage_options), overwrite,
                        storage_options):
            fs, root = filesystem(url, storage_options)
            fs.rm(root, recursive=True)
        group = zarr.open_group(zarr_store(url, storage_options, read_only=False), mode="w",
                                attributes={ATTRS_KEY: {**spec.to_attrs(), "complete": False}})
        for layer in spec.layers:
            shape = spec.shape(layer.name)
            group.create_array(L.acts_path(layer.name), shape=shape, dtype=STORAGE_DTYPES[spec.dtype],
                               chunks=(spec.images_per_chunk, *shape[1:]),
                               shards=(spec.images_per_shard, *shape[1:]),
                               compressors=zarr_compressors(spec.codec), fill_value=0,
                               dimension_names=("image", "token", "channel"))
        if spec.has_labels:
            n_patches = spec.layers[0].tokens.n_patches
            group.create_array(L.LABELS, shape=(spec.n_images, n_patches), dtype=_LABELS_DTYPE,
                               chunks=(spec.images_per_chunk, n_patches), shards=(spec.images_per_shard, n_patches),
                               compressors=zarr_compressors("zstd"), fill_value=-1,
                               dimension_names=("image", "patch"))
        log.info("created store %s (%d images, %d units)", url, spec.n_images, spec.n_units)
        return cls(url, storage_options)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def _fs(self):
        if "fs" not in self._handles:
            self._handles["fs"] = filesystem(self.url, self.storage_options)
        return self._handles["fs"]

    def _array(self, path: str) -> zarr.Array:
        if path not in self._handles:
            zstore = self._handles.setdefault("zarr", zarr_store(self.url, self.storage_options, read_only=False))
            # every chunk is written, zeros too: a unit of only rejected images (zeroed rows) must still
            # leave its shard object, which readers and verify take as the proof the unit was written
            array = zarr.open_array(zstore, path=path, mode="r+")
            self._handles[path] = array.with_config({"write_empty_chunks": True})
        return self._handles[path]

    def _put(self, key: str, data: bytes) -> None:
        fs, root = self._fs()
        put_bytes(fs, f"{root}/{key}", data)

    def units_done(self) -> set[int]:
        """Units whose record exists (each was written whole before its record)."""
        return set(list_units(*self._fs(), L.UNITS_DIR))

    def write_unit(self, k: int, acts: Mapping[str, torch.Tensor | np.ndarray],
                   images: pa.Table | Mapping[str, Any] | None = None,
                   labels: np.ndarray | None = None, node: str | None = None) -> dict[str, Any]:
        """Write unit k: acts[layer] is (n_unit_images, n_tokens, d); rejected rows are zeroed. `images` are
        the unit's rows of the images table by column (uri, label, width, height, status, reason and the
        store's label columns; a missing one takes its default). `node` (the Ray node that computed it) goes
        into the unit's record."""
        spec = self.spec
        start, stop = spec.unit_range(k)
        table = unit_table(images, start, stop, self.label_columns)
        ok = ok_mask(table)
        if set(acts) != {layer.name for layer in spec.layers}:
            raise ConfigError(f"unit {k}: got layers {sorted(acts)}, store has {[l.name for l in spec.layers]}")
        record: dict[str, Any] = {"unit": k, "images": [start, stop], "n_ok": int(ok.sum()), "layers": {}}
        if node is not None:
            record["node"] = node
        sums = {}
        for layer in spec.layers:
            expected = (stop - start, *spec.shape(layer.name)[1:])
            values = acts[layer.name]
            if tuple(values.shape) != expected:
                raise ConfigError(f"unit {k}, layer {layer.name}: shape {tuple(values.shape)}, expected {expected}")
            stored = to_storage(values, spec.dtype, f"layer {layer.name}, images {start}-{stop - 1}")
            if not ok.all():
                stored = stored.copy()
                stored[~ok] = 0
            stored = np.ascontiguousarray(stored)
            self._array(L.acts_path(layer.name))[start:stop] = stored
            record["layers"][layer.name] = {"crc32c": google_crc32c.value(stored.reshape(-1).view(np.uint8))}
            sums[layer.name] = partial_sums(from_storage(stored, spec.dtype), ok, layer.tokens)
        if spec.has_labels:
            n_patches = spec.layers[0].tokens.n_patches
            if labels is None or labels.shape != (stop - start, n_patches):
                raise ConfigError(f"unit {k}: labels of shape {(stop - start, n_patches)} required")
            lab = np.ascontiguousarray(labels, dtype=_LABELS_DTYPE)
            self._array(L.LABELS)[start:stop] = lab
            record["labels_crc32c"] = google_crc32c.value(lab.reshape(-1).view(np.uint8))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        record["images_crc32c"] = google_crc32c.value(buf.getvalue())
        stats = pack_unit_sums(sums)
        record["stats_crc32c"] = google_crc32c.value(stats)
        self._put(L.unit_images_key(k), buf.getvalue())
        self._put(L.unit_stats_key(k), stats)
        self._put(L.unit_record_key(k), json.dumps(record, sort_keys=True).encode())
        return record

    def finalize(self) -> None:
        """Merge unit statistics and tables, then mark the store complete (idempotent)."""
        spec = self.spec
        missing = sorted(set(range(spec.n_units)) - self.units_done())
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise IncompleteStoreError(f"{self.url}: {len(missing)} of {spec.n_units} units missing ({shown}); "
                                       "rerun the extraction to finish them")
        fs, root = self._fs()
        parts: list[pa.Table] = []
        totals: dict[tuple[str, str], Sums] = {}  # added to in unit order: the same floats whoever wrote which unit
        for k, unit in read_units(fs, root, range(spec.n_units)):
            if isinstance(unit.record, Exception):
                raise CorruptDataError(f"{self.url}: unit {k}'s record {L.unit_record_key(k)} unreadable "
                                       f"({unit.record}); rerun the extraction of that unit", L.unit_record_key(k))
            if not isinstance(unit.table, bytes) or google_crc32c.value(unit.table) != unit.record["images_crc32c"]:
                raise IncompleteStoreError(f"{self.url}: unit {k}'s images table does not match its record; "
                                           "rerun the extraction of that unit")
            try:
                sums = unit_sums(k, unit.record, unit.stats)
            except CorruptDataError as e:
                raise CorruptDataError(f"{self.url}: {e}; rerun the extraction of that unit", e.key) from None
            for layer, kinds in sums.items():
                for kind, part in kinds.items():
                    totals[layer, kind] = add_sums(totals.get((layer, kind)), part)
            parts.append(pq.ParquetFile(io.BytesIO(unit.table)).read())  # 2-3x faster than read_table here
        table = pa.concat_tables(parts)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._put(L.IMAGES_TABLE, buf.getvalue())

        group = zarr.open_group(zarr_store(self.url, self.storage_options, read_only=False), mode="r+")
        for layer in spec.layers:
            for kind in TOKEN_KINDS:
                if (layer.name, kind) not in totals:
                    continue
                stats = LayerStats.from_sums(totals[layer.name, kind])
                path = L.stats_path(layer.name, kind)
                sub = group.require_group(path)
                sub.attrs.update({"count": stats.count, "mean_sq_norm": stats.mean_sq_norm})
                sub.create_array("mean", data=stats.mean, overwrite=True)
                sub.create_array("var", data=stats.var, overwrite=True)
        n_rejected = int((np.asarray(table.column("status").to_numpy(zero_copy_only=False)) != STATUS_OK).sum())
        attrs = {**spec.to_attrs(), "complete": True, "summary": {"n_rejected": n_rejected}}
        group.attrs.update({ATTRS_KEY: attrs})
        log.info("finalized %s: %d units, %d rejected images", self.url, spec.n_units, n_rejected)
