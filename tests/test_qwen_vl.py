"""Qwen2-VL and Qwen2.5-VL as `hf:` backbones: our patchify is the processor's; a layer's tokens are the tower's block
outputs put in row-major patch order by the test's own index math (merge groups, and for 2.5 attention windows);
writing them back unchanged leaves the VLM bit-identical, an edit of one patch reaches the merged token that holds
it; answers are seeded samples that an SAE edit in the tower changes, through extraction, the vlm head and steer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore.extract import ExtractConfig, run_extract
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.extract.qwen_vl import QWEN_IMAGE_SIZE, patchify, qwen_image_size
from actstore.extract.vlm import responses
from actstore.store import ActivationStore
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_qwen import IMAGE_SIZE, write_tiny_qwen2vl

PROMPT = "What is in the picture?"
VERSIONS = ("2", "2.5")
PATCH, GRID = 4, IMAGE_SIZE // 4
"""The tiny models' patch size and patch grid side (8: 2 x 2 windows of 2 x 2 merged tokens for 2.5)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {v: write_tiny_qwen2vl(str(tmp_path_factory.mktemp(f"qwen{v}")), seed=3, version=v) for v in VERSIONS}


def images(backbone: Backbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    """n random PIL images of different shapes through the backbone's preprocessor: uint8 (n, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    sizes = ((45, 60), (70, 50), (32, 32))
    return torch.stack([backbone.preprocessor(Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)))
                        for i in range(n)])


def positions(grid: int, window: int | None) -> list[tuple[int, int]]:
    """(row, col) of the patch at each position of an image's sequence inside the blocks: 2 x 2 merge groups row by
    row, the patches of a group row by row; with `window` (2.5: its side in groups), the groups sorted window by
    window (windows row by row), row by row inside a window."""
    groups = [(r, c) for r in range(grid // 2) for c in range(grid // 2)]
    if window:
        groups.sort(key=lambda g: (g[0] // window, g[1] // window, g[0], g[1]))
    return [(2 * r + dr, 2 * c + dc) for r, c in groups for dr in (0, 1) for dc in (0, 1)]


def pixel_values(x: torch.Tensor, patch: int, order: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """The test's own patchify: for each image, the patch at each (row, col) of `order` (by default
    `positions(.., None)`: the layout the tower takes, before any window reordering), its pixels (C, 2 temporal
    copies, P, P) flattened."""
    order = positions(x.shape[-1] // patch, None) if order is None else order
    rows = [x[b, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].unsqueeze(1).expand(-1, 2, -1, -1)
            for b in range(x.shape[0]) for r, c in order]
    return torch.stack([row.reshape(-1) for row in rows])


def window_of(version: str) -> int | None:
    return 2 if version == "2.5" else None


def test_patchify_is_the_processors() -> None:
    """pixel_values and image_grid_thw as Qwen's processor makes them from the same pixels: the tiny models' 32 px
    in 4 px patches and a checkpoint's QWEN_IMAGE_SIZE in 14 px patches (its min/max_pixels leave it as it is)."""
    rng = np.random.default_rng(0)
    tiny = transformers.Qwen2VLImageProcessor(min_pixels=IMAGE_SIZE ** 2, max_pixels=IMAGE_SIZE ** 2, patch_size=PATCH)
    for size, patch, processor in ((IMAGE_SIZE, PATCH, tiny),
                                   (QWEN_IMAGE_SIZE, 14, transformers.Qwen2VLImageProcessor())):  # defaults
        x = torch.from_numpy(rng.integers(0, 256, (2, 3, size, size), dtype=np.uint8))
        theirs = processor(images=list(x), return_tensors="pt")
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.image_mean, processor.image_std))
        normalized = (x.float() / 255 - mean) / std
        ours = patchify(normalized, patch, 2, 2)
        assert theirs["image_grid_thw"].tolist() == [[1, size // patch, size // patch]] * 2
        torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-5)
        assert torch.equal(ours, pixel_values(normalized, patch))


def test_the_image_size_is_one_the_processor_leaves_as_it_is() -> None:
    """A checkpoint's default bounds take 448 px; a processor naming one square size gives it; a size that is not a
    multiple of patch x merge, or outside the processor's bounds (it would resize, and the prompt's image tokens
    would not match our pixels), is refused in one line."""
    config = transformers.Qwen2VLConfig().vision_config  # 14 px patches, merged 2 x 2
    processor = transformers.Qwen2VLImageProcessor
    assert qwen_image_size(config, processor()) == qwen_image_size(config, None) == QWEN_IMAGE_SIZE
    assert qwen_image_size(config, processor(min_pixels=224 ** 2, max_pixels=224 ** 2)) == 224
    for bounds, message in (((210 ** 2, 210 ** 2), r"images of 210 px are not a multiple of .* \(28\)"),
                            ((56 ** 2, 200 ** 2), r"min_pixels/max_pixels \(3136, 40000\) would resize 448 x 448")):
        with pytest.raises(ConfigError, match=message) as e:
            qwen_image_size(config, processor(min_pixels=bounds[0], max_pixels=bounds[1]))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("version", VERSIONS)
def test_tokens_are_the_blocks_outputs_in_row_major_order(version: str, folders: dict[str, str]) -> None:
    folder = folders[version]
    saved = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    backbone = load_backbone(BackboneConfig(f"hf:{folder}", layers=(0, 1, -1), pretrained="hub"))
    assert backbone.vlm.model.visual is backbone.model
    assert [(s.name, s.d, s.tokens.cls, s.tokens.grid) for s in backbone.layer_specs()] == [
        (name, 32, False, (GRID, GRID)) for name in ("0", "1", "2")]
    x = images(backbone)
    out = backbone(x)
    # the tower's own forward on the test's pixel_values; its blocks' input and outputs by the test's hooks
    seen: list[torch.Tensor] = []
    hooks = [saved.model.visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0])),
             *(block.register_forward_hook(lambda m, args, output: seen.append(output))
               for block in saved.model.visual.blocks)]
    pv = pixel_values(backbone.normalize(x), PATCH)
    with torch.no_grad():
        merged = saved.model.visual(pv, grid_thw=torch.tensor([[1, GRID, GRID]] * 2)).pooler_output
    for h in hooks:
        h.remove()
    order = positions(GRID, window_of(version))
    index = torch.tensor([r * GRID + c for r, c in order])
    # the blocks' input at each position is the embedding of the patch `positions` names there
    with torch.no_grad():
        rowmajor = [(r, c) for r in range(GRID) for c in range(GRID)]
        embedded = saved.model.visual.patch_embed(pixel_values(backbone.normalize(x), PATCH, rowmajor))
    torch.testing.assert_close(seen[0].reshape(2, GRID * GRID, -1), embedded.reshape(2, GRID * GRID, -1)[:, index],
                               rtol=0, atol=1e-6)
    for i, name in enumerate(("0", "1", "2")):
        rowmajor = torch.empty_like(out[name])
        rowmajor[:, index] = seen[i + 1].reshape(2, GRID * GRID, -1)
        assert torch.equal(out[name], rowmajor), name
    # the embedding: the mean of the merger's tokens (4 x 4 an image)
    embedding, logits = backbone.outputs(x)
    assert logits is None
    torch.testing.assert_close(embedding, merged.reshape(2, 16, -1).mean(1), rtol=0, atol=1e-6)


