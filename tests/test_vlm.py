"""A LLaVA as an `hf:` backbone: its layers are the vision tower's own hidden states (random weights rebuilt from the
record, or the folder's, in the checkpoint's dtype), its pixels are the VLM processor's, its answers are the VLM's
samples (the same for a seed, stoppable at any token), and an intervention on the tower's layers acts on them
(zeroing changes them, the identity does not). Steering refuses edits the language model cannot see."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore.extract import ExtractConfig, run_extract
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.extract.vlm import FALLBACK_PROMPT, responses
from actstore.store import ActivationStore
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_vlm import write_tiny_llava

PROMPT = "What is in the picture?"
FEATURE_LAYER = -2
"""The layer the tiny LLaVAs read their image features from (vision_feature_layer)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {vision: write_tiny_llava(str(tmp_path_factory.mktemp(vision)), seed=3, vision=vision)
            for vision in ("clip", "siglip")}


def image(backbone: Backbone, seed: int = 0, size: tuple[int, int] = (45, 60)) -> torch.Tensor:
    """One random PIL image through the backbone's preprocessor: uint8 (1, 3, H, W)."""
    rng = np.random.default_rng(seed)
    return backbone.preprocessor(Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)))[None]


def first_token_logits(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The VLM's next-token logits after the fallback prompt: one forward pass of the whole model."""
    processor = backbone.processor
    tokens = processor(images=x[0], text=FALLBACK_PROMPT.format(image=processor.image_token, prompt=PROMPT),
                       return_tensors="pt")
    with torch.no_grad():
        return backbone.vlm(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                            pixel_values=backbone.normalize(x)).logits[0, -1]


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_tokens_are_the_vision_towers_hidden_states(vision: str, folders: dict[str, str]) -> None:
    folder = folders[vision]
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    cls = vision == "clip"
    for pretrained in (folder, "hub"):  # the folder's own weights, by path and by "hub"
        backbone = load_backbone(BackboneConfig(f"hf:{folder}", layers=(-1, 0), pretrained=pretrained))
        assert backbone.vlm.model.vision_tower is backbone.model
        specs = backbone.layer_specs()
        assert [(s.name, s.d, s.tokens.cls, s.tokens.grid) for s in specs] == [("2", 32, cls, (4, 4)),
                                                                               ("0", 32, cls, (4, 4))]
        x = torch.cat([image(backbone, 0), image(backbone, 1, (70, 50))])
        out = backbone(x)
        with torch.no_grad():
            ref = saved.model.vision_tower(pixel_values=backbone.normalize(x), output_hidden_states=True)
        assert len(ref.hidden_states) == 4 and out["2"].shape == (2, 16 + cls, 32)
        assert torch.equal(out["2"], ref.hidden_states[3]) and torch.equal(out["0"], ref.hidden_states[1])
        # the head: the tower's pooled output (CLIP: its final norm of CLS), no class logits
        embedding, logits = backbone.outputs(x)
        assert logits is None
        torch.testing.assert_close(embedding, ref.pooler_output, rtol=0, atol=1e-6)
        if cls:
            torch.testing.assert_close(embedding, saved.model.vision_tower.post_layernorm(out["2"][:, 0]),
                                       rtol=0, atol=1e-6)


def test_random_weights_are_rebuilt_from_the_record(folders: dict[str, str]) -> None:
    rng_before = torch.get_rng_state()
    model = f"hf:{folders['clip']}"
    a, b, c = (load_backbone(BackboneConfig(model, layers=(FEATURE_LAYER,), init_seed=s)) for s in (5, 5, 6))
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not move the caller's RNG"
    x = image(a)
    out = a(x)["1"]
    assert torch.equal(out, b(x)["1"]) and not torch.equal(out, c(x)["1"])
    # independent: the whole VLM drawn from its config under the same seed, then the tower's hidden states
    torch.manual_seed(5)
    drawn = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig.from_pretrained(folders["clip"]))
    with torch.no_grad():
        ref = drawn.eval().model.vision_tower(pixel_values=a.normalize(x), output_hidden_states=True)
    assert torch.equal(out, ref.hidden_states[2])
    # the store's record rebuilds the same model (the tiny folder's weights are themselves drawn from seed 3)
    meta = a.metadata()
    assert meta["model_class"] == "LlavaForConditionalGeneration" and meta["init_seed"] == 5
    assert meta["config"]["vision_config"]["model_type"] == "clip_vision_model"
    assert meta["config"]["text_config"]["model_type"] == "llama"
    again = load_backbone(BackboneConfig(f"hf:{meta['name']}", layers=(FEATURE_LAYER,), pretrained=meta["checkpoint"],
                                         init_seed=meta["init_seed"]))
    assert torch.equal(again(x)["1"], out)
    seeded_3 = load_backbone(BackboneConfig(model, layers=(FEATURE_LAYER,), init_seed=3))
    assert torch.equal(seeded_3(x)["1"], load_backbone(BackboneConfig(model, layers=(FEATURE_LAYER,),
                                                                      pretrained="hub"))(x)["1"])


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_pixels_are_the_vlm_processors(vision: str, folders: dict[str, str]) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders[vision]}", layers=(0,)))
    rng = np.random.default_rng(4)
    for size in ((40, 50), (61, 61), (97, 150)):
        im = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        ours = backbone.normalize(backbone.preprocessor(im)[None])
        theirs = backbone.processor(images=backbone.pil_transform(im), text=backbone.processor.image_token,
                                    return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_responses_are_seeded_samples_and_interventions_act_on_them(vision: str, folders: dict[str, str]) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders[vision]}", layers=(FEATURE_LAYER,)))
    x = image(backbone)
    rng_before = torch.get_rng_state()
    clean = responses(backbone, x, PROMPT, n=4, max_new_tokens=8)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not move the caller's RNG"
    assert len(clean) == 4 and all(isinstance(a, str) and a for a in clean)
    assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8) == clean
    assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8, seed=1) != clean
    assert len(set(clean)) > 1, "the samples of one call differ"
    assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8, temperature=0.05) != clean

    # interventions on the layer the VLM reads its features from, opened after transformers' own hooks on it
    logits = first_token_logits(backbone, x)
    with backbone.intervene(FEATURE_LAYER, lambda t: t):
        assert torch.equal(first_token_logits(backbone, x), logits)
        assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8) == clean
    seen = []
    with backbone.intervene(FEATURE_LAYER, lambda t: seen.append(t.shape) or t * 0):
        assert not torch.allclose(first_token_logits(backbone, x), logits, rtol=0, atol=1e-3)
        zeroed = responses(backbone, x, PROMPT, n=4, max_new_tokens=8)
    # the tower ran for the logits and again inside generate, on the image's tokens (CLS kept for CLIP)
    assert len(seen) >= 2 and {s[1:] for s in seen} == {(16 + (vision == "clip"), 32)}
    assert zeroed != clean
    # an earlier layer reaches the features through the later ones
    with backbone.intervene(0, lambda t: t * 0):
        assert not torch.allclose(first_token_logits(backbone, x), logits, rtol=0, atol=1e-3)
    assert torch.equal(first_token_logits(backbone, x), logits), "closed interventions leave no trace"


