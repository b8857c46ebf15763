"""Comparing several models at once (`actstore compare --side ...`) against comparing every pair on its own.

Data: four planted single-layer stores over the same images (actstore.testing.synthetic.write_planted_models:
default 10,000 images of 4x4 patches, width 256; 48 concepts, each in a random non-empty subset of the models)
and a random TopK SAE on each (default 1,024 features, k 32), all float32 on local disk.

Measured, in the same run, each from the stores on disk to the written folders:
- the set: one `actstore compare --side` of the four (services.compare.run_compare), which reads every store
  once per pass for all six pairs when every pair's matrix fits its share of `--memory-gb` (two passes);
- the reference: the six two-sided comparisons `actstore compare --a I --b J`, one after another, each
  reading and encoding its two stores in its own two passes (what one runs today without --side).
Goal: the set faster than the six pairs, and every pair's tables equal to the pair compared on its own (bit for bit
where the set gives the pair the same staging and tiles; else every feature's best Pearson within 1e-4).
A tighter budget for wider SAEs (e.g. --features 8192 --images 2000 --memory-gb 2) cuts every pair's matrix into
tiles, all the pairs read together once per tile.

Run: .venv/bin/python benchmarks/bench_compare_many.py [--quick] [--json out.json] [--reps N]
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from actstore.testing.synthetic import write_planted_models
from services.compare import CompareConfig, read_comparison, run_compare
from services.steer.setup import random_sae
from _common import Parser, Run, log, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

MODELS = ("clip", "siglip", "dino", "vjepa")
TABLES = ("matches_a.parquet", "matches_b.parquet", "assignment.parquet")


def build(root: Path, n: int, width: int, features: int) -> list[str]:
    """The four planted stores and their SAEs under root; the sides as SAE_DIR@STORE, in MODELS order."""
    rng = np.random.default_rng(0)
    concepts = []
    for _ in range(48):
        picked = tuple(m for m in MODELS if rng.random() < 0.5)
        concepts.append(picked or (MODELS[int(rng.integers(len(MODELS)))],))
    write_planted_models({m: str(root / m) for m in MODELS}, concepts, n_images=n, grid=(4, 4), d=width)
    return [f"{random_sae(str(root / m), '0', str(root / f'sae-{m}'), d_sae=features, k=32)}@{root / m}"
            for m in MODELS]


def main() -> None:
    parser = Parser(__doc__, "2,000 images, 256 features", reps=(3, 1), reps_help="repetitions of each step")
    parser.add_argument("--images", type=int, help="images (default 10000, quick 2000)")
    parser.add_argument("--features", type=int, help="features per SAE (default 1024, quick 256)")
    parser.add_argument("--width", type=int, default=256, help="each store's activation width")
    parser.add_argument("--memory-gb", type=float, default=1.0, help="the comparisons' budget (both steps)")
    args = parser.parse()
    n = args.images or (2000 if args.quick else 10_000)
    f = args.features or (256 if args.quick else 1024)
    with tempfile.TemporaryDirectory(prefix="bench_compare_many_") as tmp:
        root = Path(tmp)
        log(f"writing four planted stores ({n} images x 16 patches x {args.width}) and their SAEs ({f} features)")
        sides = build(root, n, args.width, f)
        pairs = list(itertools.combinations(range(len(sides)), 2))

        def the_set(rep: int) -> dict:
            return run_compare(CompareConfig(out=str(root / f"set-{rep}"), side=tuple(sides), name=MODELS,
                                             memory_gb=args.memory_gb), progress=False)

        def one_by_one(rep: int) -> int:
            """The six pairs compared one after another; returns their passes over the stores, all together."""
            return sum(run_compare(CompareConfig(out=str(root / f"pairs-{rep}" / f"{i + 1}-{j + 1}"), a=sides[i],
                                                 b=sides[j], memory_gb=args.memory_gb), progress=False
                                   )["plan"]["passes"] for i, j in pairs)

        run = Run("bench_compare_many", args)
        ref, ours, summary, passes = [], [], {}, 0
        for rep in range(args.reps):
            log(f"rep {rep + 1}/{args.reps}: six pairs one by one")
            start = time.perf_counter()
            passes = one_by_one(rep)
            ref.append(time.perf_counter() - start)
            log(f"rep {rep + 1}/{args.reps}: one comparison of the four")
            start = time.perf_counter()
            summary = the_set(rep)
            ours.append(time.perf_counter() - start)
        run.stop()
        equal, same_plans, diff, flipped = True, True, 0.0, 0
        for p, (i, j) in zip(summary["pairs"], pairs):
            mine, alone = root / "set-0" / "pairs" / f"{i + 1}-{j + 1}", root / "pairs-0" / f"{i + 1}-{j + 1}"
            same_plans &= {k: v for k, v in p["plan"].items() if k != "images_per_block"} == {
                k: v for k, v in read_comparison(alone)["plan"].items() if k != "images_per_block"}
            for t in TABLES:
                x, y = pq.read_table(mine / t), pq.read_table(alone / t)
                equal &= x.equals(y)
                if t != "assignment.parquet":  # the assignment's order may swap near ties
                    flipped += int((x.column(1).to_numpy() != y.column(1).to_numpy()).sum())
                    diff = max(diff, float(np.abs(x.column("pearson").to_numpy() - y.column("pearson").to_numpy())
                                           .max(initial=0)))
    t_ref, t_ours = statistics.median(ref), statistics.median(ours)
    table = [{"step": "six two-sided compares, one by one (reference)", "s": t_ref, "passes": passes,
              "ratio": 1.0},
             {"step": "one compare --side of the four", "s": t_ours, "passes": summary["passes"],
              "ratio": t_ours / t_ref}]
    print(f"4 models, {n} images x 16 patches, width {args.width}, SAEs of {f} features, "
          f"budget {args.memory_gb} GB: joint = {summary['joint']}\n")
    print_table([("step", "step", "{}"), ("seconds", "s", "{:.2f}"), ("passes", "passes", "{}"),
                 ("x reference", "ratio", "{:.2f}")], table, text_cols=1)
    print_notes([f"median of {args.reps}; each step from the stores on disk to its written folders",
                 "passes: passes over the stores (a pair's pass reads its two stores, the set's reads all four)"])
    print()
    print_verdict("the four at once faster than the six pairs", t_ours < t_ref, f" ({t_ref / t_ours:.2f}x)")
    if same_plans:
        print_verdict("every pair's tables equal its own comparison's (same staging and tiles)", equal)
    else:
        print_verdict("every feature's best Pearson as in its pair's own comparison within 1e-4 (other staging or "
                      "tiles: float32 rounding)", diff <= 1e-4,
                      f" (largest difference {diff:.1e}; best partners swapped between near ties: {flipped})")
    run.finish({"images": n, "features": f, "width": args.width, "memory_gb": args.memory_gb,
                "joint": summary["joint"], "rows": table, "tables_equal": equal, "same_plans": same_plans,
                "best_partners_swapped": flipped, "max_pearson_difference": diff,
                "seconds_reference": ref, "seconds_set": ours})


if __name__ == "__main__":
    main()
