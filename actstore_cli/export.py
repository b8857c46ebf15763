"""`actstore export`: an SAE written in another library's layout (SAELens), its origin and normalization kept."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def cmd_export(args: argparse.Namespace) -> int:
    from sae.export import ExportConfig, run_export

    done = run_export(config_from_args(ExportConfig, args, "export"))
    layer = (done["origin"] or {}).get("layer")
    print(f"{done['out']}: {done['kind']} SAE, {done['d_in']} -> {done['d_sae']}, written for {done['to']}"
          + (f" (layer {layer} of its store's model recorded)" if layer is not None else ""))
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "export", "Write an SAE in another library's layout (SAELens).",
                flags_from("sae.export:ExportConfig", cmd_export), chosen)