def test_fallback_prompt_without_a_chat_template(folders: dict[str, str], tmp_path: Path) -> None:
    """The tiny folder's template writes llava-1.5's format, which is the fallback: without the template file the
    answers are the same."""
    bare = tmp_path / "bare"
    shutil.copytree(folders["clip"], bare)
    (bare / "chat_template.jinja").unlink()
    templated = load_backbone(BackboneConfig(f"hf:{folders['clip']}", layers=(FEATURE_LAYER,)))
    fallback = load_backbone(BackboneConfig(f"hf:{bare}", layers=(FEATURE_LAYER,)))
    assert templated.processor.chat_template and not fallback.processor.chat_template
    x = image(templated)
    assert responses(fallback, x, PROMPT, n=3, max_new_tokens=6) == responses(templated, x, PROMPT, n=3,
                                                                                max_new_tokens=6)


def test_errors_are_one_line(folders: dict[str, str], tmp_path: Path) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders['clip']}", layers=(FEATURE_LAYER,)))
    x = image(backbone)
    transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8).save_pretrained(tmp_path / "clip")
    clip = load_backbone(BackboneConfig(f"hf:{tmp_path / 'clip'}", layers=(0,)))
    # a LLaVA folder with its config only: extraction works (CLIP's processor defaults), answers need a tokenizer
    (tmp_path / "config").mkdir()
    shutil.copy(Path(folders["clip"]) / "config.json", tmp_path / "config")
    bare = load_backbone(BackboneConfig(f"hf:{tmp_path / 'config'}", layers=(FEATURE_LAYER,)))
    assert bare(x)["1"].shape == (1, 17, 32)
    cases = [
        (lambda: responses(clip, x, PROMPT), r"hf:.*clip is not a vision-language model"),
        (lambda: responses(bare, x, PROMPT), r"has no processor \(tokenizer\) to write the prompt with"),
        (lambda: responses(backbone, x, "  "), r"the prompt is empty"),
        (lambda: responses(backbone, x, PROMPT, temperature=0), r"temperature must be > 0, got 0"),
        (lambda: responses(backbone, x, PROMPT, n=0), r"n must be an integer >= 1, got 0"),
        (lambda: responses(backbone, x, PROMPT, max_new_tokens=0), r"max_new_tokens must be an integer >= 1"),
        (lambda: responses(backbone, x.float(), PROMPT), r"images must be one uint8 \(1, 3, 32, 32\) image"),
        (lambda: responses(backbone, torch.cat([x, x]), PROMPT), r"got torch.uint8 \(2, 3, 32, 32\)"),
    ]
    # a LLaVA whose vision tower is not CLIP or SigLIP
    config = transformers.LlavaConfig.from_pretrained(folders["clip"])
    config.vision_config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     image_size=32, patch_size=8)
    config.save_pretrained(tmp_path / "dino")
    cases.append((lambda: load_backbone(BackboneConfig(f"hf:{tmp_path / 'dino'}")),
                  r"the vision tower of a llava must be CLIP or SigLIP, not dinov2"))
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def vlm_store(ray_local, folders: dict[str, str], tmp_path_factory) -> tuple[Path, object]:
    """4 generated images through the tiny CLIP LLaVA's tower (float32): its layers 0, 1 (the feature layer) and 2."""
    tmp_path = tmp_path_factory.mktemp("vlm-store")
    generate_dataset(str(tmp_path / "images"), 4, seed=2, image_size=64)
    result = run_extract(ExtractConfig(images=str(tmp_path / "images"), model=f"hf:{folders['clip']}",
                                       out=str(tmp_path / "store"), layers=(0, FEATURE_LAYER, -1), batch_size=4,
                                       images_per_shard=4, dtype="float32"), progress=False)
    return tmp_path, result


