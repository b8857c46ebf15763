"""transformers backbones (`hf:`): CLIP and SigLIP vision towers, DINOv2 (with and without registers), V-JEPA 2,
and the vision tower of a vision-language model (actstore.extract.vlm_kinds.VLM_KINDS).

A model is named by a hub id (owner/name, or owner/name/sub/folder for one in a repo's subfolder, as a diffusion
pipeline's image_encoder), a folder saved by save_pretrained, or a built-in config name (HF_CONFIGS);
its layers are the encoder layers, the same tokens as `output_hidden_states=True`'s hidden_states[i + 1].
A VLM's Backbone is its vision tower, the very module inside the whole model it keeps (`vlm`), so that an
intervention on the tower's layers acts on the VLM's answers too (actstore.extract.vlm generates them).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from actstore.errors import ConfigError
from actstore.extract.hooked import HUB_WEIGHTS, Backbone, Family, ViT, checkpoint_path, seeded
from actstore.extract.preprocess import Preprocessor
from actstore.extract.remote_vlm import needs_remote_code, remote_kind, remote_model_class
from actstore.extract.vlm_kinds import VLM_KINDS, VLMKind

if TYPE_CHECKING:
    from actstore.extract.backbones import BackboneConfig

__all__ = ["HF", "HF_CONFIGS", "HF_MODEL_TYPES", "HFVisionTower", "hf_source", "hub_repo"]


class _HFEncoder(ViT):
    """A transformers vision encoder: layer outputs are [CLS, registers, patches] sequences (tuples whose first
    item is that sequence, for V-JEPA 2), run with the model's own input name.

    V-JEPA 2 is a video model: each image becomes a clip of `frames` (= its tubelet_size) copies, which one
    tubelet spans, so there is one temporal token per spatial patch and the tokens are the patch grid, row by row.
    """

    def __init__(self, cfg: BackboneConfig, model: nn.Module, preprocessor: Preprocessor, blocks: Sequence[nn.Module],
                 *, frames: int, **layout: Any) -> None:
        super().__init__(cfg, model, preprocessor, blocks, head=self._embedding, **layout)
        self.frames = frames

    def _run(self, x: Tensor) -> Any:
        if self.frames:
            return self.model(pixel_values_videos=x.unsqueeze(1).expand(-1, self.frames, -1, -1, -1),
                              skip_predictor=True)
        return self.model(pixel_values=x)

    def _embedding(self, x: Tensor) -> tuple[Tensor, None]:
        """The model's projected embedding where it has its projection (CLIPVisionModelWithProjection: what a
        diffusion pipeline is conditioned on), else its pooled output (CLIP, DINOv2: the final-normed CLS; SigLIP:
        its attention-pool head), else the mean of the last tokens (V-JEPA 2, as frozen-feature evaluations pool
        it)."""
        out = self._run(x)
        for name in ("image_embeds", "pooler_output"):
            if getattr(out, name, None) is not None:
                return getattr(out, name), None
        return out.last_hidden_state.mean(1), None

    def _tokens(self, index: int, output: Tensor | tuple[Tensor, ...]) -> Tensor:
        return super()._tokens(index, output[0] if isinstance(output, tuple) else output)

    def _replace(self, index: int, output: Tensor | tuple[Tensor, ...], tokens: Tensor) -> Any:
        if isinstance(output, tuple):
            return (super()._replace(index, output[0], tokens), *output[1:])
        return super()._replace(index, output, tokens)

    @property
    def _whole(self) -> nn.Module:
        """The model the weights are drawn and loaded with (a VLM's vision tower: the VLM)."""
        return self.model

    def metadata(self) -> dict[str, Any]:
        """Also the transformers class and the config's non-default fields, so that random weights from a
        folder that is gone can still be rebuilt."""
        config = json.loads(self._whole.config.to_json_string(use_diff=True))
        config.pop("transformers_version", None)
        return {**super().metadata(), "model_class": type(self._whole).__name__, "config": config}


class HFVisionTower(_HFEncoder):
    """The vision tower of a vision-language model: `model` is the tower inside `vlm` (the same module objects,
    so hooks on its layers act on the VLM's own forward passes); `processor` is the source's whole processor
    (tokenizer, chat template), None where it has none; `vlm_kind` its family's VLMKind (the layer its language
    model reads, how generate takes the image).

    `vlm` is kept out of the registered submodules: moving the Backbone to an accelerator for extraction moves
    the tower only (its parameters are the VLM's own); actstore.extract.vlm moves the rest when it generates.
    """

    def __init__(self, cfg: BackboneConfig, vlm: nn.Module, kind: VLMKind, tower: nn.Module, processor: Any,
                 preprocessor: Preprocessor, blocks: Sequence[nn.Module], **layout: Any) -> None:
        super().__init__(cfg, tower, preprocessor, blocks, frames=0, **layout)
        object.__setattr__(self, "_vlm", vlm.eval().requires_grad_(False))
        self.vlm_kind, self.processor = kind, processor

    @property
    def vlm(self) -> nn.Module:
        """The whole vision-language model, for generation."""
        return self._vlm

    @property
    def _whole(self) -> nn.Module:
        return self._vlm


@dataclass(frozen=True)
class _HFKind:
    """How the models of one transformers model type become a Backbone."""

    model_class: str
    """The vision model's class in transformers (by name: importing transformers takes seconds)."""
    processor_class: str
    """Its image (or video) processor's class, built from `processor_defaults` when the source has no processor file."""
    blocks: str
    """Attribute path of the encoder layers in the model."""
    has_cls: bool
    """Whether token 0 is a CLS token (registers, where the config has num_register_tokens, follow it)."""
    fixed_size: str | None
    """The config field the input size must equal (the position embeddings' size); None where the model
    interpolates them (DINOv2)."""
    processor_defaults: Callable[[Any], dict[str, Any]]
    """Processor arguments for a source without a processor file, from the config: the public checkpoints'."""
    video: bool = False
    """Whether the model takes clips (pixel_values_videos, with `tubelet_size` frames a token)."""


_IMAGENET_MEAN_STD = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
_CLIP = _HFKind("CLIPVisionModel", "CLIPImageProcessor", "encoder.layers", True, "image_size", lambda c: {
    "size": {"shortest_edge": c.image_size}, "crop_size": {"height": c.image_size, "width": c.image_size}})
_CLIP_PROJECTED = replace(_CLIP, model_class="CLIPVisionModelWithProjection", blocks="vision_model.encoder.layers")
"""A CLIP vision tower saved with its projection (a diffusion pipeline's image_encoder): its embedding is projected."""
_SIGLIP = _HFKind("SiglipVisionModel", "SiglipImageProcessor", "encoder.layers", False, "image_size", lambda c: {
    "size": {"height": c.image_size, "width": c.image_size}})
# DINOv2 checkpoints: position embeddings for 518 px, interpolated to the processor's 224 px crop
_DINOV2 = _HFKind("Dinov2Model", "BitImageProcessor", "encoder.layer", True, None, lambda c: {
    "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}, **_IMAGENET_MEAN_STD})
_VJEPA2 = _HFKind("VJEPA2Model", "VJEPA2VideoProcessor", "encoder.layer", False, "crop_size",
                  lambda c: {"crop_size": c.crop_size}, video=True)

HF_MODEL_TYPES: dict[str, _HFKind] = {
    "clip": _CLIP, "clip_vision_model": _CLIP, "siglip": _SIGLIP, "siglip_vision_model": _SIGLIP,
    "dinov2": _DINOV2, "dinov2_with_registers": replace(_DINOV2, model_class="Dinov2WithRegistersModel"),
    "vjepa2": _VJEPA2,
}
"""Supported config model types (a CLIP or SigLIP checkpoint with both towers loads its vision tower)."""

_TOWER_TYPES = {**HF_MODEL_TYPES, **{f"{name}_vision": replace(_SIGLIP, model_class=f"{cls}VisionTransformer")
                                     for name, cls in (("idefics3", "Idefics3"), ("smolvlm", "SmolVLM"))}}
"""Tower kinds by vision config model type, those only inside VLMs included (VLMKind.towers names them): Idefics3's
and SmolVLM's towers are SigLIP's without its attention-pool head."""

_NATIVE = {*HF_MODEL_TYPES, *VLM_KINDS}
"""Model types loaded with transformers' own code (an auto_map in their config.json is not followed)."""

_DINOV2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
HF_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "clip-vit-base-patch32": ("openai/clip-vit-base-patch32", "clip_vision_model", {"patch_size": 32}),
    "clip-vit-base-patch16": ("openai/clip-vit-base-patch16", "clip_vision_model", {"patch_size": 16}),
    "clip-vit-large-patch14": ("openai/clip-vit-large-patch14", "clip_vision_model", {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "patch_size": 14}),
    "siglip-base-patch16-224": ("google/siglip-base-patch16-224", "siglip_vision_model", {}),
    "siglip-so400m-patch14-384": ("google/siglip-so400m-patch14-384", "siglip_vision_model", {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "image_size": 384, "patch_size": 14}),
    **{f"dinov2{reg}-{size}": (f"facebook/dinov2{reg}-{size}", model_type, {
        "hidden_size": d, "num_hidden_layers": n, "num_attention_heads": heads, "image_size": 518, "patch_size": 14})
       for reg, model_type in (("", "dinov2"), ("-with-registers", "dinov2_with_registers"))
       for size, (d, n, heads) in _DINOV2_SIZES.items()},
    "vjepa2-vitl-fpc64-256": ("facebook/vjepa2-vitl-fpc64-256", "vjepa2", {}),
}
"""Built-in `hf:` names: (public hub id, model type, the config fields that differ from the config class's defaults).
Random weights need no download; pretrained "hub" loads the hub id (its own config, processor and weights)."""

_HUB_PART = re.compile(r"[\w.-]+")


def _is_hub_id(arch: str) -> bool:
    parts = arch.split("/")
    return (len(parts) >= 2 and not arch.startswith(".")
            and all(_HUB_PART.fullmatch(p) and p not in (".", "..") for p in parts))


def hub_repo(hub_id: str) -> tuple[str, str]:
    """("owner/name", the folder inside that repo the model is in: "" for the repo's root) of a hub id
    `owner/name[/sub/folder]` (a diffusion pipeline's `owner/name/image_encoder`)."""
    owner, name, *sub = hub_id.split("/")
    return f"{owner}/{name}", "/".join(sub)


def hf_source(arch: str) -> tuple[str, str]:
    """What `hf:<arch>` names: ("builtin", name), ("folder", absolute path) or ("hub", id, with a subfolder after
    owner/name where the model sits in one: see hub_repo), like transformers' own rule (an existing folder wins over
    a hub id of the same spelling)."""
    path = os.path.expanduser(arch)
    if arch in HF_CONFIGS:
        return "builtin", arch
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"hf model folder {os.path.abspath(path)} has no config.json")
        return "folder", os.path.abspath(path)
    if _is_hub_id(arch):
        return "hub", arch
    if "/" in arch or os.sep in arch or arch.startswith(("~", ".")):
        raise ConfigError(f"hf model folder not found: {os.path.abspath(path)}")
    raise ConfigError(f"unknown hf model {arch!r}; use a hub id (owner/name or owner/name/sub/folder), a folder with "
                      f"config.json, or one of: {', '.join(HF_CONFIGS)}")


_OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.fp16.*")
"""Files of a hub subfolder not downloaded: weights in other formats than safetensors and the fp16 variants
(pipelines often keep both beside model.safetensors; from_pretrained of a folder reads model*.safetensors first)."""


def _hub_subfolder(hub_id: str, weights: bool) -> tuple[str, str]:
    """(the local folder of the hub id's subfolder, the commit it came from): its files downloaded to the hub cache,
    its safetensors weights only when `weights`, so that it loads as a folder (its processor and code included)."""
    from huggingface_hub import snapshot_download

    repo, sub = hub_repo(hub_id)
    ignore = [f"{sub}/{p}" for p in (*_OTHER_WEIGHTS, *(() if weights else ("*.safetensors",)))]
    try:
        snapshot = snapshot_download(repo, allow_patterns=[f"{sub}/*"], ignore_patterns=ignore)
    except (OSError, ValueError) as e:  # the hub unreachable, no such repo (a mistyped local folder?)
        raise ConfigError(f"hf:{hub_id}: no such folder here, and on the hub: {' '.join(str(e).split())[:300]}") from e
    folder = os.path.join(snapshot, *sub.split("/"))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"hf:{hub_id}: the hub repo {repo} has no {sub}/config.json")
    return folder, os.path.basename(snapshot)


