"""Zero-shot classifiers from a backbone's text tower: class prompts -> text embeddings -> logits of image embeddings.

The image embedding is what `Backbone.outputs` returns (open_clip: the projected embedding; transformers: the pooled
output, projected here by the model's own visual projection). Logits are the model's own: logit_scale.exp() times
the cosine, plus logit_bias where the model has one (SigLIP). Pretrained weights come from the same tag, file, hub
id or folder as the image tower's, so each image tower meets its own text tower. Random weights are seeded with the
image tower's seed: open_clip builds both towers in one call, so they are the pair the store's random model had;
transformers builds the full model here (its image tower is not the store's, which is as untrained).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.backbones import BackboneConfig
from actstore.extract.hf import HF_CONFIGS, hf_source
from actstore.extract.hooked import HUB_WEIGHTS, checkpoint_path, seeded

__all__ = ["DEFAULT_TEMPLATE", "TextTower", "ZeroShot", "read_names", "text_tower", "zero_shot_classifier"]

DEFAULT_TEMPLATE = "a photo of a {}."
"""CLIP's prompt for ImageNet-style class names."""

ZeroShot = Callable[[Tensor], Tensor]
"""(B, d) image embeddings -> (B, n_classes) logits."""


@dataclass(frozen=True)
class TextTower:
    """A CLIP or SigLIP text tower with what places the image tower's embeddings beside it: `texts` and `images`
    both give unit vectors of one space (their dot product is the model's cosine); `scale` and `bias` make it the
    model's own logits."""

    encode: Callable[[list[str]], Tensor]
    """Texts -> (n, d) text embeddings as the model makes them (unnormalized)."""
    project: Callable[[Tensor], Tensor]
    """Image embeddings (what `Backbone.outputs` returns) -> the joint space (unnormalized)."""
    scale: Tensor
    bias: Tensor | None

    def texts(self, texts: Sequence[str], batch: int = 256) -> Tensor:
        """(n, d) unit text embeddings, float32 on the CPU, `batch` texts a forward."""
        with torch.no_grad():
            return torch.cat([F.normalize(self.encode(list(texts[s:s + batch])).float(), dim=-1)
                              for s in range(0, len(texts), batch)])

    def images(self, embedding: Tensor) -> Tensor:
        """(n, d) unit image embeddings in the joint space, float32."""
        with torch.no_grad():
            return F.normalize(self.project(embedding).float(), dim=-1)

    def classifier(self, prompts: Sequence[str]) -> ZeroShot:
        """The model's own logits over `prompts`: logit_scale.exp() times the cosine, plus logit_bias (SigLIP)."""
        text = self.texts(prompts)
        scale = self.scale.detach().float().exp()
        bias = None if self.bias is None else self.bias.detach().float()

        def logits(embedding: Tensor) -> Tensor:
            image = self.images(embedding)
            out = scale * image @ text.to(image.device).T
            return out if bias is None else out + bias.to(image.device)
        return logits


def _open_clip(cfg: BackboneConfig) -> TextTower:
    import open_clip

    path = checkpoint_path(cfg.pretrained)
    model = seeded(cfg.init_seed, open_clip.create_model, cfg.arch, pretrained=path or cfg.pretrained).eval()
    try:
        tokenizer = open_clip.get_tokenizer(cfg.arch)
    except Exception as e:  # tokenizers of hf-hub models are downloads
        raise ConfigError(f"{cfg.model}: its tokenizer is not available here: {' '.join(str(e).split())[:200]}") from e
    return TextTower(lambda texts: model.encode_text(tokenizer(texts)), lambda e: e, model.logit_scale,
                     getattr(model, "logit_bias", None))


def _hf(cfg: BackboneConfig) -> TextTower:
    import transformers

    source, where = hf_source(cfg.arch)
    if source == "builtin":
        if cfg.pretrained != HUB_WEIGHTS:
            raise ConfigError(f"{cfg.model} with random weights has no tokenizer here; zero-shot needs a hub id or a "
                              "folder with the full model and its tokenizer")
        where = HF_CONFIGS[cfg.arch][0]
    if cfg.pretrained not in (None, HUB_WEIGHTS):
        where = checkpoint_path(cfg.pretrained)
        if not os.path.isdir(where):
            raise ConfigError(f"{cfg.model}: zero-shot needs the full model as a folder, not the weights file {where}")
    try:
        if cfg.pretrained is None:  # random weights: the same seeded creation as the image tower's config
            config = transformers.AutoConfig.from_pretrained(where)
            model = seeded(cfg.init_seed, transformers.AutoModel.from_config, config)
        else:
            model = transformers.AutoModel.from_pretrained(where, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{cfg.model}: no text tower or tokenizer: {' '.join(str(e).split())[:200]}") from e
    if not hasattr(model, "get_text_features"):
        raise ConfigError(f"{cfg.model}: {type(model).__name__} has no text tower; zero-shot needs CLIP or SigLIP")
    model.eval()
    # to the model's length, as CLIP and SigLIP were trained (SigLIP's pooling depends on it); to the longest
    # prompt where the tokenizer names no length
    padding = "max_length" if tokenizer.model_max_length <= 4096 else "longest"

    def encode(texts: list[str]) -> Tensor:
        text = model.get_text_features(**tokenizer(texts, padding=padding, truncation=True, return_tensors="pt"))
        return getattr(text, "pooler_output", text)
    project = getattr(model, "visual_projection", None) or (lambda e: e)  # SigLIP: pooled output is the embedding
    return TextTower(encode, project, model.logit_scale, getattr(model, "logit_bias", None))


def text_tower(cfg: BackboneConfig) -> TextTower:
    """The text tower of `cfg`'s backbone (open_clip, or a transformers CLIP or SigLIP); a one-line ConfigError for
    a backbone that has none."""
    if cfg.family == "open_clip":
        return _open_clip(cfg)
    if cfg.family == "hf":
        return _hf(cfg)
    raise ConfigError(f"{cfg.model}: {cfg.family} models have no text tower (CLIP and SigLIP backbones have one)")


def read_names(path: str, storage_options: dict[str, Any], what: str = "class-names") -> list[str]:
    """Names for a text tower's prompts from a file (local or any fsspec URL), one per line, blank lines and `#`
    comments skipped; a one-line ConfigError when it is missing or names nothing."""
    try:
        with fsspec.open(path, "r", **storage_options) as f:
            names = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what} file") from None
    if not names:
        raise ConfigError(f"{path}: no names in it")
    return names


def zero_shot_classifier(cfg: BackboneConfig, class_names: Sequence[str],
                         template: str = DEFAULT_TEMPLATE) -> ZeroShot:
    """Logits over `class_names` (prompted with `template`) for the image embeddings of `cfg`'s backbone."""
    if not class_names:
        raise ConfigError("zero-shot classification needs class names")
    if "{}" not in template:
        raise ConfigError(f"the prompt template must contain {{}} for the class name, got {template!r}")
    return text_tower(cfg).classifier([template.format(name) for name in class_names])
