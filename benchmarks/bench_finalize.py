"""Finalize and verify of a store of many work units, on the local filesystem and on an S3 endpoint, against the
same code reading the units' objects one after the other.

The store: 5,005 units (ImageNet-1K's 1,281,167 images are 5,005 units of 256), each of 4 images of 17 tokens
x 32 dims (CLS + 4 x 4 patches, float16), so that the metadata dominates: per unit a record
(`_units/<k>.json`), an images table (`<k>.parquet`) and a stats file (`<k>.stats.safetensors`), plus one shard.
It is written locally with StoreWriter.write_unit (~5 ms a unit here) and then uploaded whole, one PUT per
object, s3fs running them concurrently, to moto's S3 server on 127.0.0.1 (actstore.testing.s3.MotoS3, as the
tests run it): ~5 ms an object, 2 minutes for the 20,024 objects; write_unit into moto would send the same
requests (and zarr's), one unit after another.

For each filesystem, in one run on the same store:
- finalize: `StoreWriter(url).finalize()` (merges stats and tables, writes images.parquet and the stats arrays);
- verify: `verify_store(url)` (every unit's objects, then its shard, unit after unit);
each with the units' objects read concurrently (the project's path: fsspec cat_ranges, s3fs runs a batch
of requests at once) and, as the reference, one after the other (the same request, `fs.cat_file` per object,
as finalize and verify read before). Times are per unit; CPU is this process's (the client, all threads) and,
on S3, the moto server process's. Goal (issue 25): finalize on the local S3 endpoint at <= 2 ms a unit at 5,005 units.

Run: .venv/bin/python benchmarks/bench_finalize.py [--quick] [--units N] [--json out.json]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import fsspec
import numpy as np
import s3fs
import zarr

from actstore.store import LayerSpec, StoreSpec, StoreWriter, TokenLayout, verify_store
from actstore.store import _io
from actstore.testing.s3 import MotoS3
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

UNITS, QUICK_UNITS = 5005, 300
IMAGES_PER_UNIT, GRID, D, LAYER = 4, (4, 4), 32, "0"
TARGET_MS = 2.0
COLUMNS = [("filesystem", "filesystem", "{}"), ("operation", "operation", "{}"),
           ("ms/unit", "ms_per_unit", "{:.2f}"), ("one by one ms/unit", "ref_ms_per_unit", "{:.2f}"),
           ("x ref", "speedup", "{:.2f}"), ("client cpu ms/unit", "client_cpu_ms_per_unit", "{:.2f}"),
           ("server cpu ms/unit", "server_cpu_ms_per_unit", "{:.2f}")]
NOTES = (
    "ms/unit = wall time / units, the project's concurrent reads; one by one = the same code reading each object "
    "after the previous one (the reference, measured right after); x ref = one by one / concurrent.",
    "client cpu = this process's CPU time (every thread, the s3fs event loop included); server cpu = the moto "
    "server process's; both per unit, for the concurrent run.",
    "Each unit costs finalize three GETs (record, then table and stats file), verify two more per layer (its "
    "shard, read unit after unit by the shard reader: s3fs asks its size with a HEAD, then GETs it); zarr's "
    "metadata adds ~150 requests a run (a few ms a unit at --quick's 300 units). Local reads are sequential in "
    "both runs (faster there than threads), so the local ratio is ~1.",
    "moto is one Python process: what it spends per request bounds any client; 2 CPUs here, shared with other "
    "work (see the load average).",
)


def make_spec(n_units: int) -> StoreSpec:
    layer = LayerSpec(LAYER, D, TokenLayout(cls=True, grid=GRID), 0)
    return StoreSpec(n_images=n_units * IMAGES_PER_UNIT, layers=(layer,),
                     dtype="float16", images_per_shard=IMAGES_PER_UNIT, images_per_chunk=IMAGES_PER_UNIT,
                     backbone={"family": "synthetic", "name": "bench-finalize", "n_blocks": 1},
                     dataset={"source": "synthetic", "fingerprint": "bench-finalize"})


def write_store(url: str, spec: StoreSpec) -> None:
    """Every unit, random activations, not finalized."""
    writer = StoreWriter.create(url, spec, overwrite=True)
    rng = np.random.default_rng(0)
    shape = (IMAGES_PER_UNIT, *spec.shape(LAYER)[1:])
    for k in range(spec.n_units):
        writer.write_unit(k, {LAYER: rng.standard_normal(shape, dtype=np.float32)})


def upload(local: Path, fs: s3fs.S3FileSystem, root: str) -> int:
    """Every object of the local store under `root`, one PUT each, s3fs running them concurrently."""
    objects = {f"{root}/{p.relative_to(local).as_posix()}": p.read_bytes() for p in local.rglob("*") if p.is_file()}
    fs.pipe(objects)
    return len(objects)


def cpu_s(pid: int | None) -> float:
    """CPU seconds of process `pid` (user + system), or of this process (every thread) when None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], object], server: int | None) -> dict[str, float | None]:
    """Wall seconds and CPU seconds of this process and of the server process (None: no server)."""
    c0, s0, t0 = cpu_s(None), None if server is None else cpu_s(server), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return {"s": wall, "client_cpu_s": cpu_s(None) - c0, "server_cpu_s": None if server is None else cpu_s(server) - s0}


