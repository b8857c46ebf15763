"""Which models' SAE features fit a labelled image task (`actstore taskfit`): per model, each class's best single
feature (held-out AUROC, AP), k-sparse probes on the SAE codes (held-out accuracy against k) and the dense linear
probe on the raw layer; across models, the rank correlation of the feature-based scores with the dense probe's
accuracy, with its sample size (`run`, numbers in `measure`, the models in `models`), and the folder's format
(`layout`).

`layout` is light (pyarrow and the standard library) and is what the report reads; the run's names
(`TaskfitConfig`, `run_taskfit`) load torch and are imported on first use (PEP 562).
"""

from __future__ import annotations

from actstore.lazy import lazy_exports
from services.taskfit.layout import (CLASSES, FORMAT, FORMAT_VERSION, KSPARSE, PROBES, REPORT, SUMMARY, read_table,
                                     read_taskfit)

_LAZY = dict.fromkeys(("TaskfitConfig", "run_taskfit"), "run")
__all__ = ["CLASSES", "FORMAT", "FORMAT_VERSION", "KSPARSE", "PROBES", "REPORT", "SUMMARY", "TaskfitConfig",
           "read_table", "read_taskfit", "run_taskfit"]
__getattr__ = lazy_exports(__name__, _LAZY)
