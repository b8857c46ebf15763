"""Extraction throughput: the whole Ray Data job against the pure forward pass, and each dataset format (parquet,
WebDataset tar shards) against the same JPEGs as loose files.

One run generates ImageNet-like JPEGs once (actstore.testing.shapes.generate_dataset at 384x384, seeded noise added
so that they encode at quality 90 to tens of KB, as photos do, in class folders) and writes the same bytes three
ways, each cut into FILES files so that some units read from two:

- folder: <class>/<name>.jpg, the reference;
- parquet: files written by `datasets` (Image + ClassLabel features, Dataset.to_parquet with its default row
  groups: up to 100 MB, so one row group a file here);
- tar: WebDataset shards written by webdataset.TarWriter (<key>.jpg and <key>.cls).

It measures, with the same model and batch size:

- manifest s: build_manifest of each format (a folder lists files; parquet reads footers and the label column; tar
  walks every member header, one small read a sample);
- read + decode images/s, in this process: what one decode task (one thread) does, unit by unit
  (images_per_shard consecutive images): read_bytes, then decode_image and the model's Preprocessor, as
  extract/job.py's _decode_unit; read and decode + preprocess are also timed apart, and the bytes read are counted
  (/proc/self/io rchar) against the images' own bytes. The formats take turns (folder, parquet, tar, then parquet,
  tar, folder, ...) --reps times, so that other load hits all alike; medians;
- end-to-end: `run_extract` of each format into a fresh store (decode tasks -> forward actors -> write tasks),
  after Ray is started and a one-unit warm-up extraction of each format (to a throwaway store) has warmed Ray's
  workers and imports, formats taking turns as above for ROUNDS rounds. Reported as (a) wall images/s of the call and
  (b) steady-state images/s, from the first unit's completion to the last's: (n_images - first unit's images) /
  (last record's mtime - first record's mtime). Unit records are written last, so their mtimes are the units'
  completion times. The fixed cost (driver-side model load and store creation, actor start and model load, the
  first unit's latency, the final stats merge) is reported as run overhead = wall - n_images / steady. Every
  format's store must equal the folder's value for value (activations bit for bit, labels, sizes, status, class
  names): else the benchmark stops with an error;
- the reference: the same backbone in this process on already-decoded uint8 tensors (B, 3, H, W), timed forward
  calls under torch.inference_mode (torch.cuda.synchronize on a GPU) with the torch threads an extraction actor
  uses (on CPU: Ray's CPUs // actors). Half of the calls run before the extractions and half after, so that load
  from other processes hits both alike. With several GPUs, the job runs one actor per GPU, and the reference is one
  GPU's rate times their number.

Goals: the folder's steady-state end-to-end >= 0.9x the pure forward pass (decoders and writers never starve it);
parquet and tar >= 0.95x the folder, in read + decode and in steady end-to-end ("no slower", within a shared
machine's noise).

Run: .venv/bin/python benchmarks/bench_extract.py [--quick] [--json out.json] [--reps R] [--model M]
     [--batch-size B] [--n-images N] [--images-per-shard S]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from actstore.cluster import init_ray
from actstore.extract import Backbone, BackboneConfig, ExtractConfig, load_backbone, run_extract
from actstore.extract.decode import DEFAULT_MAX_PIXELS, decode_image
from actstore.extract.preprocess import Preprocessor
from actstore.extract.sources import build_manifest, read_bytes
from actstore.store import ActivationStore, unit_record_key
from actstore.testing.shapes import generate_dataset
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

IMAGE_SIZE = 384
NOISE = 20.0
"""Standard deviation of the Gaussian noise added to each pixel: it makes the JPEGs photo-sized (see the table)."""
JPEG_QUALITY = 90
FILES = 3
"""Parquet files and tar shards; the images are cut into this many nearly equal runs."""
FORMATS = ("folder", "parquet", "tar")
GOAL = 0.9
FORMAT_GOAL = 0.95
MIN_CALLS = 3
"""Forward calls of the reference on each side of the extractions, at least."""
ROUNDS = 3
"""End-to-end extractions of each format, formats taking turns."""
FULL = {"model": "timm:vit_small_patch16_224", "n_images": 512, "images_per_shard": 64, "forward_s": 20.0}
QUICK = {"model": "timm:vit_tiny_patch16_224", "n_images": 128, "images_per_shard": 32, "forward_s": 6.0}
NOTES = (
    f"images: generated {IMAGE_SIZE}x{IMAGE_SIZE} shapes, noise sd {NOISE:g}, JPEG quality {JPEG_QUALITY}; the same "
    f"bytes in every format, {FILES} parquet files / tar shards; every file sits in the page cache (local disk), so "
    "reads cost copies and parsing, not the disk or the network.",
    "read + decode: one thread, unit by unit, as a decode task: read_bytes, decode_image, the model's Preprocessor; "
    "medians over the reps, formats taking turns. read MB / image MB: bytes read (/proc/self/io rchar) over the "
    "images' own bytes: a parquet unit streams each row group holding its rows from the group's start to its last "
    "row (datasets' default groups: up to 100 MB, one a file here); a tar unit reads its members as one span a "
    "shard, headers and cls members included.",
    "manifest s: build_manifest; parquet reads each file's footer and label column, tar walks every member header "
    "(one small read a sample), a folder lists its files.",
    "steady img/s = (n_images - first unit's images) / (last unit record mtime - first unit record mtime); median "
    "over the rounds.",
    "run overhead s = wall - n_images / steady: driver model load, store creation, actor start and model load, "
    "first unit latency, final stats merge. Ray start is separate (ray init s).",
    "forward img/s = B * calls / seconds of Backbone.forward on uint8 tensors already on the device, "
    "half the calls before the extractions and half after; times the number of forward actors (GPUs).",
)


@dataclass(frozen=True)
class Formats:
    """The generated images, written in every format."""

    sources: dict[str, str]
    """Format -> the source given to build_manifest and run_extract."""
    options: dict[str, dict[str, str]]
    """Format -> its build_manifest / ExtractConfig options (tar: the class names file, as cls holds integers)."""
    image_bytes: int
    """Sum of the JPEGs' sizes."""
    rows_per_group: float
    """Mean rows a parquet row group."""


