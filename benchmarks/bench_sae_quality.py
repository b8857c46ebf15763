"""The sparsity knobs and the quality table: L0 and FVU against each kind's knob, then every kind at matched L0.

Data: generated shape images (256; quick 32) through a random-weight timm ViT (ViT-S/16; quick ViT-Ti/16), layer
-2, extracted with `actstore extract`'s job (local Ray). Every SAE trains on the store's patches with the same
batch, width (x8; quick x4) and default schedules.

1. The knobs (SWEEPS): ReLU's l1_coeff, JumpReLU's l0_coeff and TopK's k, each swept as one training run of
   several SAEs on the same batches and tokens as part 2. Each trained SAE's L0 and FVU are measured on
   the same 8,192 of the store's patches (normalized as in training), with its dead fraction at the end of
   training. Verdict per kind: L0 falls as a coefficient grows (rises with k) over the whole sweep.
2. Matched L0: each kind trained alone on the full tokens at the target L0 (32; quick 16): TopK, BatchTopK,
   Matryoshka with k = the target; ReLU and JumpReLU with the knob value whose L0 in part 1 is the target,
   interpolated in log space between the two values around it. Measured: training tokens/s (the median of the
   run's logged intervals; ratio against TopK, the reference), the final dead fraction, then `actstore
   evaluate`'s pass over the first 64 images (quick 8): L0 and FVU on them, KL(clean || spliced) of the model's
   own class probabilities, and `recovered` (against mean ablation) for the KL and the embedding cosine. Random
   weights: the table compares the kinds with each other, not with published figures.

Run: .venv/bin/python benchmarks/bench_sae_quality.py [--quick] [--json out.json]
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from actstore.extract import ExtractConfig, run_extract
from actstore.loader import PatchLoader
from actstore.store import filesystem
from actstore.testing.shapes import generate_dataset
from sae import load, metrics
from sae.train import TrainConfig, train
from sae.train.sinks import read_metrics
from services.evaluate import EvaluateConfig, run_evaluate
from _common import Parser, Run, log, machine, print_notes, print_table, print_verdict  # benchmarks/ is sys.path[0]

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
SWEEPS = {"relu": ("l1_coeff", (0.5, 1.0, 2.0, 4.0, 8.0)),
          "jumprelu": ("l0_coeff", (0.01, 0.03, 0.1, 0.3, 1.0)),
          "topk": ("k", (8, 16, 32, 64))}
"""The knob of each swept kind and its values, in the order of growing sparsity pressure for the coefficients;
--quick sweeps every other value."""
EVAL_TOKENS = 8192


def read_jsonl(run: Path) -> list[dict[str, Any]]:
    """A training run's logged metric rows."""
    return read_metrics(*filesystem(str(run), None))


def matched(l0s: dict[float, float], target: float) -> float:
    """The coefficient whose L0 is `target`, by log-log interpolation between the two sweep points around it
    (L0 falls as the coefficient grows); the nearest point when the target is outside the sweep."""
    points = sorted(l0s.items())
    for (c0, l0), (c1, l1) in zip(points, points[1:]):
        if l0 >= target >= l1 and l0 > 0 and l1 > 0 and l0 != l1:
            t = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    return min(points, key=lambda p: abs(math.log(max(p[1], 1e-9)) - math.log(target)))[0]


def monotone(l0s: list[float], falling: bool) -> bool:
    """Whether the L0s (in the sweep's order) fall strictly (a coefficient) or rise strictly (k)."""
    pairs = list(zip(l0s, l0s[1:]))
    return all(b < a for a, b in pairs) if falling else all(b > a for a, b in pairs)


def base_config(store: str, out: Path, tokens: int, batch: int) -> dict[str, Any]:
    return {"store": store, "out": str(out), "tokens": tokens, "batch_size": batch, "log_every": 10,
            "checkpoint_every": None, "seed": 0}


def eval_tokens(store: str) -> torch.Tensor:
    """EVAL_TOKENS of the store's patches (all of them if fewer), normalized as in training (a fixed draw)."""
    loader = PatchLoader(store, -2, EVAL_TOKENS, normalize=True, seed=12345)
    x = next(iter(loader))
    loader.close()
    return x


def sweep(kind: str, store: str, work: Path, tokens: int, batch: int, expansion: float, x: torch.Tensor,
          quick: bool) -> list[dict[str, Any]]:
    """Part 1 for one kind: its sweep trained together, then each SAE's L0 and FVU on x."""
    knob, values = SWEEPS[kind]
    values = values[::2] if quick else values
    names = [f"{kind}-{v:g}" for v in values]
    out = work / f"sweep-{kind}"
    log(f"sweeping {kind}'s {knob} over {values} on {tokens} tokens")
    saes = tuple({"name": name, "kind": kind, "expansion": expansion, knob: v} for name, v in zip(names, values))
    last = {r["sae"]: r for r in train(TrainConfig(**base_config(store, out, tokens, batch), sae=saes),
                                       progress=False)}
    rows = []
    for name, value in zip(names, values):
        sae, _ = load(str(out / name))
        with torch.no_grad():
            result = sae(x)
        found = metrics.batch_metrics(x, result.x_hat, result.acts)
        rows.append({"kind": kind, "knob": knob, "value": value, "l0": found["l0"], "fvu": found["fvu"],
                     "dead": last[name]["dead_fraction"]})
    return rows


