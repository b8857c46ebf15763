"""The quality table: every SAE kind trained at matched L0 on one store, then spliced into its model.

Data: generated shape images (256; quick 96) through a random-weight timm ViT (ViT-S/16; quick ViT-Ti/16), layer
-2, extracted with `actstore extract`'s job (local Ray). Each kind trains on the store's patches with the same
tokens, batch, width (x8) and schedule:

- TopK, BatchTopK, Matryoshka BatchTopK: k = the target L0 (32; quick 16);
- ReLU + L1 and JumpReLU: their knob (the L1 coefficient; JumpReLU's starting threshold, see COEFFS) is matched
  to the target L0 first, by one calibration sweep (the trainer trains a sweep on the same batches) at half the
  tokens, taking the value whose L0 is nearest the target in log space (interpolated between the two around it).

Measured, in the same run, for each kind: training tokens/s (the median of the run's logged intervals, each kind
trained alone; ratio against TopK, the reference), the final dead fraction (no firing over the dead window),
then `actstore evaluate`'s pass over the first 64 images (quick 32): L0 and FVU of the SAE on them, KL(clean ||
spliced) of the model's own class probabilities, and `recovered` (against mean ablation) for the KL and the
embedding cosine. Random weights: the table compares the kinds with each other, not with published figures.

Run: .venv/bin/python benchmarks/bench_sae_quality.py [--quick] [--json out.json]
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from actstore.extract import ExtractConfig, run_extract
from actstore.testing.shapes import generate_dataset
from actstore.store import filesystem
from sae.train import TrainConfig, train
from sae.train.sinks import read_metrics
from services.evaluate import EvaluateConfig, run_evaluate
from _common import Parser, Run, log, machine, print_notes, print_table  # benchmarks/ is sys.path[0]

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
COEFFS = {"relu": ("l1_coeff", (0.5, 1.0, 2.0, 4.0, 8.0)),
          "jumprelu": ("jumprelu_init_threshold", (0.5, 1.0, 1.5, 2.0, 2.5))}
"""The calibration sweep of the kinds whose L0 follows a knob (normalized inputs: E||x||^2 = d, so pre-activations
are ~N(0, 1) at the start). JumpReLU's knob is its thresholds' starting value, not its L0 coefficient: under Adam a
threshold moves by about lr per step whatever the coefficient, so a short run ends near where it started."""


def read_jsonl(run: Path) -> list[dict[str, Any]]:
    """A training run's logged metric rows."""
    return read_metrics(*filesystem(str(run), None))


def matched(l0s: dict[float, float], target: float) -> float:
    """The knob value whose L0 is `target`, by log-log interpolation between the two calibration points around it
    (L0 falls as the knob grows); the nearest point when the target is outside the sweep."""
    points = sorted(l0s.items())
    for (c0, l0), (c1, l1) in zip(points, points[1:]):
        if l0 >= target >= l1 and l0 > 0 and l1 > 0 and l0 != l1:
            t = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return min(points, key=lambda p: abs(math.log(max(p[1], 1e-9)) - math.log(target)))[0]


def base_config(store: str, out: Path, tokens: int, batch: int) -> dict[str, Any]:
    return {"store": store, "out": str(out), "tokens": tokens, "batch_size": batch, "log_every": 10,
            "checkpoint_every": None, "seed": 0}