def sae_on(store_dir: Path, layer: str) -> str:
    """A random TopK SAE (d_sae 64, k 4) on the store's `layer`, saved beside the store (once)."""
    from services.steer.setup import random_sae

    out = store_dir.parent / f"sae-{layer}"
    return str(out) if (out / "cfg.json").exists() else random_sae(str(store_dir), layer, str(out))


def test_extraction_into_a_store(vlm_store, folders: dict[str, str]) -> None:
    tmp_path, result = vlm_store
    model = f"hf:{folders['clip']}"
    assert result.complete and result.images_written == 4
    store = ActivationStore(str(tmp_path / "store"))
    record = store.spec.backbone
    assert (record["family"], record["model_class"], record["init_seed"]) == ("hf", "LlavaForConditionalGeneration", 0)
    assert [layer.name for layer in store.spec.layers] == ["0", "1", "2"]
    assert all(layer.tokens.cls and layer.tokens.grid == (4, 4) for layer in store.spec.layers)
    backbone = load_backbone(BackboneConfig(model, layers=(FEATURE_LAYER,)))
    uris = store.images().column("uri").to_pylist()
    x = torch.stack([backbone.preprocessor(Image.open(u)) for u in uris])
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.read("1", 0, 4))), backbone(x)["1"],
                               rtol=1e-5, atol=1e-5)


