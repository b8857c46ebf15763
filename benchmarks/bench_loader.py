"""PatchLoader throughput against a sequential decode ceiling and a naive random zarr loader.

On a generated store of realistic shape (actstore.testing.synthetic ViT-like activations, 197 tokens x 768,
the default dtype and codec: bfloat16 + blosc-lz4, 16-image chunks), batches of 16,384 float32
patch tokens (CLS excluded), this measures in one run:

(a) loader: `PatchLoader(url, batch_size=16384, return_indices=True, epochs=2)` with its defaults
    (3 GiB buffer); the second epoch is (a) (its buffer fill and drain included), the first, timed from
    construction (buffer allocation and page faults included), is reported as "(a) loader, cold";
(b) sequential: every chunk in store order, fetched and decoded by the same number of threads
    (ShardReader byte ranges, same read-ahead), the patch tokens converted to float32 straight into
    the batch; no buffer, no shuffling: the decode ceiling the loader is held to;
(c) naive: per batch, ceil(16384 / 196) random images (without replacement over the epoch) read
    with zarr indexing (`acts.oindex[images]`), their patches shuffled and converted; one batch per rep;

from a local store (>= 20k images, ~6 GB; `--store PATH` keeps it between runs) and from a
smaller store on moto's S3 server on 127.0.0.1 (a Python process reading ~200 MB/s here: relative
figures only). Each store is measured in its own process, so peak RSS (sampled every 10 ms during
(a)) is the loader's. Mixing: mean distinct images per full batch against a uniform draw of the
batch from all patches, N (1 - (1 - 1/N)^B). Goals: (a) >= 0.8 x (b), (a) >= 20 x (c), both
locally and from S3; mixing >= 0.9 x uniform with the default buffer (local store); peak RSS
<= the loader's buffer + 1 GiB.

Run: .venv/bin/python benchmarks/bench_loader.py [--quick] [--json out.json] [--store PATH] [--reps N]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import zarr

from actstore.errors import ActstoreError
from actstore.loader import DEFAULT_BUFFER_BYTES, PatchLoader
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.s3 import MotoS3
from actstore.testing.synthetic import vit_like_activations
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

LAYER, GRID, D, B = 10, 14, 768, 16384
N_TOK = GRID * GRID
FULL = {"local_images": 20000, "s3_images": 3000, "buffer_bytes": DEFAULT_BUFFER_BYTES}
QUICK = {"local_images": 2000, "s3_images": 400, "buffer_bytes": 256 << 20}
NOTES = (
    "patches/s and GB/s count delivered float32 patch rows (16384 x 768 x 4 bytes per batch); medians of the reps. "
    "(a), (b) and (c) alternate; the verdicts use the median of each rep's own ratios, robust to load that drifts.",
    "(a) is the second epoch of a 2-epoch loader: its fill and drain phases included, the one-time costs "
    "(construction, first touch of the buffer's pages) not; '(a) loader, cold' is the first epoch with them.",
    "(b) uses the loader's thread counts (decode threads, read-ahead) and its bf16->f32 conversion (one numpy "
    "shift per image); "
    "it reuses two output arrays, as the loader recycles its own once the consumer drops them.",
    "(c) reads whole images through zarr 3.1 orthogonal indexing (partial shard reads, no index cache); one "
    "batch per rep, timed per batch; the (a)/(c) verdict is the median of each rep's own ratio.",
    "Local reads come from the page cache (store just written or reused): decode speed, not disk speed.",
    "S3 is moto's server (a Python process) on loopback, with a smaller store whose data fits the default "
    "buffer: its figures compare (a), (b), (c) with each other, not with real S3.",
    "mixing: mean distinct images per full batch / N (1 - (1 - 1/N)^B) for N images in the store.",
    "peak RSS: the measuring process's resident set during the first (a), in a fresh process, imports (torch "
    "alone ~0.65 GiB) included; later reps also hold heap that (b) and (c) left behind (shown apart). Goal: the "
    "loader's buffer (capacity x row bytes) + 1 GiB.",
)


# store generation -------------------------------------------------------------------------------
def _write_units(url: str, storage_options: dict | None, units: list[int]) -> None:
    writer = StoreWriter(url, storage_options)
    n_tokens = writer.spec.layers[0].tokens.n_tokens
    for k in units:
        a, b = writer.spec.unit_range(k)
        writer.write_unit(k, {str(LAYER): vit_like_activations(b - a, n_tokens, D, seed=k)})
        log(f"    unit {k + 1}/{writer.spec.n_units}")


def generate(url: str, n_images: int, storage_options: dict | None = None) -> None:
    """Write a complete store, units spread over one process per core (the spec's defaults otherwise)."""
    spec = StoreSpec(n_images=n_images, layers=(LayerSpec(str(LAYER), D, TokenLayout(True, (GRID, GRID)), LAYER),),
                     backbone={"family": "synthetic", "name": "vit-like-d768", "n_blocks": 12},
                     dataset={"source": "synthetic", "fingerprint": f"bench-loader-{n_images}"})
    StoreWriter.create(url, spec, storage_options, overwrite=True)
    procs = min(os.cpu_count() or 1, spec.n_units)
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_write_units, args=(url, storage_options, list(range(p, spec.n_units, procs))))
               for p in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
        if w.exitcode != 0:
            raise RuntimeError(f"store generation failed (exit code {w.exitcode})")
    StoreWriter(url, storage_options).finalize()


