"""ImageNet scale: each stage's time and peak memory against the number of images and against the SAE's width.

Against images: synthetic stores of N images (CLS + 4 x 4 patches x 32 dims, bfloat16, 256 images a unit: 5,005
units at 1,281,167 images), N from 10K to 1.28M (quick: 10K and 40K), and for each:
    finalize         merge the unit records, statistics and tables (StoreWriter.finalize, run again)
    verify           read and check every byte (verify_store)
    loader           the shuffling loader's first batch of 16,384 patches
    index            the index pass of a random TopK SAE (256 features, k 8)
    serve            `actstore serve` on that index: seconds to its first feature page, and its resident set
Against width: one store of 510 images x 197 tokens x 768 dims (100K patches, a ViT-B layer), and for a TopK SAE
(k 64) of F features, F from 4,096 to 131,072 (quick: 4,096 and 16,384 on 20K patches):
    index            the index pass within the default budget (half this machine's memory)
    encode           the reference: the SAE's encode of the same patches, in the index's blocks, nothing else
and the comparison of two F x F SAEs at 65,536 (quick: 4,096) within an 8 GB budget, on in-memory image rows (1,024
images; benchmarks/bench_compare.py's planted data), against its reference, the GEMM A^T B of the same shapes (in the
comparison's tiles: 16 GiB would not fit).

Each measurement runs in a process of its own (this script with --stage), which reports its seconds, its resident
set just before the stage (Python, torch, what the stage loads first) and its peak (ru_maxrss): "working" is the
difference, what the budget bounds. Slopes are least-squares fits of log(time) and log(peak) on log(N) over the
three largest N (below, fixed costs weigh): time ~ N^a (at most linear: a <= 1.1), memory ~ N^b (flat: b near 0).

Run: .venv/bin/python benchmarks/bench_scale.py [--quick] [--json out.json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from actstore.budget import GB, MemoryBudget
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

LAYER = "10"
IMAGES = (10_000, 40_000, 160_000, 640_000, 1_281_167)
WIDTHS = (4096, 16384, 65536, 131072)
COMPARE_GB = 8.0
TODAY_65K = 1100
"""Index patches/s at d_sae 65,536 before the budget (issue "ImageNet scale", same machine)."""


# the stages, each in its own process ---------------------------------------------------------------

def _finalize(a: dict[str, Any]) -> dict[str, Any]:
    from actstore.store import StoreWriter

    return _timed(lambda: StoreWriter(a["store"]).finalize())


def _verify(a: dict[str, Any]) -> dict[str, Any]:
    from actstore.store import verify_store

    out = _timed(lambda: verify_store(a["store"], progress=False))
    assert out.pop("result").ok
    return out


def _loader(a: dict[str, Any]) -> dict[str, Any]:
    from actstore.loader import PatchLoader

    def first() -> None:
        with PatchLoader(a["store"], LAYER, batch_size=16384) as loader:
            next(iter(loader))
    return _timed(first)


def _index(a: dict[str, Any]) -> dict[str, Any]:
    from services.index import IndexConfig, build_index

    return _timed(lambda: build_index(IndexConfig(a["store"], a["sae"], a["out"], overwrite=True), progress=False))


def _encode(a: dict[str, Any]) -> dict[str, Any]:
    """The index's reference: its encoder over the same blocks of images, nothing folded."""
    from sae import positive_entries
    from services.index import IndexConfig
    from services.index.build import _open_source, images_per_block

    cfg = IndexConfig(a["store"], a["sae"], "unused")
    src = _open_source(cfg, torch.device("cpu"))
    x = src.store.read(LAYER)
    block = images_per_block(src, cfg)

    def encode() -> None:
        with torch.inference_mode():
            for s in range(0, x.shape[0], block):
                positive_entries(src.encoder.block(x[s:s + block]))
    return _timed(encode)


def _compare(a: dict[str, Any]) -> dict[str, Any]:
    from bench_compare import activations
    from services.compare.run import match_rows, plan

    f, n, block = a["features"], a["images"], 256
    xa, xb, _ = activations(n, f, seed=0)
    pl = plan(f, f, k=16, candidates=32, memory_gb=a["memory_gb"])

    def rows(desc: str):
        for s in range(0, n, block):
            yield xa[s:s + block], xb[s:s + block], torch.arange(s, min(n, s + block))

    def gemm() -> None:  # the reference: the GEMM of the same shapes, in the comparison's tiles
        for s in range(0, f, pl.tile):
            torch.mm(xa[:, s:s + pl.tile].t(), xb)

    if a["reference"]:
        return {**_timed(gemm), "tile": pl.tile}
    out = _timed(lambda: match_rows(rows, f, f, k=16, candidates=32, plan=pl, device=torch.device("cpu")))
    out.pop("result")
    return {**out, "tile": pl.tile, "rows_per_update": pl.rows_per_update}


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "finalize": _finalize, "verify": _verify, "loader": _loader, "index": _index, "encode": _encode,
    "compare": _compare}


