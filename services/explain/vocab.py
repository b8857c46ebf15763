"""Vocabulary names, no VLM: a CLIP or SigLIP feature named by the words its top images sit closest to.

Each feature's top images (the ones a VLM explainer sees) are embedded by the store's own model, their unit
embeddings averaged; every word of the vocabulary is embedded by the model's text tower through the prompt template.
A word's score is its cosine with the feature's mean minus its cosine with the mean of a reference set of images (the
pool of services.explain.pool): words close to every image ("a photo") score nothing, and what is left is what sets
the feature's images apart. The vocabulary is the store's class names and the built-in concept list (concepts.txt:
colours, textures, shapes, parts, materials, scenes), or a file of the user's, one word or phrase per line.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from actstore.config import redact
from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone
from actstore.extract.zeroshot import TextTower, read_names
from services.spliced import decode_images

__all__ = ["CONCEPTS", "ImageEmbeddings", "best_words", "read_vocabulary"]

CONCEPTS = Path(__file__).with_name("concepts.txt")


def read_vocabulary(path: str | None, class_names: Sequence[str], storage_options: dict[str, Any]) -> list[str]:
    """The words to name features with: the file at `path` (one per line, # comments), else the class names and the
    built-in concepts; duplicates dropped, first occurrence kept."""
    if path is not None:
        words = read_names(path, storage_options, "vocabulary")
    else:
        words = [*(n.replace("_", " ") for n in class_names), *read_names(str(CONCEPTS), {}, "concepts")]
    return list(dict.fromkeys(words))


def best_words(top: Tensor, reference: Tensor, words: Tensor, n: int) -> tuple[list[int], list[float]]:
    """The n best words (indices into `words`, best first) and their scores, for a feature whose top images have the
    unit embeddings `top` (n_top, d), against the reference mean embedding (d,); `words` (V, d) unit."""
    centre = F.normalize(top.mean(0), dim=0)
    scores = words @ centre - words @ F.normalize(reference, dim=0)
    values, order = scores.topk(min(n, scores.numel()))
    return order.tolist(), values.tolist()


class ImageEmbeddings:
    """Images' unit embeddings in the text tower's space, by image id: decoded and preprocessed as the store's model
    saw them, through the whole backbone (`Backbone.outputs`); the last `cache` kept."""

    def __init__(self, backbone: Backbone, tower: TextTower, uris: pa.Array, storage_options: dict[str, Any],
                 batch: int = 32, cache: int = 16384) -> None:
        self.backbone, self.tower, self.uris = backbone, tower, uris
        self.storage_options, self.batch, self.cache = storage_options, batch, cache
        self._held: OrderedDict[int, Tensor] = OrderedDict()

    def __call__(self, ids: Sequence[int]) -> Tensor:
        """(len(ids), d) float32 unit embeddings, in the order of `ids`."""
        missing = list(dict.fromkeys(i for i in ids if i not in self._held))
        device = next(self.backbone.parameters()).device
        for s in range(0, len(missing), self.batch):
            part = missing[s:s + self.batch]
            pixels, rejected = decode_images(self.backbone, [self.uris[i].as_py() for i in part], self.storage_options)
            if rejected:
                raise ConfigError(f"cannot embed image {redact(rejected[0])}")
            with torch.no_grad():
                vecs = self.tower.images(self.backbone.outputs(pixels.to(device))[0]).cpu()
            self._held.update(zip(part, vecs))
        out = torch.stack([self._held[i] for i in ids]) if ids else torch.empty(0)
        for i in ids:
            self._held.move_to_end(i)
        while len(self._held) > self.cache:
            self._held.popitem(last=False)
        return out
