"""A trained linear probe as its readers use it: `load_probe(folder)` and `Probe.logits(tokens)`.

The folder (written by services.probe.train, probe.json last: its presence means complete):

    probe.safetensors   weight (C, d), bias (C,), mean (d,), std (d,)   float32; logits = ((x - mean) / std) @ W.T + b
    probe.json          format, task, layer, the token layout it was trained on, pool, class_names, ignore_index,
                        split sizes, held-out metrics, the config (credentials redacted)

Training computes its inputs with `probe_inputs` and standardizes with `standardize`, the same functions
`Probe.logits` applies, so a loaded probe sees a layer's raw tokens exactly as training saw the stored ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from actstore.config import redact
from actstore.errors import ConfigError, CorruptDataError, StoreFormatError, StoreNotFoundError
from actstore.store import TokenLayout, filesystem

__all__ = ["FORMAT", "FORMAT_VERSION", "META", "POOLS", "TASKS", "WEIGHTS", "Probe", "load_probe", "probe_inputs",
           "read_probe_meta", "standardize"]

FORMAT = "actstore-probe"
FORMAT_VERSION = 1
META, WEIGHTS = "probe.json", "probe.safetensors"
TASKS = ("cls", "seg")
TENSORS = ("weight", "bias", "mean", "std")


POOLS = ("cls", "mean")


def probe_inputs(tokens: torch.Tensor, layout: TokenLayout, task: str, pool: str | None = None) -> torch.Tensor:
    """A layer's raw tokens (B, T, d) as the probe reads them, in float32: cls -> (B, d), the CLS token (pool "cls",
    the default where the layer has one) or the mean of the patches (pool "mean"); seg -> (B, n_patches, d), the
    patch tokens."""
    x = tokens.to(torch.float32)
    first = int(layout.cls)
    if task == "seg":
        return x[:, first:first + layout.n_patches]
    pool = pool or ("cls" if layout.cls else "mean")
    if pool == "cls" and not layout.cls:
        raise ConfigError("pool cls: this layer has no CLS token; use pool mean")
    return x[:, 0] if pool == "cls" else x[:, first:first + layout.n_patches].mean(1)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


@dataclass(frozen=True, eq=False)
class Probe:
    """A linear head on one layer's tokens (see the module docstring); tensors on one device. Compared by
    identity (its fields are tensors)."""

    task: str
    layer: str
    layout: TokenLayout
    class_names: tuple[str, ...]
    ignore_index: int
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)
    pool: str | None = None
    """How a cls probe makes one row of an image's tokens: "cls" or "mean" (of the patches); None for seg."""

    @property
    def d(self) -> int:
        return self.weight.shape[1]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def to(self, device: torch.device | str) -> Probe:
        """The same probe with its tensors on `device` (logits then copies nothing per call)."""
        return replace(self, **{name: getattr(self, name).to(device) for name in TENSORS})

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class logits of a layer's raw tokens (B, T, d) in the layout it was trained on: cls -> (B, C),
        seg -> (B, n_patches, C). Plain tensor ops: differentiable with respect to `tokens` when they need it."""
        want = (self.layout.n_tokens, self.d)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != want:
            raise ConfigError(f"probe on layer {self.layer} reads (B, {want[0]}, {want[1]}) tokens "
                              f"(cls={self.layout.cls}, grid {self.layout.grid[0]}x{self.layout.grid[1]}), "
                              f"got {tuple(tokens.shape)}")
        dev = tokens.device
        x = standardize(probe_inputs(tokens, self.layout, self.task, self.pool), self.mean.to(dev), self.std.to(dev))
        return x @ self.weight.to(dev).T + self.bias.to(dev)


def read_probe_meta(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """probe.json of the folder `url`, or None when it has none or it is not a probe's."""
    fs, root = filesystem(str(url), storage_options)
    try:
        meta = json.loads(fs.cat_file(f"{root}/{META}"))
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def load_probe(path: str, storage_options: dict[str, Any] | None = None) -> Probe:
    """The probe saved in the folder `path` (any fsspec URL), on the CPU."""
    meta = read_probe_meta(path, storage_options)
    if meta is None:
        raise StoreNotFoundError(f"{redact(path)}: no probe there (no {META} of format {FORMAT})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreFormatError(f"{redact(path)}: probe format version {meta.get('format_version')!r}, "
                               f"this code reads {FORMAT_VERSION}")
    fs, root = filesystem(str(path), storage_options)
    try:
        tensors = st_load(fs.cat_file(f"{root}/{WEIGHTS}"))
    except FileNotFoundError:
        raise StoreFormatError(f"{redact(path)}: {META} is there but {WEIGHTS} is not") from None
    except SafetensorError as e:
        raise CorruptDataError(f"{redact(path)}/{WEIGHTS}: not a safetensors file ({e})", key=WEIGHTS) from None
    try:
        layout, names, d = TokenLayout.from_dict(meta["layout"]), tuple(meta["class_names"]), int(meta["d"])
        task, layer, ignore_index = meta["task"], str(meta["layer"]), int(meta["ignore_index"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreFormatError(f"{redact(path)}/{META}: missing or malformed {e}") from None
    shapes = {name: tuple(tensors[name].shape) if name in tensors else None for name in TENSORS}
    if shapes != {"weight": (len(names), d), "bias": (len(names),), "mean": (d,), "std": (d,)}:
        raise StoreFormatError(f"{redact(path)}: {WEIGHTS} holds {shapes}, {META} says {len(names)} classes "
                               f"of width {d}")
    pool = meta.get("pool")
    if task == "cls" and pool not in POOLS:
        raise StoreFormatError(f"{redact(path)}/{META}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return Probe(task=task, layer=layer, layout=layout, class_names=names, ignore_index=ignore_index,
                 metrics=dict(meta.get("metrics", {})), pool=pool if task == "cls" else None,
                 **{name: tensors[name].to(torch.float32) for name in TENSORS})
