"""Vision backbones (open_clip, timm) that return chosen layers' tokens in one forward pass.

`load_backbone(BackboneConfig("timm:vit_small_patch14_reg4_dinov2", layers=(-2,)))` gives a frozen
nn.Module mapping uint8 images (B, 3, H, W) to {layer name: (B, T, d)}, plus the `LayerSpec`s and
backbone attrs the store records. Preprocessing is split (actstore.extract.preprocess): decode tasks
run the model's own PIL steps to uint8, and `Backbone.normalize` does the rest on the model's device.

Layers are the outputs of the model's blocks, named by index ("10"). ViTs keep the CLS token (as
token 0, when the model has one) and drop the other prefix tokens (registers). open_clip's
ModifiedResNets (RN50, ...) have five layers: "stage1".."stage4" (the stages' spatial maps as patch
tokens, no CLS) and "attnpool" (the pooled embedding, one token), so -1 is "attnpool" and -2 "stage4".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from actstore.errors import ConfigError
from actstore.extract.preprocess import Preprocessor
from actstore.store import LayerSpec, TokenLayout

__all__ = ["FAMILIES", "Backbone", "BackboneConfig", "Preprocessor", "load_backbone"]

TIMM_DEFAULT_WEIGHTS = "hub"
"""`pretrained` value that asks timm for the architecture's default pretrained weights."""
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


