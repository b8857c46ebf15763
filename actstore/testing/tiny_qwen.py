"""A tiny Qwen2-VL or Qwen2.5-VL with random weights, saved as a folder that `hf:<folder>` loads, built without any
download.

The tokenizer is byte-level with no merges (every byte one token), as actstore.testing.tiny_vlm's for LLaVA, plus
Qwen's special tokens (<|im_start|>, <|vision_start|>, <|image_pad|>, ...); the chat template is Qwen2-VL's (a
system turn, then <|vision_start|><|image_pad|><|vision_end|> for the image), without its video branch. The
processor expands <|image_pad|> to one token per merged 2 x 2 group of patches, as the public checkpoints' does.
"""

from __future__ import annotations

import os
from typing import Any

from actstore.errors import ConfigError

__all__ = ["CHAT_TEMPLATE", "IMAGE_SIZE", "write_tiny_qwen2vl"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's conversation format (images and text; no video, no "Picture n:" ids)."""

_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
IMAGE_SIZE, _PATCH, _MERGE = 32, 4, 2
"""The tiny models' square images (an 8 x 8 patch grid, 4 x 4 merged tokens)."""


def _tokenizer() -> Any:
    """Byte-level BPE without merges: ids 0-6 are the special tokens, then one id a byte; no BOS, as Qwen2's."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate([*_SPECIAL, *bytes_to_unicode().values()])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIAL))  # whole tokens wherever a text holds them, dropped by skip_special_tokens
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def write_tiny_qwen2vl(folder: str, seed: int = 0, version: str = "2") -> str:
    """Save a tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") to `folder`: a 3-block, 32-wide vision tower on
    32 px images in 4 px patches (8 x 8, merged 2 x 2 into 16 language-model tokens; 2.5: windows of 2 x 2 merged
    tokens, full attention at block 1 only), a 1-layer Qwen2 language model, a byte-level tokenizer and the processor
    with Qwen2-VL's chat template (min_pixels = max_pixels = 32 * 32: it never resizes a 32 px image). Its weights
    are drawn as `hf:` draws random ones with init_seed `seed` (which rebuilds them); returns its absolute path. The
    language model's weights are drawn wider than transformers' 0.02, so that what the image is (and any
    intervention on it) shows in the answers."""
    import transformers

    from actstore.extract.hooked import seeded

    if version not in ("2", "2.5"):
        raise ConfigError(f"version must be '2' or '2.5', got {version!r}")
    tokenizer = _tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in
           ("image_pad", "video_pad", "vision_start", "vision_end", "im_end", "endoftext")}
    vision: dict[str, Any] = {"depth": 3, "num_heads": 2, "patch_size": _PATCH, "spatial_merge_size": _MERGE,
                              "temporal_patch_size": 2, "initializer_range": 0.1}
    if version == "2":
        vision |= {"embed_dim": 32, "hidden_size": 32, "mlp_ratio": 2}
    else:
        vision |= {"hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32, "fullatt_block_indexes": [1],
                   "window_size": 2 * _MERGE * _PATCH}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 256,
            "bos_token_id": None, "eos_token_id": ids["im_end"], "pad_token_id": ids["endoftext"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "initializer_range": 0.1}  # the language model's and merger's: 0.02 leaves the image too faint
    name = "Qwen2VL" if version == "2" else "Qwen2_5_VL"
    config = getattr(transformers, f"{name}Config")(
        vision_config=vision, text_config=text, image_token_id=ids["image_pad"], video_token_id=ids["video_pad"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = transformers.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=_PATCH,
                                                         merge_size=_MERGE, temporal_patch_size=2)
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=_PATCH, merge_size=_MERGE, temporal_patch_size=2)
    processor = getattr(transformers, f"{name}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                                          video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    model = seeded(seed, getattr(transformers, f"{name}ForConditionalGeneration"), config)
    path = os.path.abspath(os.path.expanduser(folder))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
