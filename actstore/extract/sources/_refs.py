"""Image references: one string per image saying where its bytes live, and reading them.

    /data/imagenet/n01440764/x.JPEG                            a file (local path or full URL)
    s3://b/train-00003.parquet#column=image&row=17            row 17 of a parquet file's image column
    s3://b/train-0007.tar#member=x.jpg&offset=3584&size=1409  a member of an (uncompressed) tar

The reference is what the store's images table keeps as `uri`, so every stage that needs pixels (the decode
tasks, evaluate, steer, the service's /images/{id}) reads an image the same way, whatever the dataset's format.
A string is a parquet or tar reference only when the part before its last `#` names a .parquet or .tar file
and the fragment holds exactly that format's keys: any other string, `#` or not, is a plain file.
"""

from __future__ import annotations

import bisect
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from actstore.errors import CorruptDataError, StorageError

_PARQUET_KEYS = ("column", "row")
_TAR_KEYS = ("member", "offset", "size")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes live: a whole file, a parquet row or a tar member's byte range."""

    file: str
    """Absolute local path or full URL of the file holding the bytes."""
    column: str = ""
    """Parquet: the image column (a binary column, or a struct whose `bytes` field holds the file)."""
    row: int = -1
    """Parquet: the row within the file."""
    member: str = ""
    """Tar: the member's name (for people; the byte range is what is read)."""
    offset: int = -1
    """Tar: the first byte of the member's data in the tar file."""
    size: int = -1
    """Tar: the member's size in bytes."""

    @property
    def kind(self) -> str:
        return "parquet" if self.row >= 0 else "tar" if self.offset >= 0 else "file"

    def __str__(self) -> str:
        if self.kind == "parquet":
            return f"{self.file}#{urlencode({'column': self.column, 'row': self.row})}"
        if self.kind == "tar":
            return f"{self.file}#{urlencode({'member': self.member, 'offset': self.offset, 'size': self.size})}"
        return self.file

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        file, hash_, fragment = ref.rpartition("#")
        ext = posixpath.splitext(file)[1].lower()
        if not hash_ or ext not in (".parquet", ".tar"):
            return cls(ref)
        fields = dict(parse_qsl(fragment, keep_blank_values=True))
        try:
            if ext == ".parquet" and sorted(fields) == sorted(_PARQUET_KEYS) and int(fields["row"]) >= 0:
                return cls(file, column=fields["column"], row=int(fields["row"]))
            if ext == ".tar" and sorted(fields) == sorted(_TAR_KEYS) and min(int(fields["offset"]),
                                                                             int(fields["size"])) >= 0:
                return cls(file, member=fields["member"], offset=int(fields["offset"]), size=int(fields["size"]))
        except ValueError:  # a fragment that only looks like ours: a plain file named so
            pass
        return cls(ref)


def image_file(ref: str) -> str:
    """The file that holds the image `ref` names: what containment checks and dataset roots look at."""
    return ImageRef.parse(ref).file


_PARQUET_BATCH = 32
"""Rows decoded at once from a parquet image column (about 4 MB of ImageNet JPEGs)."""
_PARQUET_BUFFER = 1 << 20
"""Bytes of a parquet column chunk read at once while streaming it."""
_THREADS = 16
"""Concurrent reads on a filesystem without an async interface."""
MERGE_GAP = 1 << 20
"""Tar members at most this many bytes apart are read in one request (what lies between is read and dropped)."""
MERGE_SPAN = 64 << 20
"""The most bytes one request of tar members spans."""
_NOT_THERE = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
"""Read errors that say something about the image itself (it is not there): recorded, not raised."""


