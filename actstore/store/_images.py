"""The images table: row i describes image i (source, label, size, status)."""

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


def unit_table(rows: pa.Table | Mapping[str, Sequence[Any]] | None, start: int, stop: int) -> pa.Table:
    """Validate one unit's rows and give them the canonical schema and global indices.

    Missing columns take defaults (status ok), so synthetic stores can pass None.
    """
    n = stop - start
    cols = rows.to_pydict() if isinstance(rows, pa.Table) else dict(rows or {})
    unknown = set(cols) - set(IMAGES_SCHEMA.names)
    if unknown:
        raise ConfigError(f"images table: unknown columns {sorted(unknown)}")
    data: dict[str, Any] = {"index": np.arange(start, stop, dtype=np.int64)}
    for name, default in _DEFAULTS.items():
        values = cols.get(name)
        values = [default] * n if values is None else list(values)
        if len(values) != n:
            raise ConfigError(f"images table: column {name!r} has {len(values)} rows, unit has {n} images")
        data[name] = values
    bad = {s for s in data["status"]} - {STATUS_OK, STATUS_REJECTED}
    if bad:
        raise ConfigError(f"images table: unknown status {sorted(bad)}")
    return pa.table(data, schema=IMAGES_SCHEMA)


def ok_mask(table: pa.Table) -> np.ndarray:
    return np.asarray(table.column("status").to_numpy(zero_copy_only=False) == STATUS_OK, dtype=bool)
