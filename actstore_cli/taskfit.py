"""`actstore taskfit`: which models' SAE features fit a labelled task: 1-D and k-sparse probes on the SAE codes
against the dense probe on the raw layer, held-out, with the rank correlation across models."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def print_summary(summary: dict[str, Any]) -> None:
    """The table across models, then each rank correlation with its n and caveat."""
    from services.report.taskfit import scores_table

    header, rows = scores_table(summary)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    print(f"{len(summary['class_names'])} classes; {summary['n_train']} training, {summary['n_test']} held-out images "
          "(every number is held-out: 1-D = mean over classes of the best single feature's AUROC / AP, k=... = "
          "k-sparse probe accuracy, dense = linear probe on the raw layer)")
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
    for c in summary["correlations"]:
        rho = "not computed" if c["rho"] is None else f"Spearman rho {c['rho']:+.3f}"
        print(f"\n{c['score']} vs {c['against']}: {rho}, n = {c['n']}\n  caveat: {c['note']}")


def cmd_taskfit(args: argparse.Namespace) -> int:
    from services.taskfit import TaskfitConfig, run_taskfit

    cfg = config_from_args(TaskfitConfig, args, "taskfit")
    print_summary(run_taskfit(cfg, progress=not args.quiet))
    print(f"\n{cfg.out}: written (taskfit.json, classes.parquet, ksparse.parquet, probes/, report.html)")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "taskfit", "Which models' SAE features fit a labelled task: 1-D, k-sparse and dense probes.",
                flags_from("services.taskfit:TaskfitConfig", cmd_taskfit), chosen)
