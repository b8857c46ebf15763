"""The feature service under load (requests/s, p50/p99 latency, cold start, RSS) and the index pass's speed.

Data: a synthetic store (CLS + 14x14 patches), a random TopK SAE (d_sae 16,384, k=32) saved with the
store's normalization, and its index from services.index.build_index.

Index pass: patches/s of build_index (store reads, normalization, encode, the streaming merges, the
write) against the SAE's encode alone over the same patches, read once into memory beforehand and
encoded in the index's block size under torch.inference_mode. Goal: >= 0.7x.

Service: `actstore serve --index DIR` as a separate process (uvicorn with one worker, with two (the
default), and --ray for Ray Serve); cold start = Popen to the first 200 from /healthz, polled every
10 ms, the median of one start per rep. Load
from wrk on 127.0.0.1, each request GET /features/<random id in [0, 16384)>, at 1 connection
(-t1 -c1) and 16 connections (-t2 -c16); RSS of the server's process tree after the load. Goals on
2 cores (uvicorn, concurrency 16): p99 <= 10 ms, >= 1,000 requests/s; cold start <= 3 s.

Run: .venv/bin/python benchmarks/bench_service.py [--quick] [--json out.json] [--reps N] [--workdir DIR]
Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from actstore.errors import ActstoreError
from actstore.store import ActivationStore
from actstore.testing.synthetic import write_synthetic_store
from sae import Normalization, SAEConfig, SparseAutoencoder, checkpoint, load, save
from services.index import IndexConfig, build_index
from services.index.build import _open_source, images_per_block
from _common import Parser, Run, log, machine, outcome, print_notes, print_table  # benchmarks/ is sys.path[0]

LAYER, D_SAE, K = "10", 16384, 32
FULL = {"n_images": 2048, "d": 384, "duration_s": 10}
QUICK = {"n_images": 256, "d": 128, "duration_s": 3}
GOALS = {"p99_ms": 10.0, "req_per_s": 1000.0, "cold_start_s": 3.0, "index_over_encode": 0.7}
ACTSTORE = Path(sys.executable).with_name("actstore")
NOTES = (
    "req/s, p50 and p99 are wrk's (-t1 -c1 for concurrency 1, -t2 -c16 for 16), medians over reps; each request "
    "asks for a random feature id, so responses range from a dead feature's few hundred bytes to 32 heatmaps.",
    "wrk runs on the same 2 cores as the server: at concurrency 16 it takes a core's share from the server.",
    "cold start: the median over reps of Popen of `actstore serve` to the first 200 from /healthz (interpreter, "
    "imports, index.json, uvicorn bind; Ray: a local Ray cluster, the Serve controller, proxy and replica).",
    "RSS MiB: after the load, summed over the server's process tree (RSS idle: just after start-up); for Ray, "
    "the driver and everything Ray started under it (GCS, raylet, workers, the Serve actors). PSS counts shared "
    "pages (libraries, the memory-mapped index) once; the index pages a run touched count in both.",
    "index patches/s includes the store reads (prefetched one block ahead), the merges and the write; encode "
    "patches/s reads nothing: the layer is in memory before the clock starts.",
)


# data and the index pass ------------------------------------------------------------------------

def make_data(work: Path, n_images: int, d: int) -> tuple[Path, Path]:
    """A synthetic store and a random TopK SAE saved with the store's normalization (reused if present)."""
    store_url, sae_dir = work / "store", work / "sae"
    try:
        with ActivationStore(str(store_url)) as store:
            reuse = store.shape(LAYER) == (n_images, 197, d) and (sae_dir / "cfg.json").exists()
    except (ActstoreError, OSError):
        reuse = False
    if reuse:
        log(f"reusing {store_url} and {sae_dir}")
        return store_url, sae_dir
    log(f"writing {store_url}: {n_images} images x 197 tokens x d={d}")
    write_synthetic_store(str(store_url), n_images, grid=(14, 14), d=d, progress=False)
    with ActivationStore(str(store_url)) as store:
        norm = Normalization.from_stats(store.stats(LAYER, "patches"), LAYER, "patches")
        origin = checkpoint.origin(store, LAYER)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=D_SAE, kind="topk", k=K))
    save(sae, str(sae_dir), normalization=norm, extra=origin)
    return store_url, sae_dir


