"""The vision tower of Qwen2-VL and Qwen2.5-VL as a Backbone, on square images of one fixed size.

Qwen's tower is unlike a ViT's. Its input is flattened patches, (N, C * temporal_patch_size * P * P), each image
repeated temporal_patch_size times (one temporal token a patch); inside the blocks the hidden states are (seq, d),
the images of a batch one after another; the tokens of an image are ordered by spatial_merge_size x
spatial_merge_size groups (the merger turns each group into one language-model token), and Qwen2.5-VL reorders the
groups into attention windows before the blocks (full attention only at fullatt_block_indexes) and undoes that after
the merger. Here:

- images are squares of `image_size` pixels (resize of the shorter side, bicubic as Qwen's processor, then a center
  crop), a multiple of patch_size * spatial_merge_size, so that the processor, whose min/max_pixels allow it, never
  resizes them; `patchify` makes the model's input from `Backbone.normalize`'s pixels (the processor's own layout);
- a layer's tokens are (B, n_patches, d), the patch grid row by row, no CLS: `_tokens` undoes the group (and window)
  order and `_replace` writes tokens back in the model's order, so an intervention edits the patch it names;
- the language model reads the last block's output through the merger (every patch reaches it), so an SAE on any
  block can steer the answers;
- the Backbone's embedding (`outputs()[0]`) is the mean of the merger's output tokens, the features the language
  model is given (the tower has no pooled output of its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from actstore.errors import ConfigError
from actstore.extract.hf import HFVisionTower
from actstore.extract.preprocess import Preprocessor

if TYPE_CHECKING:
    from actstore.extract.backbones import BackboneConfig
    from actstore.extract.vlm_kinds import VLMKind

__all__ = ["QWEN_IMAGE_SIZE", "QwenVisionTower", "load_qwen_tower", "model_order", "patchify", "qwen_image_size",
           "qwen_preprocessor"]
QWEN_IMAGE_SIZE = 448
"""The side of the images fed to a Qwen checkpoint (32 x 32 patches of 14 px, 256 language-model tokens), unless its
processor names one size (min_pixels = max_pixels = side * side, as actstore.testing.tiny_qwen's)."""
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
"""Qwen2VLImageProcessor's defaults (OpenAI CLIP's), for a folder saved without a processor."""


def patchify(x: Tensor, patch: int, merge: int, temporal: int) -> Tensor:
    """Normalized images (B, C, H, W) -> the tower's pixel_values (B * h * w, C * temporal * patch * patch): each
    image repeated `temporal` times (a still image is a clip of one temporal patch), its h x w patches in
    merge x merge groups (groups row by row, then the patches of a group row by row), each patch's values
    channel-major, then time, then its pixels row by row."""
    b, c, height, width = x.shape
    h, w = height // patch, width // patch
    groups = x.reshape(b, c, h // merge, merge, patch, w // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    clips = groups.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return clips.reshape(b * h * w, c * temporal * patch * patch)


def model_order(grid: Sequence[int], merge: int, window: tuple[int, int] | None = None) -> Tensor:
    """(n_patches,) long: the row-major index of the patch at each of an image's positions inside the blocks.

    Qwen2-VL: merge x merge groups, row by row. Qwen2.5-VL (`window`: its (window_size, patch_size)): the groups
    reordered into attention windows by transformers' own get_vision_window_index, as the tower does."""
    h, w = int(grid[0]), int(grid[1])
    groups = torch.arange(h * w).reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3)
    groups = groups.reshape(-1, merge * merge)
    if window is not None:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(torch.tensor([[1, h, w]]), merge, *window)
        groups = groups[index]
    return groups.reshape(-1)


def qwen_image_size(config: Any, image_processor: Any | None) -> int:
    """The square side images are fed at: the processor's one size where min_pixels = max_pixels names a square,
    else QWEN_IMAGE_SIZE; ConfigError where it is not a multiple of patch_size * spatial_merge_size or the processor
    would resize it (then its image_grid_thw, and the prompt's image tokens, would not match our pixels)."""
    factor = config.patch_size * config.spatial_merge_size
    size, bounds = QWEN_IMAGE_SIZE, None
    if image_processor is not None:
        bounds = (image_processor.size["shortest_edge"], image_processor.size["longest_edge"])
        if bounds[0] == bounds[1] and math.isqrt(bounds[0]) ** 2 == bounds[0]:
            size = math.isqrt(bounds[0])
        if getattr(image_processor, "patch_size", config.patch_size) != config.patch_size or getattr(
                image_processor, "merge_size", config.spatial_merge_size) != config.spatial_merge_size:
            raise ConfigError(f"the processor's patch and merge sizes ({image_processor.patch_size}, "
                              f"{image_processor.merge_size}) are not the model's ({config.patch_size}, "
                              f"{config.spatial_merge_size})")
    if size % factor:
        raise ConfigError(f"images of {size} px are not a multiple of the patch size times the merge size ({factor})")
    if bounds is not None and not bounds[0] <= size * size <= bounds[1]:
        raise ConfigError(f"the processor's min_pixels/max_pixels {bounds} would resize {size} x {size} images")
    return size


def qwen_preprocessor(image_processor: Any | None, size: int) -> Preprocessor:
    """Resize the shorter side to `size` (bicubic, as Qwen's processor), center crop a square, then the
    processor's mean and std."""
    mean, std = (_CLIP_MEAN, _CLIP_STD) if image_processor is None else (image_processor.image_mean,
                                                                          image_processor.image_std)
    steps = [Resize(size, InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(), Normalize(mean, std)]
    return Preprocessor.from_transform(Compose(steps), size)


class QwenVisionTower(HFVisionTower):
    """`model.visual` of a Qwen2-VL or Qwen2.5-VL (the VLM kept as `vlm`): blocks are the layers, each (B, h * w, d)
    tokens in row-major patch order (see the module docstring)."""

    def __init__(self, cfg: BackboneConfig, vlm: nn.Module, kind: VLMKind, processor: Any,
                 preprocessor: Preprocessor) -> None:
        config = vlm.config.vision_config
        tower = vlm.model.visual
        side = preprocessor.image_size[0]
        grid = (side // config.patch_size,) * 2
        d = getattr(config, "embed_dim", None) or config.hidden_size  # 2: embed_dim; 2.5: hidden_size
        super().__init__(cfg, vlm, kind, tower, processor, preprocessor, tower.blocks, d=d, grid=grid, n_prefix=0,
                         has_cls=False)
        self.patch, self.merge, self.temporal = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
        window = (config.window_size, self.patch) if hasattr(config, "fullatt_block_indexes") else None  # 2.5
        self._order = model_order(grid, self.merge, window)
        self._inverse = torch.argsort(self._order)

    def pixel_inputs(self, x: Tensor) -> dict[str, Tensor]:
        """Normalized images (B, 3, S, S) -> the VLM's image inputs: pixel_values and image_grid_thw ([1, h, w] an
        image), as Qwen's processor makes them from the same pixels."""
        h, w = (n // self.patch for n in x.shape[-2:])
        grid = torch.tensor([[1, h, w]] * x.shape[0], dtype=torch.long, device=x.device)
        return {"pixel_values": patchify(x, self.patch, self.merge, self.temporal), "image_grid_thw": grid}

    def _run(self, x: Tensor) -> Any:
        inputs = self.pixel_inputs(x)
        return self.model(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

    def _embedding(self, x: Tensor) -> tuple[Tensor, None]:
        """The mean of the merger's output tokens (what the language model is given for the image)."""
        merged = self._run(x).pooler_output
        return merged.reshape(x.shape[0], -1, merged.shape[-1]).mean(1), None

    def _tokens(self, index: int, output: Tensor) -> Tensor:
        n = self._order.numel()
        return output.reshape(-1, n, output.shape[-1])[:, self._inverse.to(output.device)]

    def _replace(self, index: int, output: Tensor, tokens: Tensor) -> Tensor:
        return tokens[:, self._order.to(tokens.device)].reshape(output.shape)


def load_qwen_tower(cfg: BackboneConfig, vlm: nn.Module, kind: VLMKind, where: str | None) -> QwenVisionTower:
    """The Backbone of a loaded Qwen VLM (actstore.extract.vlm_kinds' entries build it so): the source's whole
    processor where it has one (its image processor's mean, std and pixel bounds), else Qwen's defaults and no
    processor (extraction works; answers need its tokenizer)."""
    import transformers
    from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME, cached_file

    processor = None
    if where is not None and any(cached_file(where, name, _raise_exceptions_for_missing_entries=False)
                                 for name in (PROCESSOR_NAME, IMAGE_PROCESSOR_NAME)):
        processor = transformers.AutoProcessor.from_pretrained(where)
    image_processor = getattr(processor, "image_processor", processor)  # a folder with an image processor only
    size = qwen_image_size(vlm.config.vision_config, image_processor)
    return QwenVisionTower(cfg, vlm, kind, processor if hasattr(processor, "tokenizer") else None,
                           qwen_preprocessor(image_processor, size))
