"""The models taskfit compares: each an SAE on the layer of a store it was trained on, opened from an index folder
or SAE_DIR@STORE_URL exactly as `actstore compare` opens a side (services.compare.sides), with a name; an image's
value of a feature is its largest over the image's patches, or its value on the CLS / pooled token for an SAE
trained on that token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from actstore.store import ActivationStore
from sae import TokenEncoder
from services.compare.sides import Side, common_images, open_side

__all__ = ["Model", "check_same_images", "distinct_names", "open_model"]


@dataclass(frozen=True)
class Model:
    """One model opened (a comparison's side) and its name in the tables."""

    side: Side
    name: str

    @property
    def encoder(self) -> TokenEncoder:
        return self.side.encoder

    @property
    def store(self) -> ActivationStore:
        return self.side.store

    @property
    def d_sae(self) -> int:
        return self.side.sae.cfg.d_sae

    def image_values(self, x: torch.Tensor) -> torch.Tensor:
        """A block of the store (images, layer tokens, d) -> (images, features) float32: each feature's largest value
        over an image's tokens of the SAE's kind; 0 where it never fires."""
        return self.side.rows(x, "image", self.side.sae.W_dec.device)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.side.describe()}


def open_model(spec: str, i: int, device: torch.device, storage_options: dict[str, Any]) -> Model:
    """Model i (from 1, as messages name it): an index folder, or SAE_DIR@STORE_URL."""
    side = open_side(spec, f"model {i}", storage_options, device, "taskfit")
    return Model(side, f"{side.store.attrs.get('backbone', {}).get('name', 'model')}/{side.spec.name}")


def distinct_names(models: Sequence[Model]) -> list[Model]:
    """The models, those whose names repeat an earlier one's numbered (#2, #3, ...)."""
    seen: dict[str, int] = {}
    out = []
    for m in models:
        seen[m.name] = seen.get(m.name, 0) + 1
        out.append(m if seen[m.name] == 1 else replace(m, name=f"{m.name}#{seen[m.name]}"))
    return out


def check_same_images(models: Sequence[Model]) -> None:
    """Refuses models whose stores are not over the same images (same URIs, same order), naming the first
    difference."""
    common_images([m.side for m in models], [f"model {i}" for i in range(1, len(models) + 1)], "taskfit")
