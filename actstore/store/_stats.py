"""Per-layer running statistics: exact float64 sums per unit, merged in unit order.

Units hold (count, sum, sum of squares) so that merging is addition and the
result does not depend on which process wrote which unit. Blocks of images
of a 16-bit store are summed in float32 (10x faster than float64 here;
torch sums cascade, so the error stays near float32 epsilon) and
accumulated in float64. Rejected images
are excluded. Statistics are kept per token kind ("cls", "patches") because
the CLS token's distribution differs from the patches'; "all" is their merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.store._spec import TokenLayout

TOKEN_KINDS = ("cls", "patches")
_BLOCK_IMAGES = 16  # bounds the float32 temporaries and the length of float32 sums


@dataclass(frozen=True)
class LayerStats:
    """count, per-channel mean and variance of one token kind of one layer."""

    count: int
    mean: np.ndarray
    var: np.ndarray

    @property
    def mean_sq_norm(self) -> float:
        """E||x||^2 = sum over channels of (var + mean^2)."""
        return float(np.sum(self.var + self.mean**2))

    @classmethod
    def from_sums(cls, s: Mapping[str, Any]) -> LayerStats:
        count = int(s["count"])
        total, sq = np.asarray(s["sum"], np.float64), np.asarray(s["sumsq"], np.float64)
        mean = total / max(count, 1)
        return cls(count, mean, np.maximum(sq / max(count, 1) - mean**2, 0.0))

    def to_sums(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.mean * self.count,
                "sumsq": (self.var + self.mean**2) * self.count}


def partial_sums(values: torch.Tensor, ok: np.ndarray, tokens: TokenLayout) -> dict[str, dict[str, Any]]:
    """Sums over the ok images of one unit, per token kind, JSON-ready (lists of floats)."""
    x = values[torch.from_numpy(ok)] if not ok.all() else values
    d = x.shape[-1]
    kinds = {"cls": slice(0, 1), "patches": slice(1, None)} if tokens.cls else {"patches": slice(0, None)}
    # 16-bit values square exactly in float32; float32 stores need float64 to keep their precision
    acc = torch.float64 if x.dtype == torch.float32 else torch.float32
    out = {}
    for kind, sl in kinds.items():
        total, sq, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0
        for b in range(0, x.shape[0], _BLOCK_IMAGES):
            block = x[b:b + _BLOCK_IMAGES, sl].reshape(-1, d).to(acc)
            total += block.sum(0)
            sq += block.square().sum(0)
            count += block.shape[0]
        out[kind] = {"count": count, "sum": total.tolist(), "sumsq": sq.tolist()}
    if tokens.cls and tokens.n_patches == 0:
        del out["patches"]
    return out


def merge_sums(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Add partial sums in the given order; None when there are none."""
    merged = None
    for p in parts:
        if merged is None:
            merged = {"count": int(p["count"]), "sum": np.array(p["sum"], np.float64),
                      "sumsq": np.array(p["sumsq"], np.float64)}
        else:
            merged["count"] += int(p["count"])
            merged["sum"] += np.asarray(p["sum"], np.float64)
            merged["sumsq"] += np.asarray(p["sumsq"], np.float64)
    return merged
