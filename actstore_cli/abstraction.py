"""`actstore abstraction`: how abstract each model's features are in a label hierarchy, models side by side."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def model_names(indexes: Sequence[str]) -> list[str]:
    """A short distinct name per index folder: its last path parts, as many as tell them apart."""
    paths = [Path(i).resolve().parts for i in indexes]
    for n in range(1, max(map(len, paths)) + 1):
        names = ["/".join(p[-n:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(Path(i).resolve()) for i in indexes]


def print_profiles(infos: Mapping[str, Mapping[str, Any]]) -> None:
    """Per model its backbone and hierarchy, then the profiles side by side (services.abstraction.profile_table)."""
    from services.abstraction import profile_table

    named = dict(zip(model_names(list(infos)), infos.values()))
    for name, info in named.items():
        bb, h = info["backbone"], info["hierarchy"]
        source = h.get("file") or ",".join(h.get("columns") or [])
        print(f"{name}: {bb.get('family')}:{bb.get('name')} layer {info['layer']}, {info['profile']['features']} "
              f"features, top {info['k']} images each; {h['nodes']} nodes in {h['depth']} depths ({h['source']} "
              f"{source}), min_share {info['min_share']:g}")
    header, rows = profile_table(named)
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))))


def cmd_abstraction(args: argparse.Namespace) -> int:
    from services.abstraction import AbstractionConfig, run_abstraction
    from services.report.page import check_out

    cfg = config_from_args(AbstractionConfig, args, "abstraction")
    if cfg.report:
        check_out(cfg.report, cfg.overwrite, cfg.storage_options or None)  # before any work
    infos = run_abstraction(cfg, progress=not args.quiet)
    print_profiles(infos)
    print(f"\nwritten into each index: abstraction.parquet, abstraction.json ({len(infos)} indexes)")
    if cfg.report:
        from services.report.abstraction import write_abstraction_report

        write_abstraction_report(cfg, dict(zip(model_names(list(infos)), infos)), cfg.report)
        print(f"{cfg.report}: report written")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "abstraction", "Place each indexed SAE's features in a label hierarchy (a parents table or "
                "label columns): per model, how many features sit at each depth.",
                flags_from("services.abstraction.run:AbstractionConfig", cmd_abstraction), chosen)