def vlm_logits(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """The whole VLM's next-token logits after the chat prompt: one forward pass, the processor's tokens."""
    processor = backbone.processor
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                        "text": PROMPT}]}],
                                         add_generation_prompt=True)
    tokens = processor(images=x[0], text=text, return_tensors="pt")
    with torch.no_grad():
        return backbone.vlm(**tokens).logits[0, -1]


@pytest.mark.parametrize("version", VERSIONS)
def test_tokens_written_back_leave_the_vlm_as_it_was_and_an_edit_reaches_its_patch(version: str,
                                                                                   folders: dict[str, str]) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders[version]}", layers=(-1,), pretrained="hub"))
    x = images(backbone, 1)
    clean = vlm_logits(backbone, x)
    for layer in (0, -1):
        with backbone.intervene(layer, lambda t: t.clone()):  # a new tensor: _replace writes every token back
            assert torch.equal(vlm_logits(backbone, x), clean)
    # an edit of one patch at the last block changes the merged token of its 2 x 2 group only (row-major groups)
    tower = backbone.vlm.model.visual
    pv = pixel_values(backbone.normalize(x), PATCH)
    grid_thw = torch.tensor([[1, GRID, GRID]])
    with torch.no_grad():
        merged = tower(pv, grid_thw=grid_thw).pooler_output
    for r, c in ((0, 0), (3, 6), (7, 5)):
        def edit(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[:, r * GRID + c] += 1
            return t
        with backbone.intervene(-1, edit), torch.no_grad():
            changed = (tower(pv, grid_thw=grid_thw).pooler_output != merged).any(-1).nonzero().flatten().tolist()
        assert changed == [(r // 2) * (GRID // 2) + c // 2], (r, c)
        with backbone.intervene(-1, edit):
            assert not torch.equal(vlm_logits(backbone, x), clean)
    assert torch.equal(vlm_logits(backbone, x), clean), "closed interventions leave no trace"


@pytest.mark.parametrize("version", VERSIONS)
def test_responses_are_seeded_samples_that_interventions_change(version: str, folders: dict[str, str]) -> None:
    backbone = load_backbone(BackboneConfig(f"hf:{folders[version]}", layers=(-1,)))
    x = images(backbone, 1)
    clean = responses(backbone, x, PROMPT, n=4, max_new_tokens=8)
    assert len(clean) == 4 and all(isinstance(a, str) for a in clean) and len(set(clean)) > 1
    assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8) == clean
    assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8, seed=1) != clean
    seen = []
    with backbone.intervene(-1, lambda t: seen.append(t.shape) or t.clone()):
        assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8) == clean
    assert seen and {s[1:] for s in seen} == {(GRID * GRID, 32)}
    with backbone.intervene(0, lambda t: t * 0):
        assert responses(backbone, x, PROMPT, n=4, max_new_tokens=8) != clean


