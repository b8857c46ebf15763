"""Splicing an SAE into timm, open_clip and transformers backbones: error mode without an edit is the clean forward,
the hook sees the tokens the libraries' own intermediates give, an exact SAE changes nothing, a zero decoder is
zero ablation, and the edit hook sees and changes only the spliced tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from actstore.errors import ConfigError
from actstore.extract.backbones import Backbone, BackboneConfig, load_backbone
from actstore.loader import Normalization
from actstore.store import TokenLayout
from sae import SAEConfig, SparseAutoencoder
from sae.edits import FeatureEdit, FeatureEdits, edit_fn
from sae.splice import SpliceStats, ablate, edit_delta, splice, token_positions

TINY_DINO = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 32,
             "patch_size": 8, "num_register_tokens": 2}


def images(backbone: Backbone, n: int = 2, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ims = [Image.fromarray(rng.integers(0, 256, (120 + 40 * i, 150, 3), dtype=np.uint8)) for i in range(n)]
    return torch.stack([backbone.preprocessor(im) for im in ims])


def exact_sae(d: int) -> SparseAutoencoder:
    """ReLU, d_sae = 2 d, encoder and decoder rows +e_i and -e_i: relu(x_i) e_i - relu(-x_i) e_i = x."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, kind="relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
    return sae