def main() -> None:
    parser = Parser(__doc__, quick="96 images, ViT-Ti/16, 300K tokens, k 16")
    args = parser.parse()
    quick = args.quick
    n_images, model = (96, "timm:vit_tiny_patch16_224") if quick else (256, "timm:vit_small_patch16_224")
    tokens, batch, k, n_eval = (300_000, 1024, 16, 32) if quick else (1_500_000, 2048, 32, 64)
    work = Path(tempfile.mkdtemp(prefix="bench-sae-quality-"))
    log(f"data: {n_images} shape images through {model} -> {work}/store")
    generate_dataset(str(work / "images"), n_images, seed=0)
    run_extract(ExtractConfig(images=str(work / "images"), model=model, out=str(work / "store"),
                              images_per_shard=64, batch_size=32), progress=False)
    store = str(work / "store")

    run = Run("sae_quality", args)
    coeffs: dict[str, float] = {}
    calibration: dict[str, dict[float, float]] = {}
    for kind, (field, values) in COEFFS.items():
        log(f"calibrating {kind}'s {field} over {values} at {tokens // 2} tokens")
        sweep = tuple({"name": f"{kind}-{c:g}", "kind": kind, "expansion": 8, field: c} for c in values)
        train(TrainConfig(**base_config(store, work / f"calibrate-{kind}", tokens // 2, batch), sae=sweep),
              progress=False)
        rows = read_jsonl(work / f"calibrate-{kind}")
        last = {r["sae"]: r for r in rows}  # the last logged row of each member
        calibration[kind] = {c: statistics.median(r["l0"] for r in rows if r["sae"] == f"{kind}-{c:g}"
                                                  and r["step"] > 0.8 * last[f"{kind}-{c:g}"]["step"])
                             for c in values}
        coeffs[kind] = matched(calibration[kind], k)
        log(f"  L0 by {field}: {calibration[kind]} -> {field} {coeffs[kind]:.4g}")

    rows = []
    for kind in KINDS:
        knob = {COEFFS[kind][0]: coeffs[kind]} if kind in COEFFS else {"k": k}
        out = work / f"train-{kind}"
        log(f"training {kind} ({knob}) on {tokens} tokens")
        last = train(TrainConfig(**base_config(store, out, tokens, batch),
                                 sae=({"name": kind, "kind": kind, "expansion": 8, **knob},)), progress=False)[-1]
        logged = read_jsonl(out)
        rate = statistics.median(r["tokens_per_s"] for r in logged[1:] or logged)  # the first interval warms up
        log(f"evaluating {kind} spliced into {model} on {n_eval} images")
        ev = run_evaluate(EvaluateConfig(sae=str(out / kind), images=str(work / "images"), max_images=n_eval),
                          progress=False)
        rows.append({"kind": kind, "knob": ", ".join(f"{name} {v:.3g}" for name, v in knob.items()),
                     "l0": ev["l0"], "fvu": ev["fvu"], "dead": last["dead_fraction"],
                     "kl": ev["kl"]["spliced"], "kl_mean_ablation": ev["kl"]["mean_ablation"],
                     "recovered_kl": ev["recovered"]["kl"], "recovered_cos": ev["recovered"]["embedding_cosine"],
                     "cos": ev["embedding_cosine"]["spliced"], "tokens_per_s": rate})
    run.stop()
    reference = next(r["tokens_per_s"] for r in rows if r["kind"] == "topk")
    for r in rows:
        r["speed_vs_topk"] = r["tokens_per_s"] / reference

    print(f"SAE kinds at matched L0 (target {k}), x8 on {model} layer -2 patches of {n_images} shape images, "
          f"{tokens:,} training tokens each; evaluated on {n_eval} images")
    print_table([("kind", "kind", "{}"), ("knob", "knob", "{}"), ("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.3f}"),
                 ("dead", "dead", "{:.1%}"), ("KL spliced", "kl", "{:.4f}"), ("KL mean-abl.", "kl_mean_ablation",
                                                                                "{:.4f}"),
                 ("recovered KL", "recovered_kl", "{:.3f}"), ("cos spliced", "cos", "{:.3f}"),
                 ("recovered cos", "recovered_cos", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
                 ("vs TopK", "speed_vs_topk", "{:.2f}x")], rows, text_cols=2)
    print_notes([
        "L0 and FVU are the SAE's on the evaluation images' patches (BatchTopK kinds at inference: their learned "
        "threshold, so L0 is near, not at, k); dead: no firing over the trainer's dead window at the end",
        "KL: KL(clean || spliced) of the model's own (random) classifier, mean over images; recovered = "
        "(mean-ablated - spliced) / (mean-ablated - clean), 1 = splicing loses nothing",
        "tokens/s: median of the logged intervals of each kind trained alone on the CPU (the PyTorch paths)",
        f"calibration (L0 by knob, {tokens // 2:,} tokens): "
        + "; ".join(f"{kind} {COEFFS[kind][0]}: " + ", ".join(f"{c:g} -> {l0:.1f}" for c, l0 in cal.items())
                    for kind, cal in calibration.items()),
    ])
    run.finish({"machine": machine(), "model": model, "n_images": n_images, "tokens": tokens, "target_l0": k,
                "calibration": {kind: {str(c): l0 for c, l0 in cal.items()} for kind, cal in calibration.items()},
                "rows": rows})


if __name__ == "__main__":
    main()
