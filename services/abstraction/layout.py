"""What `actstore abstraction` writes into an index folder, and its read side (light: the service reads it).

    abstraction.parquet   one row per feature: feature, node (null: no level), depth (-1: none), share, n
    abstraction.json      written last: FORMAT (the marker that makes the pair ours), the hierarchy's source,
                          min_share, k, the depth names (label columns) and the profile (features per depth)

    read_abstraction("./index", d_sae)    # None when the index has none
    level_line(abstraction.level(7))      # "level: shape:circle (depth 2 shape, share 1.00 of 8 top images)"
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from actstore.errors import CorruptDataError, StoreFormatError
from actstore.store import normalize_url

__all__ = ["FORMAT", "FORMAT_VERSION", "INFO", "LEVELS", "Abstraction", "is_ours", "level_line", "read_abstraction"]

FORMAT, FORMAT_VERSION = "actstore-abstraction", 1
LEVELS, INFO = "abstraction.parquet", "abstraction.json"
"""The per-feature levels and the profile, in the index folder."""


def is_ours(info_path: str | Path) -> bool:
    """Whether the file is an abstraction.json of ours (a JSON object carrying FORMAT)."""
    try:
        return json.loads(Path(info_path).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class Abstraction:
    """An index's abstraction profile: abstraction.json as written (`info`) and each feature's level."""

    info: dict[str, Any]
    node: list[str | None]
    depth: np.ndarray
    share: np.ndarray
    n: np.ndarray

    def level(self, fid: int) -> dict[str, Any]:
        """Feature fid's level as the service sends it (node null: no node holds min_share of its top images)."""
        depth = int(self.depth[fid])
        names = self.info.get("depth_names") or []
        return {"node": self.node[fid], "depth": depth if depth >= 0 else None,
                "depth_name": names[depth] if 0 <= depth < len(names) else None,
                "share": float(self.share[fid]) if depth >= 0 else None, "n": int(self.n[fid]),
                "min_share": self.info["min_share"]}


def level_line(level: dict[str, Any]) -> str:
    """One line saying where a feature sits: "level: NODE (depth d, share s of n top images)"."""
    if level["node"] is None:
        if not level["n"]:
            return "level: none (no labelled top images)"
        return f"level: none (no node holds {level['min_share']:g} of its {level['n']} labelled top images)"
    name = f" {level['depth_name']}" if level["depth_name"] else ""
    return (f"level: {level['node']} (depth {level['depth']}{name}, share {level['share']:.2f} of {level['n']} "
            "top images)")


def read_abstraction(index: str | Path, d_sae: int) -> Abstraction | None:
    """The index's abstraction profile, or None when it has none (no abstraction.json); a one-line error when the
    pair is not ours or does not hold d_sae features."""
    root = Path(normalize_url(str(index)))
    if not (root / INFO).exists():
        return None
    if not is_ours(root / INFO):
        raise StoreFormatError(f"{root / INFO}: not an {FORMAT} file; move it away and rerun `actstore abstraction`")
    info = json.loads((root / INFO).read_text())
    try:
        table = pq.ParquetFile(root / LEVELS).read()
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{root / LEVELS}: unreadable ({' '.join(str(e).split())})", key=LEVELS) from None
    if table.num_rows != d_sae or table.column("feature").to_pylist() != list(range(d_sae)):
        raise CorruptDataError(f"{root / LEVELS}: {table.num_rows} rows, index.json says d_sae={d_sae}", key=LEVELS)
    column = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("depth", "share", "n")}
    return Abstraction(info, table.column("node").to_pylist(), column["depth"], column["share"], column["n"])
