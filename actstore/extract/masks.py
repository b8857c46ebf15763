"""Per-patch segmentation labels from mask images, for a store's `labels` array (`actstore extract --masks`).

A mask is a single-channel PNG of class indices (mode L, or P whose palette indices are the values, as in
Pascal VOC's SegmentationClass and ADE20K) of its image's size. Where each image's mask lies:
- by default `<masks>/<the image's path relative to the image folder (or the list file's folder)>` with the
  extension `.png`: ADE20K's `images/training/x.jpg` -> `annotations/training/x.png`, VOC's `JPEGImages/x.jpg` ->
  `SegmentationClass/x.png`;
- with `mask_suffix="IMAGE_END:MASK_END"`, the relative path with its ending IMAGE_END replaced by MASK_END, for
  names that differ by more than the extension: Cityscapes' `leftImg8bit/train/aachen/x_leftImg8bit.png` ->
  `gtFine/train/aachen/x_gtFine_labelTrainIds.png` with "_leftImg8bit.png:_gtFine_labelTrainIds.png". An image
  whose path does not end with IMAGE_END stops the run before any work.

What the values mean, from the first of:
- `<masks>/classes.txt`: line k names value k; values are the labels as they are (255 = IGNORE, as in VOC and
  Cityscapes' trainIds; VOC's 0 is the class "background").
- ADE20K's class table, `objectInfo150.csv` (CSAILVision/sceneparsing) or the release's tab-separated
  `objectInfo150.txt`, in the masks folder or one or two folders above it (`annotations/training`,
  `annotations`, the dataset's root). ADE20K's value 0 is "other" and value k is the table's row Idx k, so values
  are remapped before anything else: 0 -> IGNORE, k -> k - 1, 255 stays IGNORE (mmsegmentation's
  reduce_zero_label). Label k - 1 is named by row Idx k's whole Name ("building, edifice" in the .txt,
  "building;edifice" in the .csv, whose ';' also splits words: "pool;table;billiard;table", so its first part
  is no name). The store's dataset attrs say so under `mask_remap`.
- neither: values are labels, unnamed.
The names go into the store's dataset attrs as `mask_classes`.

The mask goes through the model's own geometry (`Preprocessor.mask_transform`: resize with NEAREST, center crop)
so that its pixels line up with the model's input; then each patch of the layers' grid takes its most frequent
value (ties: the smallest, after the remap: ADE20K's "other" loses its ties). IGNORE (255) is a value like any other; an image without a mask, and a rejected image,
gets IGNORE in every patch. A mask that exists but cannot be used (not a PNG, not single-channel, another size
than its image) stops the run with an error naming it: such faults are the dataset's, and usually systematic.
"""

from __future__ import annotations

import csv
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

__all__ = ["ADE20K_TABLES", "CLASSES_FILE", "IGNORE", "MaskClasses", "MaskLabeler", "mask_classes", "mask_uris",
           "parse_mask_suffix", "patch_majority"]

IGNORE = 255
"""The ignore index: pixels (and patches) of no class."""
CLASSES_FILE = "classes.txt"
"""`<masks>/classes.txt`: line k names mask value k."""
ADE20K_TABLES = ("objectInfo150.csv", "objectInfo150.txt")
"""ADE20K's class table (columns Idx and Name among others), looked for in the masks folder and two folders up."""
_REDUCE_ZERO = bytes([IGNORE, *range(254), IGNORE])
"""ADE20K's values -> labels: 0 ("other") -> IGNORE, k -> k - 1, 255 -> IGNORE."""
_MASK_MODES = ("L", "P")


@dataclass(frozen=True)
class MaskClasses:
    """What a masks folder says about its values: their names, and how they become labels."""

    names: tuple[str, ...] = ()
    """Name of label k at index k; empty without a class file."""
    remap: bytes | None = None
    """256-entry lookup from a mask's values to labels, applied before the geometry; None: values are labels."""
    remap_note: str | None = None
    """The remap in words, with the table that called for it, for the store's attrs; None without a remap."""

    def attrs(self) -> dict[str, Any]:
        """The store's dataset attrs: `mask_classes`, and `mask_remap` where values were remapped."""
        return {"mask_classes": list(self.names), **({"mask_remap": self.remap_note} if self.remap_note else {})}


