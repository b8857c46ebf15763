"""What every benchmark shares: its common options, its clock, the machine it ran on, its report and its printing.

A benchmark builds its options with `Parser` (adding its own), starts a `Run` where measuring starts, stops it
where measuring ends, prints its table (`print_table`), notes (`print_notes`) and verdicts (`print_verdict`), and
ends with `Run.finish`: the wall time line with the load average around it (other work on the machine skews every
figure) and, with --json, the report under the fields every benchmark writes (benchmark, quick, reps, wall_s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

Column = tuple[str, str, str]
"""(title, key in the row, format string); a None value prints as "-"."""


class Parser(argparse.ArgumentParser):
    """--quick, --json and, for a benchmark that repeats its measurements, --reps; each benchmark adds its own."""

    def __init__(self, doc: str, quick: str, reps: tuple[int, int] | None = None, reps_help: str = "") -> None:
        """doc: the benchmark's module docstring (its first paragraph describes it); quick: what --quick shrinks;
        reps: the default repetitions (full, quick), None for a benchmark without --reps."""
        super().__init__(description=doc.split("\n\n")[0])
        self.reps = reps
        self.add_argument("--quick", action="store_true", help=f"{quick}, same code path")
        self.add_argument("--json", metavar="PATH", help="write rows, verdicts and machine info as JSON")
        if reps is not None:
            self.add_argument("--reps", type=int, help=f"{reps_help} (median; default {reps[0]}, quick {reps[1]})")

    def parse(self) -> argparse.Namespace:
        """The options, with --reps resolved to the full or the quick default when not given."""
        args = self.parse_args()
        if self.reps is not None:
            full, quick = self.reps
            if args.reps is None:
                args.reps = quick if args.quick else full
            if args.reps < 1:
                self.error("--reps must be >= 1")
        return args


class Run:
    """The measuring part of one benchmark run: its wall time, and the load average at its start and stop."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.load_start, self.t0 = os.getloadavg(), time.perf_counter()
        self.wall_s = 0.0
        self.load_end = self.load_start

    def stop(self) -> None:
        self.wall_s, self.load_end = time.perf_counter() - self.t0, os.getloadavg()

    def finish(self, report: dict[str, Any]) -> None:
        """Print the wall time line; with --json, write {benchmark, quick, reps, wall_s} followed by `report`."""
        reps = getattr(self.args, "reps", None)
        mode = "quick" if self.args.quick else "full"

        def load(avg: tuple[float, float, float]) -> str:
            return " ".join(f"{v:.2f}" for v in avg)

        print(f"wall time {self.wall_s:.0f} s ({mode if reps is None else f'{reps} reps, {mode}'}); load average "
              f"(1, 5, 15 min) {load(self.load_start)} at the start, {load(self.load_end)} at the end, on "
              f"{os.cpu_count()} CPUs: other work on the machine skews the figures")
        if self.args.json:
            head = {"benchmark": self.name, "quick": self.args.quick, **({} if reps is None else {"reps": reps}),
                    "wall_s": self.wall_s}
            Path(self.args.json).write_text(json.dumps({**head, **report}, indent=2))


def machine(*modules: ModuleType, **extra: Any) -> dict[str, Any]:
    """The report's machine info: CPUs, platform, Python and torch, the versions of `modules`, then `extra`."""
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, **{m.__name__: m.__version__ for m in modules}, **extra}


def log(msg: str) -> None:
    """Progress, on stderr: stdout holds only the results."""
    print(msg, file=sys.stderr, flush=True)


def print_table(cols: Sequence[Column], rows: Sequence[dict[str, Any]], text_cols: int) -> None:
    """An aligned table: the first `text_cols` columns left-aligned, the numbers right-aligned."""
    cells = [[title for title, _, _ in cols]]
    cells += [["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in cols] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j < text_cols else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_notes(notes: Sequence[str]) -> None:
    """The notes that say how to read the table, after a blank line."""
    print()
    for note in notes:
        print(f"note: {note}")


def outcome(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_verdict(what: str, ok: bool, note: str = "") -> None:
    """One goal's line: what was measured against which goal, PASS or FAIL, and how far the run speaks for it."""
    print(f"verdict {what}: {outcome(ok)}{note}")


@contextmanager
def served(*args: str, wait_s: float = 120) -> Iterator[str]:
    """`actstore serve ARGS --port P` in a process of its own, up (GET /healthz answers 200); yields its URL, then
    stops it."""
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "actstore_cli", "serve", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not start: {proc.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def post_ms(url: str, bodies: Iterable[dict[str, Any]], warmups: int, timeout: float = 120) -> list[float]:
    """The latency (ms) of POSTing each body to `url` in turn, one client, the first `warmups` not kept."""
    import requests

    session, times = requests.Session(), []
    for i, body in enumerate(bodies):
        t0 = time.perf_counter()
        r = session.post(url, json=body, timeout=timeout)
        elapsed = 1e3 * (time.perf_counter() - t0)
        r.raise_for_status()
        if i >= warmups:
            times.append(elapsed)
    return times
