"""What a store holds: the spec written to the group's attrs, and its validation.

The spec is fixed when a store is created; every writer and reader derives
array shapes, chunking and unit ranges from it, so there is one source of
truth for the layout described in DESIGN.md ("The store").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actstore.errors import ConfigError, StoreFormatError

FORMAT_VERSION = 1
ATTRS_KEY = "actstore"

DTYPES = ("float32", "float16", "bfloat16")
"""Logical dtypes. bfloat16 is stored as its uint16 bit pattern (zarr has no bf16)."""
STORAGE_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
DEFAULT_DTYPE = "bfloat16"
"""Chosen by benchmarks/bench_store.py: half of float32, never overflows (ViTs have massive
activations), and its bit patterns compress (~0.9x with blosc-lz4) where float16's do not."""

CODECS = ("none", "blosc-lz4", "zstd")
DEFAULT_CODEC = "blosc-lz4"
"""Chosen by benchmarks/bench_store.py: it decodes at memory speed, and with byte shuffle it
takes ~10% off bfloat16 (zstd takes ~20% but reads 2x slower)."""

TARGET_CHUNK_BYTES = 8 << 20
"""Loader read unit: DESIGN.md aims at 4-16 MB uncompressed chunks."""
DEFAULT_IMAGES_PER_SHARD = 256


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's tokens map to the image: [CLS] then patches, row-major."""

    cls: bool = True
    """Token 0 is the CLS (class / pooled) token."""
    grid: tuple[int, int] = (14, 14)
    """Patch grid (h, w). (0, 0) with cls=True is a pooled, one-token output (ResNet attnpool)."""
    n_registers_dropped: int = 0
    """Register tokens the backbone made and the store dropped (DINOv2 *_reg4)."""

    def __post_init__(self) -> None:
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 2 or min(grid) < 0 or self.n_registers_dropped < 0:
            raise ConfigError(f"invalid token layout: grid={self.grid}, registers={self.n_registers_dropped}")
        object.__setattr__(self, "grid", grid)
        if self.n_tokens == 0:
            raise ConfigError("a token layout needs at least one token")

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return int(self.cls) + self.n_patches

    def to_dict(self) -> dict[str, Any]:
        return {"cls": self.cls, "grid": list(self.grid), "n_registers_dropped": self.n_registers_dropped,
                "n_tokens": self.n_tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenLayout:
        return cls(cls=bool(d["cls"]), grid=tuple(d["grid"]), n_registers_dropped=int(d.get("n_registers_dropped", 0)))


@dataclass(frozen=True)
class LayerSpec:
    """One hooked output of the backbone, stored under layers/<name>/."""

    name: str
    """Key under layers/ (e.g. "10" for block 10, "attnpool")."""
    d: int
    """Width of each token vector."""
    tokens: TokenLayout = field(default_factory=TokenLayout)
    """Token layout of this layer (layers of one backbone may differ, e.g. ResNets)."""
    index: int | None = None
    """0-based block index in the backbone, when the output is a block's."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"invalid layer name {self.name!r}")
        if self.d < 1:
            raise ConfigError(f"layer {self.name}: d must be >= 1, got {self.d}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "d": self.d, "tokens": self.tokens.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSpec:
        return cls(name=str(d["name"]), d=int(d["d"]), tokens=TokenLayout.from_dict(d["tokens"]),
                   index=None if d.get("index") is None else int(d["index"]))


@dataclass(frozen=True)
class StoreSpec:
    """Everything fixed at creation: sizes, layers, encoding, provenance."""

    n_images: int
    """Rows of every acts array; image i is row i of images.parquet."""
    layers: tuple[LayerSpec, ...]
    """Stored layers, in the order they were requested."""
    dtype: str = DEFAULT_DTYPE
    """float32, float16 or bfloat16 (kept as uint16 bits)."""
    codec: str = DEFAULT_CODEC
    """none, blosc-lz4 (byte shuffle) or zstd; every chunk also carries a crc32c."""
    images_per_shard: int = DEFAULT_IMAGES_PER_SHARD
    """Images per shard object = per work unit."""
    images_per_chunk: int | None = None
    """Images per inner chunk (the loader's read unit); None picks ~8 MB chunks."""
    backbone: Mapping[str, Any] = field(default_factory=dict)
    """family, name, checkpoint, init_seed, n_blocks, preprocessing."""
    dataset: Mapping[str, Any] = field(default_factory=dict)
    """source, fingerprint (n_images is added from the field above)."""
    has_labels: bool = False
    """Whether a per-patch `labels` array (n_images, n_patches) is stored."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "backbone", dict(self.backbone))
        object.__setattr__(self, "dataset", dict(self.dataset))
        if self.n_images < 1:
            raise ConfigError(f"n_images must be >= 1, got {self.n_images}")
        if not self.layers:
            raise ConfigError("a store needs at least one layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate layer names: {names}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if self.images_per_shard < 1:
            raise ConfigError(f"images_per_shard must be >= 1, got {self.images_per_shard}")
        if self.images_per_chunk is None:
            object.__setattr__(self, "images_per_chunk", self._auto_images_per_chunk())
        if self.images_per_chunk < 1 or self.images_per_shard % self.images_per_chunk:
            raise ConfigError(f"images_per_chunk ({self.images_per_chunk}) must divide "
                              f"images_per_shard ({self.images_per_shard})")
        if self.has_labels and len({layer.tokens.n_patches for layer in self.layers}) != 1:
            raise ConfigError("per-patch labels need every layer to have the same patch grid")

    def _auto_images_per_chunk(self) -> int:
        per_image = max(layer.tokens.n_tokens * layer.d for layer in self.layers) * self.itemsize
        ipc = 2 ** max(0, int(math.log2(max(1, TARGET_CHUNK_BYTES // per_image))))
        ipc = min(ipc, self.images_per_shard)
        while self.images_per_shard % ipc:
            ipc -= 1
        return ipc

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def n_units(self) -> int:
        return -(-self.n_images // self.images_per_shard)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.images_per_chunk)

    @property
    def chunks_per_shard(self) -> int:
        return self.images_per_shard // self.images_per_chunk

    def unit_range(self, k: int) -> tuple[int, int]:
        """Image range [start, stop) of work unit (= shard) k."""
        if not 0 <= k < self.n_units:
            raise ConfigError(f"unit {k} out of range (store has {self.n_units} units)")
        start = k * self.images_per_shard
        return start, min(start + self.images_per_shard, self.n_images)

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Image range [start, stop) of chunk i (chunks run along the image axis)."""
        if not 0 <= i < self.n_chunks:
            raise ConfigError(f"chunk {i} out of range (store has {self.n_chunks} chunks per layer)")
        start = i * self.images_per_chunk
        return start, min(start + self.images_per_chunk, self.n_images)

    def layer(self, key: str | int) -> LayerSpec:
        """Resolve a layer by name, block index, or negative block index (-2 = second to last)."""
        for layer in self.layers:
            if layer.name == str(key):
                return layer
        if isinstance(key, int) and key < 0:
            n_blocks = self.backbone.get("n_blocks")
            if n_blocks is None:
                raise ConfigError(f"layer {key}: negative indices need the backbone's n_blocks in the store")
            key = n_blocks + key
        for layer in self.layers:
            if layer.index is not None and layer.index == key:
                return layer
        raise ConfigError(f"layer {key!r} is not in the store; it has {', '.join(l.name for l in self.layers)}")

    def shape(self, layer: str | int) -> tuple[int, int, int]:
        spec = self.layer(layer)
        return self.n_images, spec.tokens.n_tokens, spec.d

    def to_attrs(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": dict(self.backbone),
            "dataset": {**self.dataset, "n_images": self.n_images},
            "layers": [layer.to_dict() for layer in self.layers],
            "dtype": self.dtype,
            "storage_dtype": STORAGE_DTYPES[self.dtype],
            "dtype_note": "bfloat16 stored as its uint16 bit pattern" if self.dtype == "bfloat16" else "",
            "codec": self.codec,
            "images_per_chunk": self.images_per_chunk,
            "images_per_shard": self.images_per_shard,
            "has_labels": self.has_labels,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> StoreSpec:
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(f"{where}: store format version {version!r}; this actstore reads "
                                   f"version {FORMAT_VERSION} (upgrade actstore or re-extract)")
        try:
            dataset = dict(attrs["dataset"])
            n_images = int(dataset.pop("n_images"))
            return cls(n_images=n_images, layers=tuple(LayerSpec.from_dict(l) for l in attrs["layers"]),
                       dtype=attrs["dtype"], codec=attrs["codec"], images_per_shard=int(attrs["images_per_shard"]),
                       images_per_chunk=int(attrs["images_per_chunk"]), backbone=attrs.get("backbone", {}),
                       dataset=dataset, has_labels=bool(attrs.get("has_labels", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"{where}: malformed store attrs ({type(e).__name__}: {e})") from None