def _timed(fn: Callable[[], Any]) -> dict[str, Any]:
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"s": seconds, "base_gb": base / GB, "peak_gb": peak / GB, "working_gb": max(0, peak - base) / GB,
            "result": result}


def stage(name: str, **args: Any) -> dict[str, Any]:
    """Run one stage in a fresh process; its report."""
    cmd = [sys.executable, __file__, "--stage", name, "--args", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _pythonpath()})
    if done.returncode:
        raise RuntimeError(f"stage {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pythonpath() -> str:
    here = Path(__file__).resolve().parent
    return os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])


def serve(index: Path) -> dict[str, Any]:
    """`actstore serve` on the index: seconds from launch to its first feature page, and its resident set then."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "actstore_cli", "serve", "--index", str(index), "--port", str(port),
                             ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": _pythonpath()})
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/features/0", timeout=5) as r:
                    r.read()
                break
            except OSError:
                time.sleep(0.05)
        seconds = time.perf_counter() - t0
        rss = sum(p.memory_info().rss for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)])
        return {"s": seconds, "base_gb": None, "peak_gb": rss / GB, "working_gb": None}
    finally:
        proc.terminate()
        proc.wait(10)


# data ----------------------------------------------------------------------------------------------

def make_store(path: Path, n_images: int, grid: tuple[int, int], d: int) -> str:
    """A synthetic store (reused when one of this shape is there)."""
    from actstore.errors import ActstoreError
    from actstore.store import ActivationStore
    from actstore.testing.synthetic import write_synthetic_store

    try:
        with ActivationStore(str(path)) as store:
            if store.shape(LAYER) == (n_images, grid[0] * grid[1] + 1, d):
                return str(path)
    except (ActstoreError, OSError):
        pass
    log(f"writing {path}: {n_images:,} images x {grid[0] * grid[1] + 1} tokens x {d}")
    write_synthetic_store(str(path), n_images, grid=grid, d=d, layer=int(LAYER), progress=False,
                          images_per_shard=256, images_per_chunk=64)
    return str(path)


def make_sae(store_url: str, path: Path, d_sae: int, k: int) -> str:
    """A random TopK SAE behind the store's patch normalization, with its origin (reused when there)."""
    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from sae import SAEConfig, SparseAutoencoder, checkpoint

    if (path / "cfg.json").exists():
        return str(path)
    with ActivationStore(store_url) as store:
        norm = Normalization.from_stats(store.stats(LAYER, "patches"), LAYER, "patches")
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=store.layer(LAYER).d, d_sae=d_sae, kind="topk", k=k))
        checkpoint.save(sae, str(path), normalization=norm, extra=checkpoint.origin(store, LAYER))
    return str(path)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x)."""
    if len(xs) < 2:
        return None
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


# the sweeps ----------------------------------------------------------------------------------------

def sweep_images(work: Path, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        store = make_store(work / f"images-{n}", n, (4, 4), 32)
        sae = make_sae(store, work / f"images-{n}-sae", 256, 8)
        index = work / f"images-{n}-index"
        for name in ("finalize", "verify", "loader", "index"):
            log(f"{n:,} images: {name}")
            r = stage(name, store=store, sae=sae, out=str(index))
            rows.append({"sweep": "images", "stage": name, "n": n, **r})
        log(f"{n:,} images: serve")
        rows.append({"sweep": "images", "stage": "serve", "n": n, **serve(index)})
    return rows


def sweep_width(work: Path, widths: tuple[int, ...], n_images: int) -> list[dict[str, Any]]:
    rows = []
    store = make_store(work / f"width-{n_images}", n_images, (14, 14), 768)
    patches = n_images * 196
    for f in widths:
        sae = make_sae(store, work / f"width-{n_images}-sae-{f}", f, 64)
        for name in ("index", "encode"):
            log(f"d_sae {f:,}: {name}")
            r = stage(name, store=store, sae=sae, out=str(work / f"width-index-{f}"))
            rows.append({"sweep": "width", "stage": name, "n": f, "patches_per_s": patches / r["s"], **r})
    return rows


def sweep_compare(features: int, n_images: int) -> list[dict[str, Any]]:
    rows = []
    for name, reference in (("compare", False), ("GEMM A^T B (reference)", True)):
        log(f"compare {features:,} x {features:,}: {name}")
        r = stage("compare", features=features, images=n_images, memory_gb=COMPARE_GB, reference=reference)
        rows.append({"sweep": "compare", "stage": name, "n": features, **r})
    return rows


def main() -> None:
    parser = Parser(__doc__, "10K and 40K images; 4K and 16K features on 20K patches; compare at 4K", reps=None)
    parser.add_argument("--work", help="folder for the stores, SAEs and indexes (kept, and reused when present)")
    parser.add_argument("--from-json", metavar="PATH", help="print the tables of a run saved with --json, run nothing")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse()
    if args.stage:  # a child: one stage, its report as the last line
        out = STAGES[args.stage](json.loads(args.args))
        out.pop("result", None)
        print(json.dumps(out))
        return
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report(saved["rows"], MemoryBudget.of(saved["default_budget_gb"]), saved["quick"])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = IMAGES[:2] if args.quick else IMAGES
    widths = WIDTHS[:2] if args.quick else WIDTHS
    width_images = 102 if args.quick else 510
    compare_f = 4096 if args.quick else 65536
    budget = MemoryBudget.of(None)
    run = Run("bench_scale", args)
    rows = sweep_images(work, sizes) + sweep_width(work, widths, width_images) + sweep_compare(compare_f, 1024)
    run.stop()
    report(rows, budget, args.quick)
    run.finish({"rows": rows, "slopes": slopes(rows), "default_budget_gb": budget.gb, "compare_budget_gb": COMPARE_GB,
                "machine": machine(psutil)})


def slopes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for name in ("finalize", "verify", "loader", "index", "serve"):
        rs = sorted((r for r in rows if r["sweep"] == "images" and r["stage"] == name), key=lambda r: r["n"])[-3:]
        out[name] = {"time": slope([r["n"] for r in rs], [r["s"] for r in rs]),
                     "memory": slope([r["n"] for r in rs], [r["peak_gb"] for r in rs])}
    return out


def report(rows: list[dict[str, Any]], budget: MemoryBudget, quick: bool) -> None:
    cols = [("stage", "stage", "{}"), ("N", "n", "{:,}"), ("seconds", "s", "{:.2f}"), ("peak GB", "peak_gb", "{:.2f}"),
            ("working GB", "working_gb", "{:.2f}")]
    print("against images (CLS + 4x4 patches x 32 dims)\n")
    print_table(cols, [r for r in rows if r["sweep"] == "images"], text_cols=1)
    print("\nslopes over the three largest image counts: time ~ N^a, peak ~ N^b\n")
    sl = slopes(rows)
    print_table([("stage", "stage", "{}"), ("a (time)", "time", "{:.2f}"), ("b (peak)", "memory", "{:.2f}")],
                [{"stage": k, **v} for k, v in sl.items()], text_cols=1)
    width = [r for r in rows if r["sweep"] == "width"]
    for r in width:
        ref = next(e for e in width if e["stage"] == "encode" and e["n"] == r["n"])
        r["x_encode"] = r["s"] / ref["s"]
    print(f"\nagainst width (TopK k 64 over {width[0]['patches_per_s'] * width[0]['s']:,.0f} patches of 768 dims), "
          f"default budget {budget.gb:.1f} GB\n")
    print_table([("stage", "stage", "{}"), ("d_sae", "n", "{:,}"), ("seconds", "s", "{:.1f}"),
                 ("patches/s", "patches_per_s", "{:,.0f}"), ("peak GB", "peak_gb", "{:.2f}"),
                 ("working GB", "working_gb", "{:.2f}"), ("x encode time", "x_encode", "{:.2f}")], width, text_cols=1)
    comp = [r for r in rows if r["sweep"] == "compare"]
    comp[0]["x_gemm"], comp[1]["x_gemm"] = comp[0]["s"] / comp[1]["s"], 1.0
    print(f"\ncompare F x F on 1,024 image rows within {COMPARE_GB:g} GB\n")
    print_table([("step", "stage", "{}"), ("F", "n", "{:,}"), ("seconds", "s", "{:.1f}"), ("tile", "tile", "{:,}"),
                 ("peak GB", "peak_gb", "{:.2f}"), ("working GB", "working_gb", "{:.2f}"),
                 ("x GEMM time", "x_gemm", "{:.2f}")], comp, text_cols=1)
    print_notes(["peak = the stage's process at its largest (ru_maxrss); working = peak - the resident set just "
                 "before the stage (Python, torch, imports); serve: the server's resident set at its first page",
                 "the index's per-image arrays (image_features/values) are written through a memory map: their "
                 "dirty pages count in its resident set until written back"])
    print()
    idx = {r["n"]: r for r in width if r["stage"] == "index"}
    top = max(idx)
    print_verdict(f"index at d_sae {top:,} within the default budget", idx[top]["working_gb"] <= budget.gb,
                  f" ({idx[top]['working_gb']:.1f} of {budget.gb:.1f} GB)")
    if 65536 in idx:
        print_verdict("index throughput at 65,536 no lower than before the budget", idx[65536]["patches_per_s"] >=
                      TODAY_65K, f" ({idx[65536]['patches_per_s']:,.0f} patches/s vs {TODAY_65K:,})")
    print_verdict(f"compare {comp[0]['n']:,} x {comp[0]['n']:,} within {COMPARE_GB:g} GB",
                  comp[0]["working_gb"] <= COMPARE_GB, f" ({comp[0]['working_gb']:.1f} GB)")
    for name in ("finalize", "verify", "index"):
        a, b = sl[name]["time"], sl[name]["memory"]
        if a is not None:
            note = " (quick: two sizes, small ones; fixed costs weigh)" if quick else ""
            print_verdict(f"{name} time at most linear and memory flat in images", a <= 1.1 and b <= 0.3,
                          f" (a {a:.2f}, b {b:.2f}{note})")


if __name__ == "__main__":
    main()