@dataclass(frozen=True)
class Extraction:
    """One timed run_extract; seconds after the call and images/s."""

    wall_s: float
    first_unit_s: float
    unit_done_s: tuple[float, ...]
    """Completion time of each unit (record mtime) after the run_extract call, in completion order."""
    steady_s: float
    wall_ips: float
    steady_ips: float


@dataclass(frozen=True)
class Row:
    """One format: its listing, read + decode and end-to-end figures (seconds, images/s, bytes)."""

    format: str
    model: str
    device: str
    batch_size: int
    images_per_shard: int
    n_images: int
    files: int
    image_bytes: int
    manifest_s: float
    read_ips: float
    decode_ips: float
    read_decode_ips: float
    read_bytes: int
    """Bytes read by one pass over every unit."""
    ray_init_s: float
    warmup_s: float
    extractions: tuple[Extraction, ...]
    """One a round."""
    forward_ips: float
    forward_calls: int
    store_bytes: int

    @property
    def steady_ips(self) -> float:
        return statistics.median(e.steady_ips for e in self.extractions)

    @property
    def wall_ips(self) -> float:
        return statistics.median(e.wall_ips for e in self.extractions)

    @property
    def wall_s(self) -> float:
        return statistics.median(e.wall_s for e in self.extractions)

    @property
    def ratio(self) -> float:
        return self.steady_ips / self.forward_ips

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.n_images / self.steady_ips

    def metrics(self) -> dict[str, Any]:
        return {**asdict(self), "steady_ips": self.steady_ips, "wall_ips": self.wall_ips, "wall_s": self.wall_s,
                "ratio": self.ratio, "overhead_s": self.overhead_s, "read_amplification": self.read_bytes /
                self.image_bytes}


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