@contextmanager
def one_by_one() -> Iterator[None]:
    """The reference: finalize and verify reading each object after the previous one, with the same request
    (the range from byte 0, see cat_many)."""
    def cat_in_turn(fs: fsspec.AbstractFileSystem, paths: list[str]) -> list[bytes | Exception]:
        out: list[bytes | Exception] = []
        for p in paths:
            try:
                out.append(fs.cat_file(p, start=0))
            except Exception as e:  # as cat_many: a failed read is its exception
                out.append(e)
        return out

    with mock.patch.object(_io, "cat_many", cat_in_turn):
        yield


def measure(filesystem: str, url: str, opts: dict[str, Any] | None, n_units: int, server: int | None) -> list[dict]:
    def verify() -> None:
        report = verify_store(url, opts, progress=False)
        if not report.ok:
            raise RuntimeError(f"{url}: verify found {report.problems[:3]}")

    rows = []
    for operation, fn in (("finalize", lambda: StoreWriter(url, opts).finalize()), ("verify", verify)):
        log(f"{filesystem} {operation}: concurrent, then one by one")
        new = timed(fn, server)
        with one_by_one():
            ref = timed(fn, server)
        per_unit = {k: None if v is None else v / n_units * 1e3 for k, v in new.items()}
        rows.append({"filesystem": filesystem, "operation": operation, "n_units": n_units,
                     "s": new["s"], "ref_s": ref["s"], "ms_per_unit": per_unit["s"],
                     "ref_ms_per_unit": ref["s"] / n_units * 1e3, "speedup": ref["s"] / new["s"],
                     "client_cpu_ms_per_unit": per_unit["client_cpu_s"],
                     "server_cpu_ms_per_unit": per_unit["server_cpu_s"],
                     "ref_client_cpu_ms_per_unit": ref["client_cpu_s"] / n_units * 1e3,
                     "ref_server_cpu_ms_per_unit": None if ref["server_cpu_s"] is None
                     else ref["server_cpu_s"] / n_units * 1e3})
    return rows


def main() -> None:
    parser = Parser(__doc__, f"{QUICK_UNITS} units instead of {UNITS} (under a minute)")
    parser.add_argument("--units", type=int, help=f"units in the store (default {UNITS}, quick {QUICK_UNITS})")
    args = parser.parse()
    n_units = args.units or (QUICK_UNITS if args.quick else UNITS)
    spec = make_spec(n_units)
    tmp = Path(tempfile.mkdtemp(prefix="bench-finalize-"))
    try:
        local = tmp / "store"
        log(f"writing {n_units} units locally")
        t0 = time.perf_counter()
        write_store(str(local), spec)
        write_s = time.perf_counter() - t0
        with MotoS3() as s3:
            fs = s3fs.S3FileSystem(**s3.storage_options)
            log("uploading the store to moto")
            t0 = time.perf_counter()
            n_objects = upload(local, fs, f"{s3.bucket}/store")
            upload_s = time.perf_counter() - t0
            bench = Run("bench_finalize", args)
            rows = measure("local", str(local), None, n_units, None)
            rows += measure("s3 (moto)", s3.url("store"), s3.storage_options, n_units,
                            s3._proc.pid)  # the server process, for its CPU time
            bench.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"store: {n_units} units of {IMAGES_PER_UNIT} images, {spec.layers[0].tokens.n_tokens} tokens x {D}; "
          f"written locally in {write_s:.0f} s ({write_s / n_units * 1e3:.1f} ms/unit), uploaded to moto in "
          f"{upload_s:.0f} s ({n_objects} objects, {upload_s / n_objects * 1e3:.1f} ms each)")
    print()
    print_table(COLUMNS, rows, text_cols=2)
    print_notes(NOTES)
    s3_finalize = next(r for r in rows if r["filesystem"] != "local" and r["operation"] == "finalize")
    ok = s3_finalize["ms_per_unit"] <= TARGET_MS
    print_verdict(f"finalize on moto S3 at {n_units} units: {s3_finalize['ms_per_unit']:.2f} ms/unit "
                  f"(goal <= {TARGET_MS}; moto's own CPU {s3_finalize['server_cpu_ms_per_unit']:.2f} ms/unit)", ok,
                  "" if n_units >= UNITS else f" (at {n_units} units, not {UNITS})")
    bench.finish({"n_units": n_units, "images_per_unit": IMAGES_PER_UNIT, "tokens": spec.layers[0].tokens.n_tokens,
                  "d": D, "write_s": write_s, "upload_s": upload_s, "n_objects": n_objects,
                  "machine": machine(np, zarr, s3fs, fsspec), "notes": list(NOTES), "rows": rows,
                  "verdicts": [{"what": "finalize on moto S3 ms/unit", "goal": TARGET_MS,
                                "value": s3_finalize["ms_per_unit"], "pass": ok}]})


if __name__ == "__main__":
    main()