@dataclass(frozen=True)
class MaskLabeler:
    """Mask bytes -> per-patch labels; holds no model and pickles, so decode tasks run it."""

    transform: Callable[[Image.Image], Image.Image]
    """The model's geometry for masks (NEAREST resize, center crop)."""
    image_size: tuple[int, int]
    """(H, W) of the model's input, which the transform must produce."""
    grid: tuple[int, int]
    """Patch grid (h, w) of the stored layers: patch (r, c) covers rows r*H/h.., columns c*W/w..."""
    remap: bytes | None = None
    """MaskClasses.remap: 256-entry lookup applied to a mask's values first; None: values are labels."""

    @classmethod
    def create(cls, preprocessor: Preprocessor, grid: tuple[int, int], remap: bytes | None = None) -> MaskLabeler:
        """ConfigError when the model's input does not split into the grid's patches."""
        (h, w), (gh, gw) = preprocessor.image_size, grid
        if gh < 1 or gw < 1 or h % gh or w % gw:
            raise ConfigError(f"masks: the model's {h} x {w} input does not split into a {gh} x {gw} patch grid")
        return cls(preprocessor.mask_transform(), (h, w), (gh, gw), remap)

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
        values = np.asarray(im, np.uint8)
        if self.remap is not None:
            values = np.frombuffer(self.remap, np.uint8)[values]
        # values shifted by one (mod 256) through the geometry: a crop that pads (fill 0) pads with IGNORE
        shifted = Image.fromarray(values + np.uint8(1), "L")
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


def parse_mask_suffix(value: str | None) -> tuple[str, str] | None:
    """"IMAGE_END:MASK_END" -> (IMAGE_END, MASK_END); None stays None. ConfigError without the ':' or MASK_END."""
    if value is None:
        return None
    image_end, colon, mask_end = value.partition(":")
    if not colon or not mask_end:
        raise ConfigError(f"mask_suffix {value!r}: expected IMAGE_END:MASK_END, such as "
                          "'_leftImg8bit.png:_gtFine_labelTrainIds.png'")
    return image_end, mask_end


def mask_uris(uris: Sequence[str], images: str, masks: str, storage_options: dict[str, Any],
              mask_suffix: str | None = None) -> list[str]:
    """Each image's mask URI under `masks` (the module docstring says which), in the manifest's spelling
    (absolute local paths, full URLs elsewhere). ConfigError for a missing masks folder, an image outside the
    image folder (it has no path to mirror) or one whose path does not end with mask_suffix's IMAGE_END."""
    ends = parse_mask_suffix(mask_suffix)
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
        rel = uri[len(base) + 1:]
        if ends is None:
            out.append(f"{prefix}/{posixpath.splitext(rel)[0]}.png")
        elif rel.endswith(ends[0]):
            out.append(f"{prefix}/{rel[:len(rel) - len(ends[0])]}{ends[1]}")
        else:
            raise ConfigError(f"--mask-suffix: the image {uri} does not end with {ends[0]!r}")
    return out


def mask_classes(masks: str, storage_options: dict[str, Any]) -> MaskClasses:
    """The names and remap of a masks folder's values: from `<masks>/classes.txt`, else from ADE20K's class table
    in the folder or two folders up, else none (see the module docstring)."""
    fs, root = fsspec.core.url_to_fs(str(masks), **storage_options)
    root = root.rstrip("/") or root
    path = f"{root.rstrip('/')}/{CLASSES_FILE}"
    if fs.isfile(path):
        return MaskClasses(tuple(line.strip() for line in fs.cat_file(path).decode("utf-8").splitlines()))
    folders = [root]
    for _ in range(2):
        parent = posixpath.dirname(folders[-1])
        if parent in ("", folders[-1]):
            break
        folders.append(parent)
    for folder in folders:
        for name in ADE20K_TABLES:
            table = f"{folder.rstrip('/')}/{name}"
            if fs.isfile(table):
                uri = _spelled(fs, table)
                return MaskClasses(_ade20k_names(fs.cat_file(table), uri), _REDUCE_ZERO,
                                   f"ade20k ({uri}): mask value 0 -> 255 (ignore), k -> k - 1 (label k - 1 is the "
                                   "table's Idx k), 255 -> 255")
    return MaskClasses()


def _ade20k_names(data: bytes, uri: str) -> tuple[str, ...]:
    """Each Idx's Name, by Idx, from a comma- or tab-separated table; ConfigError unless Idx runs 1..K once each."""
    text = data.decode("utf-8-sig")
    rows = list(csv.reader(io.StringIO(text), delimiter="\t" if "\t" in text.partition("\n")[0] else ","))
    header = [cell.strip() for cell in rows[0]] if rows else []
    try:
        i_idx, i_name = header.index("Idx"), header.index("Name")
        pairs = sorted((int(row[i_idx]), row[i_name].strip()) for row in rows[1:] if any(c.strip() for c in row))
    except (ValueError, IndexError):
        raise ConfigError(f"{uri}: not an ADE20K class table (a header with Idx and Name, an integer Idx and a "
                          "Name in every row)") from None
    if not pairs or [k for k, _ in pairs] != list(range(1, len(pairs) + 1)) or len(pairs) > 254:
        raise ConfigError(f"{uri}: the Idx column must hold 1..K (K <= 254) once each")
    return tuple(name for _, name in pairs)


def _spelled(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as build_manifest spells its URIs: local paths bare, others with their protocol."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
