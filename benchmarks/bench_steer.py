"""Steering: the segmentation suppression experiment (a table per class) and POST /steer's latency against one clean
forward pass of the same backbone.

Data (services.steer.setup): generated shapes with masks through a random-weight open_clip ViT-S/32 (layers 10 and
11, per-patch labels by majority vote), a TopK SAE trained on layer 10's patches, a segmentation probe (background +
6 shapes) and a colour probe on layer 11.

Experiment: per segmentation class, on the images that contain it, the probe's IoU for that class clean, with the
class's 8 most associated features (mean activation on its patches minus elsewhere, over every stored patch) set to 0
on its patches, and with 8 random live features set to 0 on the same patches (mean of 3 draws). The claim under test:
suppressing a class's own features lowers its IoU more than suppressing others.

Latency: `actstore serve --index DIR --steer probe:SEG --steer-threads N` as a separate process (one uvicorn worker,
torch's threads as many as the reference's); POST /steer of a random image with 8 edits (set 0 @all) through the
segmentation probe, one client; p50 and p99 after a warm-up. The reference, in this process and the same run: one
clean forward pass of the backbone (its whole model, one image). A request runs two passes (before and after) plus
the decode, the SAE, the probe and the JSON. Steering under concurrent load: bench_steer_load.py.

Run: .venv/bin/python benchmarks/bench_steer.py [--quick] [--json out.json] [--workdir DIR]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from services.steer import Steerer
from services.steer.experiment import segmentation_suppression
from services.steer.setup import build_steering
from actstore.testing.shapes import generate_dataset
from _common import Parser, Run, log, machine, post_ms, print_notes, print_table, served  # benchmarks/ is sys.path[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def clean_forward_ms(steerer: Steerer, n: int) -> list[float]:
    """One image through the whole backbone (its own output), n times after a warm-up."""
    x = steerer.image(0)
    backbone = steerer.model.backbone
    for _ in range(3):
        backbone.outputs(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        backbone.outputs(x)
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def steer_ms(index: str, seg: str, n_images: int, n: int, features: list[int]) -> list[float]:
    """POST /steer latencies (ms) against a separate `actstore serve` process (5 warm-ups first: the first request
    loads the model)."""
    head = f"probe:{Path(seg).name}"
    edits = [{"feature": f, "op": "set", "value": 0.0, "where": "all"} for f in features]
    rng = np.random.default_rng(0)
    bodies = ({"image": int(rng.integers(n_images)), "head": head, "edits": edits} for _ in range(n + 5))
    with served("--index", index, "--workers", "1", "--steer", f"probe:{seg}",
                "--steer-threads", str(torch.get_num_threads())) as url:  # as many threads as the reference's
        return post_ms(f"{url}/steer", bodies, warmups=5)


def main() -> None:
    parser = Parser(__doc__, "96 images, 4 classes, 40 requests")
    parser.add_argument("--workdir", help="build the setup here (default: a temporary folder)")
    args = parser.parse()
    n_images, n_requests = (96, 40) if args.quick else (192, 200)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp) / "steer-bench"
        log(f"building the shapes setup ({n_images} images) in {root}")
        generate_dataset(str(root / "images"), n_images, seed=5, image_size=64, masks=str(root / "masks"))
        setup = build_steering(root, str(root / "images"), str(root / "masks"),
                               tokens=300_000 if not args.quick else 150_000)
        run = Run("bench_steer", args)
        steerer = Steerer(setup.sae)
        head = steerer.head(f"probe:{setup.seg}")
        log("segmentation suppression experiment")
        rows = segmentation_suppression(steerer, head, n_features=8, n_random=3, progress=True,
                                        classes=[1, 2, 3, 4] if args.quick else None)
        table = [r.to_dict() for r in rows]
        for r in table:
            r["ratio"] = r["drop_top"] / r["drop_random"] if r["drop_random"] > 1e-9 else None
        log("latency")
        torch.set_num_threads(torch.get_num_threads())
        forward = clean_forward_ms(steerer, n_requests)
        steer = steer_ms(setup.index, setup.seg, n_images, n_requests, rows[0].features)
        run.stop()

    cols = [("class", "name", "{}"), ("images", "images", "{}"), ("patches", "patches", "{}"),
            ("IoU clean", "iou_clean", "{:.3f}"), ("IoU top-8 off", "iou_top", "{:.3f}"),
            ("IoU random-8 off", "iou_random", "{:.3f}"), ("drop top", "drop_top", "{:.3f}"),
            ("drop random", "drop_random", "{:.3f}"), ("ratio", "ratio", "{:.1f}x"),
            ("mIoU clean", "miou_clean", "{:.3f}"), ("mIoU top", "miou_top", "{:.3f}"),
            ("mIoU random", "miou_random", "{:.3f}")]
    print(f"Segmentation suppression: {n_images} shapes, open_clip ViT-S/32 (random weights), TopK SAE d_sae 512 "
          f"k 8 on layer 10, segmentation probe on layer 11")
    print_table(cols, table, 1)
    lat = [{"what": "clean forward (1 image, in process)", "p50": percentile(forward, 50),
            "p99": percentile(forward, 99), "n": len(forward)},
           {"what": "POST /steer (8 edits, seg probe)", "p50": percentile(steer, 50), "p99": percentile(steer, 99),
            "n": len(steer)}]
    for row in lat:
        row["vs_forward"] = row["p50"] / lat[0]["p50"]
    print()
    print_table([("", "what", "{}"), ("p50 ms", "p50", "{:.1f}"), ("p99 ms", "p99", "{:.1f}"),
                 ("requests", "n", "{}"), ("p50 vs forward", "vs_forward", "{:.2f}x")], lat, 1)
    seg_drop = sum(r["drop_top"] for r in table) / len(table)
    rand_drop = sum(r["drop_random"] for r in table) / len(table)
    print_notes([
        f"mean IoU drop over classes: top features {seg_drop:.3f}, random live features {rand_drop:.3f}",
        "features: a class's 8 most associated; random: 8 live features (fired on a stored patch), not the top 8",
        "latency: one client, sequential requests, after 5 warm-ups; the forward pass is timed in this process",
        f"median of {n_requests} each; steer p50 / forward p50 = "
        f"{statistics.median(steer) / statistics.median(forward):.2f}"])
    run.finish({"rows": table, "latency": lat, "machine": machine()})


if __name__ == "__main__":
    main()
