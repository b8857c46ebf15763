"""`actstore probe`: a linear probe on a store layer's tokens (image labels or per-patch labels), held-out metrics."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def print_result(r: dict[str, Any], out: str) -> None:
    """What was probed, held-out accuracy against chance (seg: and mIoU), and where the probe is."""
    m = r["metrics"]
    reads = {"cls": "the CLS token", "mean": "the mean of the patches", None: "every patch"}[r["pool"]]
    patches = f" ({r['n_train_rows']} / {r['n_test_rows']} patches)" if r["task"] == "seg" else ""
    print(f"{r['task']} probe on layer {r['layer']} ({reads}, d={r['d']}), {len(r['class_names'])} classes: "
          f"{r['n_train']} training / {r['n_test']} held-out images{patches}")
    line = f"held-out accuracy {m['accuracy']:.3f} (chance {m['chance']:.3f}: always {m['majority_class']!r})"
    if r["task"] == "seg":
        line += f", mIoU {m['miou']:.3f} over the {len(m['iou'])} classes in the held-out patches"
    print(line)
    print(f"{out}: written")


def cmd_probe(args: argparse.Namespace) -> int:
    from actstore.config import redact
    from services.probe import ProbeConfig, train_probe

    cfg = config_from_args(ProbeConfig, args, "probe")
    print_result(train_probe(cfg, progress=not args.quiet), redact(cfg.out))
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "probe", "Train a linear probe on a store layer's tokens and measure it on held-out images.",
                flags_from("services.probe:ProbeConfig", cmd_probe), chosen)
