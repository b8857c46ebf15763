"""`actstore report PATH --out FILE.html`: one self-contained HTML page on a training run, an index, a comparison or
a taskfit folder."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import (
    Command,
    add_command,
    add_config_file,
    add_config_flags,
    add_quiet,
    config_from_args,
)


def cmd_report(args: argparse.Namespace) -> int:
    from services.report import ReportConfig, write_report

    out = write_report(config_from_args(ReportConfig, args, "report", extra={"path": args.path}),
                       progress=not args.quiet)
    print(f"{out}: report written (open it in a browser; it needs nothing else)")
    return 0


def _configure(parser: argparse.ArgumentParser) -> Command:
    from services.report import KINDS, ReportConfig

    parser.add_argument("path", help="what to report on: " + "; ".join(KINDS.values()))
    add_config_flags(parser, ReportConfig, skip=("path",))
    add_config_file(parser)
    add_quiet(parser)
    return cmd_report


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "report", "Write an HTML report (figures and images inline) on a training run, a feature index, "
                "a comparison or a taskfit folder.", _configure, chosen)
