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
    options = dict(cfg.storage_options)
    # a missing or corrupt index, or a comparison it is not part of, fails here, as one line, before serving starts
    steer = cfg.steer_options()
    api.create_app(cfg.index, cfg.token, options, cfg.compare, cfg.steer, steer)
    if cfg.steer and steer.device != "auto":  # a device torch cannot see fails now, not at the first request
        from services.api.steering import steer_device

        steer_device(steer.device)
    if cfg.ray:
        init_ray(cfg.address)
        print(f"serving {cfg.index} through Ray Serve at http://{cfg.host}:{cfg.port}/ (Ctrl-C stops)")
        api.run_ray(cfg.index, cfg.host, cfg.port, cfg.token, options, replicas=cfg.replicas, compare=cfg.compare,
                    steer=cfg.steer, steer_options=steer)
    else:
        print(f"serving {cfg.index} at http://{cfg.host}:{cfg.port}/ (Ctrl-C stops)", flush=True)
        api.run(cfg.index, cfg.host, cfg.port, cfg.token, options, workers=cfg.workers, compare=cfg.compare,
                steer=cfg.steer, steer_options=steer)
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "index", "Index an SAE's features over every patch of a store (top images, densities).",
                flags_from("services.index:IndexConfig", cmd_index), chosen)
    add_command(sub, "serve", "Serve a feature index over HTTP: the JSON API and the feature browser.",
                flags_from("services.api.config:ServeConfig", cmd_serve, config_file=False, quiet=False), chosen)