def bench_index(store_url: Path, sae_dir: Path, index_dir: Path, reps: int) -> dict[str, Any]:
    cfg = IndexConfig(store=str(store_url), sae=str(sae_dir), out=str(index_dir), overwrite=True)
    sae, norm = load(str(sae_dir))
    with ActivationStore(str(store_url)) as store:
        x = store.read(LAYER)[:, 1:]
    n_images, n_patches, d = x.shape
    block = n_patches * images_per_block(_open_source(cfg, torch.device("cpu")), cfg)  # as build_index does
    x = x.reshape(-1, d)

    def encode_all() -> None:
        with torch.inference_mode():
            for i in range(0, x.shape[0], block):
                sae.encode(norm.apply(x[i:i + block].float()))

    index_s, encode_s = [], []
    for _ in range(reps):  # alternated, so that the machine's load hits both alike
        t0 = time.perf_counter()
        build_index(cfg, progress=False)
        index_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        encode_all()
        encode_s.append(time.perf_counter() - t0)
    n = x.shape[0]
    row = {"patches": n, "block_patches": block, "index_s": statistics.median(index_s),
           "encode_s": statistics.median(encode_s), "index_s_all": index_s, "encode_s_all": encode_s}
    row["index_per_s"], row["encode_per_s"] = n / row["index_s"], n / row["encode_s"]
    row["ratio"] = row["index_per_s"] / row["encode_per_s"]
    row["index_mib"] = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file()) / 2**20
    log(f"  index {row['index_s']:.2f} s, encode {row['encode_s']:.2f} s for {n:,} patches")
    return row


