"""Image bytes to an RGB picture, or a recorded reason why not.

A dataset of a million images always holds some bad ones; one bad file must
not stop an extraction job. decode_image never raises for bad bytes: it
returns status "rejected" with a reason, which goes to the images table.

Accepted, converted to 8-bit RGB as a person would see the image:
- EXIF orientation applied (the size reported is the size after it);
- CMYK (PIL's conversion; ICC profiles are not applied), grayscale, 1-bit;
- 16-bit and 32-bit integer grayscale scaled from 0..65535 onto 0..255
  (PIL's own conversion clips everything above 255 to white);
- transparency (RGBA, LA, palette or colour-key transparency) composited
  onto white, the page a person sees a transparent image on; PIL's plain
  convert("RGB") would show whatever colour the transparent pixels hold;
- animated GIF/WebP/PNG and multi-page TIFF: the first frame.

Rejected, `reason` = "<category>: <detail>" with category one of:
"empty file", "not an image" (or a format outside DECODE_FORMATS), "too
large" (more pixels than max_pixels, from the header, before any pixel is
decoded), "truncated", "corrupt" (any other decoding failure).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from actstore.errors import ConfigError
from actstore.store import STATUS_OK, STATUS_REJECTED

__all__ = ["DECODE_FORMATS", "DEFAULT_MAX_PIXELS", "DecodedImage", "decode_image"]

DEFAULT_MAX_PIXELS = 89_478_485
"""PIL's default warning limit (~ 9459 x 9459): far above any photo dataset, far below a bomb."""

DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""PIL formats tried, the ones of actstore.extract.sources.IMAGE_EXTENSIONS (JPEG includes multi-picture MPO).
An allow-list keeps PIL's other plugins, such as EPS (which runs Ghostscript), away from untrusted bytes."""

_WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    """The outcome of decoding one image; fields map onto the images table."""

    image: Image.Image | None
    """Fully loaded 8-bit RGB image; None when rejected."""
    width: int
    """Width as shown (after EXIF orientation); from the header when rejected, 0 if unknown."""
    height: int
    """Height, as width."""
    status: str
    """STATUS_OK or STATUS_REJECTED."""
    reason: str
    """"<category>: <detail>" when rejected, "" when ok."""
    source_mode: str = ""
    """PIL mode of the stored image ("CMYK", "I;16", "P", ...), "" if unknown: tells which conversion ran."""
    animated: bool = False
    """True when the file holds more frames than the first one, which is the one used."""

    @classmethod
    def rejected(cls, reason: str, width: int = 0, height: int = 0, source_mode: str = "") -> DecodedImage:
        """A rejected image, also for failures before decoding (e.g. reading: "unreadable: ...")."""
        return cls(None, width, height, STATUS_REJECTED, reason, source_mode)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode one image file's bytes; see the module docstring for what is accepted and converted.

    max_pixels applies to the header's size before decoding. PIL's global Image.MAX_IMAGE_PIXELS is
    left alone: PIL still warns (DecompressionBombWarning) above it and refuses images above twice it
    (178M pixels by default), so a larger max_pixels only takes effect if the application raises PIL's
    limit too.
    """
    if max_pixels < 1:
        raise ConfigError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        return DecodedImage.rejected("empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError as e:
        return DecodedImage.rejected(f"too large: {e}")
    except Image.UnidentifiedImageError:
        return DecodedImage.rejected(f"not an image: no {'/'.join(DECODE_FORMATS)} header found")
    except Exception as e:  # PIL's plugins raise many types for malformed headers; all are about the bytes
        return DecodedImage.rejected(_failure(e))
    width, height = im.size
    if width * height > max_pixels:
        return DecodedImage.rejected(f"too large: {width} x {height} = {width * height} pixels > limit {max_pixels}",
                                     width, height, im.mode)
    try:
        animated = bool(getattr(im, "is_animated", False))  # before load: for GIF it seeks ahead and back
        im.load()
        rgb = _to_rgb(_oriented(im))
    except Exception as e:  # as above: only PIL calls on the image's own data
        return DecodedImage.rejected(_failure(e), width, height, im.mode)
    return DecodedImage(rgb, rgb.width, rgb.height, STATUS_OK, "", im.mode, animated)


def _failure(e: Exception) -> str:
    detail = str(e) or type(e).__name__
    return f"{'truncated' if 'truncated' in detail.lower() else 'corrupt'}: {detail}"


def _oriented(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; an unreadable EXIF block counts as no orientation."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a camera's broken EXIF should not cost the picture
        return im
    return ImageOps.exif_transpose(im) if orientation != 1 else im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(im).clip(0, 65535).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if any(band in ("A", "a") for band in im.getbands()) or "transparency" in im.info:
        rgba = im.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return im if im.mode == "RGB" else im.convert("RGB")