def main() -> None:
    parser = Parser(__doc__, quick="32 images, ViT-Ti/16, x4, every other sweep value, 60K tokens, target L0 16, 8 evaluation images")
    args = parser.parse()
    quick = args.quick
    n_images, model = (32, "timm:vit_tiny_patch16_224") if quick else (256, "timm:vit_small_patch16_224")
    tokens, batch, k, n_eval, expansion = (60_000, 512, 16, 8, 4) if quick else (1_500_000, 2048, 32, 64, 8)
    work = Path(tempfile.mkdtemp(prefix="bench-sae-quality-"))
    log(f"data: {n_images} shape images through {model} -> {work}/store")
    generate_dataset(str(work / "images"), n_images, seed=0)
    run_extract(ExtractConfig(images=str(work / "images"), model=model, out=str(work / "store"),
                              images_per_shard=64, batch_size=32), progress=False)
    store = str(work / "store")

    run = Run("sae_quality", args)
    x = eval_tokens(store)
    sweeps = {kind: sweep(kind, store, work, tokens, batch, expansion, x, quick) for kind in SWEEPS}
    knobs = {kind: {SWEEPS[kind][0]: matched({r["value"]: r["l0"] for r in sweeps[kind]}, k)}
             for kind in ("relu", "jumprelu")}

    rows = []
    for kind in KINDS:
        knob = knobs.get(kind, {"k": k})
        out = work / f"train-{kind}"
        log(f"training {kind} ({knob}) on {tokens} tokens")
        last = train(TrainConfig(**base_config(store, out, tokens, batch),
                                 sae=({"name": kind, "kind": kind, "expansion": expansion, **knob},)),
                     progress=False)[-1]
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

    print(f"L0 and FVU against each kind's knob: x{expansion:g} on {model} layer -2 patches of {n_images} shape "
          f"images, {tokens:,} training tokens, measured on {len(x):,} of the store's patches")
    print_table([("kind", "kind", "{}"), ("knob", "knob", "{}"), ("value", "value", "{:g}"), ("L0", "l0", "{:.1f}"),
                 ("FVU", "fvu", "{:.3f}"), ("dead", "dead", "{:.1%}")],
                [r for kind_rows in sweeps.values() for r in kind_rows], text_cols=2)
    verdicts = {}
    for kind, kind_rows in sweeps.items():
        knob = SWEEPS[kind][0]
        verdicts[kind] = monotone([r["l0"] for r in kind_rows], falling=knob != "k")
        trend = "rises with k" if knob == "k" else f"falls as {knob} grows"
        print_verdict(f"{kind}: L0 {trend}, over the whole sweep", verdicts[kind])
    print()
    print(f"SAE kinds at matched L0 (target {k}), x{expansion:g}, {tokens:,} training tokens each; evaluated on "
          f"{n_eval} images")
    print_table([("kind", "kind", "{}"), ("knob", "knob", "{}"), ("L0", "l0", "{:.1f}"), ("FVU", "fvu", "{:.3f}"),
                 ("dead", "dead", "{:.1%}"), ("KL spliced", "kl", "{:.4f}"), ("KL mean-abl.", "kl_mean_ablation",
                                                                                "{:.4f}"),
                 ("recovered KL", "recovered_kl", "{:.3f}"), ("cos spliced", "cos", "{:.3f}"),
                 ("recovered cos", "recovered_cos", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
                 ("vs TopK", "speed_vs_topk", "{:.2f}x")], rows, text_cols=2)
    print_notes([
        "sweeps: each kind's SAEs trained together on the same batches; L0 = mean count of positive latents per "
        "patch; dead = no firing over the trainer's dead window at the end of training",
        "matched: ReLU's and JumpReLU's knob interpolated (log-log) from their sweep (same tokens, same batches) to "
        "the target L0",
        "L0 and FVU of the matched table are the SAE's on the evaluation images' patches (BatchTopK kinds at "
        "inference: their learned threshold, so L0 is near, not at, k)",
        "KL: KL(clean || spliced) of the model's own (random) classifier, mean over images; recovered = "
        "(mean-ablated - spliced) / (mean-ablated - clean), 1 = splicing loses nothing",
        "tokens/s: median of the logged intervals of each kind trained alone on the CPU (the PyTorch paths)",
    ])
    run.finish({"machine": machine(), "model": model, "n_images": n_images, "tokens": tokens, "target_l0": k,
                "expansion": expansion, "eval_tokens": len(x),
                "sweeps": {kind: {"knob": SWEEPS[kind][0], "monotone": verdicts[kind], "rows": kind_rows}
                           for kind, kind_rows in sweeps.items()},
                "rows": rows})


if __name__ == "__main__":
    main()
