"""Features explained in words (`actstore explain`): vocabulary names and VLM explanations of an index's features,
scored on held-out images, in explanations.parquet beside the index (`layout`).

`layout` is light (pyarrow) and is what the service and the report read; the job's names (`ExplainConfig`,
`run_explain`) load torch and are imported on first use (PEP 562).
"""

from __future__ import annotations

from actstore.lazy import lazy_exports
from services.explain.layout import (EXPLAINERS, EXPLANATIONS, SCHEMA, is_explanations, read_explanations,
                                     write_explanations)

_LAZY = dict.fromkeys(("ExplainConfig", "run_explain"), "run")
__all__ = sorted(["EXPLAINERS", "EXPLANATIONS", "SCHEMA", "is_explanations", "read_explanations",
                  "write_explanations", *_LAZY])
__getattr__ = lazy_exports(__name__, _LAZY)
