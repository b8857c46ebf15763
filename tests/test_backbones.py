"""Backbones: hooked layers equal the libraries' own intermediates, on real architectures with random weights."""

from __future__ import annotations

import json
import pickle

import numpy as np
import open_clip
import pytest
import timm
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.errors import ConfigError

SIZES = ((240, 320), (300, 200), (97, 150))
"""(H, W) of the random test images: landscape, portrait, smaller than every crop."""


def pil_images(n: int = len(SIZES), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*SIZES[i % len(SIZES)], 3), dtype=np.uint8)) for i in range(n)]


def batch(backbone: Backbone, n: int = 2) -> torch.Tensor:
    """uint8 (n, 3, H, W) as a decode task would make it."""
    return torch.stack([backbone.preprocessor(im) for im in pil_images(n)])


def check_specs(backbone: Backbone, out: dict[str, torch.Tensor], n: int = 2) -> None:
    """forward's dict follows layer_specs: same names in the same order, shapes (B, n_tokens, d)."""
    specs = backbone.layer_specs()
    assert list(out) == [s.name for s in specs]
    for s in specs:
        assert out[s.name].shape == (n, s.tokens.n_tokens, s.d)
        assert out[s.name].dtype == torch.float32 and not out[s.name].requires_grad


def with_prefix(item: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cls: bool) -> torch.Tensor:
    """A forward_intermediates item (patches, or (patches, prefix)) as our layout: [CLS] + patches."""
    patches, prefix = item if isinstance(item, tuple) else (item, None)
    return torch.cat([prefix[:, :1], patches], dim=1) if cls else patches


