"""A generated image dataset whose every image has known factors, for the demo and tests.

Each image is one shape on a plain background. The factors that made it
(shape, colour, texture, position, size, background) are written beside the
images, so that later stages can check that SAE features, probes or top
images relate to something real. Nothing is downloaded: the images come from
PIL's ImageDraw and numpy, lossless PNG, the same bytes for the same seed.

Layout, ImageNet-style so that actstore.extract.sources.build_manifest reads it:

    <out>/<shape>/<i:06d>.png    image i (i = generation index)
    <out>/factors.parquet        one row per image, in manifest order
    <masks>/<shape>/<i:06d>.png  optional segmentation mask of image i: single-channel PNG, 0 = background,
                                 1 + label = the shape (SEG_CLASSES names each value)
    <masks>/classes.txt          SEG_CLASSES, one a line (line k names value k)

The masks folder lies outside the image folder (inside it, it would be one more class to
build_manifest), mirroring the images' relative paths, as `actstore extract --masks` reads them.

Image i's factors depend on (seed, i) only, so a smaller dataset is a subset
of a larger one with the same seed. Shapes cycle (image i has shape
SHAPES[i % 6]), so every class folder exists once n_images >= 6 and then the
manifest's label equals the `label` column here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from actstore.errors import ConfigError
from actstore.outputs import Recognizer, check_output

__all__ = ["BACKGROUNDS", "COLORS", "SEG_CLASSES", "SHAPES", "TEXTURES", "GeneratedDataset", "generate_dataset"]

SHAPES = ("circle", "cross", "hexagon", "square", "star", "triangle")
"""The classes, in sorted order: label k is SHAPES[k], as build_manifest numbers class folders."""
SEG_CLASSES = ("background", *SHAPES)
"""What each mask value means: value 0 is the background, value 1 + k is SHAPES[k]."""
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "magenta": (210, 50, 200), "cyan": (40, 200, 210), "orange": (245, 140, 30), "purple": (120, 50, 170)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "beige": (225, 210, 175)}
TEXTURES = ("solid", "stripes", "dots", "checker")
_SHADE = 0.45  # textures alternate the colour with this darker version of it
_WRITE_BATCH = 256  # files per fs.pipe call: concurrent PUTs on object stores
_CLASSES_FILE = "classes.txt"


@dataclass(frozen=True)
class GeneratedDataset:
    """What generate_dataset wrote."""

    root: str
    """The dataset folder, as given (a path or fsspec URL): pass it to build_manifest."""
    seed: int
    """Seed of the factors; the same seed gives the same bytes."""
    image_size: int
    """Images are image_size x image_size RGB."""
    factors: pa.Table
    """One row per image in manifest order (sorted by path): path (relative to root), index, label,
    shape, color, color_r/g/b, texture, x, y (shape centre, pixels), size (radius, pixels),
    background, background_r/g/b. Also written to <root>/factors.parquet."""

    @property
    def class_names(self) -> list[str]:
        """The shapes that have a folder, sorted: what build_manifest reports as classes."""
        return sorted(set(self.factors.column("shape").to_pylist()))

    def __len__(self) -> int:
        return self.factors.num_rows


def generate_dataset(out: str, n_images: int, seed: int = 0, image_size: int = 96,
                     storage_options: dict[str, Any] | None = None, overwrite: bool = False,
                     masks: str | None = None) -> GeneratedDataset:
    """Write n_images shape images and their factors under `out`, and their segmentation masks under `masks`
    when given (a folder outside `out`); refuses a non-empty `out` or `masks` unless overwrite."""
    if n_images < 1 or image_size < 32:
        raise ConfigError(f"shapes: need n_images >= 1 and image_size >= 32, got {n_images} and {image_size}")
    fs, root = fsspec.core.url_to_fs(str(out), **(storage_options or {}))
    root = root.rstrip("/")
    folders = [(out, fs, root, {*SHAPES, "factors.parquet"})]
    if masks is not None:
        mfs, mroot = fsspec.core.url_to_fs(str(masks), **(storage_options or {}))
        mroot = mroot.rstrip("/")
        if mfs.protocol == fs.protocol and (f"{mroot}/".startswith(f"{root}/") or f"{root}/".startswith(f"{mroot}/")):
            raise ConfigError(f"{masks}: the masks folder and the image folder {out} must not contain each other")
        folders.append((masks, mfs, mroot, {*SHAPES, _CLASSES_FILE}))
    replace = [check_output(given, "a generated shapes dataset", _holding_only(ours), overwrite, storage_options,
                            flag="overwrite=True", option="folder")
               for given, _, _, ours in folders]  # both checked before either is replaced
    for (_, ffs, froot, _), ours in zip(folders, replace):
        if ours:
            ffs.rm(froot, recursive=True)
    rows = sorted((_factors(seed, i, image_size) for i in range(n_images)), key=lambda r: r["path"])
    for shape in sorted({r["shape"] for r in rows}):
        fs.makedirs(f"{root}/{shape}", exist_ok=True)
        if masks is not None:
            mfs.makedirs(f"{mroot}/{shape}", exist_ok=True)
    patterns = _patterns(image_size)
    for start in range(0, n_images, _WRITE_BATCH):
        batch = rows[start:start + _WRITE_BATCH]
        insides = [_inside(r, image_size) for r in batch]
        fs.pipe({f"{root}/{r['path']}": _png(_render(r, inside, patterns)) for r, inside in zip(batch, insides)})
        if masks is not None:
            mfs.pipe({f"{mroot}/{r['path']}": _png(inside.astype(np.uint8) * np.uint8(1 + r["label"]))
                      for r, inside in zip(batch, insides)})
    if masks is not None:
        mfs.pipe_file(f"{mroot}/{_CLASSES_FILE}", "".join(f"{name}\n" for name in SEG_CLASSES).encode())
    factors = pa.Table.from_pylist(rows)
    pq.write_table(factors, f"{root}/factors.parquet", filesystem=fs)  # last: its presence means complete
    return GeneratedDataset(str(out), seed, image_size, factors)


def _holding_only(names: set[str]) -> Recognizer:
    """A folder whose entries all have names this generator writes."""
    return lambda fs, root: fs.isdir(root) and {n.rstrip("/").rsplit("/", 1)[-1]
                                                for n in fs.ls(root, detail=False)} <= names


def _factors(seed: int, i: int, image_size: int) -> dict[str, Any]:
    """Image i's factors, from its own random stream (independent of n_images)."""
    rng = np.random.default_rng([seed, i])
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    size = int(rng.integers(round(0.15 * image_size), round(0.3 * image_size) + 1))
    x, y = (int(v) for v in rng.integers(size, image_size - size, size=2))
    shape = SHAPES[i % len(SHAPES)]
    return {"path": f"{shape}/{i:06d}.png", "index": i, "label": SHAPES.index(shape), "shape": shape,
            "color": color, **dict(zip(("color_r", "color_g", "color_b"), COLORS[color])), "texture": texture,
            "x": x, "y": y, "size": size, "background": background,
            **dict(zip(("background_r", "background_g", "background_b"), BACKGROUNDS[background]))}