def write_formats(tmp: Path, n_images: int) -> Formats:
    """JPEGs in class folders, then the same bytes as parquet files (`datasets`) and tar shards (webdataset)."""
    import datasets
    import webdataset as wds

    generate_dataset(str(tmp / "png"), n_images, seed=0, image_size=IMAGE_SIZE)
    pngs = build_manifest(str(tmp / "png"))
    for k, (uri, blob) in enumerate(zip(pngs.uris, read_bytes(pngs.uris))):
        pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.float32)
        pixels += np.random.default_rng(k).normal(0.0, NOISE, pixels.shape)
        path = tmp / "folder" / Path(uri).relative_to(tmp / "png").with_suffix(".jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
    folder = build_manifest(str(tmp / "folder"))
    blobs, labels = read_bytes(folder.uris), folder.labels.tolist()
    parts = np.array_split(np.arange(n_images), FILES)

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.class_names)})
    (tmp / "parquet").mkdir()
    (tmp / "tar").mkdir()
    for k, part in enumerate(parts):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": blobs[i], "path": Path(folder.uris[i]).name}
                                                   for i in part], "label": [labels[i] for i in part]},
                                        features=features)
        ds.to_parquet(str(tmp / "parquet" / f"train-{k:05d}-of-{FILES:05d}.parquet"))
        with wds.TarWriter(str(tmp / "tar" / f"train-{k:04d}.tar")) as w:
            for i in part:
                uri = Path(folder.uris[i])
                w.write({"__key__": f"{uri.parent.name}_{uri.stem}", "jpg": blobs[i], "cls": labels[i]})

    (tmp / "classes.txt").write_text("\n".join(folder.class_names) + "\n")
    sources = {fmt: str(tmp / fmt) for fmt in FORMATS}
    options = {fmt: {"class_names": str(tmp / "classes.txt")} if fmt == "tar" else {} for fmt in FORMATS}
    for fmt in FORMATS[1:]:  # every format lists the folder's images, in its order, with its labels
        m = build_manifest(sources[fmt], **options[fmt])
        if read_bytes(m.uris) != blobs or (m.labels.tolist(), m.class_names) != (labels, folder.class_names):
            raise RuntimeError(f"{fmt}: the manifest does not list the folder's images in its order")
    groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in (tmp / "parquet").iterdir())
    return Formats(sources, options, sum(len(b) for b in blobs), n_images / groups)


def turns(k: int) -> tuple[str, ...]:
    """The formats in the order of round k: each round starts one later, so that none always runs first."""
    return FORMATS[k % len(FORMATS):] + FORMATS[:k % len(FORMATS)]


