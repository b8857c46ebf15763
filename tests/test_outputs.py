"""actstore.outputs: the one output guard (what a command may replace)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest

from actstore.errors import ConfigError
from actstore.outputs import check_output, marked_by

OURS = marked_by("done.json")


def _check(path: Path | str, overwrite: bool = False, **kw) -> bool:
    return check_output(str(path), "a thing", OURS, overwrite, **kw)


def _ours(folder: Path, text: str = "old") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").write_text(text)
    (folder / "done.json").write_text("{}")
    return folder


def test_guard_free_ours_and_foreign(tmp_path):
    assert _check(tmp_path / "missing") is False
    (tmp_path / "empty").mkdir()
    assert _check(tmp_path / "empty") is False  # an empty folder is free for a folder output
    with pytest.raises(ConfigError, match=r"empty exists and is not a thing; refusing to replace it, choose another"
                                          r" --json$"):
        _check(tmp_path / "empty", file=True, option="--json")  # but not for a file output
    ours = _ours(tmp_path / "ours")
    with pytest.raises(ConfigError, match=r"ours: a thing is already there; pass --overwrite to replace it$"):
        _check(ours)
    assert _check(ours, overwrite=True) is True
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    (tmp_path / "file.txt").write_text("keep me too")
    for path in (foreign, tmp_path / "file.txt"):
        with pytest.raises(ConfigError, match="is not a thing; refusing to replace it, choose another --out") as e:
            _check(path, overwrite=True)
        assert "\n" not in str(e.value)
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"] and (tmp_path / "file.txt").read_text() == "keep me too"
    assert (ours / "data").read_text() == "old"  # the guard itself never removes anything


def test_guard_shows_paths_redacted():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/user:hunter2@host/out/notes.txt", b"mine")
    with pytest.raises(ConfigError) as e:
        _check("memory://user:hunter2@host/out", overwrite=True)
    assert "hunter2" not in str(e.value) and "<redacted>@host/out exists and is not a thing" in str(e.value)
    assert fs.cat_file("/user:hunter2@host/out/notes.txt") == b"mine"


def test_guard_on_s3(s3, s3_url):
    fs = fsspec.filesystem("s3", **s3.storage_options)
    opts = s3.storage_options
    assert _check(f"{s3_url}/out", storage_options=opts) is False
    fs.pipe_file(f"{s3_url}/out/done.json".removeprefix("s3://"), b"{}")
    with pytest.raises(ConfigError, match="already there"):
        _check(f"{s3_url}/out", storage_options=opts)
    assert _check(f"{s3_url}/out", True, storage_options=opts) is True
    fs.pipe_file(f"{s3_url}/mine/x.txt".removeprefix("s3://"), b"mine")
    with pytest.raises(ConfigError, match="is not a thing"):
        _check(f"{s3_url}/mine", True, storage_options=opts)
