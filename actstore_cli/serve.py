"""`actstore index` and `actstore serve`: an SAE's features over a store, indexed and served over HTTP."""

from __future__ import annotations

import argparse
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from


def cmd_index(args: argparse.Namespace) -> int:
    from services.index import IndexConfig, build_index

    out = build_index(config_from_args(IndexConfig, args, "index"), progress=not args.quiet)
    print(f"{out}: index written; serve it with\n  actstore serve --index {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from actstore.cluster import init_ray
    from services import api
    from services.api.config import ServeConfig

    cfg = config_from_args(ServeConfig, args, "serve")
    options, steer = dict(cfg.storage_options), cfg.steer_options()
    # both runners refuse a missing or corrupt index, a comparison it is not part of, another model's SAE or a device
    # torch cannot see as one line before serving starts, and keep no app of their own beside the workers
    if cfg.ray:
        init_ray(cfg.address)
        api.run_ray(cfg.index, cfg.host, cfg.port, cfg.token, options, replicas=cfg.replicas, compare=cfg.compare,
                    steer=cfg.steer, steer_options=steer)
    else:
        api.run(cfg.index, cfg.host, cfg.port, cfg.token, options, workers=cfg.workers, compare=cfg.compare,
                steer=cfg.steer, steer_options=steer)
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "index", "Index an SAE's features over every patch of a store (top images, densities).",
                flags_from("services.index:IndexConfig", cmd_index), chosen)
    add_command(sub, "serve", "Serve a feature index over HTTP: the JSON API and the feature browser.",
                flags_from("services.api.config:ServeConfig", cmd_serve, config_file=False, quiet=False), chosen)
