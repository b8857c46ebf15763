"""`actstore explain`: features explained in words (vocabulary names, a VLM's phrases), scored on held-out images,
written into the index as explanations.parquet; the service searches them and the report sums them up."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def cmd_explain(args: argparse.Namespace) -> int:
    from services.explain import ExplainConfig, read_explanations, run_explain

    cfg = config_from_args(ExplainConfig, args, "explain")
    out = run_explain(cfg, progress=not args.quiet)
    table = read_explanations(cfg.index)
    n = 0 if table is None else len(set(table.column("feature").to_pylist()))
    print(f"{out}: {n} features explained\n  actstore serve --index {cfg.index}    (search: /features?q=WORDS)\n"
          f"  actstore report {cfg.index} --out report.html")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "explain", "Explain an indexed SAE's features in words (vocabulary names, a VLM) and score "
                "the explanations on held-out images.", flags_from("services.explain.run:ExplainConfig", cmd_explain),
                chosen)
