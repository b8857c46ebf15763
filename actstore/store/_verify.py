"""Check every byte of a store: chunk checksums, unit records, tables, stats files.

Each problem is one line naming the object (shard, inner chunk, unit record)
so that a user can delete or re-extract exactly that unit. The units' own
objects are read concurrently, a few hundred units at a time; their shards
are then checked unit after unit.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from actstore.errors import ActstoreError, CorruptDataError
from actstore.store import _layout as L
from actstore.store._images import images_schema
from actstore.store._io import UnitObjects, read_units
from actstore.store._reader import ActivationStore
from actstore.store._spec import STORAGE_DTYPES
from actstore.store._stats import unit_sums


@dataclass
class VerifyReport:
    """What verify_store checked and what it found wrong."""

    url: str
    n_units: int
    units_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _columns(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} {f.type}" for f in schema)


def _check_layer_unit(store: ActivationStore, layer: str, k: int, record: dict[str, Any],
                      report: VerifyReport) -> None:
    spec = store.spec
    start, stop = spec.unit_range(k)
    reader = store.shard_reader(layer)
    ipc = spec.images_per_chunk
    chunks = range(start // ipc, -(-stop // ipc))
    out = np.zeros((len(chunks) * ipc, *spec.shape(layer)[1:]), STORAGE_DTYPES[spec.dtype])
    try:
        encoded = reader.fetch(chunks)
    except ActstoreError as e:
        report.problems.append(str(e))
        return
    bad = False
    for j, i in enumerate(chunks):
        try:
            reader.decode(i, encoded[i], out[j * ipc:(j + 1) * ipc])
        except ActstoreError as e:
            report.problems.append(str(e))
            bad = True
        report.chunks_checked += 1
    report.bytes_checked += out.nbytes
    values = out[: stop - start]
    digest = google_crc32c.value(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    expected = record.get("layers", {}).get(layer, {}).get("crc32c")
    if not bad and digest != expected:
        report.problems.append(f"unit {k}, layer {layer}: values differ from the unit record's digest "
                               f"(shard {reader.shard_key(k)} was overwritten or belongs to another unit)")


def _check_unit(store: ActivationStore, k: int, unit: UnitObjects, report: VerifyReport) -> None:
    record = unit.record
    if isinstance(record, Exception):
        report.problems.append(f"unit {k}: record {L.unit_record_key(k)} unreadable ({record})")
        return
    if record.get("images") != list(store.spec.unit_range(k)):
        report.problems.append(f"unit {k}: record covers images {record.get('images')}, "
                               f"expected {list(store.spec.unit_range(k))}")
        return
    if isinstance(unit.table, FileNotFoundError):
        report.problems.append(f"unit {k}: {L.unit_images_key(k)} missing")
    elif isinstance(unit.table, Exception):
        report.problems.append(f"unit {k}: {L.unit_images_key(k)} unreadable ({unit.table})")
    elif google_crc32c.value(unit.table) != record.get("images_crc32c"):
        report.problems.append(f"unit {k}: {L.unit_images_key(k)} does not match its record")
    try:
        layers = set(unit_sums(k, record, unit.stats))
        if layers != {layer.name for layer in store.layers}:
            report.problems.append(f"unit {k}: statistics of layers {sorted(layers)}, expected "
                                   f"{[layer.name for layer in store.layers]}")
    except CorruptDataError as e:
        report.problems.append(str(e))
    except (KeyError, TypeError, AttributeError) as e:
        report.problems.append(f"unit {k}: record {L.unit_record_key(k)} has no statistics ({e!r})")
    for layer in store.layers:
        _check_layer_unit(store, layer.name, k, record, report)
    if store.spec.has_labels:
        start, stop = store.spec.unit_range(k)
        try:
            labels = np.ascontiguousarray(store.labels(start, stop))
            if google_crc32c.value(labels.reshape(-1).view(np.uint8)) != record.get("labels_crc32c"):
                report.problems.append(f"unit {k}: labels differ from the unit record's digest")
        except ValueError as e:
            report.problems.append(f"{L.shard_key(L.LABELS, k, 2)}: labels do not decode ({e})")
    report.units_checked += 1


def verify_store(url: str, storage_options: dict[str, Any] | None = None, progress: bool = True) -> VerifyReport:
    """Read everything in the store and report each bad chunk, unit or table."""
    with ActivationStore(url, storage_options, allow_partial=True) as store:
        spec = store.spec
        report = VerifyReport(store.url, spec.n_units)
        if not store.complete:
            report.problems.append(f"{store.url}: store not finalized (incomplete extraction)")
        done = set(store.units_done())
        written = [k for k in range(spec.n_units) if k in done]
        report.problems += [f"unit {k}: no record ({L.unit_record_key(k)}); unit not written"
                            for k in range(spec.n_units) if k not in done]
        for k, unit in tqdm(read_units(store.fs, store.root, written), total=len(written), desc="verify",
                            unit="unit", disable=not progress):
            _check_unit(store, k, unit, report)
        if store.complete:
            try:
                table = pq.read_table(io.BytesIO(store.fs.cat_file(f"{store.root}/{L.IMAGES_TABLE}")))
                if table.num_rows != spec.n_images:
                    report.problems.append(f"{L.IMAGES_TABLE}: {table.num_rows} rows, expected {spec.n_images}")
                expected = images_schema(store.label_columns)
                if not table.schema.equals(expected):
                    report.problems.append(f"{L.IMAGES_TABLE}: columns ({_columns(table.schema)}), expected "
                                           f"({_columns(expected)})")
            except (OSError, ValueError) as e:
                report.problems.append(f"{L.IMAGES_TABLE}: unreadable ({e})")
            for layer in store.layers:
                try:
                    store.stats(layer.name, "all")
                except (ActstoreError, KeyError, json.JSONDecodeError) as e:
                    report.problems.append(f"layer {layer.name}: statistics unreadable ({e})")
        return report