# servers and wrk --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Server:
    """`actstore serve` in its own session (process group); stop() ends that group and whatever it started."""

    def __init__(self, args: list[str], log_path: Path, timeout_s: float) -> None:
        self.port = free_port()
        cmd = [str(ACTSTORE), "serve", *args, "--port", str(self.port)]
        self.command = " ".join(cmd)
        t0 = time.perf_counter()
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while not healthy(self.port):
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                self.stop()
                raise SystemExit(f"{self.command} did not come up; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.01)
        self.cold_start_s = time.perf_counter() - t0
        self.idle_rss_mib = self.memory()[0]

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def memory(self) -> tuple[float, float, int]:
        """(RSS, PSS) in MiB summed over the process tree, and the number of processes."""
        rss = pss = 0
        procs = self.tree()
        for p in procs:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except psutil.NoSuchProcess:
                pass
        return rss / 2**20, pss / 2**20, len(procs)

    def stop(self) -> None:
        procs = self.tree()  # Ray's processes may leave the group: remember them all by pid
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()


LUA = """math.randomseed(%d)
request = function()
  return wrk.format("GET", "/features/" .. math.random(0, %d))
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, script: Path, threads: int, conns: int, duration_s: int) -> dict[str, Any]:
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration_s}s", "--latency", "-s", str(script),
           f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)]

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    read = re.search(r"requests in [\d.]+\w+, ([\d.]+)(B|KB|MB|GB) read", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[read.group(2)]
    return {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": latency("50"), "p99_ms": latency("99"), "requests": requests,
            "kib_per_resp": float(read.group(1)) * scale / max(requests, 1) / 2**10,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


def bench_server(name: str, args: list[str], work: Path, script: Path, duration_s: int, reps: int,
                 timeout_s: float) -> list[dict[str, Any]]:
    log_path = work / f"serve-{re.sub(r'[^a-z0-9]+', '-', name)}.log"
    starts = []
    for i in range(reps):  # the first start also pays for a cold page cache; the median is the typical start
        server = Server(args, log_path, timeout_s)
        starts.append(server.cold_start_s)
        if i < reps - 1:
            server.stop()
    cold_start_s = statistics.median(starts)
    log(f"  {name}: up in {', '.join(f'{t:.2f}' for t in starts)} s ({server.command})")
    rows = []
    try:
        wrk(server.port, script, 2, 16, 1)  # warm-up: imports on first request, page faults, Ray's proxy
        for threads, conns in ((1, 1), (2, 16)):
            runs = [wrk(server.port, script, threads, conns, duration_s) for _ in range(reps)]
            rss, pss, n_procs = server.memory()
            row = {"server": name, "concurrency": conns, "cold_start_s": cold_start_s, "cold_starts_s": starts,
                   "idle_rss_mib": server.idle_rss_mib, "rss_mib": rss, "pss_mib": pss, "processes": n_procs,
                   "command": server.command, "runs": runs}
            for key in ("req_per_s", "p50_ms", "p99_ms", "kib_per_resp"):
                row[key] = statistics.median(r[key] for r in runs)
            row["non_2xx"] = sum(r["non_2xx"] for r in runs)
            row["socket_errors"] = sum(r["socket_errors"] for r in runs)
            log(f"    c={conns}: {row['req_per_s']:,.0f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms")
            rows.append(row)
    finally:
        server.stop()
    return rows


# report -----------------------------------------------------------------------------------------

def verdicts(rows: list[dict[str, Any]], index: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["concurrency"] == 16:
            out.append({"what": f"{r['server']}: p99 at concurrency 16 (ms)", "value": r["p99_ms"],
                        "goal": f"<= {GOALS['p99_ms']:g}", "pass": r["p99_ms"] <= GOALS["p99_ms"]})
            out.append({"what": f"{r['server']}: req/s at concurrency 16", "value": r["req_per_s"],
                        "goal": f">= {GOALS['req_per_s']:,.0f}", "pass": r["req_per_s"] >= GOALS["req_per_s"]})
            out.append({"what": f"{r['server']}: cold start (s)", "value": r["cold_start_s"],
                        "goal": f"<= {GOALS['cold_start_s']:g}", "pass": r["cold_start_s"] <= GOALS["cold_start_s"]})
    out.append({"what": "index pass: index / encode patches/s", "value": index["ratio"],
                "goal": f">= {GOALS['index_over_encode']:g}", "pass": index["ratio"] >= GOALS["index_over_encode"]})
    return out


def show_results(rows: list[dict[str, Any]], index: dict[str, Any], found: list[dict[str, Any]]) -> None:
    cols = [("server", "server", "{}"), ("concurrency", "concurrency", "{}"), ("req/s", "req_per_s", "{:,.0f}"),
            ("p50 ms", "p50_ms", "{:.2f}"), ("p99 ms", "p99_ms", "{:.2f}"), ("KiB/resp", "kib_per_resp", "{:.1f}"),
            ("non-2xx", "non_2xx", "{}"), ("sock err", "socket_errors", "{}"),
            ("RSS idle MiB", "idle_rss_mib", "{:,.0f}"),
            ("RSS MiB", "rss_mib", "{:,.0f}"), ("PSS MiB", "pss_mib", "{:,.0f}"),
            ("procs", "processes", "{}"), ("cold start s", "cold_start_s", "{:.2f}")]
    print_table(cols, rows, text_cols=1)
    print()
    print_table([("index pass", "what", "{}"), ("patches", "patches", "{:,}"), ("index s", "index_s", "{:.2f}"),
                 ("index patches/s", "index_per_s", "{:,.0f}"), ("encode s", "encode_s", "{:.2f}"),
                 ("encode patches/s", "encode_per_s", "{:,.0f}"), ("ratio", "ratio", "{:.2f}"),
                 ("index MiB", "index_mib", "{:,.0f}")],
                [{"what": f"d_sae {D_SAE}, k {K}, block {index['block_patches']:,}", **index}], text_cols=1)
    print()
    print_table([("verdict", "what", "{}"), ("value", "value", "{:,.2f}"), ("goal", "goal", "{}"),
                 ("", "result", "{}")], [{**v, "result": outcome(v["pass"])} for v in found], text_cols=1)


def main() -> None:
    parser = Parser(__doc__, "small store, 3 s wrk runs (about 2 minutes)", reps=(3, 2),
                    reps_help="repetitions of each timed part")
    parser.add_argument("--workdir", metavar="DIR", help="keep the store, SAE and index here (reused when they fit)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve rows")
    args = parser.parse()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    size = QUICK if args.quick else FULL
    bench = Run("bench_service", args)
    with tempfile.TemporaryDirectory(prefix="bench_service_", dir="/tmp") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        store_url, sae_dir = make_data(work, size["n_images"], size["d"])
        index_dir = work / "index"
        index = bench_index(store_url, sae_dir, index_dir, args.reps)
        script = work / "features.lua"
        script.write_text(LUA % (12345, D_SAE - 1))
        servers = [("uvicorn --workers 1", ["--workers", "1"], 30), ("uvicorn --workers 2 (default)", [], 30)]
        if not args.no_ray:
            servers.append(("ray serve", ["--ray"], 240))
        rows = []
        for name, extra, timeout_s in servers:
            rows += bench_server(name, ["--index", str(index_dir), *extra], work, script, size["duration_s"],
                                 args.reps, timeout_s)
    bench.stop()
    found = verdicts(rows, index)
    show_results(rows, index, found)
    print_notes(NOTES)
    if args.quick:
        print("quick: a smaller store and shorter runs; the goals are for the full run")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    bench.finish({"size": {**size, "d_sae": D_SAE, "k": K}, "goals": GOALS,
                  "machine": machine(torch_threads=torch.get_num_threads(), wrk=wrk_version,
                                     load_avg_start=bench.load_start[0], load_avg_end=bench.load_end),
                  "notes": list(NOTES), "index": index, "rows": rows, "verdicts": found})


if __name__ == "__main__":
    main()
