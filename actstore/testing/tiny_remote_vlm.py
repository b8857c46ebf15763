"""A tiny VLM that ships its own modeling code (`auto_map` in config.json, as Phi-3.5-vision does), for the
`--trust-remote-code` path (actstore.extract.remote_vlm): a transformers CLIPVisionModel tower whose
hidden_states[layer_idx] (CLS dropped, Phi's "patch" features) are projected into a 1-layer Llama's image tokens.
Written to a folder with its modeling file; no download."""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["MODELING", "write_tiny_remote_vlm"]

MODELING = '''"""A tiny remote-code VLM (actstore.testing.tiny_remote_vlm)."""
import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, GenerationMixin, LlamaConfig, LlamaForCausalLM,
                          PretrainedConfig, PreTrainedModel)


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote_vlm"

    def __init__(self, vision=None, text=None, img_processor=None, image_token_id=3, **kwargs):
        self.vision, self.text = vision or {}, text or {}
        self.img_processor = img_processor or {"layer_idx": -2, "type_feature": "patch"}
        self.image_token_id = image_token_id
        super().__init__(**kwargs)


class TinyRemoteVLM(PreTrainedModel, GenerationMixin):
    config_class = TinyRemoteConfig
    base_model_prefix = "vlm"

    def __init__(self, config):
        super().__init__(config)
        self.img_processor = CLIPVisionModel(CLIPVisionConfig(**config.vision))
        self.proj = nn.Linear(config.vision["hidden_size"], config.text["hidden_size"])
        self.lm = LlamaForCausalLM(LlamaConfig(**config.text))
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, **kwargs):
        embeds = self.lm.get_input_embeddings()(input_ids)
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
        if pixel_values is not None and mask.any():  # the prompt's pass (later steps read the cache)
            spec = self.config.img_processor
            hidden = self.img_processor(pixel_values, output_hidden_states=True).hidden_states[spec["layer_idx"]]
            features = self.proj(hidden[:, 1:] if spec["type_feature"] == "patch" else hidden).to(embeds.dtype)
            embeds = embeds.masked_scatter(mask, features.reshape(-1, features.shape[-1]))
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
'''
"""The folder's modeling_tiny.py: its config and model classes."""


def write_tiny_remote_vlm(folder: str, seed: int = 0) -> str:
    """Save the tiny remote-code VLM (a 3-layer, 32-wide CLIP tower on 32 px images in 8 px patches, read at
    hidden_states[-2] without CLS; LLaVA's processor and chat template for its prompts) to `folder` with its
    modeling_tiny.py, its weights drawn as `hf:` draws random ones with init_seed `seed`; returns its absolute path."""
    import transformers

    from actstore.extract.hooked import seeded
    from actstore.testing.tiny_vlm import CHAT_TEMPLATE, tiny_tokenizer, tiny_config

    path = os.path.abspath(os.path.expanduser(folder))
    os.makedirs(path, exist_ok=True)
    modeling = os.path.join(path, "modeling_tiny.py")
    with open(modeling, "w") as f:
        f.write(MODELING)
    spec = importlib.util.spec_from_file_location("actstore_tiny_remote_modeling", modeling)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(spec.name, None)
    spec.loader.exec_module(module)
    tokenizer = tiny_tokenizer()
    vision, text = tiny_config()
    text = {**text, "vocab_size": len(tokenizer)}
    # the language model's fields at the top too, as Phi-3-vision's config has them (generate's cache reads them)
    config = module.TinyRemoteConfig(vision=vision, text=text,
                                     image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                     **{k: v for k, v in text.items() if k != "model_type"})
    config.auto_map = {"AutoConfig": "modeling_tiny.TinyRemoteConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyRemoteVLM"}
    seeded(seed, module.TinyRemoteVLM, config).save_pretrained(path)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": vision["image_size"]},
                                                      crop_size={"height": vision["image_size"],
                                                                 "width": vision["image_size"]})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                                vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                num_additional_image_tokens=1).save_pretrained(path)
    return path