def random_norm(d: int) -> Normalization:
    return Normalization("x", "patches", torch.randn(d, generator=torch.Generator().manual_seed(1)), 0.5)


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    """A tiny DINOv2 with 2 registers (so that splicing must put them back), as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("dino")
    transformers.Dinov2WithRegistersConfig(**TINY_DINO).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backbones(dino_folder: Path) -> dict[str, Backbone]:
    return {"timm": load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(5,))),
            "open_clip": load_backbone(BackboneConfig("open_clip:ViT-S-32-alt", layers=(3,))),
            "hf": load_backbone(BackboneConfig(f"hf:{dino_folder}", layers=(1,)))}


def library_tokens(backbone: Backbone, family: str, x: torch.Tensor, index: int) -> torch.Tensor:
    """Layer `index`'s tokens from the library's own intermediates, in our layout ([CLS] + patches)."""
    xn = backbone.normalize(x)
    model = backbone.model
    with torch.no_grad():
        if family == "timm":
            patches, prefix = model.forward_intermediates(xn, indices=[index], return_prefix_tokens=True, norm=False,
                                                          output_fmt="NLC", intermediates_only=True)[0]
            return torch.cat([prefix[:, :1], patches], 1)
        if family == "open_clip":
            ref = model.forward_intermediates(xn, indices=[index], output_fmt="NLC", output_extra_tokens=True,
                                              intermediates_only=True)
            return torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], 1)
        hidden = model(pixel_values=xn, output_hidden_states=True).hidden_states[index + 1]
        return torch.cat([hidden[:, :1], hidden[:, 1 + TINY_DINO["num_register_tokens"]:]], 1)


@pytest.mark.parametrize("family", ["timm", "open_clip", "hf"])
def test_error_mode_without_edit_is_the_clean_forward(backbones: dict[str, Backbone], family: str) -> None:
    backbone = backbones[family]
    spec = backbone.layer_specs()[0]
    x = images(backbone)
    seen = []
    with backbone.intervene(spec.name, lambda t: seen.append(t.clone()) or t):
        clean_emb, clean_logits = backbone.outputs(x)
    torch.testing.assert_close(seen[0], library_tokens(backbone, family, x, spec.index), rtol=0, atol=0)
    assert (clean_logits is not None) == (family == "timm")  # timm's classifier; the others have none of their own

    norm = random_norm(spec.d)
    for dtype in ("float32", "bfloat16"):
        sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=4 * spec.d, kind="topk", k=4, init_seed=3, dtype=dtype))
        layout = spec.tokens
        for tokens in ("patches", "all"):
            # no edit, and an edit that changes no latent (scale by 1): bitwise the clean model
            for edit in (None, edit_fn([FeatureEdit(0, "scale", 1.0), FeatureEdit(1, "add", 0.0)], layout)):
                with splice(backbone, sae, norm, layer=spec.name, tokens=tokens, mode="error", edit=edit):
                    emb, logits = backbone.outputs(x)
                assert torch.equal(emb, clean_emb), (dtype, tokens, edit)
                if logits is not None:
                    assert torch.equal(logits, clean_logits)
        sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=4 * spec.d, kind="topk", k=4, init_seed=3))
    with splice(backbone, sae, norm, layer=spec.name, mode="replace"):
        replaced, _ = backbone.outputs(x)
    assert (replaced - clean_emb).abs().max() > 1e-2  # the hook is live: a random SAE's reconstruction is not x
    after, _ = backbone.outputs(x)
    torch.testing.assert_close(after, clean_emb, rtol=0, atol=0)  # and gone once the block closes


def test_exact_sae_changes_nothing_and_zero_decoder_is_zero_ablation(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["timm"]
    spec = backbone.layer_specs()[0]
    x = images(backbone, 3)
    clean, clean_logits = backbone.outputs(x)
    stats = SpliceStats()
    with splice(backbone, exact_sae(spec.d), random_norm(spec.d), layer=spec.name, mode="replace", stats=stats):
        emb, logits = backbone.outputs(x)
    torch.testing.assert_close(emb, clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, clean_logits, rtol=1e-4, atol=1e-4)
    assert stats.rows == 3 * spec.tokens.n_patches and stats.fvu < 1e-10
    assert stats.l0 == pytest.approx(spec.d, rel=0.01)  # one of +e_i, -e_i per nonzero coordinate

    zero = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=2 * spec.d, kind="relu"))
    with torch.no_grad():
        zero.W_dec.zero_()
    with splice(backbone, zero, None, layer=spec.name, mode="replace"):
        spliced, _ = backbone.outputs(x)
    with ablate(backbone, layer=spec.name):
        ablated, _ = backbone.outputs(x)
    torch.testing.assert_close(spliced, ablated, rtol=0, atol=1e-6)
    assert (ablated - clean).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_edit_moves_only_its_tokens_by_exactly_its_decoder_rows(backbones: dict[str, Backbone], dtype: str) -> None:
    backbone = backbones["hf"]  # CLS, 2 registers (not stored), a 4 x 4 grid
    spec = backbone.layer_specs()[0]
    x = images(backbone)
    sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=64, kind="relu", init_seed=2, dtype=dtype))
    seen, after = [], {}
    index = spec.index + 1  # the next block's input is this block's output

    class Spy(FeatureEdits):
        def __call__(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            seen.append((values, positions))
            return super().__call__(values, positions)

    edit = Spy((FeatureEdit(7, "add", 1.0, (2,)), FeatureEdit(3, "scale", 1.0)), spec.tokens)
    hook = backbone.model.encoder.layer[index].register_forward_pre_hook(lambda m, a: after.update(x=a[0].clone()))
    try:
        backbone.outputs(x)
        clean = after["x"]
        with splice(backbone, sae, None, layer=spec.name, mode="error", edit=edit):
            backbone.outputs(x)
    finally:
        hook.remove()
    values, positions = seen[0]
    assert values.shape == (2 * 16, 2) and values.dtype == sae.W_dec.dtype  # the edited features' latents only
    assert torch.equal(positions, token_positions(spec.tokens, "patches").repeat(2))
    # only patch 2 moved (layout token 3 = sequence position 1 + 2 registers + 2), by exactly (a' - a) W_dec[7] in the
    # SAE's dtype, added to the untouched tokens; every other token (CLS, registers, patches) keeps its bits
    moved = torch.zeros(clean.shape[:2], dtype=torch.bool)
    moved[:, 5] = True
    assert torch.equal(after["x"][~moved], clean[~moved])
    with torch.no_grad():
        a = sae.encode(backbone(x)[spec.name][:, 3].to(sae.W_dec.dtype))[:, 7]
        change = ((a + 1.0) - a).unsqueeze(1) * sae.W_dec[7]
    assert torch.equal(after["x"][:, 5], clean[:, 5] + change.float())


def test_an_edit_costs_the_edited_features_not_the_sae_width() -> None:
    """Two edits on a 65,536-wide SAE: the change is computed from the edited latents alone (the old dense path
    allocated (tokens x d_sae) three times: 400 MB here)."""
    layout = TokenLayout(cls=True, grid=(14, 14))
    x, positions = torch.randn(2 * 197, 192), torch.arange(197).repeat(2)
    edit = edit_fn([FeatureEdit(5, "add", 2.0), FeatureEdit(9, "set", 0.0, (3, 4))], layout)
    allocated = {}
    for d_sae in (4096, 65536):
        sae = SparseAutoencoder(SAEConfig(d_in=192, d_sae=d_sae, kind="topk", k=32))
        with torch.no_grad():
            acts = sae.encode(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                rows, delta = edit_delta(sae, acts, edit, positions, 1.0)
        allocated[d_sae] = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        assert rows.numel() == 2 * 196 and delta.shape == (2 * 196, 192)
        dense = acts.to_dense()  # the independent computation
        change = torch.zeros_like(dense)
        change[:, 5] = 2.0
        change[torch.isin(positions, torch.tensor([4, 5])), 9] = -dense[torch.isin(positions, torch.tensor([4, 5])), 9]
        change[positions == 0] = 0  # a patch SAE: "all" is every patch, never the CLS
        torch.testing.assert_close(delta, (change @ sae.W_dec)[rows], rtol=1e-5, atol=1e-5)
    assert allocated[65536] < 4 << 20 and allocated[65536] < 1.5 * allocated[4096], allocated


def test_splice_errors(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["timm"]
    wrong = SparseAutoencoder(SAEConfig(d_in=7, d_sae=14, kind="relu"))
    with pytest.raises(ConfigError, match="reads 7-wide activations; layer 5 of timm:vit_tiny_patch16_224 is 192"):
        with splice(backbone, wrong, None, layer=5):
            pass
    sae = SparseAutoencoder(SAEConfig(d_in=192, d_sae=384, kind="relu"))
    with pytest.raises(ConfigError, match="splice mode must be one of replace, error"):
        with splice(backbone, sae, None, layer=5, mode="add"):
            pass
    with pytest.raises(ConfigError, match="has no layer 99"):
        with splice(backbone, sae, None, layer=99):
            pass
    pooled = TokenLayout(cls=True, grid=(0, 0))  # a ResNet's attnpool: one token
    with pytest.raises(ConfigError, match="has no patches tokens"):
        token_positions(pooled, "patches")
    assert token_positions(pooled, "all").tolist() == [0]
