"""The generation head's test setup: tiny pipelines, a store from each one's image encoder, a random SAE on it, and an
index of that SAE (for the service), all under one folder. Shared by the generation tests and the page's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actstore.extract import ExtractConfig, run_extract
from actstore.loader import Normalization
from actstore.store import ActivationStore
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_diffusion import write_tiny_ip_adapter, write_tiny_kandinsky, write_tiny_unclip
from sae import SAEConfig, SparseAutoencoder, checkpoint

LAYER = "0"
"""The SAE's layer: the first of the tiny encoder's two, so that edits of any token reach the embedding (the store
also holds the last, "1")."""


@dataclass(frozen=True)
class Generation:
    pipeline: str
    """The pipeline's folder (unCLIP: also where its image encoder lives)."""
    encoder: str
    """The image encoder's folder: the store's backbone is hf:<encoder>."""
    head: str
    """The head spec that steers it."""
    store: str
    sae: str


def build_generation(root: Path, kind: str = "unclip", n_images: int = 6, seed: int = 0) -> Generation:
    """`kind` is unclip, kandinsky or ip-adapter; the images are `n_images` generated shapes (64 px)."""
    root.mkdir(parents=True, exist_ok=True)
    images = root / "images"
    if not images.exists():
        generate_dataset(str(images), n_images, seed=2, image_size=64)
    if kind == "unclip":
        pipeline = write_tiny_unclip(str(root / kind), seed)
        encoder, head = f"{pipeline}/image_encoder", "generate"
    elif kind == "kandinsky":
        folder = write_tiny_kandinsky(str(root / kind), seed)
        pipeline, encoder = f"{folder}/decoder", f"{folder}/image_encoder"
        head = f"generate:{pipeline}"
    elif kind == "ip-adapter":
        folder = write_tiny_ip_adapter(str(root / kind), seed)
        pipeline, encoder = f"{folder}/sd", f"{folder}/adapter/models/image_encoder"
        head = f"generate:{pipeline}@{folder}/adapter/models/ip-adapter.safetensors"
    else:
        raise ValueError(kind)
    store = str(root / f"store-{kind}")
    run_extract(ExtractConfig(images=str(images), model=f"hf:{encoder}", pretrained="hub", out=store, layers=(0, 1),
                              batch_size=n_images, images_per_shard=n_images, dtype="float32"), progress=False)
    return Generation(pipeline, encoder, head, store, sae_on(store, LAYER, str(root / f"sae-{kind}")))


def sae_on(store: str, layer: str, out: str) -> str:
    """A random TopK SAE (d_sae 64, k 4) on the store's `layer`, behind its normalization, saved at `out`."""
    s = ActivationStore(store)
    norm = Normalization.from_stats(s.stats(layer, "patches"), layer, "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=s.layer(layer).d, d_sae=64, kind="topk", k=4, init_seed=1))
    checkpoint.save(sae, out, normalization=norm, extra=checkpoint.origin(s, layer))
    return out
