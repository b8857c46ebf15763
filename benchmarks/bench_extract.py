"""Extraction throughput: the whole Ray Data job (decode, forward, write) against the pure forward pass.

On a generated shapes dataset (actstore.testing.shapes.generate_dataset, 256x256 PNGs, so that decoding and the
model's resize + crop do real work), this measures in one run, with the same model and batch size:

- end-to-end: `run_extract` into a fresh store (decode tasks -> forward actors -> write tasks), after Ray
  is started and a one-unit warm-up extraction (to a throwaway store) has warmed Ray's workers and imports.
  Reported as (a) wall images/s of the whole call and (b) steady-state images/s, from the first unit's
  completion to the last's: (n_images - first unit's images) / (last record's mtime - first record's
  mtime). Unit records are written last, so their mtimes are the units' completion times. The fixed cost
  (driver-side model load and store creation, actor start and model load, the first unit's latency, the
  final stats merge) is reported as run overhead = wall - n_images / steady;
- the reference: the same backbone in this process on already-decoded uint8 tensors (B, 3, H, W), timed
  forward calls under torch.inference_mode (torch.cuda.synchronize on a GPU) with the torch threads an
  extraction actor uses (on CPU: Ray's CPUs // actors). Half of the calls run before the extraction and
  half after, so that load from other processes hits both alike. With several GPUs, the job runs one
  actor per GPU, and the reference is one GPU's rate times their number.

Goal: steady-state end-to-end >= 0.9x the pure forward pass (decoders and writers never starve it).

Run: .venv/bin/python benchmarks/bench_extract.py [--quick] [--json out.json] [--model M] [--batch-size B]
     [--n-images N] [--images-per-shard S]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from actstore.cluster import init_ray
from actstore.extract import Backbone, BackboneConfig, ExtractConfig, load_backbone, run_extract
from actstore.store import ActivationStore, unit_record_key
from actstore.testing.shapes import generate_dataset
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

IMAGE_SIZE = 256
GOAL = 0.9
MIN_CALLS = 3
"""Forward calls of the reference on each side of the extraction, at least."""
FULL = {"model": "timm:vit_small_patch16_224", "n_images": 512, "images_per_shard": 64, "forward_s": 20.0}
QUICK = {"model": "timm:vit_tiny_patch16_224", "n_images": 128, "images_per_shard": 32, "forward_s": 6.0}
NOTES = (
    f"images: generated {IMAGE_SIZE}x{IMAGE_SIZE} PNGs; decode tasks run the model's own PIL resize + crop.",
    "steady img/s = (n_images - first unit's images) / (last unit record mtime - first unit record mtime).",
    "run overhead s = wall - n_images / steady: driver model load, store creation, actor start and model load, "
    "first unit latency, final stats merge. Ray start is separate (ray init s).",
    "forward img/s = B * calls / seconds of Backbone.forward on uint8 tensors already on the device, "
    "half the calls before the extraction and half after; times the number of forward actors (GPUs).",
)


@dataclass(frozen=True)
class Row:
    """One measured configuration; seconds and images/s."""

    model: str
    device: str
    batch_size: int
    images_per_shard: int
    n_images: int
    ray_init_s: float
    warmup_s: float
    wall_s: float
    first_unit_s: float
    unit_done_s: tuple[float, ...]
    """Completion time of each unit (record mtime) after the run_extract call, in completion order."""
    steady_s: float
    wall_ips: float
    steady_ips: float
    forward_ips: float
    forward_calls: int
    store_bytes: int

    @property
    def ratio(self) -> float:
        return self.steady_ips / self.forward_ips

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.n_images / self.steady_ips

    def metrics(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "overhead_s": self.overhead_s}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(backbone: Backbone, x: torch.Tensor, calls: int) -> float:
    """Seconds of `calls` forward passes on x (already on the backbone's device)."""
    with torch.inference_mode():
        sync(x.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            backbone(x)
        sync(x.device)
    return time.perf_counter() - t0


def extract(images: str, out: Path, args: argparse.Namespace, max_units: int | None = None) -> tuple[float, float]:
    """Run one extraction; returns (wall clock time.time() at the call, seconds of the call)."""
    cfg = ExtractConfig(images=images, model=args.model, out=str(out), batch_size=args.batch_size,
                        images_per_shard=args.images_per_shard, max_units=max_units)
    started, t0 = time.time(), time.perf_counter()
    result = run_extract(cfg, progress=False)
    seconds = time.perf_counter() - t0
    expected = args.images_per_shard if max_units else args.n_images
    if result.images_written != expected or result.n_rejected or result.complete != (max_units is None):
        raise RuntimeError(f"extraction to {out} went wrong: {result}")
    return started, seconds


def run(args: argparse.Namespace, forward_s: float) -> Row:
    with tempfile.TemporaryDirectory(prefix="bench_extract_", dir="/tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        images = str(tmp / "images")
        log(f"generating {args.n_images} {IMAGE_SIZE}x{IMAGE_SIZE} images")
        generate_dataset(images, args.n_images, seed=0, image_size=IMAGE_SIZE)

        t0 = time.perf_counter()
        init_ray(num_cpus=os.cpu_count())
        ray_init_s = time.perf_counter() - t0
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = max(1, gpus)  # as run_extract: one forward actor per GPU, one on a CPU-only cluster
        device = torch.device("cuda" if gpus else "cpu")
        if not gpus:
            torch.set_num_threads(max(1, cpus // actors))  # the actor's own setting
        name = (f"cuda {torch.cuda.get_device_name(0)} x{gpus}" if gpus
                else f"cpu ({torch.get_num_threads()} threads)")

        backbone = load_backbone(BackboneConfig(args.model)).to(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.batch_size, 3, *backbone.preprocessor.image_size), dtype=torch.uint8,
                          generator=gen).to(device)
        one = min(forward_seconds(backbone, x, 1) for _ in range(2))  # warm-up, and the calls' length
        half = max(MIN_CALLS, math.ceil(forward_s / 2 / one))
        log(f"forward reference on {name}: {half} calls of batch {args.batch_size} before the extraction")
        ref_s = forward_seconds(backbone, x, half)

        log("warm-up extraction (1 unit)")
        _, warmup_s = extract(images, tmp / "warmup", args, max_units=1)
        log(f"extraction of {args.n_images} images")
        out = tmp / "store"
        started, wall_s = extract(images, out, args)

        log(f"forward reference: {half} calls after the extraction")
        ref_s += forward_seconds(backbone, x, half)
        with ActivationStore(str(out)) as store:
            done = sorted((store.fs.info(f"{store.root}/{unit_record_key(k)}")["mtime"] - started, k)
                          for k in range(store.spec.n_units))
            first_start, first_stop = store.spec.unit_range(done[0][1])
            store_bytes = store.nbytes_stored()
        ray.shutdown()
    steady_s = done[-1][0] - done[0][0]
    return Row(model=args.model, device=name, batch_size=args.batch_size, images_per_shard=args.images_per_shard,
               n_images=args.n_images, ray_init_s=ray_init_s, warmup_s=warmup_s, wall_s=wall_s,
               first_unit_s=done[0][0], unit_done_s=tuple(t for t, _ in done), steady_s=steady_s,
               wall_ips=args.n_images / wall_s, steady_ips=(args.n_images - (first_stop - first_start)) / steady_s,
               forward_ips=actors * args.batch_size * 2 * half / ref_s, forward_calls=2 * half,
               store_bytes=store_bytes)


def show_results(rows: list[dict[str, Any]]) -> None:
    cols = [("model", "model", "{}"), ("device", "device", "{}"), ("batch", "batch_size", "{}"),
            ("images", "n_images", "{}"), ("e2e wall img/s", "wall_ips", "{:.1f}"),
            ("e2e steady img/s", "steady_ips", "{:.1f}"), ("forward img/s", "forward_ips", "{:.1f}"),
            ("steady/forward", "ratio", "{:.3f}"), ("ray init s", "ray_init_s", "{:.1f}"),
            ("run overhead s", "overhead_s", "{:.1f}"), ("wall s", "wall_s", "{:.1f}"),
            ("store MB", "store_bytes", "{:.1f}")]
    print_table(cols, [{**r, "store_bytes": r["store_bytes"] / 1e6} for r in rows], text_cols=2)


def main() -> None:
    parser = Parser(__doc__, "small model and dataset (about a minute)")
    parser.add_argument("--model", help=f"backbone (default {FULL['model']}; --quick: {QUICK['model']})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (both measurements)")
    parser.add_argument("--n-images", type=int,
                        help=f"dataset size (default {FULL['n_images']}; --quick: {QUICK['n_images']})")
    parser.add_argument("--images-per-shard", type=int, help=f"images per work unit (default "
                        f"{FULL['images_per_shard']}; --quick: {QUICK['images_per_shard']})")
    args = parser.parse()
    sizes = QUICK if args.quick else FULL
    for key in ("model", "n_images", "images_per_shard"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    if args.batch_size < 1 or args.images_per_shard < 1:
        parser.error("--batch-size and --images-per-shard must be >= 1")
    if args.n_images < 2 * args.images_per_shard:
        parser.error("--n-images must be at least 2 x --images-per-shard (steady state spans units 2..last)")
    bench = Run("bench_extract", args)
    rows = [run(args, sizes["forward_s"]).metrics()]
    bench.stop()
    show_results(rows)
    print_notes(NOTES)
    r = rows[0]
    ok = r["ratio"] >= GOAL
    print(f"units done at (s after the call): {' '.join(f'{t:.1f}' for t in r['unit_done_s'])}")
    print_verdict(f"{r['model']} batch {r['batch_size']} on {r['device']}: steady e2e {r['ratio']:.3f}x pure forward "
                  f"(goal >= {GOAL})", ok)
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    bench.finish({"image_size": IMAGE_SIZE,
                  "machine": machine(ray, cuda_device=cuda_device, loadavg_before=bench.load_start,
                                     loadavg_after=bench.load_end),
                  "notes": list(NOTES), "rows": rows,
                  "verdicts": [{"model": r["model"], "device": r["device"], "pass": ok, "ratio": r["ratio"],
                                "goal": GOAL}]})


if __name__ == "__main__":
    main()
