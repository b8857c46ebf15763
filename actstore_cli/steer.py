"""`actstore steer`: edit SAE features inside the model and compare its predictions for one image before and after."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from
from actstore_cli.evaluate import fidelity_line


def _side(r: dict[str, Any], side: str) -> list[str]:
    out = r[side]
    lines = []
    if "top5" in out:
        names = r["classes"]
        lines.append(", ".join(f"{names[i] if i < len(names) else i} {p:.3f}" for i, p in out["top5"]))
    if "mask" in out:
        lines.extend(" ".join(f"{v:>2}" for v in row) for row in out["mask"])
    lines.extend(f"  {i + 1}. {text!r}" for i, text in enumerate(out.get("responses", [])))
    if out.get("image"):
        lines.append(f"a generated picture ({len(out['image']) * 3 // 4 // 1024} KiB of PNG)")
    return lines


def print_result(r: dict[str, Any]) -> None:
    """The head's output before and after the edits."""
    print(f"{r['backbone']} layer {r['layer']}, image {r['image']}, head {r['head']}; edits: "
          f"{' '.join(r['edits']) or 'none (the clean model)'}")
    for side in ("before", "after"):
        print(f"{side}:")
        for line in _side(r, side):
            print(f"  {line}")
    if "cosine" in r:
        print(f"cosine of the image embeddings before and after: {r['cosine']:.6f}")
    print(fidelity_line(r["fidelity"]))


def cmd_steer(args: argparse.Namespace) -> int:
    from services.steer import SteerConfig, run_steer

    cfg = config_from_args(SteerConfig, args, "steer")
    print_result(run_steer(cfg))
    for path in [f"{cfg.images}.{side}.png" for side in ("before", "after")] if cfg.images else []:
        print(f"{path}: written")
    if cfg.json:
        print(f"{cfg.json}: written")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "steer", "Edit SAE features inside the model; its predictions for one image before and after.",
                flags_from("services.steer:SteerConfig", cmd_steer, quiet=False), chosen)
