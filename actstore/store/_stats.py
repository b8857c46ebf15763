"""Per-layer running statistics: exact float64 sums per unit, merged in unit order.

Units hold (count, sum, sum of squares) so that merging is addition and the
result does not depend on which process wrote which unit. Blocks of images
of a 16-bit store are summed in float32 (10x faster than float64 here;
torch sums cascade, so the error stays near float32 epsilon) and
accumulated in float64. Rejected images
are excluded. Statistics are kept per token kind ("cls", "patches") because
the CLS token's distribution differs from the patches'; "all" is their merge.

A unit's sums are stored beside its record as one safetensors file
(`<layer>/<kind>/{count,sum,sumsq}`: int64 and float64, byte-exact), whose
crc32c the record holds; stores written before that file existed carry the
sums as JSON lists inside the record (exact too: JSON floats round-trip).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import safetensors.numpy
import torch
from safetensors import SafetensorError

from actstore.errors import CorruptDataError
from actstore.store import _layout as L
from actstore.store._spec import TokenLayout

Sums = dict[str, Any]
"""{"count": int, "sum": float64 (d,), "sumsq": float64 (d,)} (lists of floats in a record of the JSON era)."""
UnitSums = dict[str, dict[str, Sums]]
"""A unit's sums per layer, then per token kind."""

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


def partial_sums(values: torch.Tensor, ok: np.ndarray, tokens: TokenLayout) -> dict[str, Sums]:
    """Sums over the ok images of one unit, per token kind."""
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
        out[kind] = {"count": count, "sum": total.numpy(), "sumsq": sq.numpy()}
    if tokens.cls and tokens.n_patches == 0:
        del out["patches"]
    return out


def add_sums(total: Sums | None, part: Mapping[str, Any]) -> Sums:
    """total + part, in place on total (a new total when None)."""
    if total is None:
        return {"count": int(part["count"]), "sum": np.array(part["sum"], np.float64),
                "sumsq": np.array(part["sumsq"], np.float64)}
    total["count"] += int(part["count"])
    total["sum"] += np.asarray(part["sum"], np.float64)
    total["sumsq"] += np.asarray(part["sumsq"], np.float64)
    return total


def merge_sums(parts: Iterable[Mapping[str, Any]]) -> Sums | None:
    """Add partial sums in the given order; None when there are none."""
    merged = None
    for p in parts:
        merged = add_sums(merged, p)
    return merged


def pack_unit_sums(sums: Mapping[str, Mapping[str, Sums]]) -> bytes:
    """A unit's sums as the bytes of its stats file (the same sums give the same bytes)."""
    tensors = {}
    for layer, kinds in sums.items():
        for kind, s in kinds.items():
            tensors[f"{layer}/{kind}/count"] = np.array(s["count"], np.int64)
            tensors[f"{layer}/{kind}/sum"] = np.asarray(s["sum"], np.float64)
            tensors[f"{layer}/{kind}/sumsq"] = np.asarray(s["sumsq"], np.float64)
    return safetensors.numpy.save(tensors)


def unit_sums(k: int, record: Mapping[str, Any], data: bytes | Exception | None) -> UnitSums:
    """Unit k's sums: from its stats file's bytes `data`, checked against the record's crc32c, or from the
    record itself when it predates stats files. A missing, altered or undecodable file is a
    CorruptDataError naming it: its sums are never used."""
    if "stats_crc32c" not in record:
        return {name: layer["stats"] for name, layer in record["layers"].items()}
    key = L.unit_stats_key(k)
    if not isinstance(data, bytes):
        raise CorruptDataError(f"unit {k}: {key} unreadable ({data or 'not read'})", key)
    if google_crc32c.value(data) != record["stats_crc32c"]:
        raise CorruptDataError(f"unit {k}: {key} does not match its record (crc32c)", key)
    try:
        tensors = safetensors.numpy.load(data)
    except SafetensorError as e:
        raise CorruptDataError(f"unit {k}: {key} does not decode ({e})", key) from None
    out: UnitSums = {}
    for name, value in tensors.items():
        layer, kind, field = name.split("/")  # layer names hold no "/"
        out.setdefault(layer, {}).setdefault(kind, {})[field] = int(value) if field == "count" else value
    return out
