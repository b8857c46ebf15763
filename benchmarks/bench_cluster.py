"""Scaling out on one machine: extraction images/s on deploy/local's two-node Ray cluster against the same
job on one node, and training tokens/s reading a store from S3 against reading the same store locally.

Both clusters are started here (actstore.testing.cluster.LocalCluster: `ray start` processes with token
auth and moto's S3 server on 127.0.0.1) and stopped by pid. The extraction reads generated images from S3
and writes the store to S3; the driver is `actstore extract` in a process of its own. Training runs one process (the loader is what
differs): the store on S3 (moto) against a local copy of it.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import s3fs

from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]
from actstore.testing.cluster import BUCKET, LocalCluster
from actstore.testing.shapes import generate_dataset
from sae.train import TrainConfig, Trainer

FULL = {"model": "timm:vit_small_patch16_224", "n_images": 256, "images_per_shard": 32, "steps": 60}
QUICK = {"model": "timm:vit_tiny_patch16_224", "n_images": 64, "images_per_shard": 16, "steps": 30}
GOAL_NODES, GOAL_S3 = 0.8, 0.8
NOTES = (
    "both clusters run on the same 2 physical cores: a second node adds Ray processes (raylet, workers), not "
    "compute, so the two-node figure measures the overhead of spreading a job, not a speed-up; on real nodes "
    "images/s scales with the forward actors (one per GPU)",
    "each node declares 2 logical CPUs: the two-node cluster schedules decode and write tasks on both nodes "
    "while the forward actor (one, on CPU) uses every core's threads",
    "training tokens/s is the median of the log intervals after the first (buffer fill excluded); the small "
    "store is read again every epoch (about 12 steps in --quick) and every log line is appended to "
    "metrics.jsonl, both through moto, a Python S3 server on the same 2 cores: the S3 figure is a floor",
)


def _extract(cluster: LocalCluster, args: Any, images: str, out: str) -> float:
    """images/s of one extraction on `cluster`, reported by `actstore extract` run as a user would (its own
    process: Ray reads the token settings when it is imported)."""
    r = subprocess.run([str(Path(sys.executable).parent / "actstore"), "extract", "--images", images, "--model",
                        args.model, "--out", out, "--batch-size", "32", "--images-per-shard",
                        str(args.images_per_shard), "-q"], env={**os.environ, **cluster.env()}, capture_output=True,
                       text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return float(re.search(r"([0-9.]+) images/s", r.stdout).group(1))


def _train(store: str, out: str, steps: int) -> float:
    cfg = TrainConfig(store=store, out=out, layer=-2, batch_size=1024, tokens=1024 * steps, log_every=5,
                      checkpoint_every=None, sae=({"kind": "topk", "k": 16, "d_sae": 1024},))
    Trainer(cfg).fit(progress=False)
    import json

    rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()] if "://" not in out \
        else None
    if rows is None:
        from actstore.store import filesystem
        from sae.train.sinks import read_metrics

        rows = read_metrics(*filesystem(out, None))
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def main() -> None:
    parser = Parser(__doc__, "ViT-Tiny, 64 images, 30 steps (about three minutes)")
    args = parser.parse()
    sizes = QUICK if args.quick else FULL
    args.model, args.n_images, args.images_per_shard = sizes["model"], sizes["n_images"], sizes["images_per_shard"]
    rows: dict[str, float] = {}
    bench = Run("bench_cluster", args)
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in (2, 1):
            log(f"cluster of {nodes} node(s) ...")
            with LocalCluster(Path(tmp) / f"c{nodes}", nodes=nodes) as cluster:
                env = cluster.env()
                aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
                os.environ.update(aws)
                generate_dataset(f"s3://{BUCKET}/images", args.n_images, seed=0, image_size=96)
                rows[f"extract_{nodes}"] = _extract(cluster, args, f"s3://{BUCKET}/images", f"s3://{BUCKET}/store")
                if nodes == 1:
                    import fsspec

                    log("training from S3 and from a local copy ...")
                    fsspec.filesystem("s3").get(f"{BUCKET}/store", f"{tmp}/store", recursive=True)
                    rows["train_s3"] = _train(f"s3://{BUCKET}/store", f"s3://{BUCKET}/run", sizes["steps"])
                    rows["train_local"] = _train(f"{tmp}/store", f"{tmp}/run", sizes["steps"])
                for k in aws:
                    os.environ.pop(k, None)
                s3fs.S3FileSystem.clear_instance_cache()  # the next cluster's endpoint is another
    bench.stop()
    table = [{"what": "extraction", "unit": "images/s", "a": rows["extract_2"], "b": rows["extract_1"],
              "a_name": "two nodes", "b_name": "one node", "ratio": rows["extract_2"] / rows["extract_1"]},
             {"what": "training", "unit": "tokens/s", "a": rows["train_s3"], "b": rows["train_local"],
              "a_name": "store on S3", "b_name": "store local", "ratio": rows["train_s3"] / rows["train_local"]}]
    print_table([("job", "what", "{}"), ("measured (a)", "a_name", "{}"), ("reference (b)", "b_name", "{}"),
                 ("unit", "unit", "{}"), ("(a)", "a", "{:,.1f}"), ("(b)", "b", "{:,.1f}"),
                 ("(a)/(b)", "ratio", "{:.2f}")], table, text_cols=4)
    print_notes(NOTES)
    ok_nodes, ok_s3 = table[0]["ratio"] >= GOAL_NODES, table[1]["ratio"] >= GOAL_S3
    print_verdict(f"two-node extraction >= {GOAL_NODES} x one node on the same cores: {table[0]['ratio']:.2f}",
                  ok_nodes)
    print_verdict(f"training from S3 >= {GOAL_S3} x from local disk: {table[1]['ratio']:.2f}", ok_s3)
    bench.finish({"model": args.model, "n_images": args.n_images, "rows": table, "notes": list(NOTES),
                  "machine": machine(ray, loadavg_before=bench.load_start, loadavg_after=bench.load_end),
                  "verdicts": [{"what": "nodes", "pass": ok_nodes, "ratio": table[0]["ratio"], "goal": GOAL_NODES},
                               {"what": "s3", "pass": ok_s3, "ratio": table[1]["ratio"], "goal": GOAL_S3}]})


if __name__ == "__main__":
    main()