def test_steering_the_vlm_through_an_sae(vlm_store, folders: dict[str, str]) -> None:
    """`actstore steer --head vlm`: no edit gives the VLM's own answers; strong edits in the tower change them."""
    from services.steer import SteerConfig, run_steer

    tmp_path, _ = vlm_store
    store = ActivationStore(str(tmp_path / "store"))
    base = dict(sae=sae_on(tmp_path / "store", "1"), image="1", head=f"vlm:{folders['clip']}", prompt=PROMPT,
                max_new_tokens=6)
    clean = run_steer(SteerConfig(**base))
    assert clean["kind"] == "vlm" and len(clean["before"]["responses"]) == 5
    assert clean["after"] == clean["before"]
    backbone = load_backbone(BackboneConfig(f"hf:{folders['clip']}", layers=(FEATURE_LAYER,)))
    x = backbone.preprocessor(Image.open(store.images().column("uri")[1].as_py()))[None]
    assert clean["before"]["responses"] == responses(backbone, x, PROMPT, max_new_tokens=6)  # the VLM's own
    steered = run_steer(SteerConfig(**base, edit=tuple(f"{f}:add:30@all" for f in range(8))))
    assert steered["before"] == clean["before"] and steered["after"] != steered["before"]
    with pytest.raises(ConfigError, match="needs a prompt"):
        run_steer(SteerConfig(**{**base, "prompt": None}))
    with pytest.raises(ConfigError, match="a vlm head runs that same model"):
        run_steer(SteerConfig(**{**base, "head": "vlm:llava-hf/llava-1.5-7b-hf"}))


def test_generation_stops_at_the_next_token_once_asked(folders: dict[str, str]) -> None:
    """`stop` is asked after every generated token: true on its third call, three tokens were generated."""
    backbone = load_backbone(BackboneConfig(f"hf:{folders['clip']}", layers=(FEATURE_LAYER,)))
    x = image(backbone)
    asked: list[int] = []
    responses(backbone, x, PROMPT, n=2, max_new_tokens=40, stop=lambda: asked.append(1) or len(asked) >= 3)
    assert len(asked) == 3
    never: list[int] = []
    answers = responses(backbone, x, PROMPT, n=2, max_new_tokens=40, stop=lambda: never.append(1) and False)
    assert len(never) > 3 and answers == responses(backbone, x, PROMPT, n=2, max_new_tokens=40)


def test_a_cancelled_vlm_run_stops_at_its_next_token(vlm_store) -> None:
    """The steering service's time bound as the Steerer sees it: a cancel set while the language model makes its
    third token ends the generation there (three forward passes of the language model), and the run raises."""
    import threading

    from services.steer import Steerer
    from services.steer.run import Cancelled

    tmp_path, _ = vlm_store
    s = Steerer(sae_on(tmp_path / "store", "1"))
    head, x = s.head("vlm"), s.image(1)
    cancel, tokens = threading.Event(), []

    def made_a_token(*_: object) -> None:
        tokens.append(1)
        if len(tokens) == 3:
            cancel.set()

    handle = s.model.backbone.vlm.model.language_model.register_forward_hook(made_a_token)
    try:
        with pytest.raises(Cancelled):
            s.steer(x, [], head, cancel=cancel, prompt=PROMPT, n=2, max_new_tokens=40)
        assert len(tokens) == 3
        tokens.clear()
        out = s.steer(x, [], head, cancel=threading.Event(), prompt=PROMPT, n=2, max_new_tokens=40)
    finally:
        handle.remove()
    assert len(tokens) > 6 and len(out["after"]["responses"]) == 2