def resnet_by_hand(visual: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """open_clip ModifiedResNet run module by module: stem, layer1..4, attnpool, as our token layouts."""
    h, out = visual.stem(x), {}
    for k in range(1, 5):
        h = getattr(visual, f"layer{k}")(h)
        out[f"stage{k}"] = h.flatten(2).transpose(1, 2)
    out["attnpool"] = visual.attnpool(h)[:, None]
    return out


@pytest.fixture(scope="module")
def vit_small() -> Backbone:
    return load_backbone(BackboneConfig("timm:vit_small_patch16_224", layers=(5, 0, -1)))


@pytest.fixture(scope="module")
def clip_vit() -> Backbone:
    return load_backbone(BackboneConfig("open_clip:ViT-B-32", layers=(-2, 3)))


@pytest.fixture(scope="module")
def rn50() -> Backbone:
    return load_backbone(BackboneConfig("open_clip:RN50", layers=("attnpool", -2, "stage2")))


def test_timm_vit_hooks_equal_forward_intermediates(vit_small: Backbone) -> None:
    x = batch(vit_small)
    out = vit_small(x)
    check_specs(vit_small, out)
    # forward_intermediates returns blocks in model order, whatever the order of `indices`
    ref = vit_small.model.forward_intermediates(vit_small.normalize(x), indices=[0, 5, 11], return_prefix_tokens=True,
                                                norm=False, output_fmt="NLC", intermediates_only=True)
    for name, item in zip(["0", "5", "11"], ref):
        assert torch.equal(out[name], with_prefix(item, cls=True))
    assert vit_small.layer_specs()[0].tokens.to_dict() == {"cls": True, "grid": [14, 14], "n_registers_dropped": 0,
                                                            "n_tokens": 197}


@pytest.mark.parametrize("model, layers, cls, registers, grid", [
    ("timm:vit_small_patch14_reg4_dinov2", (1, 3), True, 4, (37, 37)),
    ("timm:vit_base_patch16_siglip_224", (2, 0), False, 0, (14, 14)),
    ("open_clip:ViT-B-16-SigLIP", (1, 0), False, 0, (14, 14)),
])
def test_prefix_tokens_dropped_and_stops_early(model: str, layers: tuple[int, ...], cls: bool, registers: int,
                                               grid: tuple[int, int]) -> None:
    backbone = load_backbone(BackboneConfig(model, layers=layers))
    vit = backbone.model.trunk if model.startswith("open_clip") else backbone.model
    ran_after = []
    vit.blocks[max(layers) + 1].register_forward_hook(lambda *_: ran_after.append(True))
    x = batch(backbone, n=1)  # one image: these run at up to 518 px; the other tests cover batching
    out = backbone(x)
    check_specs(backbone, out, n=1)
    assert not ran_after, "blocks after the last requested one must not run"
    for spec in backbone.layer_specs():
        assert (spec.tokens.cls, spec.tokens.n_registers_dropped, spec.tokens.grid) == (cls, registers, grid)
    ref = vit.forward_intermediates(backbone.normalize(x), indices=sorted(layers), return_prefix_tokens=True,
                                    norm=False, output_fmt="NLC", intermediates_only=True, stop_early=True)
    for name, item in zip(map(str, sorted(layers)), ref):
        assert torch.equal(out[name], with_prefix(item, cls))


def test_open_clip_vit_hooks_equal_forward_intermediates(clip_vit: Backbone) -> None:
    x = batch(clip_vit)
    out = clip_vit(x)
    check_specs(clip_vit, out)
    assert [s.index for s in clip_vit.layer_specs()] == [10, 3] and list(out) == ["10", "3"]
    ref = clip_vit.model.forward_intermediates(clip_vit.normalize(x), indices=[3, 10], output_fmt="NLC",
                                               output_extra_tokens=True, intermediates_only=True)
    for name, patches, prefix in zip(["3", "10"], ref["image_intermediates"], ref["image_intermediates_prefix"]):
        assert torch.equal(out[name], torch.cat([prefix, patches], dim=1))


def test_open_clip_resnet_layers_equal_hand_computation(rn50: Backbone) -> None:
    x = batch(rn50)
    out = rn50(x)
    check_specs(rn50, out)
    specs = {s.name: s for s in rn50.layer_specs()}
    assert list(specs) == ["attnpool", "stage4", "stage2"] and rn50.n_blocks == 5
    assert (specs["attnpool"].index, specs["attnpool"].d, specs["attnpool"].tokens.n_tokens) == (4, 1024, 1)
    assert (specs["stage4"].index, specs["stage4"].d, specs["stage4"].tokens.grid) == (3, 2048, (7, 7))
    assert not specs["stage4"].tokens.cls and specs["stage2"].tokens.grid == (28, 28)
    ref = resnet_by_hand(rn50.model, rn50.normalize(x))
    for name in specs:
        assert torch.equal(out[name], ref[name])


def test_split_preprocessing_equals_model_transform(vit_small: Backbone, clip_vit: Backbone) -> None:
    full = {
        "timm": create_transform(**resolve_data_config(model=vit_small.model), is_training=False),
        "open_clip": image_transform_v2(PreprocessCfg(**clip_vit.model.preprocess_cfg), is_train=False),
    }
    for backbone in (vit_small, clip_vit):
        shipped = pickle.loads(pickle.dumps(backbone.preprocessor))  # as sent to decode tasks
        for im in pil_images(6, seed=1):
            u8 = shipped(im)
            assert u8.dtype == torch.uint8 and u8.shape == (3, *backbone.preprocessor.image_size)
            torch.testing.assert_close(backbone.normalize(u8[None])[0], full[backbone.family](im), rtol=0, atol=1e-6)
        assert shipped(im.convert("L")).shape == u8.shape  # grayscale decodes to RGB, as the libraries' loaders do


def test_negative_indices_and_layer_errors() -> None:
    backbone = load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=("-1", -2, "3")))
    assert [(s.name, s.index) for s in backbone.layer_specs()] == [("11", 11), ("10", 10), ("3", 3)]
    with pytest.raises(ConfigError, match=r"no layer 12; use a block index in \[-12, 12\)"):
        load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(12,)))
    with pytest.raises(ConfigError, match="twice"):
        load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(-1, 11)))
    with pytest.raises(ConfigError, match="attnpool"):
        load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=("attnpool",)))


def test_seeded_random_init_is_reproducible() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = (load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(-2,), init_seed=s)) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not move the caller's RNG"
    x = batch(a)
    out = a(x)["10"]
    assert torch.equal(out, b(x)["10"])
    assert not torch.equal(out, c(x)["10"])


