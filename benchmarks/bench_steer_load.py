"""Steering under load: GET /features/{id} while 32 clients steer at once, the 429s that bound them, and a steering
request right after that burst against the same request alone.

Data: generated shapes through a tiny random LLaVA (actstore.testing.tiny_vlm, the tests' VLM) at the tower layer
its language model reads, a random TopK SAE (d_sae 256, k 8) behind the store's normalization, its feature index.

Service: `actstore serve --index DIR --steer vlm --workers 1 --steer-timeout 0.25` as a separate process (uvicorn,
one worker: all the load on one event loop), serve's default slots, Retry-After, threads and nice unless given. The bound
sits between the two requests' times: the short one (~30 ms here) fits it, the slow one (~450 ms) never does.

Phases (the /features client is a process of its own, so that the steering clients' threads cannot delay it):
  unloaded   one client GETs /features/<random id> back to back for D seconds: p50, p99
  alone      the short steering request (2 answers of up to 8 tokens, 4 edits), one at a time: median of R
  loaded     32 clients POST the slow steering request (10 answers of up to 128 tokens to a 1,000-character prompt),
             each again as soon as it is answered (after a 429, once its Retry-After has passed), for D seconds,
             while one client GETs /features as above; counts of 200, 429 and 503
  after      the moment every one of the 32 has its last answer: the short steering request once
Goals: /features p99 loaded <= 2x unloaded; the short request after the burst <= 1.5x alone ("about as fast").

Run: .venv/bin/python benchmarks/bench_steer_load.py [--quick] [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import requests

from _common import Parser, Run, log, machine, outcome, print_notes, print_table  # benchmarks/ is sys.path[0]

CLIENTS = 32
FULL = {"n_images": 32, "duration_s": 20.0, "alone_reps": 7}
QUICK = {"n_images": 8, "duration_s": 6.0, "alone_reps": 3}
GOALS = {"features_p99_ratio": 2.0, "after_burst_ratio": 1.5}
PROMPT = "What is in the picture?"
LONG_PROMPT = ("Describe the picture in every detail. " * 30)[:1000]
NOTES = (
    "latencies are client-side (requests, keep-alive sessions), the server and the clients on the same CPUs; the "
    "/features client is a process of its own",
    "slow request: 10 answers of up to 128 tokens to a 1,000-character prompt, before and after: past the bound, so "
    "it is stopped at its next token and answered 503 (its slot free when the answer comes); short request: 2 "
    "answers of up to 8 tokens",
    "a client answered 429 waits its Retry-After; the others post again at once",
    "after burst: the short request sent when all 32 clients have their last answer, against its median alone",
)


# data --------------------------------------------------------------------------------------------

def make_data(work: Path, n_images: int) -> Path:
    """The index of a random SAE on the tiny LLaVA's feature layer over n_images shapes (reused if present)."""
    index = work / "index"
    if (index / "index.json").exists():
        log(f"reusing {index}")
        return index
    from actstore.extract import ExtractConfig, run_extract
    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from actstore.testing.shapes import generate_dataset
    from actstore.testing.tiny_vlm import write_tiny_llava
    from sae import SAEConfig, SparseAutoencoder, checkpoint
    from services.index import IndexConfig, build_index

    log(f"building {n_images} images through a tiny LLaVA, a random SAE and its index in {work}")
    folder = write_tiny_llava(str(work / "llava"), seed=3)
    generate_dataset(str(work / "images"), n_images, seed=1, image_size=64)
    run_extract(ExtractConfig(images=str(work / "images"), model=f"hf:{folder}", out=str(work / "store"), layers=(-2,),
                              batch_size=16, images_per_shard=16), progress=False)
    store = ActivationStore(str(work / "store"))
    layer = store.layers[0].name
    norm = Normalization.from_stats(store.stats(layer, "patches"), layer, "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=store.layer(layer).d, d_sae=256, kind="topk", k=8))
    checkpoint.save(sae, str(work / "sae"), normalization=norm, extra=checkpoint.origin(store, layer))
    return build_index(IndexConfig(str(work / "store"), str(work / "sae"), str(index), k=8), progress=False)


# the service and its clients -----------------------------------------------------------------------

class Service:
    """`actstore serve` with one worker and a vlm head, as a separate process."""

    def __init__(self, index: Path, options: list[str], log_path: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "actstore_cli", "serve", "--index", str(index), "--port", str(port),
               "--workers", "1", "--steer", "vlm", *options]
        self.command = " ".join(cmd[1:])
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{self.command} did not come up; its log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def steer_body(edits: list[dict[str, Any]], slow: bool, seed: int = 0) -> dict[str, Any]:
    size = ({"responses": 10, "max_new_tokens": 128, "prompt": LONG_PROMPT} if slow else
            {"responses": 2, "max_new_tokens": 8, "prompt": PROMPT})
    return {"image": seed % 4, "head": "vlm", "edits": edits, "seed": seed, **size}


def probe_features(url: str, duration_s: float, n_features: int) -> list[float]:
    """GET /features/<random id> back to back for duration_s: the latencies in ms."""
    rng = np.random.default_rng(0)
    session, times = requests.Session(), []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        r = session.get(f"{url}/features/{int(rng.integers(n_features))}", timeout=30)
        times.append(1e3 * (time.perf_counter() - t0))
        r.raise_for_status()
    return times


def prober(url: str, duration_s: float, n_features: int) -> concurrent.futures.Future:
    """probe_features in a process of its own (started now)."""
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    done = pool.submit(probe_features, url, duration_s, n_features)
    pool.shutdown(wait=False)
    return done


def steer_once(session: requests.Session, url: str, body: dict[str, Any]) -> tuple[int, float, requests.Response]:
    t0 = time.perf_counter()
    r = session.post(f"{url}/steer", json=body, timeout=300)
    return r.status_code, 1e3 * (time.perf_counter() - t0), r


def burst(url: str, edits: list[dict[str, Any]], duration_s: float) -> tuple[Counter, list[float]]:
    """CLIENTS threads posting the slow request for duration_s (a 429 waits its Retry-After); returns the statuses
    and each client's time from the end of the window to its last answer."""
    statuses: Counter = Counter()
    lock, end = threading.Lock(), time.perf_counter() + duration_s
    overrun: list[float] = []

    def client(i: int) -> None:
        session, seed = requests.Session(), i
        while time.perf_counter() < end:
            try:
                status, _, r = steer_once(session, url, steer_body(edits, slow=True, seed=seed))
            except requests.ConnectionError as e:  # counted with the other answers, and said once
                status, r = 0, None
                if not statuses[0]:
                    print(f"a steering client's connection failed: {e}", flush=True)
            seed += CLIENTS
            with lock:
                statuses[status] += 1
                if status not in (0, 200, 429, 503) and statuses[status] == 1:
                    print(f"a steering request was answered {status}: {r.text[:300]}", flush=True)
            if status == 429:
                time.sleep(min(float(r.headers.get("Retry-After", 1)), max(0.0, end - time.perf_counter())))
        with lock:
            overrun.append(time.perf_counter() - end)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, overrun


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# the run -----------------------------------------------------------------------------------------

def measure(url: str, size: dict[str, Any], n_features: int) -> dict[str, Any]:
    session, deadline = requests.Session(), time.monotonic() + 300
    while (r := session.get(f"{url}/steer/heads", timeout=300)).status_code == 503:  # loading, past the bound
        assert time.monotonic() < deadline, r.text
    assert r.status_code == 200, r.text
    heads = r.json()
    patch = session.get(f"{url}/images/0/patches/5", timeout=60).json()["features"]
    edits = [{"feature": f["feature"], "op": "add", "value": 20.0, "where": "all"} for f in patch[:4]]
    warm = [steer_once(session, url, steer_body(edits, slow=False))[0] for _ in range(5)]  # the first is slow
    assert warm[-2:] == [200, 200], f"the short steering request does not fit the bound: {warm}"
    prober(url, 1.0, n_features).result()

    log(f"unloaded: /features for {size['duration_s']:g} s")
    unloaded = prober(url, size["duration_s"], n_features).result()
    log(f"alone: the short steering request x {size['alone_reps']}")
    alone, alone_statuses = [], Counter()
    for _ in range(size["alone_reps"]):
        status, ms, _ = steer_once(session, url, steer_body(edits, slow=False))
        alone.append(ms)
        alone_statuses[status] += 1

    log(f"loaded: {CLIENTS} clients steering for {size['duration_s']:g} s, /features alongside")
    probing = prober(url, size["duration_s"], n_features)
    statuses, overrun = burst(url, edits, size["duration_s"])
    loaded = probing.result()
    after_status, after_ms, _ = steer_once(session, url, steer_body(edits, slow=False))
    health = session.get(f"{url}/healthz", timeout=30).json()
    return {"heads": heads, "unloaded": unloaded, "loaded": loaded, "alone": alone, "after_ms": after_ms,
            "alone_statuses": dict(alone_statuses), "after_status": after_status, "statuses": dict(statuses),
            "last_answer_after_window_s": max(overrun), "health": health}


def main() -> None:
    parser = Parser(__doc__, "8 images, 6 s phases")
    parser.add_argument("--workdir", help="build the data here (reused when present; default: a temporary folder)")
    parser.add_argument("--steer-timeout", type=float, default=0.25, help="the service's bound (s; default 0.25)")
    parser.add_argument("--steer-slots", type=int, help="the service's slots per worker (default: serve's)")
    parser.add_argument("--steer-retry-after", type=int, help="the 429's Retry-After (default: serve's)")
    parser.add_argument("--steer-threads", type=int, help="torch threads of the worker (default: serve's)")
    parser.add_argument("--steer-nice", type=int, help="the steering process's nice value (default: serve's)")
    args = parser.parse()
    size = QUICK if args.quick else FULL
    options = ["--steer-timeout", str(args.steer_timeout)]
    for flag in ("steer_slots", "steer_retry_after", "steer_threads", "steer_nice"):
        if getattr(args, flag) is not None:
            options += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    with tempfile.TemporaryDirectory(prefix="bench_steer_load_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        index = make_data(work, size["n_images"])
        run = Run("bench_steer_load", args)
        service = Service(index, options, work / "serve.log")
        try:
            n_features = requests.get(f"{service.url}/healthz", timeout=10).json()["n_features"]
            got = measure(service.url, size, n_features)
        finally:
            service.stop()
        run.stop()

    unloaded, loaded, alone = got["unloaded"], got["loaded"], got["alone"]
    rows = [{"what": "GET /features/{id} unloaded", "n": len(unloaded), "p50": percentile(unloaded, 50),
             "p99": percentile(unloaded, 99), "ratio": None},
            {"what": f"GET /features/{{id}} under {CLIENTS} steering clients", "n": len(loaded),
             "p50": percentile(loaded, 50), "p99": percentile(loaded, 99),
             "ratio": percentile(loaded, 99) / percentile(unloaded, 99)},
            {"what": "POST /steer short, alone (median)", "n": len(alone), "p50": statistics.median(alone),
             "p99": max(alone), "ratio": None},
            {"what": "POST /steer short, right after the burst", "n": 1, "p50": got["after_ms"], "p99": got["after_ms"],
             "ratio": got["after_ms"] / statistics.median(alone)}]
    statuses = got["statuses"]
    heads = got["heads"]
    print(f"Steering under load: `actstore serve --steer vlm --workers 1` ({heads['slots']} slots, "
          f"{heads['timeout_s']:g} s bound, device {heads['device']}), {CLIENTS} clients for {size['duration_s']:g} s")
    print_table([("", "what", "{}"), ("requests", "n", "{}"), ("p50 ms", "p50", "{:.1f}"), ("p99 ms", "p99", "{:.1f}"),
                 ("ratio", "ratio", "{:.2f}x")], rows, 1)
    print()
    print(f"steering answers during the burst: {statuses.get(200, 0)} x 200, {statuses.get(429, 0)} x 429, "
          f"{statuses.get(503, 0)} x 503, other {sum(v for k, v in statuses.items() if k not in (200, 429, 503))}; "
          f"the last came {got['last_answer_after_window_s']:.2f} s after the window closed")
    print(f"the short request's statuses: alone {got['alone_statuses']}, right after the burst {got['after_status']}")
    found = [{"what": "/features p99 under load / unloaded", "value": rows[1]["ratio"],
              "goal": f"<= {GOALS['features_p99_ratio']:g}", "pass": rows[1]["ratio"] <= GOALS["features_p99_ratio"]},
             {"what": "short steering after the burst / alone (a 200)", "value": rows[3]["ratio"],
              "goal": f"<= {GOALS['after_burst_ratio']:g}",
              "pass": got["after_status"] == 200 and rows[3]["ratio"] <= GOALS["after_burst_ratio"]}]
    print()
    print_table([("verdict", "what", "{}"), ("value", "value", "{:.2f}"), ("goal", "goal", "{}"),
                 ("", "result", "{}")], [{**v, "result": outcome(v["pass"])} for v in found], 1)
    print_notes(NOTES)
    if args.quick:
        print("quick: fewer images and shorter phases; the goals are for the full run")
    run.finish({"size": size, "clients": CLIENTS, "goals": GOALS, "service": service.command, "rows": rows,
                "statuses": statuses, "alone_statuses": got["alone_statuses"], "after_status": got["after_status"],
                "health_after": got["health"], "verdicts": found,
                "last_answer_after_window_s": got["last_answer_after_window_s"], "machine": machine()})


if __name__ == "__main__":
    main()
