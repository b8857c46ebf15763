"""`actstore demo`: generated images -> two backbones' stores -> an SAE each -> feature indexes, an atlas, the first
SAE evaluated inside its model, the two SAEs compared and a report: every stage once, end to end."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from actstore_cli.args import add_command, config_from_args, flags_from

STEPS = 8


@dataclass(frozen=True)
class DemoConfig:
    """The demo's paths and sizes; every stage's other options keep their defaults."""

    images: str = "./data/demo-images"
    """Where the generated images go (made once, reused)."""
    store: str = "./stores/demo"
    """Activation store URL of the first backbone."""
    sae_out: str = "./stores/demo-sae"
    """Trainer output folder of the first backbone's SAE."""
    index: str = "./stores/demo-index"
    """Index folder of the first backbone's SAE (with its atlas)."""
    model: str = "timm:vit_small_patch16_224"
    """First backbone (random weights)."""
    model_b: str = "hf:dinov2-small"
    """Second backbone, of another family (random weights), compared with the first over the same images."""
    store_b: str = "./stores/demo-b"
    """Activation store URL of the second backbone."""
    sae_out_b: str = "./stores/demo-b-sae"
    """Trainer output folder of the second backbone's SAE."""
    index_b: str = "./stores/demo-b-index"
    """Index folder of the second backbone's SAE."""
    compare: str = "./stores/demo-compare"
    """Comparison folder (the two SAEs matched)."""
    report: str = "./stores/demo-report.html"
    """The comparison's HTML report."""
    n_images: int = 128
    """Generated images (both backbones see the same ones)."""
    evaluate_images: int = 32
    """Images the first SAE is evaluated on, spliced into its backbone (four forward passes each)."""
    tokens: int = 200_000
    """SAE training patches, per backbone."""
    seed: int = 0
    """Seeds the images, the backbones' weights and the training."""


def _backbone(cfg: DemoConfig, step: int, model: str, store: str, sae_out: str, index: str) -> None:
    """Extract one backbone (layer -2), train a TopK SAE on its patches and index it."""
    from actstore.extract import ExtractConfig, run_extract
    from actstore_cli.store import print_info
    from sae.train import TrainConfig, train
    from services.index import IndexConfig, build_index

    print(f"[{step}/{STEPS}] extracting {model} (random weights), layer -2 -> {store}")
    r = run_extract(ExtractConfig(images=cfg.images, model=model, out=store, init_seed=cfg.seed,
                                  images_per_shard=64, batch_size=32))
    print(f"extracted {r.images_written} images ({r.units_skipped} units already done) in {r.seconds:.1f} s\n")
    print_info(store)
    print(f"\n[{step + 1}/{STEPS}] training a TopK SAE (x8, k=32) on {cfg.tokens} patches -> {sae_out}, "
          f"then indexing every patch -> {index}")
    rows = train(TrainConfig(store=store, out=sae_out, sae=({"name": "topk", "kind": "topk", "expansion": 8, "k": 32},),
                             tokens=cfg.tokens, batch_size=2048, seed=cfg.seed, log_every=25))
    print(f"fvu {rows[-1]['fvu']:.3f}, L0 {rows[-1]['l0']:.1f}, dead {rows[-1]['dead_fraction']:.1%}")
    build_index(IndexConfig(store=store, sae=f"{sae_out}/topk", out=index, overwrite=True))


def run_demo(cfg: DemoConfig) -> str:
    """Run every stage and print what each did; returns the first index folder."""
    from actstore.store import filesystem
    from actstore.testing.shapes import generate_dataset
    from actstore_cli.compare import print_summary
    from actstore_cli.evaluate import print_result
    from services.evaluate import EvaluateConfig, run_evaluate
    from services.compare import CompareConfig, run_compare
    from services.index.atlas import AtlasConfig, build_atlas
    from services.report import ReportConfig, write_report

    fs, root = filesystem(cfg.images, None)
    if not fs.exists(f"{root}/factors.parquet"):
        print(f"[1/{STEPS}] generating {cfg.n_images} shape images in {cfg.images}")
        generate_dataset(cfg.images, cfg.n_images, seed=cfg.seed, overwrite=True)
    _backbone(cfg, 2, cfg.model, cfg.store, cfg.sae_out, cfg.index)
    build_atlas(AtlasConfig(index=cfg.index, seed=cfg.seed, overwrite=True))
    print(f"atlas (UMAP and PCA of the decoder directions) -> {cfg.index}/atlas.parquet\n")
    print(f"[4/{STEPS}] evaluating the SAE spliced into {cfg.model} on {cfg.evaluate_images} of the images "
          "(clean, spliced, zero- and mean-ablated forward passes)")
    print_result(run_evaluate(EvaluateConfig(sae=f"{cfg.sae_out}/topk", images=cfg.images,
                                             max_images=cfg.evaluate_images)))
    print()
    _backbone(cfg, 5, cfg.model_b, cfg.store_b, cfg.sae_out_b, cfg.index_b)
    print(f"\n[7/{STEPS}] comparing the two SAEs over the same images -> {cfg.compare}")
    print_summary(run_compare(CompareConfig(a=cfg.index, b=cfg.index_b, out=cfg.compare, overwrite=True)))
    print(f"\n[8/{STEPS}] report -> {cfg.report}")
    write_report(ReportConfig(path=cfg.compare, out=cfg.report, overwrite=True))
    return cfg.index


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(DemoConfig, args, "demo")
    out = run_demo(cfg)
    print(f"\ndone. Open the report {cfg.report} in a browser, or browse the features and their matches:\n"
          f"  .venv/bin/actstore serve --index {out} --compare {cfg.compare}\nthen open http://127.0.0.1:8000/")
    return 0


def register(sub: Any, chosen: str | None) -> None:
    add_command(sub, "demo", "Images -> two backbones' stores -> SAEs -> indexes, atlas, comparison, report; "
                "prints the serve command.", flags_from("actstore_cli.demo:DemoConfig", cmd_demo, config_file=False,
                                                        quiet=False), chosen)
