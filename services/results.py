"""JSON results of commands (`evaluate --json`, `steer --json`): written whole, replacing only their own kind."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import fsspec

from actstore.outputs import check_output
from actstore.store import filesystem, put_bytes

__all__ = ["PICTURE_MARK", "check_picture_path", "check_result_path", "write_picture", "write_result"]

PICTURE_MARK = ("Software", "actstore steer")
"""The PNG text chunk a steer picture carries: what marks it as ours."""


def check_result_path(url: str | None, fmt: str, what: str, overwrite: bool,
                      storage_options: dict[str, Any] | None = None) -> None:
    """`url` is new, or a result of format `fmt` that overwrite may replace; anything else is refused, untouched."""
    if url is not None:
        check_output(url, what, lambda fs, path: _result_format(fs, path) == fmt, overwrite, storage_options,
                     file=True, option="--json")


def _result_format(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """The "format" of the JSON object at `path`, None for anything else (a folder, another file)."""
    try:
        return json.loads(fs.cat_file(path)).get("format") if fs.isfile(path) else None
    except (ValueError, AttributeError):
        return None


def write_result(url: str, result: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options or {})
    put_bytes(fs, path, json.dumps(result, indent=2).encode())


def check_picture_path(url: str, overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """`url` is new, or a steer picture (a PNG with PICTURE_MARK) that overwrite may replace; else refused."""
    check_output(url, "a steer picture", lambda fs, path: fs.isfile(path) and _marked(fs.cat_file(path)), overwrite,
                 storage_options, file=True, option="--images")


def _marked(data: bytes) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            return picture.format == "PNG" and picture.info.get(PICTURE_MARK[0]) == PICTURE_MARK[1]
    except (UnidentifiedImageError, OSError):
        return False


def write_picture(url: str, data: str, storage_options: dict[str, Any] | None = None) -> None:
    """A generate head's "image" (base64 PNG bytes, marked) written whole to `url`."""
    fs, path = filesystem(url, storage_options or {})
    put_bytes(fs, path, base64.b64decode(data))
