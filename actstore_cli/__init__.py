"""The `actstore` command: one subcommand per stage, on top of every package (the only code that imports them all).

    info, verify      actstore_cli.store     what a store holds; whether every byte is intact
    extract           actstore_cli.extract   images -> backbone activations -> a store (Ray)
    train             actstore_cli.train     SAEs on a store's patches
    evaluate          actstore_cli.evaluate  an SAE spliced into its backbone: what the model's own output keeps
    steer             actstore_cli.steer     SAE features edited inside the model: its predictions before and after
    index, serve      actstore_cli.serve     an SAE's features indexed over a store, served over HTTP
    atlas             actstore_cli.atlas     a 2-D map of an indexed SAE's features (UMAP, PCA), kept in its index
    explain           actstore_cli.explain   an indexed SAE's features in words (vocabulary, a VLM), scored
    compare           actstore_cli.compare   the features of two SAEs (or every pair of several) over the same
                                             images, matched; what several models share
    abstraction       actstore_cli.abstraction  each SAE's features placed in a label hierarchy, models side by side
    export            actstore_cli.export    an SAE written in another library's layout (SAELens)
    probe             actstore_cli.probe     a linear probe on a layer's tokens (image or patch labels), held-out
                                             metrics
    taskfit           actstore_cli.taskfit   which models' SAE features fit a labelled task (1-D, k-sparse, dense
                                             probes), ranked against the dense probe
    report            actstore_cli.report    an HTML page on a training run, an index, a comparison or a taskfit
                                             folder (matplotlib)
    demo              actstore_cli.demo      all of the above on generated images

Flags, help texts and defaults come from the stages' config dataclasses (actstore_cli.args). Errors of the
project's own family, raised here or inside a Ray worker, and storage failures (credentials, access,
bucket, endpoint) print as one line (`error: ...`) and exit 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from actstore.errors import user_error
from actstore_cli import (abstraction, atlas, compare, demo, evaluate, explain, export, extract, probe, report, serve,
                          steer, store, taskfit, train)

GROUPS = (store, extract, train, evaluate, steer, serve, compare, abstraction, atlas, explain, probe, taskfit, report,
          export, demo)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s flags are built (None: every command's)."""
    parser = argparse.ArgumentParser(prog="actstore", description="Activation stores for vision SAEs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as e:  # noqa: BLE001 - ours (from any Ray worker) and storage failures: one line
        error = user_error(e)
        if error is None:
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 1
