"""The feature service against the image count: start-up time and each worker's memory, 10K -> 1.28M images.

Data: index folders written directly (services.index.layout's files, synthetic arrays, no index pass) for a tiny
SAE (d_sae 64, k 8, m 4, a 4 x 4 grid), so that only the image count grows: images.parquet holds ImageNet-like
URIs (`<root>/train/nXXXXXXXX/nXXXXXXXX_<i>.JPEG`), 1,000 labels, 1% rejected.

Servers, each `actstore serve --index DIR --workers W` as a separate process, W = 1 and 2:
  reference   the service as it was (git REFERENCE, extracted with `git archive`): each worker reads images.parquet
              into Python lists on its first image request, beside a validating app in the parent
  derived     this tree on an index without images.arrow: the parent writes the image table from images.parquet
              into a temporary folder once, every worker memory-maps it (one worker: it reads images.parquet into
              Arrow columns of its own)
  index       this tree on an index with its own images.arrow (layout.write_image_table, as the index pass writes
              it): every worker memory-maps it, nothing is written at start-up

Start-up: Popen to the first 200 from GET /features/0 (the page's first request for a feature: the features table,
and the top images' labels from the image table), polled every 10 ms; "all workers": until every worker has answered it (the worker holding each keep-alive connection, from
psutil). Memory, after that: each worker's RSS and USS (its unique pages: what it does not share) and the parent's
RSS (psutil memory_full_info). Start-up is the median over reps; memory is the last rep's.

Run: .venv/bin/python benchmarks/bench_serve_scale.py [--quick] [--json out.json] [--reps N] [--workdir DIR]
(needs the git history: the reference is extracted from it).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import psutil
import zarr

from services.index.layout import (ARRAYS, FEATURES, FORMAT, FORMAT_VERSION, IMAGE_TABLE, IMAGES, META,
                                   write_image_table)
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "481d776b7c7d825e2b9dd84cb10f30a9243a7b0a"
"""The last commit whose service read images.parquet into Python lists in every worker."""
PACKAGES = ("actstore", "actstore_cli", "sae", "services")
FULL, QUICK = (10_000, 100_000, 400_000, 1_281_167), (10_000, 100_000)
D_SAE, K, M, GRID, BANDS, PER_BAND, CLASSES = 64, 8, 4, (4, 4), 32, 4, 1000
GOALS = {"uss_ratio": 0.5, "start_ratio": 1.0}
"""At the largest size with 2 workers, for `index` against `reference`: unique memory per worker at most half, and
start-up to every worker's first answer no slower."""
NOTES = (
    "start s: Popen of `actstore serve` to the first 200 from GET /features/0; all workers s: until every worker "
    "has answered it (the reference reads images.parquet on a worker's first request that needs it, this tree maps "
    "the image table at the worker's start).",
    "RSS counts the memory-mapped pages a worker touched (shared with the other workers and the page cache); USS "
    "only the pages no other process shares: the memory a worker adds. Both in MiB, per worker (mean). With one "
    "worker the mapped image table is its alone, so it counts in its USS too.",
    "table MiB: the size of images.arrow (uri, label, ok), the one copy every worker maps.",
    "parent MiB: RSS of the process that starts the workers (workers 2); with 1 worker it is the worker.",
    "x ref: this row's value over the reference's at the same images and workers (start: all workers s; USS).",
)


# the index folders ------------------------------------------------------------------------------

