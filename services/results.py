"""JSON results of commands (`evaluate --json`, `steer --json`): written whole, replacing only their own kind."""

from __future__ import annotations

import json
from typing import Any

import fsspec

from actstore.outputs import check_output
from actstore.store import filesystem, put_bytes

__all__ = ["check_result_path", "write_result"]


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
