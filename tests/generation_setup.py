"""The generation head's test setup: a tiny random pipeline (actstore.testing.tiny_diffusion), generated shapes, a
store from the pipeline's image encoder and a random SAE on it (services.steer.setup.generation_store)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_diffusion import write_tiny_ip_adapter, write_tiny_kandinsky, write_tiny_unclip
from services.steer.setup import generation_store, random_sae as sae_on

__all__ = ["Generation", "build_generation", "sae_on"]


@dataclass(frozen=True)
class Generation:
    pipeline: str
    """The pipeline's folder."""
    encoder: str
    """Its image encoder's folder: the store's backbone is hf:<encoder>."""
    head: str
    """The head spec that steers through it."""
    store: str
    sae: str
    """A random TopK SAE on the store's layer "0"."""


def build_generation(root: Path, kind: str = "unclip", n_images: int = 6, seed: int = 0) -> Generation:
    """Under `root`: `n_images` generated shapes (64 px), the tiny pipeline `kind` (unclip, kandinsky or
    ip-adapter), a store of its image encoder's layers 0 and 1, and a random SAE on layer 0."""
    images = root / "images"
    if not images.exists():
        generate_dataset(str(images), n_images, seed=2, image_size=64)
    if kind == "unclip":
        pipeline = write_tiny_unclip(str(root / kind), seed)
        encoder, head = f"{pipeline}/image_encoder", "generate"
    elif kind == "kandinsky":
        folder = write_tiny_kandinsky(str(root / kind), seed)
        pipeline, encoder, head = f"{folder}/decoder", f"{folder}/image_encoder", f"generate:{folder}/decoder"
    elif kind == "ip-adapter":
        folder = write_tiny_ip_adapter(str(root / kind), seed)
        pipeline, encoder = f"{folder}/sd", f"{folder}/adapter/models/image_encoder"
        head = f"generate:{pipeline}@{folder}/adapter/models/ip-adapter.safetensors"
    else:
        raise ValueError(f"kind must be unclip, kandinsky or ip-adapter, got {kind!r}")
    return Generation(pipeline, encoder, head, *generation_store(root, str(images), encoder, kind))
