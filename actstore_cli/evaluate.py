"""`actstore evaluate`: an SAE spliced into its backbone; what the model's own output keeps (cosine, KL, top-1)."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def print_result(r: dict[str, Any]) -> None:
    """One table: each pass against the clean model, then recovered and the SAE's own FVU and L0."""
    def cell(v: float | None) -> str:
        return f"{v:>14.4g}" if v is not None else f"{'-':>14}"

    head = {"model": "the model's classifier", "zeroshot": f"zero-shot over {r['n_classes']} classes",
            None: "no classes: embeddings only"}[r["head"]]
    print(f"{r['backbone']} layer {r['layer']} ({r['tokens']}), {r['sae_kind']} SAE with {r['d_sae']} latents, "
          f"{r['n_images']} images ({r['n_rejected']} rejected); classes: {head}")
    print(f"{'':<16}{'spliced':>14}{'zero_ablation':>14}{'mean_ablation':>14}{'recovered':>14}")
    for key in ("embedding_cosine", "kl", "top1_agreement"):
        m = r[key]
        print(f"{key:<16}" + "".join(cell(m[p]) for p in ("spliced", "zero_ablation", "mean_ablation"))
              + cell(r["recovered"].get(key)))
    print(f"SAE on these tokens: FVU {r['fvu']:.4f}, L0 {r['l0']:.1f}")
    print(fidelity_line(r["fidelity"]))


def fidelity_line(f: dict[str, Any]) -> str:
    """How the rebuilt backbone compared with its store (services.spliced.Fidelity), for the printed output."""
    if not f["checked"]:
        return ("fidelity check SKIPPED (--no-fidelity-check): the rebuilt backbone was not compared with the "
                "store's activations, so these numbers may come from another model")
    return (f"fidelity check: the rebuilt backbone makes the stored activations of images {f['images']} "
            f"(largest difference {f['max_abs_diff']:.3g}, within {f['tolerance']})")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from services.evaluate import EvaluateConfig, run_evaluate

    cfg = config_from_args(EvaluateConfig, args, "evaluate")
    print_result(run_evaluate(cfg, progress=not args.quiet))
    if cfg.json:
        print(f"{cfg.json}: written")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "evaluate", "Splice an SAE into its backbone and measure what the model's output keeps.",
                flags_from("services.evaluate:EvaluateConfig", cmd_evaluate), chosen)
