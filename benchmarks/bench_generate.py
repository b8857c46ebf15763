"""Steering a generator: one POST /steer through the generate head against the pipeline alone.

Data (services.steer.setup.generation_store): a tiny random Stable unCLIP pipeline (actstore.testing.tiny_diffusion:
a 2-layer CLIP image encoder, a 2-level UNet, a 2-level VAE), generated shapes, a store of the encoder's layers and a
random TopK SAE (d_sae 64, k 4) on its first layer, indexed for the service.

Measured: `actstore serve --index DIR --steer generate` as a separate process (one worker, torch's threads as many
as the reference's); POST /steer of a random image with 4 edits (add 3 @all), `--steps` denoising steps at `--size`
pixels, one client, after warm-ups. The reference, in this process and the same run: the same pipeline called
directly with an image embedding, the same steps and size (one generation). A request makes two generations (before
and after, with the same seed) plus two encoder passes, the PNGs and the JSON: its floor is 2x the reference.

Run: .venv/bin/python benchmarks/bench_generate.py [--quick] [--json out.json] [--steps N] [--size PX]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_diffusion import write_tiny_unclip
from services.index import IndexConfig, build_index
from services.steer.setup import generation_store
from _common import Parser, Run, log, machine, post_ms, print_notes, print_table, served  # benchmarks/ is sys.path[0]


def pipeline_ms(folder: str, steps: int, size: int, n: int) -> list[float]:
    """The pipeline alone: one generation from an image embedding, n times after 2 warm-ups."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    embedding = torch.randn(1, pipe.image_encoder.config.projection_dim)
    times = []
    for i in range(n + 2):
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(image_embeds=embedding, prompt="", num_inference_steps=steps, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(0))
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def steer_ms(index: str, n_images: int, steps: int, size: int, n: int) -> list[float]:
    """POST /steer latencies (ms) against a separate `actstore serve` process, n after 2 warm-ups (the first request
    loads the model and the pipeline)."""
    edits = [{"feature": f, "op": "add", "value": 3.0, "where": "all"} for f in range(4)]
    rng = np.random.default_rng(0)
    bodies = ({"image": int(rng.integers(n_images)), "head": "generate", "edits": edits, "steps": steps,
               "size": size} for _ in range(n + 2))
    with served("--index", index, "--workers", "1", "--steer", "generate", "--steer-threads",
                str(torch.get_num_threads()), "--steer-timeout", "600") as url:  # as many threads as the reference's
        return post_ms(f"{url}/steer", bodies, warmups=2, timeout=600)


def main() -> None:
    parser = Parser(__doc__, "5 requests of 10 steps at 64 px")
    parser.add_argument("--steps", type=int, help="denoising steps (default 25, quick 10)")
    parser.add_argument("--size", type=int, help="picture size in pixels (default 128, quick 64)")
    args = parser.parse()
    steps = args.steps or (10 if args.quick else 25)
    size = args.size or (64 if args.quick else 128)
    n = 5 if args.quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        log(f"building the tiny unCLIP setup in {tmp}")
        generate_dataset(f"{tmp}/images", 8, seed=2, image_size=64)
        pipeline = write_tiny_unclip(f"{tmp}/unclip")
        store, sae = generation_store(tmp, f"{tmp}/images", f"{pipeline}/image_encoder")
        index = build_index(IndexConfig(store, sae, str(Path(tmp) / "index"), k=4), progress=False)
        ray.shutdown()
        run = Run("bench_generate", args)
        log(f"the pipeline alone: {n} generations of {steps} steps at {size} px")
        alone = pipeline_ms(pipeline, steps, size, n)
        log(f"POST /steer: {n} requests")
        steer = steer_ms(str(index), 8, steps, size, n)
        run.stop()
    reference = statistics.median(alone)
    rows = [{"what": "the pipeline alone (1 generation, in process)", "p50": reference,
             "p99": float(np.percentile(alone, 99)), "n": len(alone)},
            {"what": "POST /steer (before + after, 4 edits)", "p50": statistics.median(steer),
             "p99": float(np.percentile(steer, 99)), "n": len(steer)}]
    for row in rows:
        row["vs_alone"] = row["p50"] / reference
    print(f"Generation steering: tiny random Stable unCLIP, {steps} steps, {size}x{size} px")
    print_table([("", "what", "{}"), ("p50 ms", "p50", "{:.1f}"), ("p99 ms", "p99", "{:.1f}"), ("n", "n", "{}"),
                 ("p50 vs pipeline", "vs_alone", "{:.2f}x")], rows, 1)
    print_notes(["a request generates twice (before and after, same seed): its floor is 2.00x the pipeline alone",
                 f"per generation: {rows[1]['p50'] / 2 / reference:.2f}x the pipeline alone",
                 "one client, sequential requests after warm-ups; the reference is timed in this process"])
    run.finish({"rows": rows, "steps": steps, "size": size, "machine": machine()})


if __name__ == "__main__":
    main()
