"""The generation head: a diffusers pipeline (tiny, random, built from configs) conditioned on the embedding of the
store's CLIP image encoder. Without edits its pictures are the pipeline's own, called directly with the clean
embedding; an edit moves the embedding by exactly what the splice predicts (checked with the test's own hook) and
changes the picture. Pipelines whose encoder is not the store's backbone, and edits that cannot reach the embedding,
are refused in one line; `--images` writes marked PNGs and replaces nothing else."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore_cli import main
from generation_setup import Generation, build_generation, sae_on
from services.steer import Steerer

STEPS, SIZE = 2, 32
OPTIONS = {"steps": STEPS, "size": SIZE}


@pytest.fixture(scope="module")
def setups(ray_local, tmp_path_factory) -> dict[str, Generation]:
    root = tmp_path_factory.mktemp("generation")
    return {kind: build_generation(root, kind) for kind in ("unclip", "kandinsky", "ip-adapter")}


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def encoder_and_input(g: Generation, steerer: Steerer, image: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The image encoder loaded by transformers itself, and the image normalized as its processor config says."""
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(g.encoder).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (transformers.CLIPImageProcessor().image_mean,
                                                             transformers.CLIPImageProcessor().image_std))
    return encoder, (steerer.image(image).float() / 255 - mean) / std


def direct(g: Generation, kind: str, embedding: torch.Tensor, encoder: torch.nn.Module) -> np.ndarray:
    """The pipeline called directly with `embedding`, as its documentation shows, with the head's seed."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(g.pipeline)
    options = {"num_inference_steps": STEPS, "height": SIZE, "width": SIZE,
               "generator": torch.Generator("cpu").manual_seed(0)}
    if kind == "unclip":
        out = pipe(image_embeds=embedding, prompt="", **options)
    elif kind == "kandinsky":
        zero = encoder(pixel_values=torch.zeros(1, 3, 32, 32)).image_embeds  # the prior's get_zero_embed
        out = pipe(image_embeds=embedding, negative_image_embeds=zero, **options)
    else:
        adapter = Path(g.encoder).parent
        pipe.load_ip_adapter(str(adapter), subfolder="", weight_name="ip-adapter.safetensors")
        out = pipe(prompt="", ip_adapter_image_embeds=[torch.stack([torch.zeros_like(embedding), embedding])],
                   **options)
    return np.asarray(out.images[0].convert("RGB"))


@pytest.mark.parametrize("kind", ["unclip", "kandinsky", "ip-adapter"])
def test_without_edits_the_pictures_are_the_pipelines_own(setups: dict[str, Generation], kind: str) -> None:
    g = setups[kind]
    steerer = Steerer(g.sae)
    head = steerer.head(g.head)
    r = steerer.steer(steerer.image(2), [], head, **OPTIONS)
    encoder, x = encoder_and_input(g, steerer, 2)
    with torch.no_grad():
        clean = encoder(pixel_values=x).image_embeds
        assert torch.equal(torch.tensor(r["before"]["embedding"], dtype=torch.float32)[None], clean)
        expected = direct(g, kind, clean, encoder)
    assert expected.shape == (SIZE, SIZE, 3)
    assert np.array_equal(pixels(r["before"]["image"]), expected)
    assert r["after"] == r["before"] and r["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_an_edit_moves_the_embedding_by_what_the_splice_predicts(setups: dict[str, Generation]) -> None:
    g = setups["unclip"]
    steerer = Steerer(g.sae)
    m, f, v = steerer.model, 5, 3.0
    r = steerer.steer(steerer.image(1), steerer.edits([f"{f}:add:{v}@all"]), steerer.head(g.head), **OPTIONS)
    # the test's own hook: layer 0's patch tokens moved by v times the feature's decoder row, de-normalized
    encoder, x = encoder_and_input(g, steerer, 1)
    direction = v * m.sae.W_dec[f].detach() / m.norm.scale

    def moved(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.cat([hidden[:, :1], hidden[:, 1:] + direction], 1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    handle = encoder.vision_model.encoder.layers[0].register_forward_hook(moved)
    with torch.no_grad():
        predicted = encoder(pixel_values=x).image_embeds[0]
    handle.remove()
    after = torch.tensor(r["after"]["embedding"], dtype=torch.float32)
    torch.testing.assert_close(after, predicted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, torch.tensor(r["before"]["embedding"], dtype=torch.float32), atol=1e-3)
    assert not np.array_equal(pixels(r["after"]["image"]), pixels(r["before"]["image"]))
    assert 0 < r["cosine"] < 1 - 1e-6


def test_a_pipeline_that_does_not_belong_to_the_store_is_refused(setups: dict[str, Generation],
                                                                  tmp_path: Path) -> None:
    unclip, kandinsky = setups["unclip"], setups["kandinsky"]
    other = Steerer(kandinsky.sae)  # the Kandinsky prior's encoder: other weights than the unCLIP pipeline's
    with pytest.raises(ConfigError, match=r"image encoder is not the store's backbone .*: \d+ of \d+ weights differ"):
        other.head(f"generate:{unclip.pipeline}")
    with pytest.raises(ConfigError, match="is not inside a pipeline's folder; name the pipeline"):
        other.head("generate")
    sd = Path(setups["ip-adapter"].pipeline)
    with pytest.raises(ConfigError, match="through an IP-Adapter: generate:PIPELINE@ADAPTER_WEIGHTS"):
        other.head(f"generate:{sd}")
    with pytest.raises(ConfigError, match="an IP-Adapter goes on a StableDiffusionPipeline"):
        other.head(f"generate:{unclip.pipeline}@{sd}/x.safetensors")
    with pytest.raises(ConfigError, match="is not a diffusers pipeline"):
        other.head(f"generate:{tmp_path}")


def test_an_edit_the_embedding_cannot_see_is_refused(setups: dict[str, Generation]) -> None:
    g = setups["unclip"]
    last = Steerer(sae_on(g.store, "1", str(Path(g.sae).parent / "sae-unclip-last")))
    head = last.head(g.head)
    with pytest.raises(ConfigError, match=r"reads only the CLS token"):
        last.steer(last.image(0), last.edits(["3:add:2@all"]), head, **OPTIONS)
    with pytest.raises(ConfigError, match=r"reads only the CLS token"):
        last.steer(last.image(0), last.edits(["3:add:2@1,2"]), head, **OPTIONS)
    r = last.steer(last.image(0), last.edits(["3:add:2@cls"]), head, **OPTIONS)
    assert r["cosine"] < 1


def test_cli_writes_marked_pictures_and_replaces_only_its_own(setups: dict[str, Generation], tmp_path: Path,
                                                              capsys) -> None:
    g = setups["unclip"]
    prefix = tmp_path / "cat"
    args = ["steer", "--sae", g.sae, "--image", "3", "--head", "generate", "--edit", "5:add:3", "--steps", "2",
            "--size", "32", "--images", str(prefix), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "cosine of the image embeddings before and after: 0." in out and f"{prefix}.after.png: written" in out
    before, after = (Image.open(f"{prefix}.{side}.png") for side in ("before", "after"))
    assert before.size == after.size == (SIZE, SIZE) and before.info["Software"] == "actstore steer"
    assert main(args) == 1
    assert "already there; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    foreign = tmp_path / "dog"
    Image.new("RGB", (4, 4)).save(f"{foreign}.before.png")
    kept = Path(f"{foreign}.before.png").read_bytes()
    assert main([*args[:-4], "--images", str(foreign), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "a steer picture" in err
    assert Path(f"{foreign}.before.png").read_bytes() == kept and not Path(f"{foreign}.after.png").exists()
