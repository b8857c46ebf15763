"""Test and benchmark helpers shipped with the package (like zarr.testing).

`MotoS3` runs moto's S3 server as a separate process on 127.0.0.1 with an
OS-assigned port, so S3 paths are exercised over real HTTP without any AWS
account. It needs the `dev` extra (moto[server]). `hard_images` builds the
bad-image corpus the extraction must survive.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Any

import numpy as np
from PIL import Image

_RUNNING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")


class MotoS3:
    """A moto S3 server subprocess; `storage_options` are for fsspec/s3fs."""

    def __init__(self, bucket: str = "actstore-test", startup_timeout: float = 30.0) -> None:
        self.bucket = bucket
        self._timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.endpoint_url = ""

    def start(self) -> MotoS3:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self._timeout
        seen = b""
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                break
            seen += line
            m = _RUNNING.search(line)
            if m:
                self.endpoint_url = f"http://127.0.0.1:{int(m.group(1))}"
                break
        if not self.endpoint_url:
            self.stop()
            raise RuntimeError(f"moto server did not start: {seen.decode(errors='replace')[-500:]}")
        # drain the server's request log so its pipe never fills up
        threading.Thread(target=self._proc.stdout.read, daemon=True).start()
        import s3fs  # imported late: only S3 users need it

        s3fs.S3FileSystem(**self.storage_options).mkdir(self.bucket)
        return self

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
