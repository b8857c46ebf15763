"""More VLM families as `hf:` backbones: Idefics3, SmolVLM and PaliGemma natively, a model that ships its own
modeling code behind trust_remote_code (actstore.extract.remote_vlm). For each: extraction through actstore.extract
stores the vision tower's own output_hidden_states; the vlm head's answers are seeded samples, no edit gives the VLM's
own, an edit on the layer its language model reads changes them, and a layer after that one is refused in one line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore.extract import ExtractConfig, run_extract
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.vlm_kinds import read_layer
from actstore.store import ActivationStore
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_remote_vlm import write_tiny_remote_vlm
from actstore.testing.tiny_vlm import write_tiny_idefics3, write_tiny_paligemma, write_tiny_smolvlm

PROMPT = "What is in the picture?"
FAMILIES = {
    # name: (writer, the whole model's class (None: the remote code's), tower path, CLS, layer its LM reads)
    "idefics3": (write_tiny_idefics3, transformers.Idefics3ForConditionalGeneration, "model.vision_model", False, "2"),
    "smolvlm": (write_tiny_smolvlm, transformers.SmolVLMForConditionalGeneration, "model.vision_model", False, "2"),
    "paligemma": (write_tiny_paligemma, transformers.PaliGemmaForConditionalGeneration, "model.vision_tower", False,
                  "2"),
    "remote": (write_tiny_remote_vlm, None, "img_processor", True, "1"),
}


@pytest.fixture(scope="module")
def stores(ray_local, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Each family's tiny folder and a 3-image store of its tower's layers 0, 1 and 2 (float32; random weights drawn
    with init_seed 3, which are the folder's own)."""
    root = tmp_path_factory.mktemp("more-vlms")
    generate_dataset(str(root / "images"), 3, seed=2, image_size=48)
    out = {}
    for name, (write, *_) in FAMILIES.items():
        folder = write(str(root / name), seed=3)
        run_extract(ExtractConfig(images=str(root / "images"), model=f"hf:{folder}", out=str(root / f"{name}-store"),
                                  layers=(0, 1, 2), batch_size=3, images_per_shard=3, dtype="float32", init_seed=3,
                                  trust_remote_code=name == "remote"), progress=False)
        out[name] = folder, root / f"{name}-store"
    return out


def reference_model(name: str, folder: str) -> torch.nn.Module:
    """The saved model loaded by transformers itself, apart from our loader."""
    cls = FAMILIES[name][1]
    if cls is None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return cls.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_extracted_tokens_are_the_towers_hidden_states(name: str, stores) -> None:
    folder, store_dir = stores[name]
    _, _, tower_path, cls, read = FAMILIES[name]
    store = ActivationStore(str(store_dir))
    assert all(layer.tokens.cls == cls and layer.tokens.grid == (4, 4) for layer in store.spec.layers)
    backbone = load_backbone(BackboneConfig(f"hf:{folder}", layers=(2,), trust_remote_code=name == "remote"))
    assert backbone.vlm_kind.tower == tower_path and read_layer(backbone).index == int(read)
    x = torch.stack([backbone.preprocessor(Image.open(u)) for u in store.images().column("uri").to_pylist()])
    tower = reference_model(name, folder).get_submodule(tower_path)
    with torch.no_grad():
        ref = tower(pixel_values=backbone.normalize(x), output_hidden_states=True).hidden_states
    assert len(ref) == 4
    for layer in ("0", "1", "2"):
        torch.testing.assert_close(torch.from_numpy(np.asarray(store.read(layer, 0, 3))), ref[int(layer) + 1],
                                   rtol=1e-5, atol=1e-5)


def sae_on(store_dir: Path, layer: str) -> str:
    """A random TopK SAE (d_sae 64, k 4) on the store's `layer`, saved beside the store (once)."""
    from services.steer.setup import random_sae

    out = store_dir.parent / f"{store_dir.name}-sae-{layer}"
    return str(out) if (out / "cfg.json").exists() else random_sae(str(store_dir), layer, str(out))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_steering_the_vlm_through_an_sae(name: str, stores) -> None:
    from services.steer import SteerConfig, run_steer

    folder, store_dir = stores[name]
    read = FAMILIES[name][4]
    base = dict(sae=sae_on(store_dir, read), image="1", head="vlm", prompt=PROMPT, max_new_tokens=6,
                trust_remote_code=name == "remote")
    clean = run_steer(SteerConfig(**base))
    assert len(clean["before"]["responses"]) == 5 and clean["after"] == clean["before"]
    again = run_steer(SteerConfig(**base))
    assert (again["before"], again["after"]) == (clean["before"], clean["after"]), "the same seed, the same answers"
    assert run_steer(SteerConfig(**base, seed=1))["before"] != clean["before"]
    steered = run_steer(SteerConfig(**base, edit=tuple(f"{f}:add:30@all" for f in range(8))))
    assert steered["before"] == clean["before"] and steered["after"] != steered["before"]
    if name == "remote":  # it reads hidden_states[-2]: the last layer is refused, and CLS there (type_feature patch)
        with pytest.raises(ConfigError, match=r"^the SAE's layer 2 comes after layer 1, the last the language model "
                                              r"reads \(img_processor layer_idx -2\)") as e:
            run_steer(SteerConfig(**{**base, "sae": sae_on(store_dir, "2")}))
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match=r"never sees the CLS token at layer 1 .*type_feature 'patch'"):
            run_steer(SteerConfig(**base, edit=("3:add:30@cls",)))
    else:  # the last layer is the one read: every layer can steer, CLS-less
        assert int(read) == load_backbone(BackboneConfig(f"hf:{folder}")).n_blocks - 1


