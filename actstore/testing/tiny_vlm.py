"""A tiny LLaVA with random weights, saved as a folder that `hf:<folder>` loads, built without any download.

The tokenizer is byte-level with no merges (every byte one token, any prompt encodes), built with `tokenizers`
over the 256 byte symbols, as tests/test_evaluate.py builds its tiny CLIP's; its answers are random bytes, but
they are a real LlavaForConditionalGeneration's samples through the real processor, chat template and generate.
"""

from __future__ import annotations

import os
from typing import Any

from actstore.errors import ConfigError

__all__ = ["CHAT_TEMPLATE", "write_tiny_llava"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""llava-1.5's conversation format ("USER: <image>\\n{prompt} ASSISTANT:"), as the llava-hf checkpoints' template
writes it."""

_SPECIAL = ("<s>", "</s>", "<pad>", "<image>")
_IMAGE, _PATCH = 32, 8


def _tokenizer() -> Any:
    """Byte-level BPE without merges: ids 0-3 are the special tokens, then one id a byte."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate([*_SPECIAL, *bytes_to_unicode().values()])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def write_tiny_llava(folder: str, seed: int = 0, *, vision: str = "clip") -> str:
    """Save a tiny LLaVA (a 3-layer, 32-wide CLIP or SigLIP vision tower on 32 px images in 8 px patches, a
    1-layer Llama, a byte-level tokenizer, the processor with llava-1.5's chat template) to `folder`, its
    weights drawn as `hf:` draws random ones with init_seed `seed` (which rebuilds them); returns its absolute
    path. CLIP's features drop CLS (strategy "default"), SigLIP's have none ("full"); both read the
    second-to-last layer, as llava-1.5 does. The language model's weights are drawn wider than transformers'
    0.02, so that what the image is (and any intervention on it) shows in the answers."""
    import transformers

    from actstore.extract.hooked import seeded

    if vision not in ("clip", "siglip"):
        raise ConfigError(f"vision must be clip or siglip, got {vision!r}")
    tokenizer = _tokenizer()
    clip = vision == "clip"
    tower = {"model_type": f"{vision}_vision_model", "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": _IMAGE, "patch_size": _PATCH}
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
            "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
            "initializer_range": 0.1}  # the language model's and projector's: 0.02 leaves the image too faint
    strategy = "default" if clip else "full"
    config = transformers.LlavaConfig(vision_config=tower, text_config=text, vision_feature_layer=-2,
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
    model = seeded(seed, transformers.LlavaForConditionalGeneration, config)
    path = os.path.abspath(os.path.expanduser(folder))
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