def test_the_vlm_head_refuses_edits_the_language_model_cannot_see(vlm_store, capsys) -> None:
    """The tiny CLIP LLaVA's language model reads the tower's layer 1 (vision_feature_layer -2) without its CLS
    (vision_feature_select_strategy "default"): an SAE on layer 2, or CLS-only edits at layer 1, are refused in one
    line before any work; and indeed they leave the VLM's next-token logits exactly as they were, where an edit of
    the patches at layer 1, or of CLS at layer 0 (the tower's attention carries it on), changes them."""
    from actstore_cli import main
    from sae.edits import FeatureEdit, edit_fn
    from sae.splice import splice
    from services.steer import Steerer

    tmp_path, _ = vlm_store
    steerers = {layer: Steerer(sae_on(tmp_path / "store", layer)) for layer in ("0", "1", "2")}
    with pytest.raises(ConfigError, match=r"^the SAE's layer 2 comes after layer 1, the last the language model reads "
                                          r"\(vision_feature_layer -2\): edits there cannot change its answers"):
        steerers["2"].head("vlm")
    s = steerers["1"]
    for edits in (["3:add:30@cls"], ["4:add:30@all", "3:add:30@cls"]):
        with pytest.raises(ConfigError, match=r"^edit 3:add:30@cls: the language model never sees the CLS token at "
                                              r"layer 1 \(its projector drops the first token there"):
            s.steer(s.image(1), s.edits(edits), s.head("vlm"), prompt=PROMPT)
    steerers["0"].head("vlm").check(steerers["0"].edits(["3:add:30@cls"]))  # accepted: it reaches the patches
    assert main(["steer", "--sae", sae_on(tmp_path / "store", "2"), "--image", "1", "--head", "vlm",
                 "--prompt", PROMPT]) == 1
    err = capsys.readouterr().err
    assert "layer 2 comes after layer 1" in err and len(err.strip().splitlines()) == 1

    def logits(layer: str, where: str) -> torch.Tensor:
        m = steerers[layer].model
        edit = edit_fn([FeatureEdit(3, "add", 30.0, where)], m.spec.tokens, m.tokens)
        with splice(m.backbone, m.sae, m.norm, layer=m.layer, tokens="all", mode="error", edit=edit):
            return first_token_logits(m.backbone, x)

    x = s.image(1)
    clean = first_token_logits(s.model.backbone, x)
    assert torch.equal(logits("2", "all"), clean) and torch.equal(logits("1", "cls"), clean)
    assert not torch.equal(logits("1", "all"), clean) and not torch.equal(logits("0", "cls"), clean)


def test_a_vlm_checkpoint_loads_in_its_own_dtype(folders: dict[str, str], tmp_path: Path) -> None:
    """A bfloat16 checkpoint (hub id or folder: "hub" weights) stays bfloat16 (float32 would double a 7B VLM's
    memory); its tower's tokens are its own hidden states; random weights stay float32."""
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(folders["clip"]).to(torch.bfloat16)
    saved.save_pretrained(tmp_path / "bf16")
    transformers.AutoProcessor.from_pretrained(folders["clip"]).save_pretrained(tmp_path / "bf16")
    backbone = load_backbone(BackboneConfig(f"hf:{tmp_path / 'bf16'}", layers=(FEATURE_LAYER,), pretrained="hub"))
    assert {p.dtype for p in backbone.vlm.parameters()} == {torch.bfloat16}
    x = image(backbone)
    with torch.no_grad():
        ref = saved.model.vision_tower(pixel_values=backbone.normalize(x), output_hidden_states=True)
    assert torch.equal(backbone(x)["1"], ref.hidden_states[2])
    assert len(responses(backbone, x, PROMPT, n=2, max_new_tokens=4)) == 2
    drawn = load_backbone(BackboneConfig(f"hf:{tmp_path / 'bf16'}", layers=(FEATURE_LAYER,)))
    assert {p.dtype for p in drawn.vlm.parameters()} == {torch.float32}


def test_a_steering_run_past_its_bound_is_stopped(vlm_store) -> None:
    """The service steers in a process of its own: a long VLM run past its bound sees its slot's cancel flag (shared
    memory) at its next token and stops, so the answer is a 503 (a run that ended by itself would be answered 200);
    its slot is free when the answer comes, and the process goes on serving."""
    import time

    import requests

    from conftest import _serve
    from services.api import create_app
    from services.api.steering import SteerOptions
    from services.index import IndexConfig, build_index

    tmp_path, _ = vlm_store
    index = build_index(IndexConfig(str(tmp_path / "store"), sae_on(tmp_path / "store", "1"),
                                    str(tmp_path / "index-bound"), k=2), progress=False)
    app = create_app(index, steer_heads=("vlm",), steer_options=SteerOptions(timeout_s=0.05, slots=2, nice=0))
    for url in _serve(app):
        requests.get(f"{url}/steer/heads", timeout=60)  # starts the load (which outlasts this bound)
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/healthz", timeout=10).json()["steering"] != "ready":
            assert time.monotonic() < deadline, "the steering model never loaded"
            time.sleep(0.05)
        long = {"image": 1, "head": "vlm", "prompt": "Describe it. " * 70, "responses": 10, "max_new_tokens": 128}
        r = requests.post(f"{url}/steer", json=long, timeout=60)
        assert r.status_code == 503 and "was stopped" in r.json()["detail"], r.text
        assert app.state.steering.in_flight == 0
        r = requests.get(f"{url}/images/1/patches/0", timeout=60)
        assert r.status_code == 200 and r.json()["features"], r.text