def _inside(f: dict[str, Any], image_size: int) -> np.ndarray:
    """Boolean (image_size, image_size): the shape's pixels, in the image and in its mask alike."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = f["x"], f["y"], f["size"]
    if f["shape"] == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        draw.polygon(_outline(f["shape"], x, y, r), fill=255)
    return np.asarray(mask) > 0


def _render(f: dict[str, Any], inside: np.ndarray, patterns: dict[str, np.ndarray]) -> np.ndarray:
    """(image_size, image_size, 3) uint8: the textured shape (`inside`) over the background."""
    on = patterns[f["texture"]]
    color = np.array(COLORS[f["color"]], dtype=np.uint8)
    pixels = np.empty((*inside.shape, 3), dtype=np.uint8)
    pixels[...] = BACKGROUNDS[f["background"]]
    pixels[inside & on] = color
    pixels[inside & ~on] = (color * _SHADE).astype(np.uint8)
    return pixels


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (x, y) that fits in a circle of radius r (image y points down)."""
    if shape == "cross":
        a = 0.35 * r
        unit = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a),
                (-a, r)]
        return [(x + dx, y + dy) for dx, dy in unit]
    n, phase, radii = {"triangle": (3, math.pi / 2, (r,)), "square": (4, math.pi / 4, (r,)),
                       "hexagon": (6, 0.0, (r,)), "star": (10, math.pi / 2, (r, 0.45 * r))}[shape]
    return [(x + radii[k % len(radii)] * math.cos(phase + 2 * math.pi * k / n),
             y - radii[k % len(radii)] * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _patterns(image_size: int) -> dict[str, np.ndarray]:
    """Boolean (H, W) pattern per texture: True where a shape shows its colour, False where its shade."""
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    period = max(4, image_size // 12)
    half = period // 2
    return {"solid": np.ones((image_size, image_size), dtype=bool),
            "stripes": (yy // half) % 2 == 0,
            "dots": (xx % period - half) ** 2 + (yy % period - half) ** 2 > (0.3 * period) ** 2,
            "checker": (xx // half + yy // half) % 2 == 0}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()
