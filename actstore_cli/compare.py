"""`actstore compare`: the features of two SAEs over the same images, matched."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def print_summary(summary: dict[str, Any]) -> None:
    """Live/dead counts, the best-match distribution and the top matches, as researchers report them."""
    name = {"activations": "pearson", "decoder": "cosine"}[summary["by"]]
    for side in ("a", "b"):
        s, best = summary[side], summary["best"][side]
        bb = s["backbone"]
        print(f"{side.upper()}: {bb.get('family')}:{bb.get('name')} layer {s['layer']}, {s['d_sae']} features, "
              f"{s['live']} live, {s['dead']} dead on these images")
        if best["n"]:
            above = best["above"]
            print(f"   best {name}: mean {best['mean']:.3f}, median {best['median']:.3f}; "
                  f"> 0.5: {above['0.5']}, > 0.7: {above['0.7']}, > 0.9: {above['0.9']}")
    mean = summary["assignment"]["mean"]
    print(f"{summary['n_images']} images ({summary['level']} level), {summary['mutual']} mutual best matches, "
          f"one-to-one assignment: {summary['assignment']['pairs']} pairs, mean {name} "
          f"{'-' if mean is None else f'{mean:.3f}'}")
    if summary["top_matches"]:
        print(f"\ntop matches (mutual, firing on >= min_images and <= half of the images):\n"
              f"{'feature_a':>10} {'feature_b':>10} {name:>8} {'max_diff':>9}")
        for t in summary["top_matches"]:
            print(f"{t['feature_a']:>10} {t['feature_b']:>10} {t['similarity']:>8.3f} {t['max_diff']:>9.2f}")


def cmd_compare(args: argparse.Namespace) -> int:
    from services.compare import CompareConfig, run_compare

    cfg = config_from_args(CompareConfig, args, "compare")
    print_summary(run_compare(cfg, progress=not args.quiet))
    print(f"\n{cfg.out}: comparison written (summary.json, matches_a.parquet, matches_b.parquet, assignment.parquet)")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "compare", "Match the features of two SAEs over the same images (correlation, assignment).",
                flags_from("services.compare:CompareConfig", cmd_compare), chosen)
