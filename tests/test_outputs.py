"""actstore.outputs: the one output guard (what a command may replace) and folders that appear whole."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from actstore.errors import ConfigError
from actstore.outputs import check_output, marked_by, staged_folder

OURS = marked_by("done.json")


def _check(path: Path | str, overwrite: bool = False, **kw) -> bool:
    return check_output(str(path), "a thing", OURS, overwrite, **kw)


def _ours(folder: Path, text: str = "old") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").write_text(text)
    (folder / "done.json").write_text("{}")
    return folder


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


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


def test_staged_folder_builds_beside_and_swaps_in(tmp_path):
    out = tmp_path / "out"
    theirs = tmp_path / f".out.tmp-{os.getpid() + 1}-0123456789ab"  # another run's work in progress
    theirs.mkdir()
    (theirs / "half").write_text("theirs")
    with staged_folder(out, "a thing", OURS, False) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(f".out.tmp-{os.getpid()}-") and tmp.is_dir()
        _ours(tmp, "first")
        assert not out.exists()  # nothing at out until the work is whole
    assert (out / "data").read_text() == "first"
    # a failing run removes its own temporary folder only; the output stays as it was
    with pytest.raises(RuntimeError, match="boom"):
        with staged_folder(out, "a thing", OURS, True) as tmp:
            _ours(tmp, "second")
            raise RuntimeError("boom")
    assert (out / "data").read_text() == "first"
    # replaced only when asked
    with pytest.raises(ConfigError, match="already there"):
        with staged_folder(out, "a thing", OURS, False):
            pass
    with staged_folder(out, "a thing", OURS, True) as tmp:
        _ours(tmp, "third")
    assert (out / "data").read_text() == "third"
    assert _hidden(tmp_path) == [theirs.name] and (theirs / "half").read_text() == "theirs"


def test_staged_folder_rechecks_at_the_swap(tmp_path):
    """What appeared at out while this run worked (another run's output, someone's folder) decides again."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="already there"):
        with staged_folder(out, "a thing", OURS, False) as tmp:
            _ours(tmp, "mine")
            _ours(out, "the other run's")  # another run finished first
    assert (out / "data").read_text() == "the other run's"
    with staged_folder(out / "x", "a thing", OURS, False) as tmp:  # parents are made
        _ours(tmp)
    mine = tmp_path / "mine"
    with pytest.raises(ConfigError, match="is not a thing; refusing"):
        with staged_folder(mine, "a thing", OURS, True) as tmp:
            _ours(tmp)
            mine.mkdir()
            (mine / "todo.txt").write_text("keep me")
    assert [p.name for p in mine.iterdir()] == ["todo.txt"]
    with staged_folder(out, "a thing", OURS, True) as tmp:
        _ours(tmp, "mine")
        _ours(out, "the other run's, again")
    assert (out / "data").read_text() == "mine"
    assert _hidden(tmp_path) == [] and _hidden(out) == []
