"""Image bytes an extraction must survive: `hard_images`, the bad-image corpus, and its pieces."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode_image(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (CRC fixed): a bomb to anyone who decodes it."""
    png = bytearray(encode_image(Image.new("1", (8, 8)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def hard_images(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """{file name: (bytes, "ok" or "rejected")}: every kind of image an extraction must survive.

    Valid but unusual images (CMYK, 16-bit, grayscale, palette, animated) must be processed;
    truncated, empty, non-image and bomb files must be rejected with a reason. The bomb claims
    20000 x 20000 pixels, above the default limit.
    """
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    png = encode_image(rgb, "PNG")
    jpeg = encode_image(rgb, "JPEG", quality=90)
    frames = [Image.new("P", (24, 24), i * 40) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "rejected"),
        "truncated.png": (png[: len(png) // 2], "rejected"),
        "empty.png": (b"", "rejected"),
        "text.jpg": (b"this is not an image\n" * 20, "rejected"),
        "bomb.png": (png_claiming(20000, 20000), "rejected"),
        "cmyk.jpg": (encode_image(rgb.convert("CMYK"), "JPEG", quality=90), "ok"),
        "gray16.png": (encode_image(Image.fromarray(gradient), "PNG"), "ok"),
        "gray.png": (encode_image(rgb.convert("L"), "PNG"), "ok"),
        "palette.png": (encode_image(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0), "ok"),
        "animated.gif": (animated.getvalue(), "ok"),
        "rgba.png": (encode_image(rgb.convert("RGBA"), "PNG"), "ok"),
    }