@dataclass(frozen=True)
class BackboneConfig:
    """Which vision model, which of its layers, and which weights."""

    model: str
    """"<family>:<arch>", e.g. "open_clip:ViT-B-32", "open_clip:RN50", "timm:vit_small_patch14_reg4_dinov2"."""
    layers: tuple[int | str, ...] = (-2,)
    """Block indices (negative count from the end: -2 = second to last block) or layer names ("attnpool")."""
    pretrained: str | None = None
    """An open_clip tag ("laion2b_s34b_b79k"), a timm tag or "hub" (timm's default weights), a local
    checkpoint file (loaded by the same library code as the tags), or None for seeded random weights."""
    init_seed: int = 0
    """Seed of the random initialization, so that two loads of random weights are identical."""

    def __post_init__(self) -> None:
        family, sep, arch = str(self.model).partition(":")
        if not sep or not arch or family not in FAMILIES:
            raise ConfigError(f"unknown backbone {self.model!r}; use open_clip:<arch> or timm:<arch> "
                              "(e.g. open_clip:ViT-B-32, timm:vit_small_patch16_224)")
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else (self.layers,)
        object.__setattr__(self, "layers", tuple(_parse_layer(key) for key in layers))
        if not self.layers:
            raise ConfigError("backbone layers must name at least one layer")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise ConfigError(f"init_seed must be an integer, got {self.init_seed!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ConfigError(f"pretrained must be a tag, {TIMM_DEFAULT_WEIGHTS!r} or a file path, "
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


def _checkpoint_path(pretrained: str | None) -> str | None:
    """The absolute path when `pretrained` names a local file rather than a hub tag."""
    if not pretrained:
        return None
    p = os.path.expanduser(pretrained)
    if os.sep in p or "/" in p or p.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(p):
        return os.path.abspath(p)
    return None


def _seeded(seed: int, create: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Create a model under a fixed seed; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create(*args, **kwargs)


class _StopForward(Exception):
    """Raised by the hook of the last requested block: later blocks and the head are not run."""


class Backbone(nn.Module):
    """A frozen vision model whose forward returns the requested layers' tokens, (B, T, d) each.

    Subclasses list the hookable modules and their LayerSpecs, and turn a module's output into
    (B, T, d) tokens; the hooks, layer resolution and normalization live here once.
    """

    def __init__(self, cfg: BackboneConfig, model: nn.Module, preprocessor: Preprocessor,
                 blocks: Sequence[nn.Module], specs: Sequence[LayerSpec]) -> None:
        super().__init__()
        self.cfg = cfg
        self.family, self.arch = cfg.family, cfg.arch
        self.model = model.eval().requires_grad_(False)
        self.preprocessor = preprocessor
        self._blocks = list(blocks)
        self._all_specs = tuple(specs)
        self.n_blocks = len(self._blocks)
        self._specs = tuple(self._resolve(key) for key in cfg.layers)
        for i, spec in enumerate(self._specs):
            if spec in self._specs[:i]:
                raise ConfigError(f"layers {cfg.layers} name layer {spec.name} twice")

    def _resolve(self, key: int | str) -> LayerSpec:
        n = self.n_blocks
        if isinstance(key, int) and -n <= key < n:
            return self._all_specs[key % n]
        for spec in self._all_specs:
            if spec.name == key:
                return spec
        raise ConfigError(f"{self.cfg.model} has no layer {key!r}; use a block index in [-{n}, {n}) "
                          f"or a name: {', '.join(s.name for s in self._all_specs)}")

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        """Block `index`'s output as (B, T, d) tokens in the layer's TokenLayout."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Backbone:
        """Stays in eval mode: extraction never trains, and dropout/batch-norm must not change outputs."""
        return super().train(False)

    @property
    def pil_transform(self) -> Callable[[Image.Image], Image.Image]:
        return self.preprocessor.pil_transform

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """The requested layers, in the order of cfg.layers (= the order of forward's dict)."""
        return self._specs

    def metadata(self) -> dict[str, Any]:
        """The store's backbone attrs: enough to reload the same model and preprocessing."""
        path = _checkpoint_path(self.cfg.pretrained)
        return {"family": self.family, "name": self.arch, "checkpoint": path or self.cfg.pretrained,
                "init_seed": self.cfg.init_seed, "n_blocks": self.n_blocks,
                "preprocessing": self.preprocessor.describe()}

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> model input on the model's device: /255, then the model's own mean/std."""
        p = next(self.model.parameters())
        x = images.to(p.device, non_blocking=True).float().div_(255)
        mean = torch.tensor(self.preprocessor.mean, device=p.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocessor.std, device=p.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std).to(p.dtype)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """{layer name: (B, T, d)} for the requested layers, from one forward pass with hooks."""
        wanted = {spec.index: spec.name for spec in self._specs}
        last = max(wanted)
        out: dict[str, Tensor] = {}

        def hook(index: int) -> Callable[..., None]:
            def capture(module: nn.Module, args: Any, output: Tensor) -> None:
                out[wanted[index]] = self._tokens(index, output).contiguous()
                if index == last:
                    raise _StopForward
            return capture

        handles = [self._blocks[i].register_forward_hook(hook(i)) for i in wanted]
        try:
            self.model(self.normalize(images))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return {spec.name: out[spec.name] for spec in self._specs}


class _ViT(Backbone):
    """Transformers: block outputs are [prefix tokens (CLS, registers), patches] sequences."""

    def __init__(self, cfg: BackboneConfig, model: nn.Module, preprocessor: Preprocessor,
                 blocks: Sequence[nn.Module], *, d: int, grid: Sequence[int], n_prefix: int, has_cls: bool,
                 batch_first: bool = True) -> None:
        tokens = TokenLayout(cls=has_cls, grid=tuple(grid), n_registers_dropped=n_prefix - int(has_cls))
        super().__init__(cfg, model, preprocessor, blocks,
                         [LayerSpec(str(i), d, tokens, i) for i in range(len(blocks))])
        self.n_prefix, self.has_cls, self.batch_first = n_prefix, has_cls, batch_first

    @classmethod
    def from_timm(cls, cfg: BackboneConfig, model: nn.Module, vit: nn.Module, preprocessor: Preprocessor) -> _ViT:
        """`vit` is a timm ViT-style model (itself, or the trunk of an open_clip TimmModel)."""
        if not all(hasattr(vit, a) for a in ("blocks", "num_prefix_tokens", "patch_embed", "embed_dim")):
            raise ConfigError(f"{cfg.model}: only ViT-style timm models (with .blocks and prefix tokens) "
                              f"are supported, not {type(vit).__name__}")
        has_cls = bool(getattr(vit, "has_class_token", getattr(vit, "cls_token", None) is not None))
        return cls(cfg, model, preprocessor, vit.blocks, d=vit.embed_dim, grid=vit.patch_embed.grid_size,
                   n_prefix=vit.num_prefix_tokens, has_cls=has_cls)

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        x = output if self.batch_first else output.transpose(0, 1)
        if self.n_prefix == int(self.has_cls):
            return x
        patches = x[:, self.n_prefix:]
        return torch.cat([x[:, :1], patches], dim=1) if self.has_cls else patches


class _ModifiedResNet(Backbone):
    """open_clip's CLIP ResNets: stage outputs are NCHW maps (patch tokens), attnpool one pooled token."""

    NAMES = ("stage1", "stage2", "stage3", "stage4", "attnpool")

    def __init__(self, cfg: BackboneConfig, visual: nn.Module, preprocessor: Preprocessor) -> None:
        stages = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        h, w = preprocessor.image_size  # the stages' outputs are at strides 4, 8, 16, 32
        specs = [LayerSpec(name, stage[-1].bn3.num_features, TokenLayout(cls=False, grid=(h // s, w // s)), i)
                 for i, (name, stage, s) in enumerate(zip(self.NAMES, stages, (4, 8, 16, 32)))]
        specs.append(LayerSpec("attnpool", visual.attnpool.c_proj.out_features, TokenLayout(cls=True, grid=(0, 0)), 4))
        super().__init__(cfg, visual, preprocessor, [*stages, visual.attnpool], specs)

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        return output.unsqueeze(1) if output.ndim == 2 else output.flatten(2).transpose(1, 2)


class _Family:
    """One model library: checks names early, creates the model and its transform.

    The libraries are imported inside the methods: importing them takes seconds, and the CLI should not wait.
    """

    def check(self, arch: str, pretrained: str | None) -> None:
        raise NotImplementedError

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        raise NotImplementedError


class _OpenClip(_Family):
    def check(self, arch: str, pretrained: str | None) -> None:
        import open_clip

        if arch.startswith(("hf-hub:", "local-dir:")):
            if pretrained:
                raise ConfigError(f"open_clip:{arch} brings its own weights; leave pretrained unset")
            return
        if arch not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained and _checkpoint_path(pretrained) is None and pretrained not in tags:
            raise ConfigError(f"unknown open_clip pretrained tag {pretrained!r} for {arch}; use a checkpoint "
                              f"file or one of: {', '.join(tags) or '(none)'}")

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        import open_clip
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        # the text tower is built (full CLIP checkpoints load strictly) and then dropped
        model, _, transform = _seeded(cfg.init_seed, open_clip.create_model_and_transforms, cfg.arch,
                                      pretrained=path or cfg.pretrained, pretrained_text=False)
        visual = model.visual
        prep = Preprocessor.from_transform(transform, visual.image_size)
        if isinstance(visual, VisionTransformer):
            t = visual.transformer
            return _ViT(cfg, visual, prep, t.resblocks, d=t.width, grid=visual.grid_size, n_prefix=1, has_cls=True,
                        batch_first=getattr(t, "batch_first", True))
        if isinstance(visual, TimmModel):
            return _ViT.from_timm(cfg, visual, visual.trunk, prep)
        if isinstance(visual, ModifiedResNet):
            return _ModifiedResNet(cfg, visual, prep)
        raise ConfigError(f"{cfg.model}: image tower {type(visual).__name__} is not supported")


class _Timm(_Family):
    def check(self, arch: str, pretrained: str | None) -> None:
        import timm

        if not timm.is_model(arch):
            raise ConfigError(f"unknown timm model {arch!r}; see timm.list_models()")
        if pretrained and pretrained != TIMM_DEFAULT_WEIGHTS and _checkpoint_path(pretrained) is None:
            if "." in arch or not timm.list_pretrained(f"{arch}.{pretrained}"):
                raise ConfigError(f"unknown timm pretrained tag {pretrained!r} for {arch}; use "
                                  f"{TIMM_DEFAULT_WEIGHTS!r}, a checkpoint file, or a tag from "
                                  f"timm.list_pretrained('{arch.split('.')[0]}.*')")

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        import timm
        from timm.data import create_transform, resolve_data_config

        name, kwargs = cfg.arch, {}
        if path is not None:
            # timm's own file override: same loader and checkpoint filter as hub weights; .npz is big_vision's
            kwargs["pretrained_cfg_overlay"] = {"file": path, "custom_load": path.endswith(".npz")}
        elif cfg.pretrained not in (None, TIMM_DEFAULT_WEIGHTS):
            name = f"{cfg.arch}.{cfg.pretrained}"
        # default head size, so that timm loads strictly (a mismatch would silently keep random weights)
        model = _seeded(cfg.init_seed, timm.create_model, name, pretrained=cfg.pretrained is not None, **kwargs)
        model.reset_classifier(0)
        data_cfg = resolve_data_config(model=model)
        prep = Preprocessor.from_transform(create_transform(**data_cfg, is_training=False), data_cfg["input_size"][1:])
        return _ViT.from_timm(cfg, model, model, prep)


FAMILIES: dict[str, _Family] = {"open_clip": _OpenClip(), "timm": _Timm()}
"""Model libraries by the prefix of BackboneConfig.model."""


def load_backbone(cfg: BackboneConfig) -> Backbone:
    """Create the model (seeded random init, then the tag's or file's weights) and wrap it for extraction."""
    path = _checkpoint_path(cfg.pretrained)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"checkpoint file not found: {path}")
    try:
        return FAMILIES[cfg.family].load(cfg, path)
    except RuntimeError as e:
        if path is None:
            raise
        raise ConfigError(f"{path} does not load into {cfg.model}: {' '.join(str(e).split())[:400]}") from e