def ensure_store(path: Path, n_images: int) -> None:
    try:
        with ActivationStore(str(path)) as store:
            if store.shape(LAYER) == (n_images, 1 + N_TOK, D) and store.spec.dtype == "bfloat16":
                log(f"reusing {path} ({n_images} images)")
                return
    except (ActstoreError, OSError):
        pass
    need = n_images * (1 + N_TOK) * D * 2 * 1.1
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise SystemExit(f"{path.parent}: {free / 1e9:.1f} GB free, the store needs ~{need / 1e9:.1f} GB")
    log(f"generating {path}: {n_images} images x {1 + N_TOK} x {D} bfloat16 (~{need / 1e9:.1f} GB)")
    t0 = time.perf_counter()
    generate(str(path), n_images)
    log(f"  done in {time.perf_counter() - t0:.0f} s")


# measurements -----------------------------------------------------------------------------------
class PeakRSS:
    """Samples this process's RSS every 10 ms in a background thread."""

    def __init__(self) -> None:
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_loader(url: str, opts: dict | None, buffer_bytes: int, n_images: int) -> dict[str, Any]:
    """Two epochs of one loader: the first (cold: construction, buffer allocation) and the second timed apart.

    Checks exactly-once delivery per epoch and counts distinct images per batch on the fly, in memory
    proportional to the store's images, so that the process's RSS is the loader's.
    """
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with PeakRSS() as rss, PatchLoader(url, LAYER, B, storage_options=opts, buffer_bytes=buffer_bytes,
                                       return_indices=True, epochs=2) as loader:
        per_epoch = len(loader) // 2
        seen = np.zeros(n_images * (1 + N_TOK), bool)
        distinct, delivered, t_first = [], 0, 0.0
        for j, (x, img, tok) in enumerate(loader):
            keys = img.numpy() * (1 + N_TOK) + tok.numpy()
            if seen[keys].any():
                raise RuntimeError("the loader delivered a patch twice in an epoch")
            seen[keys] = True
            delivered += len(keys)
            if len(x) == B:
                distinct.append(np.count_nonzero(np.bincount(img.numpy(), minlength=n_images)))
            if j == per_epoch - 1:
                t_first = time.perf_counter()
                seen[:] = False
        t_end = time.perf_counter()
        info = {"capacity_rows": loader.capacity, "buffer_bytes": loader.capacity * D * 2,
                "threads": loader.decode_threads, "concurrency": loader.concurrency, "stats": str(loader.stats)}
        n = loader.n_patches // 2
    if delivered != 2 * n or np.count_nonzero(seen) != n:
        raise RuntimeError("the loader missed patches")
    return {"seconds": t_end - t_first, "cold_seconds": t_first - t0, "patches": n,
            "distinct": float(np.mean(distinct)), "peak_rss": rss.peak, "baseline_rss": baseline, **info}


