"""decode_image on a corpus of hard images, built here from PIL and raw bytes."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from actstore.extract.decode import DECODE_FORMATS, DecodedImage, decode_image
from actstore.store import STATUS_OK, STATUS_REJECTED
from actstore.testing.images import encode_image, png_claiming


def _noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ok(result: DecodedImage, size: tuple[int, int]) -> Image.Image:
    assert (result.status, result.reason) == (STATUS_OK, "")
    assert result.image is not None and result.image.mode == "RGB" and result.image.size == size
    assert (result.width, result.height) == size
    return result.image


def test_allowed_formats_are_pil_formats():
    Image.init()
    assert set(DECODE_FORMATS) <= set(Image.OPEN)


def test_plain_rgb_is_unchanged():
    src = _noise(30, 40)
    out = _ok(decode_image(encode_image(src, "PNG")), (40, 30))
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_cmyk_jpeg_becomes_rgb():
    src = Image.new("RGB", (33, 17), (200, 30, 40))
    result = decode_image(encode_image(src.convert("CMYK"), "JPEG", quality=95))
    out = np.asarray(_ok(result, (33, 17))).astype(int)
    assert result.source_mode == "CMYK"
    assert np.abs(out - [200, 30, 40]).max() < 12


def test_16bit_grayscale_is_scaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    result = decode_image(encode_image(Image.fromarray(gradient), "PNG"))
    assert result.source_mode == "I;16"
    out = np.asarray(_ok(result, (256, 4)))
    row = out[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] == 0 and row[-1] == 255
    assert len(np.unique(row)) > 200  # PIL's own convert() would give 0..255 then all white
    assert np.array_equal(out[..., 0], out[..., 2])


def test_grayscale_and_bilevel_become_rgb():
    gray = Image.fromarray(np.arange(60, dtype=np.uint8).reshape(6, 10))
    out = np.asarray(_ok(decode_image(encode_image(gray, "PNG")), (10, 6)))
    assert np.array_equal(out[..., 1], np.asarray(gray))
    _ok(decode_image(encode_image(Image.new("1", (9, 5), 1), "BMP")), (9, 5))


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 4), (10, 20, 30, 0))  # fully transparent, dark colour underneath
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(_ok(decode_image(encode_image(rgba, "PNG")), (8, 4)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]

    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((2, 2), 1)
    result = decode_image(encode_image(palette, "PNG", transparency=0))
    out = np.asarray(_ok(result, (6, 6)))
    assert result.source_mode == "P"
    assert out[0, 0].tolist() == [255, 255, 255] and out[2, 2].tolist() == [255, 0, 0]

    la = Image.merge("LA", (Image.new("L", (3, 3), 50), Image.new("L", (3, 3), 0)))
    assert np.asarray(_ok(decode_image(encode_image(la, "PNG")), (3, 3))).min() == 255


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    result = decode_image(encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50))
    out = np.asarray(_ok(result, (20, 10)))
    assert result.animated and out[5, 5].tolist() == [255, 0, 0]
    assert not decode_image(encode_image(frames[0], "GIF")).animated


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 10, 10))  # red top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after turning 90 degrees clockwise
    out = np.asarray(_ok(decode_image(encode_image(src, "JPEG", exif=exif, quality=95)), (20, 40)))
    assert out[2, 17, 0] > 200 and out[2, 2, 2] > 200  # red now top-right


@pytest.mark.parametrize("name, data, category", [
    ("zero-byte", b"", "empty file"),
    ("text named .jpg", b"this is not an image\n" * 10, "not an image"),
    ("random bytes", np.random.default_rng(7).bytes(4096), "not an image"),
    ("eps (plugin not allowed)", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    ("truncated jpeg", encode_image(_noise(64, 64), "JPEG")[:1500], "truncated"),
    ("truncated png", encode_image(_noise(64, 64), "PNG")[:6000], "truncated"),
    ("jpeg cut in its header", encode_image(_noise(64, 64), "JPEG")[:30], "truncated"),
])
def test_bad_bytes_are_rejected_with_a_reason(name, data, category):
    result = decode_image(data)
    assert result.status == STATUS_REJECTED and result.image is None
    assert result.reason.split(":")[0] == category, result.reason


def test_decompression_bombs_are_rejected_from_the_header():
    bomb = png_claiming(5000, 5000)
    assert len(bomb) < 100
    result = decode_image(bomb, max_pixels=10_000_000)
    assert result.status == STATUS_REJECTED and result.reason.startswith("too large: 5000 x 5000")
    assert (result.width, result.height) == (5000, 5000)
    # above PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS): PIL refuses at open; still a rejection
    for limit in (10_000_000, 10**10):
        result = decode_image(png_claiming(20000, 20000), max_pixels=limit)  # ~1.2 GB as RGB
        assert result.status == STATUS_REJECTED and result.reason.startswith("too large"), result.reason
    # within the limit, the same lie in the header is caught when the pixels are missing
    assert decode_image(png_claiming(300, 300)).reason.split(":")[0] in ("truncated", "corrupt")


def test_limit_is_configurable():
    data = encode_image(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, max_pixels=9_999).reason == "too large: 100 x 100 = 10000 pixels > limit 9999"
    assert decode_image(data, max_pixels=10_000).status == STATUS_OK
