"""Per-patch segmentation labels from mask images, for a store's `labels` array (`actstore extract --masks`).

A mask is a single-channel PNG of class indices (mode L, or P whose palette indices are the classes, as in
ADE20K, Pascal VOC and the shapes generator) of its image's size. It lies at
`<masks>/<the image's path relative to the image folder (or the list file's folder)>` with the extension `.png`,
and `<masks>/classes.txt`, when present, names value k on line k.

The mask goes through the model's own geometry (`Preprocessor.mask_transform`: resize with NEAREST, center crop)
so that its pixels line up with the model's input; then each patch of the layers' grid takes its most frequent
value (ties: the smallest). IGNORE (255, as ADE20K and VOC use it) is a value like any other; an image without a
mask, and a rejected image, gets IGNORE in every patch. A mask that exists but cannot be used (not a PNG, not
single-channel, another size than its image) stops the run with an error naming it: such faults are the
dataset's, and usually systematic.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from actstore.errors import ConfigError, CorruptDataError
from actstore.extract.preprocess import Preprocessor

__all__ = ["CLASSES_FILE", "IGNORE", "MaskLabeler", "mask_classes", "mask_uris", "patch_majority"]

IGNORE = 255
"""The ignore index: pixels (and patches) of no class."""
CLASSES_FILE = "classes.txt"
"""`<masks>/classes.txt`: line k names mask value k."""
_MASK_MODES = ("L", "P")


@dataclass(frozen=True)
class MaskLabeler:
    """Mask bytes -> per-patch labels; holds no model and pickles, so decode tasks run it."""

    transform: Callable[[Image.Image], Image.Image]
    """The model's geometry for masks (NEAREST resize, center crop)."""
    image_size: tuple[int, int]
    """(H, W) of the model's input, which the transform must produce."""
    grid: tuple[int, int]
    """Patch grid (h, w) of the stored layers: patch (r, c) covers rows r*H/h.., columns c*W/w..."""

    @classmethod
    def create(cls, preprocessor: Preprocessor, grid: tuple[int, int]) -> MaskLabeler:
        """ConfigError when the model's input does not split into the grid's patches."""
        (h, w), (gh, gw) = preprocessor.image_size, grid
        if gh < 1 or gw < 1 or h % gh or w % gw:
            raise ConfigError(f"masks: the model's {h} x {w} input does not split into a {gh} x {gw} patch grid")
        return cls(preprocessor.mask_transform(), (h, w), (gh, gw))

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def unlabeled(self, n: int) -> np.ndarray:
        """(n, n_patches) int32 of IGNORE: images without a mask."""
        return np.full((n, self.n_patches), IGNORE, np.int32)

    def __call__(self, data: bytes, size: tuple[int, int], uri: str) -> np.ndarray:
        """(n_patches,) int32 labels from a mask file's bytes; `size` is its image's (width, height)."""
        try:
            im = Image.open(io.BytesIO(data), formats=("PNG",))
            im.load()
        except Exception as e:  # PIL raises many types for bad bytes; all say the same here
            raise CorruptDataError(f"{uri}: not a readable PNG mask ({type(e).__name__}: {e})", key=uri) from None
        if im.mode not in _MASK_MODES:
            raise ConfigError(f"{uri}: a mask of mode {im.mode}; masks are single-channel 8-bit PNGs (mode L or P) "
                              "of class indices")
        if im.size != tuple(size):
            raise ConfigError(f"{uri}: the mask is {im.width} x {im.height}, its image {size[0]} x {size[1]}")
        # values shifted by one (mod 256) through the geometry: a crop that pads (fill 0) pads with IGNORE
        shifted = Image.fromarray(np.asarray(im, np.uint8) + np.uint8(1), "L")
        values = np.asarray(self.transform(shifted), np.uint8) - np.uint8(1)
        if values.shape != self.image_size:
            raise ConfigError(f"{uri}: the model's geometry made a {values.shape} mask, expected {self.image_size}")
        return patch_majority(values, self.grid)


def patch_majority(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(gh * gw,) int32: the most frequent value of each patch of an (H, W) uint8 array, patches row-major,
    ties to the smallest value."""
    (h, w), (gh, gw) = values.shape, grid
    patches = values.reshape(gh, h // gh, gw, w // gw).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    keys = np.arange(gh * gw)[:, None] * 256 + patches
    counts = np.bincount(keys.ravel(), minlength=gh * gw * 256).reshape(gh * gw, 256)
    return counts.argmax(axis=1).astype(np.int32)  # argmax: the first (smallest) of equal counts


def mask_uris(uris: Sequence[str], images: str, masks: str, storage_options: dict[str, Any]) -> list[str]:
    """Each image's mask URI: `<masks>/<its path relative to the image folder or list file's folder>.png`, in the
    manifest's spelling (absolute local paths, full URLs elsewhere). ConfigError for a missing masks folder or an
    image outside that folder (it has no path to mirror)."""
    fs, root = fsspec.core.url_to_fs(str(images), **storage_options)
    root = root.rstrip("/") or root
    base = _spelled(fs, root if fs.isdir(root) else posixpath.dirname(root)).rstrip("/")
    mfs, mroot = fsspec.core.url_to_fs(str(masks), **storage_options)
    if not mfs.isdir(mroot):
        raise ConfigError(f"--masks {masks}: no such folder")
    prefix = _spelled(mfs, mroot.rstrip("/") or mroot).rstrip("/")
    out = []
    for uri in uris:
        if not uri.startswith(base + "/"):
            raise ConfigError(f"--masks: the image {uri} lies outside {base}, so it has no mask path under {masks}")
        out.append(f"{prefix}/{posixpath.splitext(uri[len(base) + 1:])[0]}.png")
    return out


def mask_classes(masks: str, storage_options: dict[str, Any]) -> list[str]:
    """The lines of `<masks>/classes.txt` (line k names value k), or [] without one."""
    fs, root = fsspec.core.url_to_fs(str(masks), **storage_options)
    path = f"{root.rstrip('/')}/{CLASSES_FILE}"
    if not fs.isfile(path):
        return []
    return [line.strip() for line in fs.cat_file(path).decode("utf-8").splitlines()]


def _spelled(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as build_manifest spells its URIs: local paths bare, others with their protocol."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
