"""The cross-model comparison of two SAEs against one dense GEMM of the same shapes, and its peak memory.

Data: synthetic image-level activations of two SAEs of F features over N images (default 16,384 features,
50,000 images), float32 in memory: each feature fires on ~3% of the images; half of B's features are
noisy copies of A's (the planted shared features, at a random permutation), the rest independent.

Measured, in the same run:
- the comparison: services.compare.run.match_rows, everything `actstore compare` does after reading and
  encoding the stores (the streaming statistics pass with its cross products, Pearson, best matches both
  ways, mutual pairs, the sparse one-to-one assignment, the max_diff pass, top-k overlaps), fed the
  in-memory rows in blocks of 1,024 images;
- the reference: one dense float32 GEMM of the same shapes, A^T B (F x N) @ (N x F), on the same
  in-memory arrays (torch.mm).
Peak memory is the largest resident set size above the one before the step (sampled every 10 ms), against
the comparison's memory budget (`--memory-gb`; default half the machine): where the F_a x F_b matrix does not
fit it, the comparison computes it in tiles of A's features, one pass over the rows each, and the reference
GEMM runs in the same tiles (same FLOPs, the same memory). Goal: the comparison within 2x of the GEMM, its
peak within the budget. Also checked: the planted pairs are found (best match and Pearson > 0.9).

Run: .venv/bin/python benchmarks/bench_compare.py [--quick] [--json out.json] [--reps N]
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import scipy
import torch

from actstore.budget import MemoryBudget
from services.compare.run import match_rows, plan
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

BLOCK = 1024
"""Images per block fed to the comparison, as the store pass would hand them over."""
DENSITY = 0.03


class PeakRSS:
    """The largest resident set size seen while the block runs, above the one at its start (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.base = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self._stop = self.base, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above(self) -> int:
        return self.peak - self.base


def activations(n: int, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (n, f), B (n, f), perm): B[:, perm[j]] is a noisy copy of A[:, j] for j < f // 2."""
    g = torch.Generator().manual_seed(seed)
    xa, xb = torch.empty(n, f), torch.empty(n, f)
    perm = torch.randperm(f, generator=g)
    shared = f // 2
    for s in range(0, n, 4096):  # in slices: bounded temporaries
        e = min(n, s + 4096)
        for x in (xa, xb):
            u = torch.rand(e - s, f, generator=g)
            x[s:e] = torch.where(torch.rand(e - s, f, generator=g) < DENSITY, 3 * u, 0)
        noise = 0.1 * torch.rand(e - s, shared, generator=g)
        xb[s:e, perm[:shared]] = xa[s:e, :shared] * 1.5 + torch.where(xa[s:e, :shared] > 0, noise, 0)
    return xa, xb, perm


def timed(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return seconds, mem.above, out


def main() -> None:
    parser = Parser(__doc__, "2,048 features, 8,192 images", reps=(1, 3), reps_help="repetitions of each step")
    parser.add_argument("--features", type=int, help="features per SAE (default 16384, quick 2048)")
    parser.add_argument("--images", type=int, help="images (default 50000, quick 8192)")
    parser.add_argument("--memory-gb", type=float, help="the comparison's budget (default: half this machine's memory)")
    parser.add_argument("--candidates", type=int, default=32, help="assignment candidates per feature")
    args = parser.parse()
    f = args.features or (2048 if args.quick else 16384)
    n = args.images or (8192 if args.quick else 50_000)
    k = 16  # top images per feature (compare's default)
    log(f"generating {n} x {f} activations for both sides ({2 * n * f * 4 / 2**30:.1f} GiB)")
    xa, xb, perm = activations(n, f, seed=0)

    def rows(desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for s in range(0, n, BLOCK):
            yield xa[s:s + BLOCK], xb[s:s + BLOCK], torch.arange(s, min(n, s + BLOCK))

    pl = plan(f, f, k=k, candidates=args.candidates, memory_gb=args.memory_gb)
    bound = MemoryBudget.of(args.memory_gb).bytes

    def compare():
        return match_rows(rows, f, f, k=k, candidates=args.candidates, plan=pl, device=torch.device("cpu"))

    def gemm() -> None:
        """A^T B, in the comparison's tiles of A's features when the product does not fit its budget."""
        for s in range(0, f, pl.tile):
            torch.mm(xa[:, s:s + pl.tile].t(), xb)

    run = Run("bench_compare", args)
    ref, ours = [], []
    result = None
    for rep in range(args.reps):
        log(f"rep {rep + 1}/{args.reps}: GEMM")
        ref.append(timed(gemm)[:2])
        log(f"rep {rep + 1}/{args.reps}: comparison")
        seconds, peak, result = timed(compare)
        ours.append((seconds, peak))
    run.stop()
    flop = 2.0 * f * f * n
    t_ref, t_ours = statistics.median(s for s, _ in ref), statistics.median(s for s, _ in ours)
    m_ref, m_ours = max(m for _, m in ref), max(m for _, m in ours)
    tiles = -(-f // pl.tile)
    gemm_step = "dense GEMM A^T B (torch.mm, reference)" + (f", {tiles} tiles" if tiles > 1 else "")
    table = [{"step": gemm_step, "s": t_ref, "gflops": flop / t_ref / 1e9,
              "peak_mib": m_ref / 2**20, "budget_mib": None, "ratio": 1.0},
             {"step": "comparison (match_rows)", "s": t_ours, "gflops": flop / t_ours / 1e9, "peak_mib": m_ours / 2**20,
              "budget_mib": bound / 2**20, "ratio": t_ours / t_ref}]
    print(f"{f} features per SAE, {n} images, budget {bound / 2**30:.1f} GiB: {pl.rows_per_update} rows per update, "
          f"tiles of {pl.tile} features of A ({tiles} passes over the rows, + 1 for max_diff), "
          f"candidates {args.candidates}\n")
    print_table([("step", "step", "{}"), ("seconds", "s", "{:.2f}"), ("GFLOP/s", "gflops", "{:.1f}"),
                 ("peak MiB", "peak_mib", "{:.0f}"), ("budget MiB", "budget_mib", "{:.0f}"),
                 ("x GEMM time", "ratio", "{:.2f}")], table, text_cols=1)
    # the planted pairs: A's feature j < f/2 should find B's perm[j]
    m = result.matches
    shared = f // 2
    best = torch.full((f,), -1, dtype=torch.int64)
    best[m.live_a] = m.best_b
    sim = torch.zeros(f)
    sim[m.live_a] = m.sim_a
    found = float(((best[:shared] == perm[:shared]) & (sim[:shared] > 0.9)).float().mean())
    pairs = result.pairs.to_pydict()
    assigned = dict(zip(pairs["feature_a"], pairs["feature_b"]))
    assigned_ok = sum(assigned.get(j) == int(perm[j]) for j in range(shared)) / shared
    print_notes([f"planted shared pairs found as best match with Pearson > 0.9: {found:.1%}; "
                 f"assigned to their partner: {assigned_ok:.1%}",
                 f"live features A {m.live_a.numel()}, B {m.live_b.numel()}; mutual {int(m.mutual_a.sum())}; "
                 f"assignment pairs {len(pairs['feature_a'])}",
                 "peak = resident set above the step's start (the inputs are resident before both steps)"])
    print()
    scale = ("; the goal is set at full size: here the GEMM is small and the per-row passes weigh more"
             if args.quick else "")
    print_verdict("comparison within 2x of the GEMM", t_ours <= 2 * t_ref, f" ({t_ours / t_ref:.2f}x{scale})")
    print_verdict("comparison peak memory within its budget", m_ours <= bound,
                  f" ({m_ours / 2**20:.0f} of {bound / 2**20:.0f} MiB)")
    print_verdict("planted pairs found", found >= 0.99, f" ({found:.1%})")
    run.finish({"features": f, "images": n, "plan": asdict(pl), "candidates": args.candidates,
                "rows": table, "planted_found": found, "planted_assigned": assigned_ok, "bound_bytes": bound,
                "reps_seconds": {"gemm": [s for s, _ in ref], "comparison": [s for s, _ in ours]},
                "machine": machine(scipy)})


if __name__ == "__main__":
    main()
