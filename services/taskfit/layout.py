"""The taskfit folder's layout, shared by its writer (services.taskfit.run), the CLI and the report.

Light on purpose (pyarrow and the standard library): the report reads a taskfit folder without torch.

    taskfit.json      written last (its presence marks a taskfit folder): config, per model its numbers, the rank
                      correlations with their sample size and the caveat
    classes.parquet   one row per (model, class): the class's best single feature, its held-out AUROC and AP
    ksparse.parquet   one row per (model, k): the k-sparse probes' held-out accuracy and balanced accuracy
    probes/<i>/       model i's dense linear probe on the raw layer (an `actstore probe` folder)
    report.html       the report page (services.report.taskfit)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actstore.outputs import read_marker
from services.compare.layout import read_table

__all__ = ["CLASSES", "FORMAT", "FORMAT_VERSION", "KSPARSE", "PROBES", "REPORT", "SUMMARY", "read_table",
           "read_taskfit"]

FORMAT, FORMAT_VERSION = "actstore-taskfit", 1
SUMMARY, CLASSES, KSPARSE = "taskfit.json", "classes.parquet", "ksparse.parquet"
PROBES, REPORT = "probes", "report.html"


def read_taskfit(path: str | Path) -> dict[str, Any]:
    """taskfit.json of the folder at `path`, checked for format and version."""
    return read_marker(path, SUMMARY, FORMAT, FORMAT_VERSION, "a taskfit folder", "taskfit")
