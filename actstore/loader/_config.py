"""What a PatchLoader delivers (LoaderConfig), the transform it applies (Normalization), its throughput."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actstore.errors import ConfigError
from actstore.store import LayerStats

DEFAULT_BUFFER_BYTES = 3 << 30
"""3 GiB: 0.93x the uniform mixing figure on a 20k-image ViT-B store (see actstore.loader); RSS ~4 GiB."""
TOKENS = ("patches", "cls", "all")
OUT_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16,
              torch.float64: np.float64}
"""Output dtypes and the numpy dtype that holds each (bfloat16 as its uint16 bits)."""


@dataclass(frozen=True)
class LoaderConfig:
    """What a PatchLoader delivers and how; saved beside a checkpoint, it reproduces the stream."""

    layer: str | int = -2
    """Layer name, block index, or negative block index (-2 = second to last block)."""
    batch_size: int = 16384
    """Rows per batch; the last batch of an epoch is short unless drop_last."""
    tokens: str = "patches"
    """Which tokens of each image: "patches", "cls" or "all"."""
    seed: int = 0
    """Chunk order and buffer draws derive from (seed, epoch[, rank])."""
    epochs: int = 1
    """Epochs per iteration; each visits every selected row once, in a new order."""
    rank: int = 0
    """This process's rank in data-parallel training."""
    world_size: int = 1
    """Number of ranks; each takes every world_size-th chunk of the shared epoch order."""
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    """Shuffle buffer size (rows in the stored dtype), per rank; capped at the rank's data."""
    concurrency: int | None = None
    """Chunks read ahead; default 2 x decode_threads locally, at least 16 from object stores (s3fs pools 10
    connections unless storage_options has config_kwargs={"max_pool_connections": N})."""
    decode_threads: int | None = None
    """Chunks decoded at once, and threads that assemble a batch; default min(8, cores)."""
    dtype: str = "float32"
    """Output dtype: float32, bfloat16, float16 or float64."""
    normalize: bool = False
    """Subtract the store's mean of these tokens and scale so that E||x||^2 = d."""
    return_indices: bool = False
    """Yield (x, image_index, token_index) instead of x."""
    label_filter: tuple[int, ...] | None = None
    """Keep only patches whose per-patch label is one of these (stores with labels, tokens="patches")."""
    drop_last: bool = False
    """Drop the short last batch of each epoch."""
    prefetch: int = 1
    """Batches assembled ahead of the consumer by the background thread (each one B x d output)."""
    pin_memory: bool = False
    """Pin host batches (only when CUDA is available; ignored otherwise)."""

    def __post_init__(self) -> None:
        if isinstance(self.label_filter, int):
            object.__setattr__(self, "label_filter", (self.label_filter,))
        elif self.label_filter is not None:
            object.__setattr__(self, "label_filter", tuple(int(v) for v in self.label_filter))
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.tokens in TOKENS, f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.world_size >= 1 and 0 <= self.rank < self.world_size,
             f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}"),
            (self.buffer_bytes >= 1, f"buffer_bytes must be >= 1, got {self.buffer_bytes}"),
            ((self.concurrency or 1) >= 1 and (self.decode_threads or 1) >= 1 and self.prefetch >= 1,
             "concurrency, decode_threads and prefetch must be >= 1"),
            (getattr(torch, self.dtype, None) in OUT_DTYPES,
             f"dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}"),
            (self.label_filter is None or self.tokens == "patches",
             f"label_filter selects patches; it needs tokens='patches', not {self.tokens!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True, eq=False)
class Normalization:
    """x -> (x - mean) * scale, with scale = sqrt(d / E||x - mean||^2) from the store's statistics."""

    layer: str | None
    tokens: str | None
    mean: torch.Tensor
    """float32 (d,)"""
    scale: float

    @classmethod
    def from_stats(cls, stats: LayerStats, layer: str, tokens: str) -> Normalization:
        return cls(layer, tokens, torch.from_numpy(stats.mean.astype(np.float32)),
                   math.sqrt(stats.mean.shape[0] / float(np.sum(stats.var))))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device, x.dtype)) * self.scale

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale + self.mean.to(x.device, x.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly (cfg.json); `state_dict` is the safetensors-friendly form."""
        return {"layer": self.layer, "tokens": self.tokens, "scale": self.scale, "mean": self.mean.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return cls(str(d["layer"]), str(d["tokens"]), torch.tensor(d["mean"], dtype=torch.float32), float(d["scale"]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.clone(), "scale": torch.tensor([self.scale], dtype=torch.float64)}


@dataclass(frozen=True)
class LoaderStats:
    """Throughput of the current (or last) iteration."""

    patches: int
    batches: int
    seconds: float
    bytes_read: int
    """Encoded bytes of the chunks read (replays after a resume included)."""
    chunks_read: int
    buffer_fill: float
    """Fraction of the buffer's rows occupied when the last batch was drawn (1.0 but in the drain)."""
    wait_s: float
    """Time the consumer waited for batches: near `seconds` means the loader is the bottleneck."""

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.patches:,} patches in {self.batches:,} batches, {self.seconds:.1f} s: "
                f"{self.patches_per_s:,.0f} patches/s, {self.mb_per_s:,.0f} MB/s read "
                f"({self.chunks_read:,} chunks), buffer {100 * self.buffer_fill:.0f}% full, "
                f"waited {self.wait_s:.1f} s")
