"""`actstore extract`: images -> backbone activations -> a store, on Ray."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def cmd_extract(args: argparse.Namespace) -> int:
    from actstore.extract import ExtractConfig, run_extract

    r = run_extract(config_from_args(ExtractConfig, args, "extract"), progress=not args.quiet)
    state = "complete" if r.complete else f"partial ({r.units_skipped + r.units_written}/{r.units_total} units)"
    unmasked = f", {r.n_unmasked} without a mask" if r.n_unmasked else ""
    print(f"{r.url}: {state}; {r.units_written} units written ({r.images_written} images, {r.n_rejected} "
          f"rejected{unmasked}), {r.units_skipped} already done; {r.images_per_second:.1f} images/s over "
          f"{r.seconds:.1f} s")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "extract", "Run a backbone over an image dataset and write an activation store (Ray).",
                flags_from("actstore.extract:ExtractConfig", cmd_extract), chosen)
