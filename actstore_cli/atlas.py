"""`actstore atlas`: a 2-D map of an SAE's features (UMAP and PCA of its decoder directions), kept in its index."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def cmd_atlas(args: argparse.Namespace) -> int:
    from services.index.atlas import AtlasConfig, build_atlas

    cfg = config_from_args(AtlasConfig, args, "atlas")
    out = build_atlas(cfg, progress=not args.quiet)
    print(f"{out}: atlas written; the feature browser shows it\n  actstore serve --index {cfg.index}")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "atlas", "Map an indexed SAE's features in 2-D (UMAP and PCA of the decoder directions).",
                flags_from("services.index.atlas:AtlasConfig", cmd_atlas), chosen)