def rchar() -> int:
    """Bytes this process has read so far (read syscalls, page cache hits included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def decode_pass(uris: list[str], preprocessor: Preprocessor, unit: int) -> tuple[float, float, int]:
    """(seconds reading, seconds decoding + preprocessing, bytes read) of every unit of `uris`, as a decode task."""
    read_s = decode_s = 0.0
    nbytes = 0
    for start in range(0, len(uris), unit):
        c0, t0 = rchar(), time.perf_counter()
        blobs = read_bytes(uris[start:start + unit])
        t1 = time.perf_counter()
        nbytes += rchar() - c0
        for blob in blobs:
            img = decode_image(blob, DEFAULT_MAX_PIXELS)
            if img.image is None:
                raise RuntimeError(f"image {start}: {img.reason}")
            preprocessor(img.image).numpy()
        read_s, decode_s = read_s + t1 - t0, decode_s + time.perf_counter() - t1
    return read_s, decode_s, nbytes


def read_decode(data: Formats, preprocessor: Preprocessor, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per format: manifest seconds, read / decode / read + decode images/s (medians over the reps, formats taking
    turns) and the bytes one pass reads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a decode task's: Ray gives a 1-CPU task one OMP thread
    runs: dict[str, list[tuple[float, float, float, int]]] = {fmt: [] for fmt in FORMATS}
    for rep in range(args.reps):
        log(f"manifest + read + decode, rep {rep + 1}/{args.reps}")
        for fmt in turns(rep):
            t0 = time.perf_counter()
            uris = build_manifest(data.sources[fmt], **data.options[fmt]).uris
            manifest_s = time.perf_counter() - t0
            runs[fmt].append((manifest_s, *decode_pass(uris, preprocessor, args.images_per_shard)))
    torch.set_num_threads(threads)
    n = args.n_images
    return {fmt: {"manifest_s": statistics.median(r[0] for r in rs),
                  "read_ips": statistics.median(n / r[1] for r in rs),
                  "decode_ips": statistics.median(n / r[2] for r in rs),
                  "read_decode_ips": statistics.median(n / (r[1] + r[2]) for r in rs),
                  "read_bytes": int(statistics.median(r[3] for r in rs))} for fmt, rs in runs.items()}


def extract(data: Formats, fmt: str, out: Path, args: argparse.Namespace,
            max_units: int | None = None) -> tuple[float, float]:
    """Run one extraction; returns (wall clock time.time() at the call, seconds of the call)."""
    cfg = ExtractConfig(images=data.sources[fmt], model=args.model, out=str(out), batch_size=args.batch_size,
                        images_per_shard=args.images_per_shard, max_units=max_units, **data.options[fmt])
    started, t0 = time.time(), time.perf_counter()
    result = run_extract(cfg, progress=False)
    seconds = time.perf_counter() - t0
    expected = args.images_per_shard if max_units else args.n_images
    if result.images_written != expected or result.n_rejected or result.complete != (max_units is None):
        raise RuntimeError(f"extraction to {out} went wrong: {result}")
    return started, seconds


def timed_extract(data: Formats, fmt: str, out: Path, args: argparse.Namespace) -> Extraction:
    started, wall_s = extract(data, fmt, out, args)
    with ActivationStore(str(out)) as store:
        done = sorted((store.fs.info(f"{store.root}/{unit_record_key(k)}")["mtime"] - started, k)
                      for k in range(store.spec.n_units))
        first_start, first_stop = store.spec.unit_range(done[0][1])
    steady_s = done[-1][0] - done[0][0]
    return Extraction(wall_s=wall_s, first_unit_s=done[0][0], unit_done_s=tuple(t for t, _ in done),
                      steady_s=steady_s, wall_ips=args.n_images / wall_s,
                      steady_ips=(args.n_images - (first_stop - first_start)) / steady_s)


def check_same_store(path: Path, reference: Path, what: str) -> None:
    """Raise unless the store at `path` equals the reference value for value."""
    columns = ["label", "width", "height", "status", "reason"]
    with ActivationStore(str(path)) as store, ActivationStore(str(reference)) as ref:
        for layer in ref.layers:
            a, b = store.read(layer.name), ref.read(layer.name)
            if a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                raise RuntimeError(f"{what}: layer {layer.name}'s activations differ from the folder's store")
        if not store.images().select(columns).equals(ref.images().select(columns)):
            raise RuntimeError(f"{what}: the images table (labels, sizes, status) differs from the folder's store")
        if store.attrs["dataset"]["class_names"] != ref.attrs["dataset"]["class_names"]:
            raise RuntimeError(f"{what}: the class names differ from the folder's store")


def run(args: argparse.Namespace, sizes: dict[str, Any]) -> tuple[list[Row], Formats]:
    with tempfile.TemporaryDirectory(prefix="bench_extract_", dir="/tmp") as tmp_dir:
        tmp = Path(tmp_dir)
        log(f"writing {args.n_images} {IMAGE_SIZE}x{IMAGE_SIZE} JPEGs as a folder, parquet files and tar shards")
        data = write_formats(tmp, args.n_images)
        backbone = load_backbone(BackboneConfig(args.model))
        decoded = read_decode(data, backbone.preprocessor, args)

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

        backbone = backbone.to(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.batch_size, 3, *backbone.preprocessor.image_size), dtype=torch.uint8,
                          generator=gen).to(device)
        one = min(forward_seconds(backbone, x, 1) for _ in range(2))  # warm-up, and the calls' length
        half = max(MIN_CALLS, math.ceil(sizes["forward_s"] / 2 / one))
        log(f"forward reference on {name}: {half} calls of batch {args.batch_size} before the extractions")
        ref_s = forward_seconds(backbone, x, half)

        warmup_s = {}
        for fmt in FORMATS:
            log(f"warm-up extraction of {fmt} (1 unit)")
            warmup_s[fmt] = extract(data, fmt, tmp / f"warmup-{fmt}", args, max_units=1)[1]
        runs: dict[str, list[Extraction]] = {fmt: [] for fmt in FORMATS}
        for r in range(ROUNDS):
            for fmt in turns(r):
                log(f"extraction of {args.n_images} images from {fmt}, round {r + 1}/{ROUNDS}")
                runs[fmt].append(timed_extract(data, fmt, tmp / f"store-{fmt}-{r}", args))

        log(f"forward reference: {half} calls after the extractions")
        ref_s += forward_seconds(backbone, x, half)
        ray.shutdown()
        log("checking every store against the folder's")
        for fmt in FORMATS:
            for r in range(ROUNDS):
                if (fmt, r) != ("folder", 0):
                    check_same_store(tmp / f"store-{fmt}-{r}", tmp / "store-folder-0", f"{fmt}, round {r + 1}")
        store_bytes = {}
        for fmt in FORMATS:
            with ActivationStore(str(tmp / f"store-{fmt}-0")) as store:
                store_bytes[fmt] = store.nbytes_stored()
    rows = [Row(format=fmt, model=args.model, device=name, batch_size=args.batch_size,
                images_per_shard=args.images_per_shard, n_images=args.n_images, files=1 if fmt == "folder" else FILES,
                image_bytes=data.image_bytes, **decoded[fmt], ray_init_s=ray_init_s, warmup_s=warmup_s[fmt],
                extractions=tuple(runs[fmt]), forward_ips=actors * args.batch_size * 2 * half / ref_s,
                forward_calls=2 * half, store_bytes=store_bytes[fmt]) for fmt in FORMATS]
    return rows, data


def show_results(rows: list[dict[str, Any]]) -> None:
    r = rows[0]
    print(f"read + decode, one thread, units of {r['images_per_shard']}, {r['n_images']} images "
          f"({r['image_bytes'] / r['n_images'] / 1e3:.1f} KB a JPEG on average):")
    print_table([("format", "format", "{}"), ("files", "files", "{}"), ("manifest s", "manifest_s", "{:.3f}"),
                 ("read img/s", "read_ips", "{:.0f}"), ("decode img/s", "decode_ips", "{:.1f}"),
                 ("read+decode img/s", "read_decode_ips", "{:.1f}"), ("vs folder", "read_decode_vs_folder", "{:.3f}"),
                 ("read MB / image MB", "read_amplification", "{:.2f}")], rows, text_cols=1)
    print()
    print(f"end to end, {r['model']} batch {r['batch_size']} on {r['device']}, units of {r['images_per_shard']}:")
    print_table([("format", "format", "{}"), ("e2e wall img/s", "wall_ips", "{:.1f}"),
                 ("e2e steady img/s", "steady_ips", "{:.1f}"), ("vs folder", "steady_vs_folder", "{:.3f}"),
                 ("forward img/s", "forward_ips", "{:.1f}"), ("steady/forward", "ratio", "{:.3f}"),
                 ("ray init s", "ray_init_s", "{:.1f}"), ("run overhead s", "overhead_s", "{:.1f}"),
                 ("wall s", "wall_s", "{:.1f}"), ("store MB", "store_mb", "{:.1f}")],
                [{**r, "store_mb": r["store_bytes"] / 1e6} for r in rows], text_cols=1)


def main() -> None:
    parser = Parser(__doc__, "small model and dataset (about two minutes)", reps=(5, 3),
                    reps_help="read + decode passes of each format")
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
    if args.n_images < max(2 * args.images_per_shard, FILES):
        parser.error(f"--n-images must be at least 2 x --images-per-shard (steady state spans units 2..last) and "
                     f"at least {FILES} (one image a file)")
    bench = Run("bench_extract", args)
    rows, data = run(args, sizes)
    bench.stop()
    metrics = [r.metrics() for r in rows]
    folder = metrics[0]
    for m in metrics:
        m["read_decode_vs_folder"] = m["read_decode_ips"] / folder["read_decode_ips"]
        m["steady_vs_folder"] = m["steady_ips"] / folder["steady_ips"]
    show_results(metrics)
    print_notes(NOTES)
    print(f"parquet: {data.rows_per_group:.0f} rows a row group on average; stores: "
          f"{', '.join(FORMATS[1:])} equal the folder's value for value in every round")
    for m in metrics:
        rounds = " ".join(f"{e['steady_ips']:.1f}" for e in m["extractions"])
        done = " ".join(f"{t:.1f}" for t in m["extractions"][0]["unit_done_s"])
        print(f"{m['format']}: e2e steady img/s by round {rounds}; units done at (s after the call, round 1) {done}")
    verdicts = [{"what": "folder steady e2e / pure forward", "ratio": folder["ratio"], "goal": GOAL}]
    verdicts += [{"what": f"{m['format']} {kind} / folder", "ratio": m[f"{key}_vs_folder"], "goal": FORMAT_GOAL}
                 for m in metrics[1:] for kind, key in (("read + decode", "read_decode"), ("steady e2e", "steady"))]
    for v in verdicts:
        v["pass"] = v["ratio"] >= v["goal"]
        print_verdict(f"{v['what']} ({folder['model']} batch {folder['batch_size']} on {folder['device']}): "
                      f"{v['ratio']:.3f}x (goal >= {v['goal']})", v["pass"])
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    bench.finish({"image_size": IMAGE_SIZE, "noise": NOISE, "jpeg_quality": JPEG_QUALITY, "files": FILES,
                  "parquet_rows_per_row_group": data.rows_per_group, "rounds": ROUNDS,
                  "machine": machine(ray, cuda_device=cuda_device, loadavg_before=bench.load_start,
                                     loadavg_after=bench.load_end),
                  "notes": list(NOTES), "rows": metrics, "verdicts": verdicts})


if __name__ == "__main__":
    main()
