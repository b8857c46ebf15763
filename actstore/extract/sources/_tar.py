"""WebDataset tar shards: samples are runs of members sharing a key (`<key>.<ext>`), in shard order.

Image i is a sample's image member (the first of jpg, jpeg, png, webp), referenced by its byte range so that
a decode task reads just those bytes. Listing reads the members' headers, not their data: each shard is walked
header to header with small range reads, all shards in step (one concurrent read per step on s3). Only the
label members' data (`cls`, or the `.json` when a json field is the label) is read.

A shard must be complete: a header or member that runs past the end of the file, or no end-of-archive block,
is refused with the shard's name before any work, since a truncated download hides how many samples it held.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Generator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
from tqdm.auto import tqdm

from actstore.errors import ConfigError, CorruptDataError, StorageError
from actstore.extract.sources._files import parse_labels, spelled
from actstore.extract.sources._refs import ImageRef, fetch_ranges

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
"""Extensions of a sample's image member, in the order one is chosen when a sample has several."""
_BLOCK = 512
_WINDOW = 16384
"""Bytes read per step: a header, a pax header and small label members usually fit in one read."""
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
"""`dir/key.ext.more` -> (dir/key, ext.more): webdataset's rule (the key ends at the basename's first dot)."""
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


@dataclass(frozen=True)
class _Member:
    name: str
    offset: int
    size: int
    data: bytes | None
    """The member's bytes when they were asked for (label members), else None."""


def from_tars(fs: fsspec.AbstractFileSystem, paths: list[str], source: str, label_column: str | None,
              progress: bool = True) -> tuple[list[str], list[int], list[str]]:
    """(references, labels, class names) of the samples of the shards `paths` (sorted here).

    label_column None: a sample's `cls` member (an integer, or a name) when samples have one. A name: the member
    of that extension if samples have one, else that field of the sample's `.json` member."""
    paths = sorted(paths)
    for p in paths:
        if not p.lower().endswith(".tar"):
            raise ConfigError(f"{spelled(fs, p)}: not an uncompressed .tar shard (a compressed one cannot be read "
                              "by byte range: decompress it first)")
    wanted = {"cls"} if label_column is None else {label_column, "json"}
    uris: list[str] = []
    values: list[str | int | None] = []
    found_label = False
    for path, members in zip(paths, _scan_all(fs, paths, wanted, progress)):
        file = spelled(fs, path)
        for key, sample in _samples(members):
            image = next((sample[e] for e in IMAGE_MEMBERS if e in sample), None)
            if image is None:
                continue
            uris.append(str(ImageRef(file, member=image.name, offset=image.offset, size=image.size)))
            value = _label(sample, label_column, f"{file}: sample {key}")
            found_label |= value is not None
            values.append(value)
    if label_column is not None and not found_label:
        raise ConfigError(f"{source}: no sample has a {label_column!r} member or .json field to label it")
    if not found_label:
        return uris, [-1] * len(uris), []
    if any(isinstance(v, str) for v in values) and any(isinstance(v, int) for v in values):
        raise ConfigError(f"{source}: labels mix integers and names")
    labels, class_names = parse_labels(pa.chunked_array([pa.array(values)]), source)
    return uris, labels, class_names


def _label(sample: dict[str, _Member], label_column: str | None, where: str) -> str | int | None:
    """A sample's label: the text of its label member (an integer when it reads as one), or its json field."""
    member = sample.get(label_column or "cls")
    if member is not None:
        text = (member.data or b"").decode("utf-8", "replace").strip()
        return int(text) if re.fullmatch(r"-?\d+", text) else text or None
    if label_column is None or "json" not in sample:
        return None
    try:
        value = json.loads(sample["json"].data or b"null")
    except ValueError:
        raise ConfigError(f"{where}: its .json member is not JSON") from None
    value = value.get(label_column) if isinstance(value, dict) else None
    if value is not None and not isinstance(value, (int, str)):
        raise ConfigError(f"{where}: json field {label_column!r} is {type(value).__name__}, not a label")
    return value


