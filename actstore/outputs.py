"""Outputs: what a command may write over.

Every command that writes (extract, train, index, atlas, compare, probe, report, evaluate/steer --json, the
shapes generator) asks `check_output` before it starts: the path is free (missing, or an empty folder), or it
holds an output of the command's own kind, which is replaced only when overwrite was asked; anything else is
refused with one line and never touched. `ours` is the command's recognizer, (filesystem, path) -> bool,
e.g. `marked_by("index.json")`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.store import normalize_url

__all__ = ["Recognizer", "check_output", "marked_by"]

Recognizer = Callable[[fsspec.AbstractFileSystem, str], bool]
"""Whether the existing, non-empty path on the filesystem is an output of the kind asked for."""


def marked_by(name: str) -> Recognizer:
    """A folder that holds the file `name` (the file a command writes last, e.g. index.json)."""
    return lambda fs, path: fs.isfile(f"{path.rstrip('/')}/{name}")


def check_output(url: str | Path, what: str, ours: Recognizer, overwrite: bool,
                 storage_options: dict[str, Any] | None = None, *, file: bool = False,
                 flag: str = "--overwrite", option: str = "--out") -> bool:
    """Whether an output of ours is at `url` and will be replaced (True: overwrite was asked); False when the
    path is free (nothing there, or an empty folder where the output is a folder). Anything else is a one-line
    ConfigError, and stays untouched.

    `what` names the kind ("a feature index"); `file`: the output is one file; `flag` is how the caller asks for
    overwrite and `option` the argument that names the path, as the error shows them."""
    fs, path = fsspec.core.url_to_fs(normalize_url(str(url)), **(storage_options or {}))
    fs.invalidate_cache(path)  # object stores cache listings: a decision to replace needs a fresh look
    if not fs.exists(path) or not file and fs.isdir(path) and not fs.ls(path, detail=False):
        return False
    shown = redact(str(url))
    if not ours(fs, path):
        raise ConfigError(f"{shown} exists and is not {what}; refusing to replace it, choose another {option}")
    if not overwrite:
        raise ConfigError(f"{shown}: {what} is already there; pass {flag} to replace it")
    return True
