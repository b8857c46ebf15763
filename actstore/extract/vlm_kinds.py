"""Vision-language model families whose vision tower an `hf:` Backbone is: one VLMKind each (VLM_KINDS).

An entry says, for one transformers model type, which class the whole model is, where its vision tower sits, which
tower kinds it may have (actstore.extract.hf's tower kinds: blocks, CLS), which layer of the tower its language model
reads and whether it drops that layer's first token (`read_layer`: steering refuses edits it cannot see), and how
the prompt and the image go into `generate` (`generate_inputs`: always the Backbone's own pixels,
`backbone.normalize(images)`, so that what extraction and splicing see is what the VLM answers about).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from actstore.errors import ConfigError

__all__ = ["FALLBACK_PROMPT", "VLM_KINDS", "ReadLayer", "VLMKind", "generate_inputs", "hidden_state_block",
           "llava_read", "read_layer"]

FALLBACK_PROMPT = "USER: {image}\n{prompt} ASSISTANT:"
"""llava-1.5's conversation format, for a processor without a chat template ({image}: its image token)."""


@dataclass(frozen=True)
class ReadLayer:
    """Where a VLM's language model reads the vision tower."""

    index: int
    """The last tower block whose output it reads (-1: the embeddings)."""
    rule: str
    """What says so (a config field, or the model's code), for messages."""
    drops_first: bool = False
    """Whether its projector drops that layer's first token (LLaVA's CLS under strategy "default")."""
    drop_rule: str = ""
    """What says so."""


def hidden_state_block(spec: int | list[int] | tuple[int, ...], n_blocks: int) -> int:
    """The last block that hidden_states[i] (i in `spec`) is the output of: hidden_states[i] is block i - 1's output
    (0: the embeddings, -1), negative i counts from the end."""
    return max(i - 1 if i >= 0 else n_blocks + i for i in (spec if isinstance(spec, (list, tuple)) else [spec]))


def llava_read(config: Any, n_blocks: int) -> ReadLayer:
    """LLaVA reads hidden_states[vision_feature_layer] (a list: several, concatenated) and, with
    vision_feature_select_strategy "default", drops their first token (CLIP's CLS)."""
    spec, strategy = config.vision_feature_layer, getattr(config, "vision_feature_select_strategy", "full")
    return ReadLayer(hidden_state_block(spec, n_blocks), f"vision_feature_layer {spec}", strategy == "default",
                     f"vision_feature_select_strategy {strategy!r}")


def _prompt_text(processor: Any, prompt: str, fallback: str) -> str:
    """The processor's chat template with one image and the prompt, else `fallback` ({image}: its image token)."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True)
    return fallback.format(image=processor.image_token, prompt=prompt)


def _last_read(config: Any, n_blocks: int) -> ReadLayer:
    """Idefics3, SmolVLM and PaliGemma read the tower's last_hidden_state: its last block's output after its
    post_layernorm, every token (there is no CLS; Idefics3's connector pixel-shuffles scale_factor x scale_factor
    patches into one token, so every patch still reaches the language model)."""
    return ReadLayer(n_blocks - 1, f"{config.model_type} reads the tower's last layer, after its post_layernorm")


def _square_idefics3(processor: Any, vision: Any) -> Any:
    """Idefics3's and SmolVLM's processors resize the longest edge, pad, and split large images into a grid of
    crops (`<row_i_col_j>` tokens) beside a global image: set to one image of the tower's size, unsplit and
    unpadded, so that the prompt holds one global image's tokens and the pixels are the Backbone's square."""
    import transformers

    image, side = processor.image_processor, vision.image_size
    image.do_image_splitting, image.do_pad = False, False
    image.size, image.max_image_size = {"longest_edge": side}, {"longest_edge": side}
    return transformers.SiglipImageProcessor(size={"height": side, "width": side}, resample=image.resample,
                                             do_rescale=image.do_rescale, rescale_factor=image.rescale_factor,
                                             do_normalize=image.do_normalize, image_mean=image.image_mean,
                                             image_std=image.image_std)


@dataclass(frozen=True)
class VLMKind:
    """How the models of one transformers VLM type keep their vision tower and take an image."""

    model_class: str
    """The whole model's class in transformers."""
    tower: str
    """Attribute path of the vision tower in the whole model."""
    towers: tuple[str, ...]
    """The vision config model types it may have (actstore.extract.hf's tower kinds)."""
    read: Callable[[Any, int], ReadLayer]
    """(the whole model's config, the tower's number of blocks) -> the layer its language model reads."""
    fallback_prompt: str = FALLBACK_PROMPT
    """The prompt format for a processor without a chat template: {image} its image token, {prompt} the prompt."""
    image_axis: bool = False
    """Whether pixel_values carry an images axis, (B, n_images, 3, H, W)."""
    passed: tuple[str, ...] = ("input_ids", "attention_mask")
    """The processor's outputs that generate takes besides the pixels."""
    single_image: Callable[[Any, Any], Any] | None = None
    """(the whole processor from a source's files, the vision config) -> the image processor the Backbone's
    preprocessing is built from, after setting the whole processor to one fixed-size square image, the tower's input
    (no image splitting): what the Backbone's preprocessor makes is then what the processor expects."""
    backbone: Callable[[Any, Any, VLMKind, str | None], Any] | None = None
    """(BackboneConfig, the whole model, this kind, the source's folder or hub id, None for built-in names) -> the
    Backbone, for a tower that is none of actstore.extract.hf's tower kinds (Qwen's: actstore.extract.qwen_vl)."""
    image_inputs: Callable[[Any, Tensor], dict[str, Tensor]] | None = None
    """(the Backbone, its normalized images) -> generate's image inputs, for a tower that takes other than
    pixel_values (B, 3, H, W) (Qwen's flattened patches and image_grid_thw)."""


