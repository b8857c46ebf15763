"""Store write/read throughput and size per dtype x codec, against raw float32 np.save/np.load.

On synthetic ViT-like activations (actstore.testing.synthetic.vit_like_activations: Gaussian bulk plus a few
heavy-tailed channels) of shapes 197x768 and 257x1024 (tokens x d), for each dtype (float32, float16,
bfloat16) x codec (none, blosc-lz4, zstd) this measures, in one run on the same data:

- write: StoreWriter.create + write_unit per shard + finalize (conversion, stats, checksums included);
- read: `ActivationStore(url).read(layer)` of the whole layer (the project's fast path), after one
  warm-up read that is also checked against the written values;
- bytes on disk: every object in the store (metadata, images table, unit records and stats included);

beside the reference, a raw float32 np.save / np.load of the same array; each row's reads alternate
with raw np.load reads, so that the read ratio holds up on a busy machine. For the default setting it also
reads the array with plain zarr (`zarr.open_group(url)["layers/<L>/acts"][:]`) as a second reference.
Throughput is in GB/s of the logical float32 equivalent (n_values * 4 bytes / s), so every row compares
with the raw float32 row. Goal: the default setting (DEFAULT_DTYPE + DEFAULT_CODEC) stores at most 0.5x
the bytes of raw float32 and reads at least 0.8x as fast.

Run: .venv/bin/python benchmarks/bench_store.py [--quick] [--json out.json] [--reps N]
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr

from actstore.store import (CODECS, DEFAULT_CODEC, DEFAULT_DTYPE, DTYPES, ActivationStore, LayerSpec, StoreSpec,
                            StoreWriter, TokenLayout)
from actstore.testing.synthetic import vit_like_activations
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

LAYER = "10"
FULL_SHAPES = ((14, 768, 1024), (16, 1024, 512))
"""(patch grid side, d, n_images): CLS + 14x14 = 197 tokens of 768, CLS + 16x16 = 257 tokens of 1024."""
QUICK_SHAPES = ((14, 768, 64), (16, 1024, 64))
RAW = "raw .npy"
ZARR_REF = f"{DEFAULT_CODEC} (zarr [:])"
NOTES = (
    "GB/s = logical float32 bytes (n_values * 4 / 1e9) per second; medians of the repetitions.",
    "read x raw = raw np.load time / store read time, medians over reads alternated with that row's own; "
    "each store read opens the store (as np.load opens its file).",
    "Reads of both the store and the raw .npy come from the page cache (files just written): "
    "decode and copy speed, not disk speed.",
    "Writes land in the page cache too; store writes include dtype conversion, per-unit stats, "
    "checksums and finalize.",
    "bytes on disk = apparent sizes of every object in the store (acts, metadata, images table, records, stats).",
)


@dataclass(frozen=True)
class Row:
    """One measured setting: medians of the repetitions, in seconds; None where not measured."""

    shape: str
    dtype: str
    codec: str
    n_values: int
    read_s: float
    raw_read_s: float
    """Raw float32 np.load time, median over reads alternated with this row's reads."""
    write_s: float | None = None
    nbytes: int | None = None

    def metrics(self, raw: Row) -> dict[str, Any]:
        """The row with throughputs and the ratios against the raw float32 row of the same shape."""
        def per_s(s: float | None) -> float | None:
            return None if s is None else self.n_values / s

        return {
            **asdict(self),
            "write_values_per_s": per_s(self.write_s),
            "read_values_per_s": per_s(self.read_s),
            "write_gbps": None if self.write_s is None else per_s(self.write_s) * 4 / 1e9,
            "read_gbps": per_s(self.read_s) * 4 / 1e9,
            "bytes_per_value": None if self.nbytes is None else self.nbytes / self.n_values,
            "bytes_ratio": None if self.nbytes is None else self.nbytes / raw.nbytes,
            "write_ratio": None if self.write_s is None else raw.write_s / self.write_s,
            "read_ratio": self.raw_read_s / self.read_s,
        }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_write_s(write: Callable[[], object], path: Path, reps: int) -> float:
    """Median seconds of write() into a path removed (untimed) before each repetition."""
    times = []
    for _ in range(reps):
        remove(path)
        times.append(timed(write))
    return statistics.median(times)


