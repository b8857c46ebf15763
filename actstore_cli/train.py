"""`actstore train`: one SAE, or a sweep of SAEs on the same batches, on a store's patches."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from actstore_cli.args import Command, add_command, add_config_file, add_config_flags, add_quiet, config_from_args

SAE_FLAGS = {"kind": "sae"}
"""SAEConfig fields whose flag has another name (`--sae KIND`)."""


def sweep_from_args(sweep: tuple[dict[str, Any], ...], args: argparse.Namespace) -> tuple[dict[str, Any], ...]:
    """The sweep with the SAE flags applied: `--sae KIND` (with its options) trains one SAE of that kind;
    options without `--sae` apply to every SAE of the sweep (the TOML's, or the default one)."""
    from sae import SAEConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SAEConfig)
             if getattr(args, f.name, None) is not None}
    if not given:
        return sweep
    if "kind" in given:
        return (given,)
    out = []
    for fields in sweep:
        fields = {**fields, **given}
        for a, b in (("d_sae", "expansion"), ("expansion", "d_sae")):  # one sizes the other
            if a in given and b not in given:
                fields.pop(b, None)
        out.append(fields)
    return tuple(out)


def train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig `actstore train` runs: --config, then the training flags, then the SAE flags."""
    from sae.train import TrainConfig

    cfg = config_from_args(TrainConfig, args, "train")
    return dataclasses.replace(cfg, sae=sweep_from_args(cfg.sae, args))


def cmd_train(args: argparse.Namespace) -> int:
    from sae.train import train

    cfg = train_config(args)
    rows = train(cfg, progress=not args.quiet)
    for r in rows:
        print(f"{cfg.out}/{r['sae']}: step {r['step']}, {r['tokens']} tokens, fvu {r['fvu']:.4f}, "
              f"L0 {r['l0']:.1f}, dead {r['dead_fraction']:.1%}, dense {r['dense_fraction']:.1%}")
    return 0


def _configure(parser: argparse.ArgumentParser) -> Command:
    from sae import SAEConfig
    from sae.train import TrainConfig

    add_config_flags(parser, TrainConfig, skip=("sae",))
    add_config_flags(parser.add_argument_group("SAE (one SAE of --sae KIND; without --sae, every SAE of the sweep)"),
                     SAEConfig, skip=("d_in",), rename=SAE_FLAGS)
    add_config_file(parser)
    add_quiet(parser)
    return cmd_train


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "train", "Train one SAE, or a sweep of SAEs on the same batches ([[sae]] tables in --config), "
                "on a store's patches.", _configure, chosen)
