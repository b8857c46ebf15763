"""JSON results of commands (`evaluate --json`, `steer --json`): written whole, replacing only their own kind."""

from __future__ import annotations

import json
from typing import Any

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.store import filesystem, put_bytes

__all__ = ["check_result_path", "write_result"]


def check_result_path(url: str | None, fmt: str, what: str, overwrite: bool,
                      storage_options: dict[str, Any] | None = None) -> None:
    """`url` is new, or a result of format `fmt` that overwrite may replace; anything else is refused, untouched."""
    if url is None:
        return
    fs, path = filesystem(url, storage_options or {})
    if not fs.exists(path):
        return
    try:
        ours = json.loads(fs.cat_file(path)).get("format") == fmt
    except (ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(f"{redact(url)} exists and is not {what}; refusing to replace it")
    if not overwrite:
        raise ConfigError(f"{redact(url)}: {what} exists; pass --overwrite to replace it")


def write_result(url: str, result: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    fs, path = filesystem(url, storage_options or {})
    put_bytes(fs, path, json.dumps(result, indent=2).encode())