@pytest.fixture(scope="module")
def qwen_store(ray_local, folders: dict[str, str], tmp_path_factory) -> Path:
    """4 generated images through the tiny Qwen2.5-VL's tower (float32): its layers 1 and 2 (the last)."""
    tmp_path = tmp_path_factory.mktemp("qwen-store")
    generate_dataset(str(tmp_path / "images"), 4, seed=2, image_size=64)
    result = run_extract(ExtractConfig(images=str(tmp_path / "images"), model=f"hf:{folders['2.5']}",
                                       out=str(tmp_path / "store"), layers=(1, -1), batch_size=4, images_per_shard=4,
                                       dtype="float32"), progress=False)
    assert result.complete and result.images_written == 4
    return tmp_path / "store"


def test_extraction_and_steering_through_the_vlm_head(qwen_store: Path, folders: dict[str, str]) -> None:
    """The store holds the backbone's row-major tokens; `steer --head vlm` with no edit gives the VLM's own seeded
    answers before and after, the same again for the same seed, and strong edits in the tower change them."""
    from actstore.loader import Normalization
    from sae import SAEConfig, SparseAutoencoder, checkpoint
    from services.steer import SteerConfig, run_steer

    store = ActivationStore(str(qwen_store))
    record = store.spec.backbone
    assert (record["model_class"], record["preprocessing"]["image_size"]) == ("Qwen2_5_VLForConditionalGeneration",
                                                                              [32, 32])
    assert all(not layer.tokens.cls and layer.tokens.grid == (GRID, GRID) for layer in store.spec.layers)
    backbone = load_backbone(BackboneConfig(f"hf:{folders['2.5']}", layers=(-1,)))
    x = torch.stack([backbone.preprocessor(Image.open(u)) for u in store.images().column("uri").to_pylist()])
    torch.testing.assert_close(torch.from_numpy(np.asarray(store.read("2", 0, 4))), backbone(x)["2"],
                               rtol=1e-5, atol=1e-5)

    norm = Normalization.from_stats(store.stats("2", "patches"), "2", "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, kind="topk", k=4, init_seed=1))
    checkpoint.save(sae, str(qwen_store.parent / "sae"), normalization=norm, extra={"store": str(qwen_store),
                                                                                    "layer": "2"})
    base = dict(sae=str(qwen_store.parent / "sae"), image="1", head="vlm", prompt=PROMPT, max_new_tokens=6)
    clean = run_steer(SteerConfig(**base))
    assert clean["kind"] == "vlm" and len(clean["before"]["responses"]) == 5
    assert clean["after"] == clean["before"] == run_steer(SteerConfig(**base))["before"]
    assert clean["before"]["responses"] == responses(backbone, x[1:2], PROMPT, max_new_tokens=6)
    steered = run_steer(SteerConfig(**base, edit=tuple(f"{f}:add:30@all" for f in range(8))))
    assert steered["before"] == clean["before"] and steered["after"] != steered["before"]
