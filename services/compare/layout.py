"""The comparison folder's layout, shared by its writer (services.compare.run), the service and the reports.

Light on purpose (the standard library and pyarrow only): the service imports it without torch.

    summary.json          format, both sides (source, index, sae, store, layer, live/dead counts), the
                          distribution of best similarities, mutual and assignment counts, the top
                          matches; written last
    matches_a.parquet     one row per live feature of A: feature_a, best_b, <similarity>, mutual,
                          jaccard_topk, max_diff
    matches_b.parquet     the same from B's side: feature_b, best_a, <similarity>, mutual, jaccard_topk, max_diff
    assignment.parquet    a one-to-one pairing maximizing the summed similarity: feature_a, feature_b, <similarity>

A comparison of several sides (`actstore compare --side ...`, services.compare.many) is a folder of its own format:

    summary.json          format actstore-compare-set, the sides, the matrix across them, each side's features by
                          the set of models where they have a partner (their group), examples of each group
    pairs/I-J/            the comparison of sides I and J (numbered from 1), a two-sided comparison folder as above
    shared.parquet        one row per live feature of every side: side, feature, fired, group, n_models, and per
                          side K partner_K (its best match there; -1 on its own side) and sim_K

<similarity> is the column `pearson` (the correlation of the two features' activations, `by: activations`)
or `cosine` (of their decoder directions, `by: decoder`): `similarity_column(summary)` names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actstore.errors import CorruptDataError, StoreFormatError
from actstore.outputs import read_marker
from actstore.store import normalize_url

__all__ = ["ASSIGNMENT", "FORMAT", "FORMAT_VERSION", "MATCHES", "PAIRS", "SET_FORMAT", "SHARED", "SIMILARITY",
           "SUMMARY", "is_comparison_set", "read_comparison", "read_table", "similarity_column"]

FORMAT, FORMAT_VERSION = "actstore-compare", 1
SET_FORMAT = "actstore-compare-set"
"""The format of a comparison of several sides (same version numbering as FORMAT)."""
SUMMARY, ASSIGNMENT, SHARED, PAIRS = "summary.json", "assignment.parquet", "shared.parquet", "pairs"
MATCHES = {"a": "matches_a.parquet", "b": "matches_b.parquet"}
"""The matches table of each side."""
SIMILARITY = {"activations": "pearson", "decoder": "cosine"}
"""The tables' similarity column, by the comparison's `by`."""


def similarity_column(summary: dict[str, Any]) -> str:
    """The name of the similarity column of a comparison's tables ("pearson" or "cosine")."""
    return SIMILARITY[summary.get("by", "activations")]


def read_comparison(path: str | Path, form: str = FORMAT) -> dict[str, Any]:
    """summary.json of the comparison at `path`, checked for format (`form`: FORMAT for two sides, SET_FORMAT for
    several) and version."""
    try:
        return read_marker(path, SUMMARY, form, FORMAT_VERSION, "a comparison", "compare")
    except StoreFormatError as e:
        if form == FORMAT and is_comparison_set(path):
            raise StoreFormatError(f"{e} (a comparison of several sides: its pairs are under {PAIRS}/)") from None
        raise


def is_comparison_set(path: str | Path) -> bool:
    """Whether the comparison at `path` is one of several sides (its summary.json says SET_FORMAT)."""
    try:
        return json.loads((Path(normalize_url(str(path))) / SUMMARY).read_text()).get("format") == SET_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_table(path: str | Path, name: str) -> Any:
    """One of the comparison's parquet tables (a pyarrow Table); a CorruptDataError names a bad file."""
    import pyarrow.parquet as pq

    p = Path(normalize_url(str(path))) / name
    try:
        return pq.read_table(p)
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{p}: unreadable ({' '.join(str(e).split())})", key=name) from None
