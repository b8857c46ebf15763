"""Cross-model feature matching: two SAEs over the same images (`run`, its sides in `sides`, its streaming
accumulators in `stream` and the matching in `match`), or every pair of several (`many`), and the comparison
folder's format (`layout`).

`layout` is light (pyarrow and the standard library) and is what the service and the reports read; the
run's names (`CompareConfig`, `run_compare`) load torch and are imported on first use (PEP 562).
"""

from __future__ import annotations

from actstore.lazy import lazy_exports
from services.compare.layout import (ASSIGNMENT, FORMAT, FORMAT_VERSION, MATCHES, PAIRS, SET_FORMAT, SHARED,
                                     SIMILARITY, SUMMARY, is_comparison_set, read_comparison, read_table,
                                     similarity_column)

_LAZY = dict.fromkeys(("BY", "LEVELS", "CompareConfig", "run_compare"), "run")
__all__ = sorted(["ASSIGNMENT", "FORMAT", "FORMAT_VERSION", "MATCHES", "PAIRS", "SET_FORMAT", "SHARED", "SIMILARITY",
                  "SUMMARY", "is_comparison_set", "read_comparison", "read_table", "similarity_column", *_LAZY])
__getattr__ = lazy_exports(__name__, _LAZY)
