"""The generation head: a diffusers pipeline conditioned on the CLIP image embedding the store's backbone makes.

    generate[:PIPELINE[@ADAPTER]]

The store's backbone is the pipeline's image encoder, an `hf:` CLIP vision tower saved with its projection (e.g.
`hf:<pipeline folder>/image_encoder`), so a feature edit changes the encoder's tokens at the SAE's layer (through
the exact splice), hence its embedding, hence the picture. Before and after are generated with the same seed and
scheduler, so without edits they are the same image. Supported pipelines (diffusers' class in model_index.json):

    StableUnCLIPImg2ImgPipeline  Stable unCLIP image variations; its image_encoder must be the store's backbone
                                 (every weight equal)
    KandinskyV22Pipeline         Kandinsky 2.2's decoder; the encoder is its prior's (kandinsky-2-2-prior's
                                 image_encoder), which the decoder does not carry: only the embedding's width is
                                 checked; the negative embedding is the encoder's on a zero image, as the prior's
    StableDiffusionPipeline      with an IP-Adapter (@ADAPTER: its weights file, a local path or
                                 owner/name/path/in/repo.safetensors on the hub; its image encoder, in image_encoder/
                                 beside it as in h94/IP-Adapter, must be the store's backbone); image-embedding
                                 adapters only (IP-Adapter Plus reads hidden states: refused)

PIPELINE is a folder or a hub id; without it, the pipeline the backbone sits in (the folder above a local
`<pipeline>/image_encoder`, or the repo of a hub `owner/name/image_encoder`). The pipeline runs in its
checkpoint's dtype (its unet's weights) on the steering device.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from actstore.errors import ConfigError
from actstore.extract.hf import hf_source, hub_repo
from sae.edits import FeatureEdit, edited_tokens
from services.results import PICTURE_MARK
from services.spliced import SAEInModel

__all__ = ["PIPELINES", "GenerateHead", "generate_head"]

PIPELINES = ("StableUnCLIPImg2ImgPipeline", "KandinskyV22Pipeline", "StableDiffusionPipeline")
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class _Stopped(Exception):
    """Raised from a pipeline's step callback when the run's cancel is set (the caller sees the cancel)."""


@dataclass(frozen=True)
class GenerateHead:
    """A picture generated from the image's embedding (seeded: the same edits give the same picture)."""

    name: str
    generate: Callable[..., Any] = field(repr=False)
    """(embedding (1, D), prompt, seed, steps, guidance, size, stop) -> a PIL image, None when stopped."""
    embed: Callable[[Tensor], Tensor] = field(repr=False)
    """uint8 images (1, 3, H, W) -> the embedding (1, D), through the backbone (and what is spliced into it)."""
    check: Callable[[Sequence[FeatureEdit]], None] = field(repr=False)
    classes: list[str] = field(default_factory=list)
    kind: str = "generate"

    def predict(self, images: Tensor, prompt: str | None = None, seed: int = 0, steps: int = 25,
                guidance: float | None = None, size: int | None = None, cancel: Any = None,
                **_: Any) -> dict[str, Any]:
        """{"image": base64 PNG, "embedding": [...]}; `cancel` (a threading.Event) stops the pipeline at its next
        step (the image is then None: the caller discards it)."""
        embedding = self.embed(images)
        picture = self.generate(embedding, prompt or "", seed, steps, guidance, size,
                                None if cancel is None else cancel.is_set)
        return {"image": None if picture is None else _png(picture),
                "embedding": embedding[0].double().cpu().tolist()}


