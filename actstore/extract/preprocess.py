"""The model's own image pipeline, split at its ToTensor (DESIGN.md: decode to uint8 on CPU tasks, normalize
on the accelerator), and the record of it that a store keeps.

`Preprocessor` holds no weights and pickles, so decode tasks run it without loading the model;
`Backbone.normalize` applies the rest (/255, mean, std) on the model's device. `describe()` records the
resize and center crop as numbers, which the service uses to show the region the model saw. `from_hf` builds
the same pipeline from a transformers processor's settings, which are not torchvision transforms.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms.functional import pil_to_tensor

from actstore.errors import ConfigError

__all__ = ["Preprocessor"]

_MODE_STEPS = ("MaybeConvertMode", "_convert_to_rgb")
"""PIL steps that only convert the colour mode (open_clip's): a mask of class indices skips them."""


@dataclass(frozen=True)
class Preprocessor:
    """The model's own image pipeline up to its ToTensor: PIL image in, uint8 (3, H, W) out.

    It holds no weights and pickles, so decode tasks can run it without loading the model.
    """

    pil_transform: Callable[[Image.Image], Image.Image]
    """The model's PIL steps (resize, crop, ...), taken from its own transform, not re-implemented."""
    mean: tuple[float, ...]
    """Per-channel mean of the model's Normalize, applied on the device by `Backbone.normalize`."""
    std: tuple[float, ...]
    """Per-channel std of the model's Normalize."""
    image_size: tuple[int, int]
    """(H, W) of the model's input."""

    @classmethod
    def from_transform(cls, transform: Compose, image_size: int | Sequence[int]) -> Preprocessor:
        """Split a model's eval transform [PIL steps..., ToTensor, Normalize] at its ToTensor."""
        steps = list(transform.transforms)
        at = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
        if at is None or len(steps) != at + 2 or not isinstance(steps[-1], Normalize):
            raise ConfigError(f"cannot split the model's transform into PIL steps + ToTensor + Normalize: {transform}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return cls(Compose(steps[:at]), tuple(map(float, steps[-1].mean)), tuple(map(float, steps[-1].std)),
                   (int(size[0]), int(size[1])))

    @classmethod
    def from_hf(cls, processor: Any) -> Preprocessor:
        """A transformers image or video processor (CLIPImageProcessor, SiglipImageProcessor, BitImageProcessor,
        VJEPA2VideoProcessor, ...) as torchvision's PIL steps with its sizes and interpolation, then ToTensor and
        its Normalize, so that it splits as `from_transform` splits and `describe()` records its resize and crop.

        transformers resizes uint8 tensors with torchvision's antialiased kernels, which follow PIL's to one level
        of 255, and floors an odd crop margin where torchvision's CenterCrop rounds it half to even (the service's
        geometry follows torchvision): for margins of 4k + 3 pixels our crop starts one pixel later.
        """
        name = type(processor).__name__
        steps: list[Any] = []
        out = None
        if processor.do_resize:
            size = processor.size
            interpolation = _interpolation(processor.resample)
            if _field(size, "shortest_edge") and not _field(size, "longest_edge"):
                steps.append(Resize(int(_field(size, "shortest_edge")), interpolation))
            elif _field(size, "height") and _field(size, "width"):
                out = (int(_field(size, "height")), int(_field(size, "width")))
                steps.append(Resize(out, interpolation))
            else:
                raise ConfigError(f"{name}: resizing to {size} is not supported; use shortest_edge or height and width")
        if processor.do_center_crop:
            out = (int(_field(processor.crop_size, "height")), int(_field(processor.crop_size, "width")))
            steps.append(CenterCrop(out))
        if out is None:
            raise ConfigError(f"{name} makes images of varying size; batches need a center crop or an exact resize")
        if not processor.do_rescale or abs(processor.rescale_factor * 255 - 1) > 1e-6:
            raise ConfigError(f"{name} rescales pixels by {processor.rescale_factor if processor.do_rescale else 1}; "
                              "only /255 is supported")
        mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
        return cls.from_transform(Compose([*steps, ToTensor(), Normalize(_rgb(mean), _rgb(std))]), out)

    def __call__(self, image: Image.Image) -> Tensor:
        # RGB first, as timm's and open_clip's own dataset loaders do (grayscale, CMYK, palette images)
        image = image if image.mode == "RGB" else image.convert("RGB")
        return pil_to_tensor(self.pil_transform(image))

    def mask_transform(self) -> Callable[[Image.Image], Image.Image]:
        """The PIL steps' geometry for segmentation masks, so that mask pixels land where the image's do: each
        resize copied with NEAREST (class indices must not blend), crops as they are, colour-mode steps left out.
        ConfigError for a step that is none of these (its effect on a mask is unknown)."""
        steps = []
        for step in getattr(self.pil_transform, "transforms", [self.pil_transform]):
            name = getattr(step, "__name__", type(step).__name__)
            if name in _MODE_STEPS:
                continue
            if "Resize" in name and hasattr(step, "interpolation"):
                step = copy.copy(step)
                step.interpolation = InterpolationMode.NEAREST
            elif "Crop" not in name:
                raise ConfigError(f"masks: the model's image step {_describe(step)} is not a resize, crop or "
                                  "mode conversion; cannot apply it to masks")
            steps.append(step)
        return Compose(steps)

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the pipeline for the store's backbone attrs. `resize` (an int: the shorter side,
        [h, w]: the exact size) and `crop` ([h, w], centered) are numbers, so the service can show the region the
        model saw; each is null where the step is not one they describe exactly. `steps` is text, for people."""
        steps = list(getattr(self.pil_transform, "transforms", [self.pil_transform]))
        resize = next((t for t in steps if "Resize" in type(t).__name__), None)
        crop = next((t for t in steps if "Crop" in type(t).__name__), None)
        size, crop_size = _resize_size(resize), _center_crop_size(crop)
        if resize is not None and (size is None or crop is not None and steps.index(crop) < steps.index(resize)):
            size = crop_size = None  # the crop's numbers hold after an exact resize only
        interpolation = getattr(resize, "interpolation", None)
        return {"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                "resize": size, "crop": crop_size,
                "interpolation": None if interpolation is None else str(getattr(interpolation, "value", interpolation)),
                "steps": [_describe(t) for t in steps]}


def _field(size: Any, key: str) -> Any:
    """A field of a transformers size (a SizeDict, or a plain dict as in a processor's JSON)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _interpolation(resample: Any) -> InterpolationMode:
    """A processor's resample (a PIL filter number, or torchvision's mode) as torchvision's mode; transformers
    resizes bilinearly where it is unset."""
    if isinstance(resample, InterpolationMode):
        return resample
    return InterpolationMode.BILINEAR if resample is None else InterpolationMode[Image.Resampling(int(resample)).name]


def _rgb(value: float | Sequence[float]) -> tuple[float, ...]:
    """A processor's mean or std: one number for all channels, or one a channel."""
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)


def _resize_size(step: Any) -> int | list[int] | None:
    """A torchvision Resize's size: an int for the shorter side (`n` or `[n]`), [h, w] for an exact size; None
    for other steps, and where max_size (or no size) makes the result depend on the image's shape."""
    size = getattr(step, "size", None)
    if type(step).__name__ != "Resize" or getattr(step, "max_size", None) is not None or size is None:
        return None
    sizes = [size] if isinstance(size, int) else [int(v) for v in size]
    return sizes[0] if len(sizes) == 1 else sizes if len(sizes) == 2 else None


def _center_crop_size(step: Any) -> list[int] | None:
    """[h, w] of a torchvision CenterCrop (its size is always a pair); None for other steps."""
    return [int(v) for v in step.size] if type(step).__name__ == "CenterCrop" else None


def _describe(step: Any) -> str:
    """repr without memory addresses (plain functions), so equal pipelines give equal attrs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(step))