def _qwen_read(config: Any, n_blocks: int) -> ReadLayer:
    """Qwen2-VL and Qwen2.5-VL merge the last block's output (every patch) into the language model's tokens."""
    return ReadLayer(n_blocks - 1, "its merger reads the last block")


def _qwen_backbone(*args: Any) -> Any:
    from actstore.extract.qwen_vl import load_qwen_tower  # it imports actstore.extract.hf, which imports this module

    return load_qwen_tower(*args)


def _qwen(model_class: str, tower: str) -> VLMKind:
    return VLMKind(model_class, "model.visual", (tower,), _qwen_read, passed=("input_ids", "attention_mask",
                                                                             "mm_token_type_ids"),
                   backbone=_qwen_backbone, image_inputs=lambda backbone, x: backbone.pixel_inputs(x))


VLM_KINDS: dict[str, VLMKind] = {
    "llava": VLMKind("LlavaForConditionalGeneration", "model.vision_tower",
                     ("clip_vision_model", "siglip_vision_model"), llava_read),
    **{name: VLMKind(cls, "model.vision_model", (f"{name}_vision",), _last_read,
                     "User:{image}{prompt}<end_of_utterance>\nAssistant:", image_axis=True,
                     single_image=_square_idefics3)
       for name, cls in (("idefics3", "Idefics3ForConditionalGeneration"),
                         ("smolvlm", "SmolVLMForConditionalGeneration"))},
    # the processor puts the image tokens and <bos> before the prompt; token_type_ids mark the prefix (attended
    # both ways)
    "paligemma": VLMKind("PaliGemmaForConditionalGeneration", "model.vision_tower", ("siglip_vision_model",),
                         _last_read, "{image}{prompt}", passed=("input_ids", "attention_mask", "token_type_ids")),
    "qwen2_vl": _qwen("Qwen2VLForConditionalGeneration", "qwen2_vl_vision"),
    "qwen2_5_vl": _qwen("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl_vision"),
}
"""Vision-language model types loaded natively, by config model_type."""


def read_layer(backbone: Any) -> ReadLayer:
    """Where the language model of the VLM whose vision tower `backbone` is (an `hf:` VLM Backbone) reads it."""
    kind = getattr(backbone, "vlm_kind", None)
    if kind is None:
        raise ConfigError(f"{backbone.cfg.model} is not a vision-language model's vision tower")
    return kind.read(backbone.vlm.config, backbone.n_blocks)


def generate_inputs(backbone: Any, images: Tensor, prompt: str) -> dict[str, Tensor]:
    """generate's inputs for one uint8 image (1, 3, H, W) and a prompt, on the Backbone's device: the token ids the
    source's processor writes (its chat template, else the kind's format; the image token expanded to one per image
    feature) and the Backbone's pixels. A processor whose own pixel_values for the image have another shape than the
    tower's input (image splitting, crops) is refused: the answers would not be about the Backbone's pixels."""
    kind, processor = backbone.vlm_kind, backbone.processor
    tokens = processor(images=images[0].cpu(), text=_prompt_text(processor, prompt, kind.fallback_prompt),
                       return_tensors="pt")
    pixels = backbone.normalize(images)
    if kind.image_inputs:
        image = kind.image_inputs(backbone, pixels)
    else:
        image = {"pixel_values": pixels[:, None] if kind.image_axis else pixels}
    for key, ours in image.items():  # the processor's own shapes (and grids: integers) must be ours
        theirs = tokens.get(key)
        if theirs is None:
            continue
        if ours.is_floating_point():
            theirs, ours = tuple(theirs.shape), tuple(ours.shape)
        else:
            theirs, ours = theirs.tolist(), ours.tolist()
        if theirs != ours:
            raise ConfigError(f"{backbone.cfg.model}: its processor makes {key} {theirs} for one image, the vision "
                              f"tower takes {ours}; its answers cannot be steered through this backbone")
    return {**{k: tokens[k].to(pixels.device) for k in kind.passed if k in tokens}, **image}
