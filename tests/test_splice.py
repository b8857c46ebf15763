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
from sae.splice import SpliceStats, ablate, splice, token_positions

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

    sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=4 * spec.d, kind="topk", k=4, init_seed=3))
    norm = random_norm(spec.d)
    for tokens in ("patches", "all"):
        with splice(backbone, sae, norm, layer=spec.name, tokens=tokens, mode="error"):
            emb, logits = backbone.outputs(x)
        torch.testing.assert_close(emb, clean_emb, rtol=1e-4, atol=1e-4)
        if logits is not None:
            torch.testing.assert_close(logits, clean_logits, rtol=1e-4, atol=1e-4)
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


def test_edit_sees_the_spliced_tokens_and_changes_only_them(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["hf"]  # CLS, 2 registers (not stored), a 4 x 4 grid
    spec = backbone.layer_specs()[0]
    x = images(backbone)
    sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=64, kind="relu", init_seed=2))
    positions, after = [], {}
    index = spec.index + 1  # the next block's input is this block's output

    def edit(acts: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        positions.append(pos)
        out = acts.clone()
        out[pos == 3] += 1.0  # one patch, every latent
        return out

    hook = backbone.model.encoder.layer[index].register_forward_pre_hook(lambda m, a: after.update(x=a[0].clone()))
    try:
        backbone.outputs(x)
        clean = after["x"]
        with splice(backbone, sae, None, layer=spec.name, mode="error", edit=edit):
            backbone.outputs(x)
    finally:
        hook.remove()
    assert torch.equal(positions[0], token_positions(spec.tokens, "patches").repeat(2))
    assert torch.equal(positions[0][:16], torch.arange(1, 17))
    delta = (after["x"] - clean).abs().amax(-1)  # (B, 1 + 2 registers + 16 patches)
    # only the edited patch moved (token 3 of the layout = patch 2 = sequence position 1 + 2 + 2), by W_dec's sum
    moved = torch.zeros_like(delta, dtype=torch.bool)
    moved[:, 5] = True
    assert (delta[moved] > 1e-3).all() and (delta[~moved] < 1e-5).all()
    torch.testing.assert_close(after["x"][:, 5] - clean[:, 5], sae.W_dec.detach().sum(0).expand(2, -1),
                               rtol=1e-4, atol=1e-5)


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
