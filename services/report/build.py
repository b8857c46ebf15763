"""`write_report`: what PATH is (by the files in it), its report, and the page written where asked."""

from __future__ import annotations

from pathlib import Path

import fsspec

from actstore.config import public_config
from actstore.errors import ConfigError
from actstore.store import filesystem, is_local, normalize_url
from services.report.config import ReportConfig
from services.report.page import Page, check_out, write_page

__all__ = ["KINDS", "RUN_CONFIG", "is_sae_folder", "report_kind", "write_report"]

RUN_CONFIG = "train_config.json"
SAE_FILES = ("cfg.json", "sae.safetensors")
"""What marks an SAE folder of a run."""

KINDS = {"training": "a training run (train_config.json) or one SAE of it (cfg.json + sae.safetensors)",
         "index": "a feature index (index.json)",
         "comparison": "a comparison (summary.json)",
         "taskfit": "a taskfit folder (taskfit.json)"}
"""What each kind of report reads, as the error for anything else says."""
_MARKS = (("training", RUN_CONFIG), ("index", "index.json"), ("comparison", "summary.json"),
          ("taskfit", "taskfit.json"))


def is_sae_folder(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    return all(fs.isfile(f"{root}/{name}") for name in SAE_FILES)


def report_kind(path: str, storage_options: dict | None = None) -> str:
    """The kind of folder at `path`, by the file that marks it; a one-line ConfigError for anything else."""
    fs, root = filesystem(path, storage_options)
    for kind, mark in _MARKS:
        if fs.isfile(f"{root}/{mark}"):
            if kind != "training" and not is_local(path):
                raise ConfigError(f"{path}: {KINDS[kind]} must be a local folder")
            return kind
    if "/" in root.rstrip("/") and is_sae_folder(fs, root) and fs.isfile(f"{root.rsplit('/', 1)[0]}/{RUN_CONFIG}"):
        return "training"
    raise ConfigError(f"{path}: {'nothing there' if not fs.exists(root) else 'not a folder to report on'}; expected "
                      + ", ".join(KINDS.values()))


def write_report(cfg: ReportConfig, progress: bool = True) -> str:
    """Build the report of cfg.path and write it to cfg.out (refused before any work if out is taken); returns
    out."""
    opts = dict(cfg.storage_options) or None
    check_out(cfg.out, cfg.overwrite, opts)
    kind = report_kind(cfg.path, opts)
    config = public_config(cfg)
    page: Page
    if kind == "training":
        from services.report.training import open_run, training_report

        page = training_report(cfg, open_run(*filesystem(cfg.path, opts)), config, progress)
    elif kind == "index":
        from services.report.index import index_report

        page = index_report(cfg, Path(normalize_url(cfg.path)).resolve(), config)
    elif kind == "comparison":
        from services.report.comparison import comparison_report

        page = comparison_report(cfg, Path(normalize_url(cfg.path)).resolve(), config)
    else:
        from services.report.taskfit import taskfit_report

        page = taskfit_report(cfg, Path(normalize_url(cfg.path)).resolve(), config)
    write_page(page, cfg.out, cfg.overwrite, opts)
    return cfg.out