def write_index(path: Path, n_images: int, seed: int = 0) -> None:
    """An index folder of `n_images` images for a tiny SAE, with the layout's files and synthetic arrays."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    root = str(path / "dataset")
    labels = rng.integers(0, CLASSES, n_images).astype(np.int32)
    uris = [f"{root}/train/n{1440764 + c:08d}/n{1440764 + c:08d}_{i}.JPEG" for i, c in enumerate(labels.tolist())]
    status = np.where(rng.random(n_images) < 0.01, "rejected", "ok")
    pq.write_table(pa.table({"index": np.arange(n_images), "uri": uris, "label": labels, "status": status}),
                   path / IMAGES)
    pq.write_table(pa.table({"id": np.arange(D_SAE), "n_patches_fired": rng.integers(1, 10**6, D_SAE),
                             "n_images_fired": rng.integers(1, n_images, D_SAE), "freq_patches": rng.random(D_SAE),
                             "freq_images": rng.random(D_SAE), "mean_act": rng.random(D_SAE),
                             "max_act": 1 + rng.random(D_SAE)}), path / FEATURES)
    n_patches = GRID[0] * GRID[1]
    arrays = {"top_images": rng.integers(0, n_images, (D_SAE, K), dtype=np.int32),
              "top_values": rng.random((D_SAE, K), dtype=np.float32),
              "heatmaps": rng.random((D_SAE, K, n_patches)).astype(np.float16),
              "band_images": rng.integers(0, n_images, (D_SAE, BANDS, PER_BAND), dtype=np.int32),
              "band_values": rng.random((D_SAE, BANDS, PER_BAND), dtype=np.float32),
              "band_counts": rng.integers(0, 100, (D_SAE, BANDS)),
              "image_features": rng.integers(0, D_SAE, (n_images, M), dtype=np.int32),
              "image_values": rng.random((n_images, M), dtype=np.float32)}
    group = zarr.open_group(path / ARRAYS, mode="w")
    for name, a in arrays.items():  # as the index pass writes them: one uncompressed chunk each
        group.create_array(name, shape=a.shape, chunks=a.shape, dtype=a.dtype, compressors=None, filters=None,
                           config={"write_empty_chunks": True})[...] = a
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "store": "synthetic", "sae": "synthetic",
            "sae_kind": "topk", "layer": "10", "tokens": "patches", "grid": list(GRID), "n_patches": n_patches,
            "n_images": n_images, "n_images_ok": int((status == "ok").sum()), "d_sae": D_SAE, "k": K, "m": M,
            "per_band": PER_BAND, "band_exponents": [-16, 16],
            "histogram": {"edges": [], "counts": [], "dead": D_SAE, "n_features": D_SAE},
            "class_names": [f"class {c}" for c in range(CLASSES)], "dataset_source": None, "dataset_root": root,
            "preprocessing": None, "backbone": {"family": None, "name": None}}
    (path / META).write_text(json.dumps(meta))


def extract_reference(work: Path) -> Path:
    """The reference's packages, from git (`git archive`), in work/reference."""
    out = work / "reference"
    if not (out / "actstore_cli").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(REPO), "archive", REFERENCE, *PACKAGES], capture_output=True,
                             check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(out, filter="data")
    return out


# one start --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port: int, path: str) -> http.client.HTTPConnection | None:
    """A keep-alive connection on which `path` was answered 200; None when it was not (yet)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        if r.status == 200:
            return conn
    except OSError:
        pass
    conn.close()
    return None


def workers_of(root: psutil.Process, n: int) -> list[psutil.Process]:
    """The processes that answer: the root with one worker, else its uvicorn worker children (spawned)."""
    if n == 1:
        return [root]
    return [p for p in root.children() if "spawn_main" in " ".join(p.cmdline())]


def holder(workers: list[psutil.Process], conn: http.client.HTTPConnection) -> int | None:
    """The pid of the worker holding the server side of the connection."""
    port = conn.sock.getsockname()[1]
    for w in workers:
        if any(c.raddr and c.raddr.port == port for c in w.net_connections("tcp")):
            return w.pid
    return None


def start(cmd: list[str], cwd: Path, env: dict[str, str], port: int, n_workers: int, path: str,
          log_path: Path) -> dict[str, Any]:
    """Start one server; time its first answer and every worker's; measure each worker's memory; stop it."""
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    conns: list[http.client.HTTPConnection] = []  # held open, so that each new connection may go to another worker
    served: set[int | None] = set()

    def answered(workers: list[psutil.Process]) -> bool:
        if (conn := ask(port, path)) is None:
            return False
        conns.append(conn)
        served.add(holder(workers, conn) if workers else None)
        return True

    def wait(done: Any) -> float:
        while not done():
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                raise SystemExit(f"{' '.join(cmd)} did not come up; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
        return time.perf_counter() - t0

    try:
        root = psutil.Process(proc.pid)
        first_s = wait(lambda: answered([]))
        wait(lambda: len(workers_of(root, n_workers)) == n_workers)
        workers = workers_of(root, n_workers)
        all_s = wait(lambda: answered(workers) and len(served - {None}) == n_workers)
        mem = [w.memory_full_info() for w in workers]
        parent = root.memory_full_info().rss if n_workers > 1 else None
    finally:
        for conn in conns:
            conn.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    mib = 2**20
    return {"first_s": first_s, "all_s": all_s, "rss_mib": statistics.mean(m.rss for m in mem) / mib,
            "uss_mib": statistics.mean(m.uss for m in mem) / mib, "parent_mib": None if parent is None else parent / mib}


def bench(index: Path, mode: str, n_workers: int, reps: int, reference: Path, work: Path) -> dict[str, Any]:
    cwd = reference if mode == "reference" else REPO
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    runs = []
    for rep in range(reps):
        port = free_port()
        cmd = [sys.executable, "-m", "actstore_cli", "serve", "--index", str(index), "--port", str(port),
               "--workers", str(n_workers)]
        runs.append(start(cmd, cwd, env, port, n_workers, "/features/0",
                          work / f"serve-{index.name}-{mode}-{n_workers}.log"))
    row = {key: runs[-1][key] for key in ("rss_mib", "uss_mib", "parent_mib")}
    row.update({"first_s": statistics.median(r["first_s"] for r in runs),
                "all_s": statistics.median(r["all_s"] for r in runs),
                "first_s_all": [r["first_s"] for r in runs], "all_s_all": [r["all_s"] for r in runs]})
    log(f"  {index.name} {mode} workers={n_workers}: up {row['first_s']:.2f} s, all {row['all_s']:.2f} s, "
        f"RSS {row['rss_mib']:.0f} MiB, USS {row['uss_mib']:.0f} MiB a worker")
    return row


# report -----------------------------------------------------------------------------------------

def ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's start-up (all workers) and USS over the reference's at the same images and workers."""
    ref = {(r["images"], r["workers"]): r for r in rows if r["mode"] == "reference"}
    for r in rows:
        base = ref[(r["images"], r["workers"])]
        r["start_ratio"] = r["all_s"] / base["all_s"]
        r["uss_ratio"] = r["uss_mib"] / base["uss_mib"]


