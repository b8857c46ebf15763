"""Tiny VLMs with random weights (LLaVA, Idefics3, SmolVLM, PaliGemma), saved as folders that `hf:<folder>` loads,
built without any download.

The tokenizer is byte-level with no merges (every byte one token, any prompt encodes), built with `tokenizers`
over the 256 byte symbols, as tests/test_evaluate.py builds its tiny CLIP's; its answers are random bytes, but
they are a real LlavaForConditionalGeneration's (Idefics3ForConditionalGeneration's, ...) samples through the real
processor, chat template and generate. Each has a 3-layer, 32-wide vision tower on 32 px images in 8 px patches and a
1-layer language model whose weights are drawn wider than transformers' 0.02, so that what the image is (and any
intervention on it) shows in the answers.
"""

from __future__ import annotations

import os
from typing import Any

from actstore.errors import ConfigError

__all__ = ["CHAT_TEMPLATE", "IDEFICS3_TEMPLATE", "tiny_config", "tiny_tokenizer", "write_tiny_idefics3",
           "write_tiny_llava", "write_tiny_paligemma", "write_tiny_smolvlm"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""llava-1.5's conversation format ("USER: <image>\\n{prompt} ASSISTANT:"), as the llava-hf checkpoints' template
writes it."""

IDEFICS3_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Idefics3's conversation format ("User:<image>{prompt}<end_of_utterance>\nAssistant:")."""

_SPECIAL = ("<s>", "</s>", "<pad>", "<image>")
_IDEFICS3_SPECIAL = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
_IMAGE, _PATCH = 32, 8
_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": _IMAGE, "patch_size": _PATCH}


def _text(model_type: str, vocab_size: int) -> dict[str, Any]:
    """A 1-layer, 32-wide language model's config; its weights (and the projector's) drawn at 0.1: 0.02 leaves the
    image too faint."""
    return {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab_size,
            "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
            "initializer_range": 0.1}


def tiny_config() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the tiny CLIP tower's config, the 1-layer Llama's without its vocab_size), as dicts."""
    return {"model_type": "clip_vision_model", **_TOWER}, _text("llama", 0)


def _save(folder: str, seed: int, model_class: Any, config: Any, processor: Any) -> str:
    from actstore.extract.hooked import seeded

    model = seeded(seed, model_class, config)
    path = os.path.abspath(os.path.expanduser(folder))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_tokenizer(extra: tuple[str, ...] = ()) -> Any:
    """Byte-level BPE without merges: ids 0-3 are the special tokens (then `extra`, special too), then one id a
    byte."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate([*_SPECIAL, *extra, *bytes_to_unicode().values()])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    return tokenizer


def write_tiny_llava(folder: str, seed: int = 0, *, vision: str = "clip") -> str:
    """Save a tiny LLaVA (a 3-layer, 32-wide CLIP or SigLIP vision tower on 32 px images in 8 px patches, a
    1-layer Llama, a byte-level tokenizer, the processor with llava-1.5's chat template) to `folder`, its
    weights drawn as `hf:` draws random ones with init_seed `seed` (which rebuilds them); returns its absolute
    path. CLIP's features drop CLS (strategy "default"), SigLIP's have none ("full"); both read the
    second-to-last layer, as llava-1.5 does. The language model's weights are drawn wider than transformers'
    0.02, so that what the image is (and any intervention on it) shows in the answers."""
    import transformers

    if vision not in ("clip", "siglip"):
        raise ConfigError(f"vision must be clip or siglip, got {vision!r}")
    tokenizer = tiny_tokenizer()
    clip = vision == "clip"
    strategy = "default" if clip else "full"
    config = transformers.LlavaConfig(vision_config={"model_type": f"{vision}_vision_model", **_TOWER},
                                      text_config=_text("llama", len(tokenizer)), vision_feature_layer=-2,
                                      vision_feature_select_strategy=strategy, image_seq_length=(_IMAGE // _PATCH) ** 2,
                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    if clip:
        image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": _IMAGE},
                                                          crop_size={"height": _IMAGE, "width": _IMAGE})
    else:
        image_processor = transformers.SiglipImageProcessor(size={"height": _IMAGE, "width": _IMAGE})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                                            vision_feature_select_strategy=strategy, chat_template=CHAT_TEMPLATE,
                                            num_additional_image_tokens=int(clip))
    return _save(folder, seed, transformers.LlavaForConditionalGeneration, config, processor)


def _write_idefics3_like(folder: str, seed: int, family: str, **parts: Any) -> str:
    """Save a tiny `family` model (Idefics3 or SmolVLM: the same tower, connector and processor under their own
    classes; `parts`: the processor's other parts) with Idefics3's chat template."""
    import transformers

    def cls(suffix: str) -> Any:
        return getattr(transformers, f"{family}{suffix}")

    tokenizer = tiny_tokenizer(_IDEFICS3_SPECIAL)
    image_processor = cls("ImageProcessor")(do_image_splitting=False, size={"longest_edge": _IMAGE},
                                            max_image_size={"longest_edge": _IMAGE}, do_pad=False)
    processor = cls("Processor")(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                 chat_template=IDEFICS3_TEMPLATE, **parts)
    config = cls("Config")(vision_config=_TOWER, text_config=_text("llama", len(tokenizer)), scale_factor=2,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return _save(folder, seed, cls("ForConditionalGeneration"), config, processor)


def write_tiny_idefics3(folder: str, seed: int = 0) -> str:
    """Save a tiny Idefics3 (its SigLIP-like tower, a pixel-shuffle connector of scale 2: 4 image tokens, a 1-layer
    Llama, Idefics3's chat template) to `folder`, its weights drawn as `hf:` draws random ones with init_seed
    `seed`; returns its absolute path. Its image processor splits nothing (one global image of 32 px)."""
    return _write_idefics3_like(folder, seed, "Idefics3")


def write_tiny_smolvlm(folder: str, seed: int = 0) -> str:
    """Save a tiny SmolVLM, built as write_tiny_idefics3's Idefics3 (SmolVLM's processor also takes a video
    processor, unused here; it needs the `num2words` package)."""
    import transformers

    return _write_idefics3_like(folder, seed, "SmolVLM", video_processor=transformers.SmolVLMVideoProcessor())


def write_tiny_paligemma(folder: str, seed: int = 0) -> str:
    """Save a tiny PaliGemma (a SigLIP tower without its head, a 1-layer Gemma, PaliGemma's processor: 16 image
    tokens and <bos> before the prompt, its 1,152 <locXXXX> and <segXXX> tokens added) to `folder`, its weights drawn
    as `hf:` draws random ones with init_seed `seed`; returns its absolute path."""
    import transformers

    tokenizer = tiny_tokenizer()
    image_processor = transformers.SiglipImageProcessor(size={"height": _IMAGE, "width": _IMAGE})
    image_processor.image_seq_length = (_IMAGE // _PATCH) ** 2
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = transformers.PaliGemmaConfig(vision_config={"model_type": "siglip_vision_model", **_TOWER},
                                          text_config=_text("gemma", len(tokenizer)), projection_dim=32,
                                          image_token_id=processor.image_token_id)
    return _save(folder, seed, transformers.PaliGemmaForConditionalGeneration, config, processor)
