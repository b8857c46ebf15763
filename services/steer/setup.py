"""Steering setups in one call: what the steering tests, benchmarks and experiment use.

    build_steering     images (+ masks) -> extract layers (sae_layer, probe_layer) with per-patch labels -> TopK SAE
                       on sae_layer's patches -> its feature index -> a segmentation probe, and a class probe per
                       label table, on probe_layer. The probes read a later layer than the SAE's, so edits reach them
                       through the model's own blocks.
    generation_store   images through a diffusion pipeline's image encoder -> a store of its first two layers -> a
                       random TopK SAE on the first (the generate head's tests and benchmark, on tiny pipelines)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SteeringSetup", "build_steering", "generation_store", "random_sae"]


@dataclass(frozen=True)
class SteeringSetup:
    root: Path
    store: str
    sae: str
    index: str
    seg: str
    """The segmentation probe's folder."""
    probes: dict[str, str] = field(default_factory=dict)
    """Class probes' folders by name."""


def build_steering(root: str | Path, images: str, masks: str, model: str = "open_clip:ViT-S-32-alt",
                   layers: tuple[int, int] = (10, 11), d_sae: int = 512, k: int = 8, tokens: int = 150_000,
                   probes: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = False) -> SteeringSetup:
    """Build everything under `root` (a new or empty folder) from `images` and their `masks` (extract --masks);
    `probes`: {name: ProbeConfig options (labels, label_column, pool...)}, class probes besides the segmentation
    one."""
    from actstore.extract import ExtractConfig, run_extract
    from sae.train import TrainConfig, Trainer
    from services.index import IndexConfig, build_index
    from services.probe import ProbeConfig, train_probe

    root = Path(root)
    sae_layer, probe_layer = (str(v) for v in layers)
    store = str(root / "store")
    run_extract(ExtractConfig(images=images, model=model, out=store, layers=layers, masks=masks, batch_size=32,
                              images_per_shard=48), progress=progress)
    rows = Trainer(TrainConfig(store=store, out=str(root / "train"), layer=sae_layer, tokens=tokens, batch_size=512,
                               checkpoint_every=None, buffer_bytes=1 << 22,
                               sae=({"kind": "topk", "k": k, "d_sae": d_sae},))).fit(progress=progress)
    sae = str(root / "train" / rows[0]["sae"])
    index = build_index(IndexConfig(store, sae, str(root / "index"), k=8), progress=progress)
    train_probe(ProbeConfig(store=store, task="seg", out=str(root / "seg"), layer=probe_layer), progress=progress)
    made = {}
    for name, options in (probes or {}).items():
        made[name] = str(root / name)
        train_probe(ProbeConfig(store=store, task="cls", out=made[name], layer=probe_layer, **options),
                    progress=progress)
    return SteeringSetup(root, store, sae, str(index), str(root / "seg"), made)



def generation_store(root: str | Path, images: str, encoder: str, name: str = "generation") -> tuple[str, str]:
    """(store, sae) under `root`: `images` through hf:`encoder` (a diffusion pipeline's CLIP image encoder), its
    layers 0 and 1, and a random TopK SAE on layer 0 (the first of two: edits of any token there reach the
    embedding) with its origin recorded."""
    from actstore.extract import ExtractConfig, run_extract

    root = Path(root)
    store = str(root / f"store-{name}")
    run_extract(ExtractConfig(images=images, model=f"hf:{encoder}", pretrained="hub", out=store, layers=(0, 1),
                              batch_size=16, images_per_shard=16, dtype="float32"), progress=False)
    return store, random_sae(store, "0", str(root / f"sae-{name}"))


def random_sae(store: str, layer: str, out: str, d_sae: int = 64, k: int = 4) -> str:
    """A random TopK SAE on the store's `layer`, behind its normalization, saved at `out` with its origin."""
    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from sae import SAEConfig, SparseAutoencoder, checkpoint

    s = ActivationStore(store)
    norm = Normalization.from_stats(s.stats(layer, "patches"), layer, "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=s.layer(layer).d, d_sae=d_sae, kind="topk", k=k, init_seed=1))
    checkpoint.save(sae, out, normalization=norm, extra=checkpoint.origin(s, layer))
    return out