def test_remote_code_needs_the_flag_every_time(stores, tmp_path: Path, capsys) -> None:
    """Without trust_remote_code a folder with an auto_map is refused in one line naming the flag: when loaded, when
    extracted from (the CLI), and when a store extracted with the flag is steered (the store does not record it)."""
    from actstore_cli import main
    from services.steer import SteerConfig, run_steer

    folder, store_dir = stores["remote"]
    message = r"ships its own modeling code \(auto_map in its config.json\); pass --trust-remote-code to run it"
    with pytest.raises(ConfigError, match=message):
        load_backbone(BackboneConfig(f"hf:{folder}"))
    with pytest.raises(ConfigError, match=message):
        run_steer(SteerConfig(sae=sae_on(store_dir, "1"), image="1", head="vlm", prompt=PROMPT))
    assert "trust_remote_code" not in ActivationStore(str(store_dir)).attrs["backbone"]
    from services.evaluate import EvaluateConfig, run_evaluate

    evaluate = EvaluateConfig(sae=sae_on(store_dir, "1"), images=str(store_dir.parent / "images"), max_images=2)
    with pytest.raises(ConfigError, match=message):
        run_evaluate(evaluate, progress=False)
    result = run_evaluate(replace(evaluate, trust_remote_code=True), progress=False)
    assert result["fidelity"]["checked"] and result["fidelity"]["max_abs_diff"] < 1e-4
    args = ["extract", "--images", str(store_dir.parent / "images"), "--model", f"hf:{folder}", "--out",
            str(tmp_path / "store"), "--layers", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_a_remote_model_without_one_tower_is_refused(tmp_path: Path) -> None:
    """The tower rule: a remote model with two CLIP towers (or none) is refused in one line naming what it found."""
    folder = Path(write_tiny_remote_vlm(str(tmp_path / "two"), seed=0))
    code = (folder / "modeling_tiny.py").read_text()
    (folder / "modeling_tiny.py").write_text(code.replace(
        "        self.post_init()", "        self.second = CLIPVisionModel(CLIPVisionConfig(**config.vision))\n"
                                    "        self.post_init()"))
    with pytest.raises(ConfigError, match=r"vision tower must be one CLIPVisionModel or SiglipVisionModel submodule "
                                          r".*found img_processor \(CLIPVisionModel\), second \(CLIPVisionModel\)"):
        load_backbone(BackboneConfig(f"hf:{folder}", trust_remote_code=True))


def test_the_service_steers_a_remote_model_only_with_the_flag(stores, tmp_path: Path) -> None:
    """`actstore serve --steer vlm` over a remote-code model's index: its steering process refuses to load it
    without --trust-remote-code (the error names the flag), and with it answers POST /steer (no edit: the same
    answers before and after)."""
    import requests

    from conftest import _serve
    from services.api import create_app
    from services.api.steering import SteerOptions
    from services.index import IndexConfig, build_index

    _, store_dir = stores["remote"]
    index = build_index(IndexConfig(str(store_dir), sae_on(store_dir, "1"), str(tmp_path / "index"), k=2),
                        progress=False)
    body = {"image": 1, "head": "vlm", "prompt": PROMPT, "responses": 2, "max_new_tokens": 4}
    for trusted in (False, True):
        options = SteerOptions(timeout_s=60, trust_remote_code=trusted)
        app = create_app(index, steer_heads=("vlm",), steer_options=options)
        for url in _serve(app):
            r = requests.post(f"{url}/steer", json=body, timeout=90)
            if trusted:
                assert r.status_code == 200, r.text
                assert len(r.json()["before"]["responses"]) == 2 and r.json()["after"] == r.json()["before"]
            else:
                assert r.status_code >= 400 and "--trust-remote-code" in r.json()["detail"], r.text


def test_the_remote_read_rule_follows_phi3_vision_defaults(tmp_path: Path) -> None:
    """Phi-3.5-vision's config names its CLIP in `img_processor` without a layer_idx: its code then reads
    hidden_states[-2] and drops CLS ("patch"), and so does the rule; LLaVA's fields come next, then the last layer."""
    from types import SimpleNamespace

    from actstore.extract.remote_vlm import remote_kind

    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8))
    wrapper = torch.nn.Module()
    wrapper.vision_embed_tokens = torch.nn.Module()
    wrapper.vision_embed_tokens.img_processor = model
    kind, tower = remote_kind(wrapper, "phi")
    assert tower is model and kind.tower == "vision_embed_tokens.img_processor"
    phi35 = {"crop_size": 336, "image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
             "name": "clip_vision_model", "num_img_tokens": 144}  # Phi-3.5-vision-instruct's config.json
    read = kind.read(SimpleNamespace(img_processor=phi35), 24)
    assert (read.index, read.drops_first) == (22, True)
    read = kind.read(SimpleNamespace(img_processor={"layer_idx": 5, "type_feature": "cls_patch"}), 24)
    assert (read.index, read.drops_first) == (4, False)
    read = kind.read(SimpleNamespace(vision_feature_layer=-1, vision_feature_select_strategy="full"), 24)
    assert (read.index, read.drops_first) == (23, False)
    assert kind.read(SimpleNamespace(), 24).index == 23