def read_bytes(refs: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[bytes | Exception]:
    """The bytes of each image reference, or the exception saying a loose file is not there (a missing image is
    data, not a crash). Any other failure raises: StorageError for a read that kept failing, CorruptDataError for
    a parquet or tar file that is damaged or gone (a shard holds many images: it fails their unit, and a rerun
    redoes it, rather than rejecting them all for good).

    Whole files and tar ranges: one concurrent call per protocol (s3 fetches the whole list at once); parquet:
    each row group that holds a wanted row is read once. storage_options apply to the remote protocols only.
    """
    parsed = [ImageRef.parse(r) for r in refs]
    out: list[bytes | Exception | None] = [None] * len(parsed)
    ranges: dict[str, list[int]] = {}
    tables: dict[tuple[str, str], list[int]] = {}
    for i, ref in enumerate(parsed):
        if ref.kind == "parquet":
            tables.setdefault((ref.file, ref.column), []).append(i)
        else:
            ranges.setdefault(fsspec.core.split_protocol(ref.file)[0] or "file", []).append(i)
    for protocol, idx in ranges.items():
        try:
            fs = _filesystem(protocol, storage_options)
        except Exception as e:  # unknown protocol or missing driver: every reference to it fails alike
            for i in idx:
                out[i] = e
            continue
        _read_ranges(fs, [parsed[i] for i in idx], idx, out)
    for (file, column), idx in tables.items():
        for i, data in zip(idx, _read_rows(file, column, [parsed[i].row for i in idx], storage_options or {})):
            out[i] = data
    return out  # type: ignore[return-value]


def _filesystem(protocol: str, storage_options: dict[str, Any] | None) -> fsspec.AbstractFileSystem:
    """The filesystem of a protocol; storage options go to the remote ones only (they hold no local settings)."""
    return fsspec.filesystem(protocol, **({} if protocol in ("file", "local") else storage_options or {}))


def _read_ranges(fs: fsspec.AbstractFileSystem, refs: list[ImageRef], idx: list[int],
                 out: list[bytes | Exception | None]) -> None:
    """Whole files and tar members of one filesystem, fetched in one cat_ranges call. Members of one shard lying
    close together are fetched as one span: a unit's samples are usually consecutive, so a unit makes a request
    or two per shard instead of one per image."""
    spans: list[list[Any]] = []  # [file, start, end, positions in refs]; start None: the whole file
    for k in sorted(range(len(refs)), key=lambda k: (refs[k].kind != "tar", refs[k].file, refs[k].offset)):
        r, last = refs[k], spans[-1] if spans else None
        if r.kind != "tar":
            spans.append([r.file, None, None, [k]])
        elif last and last[0] == r.file and last[1] is not None and 0 <= r.offset - last[2] <= MERGE_GAP \
                and r.offset + r.size - last[1] <= MERGE_SPAN:
            last[2], last[3] = max(last[2], r.offset + r.size), [*last[3], k]
        else:
            spans.append([r.file, r.offset, r.offset + r.size, [k]])
    got = fetch_ranges(fs, [fs._strip_protocol(f) for f, *_ in spans], [s[1] for s in spans], [s[2] for s in spans])
    for (file, start, end, ks), data in zip(spans, got):
        if isinstance(data, Exception) and (start is not None or not isinstance(data, _NOT_THERE)):
            # a transient failure that outlasted the retries is no verdict on the image, and a missing shard is
            # no verdict on its images: fail the unit (not recorded, so a rerun redoes it)
            raise StorageError(f"{file}: read failed ({type(data).__name__}: {data}); rerun to resume") from data
        if start is None:
            out[idx[ks[0]]] = data
            continue
        if len(data) != end - start:
            raise CorruptDataError(f"{file}: truncated: bytes {start}..{end} are needed, the file ends before; "
                                   "replace it and rerun", key=file)
        for k in ks:
            out[idx[k]] = data[refs[k].offset - start:refs[k].offset - start + refs[k].size]


def fetch_ranges(fs: fsspec.AbstractFileSystem, paths: list[str], starts: list[int | None],
                 ends: list[int | None]) -> list[bytes | Exception]:
    """Byte ranges (None: from the start, to the end) of several files at once, an exception in place of a failed
    one: async filesystems (s3) in one concurrent call, the others (hf://, local) from a pool of threads."""
    # cat_ranges, not cat: cat expands globs ("img[1].jpg") and deduplicates; this keeps one result per range
    if getattr(fs, "async_impl", False) or len(paths) < 2:
        return fs.cat_ranges(paths, starts, ends, on_error="return")

    def one(k: int) -> bytes | Exception:
        try:
            return fs.cat_file(paths[k], starts[k], ends[k])
        except Exception as e:  # returned, as cat_ranges(on_error="return") does: the caller decides
            return e

    with ThreadPoolExecutor(min(_THREADS, len(paths))) as pool:
        return list(pool.map(one, range(len(paths))))


def open_exact(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """A file that reads exactly the ranges asked for: pyarrow asks for whole footers and column chunks, which a
    read-ahead cache (s3fs: 50 MB past each read) would only inflate."""
    return fs.open(path, "rb", cache_type="none")


def _read_rows(file: str, column: str, rows: list[int], storage_options: dict[str, Any]) -> list[bytes | Exception]:
    """The image bytes of `rows` of one parquet file. Each row group holding one of them is streamed a batch at a
    time up to the last row wanted: row groups are often 100 MB (`datasets` aims for that), and a unit rarely
    needs a whole one, nor should it hold one."""
    try:
        fs = _filesystem(fsspec.core.split_protocol(file)[0] or "file", storage_options)
        path = fs._strip_protocol(file)
        with open_exact(fs, path) as f:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
            starts, stop = [0], 0
            for g in range(pf.metadata.num_row_groups):
                stop += pf.metadata.row_group(g).num_rows
                starts.append(stop)
            by_group: dict[int, dict[int, list[int]]] = {}  # row group -> its row -> positions in `rows`
            for k, r in enumerate(rows):
                if not 0 <= r < stop:
                    raise CorruptDataError(f"{file}: has {stop} rows, no row {r}: the file changed since the store "
                                           "was made", key=file)
                g = bisect.bisect_right(starts, r) - 1
                by_group.setdefault(g, {}).setdefault(r - starts[g], []).append(k)
            out: list[bytes | Exception] = [b""] * len(rows)
            for g, wanted in by_group.items():
                at = 0
                for batch in pf.iter_batches(_PARQUET_BATCH, row_groups=[g], columns=[column], use_threads=False):
                    for r in range(at, at + batch.num_rows):
                        for k in wanted.get(r, ()):
                            data = _image_bytes(batch.column(0)[r - at].as_py())
                            out[k] = data if data is not None else ValueError("the row holds no image bytes")
                    at += batch.num_rows
                    if at > max(wanted):
                        break
            return out
    except (CorruptDataError, StorageError):
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{file}: not found ({e}); rerun once it is back") from None
    except (OSError, pa.ArrowException, KeyError) as e:
        raise CorruptDataError(f"{file}: unreadable parquet ({type(e).__name__}: {' '.join(str(e).split())}); "
                               "replace it and rerun", key=file) from None


def _image_bytes(value: bytes | dict[str, Any] | None) -> bytes | None:
    """The bytes of one image cell: a binary value itself, or the `bytes` field of a {bytes, path} struct."""
    return value.get("bytes") if isinstance(value, dict) else value
