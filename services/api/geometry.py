"""The region of an image that the backbone saw, from the numbers its store recorded at extraction.

`Preprocessor.describe` (actstore.extract.preprocess) records the model's resize (an int: the shorter
side, or [h, w]: the exact size) and its center crop ([h, w]); either is null when the model's step is
not one these numbers describe. The service crops the same region from the original image and resamples
it once, so the heatmaps overlay exactly.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

__all__ = ["model_view"]

Box = tuple[float, float, float, float]


def model_view(image: Image.Image, preprocessing: dict[str, Any] | None, size: int) -> Image.Image:
    """The region the backbone saw (its resize, then its center crop), resampled once to size x size.
    Without usable numbers (no record, or a step they do not describe) the image is left whole."""
    prep = preprocessing or {}
    w, h = image.size
    rw, rh = _resized(w, h, prep.get("resize"))
    box = _center_crop((0.0, 0.0, float(rw), float(rh)), _pair(prep.get("crop")))
    sx, sy = rw / w, rh / h
    source = (box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=source)


def _pair(value: Any) -> tuple[int, int] | None:
    """(h, w) from a recorded [h, w]; None for anything else."""
    if isinstance(value, list) and len(value) == 2 and all(_positive_int(v) for v in value):
        return value[0], value[1]
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _resized(w: int, h: int, resize: Any) -> tuple[int, int]:
    """(width, height) after the model's resize, computed as torchvision's Resize does."""
    if _positive_int(resize):  # the shorter side to `resize`, the longer one scaled and truncated
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = resize, int(resize * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    exact = _pair(resize)
    return (exact[1], exact[0]) if exact is not None else (w, h)


def _center_crop(box: Box, crop: tuple[int, int] | None) -> Box:
    """The centered (h, w) region of box, offsets rounded as torchvision's CenterCrop rounds them."""
    if crop is None:
        return box
    ch, cw = crop
    left, top = round((box[2] - box[0] - cw) / 2.0), round((box[3] - box[1] - ch) / 2.0)
    return box[0] + left, box[1] + top, box[0] + left + cw, box[1] + top + ch