def _samples(members: list[_Member]) -> Generator[tuple[str, dict[str, _Member]], None, None]:
    """(key, {ext: member}) of each run of members sharing a key; members without an extension are skipped."""
    key, sample = None, {}
    for m in members:
        match = _KEY.match(m.name)
        if match is None:
            continue
        if match[1] != key:
            if sample:
                yield key, sample
            key, sample = match[1], {}
        sample.setdefault(match[2].lower(), m)
    if sample:
        yield key, sample


def _scan_all(fs: fsspec.AbstractFileSystem, paths: list[str], wanted: set[str],
              progress: bool) -> list[list[_Member]]:
    """The members of every shard: each shard's walk (_scan) asks for byte ranges, all asked at once per step.

    Memory: the steps' reads (16 KiB a shard) and the members listed, whatever the shards' sizes."""
    sizes = [fs.size(p) for p in paths]
    walks = {k: _scan(spelled(fs, p), sizes[k], wanted) for k, p in enumerate(paths)}
    asks = {k: next(w) for k, w in walks.items()}
    done: list[list[_Member]] = [[] for _ in paths]
    with tqdm(total=len(paths), desc="list tar shards", unit="shard", disable=not progress) as bar:
        while asks:
            keys = list(asks)
            got = fetch_ranges(fs, [paths[k] for k in keys], [asks[k][0] for k in keys], [asks[k][1] for k in keys])
            for k, data in zip(keys, got):
                if isinstance(data, Exception):
                    raise StorageError(f"{spelled(fs, paths[k])}: read failed ({type(data).__name__}: {data})")
                try:
                    asks[k] = walks[k].send(data)
                except StopIteration as end:
                    done[k] = end.value
                    del asks[k]
                    bar.update()
    return done


def _scan(file: str, size: int, wanted: set[str]) -> Generator[tuple[int, int], bytes, list[_Member]]:
    """Walk one tar from header to header: yields the byte range it needs next, is sent those bytes, and returns
    the regular members (with the data of those whose extension is in `wanted`)."""
    at, window = 0, b""

    def has(a: int, b: int) -> bool:
        return at <= a and b <= at + len(window)

    members, pos, pax, long_name = [], 0, {}, None
    while True:
        if pos + _BLOCK > size:
            raise CorruptDataError(f"{file}: truncated: no end-of-archive block (the file ends at byte {size}); "
                                   "replace it", key=file)
        if not has(pos, pos + _BLOCK):
            at, window = pos, (yield pos, min(size, pos + _WINDOW))
        block = window[pos - at:pos - at + _BLOCK]
        if block.count(0) == _BLOCK:
            return members
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise CorruptDataError(f"{file}: not a tar archive, or damaged at byte {pos} ({e})", key=file) from None
        length = int(pax.get("size", info.size))
        start, name = pos + _BLOCK, pax.get("path", long_name or info.name)
        if start + length > size:
            raise CorruptDataError(f"{file}: truncated: member {name} needs bytes {start}..{start + length}, the "
                                   f"file ends at byte {size}; replace it", key=file)
        meta = info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME)
        ext = _KEY.match(name)
        keep = info.type in _REGULAR and ext is not None and ext[2].lower() in wanted
        data = None
        if meta or keep:
            if not has(start, start + length):
                at, window = start, (yield start, max(start + length, min(size, start + _WINDOW)))
            data = window[start - at:start - at + length]
        pos = start + -(-length // _BLOCK) * _BLOCK
        if info.type == tarfile.XHDTYPE:
            pax = _pax(data or b"", file)
            continue
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = (data or b"").rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type in _REGULAR:
            members.append(_Member(name, start, length, data if keep else None))
        pax, long_name = {}, None


def _pax(data: bytes, file: str) -> dict[str, str]:
    """A pax extended header's records ("<length> <key>=<value>\\n" each)."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.find(b" ", i)
        try:
            length = int(data[i:space])
        except ValueError:
            raise CorruptDataError(f"{file}: damaged pax header", key=file) from None
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return out