def _hf_kind(model_type: str | None, where: str) -> _HFKind:
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{where}: unsupported model type {model_type!r}; use one of: "
                          f"{', '.join([*HF_MODEL_TYPES, *VLM_KINDS])}")
    return HF_MODEL_TYPES[model_type]


def _vlm_tower(model_type: str, vision_type: str | None, where: str) -> _HFKind | None:
    towers = VLM_KINDS[model_type].towers
    if vision_type not in towers:
        names = " or ".join({"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}.get(t, t) for t in towers)
        raise ConfigError(f"{where}: the vision tower of a {model_type} must be {names}, not {vision_type}")
    return _TOWER_TYPES.get(vision_type)  # None: the VLMKind builds its own Backbone


def _hf_weights(model_cls: Any, config: Any, weights: str, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """from_pretrained from a hub id or folder, or with one weights file's state dict (the same loader and key
    renaming), in `dtype`: float32 as the other families, "auto" (the checkpoint's own: its config's torch_dtype,
    else its tensors') for a VLM, whose language model in float32 would double its memory; a checkpoint that leaves
    weights missing is refused, not kept partly random."""
    from transformers.modeling_utils import load_state_dict

    file = os.path.isfile(weights)
    try:
        kwargs = {"state_dict": load_state_dict(weights)} if file else {}
    except Exception as e:  # torch's unpickling and safetensors' header errors share no base class
        raise ConfigError(f"{weights} is not a weights file: {' '.join(str(e).split())[:200]}") from e
    try:
        model, info = model_cls.from_pretrained(None if file else weights, config=config, dtype=dtype,
                                                output_loading_info=True, **kwargs)
    except RuntimeError as e:  # mismatched shapes
        raise ConfigError(f"{weights} does not load into {model_cls.__name__}: {' '.join(str(e).split())[:300]}") from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ConfigError(f"{weights} does not load into {model_cls.__name__}: {len(missing)} weights missing "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return model


def _hf_processors(kind: _HFKind, config: Any, where: str | None, vlm: VLMKind | None,
                   remote: bool = False) -> tuple[Any, Preprocessor]:
    """(a VLM's whole processor (tokenizer, chat template), None for vision models and sources without one; the
    Preprocessor). The image steps are the source's own processor file's where it has one (a VLM's: its whole
    processor's image processor, set to one fixed-size square image by its kind's `single_image`), else
    `kind.processor_defaults` (built-in names, folders saved without one), as PIL steps + ToTensor + Normalize.
    `remote`: the processor may be the source's own code (behind --trust-remote-code)."""
    import transformers
    from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, VIDEO_PROCESSOR_NAME, cached_file

    names = (VIDEO_PROCESSOR_NAME, IMAGE_PROCESSOR_NAME) if kind.video else (IMAGE_PROCESSOR_NAME, PROCESSOR_NAME)
    whole = None
    if where is None or not any(cached_file(where, n, _raise_exceptions_for_missing_entries=False) for n in names):
        image = getattr(transformers, kind.processor_class)(**kind.processor_defaults(config))
    elif vlm:
        whole = transformers.AutoProcessor.from_pretrained(where, trust_remote_code=remote)
        image = getattr(whole, "image_processor", whole)
        if vlm.single_image:
            image = vlm.single_image(whole, config)
    else:
        auto = transformers.AutoVideoProcessor if kind.video else transformers.AutoImageProcessor
        image = auto.from_pretrained(where)
    if getattr(image, "do_pad", False):
        raise ConfigError(f"{where}: its {type(image).__name__} pads images to a square; that is not supported")
    return (whole if hasattr(whole, "tokenizer") else None), Preprocessor.from_hf(image)


class HF(Family):
    """transformers vision models; see HF_MODEL_TYPES, VLM_KINDS and HF_CONFIGS. `arch` is a hub id, a folder
    saved by save_pretrained (config.json, optional weights and processor file) or a built-in name; `pretrained`
    is None (seeded random weights from the config: a VLM's drawn whole, so that its tower's are the same again),
    "hub" (the hub id's or folder's own weights) or a folder or weights file, all through from_pretrained."""

    def check(self, arch: str, pretrained: str | None) -> None:
        source, where = hf_source(arch)
        if source == "folder":
            with open(os.path.join(where, "config.json")) as f:
                config = json.load(f)
            model_type, vision = config.get("model_type"), config.get("vision_config") or {}
            if needs_remote_code(config, _NATIVE):
                pass  # checked where it loads, behind --trust-remote-code
            elif model_type not in VLM_KINDS:
                _hf_kind(model_type, where)
            elif "model_type" in vision:  # else the config class's default tower (LLaVA's: CLIP)
                _vlm_tower(model_type, vision["model_type"], where)
        if pretrained and pretrained != HUB_WEIGHTS:
            path = checkpoint_path(pretrained)
            if path is None or not os.path.exists(path):
                raise ConfigError(f"hf pretrained {pretrained!r}: no such folder or file; use "
                                  f"{HUB_WEIGHTS!r} for the weights of hf:{arch}")

    def load(self, cfg: BackboneConfig, path: str | None) -> Backbone:
        import transformers

        source, where = hf_source(cfg.arch)
        if source == "builtin" and cfg.pretrained == HUB_WEIGHTS:
            source, where = "hub", HF_CONFIGS[cfg.arch][0]
        named, revision = where, None  # the hub id or folder the record names
        if source == "hub" and hub_repo(where)[1]:  # a model in a repo's subfolder: loaded as a folder
            where, revision = _hub_subfolder(where, cfg.pretrained == HUB_WEIGHTS)
        try:
            if source == "builtin":
                _, model_type, fields = HF_CONFIGS[cfg.arch]
                config, remote = transformers.AutoConfig.for_model(model_type, **fields), False
            else:
                remote = needs_remote_code(transformers.PretrainedConfig.get_config_dict(where)[0], _NATIVE)
                if remote and not cfg.trust_remote_code:
                    raise ConfigError(f"{cfg.model} ships its own modeling code (auto_map in its config.json); pass "
                                      "--trust-remote-code to run it")
                config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=remote)
            vlm = None if remote else VLM_KINDS.get(config.model_type)
            vision = getattr(config, "vision_config", None) or config  # CLIP, SigLIP: both towers; a VLM
            if remote:  # actstore.extract.remote_vlm's rule: the kind and tower are found in the model
                model_cls, whole = remote_model_class(config, where), config
            elif vlm:
                kind = _vlm_tower(config.model_type, vision.model_type, where)
                model_cls, whole = getattr(transformers, vlm.model_class), config
            else:
                kind = _hf_kind(vision.model_type, where)
                if kind is _CLIP and "CLIPVisionModelWithProjection" in (vision.architectures or []):
                    kind = _CLIP_PROJECTED
                model_cls, whole = getattr(transformers, kind.model_class), vision
            if cfg.pretrained is None:
                model = seeded(cfg.init_seed, model_cls, whole)
            else:
                model = _hf_weights(model_cls, whole, where if cfg.pretrained == HUB_WEIGHTS else path,
                                    "auto" if vlm or remote else torch.float32)
            if remote:
                vlm, tower = remote_kind(model, cfg.model)
                vision, kind = tower.config, _TOWER_TYPES[tower.config.model_type]
            if vlm and vlm.backbone:  # a tower of none of the kinds here (Qwen's): the VLMKind builds the Backbone
                built = vlm.backbone(cfg, model, vlm, None if source == "builtin" else where)
                return self._weights(built, cfg, source, named, model, revision)
            processor, prep = _hf_processors(kind, vision, None if source == "builtin" else where, vlm, remote)
        except ConfigError:
            raise
        except (OSError, ValueError, ImportError) as e:  # the hub unreachable, a file missing, a bad config, a
            # processor's package not installed (SmolVLM's num2words)
            raise ConfigError(f"{cfg.model}: {' '.join(str(e).split())[:300]}") from e
        if kind.fixed_size and prep.image_size != (getattr(vision, kind.fixed_size),) * 2:
            raise ConfigError(f"{cfg.model}: its processor makes {prep.image_size} images, the model takes "
                              f"{kind.fixed_size} {getattr(vision, kind.fixed_size)}")
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        n_registers = getattr(vision, "num_register_tokens", 0) or 0
        layout = {"d": vision.hidden_size, "grid": [n // patch for n in prep.image_size],
                  "n_prefix": int(kind.has_cls) + n_registers, "has_cls": kind.has_cls}
        if vlm:
            tower = attrgetter(vlm.tower)(model)
            backbone: _HFEncoder = HFVisionTower(cfg, model, vlm, tower, processor, prep,
                                                  attrgetter(kind.blocks)(tower), **layout)
        else:
            backbone = _HFEncoder(cfg, model, prep, attrgetter(kind.blocks)(model),
                                  frames=vision.tubelet_size if kind.video else 0, **layout)
        return self._weights(backbone, cfg, source, named, model, revision)

    @staticmethod
    def _weights(backbone: Backbone, cfg: BackboneConfig, source: str, named: str, model: nn.Module,
                 revision: str | None) -> Backbone:
        """`backbone`, with what "hub" weights resolved to: the folder's own files, or the hub repo, the subfolder
        in it and the commit (`revision`, else the one transformers' download records)."""
        if cfg.pretrained == HUB_WEIGHTS and source == "folder":
            backbone.hub_weights = {"folder": named}
        elif cfg.pretrained == HUB_WEIGHTS:
            repo, sub = hub_repo(named)
            backbone.hub_weights = {"hub_id": repo, "subfolder": sub,
                                    "revision": revision or getattr(model.config, "_commit_hash", None)}
        return backbone
