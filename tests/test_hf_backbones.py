"""hf: backbones: tiny random configs saved to folders (the path users take for local folders); hooked layers
equal transformers' own output_hidden_states, the split preprocessing equals the model's own processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore.extract import ExtractConfig, run_extract
from actstore.extract.backbones import HF_CONFIGS, HF_MODEL_TYPES, Backbone, BackboneConfig, load_backbone
from actstore.extract.preprocess import Preprocessor
from actstore.store import ActivationStore
from actstore.testing.shapes import generate_dataset

SIZES = ((240, 320), (300, 200), (97, 150), (61, 61))
"""(H, W) of the random test images: landscape, portrait, small, square."""

TINY = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
MODELS = {
    # name: (config, processor, registers, has CLS, grid, final norm of the last layer's output)
    "clip": (lambda: transformers.CLIPConfig(  # both towers, as CLIP checkpoints on the hub are
        vision_config={**TINY, "intermediate_size": 64, "image_size": 32, "patch_size": 8}, text_config=TEXT),
        lambda: transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        0, True, (4, 4), None),
    "siglip": (lambda: transformers.SiglipVisionConfig(**TINY, intermediate_size=64, image_size=32, patch_size=8),
               lambda: transformers.SiglipImageProcessor(size={"height": 32, "width": 32}),
               0, False, (4, 4), "post_layernorm"),
    # crop 40 px, position embeddings for 32 px: interpolated to a 5 x 5 grid, as DINOv2's 518 -> 224
    "dinov2": (lambda: transformers.Dinov2Config(**TINY, mlp_ratio=2, image_size=32, patch_size=8),
               lambda: transformers.BitImageProcessor(size={"shortest_edge": 48}, crop_size=40,
                                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
               0, True, (5, 5), "layernorm"),
    "dinov2_with_registers": (
        lambda: transformers.Dinov2WithRegistersConfig(**TINY, mlp_ratio=2, image_size=32, patch_size=8,
                                                       num_register_tokens=2),
        lambda: transformers.BitImageProcessor(size={"shortest_edge": 48}, crop_size=40),
        2, True, (5, 5), "layernorm"),
    "vjepa2": (lambda: transformers.VJEPA2Config(**TINY, crop_size=32, patch_size=8, tubelet_size=2, frames_per_clip=2,
                                                 pred_hidden_size=16, pred_num_hidden_layers=1,
                                                 pred_num_attention_heads=2, num_pooler_layers=1),
               lambda: transformers.VJEPA2VideoProcessor(crop_size=32),
               0, False, (4, 4), "encoder.layernorm"),
}


def pil_images(n: int = 2, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*SIZES[i % len(SIZES)], 3), dtype=np.uint8)) for i in range(n)]


def crop_shift(im: Image.Image, processor: object) -> tuple[int, int]:
    """How many pixels later our crop starts than the processor's, down and right, after its shortest-edge resize."""
    w, h = im.size
    s = processor.size.shortest_edge
    resized = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    margins = [r - c for r, c in zip(resized, (processor.crop_size.height, processor.crop_size.width))]
    return tuple(round(m / 2.0) - m // 2 for m in margins)


def batch(backbone: Backbone, n: int = 2) -> torch.Tensor:
    """uint8 (n, 3, H, W) as a decode task would make it."""
    return torch.stack([backbone.preprocessor(im) for im in pil_images(n)])


def reference(backbone: Backbone, x: torch.Tensor) -> transformers.utils.ModelOutput:
    """transformers' own forward with output_hidden_states (V-JEPA 2: a one-frame clip, which it repeats itself)."""
    x = backbone.normalize(x)
    with torch.no_grad():
        if isinstance(backbone.model, transformers.VJEPA2Model):
            return backbone.model(pixel_values_videos=x[:, None], skip_predictor=True, output_hidden_states=True)
        return backbone.model(pixel_values=x, output_hidden_states=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each model type's tiny config.json and processor file, as save_pretrained writes them."""
    out = {}
    for name, (config, processor, *_) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(name)
        config().save_pretrained(out[name])
        processor().save_pretrained(out[name])
    return out


@pytest.mark.parametrize("name", MODELS)
def test_hooks_equal_output_hidden_states(name: str, folders: dict[str, Path]) -> None:
    *_, registers, cls, grid, norm = MODELS[name]
    backbone = load_backbone(BackboneConfig(f"hf:{folders[name]}", layers=(-1, 1)))
    assert [(s.name, s.index, s.d) for s in backbone.layer_specs()] == [("2", 2, 32), ("1", 1, 32)]
    for spec in backbone.layer_specs():
        assert (spec.tokens.cls, spec.tokens.grid, spec.tokens.n_registers_dropped) == (cls, grid, registers)
    x = batch(backbone)
    out = backbone(x)
    assert list(out) == ["2", "1"]
    ref = reference(backbone, x)
    assert len(ref.hidden_states) == 4  # the embeddings, then each of the 3 layers' outputs
    # our own token selection: CLS at 0, then the registers, then the patches row by row
    keep = [0, *range(1 + registers, 1 + registers + grid[0] * grid[1])] if cls else list(range(grid[0] * grid[1]))
    for index in (1, 2):
        assert ref.hidden_states[index + 1].shape[1] == len(keep) + registers
        assert torch.equal(out[str(index)], ref.hidden_states[index + 1][:, keep])
    # independent of the hooks: the model's final norm of our last layer is its last_hidden_state
    final = (lambda h: h) if norm is None else backbone.model.get_submodule(norm)
    torch.testing.assert_close(final(out["2"]), ref.last_hidden_state[:, keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_weights_and_saved_checkpoints(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    model = f"hf:{folders[name]}"
    a, b, c = (load_backbone(BackboneConfig(model, layers=(0,), init_seed=s)) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not move the caller's RNG"
    ran_after = []
    a._blocks[1].register_forward_hook(lambda *_: ran_after.append(True))
    x = batch(a)
    out = a(x)["0"]
    assert not ran_after, "layers after the last requested one must not run"
    assert torch.equal(out, b(x)["0"]) and not torch.equal(out, c(x)["0"])

    a.model.save_pretrained(tmp_path / "ckpt")
    for weights in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        loaded = load_backbone(BackboneConfig(model, layers=(0,), pretrained=str(weights)))
        assert torch.equal(loaded(x)["0"], out)
        meta = json.loads(json.dumps(loaded.metadata()))
        assert (meta["family"], meta["name"], meta["checkpoint"]) == ("hf", str(folders[name]), str(weights))
        assert meta["model_class"] == type(a.model).__name__ and meta["config"]["hidden_size"] == 32


@pytest.mark.parametrize("name", MODELS)
def test_split_preprocessing_equals_hf_processor(name: str, folders: dict[str, Path]) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders[name]}", layers=(0,)))
    processor = MODELS[name][1]()
    prep = backbone.preprocessor.describe()
    size = processor.crop_size if processor.do_center_crop else processor.size
    assert prep["image_size"] == [size.height, size.width] and prep["mean"] == list(processor.image_mean)
    if name == "siglip":
        assert (prep["resize"], prep["crop"]) == ([32, 32], None)
    else:
        assert (prep["resize"], prep["crop"]) == (processor.size.shortest_edge, [size.height, size.width])
    for im in pil_images(len(SIZES), seed=1):
        ours = backbone.normalize(backbone.preprocessor(im)[None])[0]
        if name == "vjepa2":
            theirs = processor(videos=[np.array(im)[None]], return_tensors="pt")["pixel_values_videos"][0, 0]
        else:
            theirs = processor(images=im, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape
        # the crop: transformers floors an odd margin, torchvision (ours) rounds it half to even: one pixel later
        # where the margin is 4k + 3 (here (97, 150) -> 36 x 55 for V-JEPA 2's 32 px crop)
        sy, sx = crop_shift(im, processor) if processor.do_center_crop else (0, 0)
        assert (sy, sx) == ((0, 1) if name == "vjepa2" and im.size == (150, 97) else (0, 0))
        # resampling: torchvision's antialiased uint8 kernels (theirs) follow PIL's (ours) to one level of 255
        h, w = ours.shape[1:]
        diff = (ours[:, :h - sy, :w - sx] - theirs[:, sy:, sx:]).abs()
        assert diff.max() <= 1.001 / 255 / min(processor.image_std) and diff.mean() < 1e-3


def test_two_tower_clip_checkpoint_loads_its_vision_tower(folders: dict[str, Path], tmp_path: Path) -> None:
    """A folder saved from a whole CLIPModel (as on the hub), with pretrained "hub": its own vision weights."""
    torch.manual_seed(3)
    clip = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(folders["clip"])).eval()
    clip.save_pretrained(tmp_path)
    MODELS["clip"][1]().save_pretrained(tmp_path)
    backbone = load_backbone(BackboneConfig(f"hf:{tmp_path}", layers=(-1,), pretrained="hub"))
    x = batch(backbone)
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=backbone.normalize(x), output_hidden_states=True)
    torch.testing.assert_close(backbone(x)["2"], ref.hidden_states[3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_builtin_names_have_the_public_sizes(name: str) -> None:
    """Without building the (large) models: the config and processor a built-in name gives."""
    BackboneConfig(f"hf:{name}")
    hub_id, model_type, fields = HF_CONFIGS[name]
    kind, config = HF_MODEL_TYPES[model_type], transformers.AutoConfig.for_model(model_type, **fields)
    prep = Preprocessor.from_hf(getattr(transformers, kind.processor_class)(**kind.processor_defaults(config)))
    assert hub_id.endswith(name) and getattr(transformers, kind.model_class).config_class.model_type == model_type
    # the public processors: DINOv2 256 -> 224 px, V-JEPA 2 292 -> 256, CLIP 224 -> 224, SigLIP an exact resize
    side = int(name[-3:]) if model_type.startswith(("siglip", "vjepa2")) else 224
    resize = {"dinov2": 256, "vjepa2": 292, "clip": 224}.get(model_type.split("_")[0], [side, side])
    assert (prep.image_size, prep.describe()["resize"]) == ((side, side), resize)


def test_config_errors(folders: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    cases = [
        ({"model": "hf:dinov3-tiny"}, r"unknown hf model 'dinov3-tiny'; use a hub id .*dinov2-small"),
        ({"model": f"hf:{tmp_path / 'missing'}"}, r"hf model folder not found: .*missing"),
        ({"model": f"hf:{tmp_path / 'empty'}"}, r"has no config.json"),
        ({"model": f"hf:{tmp_path / 'bert'}"}, r"unsupported model type 'bert'; use one of: clip,"),
        ({"model": "hf:dinov2-small", "pretrained": str(tmp_path / "nope")}, r"no such folder or file; use 'hub'"),
        ({"model": "hf:dinov2-small", "pretrained": "openai"}, r"no such folder or file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            BackboneConfig(**kwargs)
    # DINOv2 weights lack the registers: refused, not left random
    load_backbone(BackboneConfig(f"hf:{folders['dinov2']}")).model.save_pretrained(tmp_path / "dinov2")
    with pytest.raises(ConfigError, match=r"does not load into Dinov2WithRegistersModel: 1 weights missing "
                                          r"\(embeddings.register_tokens\)"):
        load_backbone(BackboneConfig(f"hf:{folders['dinov2_with_registers']}", pretrained=str(tmp_path / "dinov2")))
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(ConfigError, match=r"bad.safetensors is not a weights file"):
        load_backbone(BackboneConfig(f"hf:{folders['dinov2']}", pretrained=str(tmp_path / "bad.safetensors")))
    with pytest.raises(ConfigError, match=r"no file named model.safetensors"):  # "hub": the folder's own weights
        load_backbone(BackboneConfig(f"hf:{folders['dinov2']}", pretrained="hub"))
    with pytest.raises(ConfigError, match=r"SiglipImageProcessor makes images of varying size"):
        Preprocessor.from_hf(transformers.SiglipImageProcessor(size={"shortest_edge": 32}))
    with pytest.raises(ConfigError, match=r"CLIPImageProcessor rescales pixels by 1; only /255"):
        Preprocessor.from_hf(transformers.CLIPImageProcessor(do_rescale=False))
    # a processor whose crop does not fit CLIP's position embeddings
    transformers.CLIPImageProcessor(size={"shortest_edge": 48}, crop_size=48).save_pretrained(tmp_path / "dinov2")
    (tmp_path / "dinov2" / "config.json").write_text((folders["clip"] / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"processor makes \(48, 48\) images, the model takes image_size 32"):
        load_backbone(BackboneConfig(f"hf:{tmp_path / 'dinov2'}"))


def test_extraction_into_a_store(ray_local, folders: dict[str, Path], tmp_path: Path) -> None:
    generate_dataset(str(tmp_path / "images"), 6, seed=2, image_size=48)
    model = f"hf:{folders['dinov2_with_registers']}"
    result = run_extract(ExtractConfig(images=str(tmp_path / "images"), model=model, out=str(tmp_path / "store"),
                                       layers=(-2,), batch_size=4, images_per_shard=4, dtype="float32"), progress=False)
    assert result.complete and result.images_written == 6
    store = ActivationStore(str(tmp_path / "store"))
    assert store.spec.backbone["family"] == "hf" and store.spec.layers[0].tokens.n_registers_dropped == 2
    backbone = load_backbone(BackboneConfig(model, layers=(-2,)))
    uris = store.images().column("uri").to_pylist()
    x = torch.stack([backbone.preprocessor(Image.open(u)) for u in uris])
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.read("1", 0, 6))), backbone(x)["1"],
                               rtol=1e-5, atol=1e-5)
