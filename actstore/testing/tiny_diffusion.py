"""Tiny diffusers pipelines with random weights, saved as folders, built without any download: the generation
head's tests and benchmark.

Each is conditioned on a CLIP image embedding made by a tiny CLIPVisionModelWithProjection (8 px patches on 32 px
images, 2 layers), which `hf:<folder>/image_encoder` loads as a store's backbone, as a user extracts from a real
pipeline's image encoder:

    write_tiny_unclip(folder)       StableUnCLIPImg2ImgPipeline (image_encoder/ inside the pipeline)
    write_tiny_kandinsky(folder)    KandinskyV22Pipeline, the decoder, in folder/decoder; its prior's image encoder
                                    in folder/image_encoder (the decoder carries none)
    write_tiny_ip_adapter(folder)   StableDiffusionPipeline in folder/sd, and IP-Adapter weights laid out as
                                    h94/IP-Adapter's: folder/adapter/models/ip-adapter.safetensors and
                                    folder/adapter/models/image_encoder/

The tokenizers are byte-level with no merges (as actstore.testing.tiny_vlm's).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["IMAGE_SIZE", "write_tiny_ip_adapter", "write_tiny_kandinsky", "write_tiny_unclip"]

IMAGE_SIZE = 32
"""The image encoder's input size (pixels)."""
_WIDTH = 32
"""The image encoder's and text encoder's width, and the image embedding's (projection_dim)."""


def _image_encoder() -> Any:
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=_WIDTH, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                                           projection_dim=_WIDTH)
    return transformers.CLIPVisionModelWithProjection(config).eval()


def _feature_extractor() -> Any:
    import transformers

    return transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _text() -> tuple[Any, Any]:
    """(a byte-level CLIP tokenizer, a 2-layer CLIP text encoder)."""
    import json
    import tempfile

    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}}
    with tempfile.TemporaryDirectory() as tmp:  # CLIPTokenizer is built from its files
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = transformers.CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                                               model_max_length=16)
    config = transformers.CLIPTextConfig(hidden_size=_WIDTH, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=len(vocab), max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=_WIDTH)
    return tokenizer, transformers.CLIPTextModel(config).eval()


def _unet(**fields: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": (2, 4), "cross_attention_dim": _WIDTH, "norm_num_groups": 8, **fields})


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)


def _save(pipeline: Any, folder: str) -> str:
    path = os.path.abspath(os.path.expanduser(folder))
    pipeline.save_pretrained(path)
    return path


def write_tiny_unclip(folder: str, seed: int = 0) -> str:
    """A tiny Stable unCLIP image-variation pipeline (its image encoder in folder/image_encoder); returns the
    folder's absolute path."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, text_encoder = _text()
        pipeline = StableUnCLIPImg2ImgPipeline(
            feature_extractor=_feature_extractor(), image_encoder=_image_encoder(),
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=_WIDTH),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            tokenizer=tokenizer, text_encoder=text_encoder,
            unet=_unet(class_embed_type="projection", projection_class_embeddings_input_dim=2 * _WIDTH,
                       use_linear_projection=True),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                    clip_sample=False),
            vae=_vae())
    return _save(pipeline, folder)


def write_tiny_kandinsky(folder: str, seed: int = 0) -> str:
    """A tiny Kandinsky 2.2 decoder in folder/decoder and its prior's image encoder in folder/image_encoder;
    returns the folder's absolute path."""
    import torch
    from diffusers import DDPMScheduler, KandinskyV22Pipeline, VQModel

    path = os.path.abspath(os.path.expanduser(folder))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = _image_encoder()
        unet = _unet(encoder_hid_dim=_WIDTH, encoder_hid_dim_type="image_proj", addition_embed_type="image",
                     out_channels=8)  # learned variance: the decoder's unet predicts 2 x 4 channels
        movq = VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                       num_vq_embeddings=32, vq_embed_dim=4)
        scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  prediction_type="epsilon", variance_type="learned_range")
        pipeline = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    encoder.save_pretrained(os.path.join(path, "image_encoder"))
    _save(pipeline, os.path.join(path, "decoder"))
    return path


def write_tiny_ip_adapter(folder: str, seed: int = 0) -> str:
    """A tiny Stable Diffusion in folder/sd and an IP-Adapter for it in folder/adapter/models (weights file
    ip-adapter.safetensors, image encoder in image_encoder/), as load_ip_adapter reads them; returns the folder's
    absolute path."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    path = os.path.abspath(os.path.expanduser(folder))
    models = os.path.join(path, "adapter", "models")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, text_encoder = _text()
        unet = _unet()
        pipeline = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                   beta_end=0.012, set_alpha_to_one=False,
                                                                   steps_offset=1, clip_sample=False),
                                           safety_checker=None, feature_extractor=_feature_extractor(),
                                           requires_safety_checker=False)
        encoder = _image_encoder()
        # the adapter: the embedding projected to 4 extra context tokens, and key/value projections of them for
        # every cross-attention, numbered as IP-Adapter's checkpoints are (1, 3, 5, ... over the cross-attentions)
        tokens = 4
        weights = {"image_proj.proj.weight": torch.randn(tokens * _WIDTH, _WIDTH) * 0.2,
                   "image_proj.proj.bias": torch.zeros(tokens * _WIDTH),
                   "image_proj.norm.weight": torch.ones(_WIDTH), "image_proj.norm.bias": torch.zeros(_WIDTH)}
        cross = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
        for i, name in enumerate(cross):
            attn = unet.get_submodule(name.rsplit(".", 1)[0])
            for proj in ("to_k", "to_v"):
                weights[f"ip_adapter.{2 * i + 1}.{proj}_ip.weight"] = torch.randn_like(getattr(attn, proj).weight) * 0.2
    _save(pipeline, os.path.join(path, "sd"))
    os.makedirs(models, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(models, "ip-adapter.safetensors"))
    encoder.save_pretrained(os.path.join(models, "image_encoder"))
    return path