def paired_read_s(read: Callable[[], object], raw_read: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of read() and of raw_read(), alternated so that the machine's load hits both alike."""
    pairs = [(timed(read), timed(raw_read)) for _ in range(reps)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def bench_raw(x: np.ndarray, shape: str, path: Path, reps: int) -> Row:
    """The reference row; leaves the .npy at path for the store rows' alternated reads."""
    write = median_write_s(lambda: np.save(path, x), path, reps)
    if not np.array_equal(np.load(path), x):
        raise RuntimeError(f"{shape}: np.load does not return what np.save wrote")
    read = statistics.median(timed(lambda: np.load(path)) for _ in range(reps))
    return Row(shape, "float32", RAW, x.size, read, read, write, path.stat().st_size)


def write_store(url: str, x: np.ndarray, spec: StoreSpec) -> None:
    writer = StoreWriter.create(url, spec, overwrite=True)
    for k in range(spec.n_units):
        start, stop = spec.unit_range(k)
        writer.write_unit(k, {LAYER: x[start:stop]})
    writer.finalize()


def bench_store(x: np.ndarray, expected: torch.Tensor, shape: str, grid: int, dtype: str, codec: str,
                tmp: Path, raw_path: Path, reps: int) -> list[Row]:
    """Rows of one dtype x codec: the store's own, plus the plain-zarr reference for the default setting."""
    spec = StoreSpec(n_images=x.shape[0], dtype=dtype, codec=codec,
                     layers=(LayerSpec(LAYER, x.shape[2], TokenLayout(cls=True, grid=(grid, grid)), int(LAYER)),))
    path = tmp / f"store-{dtype}-{codec}"
    url = str(path)
    write = median_write_s(lambda: write_store(url, x, spec), path, reps)

    def store_read() -> torch.Tensor:
        with ActivationStore(url) as store:
            return store.read(LAYER)

    def raw_read() -> np.ndarray:
        return np.load(raw_path)

    if not torch.equal(store_read(), expected):  # warm-up read and check
        raise RuntimeError(f"{shape} {dtype} {codec}: the store reads back other values than were written")
    with ActivationStore(url) as store:
        nbytes = store.nbytes_stored()
    rows = [Row(shape, dtype, codec, x.size, *paired_read_s(store_read, raw_read, reps), write, nbytes)]
    if dtype == DEFAULT_DTYPE and codec == DEFAULT_CODEC:
        def zarr_read() -> np.ndarray:
            return zarr.open_group(url, mode="r")[f"layers/{LAYER}/acts"][:]

        plain = torch.from_numpy(zarr_read())
        if dtype == "bfloat16":  # stored as its uint16 bits
            plain = plain.view(torch.int16).view(torch.bfloat16)
        if not torch.equal(plain, expected):
            raise RuntimeError(f"{shape} {dtype} {codec}: plain zarr reads other values than were written")
        rows.append(Row(shape, dtype, ZARR_REF, x.size, *paired_read_s(zarr_read, raw_read, reps)))
    remove(path)
    return rows


def run(shapes: tuple[tuple[int, int, int], ...], reps: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_store_", dir="/tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        for grid, d, n_images in shapes:
            x = vit_like_activations(n_images, 1 + grid * grid, d, seed=0)
            shape = f"{x.shape[1]}x{d}"
            log(f"{shape}: {n_images} images, {x.nbytes / 1e9:.2f} GB float32")
            raw_path = tmp / "raw.npy"
            raw = bench_raw(x, shape, raw_path, reps)
            rows = [raw]
            for dtype in DTYPES:
                expected = torch.from_numpy(x).to(getattr(torch, dtype))
                for codec in CODECS:
                    log(f"  {dtype} {codec}")
                    rows += bench_store(x, expected, shape, grid, dtype, codec, tmp, raw_path, reps)
                del expected
            remove(raw_path)
            results += [row.metrics(raw) for row in rows]
    return results


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: does the default setting meet bytes ratio <= 0.5 and read ratio >= 0.8?"""
    out = []
    for r in results:
        if r["dtype"] == DEFAULT_DTYPE and r["codec"] == DEFAULT_CODEC:
            ok = r["bytes_ratio"] <= 0.5 and r["read_ratio"] >= 0.8
            out.append({"shape": r["shape"], "setting": f"{DEFAULT_DTYPE}+{DEFAULT_CODEC}", "pass": ok,
                        "bytes_ratio": r["bytes_ratio"], "read_ratio": r["read_ratio"]})
    return out


def show_results(results: list[dict[str, Any]]) -> None:
    cols = [("shape", "shape", "{}"), ("dtype", "dtype", "{}"), ("codec", "codec", "{}"),
            ("write GB/s", "write_gbps", "{:.2f}"), ("read GB/s", "read_gbps", "{:.2f}"),
            ("read Mval/s", "read_values_per_s", "{:.0f}"), ("bytes/value", "bytes_per_value", "{:.3f}"),
            ("bytes x raw", "bytes_ratio", "{:.4f}"), ("write x raw", "write_ratio", "{:.2f}"),
            ("read x raw", "read_ratio", "{:.2f}")]
    print_table(cols, [{**r, "read_values_per_s": r["read_values_per_s"] / 1e6} for r in results], text_cols=3)


def main() -> None:
    args = Parser(__doc__, "small sizes (under a minute)", reps=(3, 3),
                  reps_help="timed repetitions per measurement").parse()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    bench = Run("bench_store", args)
    results = run(shapes, args.reps)
    bench.stop()
    show_results(results)
    print_notes(NOTES)
    found = verdicts(results)
    for v in found:
        print_verdict(f"{v['shape']} {v['setting']}: bytes {v['bytes_ratio']:.4f}x raw f32 (goal <= 0.5), "
                      f"read {v['read_ratio']:.2f}x raw f32 (goal >= 0.8)", v["pass"])
    bench.finish({"shapes": [{"grid": g, "d": d, "n_images": n} for g, d, n in shapes],
                  "machine": machine(np, zarr, numcodecs), "notes": list(NOTES), "rows": results, "verdicts": found})


if __name__ == "__main__":
    main()
