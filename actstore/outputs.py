"""Outputs: what a command may write over, and a folder that appears whole.

Every command that writes (extract, train, index, atlas, compare, probe, report, evaluate/steer --json, the
shapes generator) asks `check_output` before it starts: the path is free (missing, or an empty folder), or it
holds an output of the command's own kind, which is replaced only when overwrite was asked; anything else is
refused with one line and never touched. `ours` is the command's recognizer, (filesystem, path) -> bool,
e.g. `marked_by("index.json")`.

Folder outputs built locally go through `staged_folder`: the work happens in a temporary sibling whose name
is unique to the run (`.<name>.tmp-<pid>-<random>`), so two runs writing the same output never clear each
other's work; a failed run removes its own temporary folder only; a finished one is renamed into place, and
an old output of ours is moved aside and removed only when overwrite was asked (checked again at that
moment: another run may have finished first). A reader never sees half an output.

`read_marker` reads back the JSON file a folder output of ours is marked by (index.json, summary.json, ...), checked
for its format and version.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from actstore.config import redact
from actstore.errors import ConfigError, CorruptDataError, StoreFormatError, StoreNotFoundError
from actstore.store import normalize_url

__all__ = ["Recognizer", "check_output", "marked_by", "read_marker", "staged_folder"]

Recognizer = Callable[[fsspec.AbstractFileSystem, str], bool]
"""Whether the existing, non-empty path on the filesystem is an output of the kind asked for."""

_TAKEN = frozenset({errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR})
"""What rename says when the target is something other than nothing or an empty folder."""
_SWAP_TRIES = 8


def marked_by(name: str) -> Recognizer:
    """A folder that holds the file `name` (the file a command writes last, e.g. index.json)."""
    return lambda fs, path: fs.isfile(f"{path.rstrip('/')}/{name}")


def read_marker(folder: str | Path, name: str, form: str, version: int, what: str, command: str) -> dict[str, Any]:
    """The JSON file `name` of a local folder output of ours, checked to be `form` at `version`. A folder without it
    is "not `what`" with the command that makes one; unreadable JSON names the file; another format or version says
    what it is not ("not an actstore-index v1 index": the last word of `what`)."""
    p = Path(normalize_url(str(folder))) / name
    try:
        data = json.loads(p.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFoundError(f"{p.parent}: not {what} (no {name}; run `actstore {command}`)") from None
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"{p}: not JSON ({e})", key=name) from None
    if not isinstance(data, dict) or data.get("format") != form or data.get("format_version") != version:
        raise StoreFormatError(f"{p.parent}: not an {form} v{version} {what.split()[-1]}")
    return data


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


def _temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A hidden name beside `path` that no other run uses: `.<name>.<tag>-<pid>-<random>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextmanager
def staged_folder(out: str | Path, what: str, ours: Recognizer, overwrite: bool) -> Iterator[Path]:
    """Build the local folder output `out` in a temporary sibling of this run's (yielded, created empty), then
    rename it into place; refused before any work (check_output) and again at the rename. On an error the
    temporary folder is removed, and nothing else."""
    out = Path(normalize_url(str(out)))
    check_output(out, what, ours, overwrite)
    tmp = _temp_sibling(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, out, what, ours, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path, what: str, ours: Recognizer, overwrite: bool) -> None:
    """Rename `tmp` to `out`: at once where `out` is missing or an empty folder; else, when `out` is (still)
    ours and overwrite was asked, after moving it aside (removed once the new one is in place)."""
    aside: list[Path] = []
    try:
        for _ in range(_SWAP_TRIES):
            try:
                os.rename(tmp, out)
                return
            except OSError as e:
                if e.errno not in _TAKEN:
                    raise
            if check_output(out, what, ours, overwrite):  # else it became free meanwhile: try again
                old = _temp_sibling(out, "old")
                try:
                    os.rename(out, old)
                    aside.append(old)
                except FileNotFoundError:  # another run moved it first
                    pass
        raise ConfigError(f"{redact(str(out))}: other runs kept writing it; nothing replaced, try again")
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)