def run_sequential(url: str, opts: dict | None, threads: int, concurrency: int) -> dict[str, Any]:
    """Every chunk in order, decoded by `threads` threads with `concurrency` read ahead, converted into batches."""
    t0 = time.perf_counter()
    store = ActivationStore(url, opts, threads=1)
    reader = store.shard_reader(LAYER)
    spec, slots = store.spec, threading.BoundedSemaphore(threads)

    spare: list[np.ndarray] = []  # decoded chunk arrays are recycled, as the loader does

    def load(i: int) -> tuple[int, np.ndarray]:
        encoded = reader.fetch_shard(i // spec.chunks_per_shard, [i])[i]
        out = spare.pop() if spare else None
        with slots:
            return i, reader.decode(i, encoded, out)

    outs = [np.empty((B, D), np.float32) for _ in range(2)]
    n, fill, batches = 0, 0, 0
    with ThreadPoolExecutor(concurrency) as pool:
        ahead: deque = deque()
        ids = iter(range(spec.n_chunks))
        for i in ids:
            ahead.append(pool.submit(load, i))
            if len(ahead) == concurrency:
                break
        while ahead:
            i, chunk = ahead.popleft().result()
            c0, c1 = spec.chunk_range(i)
            for image in chunk[:c1 - c0]:
                src = image[1:]
                while len(src):
                    m = min(len(src), B - fill)
                    o = outs[batches % 2][fill:fill + m].view(np.uint32)
                    np.left_shift(src[:m], 16, out=o, dtype=np.uint32)  # bfloat16 -> float32, as the loader
                    fill, src = fill + m, src[m:]
                    if fill == B:
                        n, fill, batches = n + B, 0, batches + 1
            spare.append(chunk)
            i = next(ids, None)
            if i is not None:
                ahead.append(pool.submit(load, i))
    store.close()
    return {"seconds": time.perf_counter() - t0, "patches": n + fill}


class NaiveReader:
    """Per batch: the next ceil(B / N_TOK) images of a random permutation, read with zarr indexing."""

    def __init__(self, url: str, opts: dict | None, seed: int = 0) -> None:
        self.acts = zarr.open_group(url, mode="r", storage_options=opts)[f"layers/{LAYER}/acts"]
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.acts.shape[0])
        self.per, self.next = -(-B // N_TOK), 0

    def batch(self) -> dict[str, float]:
        t0 = time.perf_counter()
        images = np.sort(self.order[self.next:self.next + self.per])
        self.next += self.per
        raw = self.acts.oindex[images][:, 1:].reshape(-1, D)  # (per * N_TOK, D) bfloat16 bits
        pick = self.rng.permutation(len(raw))[:B]
        x = torch.from_numpy((raw[pick].astype(np.uint32) << 16).view(np.float32))
        seconds = time.perf_counter() - t0
        assert x.shape == (B, D)
        return {"seconds": seconds, "distinct": len(np.unique(images[pick // N_TOK]))}


def measure(where: str, url: str, opts: dict | None, n_images: int, buffer_bytes: int, reps: int,
            out: mp.Queue) -> None:
    """All three readers on one store, in this (fresh) process; each rep runs (a), (b), one batch of (c)."""
    try:
        log(f"{where}: (a) loader, (b) sequential, (c) naive x {reps}")
        loader_runs, seq_runs, naive_runs = [], [], []
        naive = NaiveReader(url, opts)
        for r in range(reps):
            loader_runs.append(run_loader(url, opts, buffer_bytes, n_images))
            info = loader_runs[-1]
            seq_runs.append(run_sequential(url, opts, info["threads"], info["concurrency"]))
            naive_runs.append(naive.batch())
            log(f"  rep {r + 1}: (a) {info['seconds']:.2f} s (cold {info['cold_seconds']:.2f} s), "
                f"(b) {seq_runs[-1]['seconds']:.2f} s, (c) {naive_runs[-1]['seconds']:.2f} s/batch; {info['stats']}")
        first = loader_runs[0]
        a_s = statistics.median(r["seconds"] for r in loader_runs)
        b_s = statistics.median(r["seconds"] for r in seq_runs)
        uniform = n_images * (1 - (1 - 1 / n_images) ** B)
        cold_s = statistics.median(r["cold_seconds"] for r in loader_runs)
        c_s = statistics.median(r["seconds"] for r in naive_runs)
        rows = [
            {"store": where, "reader": "(a) loader", "patches_per_s": first["patches"] / a_s,
             "seconds": a_s, "distinct": first["distinct"]},
            {"store": where, "reader": "(b) sequential", "patches_per_s": seq_runs[0]["patches"] / b_s,
             "seconds": b_s, "distinct": None},
            {"store": where, "reader": "(c) naive", "patches_per_s": B / c_s, "seconds": c_s,
             "distinct": float(np.mean([r["distinct"] for r in naive_runs]))},
        ]
        rows.append({"store": where, "reader": "(a) loader, cold", "patches_per_s": first["patches"] / cold_s,
                     "seconds": cold_s, "distinct": None})
        for row in rows:
            row["gb_per_s"] = row["patches_per_s"] * D * 4 / 1e9
            row["mixing"] = None if row["distinct"] is None else row["distinct"] / uniform
        # (a)/(b) as the median of each rep's pair (alternated runs): robust to load that drifts between reps
        pairs = [b["seconds"] / a["seconds"] for a, b in zip(loader_runs, seq_runs)]
        naive_pairs = [B / c["seconds"] for c in naive_runs]
        naive_pairs = [a["patches"] / a["seconds"] / c for a, c in zip(loader_runs, naive_pairs)]
        out.put({"store": where, "n_images": n_images, "patches": first["patches"], "rows": rows,
                 "a_over_b": statistics.median(pairs), "a_over_b_pairs": pairs,
                 "a_over_c": statistics.median(naive_pairs), "a_over_c_pairs": naive_pairs,
                 "uniform_distinct": uniform, "peak_rss": first["peak_rss"],
                 "peak_rss_all_reps": max(r["peak_rss"] for r in loader_runs),
                 "baseline_rss": first["baseline_rss"], "buffer_bytes": first["buffer_bytes"],
                 "capacity_rows": first["capacity_rows"], "threads": first["threads"],
                 "concurrency": first["concurrency"], "reps": reps})
    except BaseException as e:
        out.put({"error": f"{type(e).__name__}: {e}"})
        raise


def measure_in_process(*args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=measure, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def verdicts(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        s = r["store"]
        out.append({"goal": f"{s}: (a) >= 0.8 x (b)", "value": r["a_over_b"], "pass": r["a_over_b"] >= 0.8})
        out.append({"goal": f"{s}: (a) >= 20 x (c)", "value": r["a_over_c"], "pass": r["a_over_c"] >= 20})
        if s == "local":
            mix = r["rows"][0]["mixing"]
            out.append({"goal": f"{s}: mixing >= 0.9 x uniform", "value": mix, "pass": mix >= 0.9})
            limit = r["buffer_bytes"] + (1 << 30)
            out.append({"goal": f"{s}: peak RSS <= buffer + 1 GiB ({limit / 2**30:.2f} GiB)",
                        "value": r["peak_rss"] / 2**30, "pass": r["peak_rss"] <= limit})
    return out


def show_results(results: list[dict[str, Any]]) -> None:
    cols = [("store", "store", "{}"), ("reader", "reader", "{}"), ("patches/s", "patches_per_s", "{:,.0f}"),
            ("GB/s", "gb_per_s", "{:.2f}"), ("s", "seconds", "{:.2f}"), ("x (b)", "x_b", "{:.2f}"),
            ("x (c)", "x_c", "{:.1f}"), ("distinct img/batch", "distinct", "{:,.0f}"), ("mixing", "mixing", "{:.3f}")]
    table = []
    for r in results:
        b, c = r["rows"][1]["patches_per_s"], r["rows"][2]["patches_per_s"]
        table += [{**row, "x_b": row["patches_per_s"] / b, "x_c": row["patches_per_s"] / c} for row in r["rows"]]
    print_table(cols, table, text_cols=2)
    for r in results:
        print(f"{r['store']}: {r['n_images']} images, {r['patches']:,} patches/epoch, buffer {r['capacity_rows']:,} "
              f"rows ({r['buffer_bytes'] / 2**30:.2f} GiB), {r['threads']} decode threads, {r['concurrency']} "
              f"chunks read ahead, peak RSS {r['peak_rss'] / 2**30:.2f} GiB ({r['baseline_rss'] / 2**30:.2f} GiB "
              f"before the loader existed; {r['peak_rss_all_reps'] / 2**30:.2f} GiB over all reps), "
              f"uniform expectation {r['uniform_distinct']:,.0f} distinct images/batch; "
              f"(a)/(b) per rep: {', '.join(f'{x:.2f}' for x in r['a_over_b_pairs'])}; "
              f"(a)/(c) per rep: {', '.join(f'{x:.1f}' for x in r['a_over_c_pairs'])}")


def main() -> None:
    parser = Parser(__doc__, "small stores (about a minute)", reps=(3, 2), reps_help="(a)/(b) repetitions")
    parser.add_argument("--store", metavar="PATH", help="local store to reuse (generated there when missing)")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 part")
    args = parser.parse()
    size = QUICK if args.quick else FULL
    bench = Run("bench_loader", args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir="/tmp") as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "store"
        ensure_store(path, size["local_images"])
        results.append(measure_in_process("local", str(path), None, size["local_images"], size["buffer_bytes"],
                                          args.reps))
        if not args.no_s3:
            with MotoS3(bucket="bench-loader") as s3:
                url = s3.url("store")
                log(f"generating {url}: {size['s3_images']} images on moto")
                generate(url, size["s3_images"], s3.storage_options)
                results.append(measure_in_process("s3", url, s3.storage_options, size["s3_images"],
                                                  size["buffer_bytes"], args.reps))
    bench.stop()
    show_results(results)
    print_notes(NOTES)
    found = verdicts(results)
    for v in found:
        print_verdict(f"{v['goal']}: {v['value']:.2f}", v["pass"])
    bench.finish({"batch_size": B, "sizes": size, "machine": machine(np, zarr, load_avg=bench.load_end),
                  "notes": list(NOTES), "results": results, "verdicts": found})


if __name__ == "__main__":
    main()