def test_timm_local_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(7)
    saved = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file(saved.state_dict(), str(path))
    backbone = load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(-1, 2), pretrained=str(path)))
    assert backbone.metadata()["checkpoint"] == str(path)
    x = batch(backbone)
    out = backbone(x)
    ref = saved.forward_intermediates(backbone.normalize(x), indices=[2, 11], return_prefix_tokens=True,
                                      output_fmt="NLC", intermediates_only=True)
    for name, item in zip(["2", "11"], ref):
        assert torch.equal(out[name], with_prefix(item, cls=True))


def test_open_clip_local_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(5)
    # a full CLIP state dict, as open_clip saves them; no autograd, so attention takes the same fused path as ours
    saved = open_clip.create_model("ViT-S-32-alt").eval().requires_grad_(False)
    path = tmp_path / "vit_s_32.pt"
    torch.save(saved.state_dict(), path)
    backbone = load_backbone(BackboneConfig("open_clip:ViT-S-32-alt", layers=(-1,), pretrained=str(path)))
    x = batch(backbone)
    ref = saved.visual.forward_intermediates(backbone.normalize(x), indices=[11], output_fmt="NLC",
                                             output_extra_tokens=True, intermediates_only=True)
    expected = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
    assert torch.equal(backbone(x)["11"], expected)


def test_bad_checkpoints_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="checkpoint file not found"):
        load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", pretrained=str(tmp_path / "missing.pt")))
    torch.save({"not_a_weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not load into timm:vit_tiny_patch16_224"):
        load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", pretrained=str(tmp_path / "bad.pt")))


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "ViT-B-32"}, r"unknown backbone 'ViT-B-32'; use open_clip:<arch> or timm:<arch>"),
    ({"model": "torchvision:resnet50"}, r"use open_clip:<arch> or timm:<arch>"),
    ({"model": "timm:vit_nonexistent"}, r"unknown timm model 'vit_nonexistent'; see timm.list_models\(\)"),
    ({"model": "open_clip:ViT-Z-99"}, r"unknown open_clip model 'ViT-Z-99'"),
    ({"model": "open_clip:ViT-B-32", "pretrained": "nope"}, r"unknown open_clip pretrained tag .*laion2b_s34b_b79k"),
    ({"model": "timm:vit_small_patch16_224", "pretrained": "nope"}, r"unknown timm pretrained tag 'nope'"),
    ({"model": "timm:vit_small_patch16_224", "pretrained": True}, r"pretrained must be a tag, 'hub' or a file path"),
    ({"model": "timm:vit_small_patch16_224", "layers": ()}, r"at least one layer"),
    ({"model": "timm:vit_small_patch16_224", "layers": (True,)}, r"invalid layer True"),
])
def test_invalid_configs_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BackboneConfig(**kwargs)


def test_config_parses_layers_and_accepts_hub_tags() -> None:
    cfg = BackboneConfig("open_clip:RN50", layers=["-2", " attnpool", 3], pretrained="openai")
    assert (cfg.family, cfg.arch, cfg.layers) == ("open_clip", "RN50", (-2, "attnpool", 3))
    BackboneConfig("timm:vit_small_patch16_224", pretrained="hub")
    BackboneConfig("timm:vit_small_patch16_224", pretrained="augreg_in21k")


def test_metadata_and_frozen_module(vit_small: Backbone) -> None:
    meta = json.loads(json.dumps(vit_small.metadata()))
    assert {k: meta[k] for k in ("family", "name", "checkpoint", "init_seed", "n_blocks")} == {
        "family": "timm", "name": "vit_small_patch16_224", "checkpoint": None, "init_seed": 0, "n_blocks": 12}
    prep = meta["preprocessing"]
    assert prep["image_size"] == [224, 224] and prep["mean"] == [0.5] * 3 and prep["interpolation"] == "bicubic"
    assert prep["resize"] == 248 and prep["crop"] == [224, 224]
    vit_small.train()
    assert not vit_small.model.training and not any(p.requires_grad for p in vit_small.parameters())
