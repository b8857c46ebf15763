"""Reports: one self-contained HTML page (matplotlib figures and images inline, no script) on a training run,
a feature index, a comparison or a taskfit folder, whichever PATH is (`actstore report PATH --out FILE.html`).

    training run    loss, MSE, FVU, L0 and dead fraction against tokens (metrics.jsonl); per SAE, on a seeded
                    sample of the store's tokens, the lifetime sparsity (features by log10 firing frequency,
                    the dead ones apart) and the population sparsity (tokens by the fraction of features active)
    feature index   the density histogram; random live features, each with its top images and heatmaps
    comparison      each side's best-match similarities; the top matches with both features' top images; for
                    several models, the matrix across them, their features by how many models share them, and
                    examples of each group
    taskfit         per model, the 1-D, k-sparse and dense probes' held-out scores, and their rank correlation
                    (`actstore abstraction --report` draws abstraction profiles; an index report shows the levels)

Modules: config (ReportConfig), build (which kind, write_report), page (the HTML, the output rules), plots (the
matplotlib figures), training, index, comparison, taskfit (one per kind), abstraction. Only the kind asked for is
imported: an index report never loads torch.
"""

from __future__ import annotations

from services.report.build import KINDS, report_kind, write_report
from services.report.config import ReportConfig

__all__ = ["KINDS", "ReportConfig", "report_kind", "write_report"]
