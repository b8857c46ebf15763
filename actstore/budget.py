"""Memory budgets: every pass over a store sizes its blocks from one number of bytes and the widths.

A pass knows what it must hold whatever the data (its accumulators, the SAE's weights: `fixed`) and what
one more row of a block costs (a patch, an image, a feature tile's column: `per_row`); the budget gives
the rows of a block, never a fixed row count, so the same command fits a laptop and a 65K-feature SAE:

    budget = MemoryBudget.of(cfg.memory_gb)        # None: a safe share of this machine
    images = budget.rows("index", fixed=acc_bytes + sae_bytes, per_row=per_image_bytes, row="image")

A budget too small for one row is refused with one line that says what would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from actstore.errors import ConfigError

__all__ = ["DEFAULT_SHARE", "GB", "MemoryBudget", "default_memory_gb", "format_bytes", "machine_memory"]

GB = 1 << 30
DEFAULT_SHARE = 0.5
"""The default budget's share of the machine's memory: room for the OS, the page cache and a second job."""
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or the container's cgroup limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_gb() -> float:
    """DEFAULT_SHARE of machine_memory(), in GB (GiB)."""
    return DEFAULT_SHARE * machine_memory() / GB


def format_bytes(n: float) -> str:
    """1.5 GB, 300 MB, 12 KB: one decimal below 10, binary units."""
    for unit, size in (("GB", GB), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryBudget:
    """A pass's working memory, in bytes (see the module docstring)."""

    bytes: int
    gb: float
    """As the user gave it (or the default), for messages."""

    @classmethod
    def of(cls, gb: float | None) -> MemoryBudget:
        """The budget of a `--memory-gb` value; None means default_memory_gb()."""
        if gb is None:
            gb = default_memory_gb()
        if not gb > 0:
            raise ConfigError(f"--memory-gb must be > 0, got {gb}")
        return cls(int(gb * GB), gb)

    def rows(self, command: str, *, fixed: int, per_row: int, row: str = "row", at_most: int | None = None,
             share: float = 1.0) -> int:
        """How many rows of `per_row` bytes fit in `share` of what `fixed` bytes leave (at least 1, at most
        `at_most`); a one-line ConfigError when not even one fits in all of it."""
        left = self.bytes - fixed
        if left // max(per_row, 1) < 1:
            raise ConfigError(f"{command}: --memory-gb {self.gb:g} is too small: it needs {format_bytes(fixed)} "
                              f"whatever the data and {format_bytes(per_row)} per {row}; give at least "
                              f"{(fixed + per_row) / GB:.2g}")
        n = max(1, int(left * share) // max(per_row, 1))
        return n if at_most is None else min(n, max(at_most, 1))
