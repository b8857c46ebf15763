"""`actstore demo`: generated images -> store -> a small SAE -> feature index, every stage once, end to end."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from cli.args import add_command, config_from_args, flags_from


@dataclass(frozen=True)
class DemoConfig:
    """The demo's paths and sizes; every stage's other options keep their defaults."""

    images: str = "./data/demo-images"
    """Where the generated images go (made once, reused)."""
    store: str = "./stores/demo"
    """Activation store URL."""
    sae_out: str = "./stores/demo-sae"
    """Trainer output folder."""
    index: str = "./stores/demo-index"
    """Index folder."""
    model: str = "timm:vit_small_patch16_224"
    """Backbone (random weights)."""
    n_images: int = 256
    """Generated images."""
    tokens: int = 200_000
    """SAE training patches."""
    seed: int = 0
    """Seeds the images, the backbone's weights and the training."""


def run_demo(cfg: DemoConfig) -> str:
    """Run the four stages and print what each did; returns the index folder."""
    from actstore.extract import ExtractConfig, run_extract
    from actstore.store import filesystem
    from actstore.testing.shapes import generate_dataset
    from cli.store import print_info
    from sae.train import TrainConfig, train
    from services.index import IndexConfig, build_index

    fs, root = filesystem(cfg.images, None)
    if not fs.exists(f"{root}/factors.parquet"):
        print(f"[1/4] generating {cfg.n_images} shape images in {cfg.images}")
        generate_dataset(cfg.images, cfg.n_images, seed=cfg.seed, overwrite=True)
    print(f"[2/4] extracting {cfg.model} (random weights), layer -2 -> {cfg.store}")
    r = run_extract(ExtractConfig(images=cfg.images, model=cfg.model, out=cfg.store, init_seed=cfg.seed,
                                  images_per_shard=64, batch_size=32))
    print(f"extracted {r.images_written} images ({r.units_skipped} units already done) in {r.seconds:.1f} s\n")
    print_info(cfg.store)
    print(f"\n[3/4] training a TopK SAE (x8, k=32) on {cfg.tokens} patches -> {cfg.sae_out}")
    rows = train(TrainConfig(store=cfg.store, out=cfg.sae_out, sae=({"name": "topk", "kind": "topk", "expansion": 8,
                                                                    "k": 32},),
                             tokens=cfg.tokens, batch_size=2048, seed=cfg.seed, log_every=25))
    print(f"fvu {rows[-1]['fvu']:.3f}, L0 {rows[-1]['l0']:.1f}, dead {rows[-1]['dead_fraction']:.1%}")
    print(f"\n[4/4] indexing every patch -> {cfg.index}")
    return str(build_index(IndexConfig(store=cfg.store, sae=f"{cfg.sae_out}/topk", out=cfg.index, overwrite=True)))


def cmd_demo(args: argparse.Namespace) -> int:
    out = run_demo(config_from_args(DemoConfig, args, "demo"))
    print(f"\ndone. Browse the features:\n  .venv/bin/actstore serve --index {out}\nthen open http://127.0.0.1:8000/")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "demo", "Images -> store -> small SAE -> feature index; prints the serve command.",
                flags_from("cli.demo:DemoConfig", cmd_demo, config_file=False, quiet=False), chosen)
