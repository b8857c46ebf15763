"""The comparison folder's layout, shared by its writer (services.compare.run), the service and the reports.

Light on purpose (the standard library and pyarrow only): the service imports it without torch.

    summary.json          format, both sides (source, index, sae, store, layer, live/dead counts), the
                          distribution of best similarities, mutual and assignment counts, the top
                          matches; written last
    matches_a.parquet     one row per live feature of A: feature_a, best_b, <similarity>, mutual,
                          jaccard_topk, max_diff
    matches_b.parquet     the same from B's side: feature_b, best_a, <similarity>, mutual, jaccard_topk, max_diff
    assignment.parquet    a one-to-one pairing maximizing the summed similarity: feature_a, feature_b, <similarity>

<similarity> is the column `pearson` (the correlation of the two features' activations, `by: activations`)
or `cosine` (of their decoder directions, `by: decoder`): `similarity_column(summary)` names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actstore.errors import CorruptDataError, StoreFormatError, StoreNotFoundError
from actstore.store import normalize_url

__all__ = ["ASSIGNMENT", "FORMAT", "FORMAT_VERSION", "MATCHES", "SIMILARITY", "SUMMARY", "read_comparison", "read_table",
           "similarity_column"]

FORMAT, FORMAT_VERSION = "actstore-compare", 1
SUMMARY, ASSIGNMENT = "summary.json", "assignment.parquet"
MATCHES = {"a": "matches_a.parquet", "b": "matches_b.parquet"}
"""The matches table of each side."""
SIMILARITY = {"activations": "pearson", "decoder": "cosine"}
"""The tables' similarity column, by the comparison's `by`."""


def similarity_column(summary: dict[str, Any]) -> str:
    """The name of the similarity column of a comparison's tables ("pearson" or "cosine")."""
    return SIMILARITY[summary.get("by", "activations")]


def read_comparison(path: str | Path) -> dict[str, Any]:
    """summary.json of the comparison at `path`, checked for format and version."""
    p = Path(normalize_url(str(path))) / SUMMARY
    try:
        summary = json.loads(p.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFoundError(f"{p.parent}: not a comparison (no {SUMMARY}; run `actstore compare`)") from None
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{p}: not JSON ({e})", key=SUMMARY) from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT or summary.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"{p.parent}: not an {FORMAT} v{FORMAT_VERSION} comparison")
    return summary


def read_table(path: str | Path, name: str) -> Any:
    """One of the comparison's parquet tables (a pyarrow Table); a CorruptDataError names a bad file."""
    import pyarrow.parquet as pq

    p = Path(normalize_url(str(path))) / name
    try:
        return pq.read_table(p)
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{p}: unreadable ({' '.join(str(e).split())})", key=name) from None
