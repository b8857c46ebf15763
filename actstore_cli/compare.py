"""`actstore compare`: the features of two SAEs over the same images, matched; or of several, every pair."""

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


def print_set_summary(summary: dict[str, Any]) -> None:
    """The models, the matrix of best matches between them, and each model's features by where they have
    partners."""
    names, sim = summary["names"], {"activations": "pearson", "decoder": "cosine"}[summary["by"]]
    for i, s in enumerate(summary["sides"]):
        bb = s["backbone"]
        print(f"{i + 1}. {names[i]}: {bb.get('family')}:{bb.get('name')} layer {s['layer']}, {s['d_sae']} features, "
              f"{s['live']} live on these images")
    width = max(10, *(len(n) + 1 for n in names))
    matrix, threshold = summary["matrix"], summary["threshold"]
    for title, rows, fmt in ((f"mean best {sim} of the row model's live features in the column model",
                              matrix["mean_best"], "{:.3f}"),
                             (f"share of the row model's live features with a partner above {threshold:g}",
                              _above(matrix, threshold), "{:.1%}")):
        print(f"\n{title}:\n{'':<{width}}" + "".join(f"{n:>{width}}" for n in names))
        for name, row in zip(names, rows):
            print(f"{name:<{width}}" + "".join(f"{'-' if v is None else fmt.format(v):>{width}}" for v in row))
    pairs = summary["pairs"]
    print(f"\n{summary['n_images']} images ({summary['level']} level), {len(pairs)} pair{'s' * (len(pairs) > 1)} in "
          f"{summary['passes']} passes over the stores; mutual best matches per pair: "
          + ", ".join(f"{names[p['a']]} x {names[p['b']]} {p['mutual']}" for p in pairs))
    n = len(names)
    print(f"\nfeatures by the models where they have a partner above {threshold:g} (their own included):")
    for name, groups in zip(names, summary["groups"]):
        print(f"  {name}: " + ", ".join(f"{group_label(g, n)} {g['features']}" for g in groups))


def _above(matrix: dict[str, Any], threshold: float) -> list[list[float | None]]:
    """The matrix's share above `threshold` when it is one of its thresholds, else above 0.7."""
    return matrix["above"].get(f"{threshold:g}", matrix["above"]["0.7"])


def group_label(group: dict[str, Any], n: int) -> str:
    """A group as said: "shared by all", "unique", or the models that share it ("with CLIP+SigLIP")."""
    m = group["n_models"]
    return "shared by all" if m == n else "unique" if m == 1 else f"with {group['group']}"


def cmd_compare(args: argparse.Namespace) -> int:
    from services.compare import CompareConfig, run_compare

    cfg = config_from_args(CompareConfig, args, "compare")
    summary = run_compare(cfg, progress=not args.quiet)
    if cfg.side:
        print_set_summary(summary)
        print(f"\n{cfg.out}: comparison written (summary.json, shared.parquet, each pair's comparison under pairs/)")
        return 0
    print_summary(summary)
    print(f"\n{cfg.out}: comparison written (summary.json, matches_a.parquet, matches_b.parquet, assignment.parquet)")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "compare", "Match the features of two SAEs (or several: every pair) over the same images.",
                flags_from("services.compare:CompareConfig", cmd_compare), chosen)
