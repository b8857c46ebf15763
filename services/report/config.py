"""ReportConfig: what `actstore report` reads and writes (light: no matplotlib, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actstore.config import check_at_least

__all__ = ["ReportConfig"]


@dataclass(frozen=True)
class ReportConfig:
    """One report: what PATH is decides what it shows (a training run, a feature index, a comparison)."""

    path: str
    """A training run folder (or one SAE folder of it), a feature index folder, a comparison folder, or a taskfit
    folder."""
    out: str
    """The HTML file to write: one self-contained page (images inline) that opens from disk."""
    tokens: int = 65536
    """Training run: patch tokens sampled from its store (seeded) for the firing statistics."""
    features: int = 8
    """Index: random live features shown; comparison: top matches shown."""
    images: int = 8
    """Top images shown per feature."""
    seed: int = 0
    """Seeds the token sample and the choice of features."""
    device: str = "cpu"
    """Where the SAEs encode the sampled tokens (e.g. "cuda")."""
    overwrite: bool = False
    """Replace a report already at `out` (never any other file)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the run folder, its store and `out`."""

    def __post_init__(self) -> None:
        check_at_least(self, "report", {"tokens": 1, "features": 1, "images": 1, "seed": 0})
