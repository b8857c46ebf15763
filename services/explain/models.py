"""Everything `actstore explain` computes with, opened from what the index names and checked together.

The index records its store, SAE and layer. The SAE is loaded on that store (sae.checkpoint: an SAE of another model
or layer is refused); where the store's model is a CLIP or SigLIP, its backbone is rebuilt as evaluate and steer
rebuild it (services.spliced.load_in_model: checked to make the store's activations) and its text tower opened, for
vocabulary names and embedding scores. The VLM backends are opened last, after every check has passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.zeroshot import TextTower, text_tower
from actstore.store import ActivationStore
from sae import TokenEncoder
from sae.checkpoint import load_on_store
from services.api.reader import IndexReader
from services.explain.backends import Backend, open_backend
from services.explain.scores import auroc
from services.explain.vocab import ImageEmbeddings, read_vocabulary
from services.spliced import load_in_model

if TYPE_CHECKING:
    from services.explain.run import ExplainConfig

__all__ = ["TEXT_FAMILIES", "Models", "open_models"]

TEXT_FAMILIES = ("open_clip", "hf")
"""Backbone families whose models may have a text tower (CLIP, SigLIP)."""
ARRAYS = ("top_images", "heatmaps", "band_images")


@dataclass
class Models:
    """The index, its store and SAE, and what explains and judges (None where not used)."""

    reader: IndexReader
    store: ActivationStore
    encoder: TokenEncoder
    explainers: list[str]
    backbone_name: str
    image_size: int
    template: str
    explainer: Backend | None = None
    judge: Backend | None = None
    tower: TextTower | None = None
    embed: ImageEmbeddings | None = None
    words: list[str] | None = None
    word_vectors: Tensor | None = None
    reference: Tensor | None = None
    """Mean unit embedding of the pool's images: what vocabulary scores are taken relative to."""

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        return {name: self.reader.array(name) for name in ARRAYS}

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.reader.meta["grid"])  # type: ignore[return-value]

    def thumbnail(self, i: int) -> bytes:
        """Image i as the model saw it, JPEG, image_size square."""
        return self.reader.thumbnail(i, self.image_size)

    def set_reference(self, images: np.ndarray) -> None:
        if self.embed is not None:
            self.reference = self.embed([int(i) for i in images]).mean(0)

    def embedding_auroc(self, explanation: str, activating: list[int], silent: list[int]) -> float | None:
        """AUROC of the explanation's text embedding's cosine with the held-out images' embeddings."""
        if self.tower is None or self.embed is None or not activating or not silent:
            return None
        text = self.tower.texts([self.template.format(explanation)])[0]
        labels = [True] * len(activating) + [False] * len(silent)
        return auroc((self.embed(activating + silent) @ text).tolist(), labels)

    def close(self) -> None:
        for backend in {id(b): b for b in (self.explainer, self.judge) if b is not None}.values():
            backend.close()
        self.store.close()


def open_models(cfg: ExplainConfig, say: Any = print) -> Models:
    """Open and check the index's SAE, store and (CLIP/SigLIP) backbone, then the backends cfg names."""
    options = cfg.storage_options
    reader = IndexReader(cfg.index, options)
    meta = reader.meta
    recorded = meta.get("backbone") or {}
    backbone_name = f"{recorded.get('family')}:{recorded.get('name')}"
    tower = embed = None
    if recorded.get("family") in TEXT_FAMILIES:
        m = load_in_model(meta["sae"], meta["store"], cfg.device, options, cfg.fidelity_check, layer=meta["layer"])
        encoder, backbone_name = m.encoder("patches"), m.backbone.cfg.model
        try:
            tower = text_tower(m.backbone.cfg)
        except ConfigError as e:
            if cfg.explainer is None:
                raise
            say(f"no vocabulary names or embedding scores: {e}")
        if tower is not None:
            embed = ImageEmbeddings(m.backbone, tower, reader.images["uri"], options)
        store = ActivationStore(m.store_url, options)
    else:
        store = ActivationStore(meta["store"], options)
        sae, norm, spec = load_on_store(meta["sae"], store, meta["layer"], cfg.device, options)
        encoder = TokenEncoder(sae, norm, spec, "patches")
    if encoder.sae.cfg.d_sae != reader.n_features:  # the SAE at that path was replaced since the index was built
        store.close()
        raise ConfigError(f"{cfg.index} indexes {reader.n_features} features; the SAE it names ({meta['sae']}) now "
                          f"has {encoder.sae.cfg.d_sae}: index it again")
    explainers = (["vocabulary"] if tower is not None and cfg.vocabulary_names else []) + \
        (["vlm"] if cfg.explainer else [])
    if not explainers:
        store.close()
        raise ConfigError(f"nothing to explain with: {backbone_name} has no text tower for vocabulary names "
                          "(CLIP and SigLIP stores have one); name a VLM with --explainer hf:MODEL or openai:MODEL")
    models = Models(reader, store, encoder, explainers, backbone_name, cfg.image_size, cfg.template, tower=tower,
                    embed=embed)
    if "vocabulary" in explainers:
        models.words = read_vocabulary(cfg.vocabulary, reader.class_names, options)
        models.word_vectors = tower.texts([cfg.template.format(w) for w in models.words])
    kwargs = {"endpoint": cfg.endpoint, "api_key_env": cfg.api_key_env, "concurrency": cfg.concurrency,
              "device": cfg.device}
    if cfg.explainer:
        models.explainer = open_backend(cfg.explainer, **kwargs)
    judge = cfg.judge or cfg.explainer
    if judge:
        models.judge = models.explainer if judge == cfg.explainer else open_backend(judge, **kwargs)
    return models