def main() -> None:
    parser = Parser(__doc__, f"{len(QUICK)} sizes up to {QUICK[-1]:,} images, one start each (under a minute)",
                    reps=(3, 1), reps_help="starts of each server")
    parser.add_argument("--workdir", metavar="DIR", help="write the index folders here and keep them (reused)")
    args = parser.parse()
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench_serve_scale_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        reference = extract_reference(work)
        bench_run = Run("bench_serve_scale", args)
        rows = []
        for n in sizes:
            index = work / f"index-{n}"
            if not (index / META).exists():
                log(f"writing {index}")
                (index / IMAGE_TABLE).unlink(missing_ok=True)
                write_index(index, n)
            (index / IMAGE_TABLE).unlink(missing_ok=True)
            for mode in ("reference", "derived", "index"):
                if mode == "index":
                    table_mib = write_image_table(index).stat().st_size / 2**20
                for n_workers in (1, 2):
                    rows.append({"images": n, "mode": mode, "workers": n_workers,
                                 **bench(index, mode, n_workers, args.reps, reference, work)})
            for row in rows[-6:]:
                row["table_mib"] = table_mib
        bench_run.stop()
    ratios(rows)
    cols = [("images", "images", "{:,}"), ("server", "mode", "{}"), ("workers", "workers", "{}"),
            ("start s", "first_s", "{:.2f}"), ("all workers s", "all_s", "{:.2f}"), ("x ref", "start_ratio", "{:.2f}"),
            ("RSS/worker", "rss_mib", "{:,.0f}"), ("USS/worker", "uss_mib", "{:,.0f}"), ("x ref", "uss_ratio", "{:.2f}"),
            ("parent MiB", "parent_mib", "{:,.0f}"), ("table MiB", "table_mib", "{:,.0f}")]
    print_table(cols, rows, text_cols=2)
    print_notes(NOTES)
    last = next(r for r in rows if (r["images"], r["mode"], r["workers"]) == (sizes[-1], "index", 2))
    verdicts = [{"what": f"USS per worker, index / reference, {sizes[-1]:,} images, 2 workers", "value": last["uss_ratio"],
                 "goal": f"<= {GOALS['uss_ratio']}", "pass": last["uss_ratio"] <= GOALS["uss_ratio"]},
                {"what": f"start-up to every worker's answer, index / reference, {sizes[-1]:,} images, 2 workers",
                 "value": last["start_ratio"], "goal": f"<= {GOALS['start_ratio']}",
                 "pass": last["start_ratio"] <= GOALS["start_ratio"]}]
    print()
    for v in verdicts:
        print_verdict(f"{v['what']} = {v['value']:.2f} (goal {v['goal']})", v["pass"],
                      " (quick: smaller sizes; the goals are for the full run)" if args.quick else "")
    bench_run.finish({"sizes": list(sizes), "reference": REFERENCE, "goals": GOALS,
                      "sae": {"d_sae": D_SAE, "k": K, "m": M, "grid": list(GRID)},
                      "machine": machine(pa, psutil), "notes": list(NOTES), "rows": rows, "verdicts": verdicts})


if __name__ == "__main__":
    main()