def _png(picture: Any) -> str:
    """Base64 PNG bytes, marked as a steer picture (what `steer --images` may later replace)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*PICTURE_MARK)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def _local(where: str) -> str:
    """The pipeline's folder: `where` itself, or the hub id's snapshot (downloaded to the hub cache)."""
    if os.path.isdir(os.path.expanduser(where)):
        path = os.path.abspath(os.path.expanduser(where))
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ConfigError(f"generate: {path} is not a diffusers pipeline (no model_index.json)")
        return path
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(where)
    except Exception as e:  # the hub's errors (missing repo, no network) share no base class
        raise ConfigError(f"generate: pipeline {where!r}: {' '.join(str(e).split())[:200]}") from e


def _dtype(folder: str) -> torch.dtype:
    """The checkpoint's dtype: its unet's (or decoder's) first safetensors weight's; float32 where none is found."""
    from safetensors import safe_open

    for sub in ("unet", "decoder", "transformer"):
        path = os.path.join(folder, sub)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) if os.path.isdir(path) else []
        if files:
            with safe_open(os.path.join(path, files[0]), "pt") as f:
                return _DTYPES.get(f.get_slice(next(iter(f.keys()))).get_dtype(), torch.float32)
    return torch.float32


def _default_pipeline(m: SAEInModel) -> str:
    """The pipeline whose folder holds the backbone's (hf:<pipeline folder>/image_encoder), or the hub repo whose
    component folder the backbone is (hf:owner/name/image_encoder: owner/name)."""
    arch = os.path.expanduser(m.backbone.cfg.arch)
    parent = os.path.dirname(os.path.abspath(arch)) if os.path.isdir(arch) else ""
    if parent and os.path.isfile(os.path.join(parent, "model_index.json")):
        return parent
    repo, sub = hub_repo(arch) if not parent and hf_source(arch)[0] == "hub" else ("", "")
    if sub and "/" not in sub:
        return repo
    raise ConfigError(f"generate: {m.backbone.cfg.model} is not inside a pipeline's folder; name the pipeline: "
                      "generate:PIPELINE")


def _check_encoder(encoder: Any, m: SAEInModel, pipeline: str) -> None:
    """The pipeline's image encoder is the store's backbone: the same weights, every one."""
    ours, theirs = m.backbone.model.state_dict(), encoder.state_dict()
    if set(ours) != set(theirs):
        raise ConfigError(f"generate: {pipeline}'s image encoder ({type(encoder).__name__}) is not the store's "
                          f"backbone {m.backbone.cfg.model}: their weights are named differently")
    differ = [k for k, v in theirs.items() if v.shape != ours[k].shape
              or not torch.equal(ours[k].to(v.device, v.dtype), v)]
    if differ:
        raise ConfigError(f"generate: {pipeline}'s image encoder is not the store's backbone {m.backbone.cfg.model}: "
                          f"{len(differ)} of {len(theirs)} weights differ ({differ[0]}, ...)")


def _adapter(pipe: Any, spec: str, m: SAEInModel, pipeline: str) -> None:
    """Loads the IP-Adapter `spec` (a weights file, local or on the hub) with its image encoder, and checks both."""
    from diffusers.models.embeddings import ImageProjection

    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        where, subfolder, weight = os.path.dirname(os.path.abspath(path)), "", os.path.basename(path)
    else:
        parts = spec.split("/")
        if len(parts) < 3:
            raise ConfigError(f"generate: IP-Adapter {spec!r}: no such file; name its weights file, a path or "
                              "owner/name/path/in/repo.safetensors")
        where, subfolder, weight = "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]
    try:
        pipe.load_ip_adapter(where, subfolder=subfolder, weight_name=weight)
    except Exception as e:  # diffusers and the hub raise OSError, ValueError, KeyError...
        raise ConfigError(f"generate: IP-Adapter {spec!r}: {' '.join(str(e).split())[:200]}") from e
    if not all(isinstance(p, ImageProjection) for p in pipe.unet.encoder_hid_proj.image_projection_layers):
        raise ConfigError(f"generate: IP-Adapter {spec!r} reads the encoder's hidden states (IP-Adapter Plus); "
                          "only image-embedding adapters are supported")
    _check_encoder(pipe.image_encoder, m, f"{pipeline}@{spec}")


def _reaches_embedding(m: SAEInModel) -> Callable[[Sequence[FeatureEdit]], None]:
    """At the last layer, the embedding reads the CLS token only: an edit of patches alone there changes nothing
    and is refused; at earlier layers attention carries any edit to it."""
    layout = m.spec.tokens
    if m.spec.index != m.backbone.spec(-1).index or not layout.cls:
        return lambda edits: None

    def check(edits: Sequence[FeatureEdit]) -> None:
        for e in edits:
            reached = edited_tokens(e, layout, m.tokens)
            if reached.numel() and not bool((reached == 0).any()):
                raise ConfigError(f"edit {e}: at the last layer ({m.layer}) the image embedding reads only the CLS "
                                  "token; edit cls or all, or use an SAE on an earlier layer")
    return check


def generate_head(m: SAEInModel, arg: str) -> GenerateHead:
    """The generation head `generate:arg` over the backbone `m` splices into (see the module docstring)."""
    if type(m.backbone.model).__name__ != "CLIPVisionModelWithProjection":
        raise ConfigError(f"generate: the store's backbone {m.backbone.cfg.model} is not a CLIP image encoder with its "
                          "projection; extract from the pipeline's own (hf:<pipeline>/image_encoder)")
    pipeline, _, adapter = (arg or _default_pipeline(m)).partition("@")
    folder = _local(pipeline)
    with open(os.path.join(folder, "model_index.json")) as f:
        kind = json.load(f).get("_class_name")
    if kind not in PIPELINES:
        raise ConfigError(f"generate: {pipeline} is a {kind}; supported: {', '.join(PIPELINES)}")
    if kind == "StableDiffusionPipeline" and not adapter:
        raise ConfigError("generate: a Stable Diffusion pipeline is conditioned on images through an IP-Adapter: "
                          "generate:PIPELINE@ADAPTER_WEIGHTS")
    if adapter and kind != "StableDiffusionPipeline":
        raise ConfigError(f"generate: an IP-Adapter goes on a StableDiffusionPipeline, not a {kind}")
    from diffusers import DiffusionPipeline

    device = next(m.backbone.model.parameters()).device
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=_dtype(folder))
    except (OSError, ValueError) as e:
        raise ConfigError(f"generate: {pipeline}: {' '.join(str(e).split())[:200]}") from e
    pipe.set_progress_bar_config(disable=True)
    if kind == "StableUnCLIPImg2ImgPipeline":
        _check_encoder(pipe.image_encoder, m, pipeline)
    elif adapter:
        _adapter(pipe, adapter, m, pipeline)
    pipe.to(device)
    width = int(m.backbone.model.config.projection_dim)
    negative = None
    if kind == "KandinskyV22Pipeline":
        if pipe.unet.config.encoder_hid_dim != width:
            raise ConfigError(f"generate: {pipeline} is conditioned on {pipe.unet.config.encoder_hid_dim}-wide "
                              f"embeddings; the store's backbone makes {width}-wide ones")
        size = m.backbone.model.config.image_size
        with torch.no_grad():  # the prior's negative embedding: the encoder on an all-zero (normalized) image
            zeros = torch.zeros(1, 3, size, size, device=device)
            negative = m.backbone.model(pixel_values=zeros).image_embeds.to(device, pipe.dtype)

    def embed(images: Tensor) -> Tensor:
        with torch.no_grad():
            return m.backbone.outputs(images)[0].float()

    def generate(embedding: Tensor, prompt: str, seed: int, steps: int, guidance: float | None, size: int | None,
                 stop: Callable[[], bool] | None) -> Any:
        e = embedding.to(device, pipe.dtype)
        options: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pil",
                                   "generator": torch.Generator("cpu").manual_seed(seed)}
        if guidance is not None:
            options["guidance_scale"] = float(guidance)
        if size is not None:
            options["height"] = options["width"] = int(size)

        def step(*args: Any) -> Any:
            if stop is not None and stop():
                raise _Stopped
            return args[-1] if len(args) == 4 else None  # callback_on_step_end returns its kwargs
        if kind == "StableUnCLIPImg2ImgPipeline":
            options.update(image_embeds=e, prompt=prompt, callback=step, callback_steps=1)
        elif kind == "KandinskyV22Pipeline":
            options.update(image_embeds=e, negative_image_embeds=negative, callback_on_step_end=step)
        else:
            options.update(prompt=prompt, ip_adapter_image_embeds=[torch.stack([torch.zeros_like(e), e])],
                           callback_on_step_end=step)
        try:
            with torch.no_grad():
                return pipe(**options).images[0]
        except _Stopped:
            return None
        except ValueError as e:  # the pipeline's own checks of size, steps, prompt
            raise ConfigError(f"generate: {' '.join(str(e).split())[:200]}") from e

    name = f"generate:{os.path.basename(folder.rstrip('/'))}" if arg else "generate"
    return GenerateHead(name, generate, embed, _reaches_embedding(m))
