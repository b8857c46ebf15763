"""Vision backbones (open_clip, timm, transformers) that return chosen layers' tokens in one forward pass.

`load_backbone(BackboneConfig("timm:vit_small_patch14_reg4_dinov2", layers=(-2,)))` gives a frozen
nn.Module mapping uint8 images (B, 3, H, W) to {layer name: (B, T, d)}, plus the `LayerSpec`s and
backbone attrs the store records. Preprocessing is split (actstore.extract.preprocess): decode tasks
run the model's own PIL steps to uint8, and `Backbone.normalize` does the rest on the model's device.

Layers are the outputs of the model's blocks, named by index ("10"). ViTs keep the CLS token (as
token 0, when the model has one) and drop the other prefix tokens (registers). open_clip's
ModifiedResNets (RN50, ...) have five layers: "stage1".."stage4" (the stages' spatial maps as patch
tokens, no CLS) and "attnpool" (the pooled embedding, one token), so -1 is "attnpool" and -2 "stage4".

transformers models (`hf:`) are CLIP and SigLIP vision towers, DINOv2 (with and without registers) and
V-JEPA 2, named by a hub id, a local folder or a built-in config name (HF_CONFIGS); their layers are the
encoder layers, the same tokens as `output_hidden_states=True`'s hidden_states[i + 1].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from actstore.errors import ConfigError
from actstore.extract.hf import HF, HF_CONFIGS, HF_MODEL_TYPES
from actstore.extract.hooked import HUB_WEIGHTS, Backbone, Family, Head, ViT, checkpoint_path, seeded
from actstore.extract.preprocess import Preprocessor
from actstore.store import LayerSpec, TokenLayout

__all__ = ["FAMILIES", "HF_CONFIGS", "HF_MODEL_TYPES", "HUB_WEIGHTS", "Backbone", "BackboneConfig", "Preprocessor",
           "load_backbone"]


@dataclass(frozen=True)
class BackboneConfig:
    """Which vision model, which of its layers, and which weights."""

    model: str
    """"<family>:<arch>", e.g. "open_clip:ViT-B-32", "open_clip:RN50", "timm:vit_small_patch14_reg4_dinov2",
    "hf:facebook/dinov2-small" (a hub id, a local folder with config.json, or a built-in name: "hf:dinov2-small")."""
    layers: tuple[int | str, ...] = (-2,)
    """Block indices (negative count from the end: -2 = second to last block) or layer names ("attnpool")."""
    pretrained: str | None = None
    """An open_clip tag ("laion2b_s34b_b79k"), a timm tag or "hub" (timm's default weights; for hf: the weights
    of the model's hub id or folder), a local checkpoint file (hf: also a saved folder), loaded by the same
    library code as the tags, or None for seeded random weights."""
    init_seed: int = 0
    """Seed of the random initialization, so that two loads of random weights are identical."""
    trust_remote_code: bool = False
    """hf: run the modeling code a model ships (auto_map in its config.json: actstore.extract.remote_vlm); never
    recorded in a store, so each command that loads such a model must be given it again."""

    def __post_init__(self) -> None:
        family, sep, arch = str(self.model).partition(":")
        if not sep or not arch or family not in FAMILIES:
            raise ConfigError(f"unknown backbone {self.model!r}; use open_clip:<arch> or timm:<arch> or hf:<model> "
                              "(e.g. open_clip:ViT-B-32, timm:vit_small_patch16_224, hf:facebook/dinov2-small)")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else (self.layers,)
        object.__setattr__(self, "layers", tuple(_parse_layer(key) for key in layers))
        if not self.layers:
            raise ConfigError("backbone layers must name at least one layer")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise ConfigError(f"init_seed must be an integer, got {self.init_seed!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"pretrained must be a tag, {HUB_WEIGHTS!r} or a file path, "
                              f"got {self.pretrained!r}")
        FAMILIES[family].check(arch, self.pretrained)

    @property
    def family(self) -> str:
        return self.model.partition(":")[0]

    @property
    def arch(self) -> str:
        return self.model.partition(":")[2]


def _parse_layer(key: Any) -> int | str:
    """Numeric strings (from the CLI or TOML) become block indices; other strings stay layer names."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.strip():
        try:
            return int(key)
        except ValueError:
            return key.strip()
    raise ConfigError(f"invalid layer {key!r}: use a block index (e.g. -2) or a layer name (e.g. attnpool)")


class _ModifiedResNet(Backbone):
    """open_clip's CLIP ResNets: stage outputs are NCHW maps (patch tokens), attnpool one pooled token."""

    NAMES = ("stage1", "stage2", "stage3", "stage4", "attnpool")

    def __init__(self, cfg: BackboneConfig, visual: nn.Module, preprocessor: Preprocessor) -> None:
        stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        h, w = preprocessor.image_size  # the stages' outputs are at strides 4, 8, 16, 32
        specs = [LayerSpec(name, stage[-1].bn3.num_features, TokenLayout(cls=False, grid=(h // s, w // s)), i)
                 for i, (name, stage, s) in enumerate(zip(self.NAMES, stages, (4, 8, 16, 32)))]
        specs.append(LayerSpec("attnpool", visual.attnpool.c_proj.out_features, TokenLayout(cls=True, grid=(0, 0)), 4))
        super().__init__(cfg, visual, preprocessor, [*stages, visual.attnpool], specs, _open_clip_head(visual))

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        return output.unsqueeze(1) if output.ndim == 2 else output.flatten(2).transpose(1, 2)

    def _replace(self, index: int, output: Tensor, tokens: Tensor) -> Tensor:
        return tokens[:, 0] if output.ndim == 2 else tokens.transpose(1, 2).reshape(output.shape)


def _open_clip_head(visual: nn.Module) -> Head:
    """open_clip's image embedding (the tower's projected output); zero-shot logits come from the text tower."""
    return lambda x: (visual(x), None)


def _timm_head(model: nn.Module) -> Head:
    """timm's pre-logits embedding and, where the model has one, its classifier's logits."""
    def head(x: Tensor) -> tuple[Tensor, Tensor | None]:
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        return embedding, model.get_classifier()(embedding) if model.num_classes else None
    return head


class _OpenClip(Family):
    def check(self, arch: str, pretrained: str | None) -> None:
        import open_clip

        if arch.startswith(("hf-hub:", "local-dir:")):
            if pretrained:
                raise ConfigError(f"open_clip:{arch} brings its own weights; leave pretrained unset")
            return
        if arch not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained and checkpoint_path(pretrained) is None and pretrained not in tags:
            raise ConfigError(f"unknown open_clip pretrained tag {pretrained!r} for {arch}; use a checkpoint "
                              f"file or one of: {', '.join(tags) or '(none)'}")

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        import open_clip
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        # the text tower is built (full CLIP checkpoints load strictly) and then dropped
        model, _, transform = seeded(cfg.init_seed, open_clip.create_model_and_transforms, cfg.arch,
                                      pretrained=path or cfg.pretrained, pretrained_text=False)
        visual = model.visual
        prep = Preprocessor.from_transform(transform, visual.image_size)
        if isinstance(visual, VisionTransformer):
            t = visual.transformer
            backbone: Backbone = ViT(cfg, visual, prep, t.resblocks, d=t.width, grid=visual.grid_size, n_prefix=1,
                                     has_cls=True, batch_first=getattr(t, "batch_first", True),
                                     head=_open_clip_head(visual))
        elif isinstance(visual, TimmModel):
            backbone = ViT.from_timm(cfg, visual, visual.trunk, prep, _open_clip_head(visual))
        elif isinstance(visual, ModifiedResNet):
            backbone = _ModifiedResNet(cfg, visual, prep)
        else:
            raise ConfigError(f"{cfg.model}: image tower {type(visual).__name__} is not supported")
        if cfg.arch.startswith("hf-hub:"):
            backbone.hub_weights = {"hub_id": cfg.arch.removeprefix("hf-hub:")}
        elif cfg.pretrained and path is None:
            source = open_clip.get_pretrained_cfg(cfg.arch, cfg.pretrained)
            backbone.hub_weights = {"tag": cfg.pretrained, "hub_id": source.get("hf_hub", "").rstrip("/"),
                                    "url": source.get("url")}
        return backbone


class _Timm(Family):
    def check(self, arch: str, pretrained: str | None) -> None:
        import timm

        if not timm.is_model(arch):
            raise ConfigError(f"unknown timm model {arch!r}; see timm.list_models()")
        if pretrained and pretrained != HUB_WEIGHTS and checkpoint_path(pretrained) is None:
            if "." in arch or not timm.list_pretrained(f"{arch}.{pretrained}"):
                raise ConfigError(f"unknown timm pretrained tag {pretrained!r} for {arch}; use "
                                  f"{HUB_WEIGHTS!r}, a checkpoint file, or a tag from "
                                  f"timm.list_pretrained('{arch.split('.')[0]}.*')")

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        import timm
        from timm.data import create_transform, resolve_data_config

        name, kwargs = cfg.arch, {}
        if path is not None:
            # timm's own file override: same loader and checkpoint filter as hub weights; .npz is big_vision's
            kwargs["pretrained_cfg_overlay"] = {"file": path, "custom_load": path.endswith(".npz")}
        elif cfg.pretrained not in (None, HUB_WEIGHTS):
            name = f"{cfg.arch}.{cfg.pretrained}"
        # default head size, so that timm loads strictly (a mismatch would silently keep random weights); the
        # classifier is kept for `outputs` (extraction stops at its last layer and never runs it)
        model = seeded(cfg.init_seed, timm.create_model, name, pretrained=cfg.pretrained is not None, **kwargs)
        data_cfg = resolve_data_config(model=model)
        prep = Preprocessor.from_transform(create_transform(**data_cfg, is_training=False), data_cfg["input_size"][1:])
        backbone = ViT.from_timm(cfg, model, model, prep, _timm_head(model))
        if cfg.pretrained is not None and path is None:  # "hub" resolves to the architecture's default tag today
            source = model.pretrained_cfg
            backbone.hub_weights = {"tag": source.get("tag"), "hub_id": source.get("hf_hub_id"),
                                    "url": source.get("url")}
        return backbone


FAMILIES: dict[str, Family] = {"open_clip": _OpenClip(), "timm": _Timm(), "hf": HF()}
"""Model libraries by the prefix of BackboneConfig.model."""


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Create the model (seeded random init, then the tag's or file's weights) and wrap it for extraction."""
    path = checkpoint_path(cfg.pretrained)
    if path is not None and not (os.path.isfile(path) or cfg.family == "hf" and os.path.isdir(path)):
        raise ConfigError(f"checkpoint file not found: {path}")
    try:
        return FAMILIES[cfg.family].load(cfg, path)
    except RuntimeError as e:
        if path is None:
            raise
        raise ConfigError(f"{path} does not load into {cfg.model}: {' '.join(str(e).split())[:400]}") from e
