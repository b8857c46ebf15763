"""The images table: row i describes image i (source, label, size, status), then the store's label columns.

A store may declare extra per-image label columns in its spec's dataset metadata (`dataset["label_columns"]`,
e.g. the taxonomy levels of iNat2021): they follow the standard columns, in the declared order, as strings,
"" meaning no label. A store that declares none has exactly IMAGES_SCHEMA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from actstore.errors import ConfigError

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"

IMAGES_SCHEMA = pa.schema([
    ("index", pa.int64()),
    ("uri", pa.string()),
    ("label", pa.int32()),       # -1: no label
    ("width", pa.int32()),       # 0 when unknown (rejected or synthetic)
    ("height", pa.int32()),
    ("status", pa.string()),     # "ok" or "rejected"
    ("reason", pa.string()),     # why it was rejected, "" when ok
])
_DEFAULTS = {"uri": "", "label": -1, "width": 0, "height": 0, "status": STATUS_OK, "reason": ""}


def parse_label_columns(dataset: Mapping[str, Any]) -> tuple[str, ...]:
    """The extra label columns a store's dataset metadata declares (`label_columns`), checked: a list of distinct,
    non-empty names, none of them a standard column."""
    declared = dataset.get("label_columns") or []
    if not isinstance(declared, (list, tuple)) or not all(isinstance(n, str) for n in declared):
        raise ConfigError(f"label_columns must be a list of column names, got {declared!r}")
    names = tuple(declared)
    clash = sorted(set(names) & set(IMAGES_SCHEMA.names))
    if clash:
        raise ConfigError(f"label_columns: {', '.join(clash)} already in the images table "
                          f"({', '.join(IMAGES_SCHEMA.names)}); choose other names")
    if "" in names or len(set(names)) != len(names):
        raise ConfigError(f"label_columns must be distinct, non-empty names, got {list(names)}")
    return names


def images_schema(extra: Sequence[str] = ()) -> pa.Schema:
    """The images table's schema: the standard columns, then the label columns `extra` as strings."""
    return IMAGES_SCHEMA if not extra else pa.schema([*IMAGES_SCHEMA, *(pa.field(n, pa.string()) for n in extra)])


def unit_table(rows: pa.Table | Mapping[str, Sequence[Any]] | None, start: int, stop: int,
               extra: Sequence[str] = ()) -> pa.Table:
    """Validate one unit's rows and give them the canonical schema and global indices.

    Missing columns take defaults (status ok; "" for the label columns `extra`), so synthetic stores can pass
    None; a label column's None is stored as "" (no label).
    """
    n = stop - start
    cols = rows.to_pydict() if isinstance(rows, pa.Table) else dict(rows or {})
    unknown = set(cols) - set(IMAGES_SCHEMA.names) - set(extra)
    if unknown:
        raise ConfigError(f"images table: unknown columns {sorted(unknown)}"
                          + (f" (the store's label columns: {', '.join(extra)})" if extra else
                             " (a store declares label columns in its dataset's label_columns)"))
    data: dict[str, Any] = {"index": np.arange(start, stop, dtype=np.int64)}
    for name, default in [*_DEFAULTS.items(), *((name, "") for name in extra)]:
        values = cols.get(name)
        values = [default] * n if values is None else list(values)
        if len(values) != n:
            raise ConfigError(f"images table: column {name!r} has {len(values)} rows, unit has {n} images")
        data[name] = values
    for name in extra:
        data[name] = ["" if v is None else v for v in data[name]]
        if not all(isinstance(v, str) for v in data[name]):
            raise ConfigError(f"images table: label column {name!r} must hold strings (\"\": no label)")
    bad = {s for s in data["status"]} - {STATUS_OK, STATUS_REJECTED}
    if bad:
        raise ConfigError(f"images table: unknown status {sorted(bad)}")
    return pa.table(data, schema=images_schema(extra))


def ok_mask(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("status").to_numpy(zero_copy_only=False) == STATUS_OK, dtype=bool)
