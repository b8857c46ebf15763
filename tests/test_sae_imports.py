"""SAEs of other libraries read as ours: written by the peer's own package, our codes equal its own encode.

SAELens: every architecture we have a kind for, written by sae-lens's classes (`save_model`), with its
apply_b_dec_to_input and rescale_acts_by_decoder_norm settings; codes compared in float32 on a store's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from sae import checkpoint

LAYER = "10"


def saelens_sae(kind: str, d_in: int, d_sae: int = 96, seed: int = 0, **settings):
    """A SAELens SAE of `kind` with random weights (thresholds and biases too), as sae-lens builds it."""
    import sae_lens

    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig)}
    model, config = classes[kind]
    if "metadata" in settings:
        from sae_lens.saes.sae import SAEMetadata

        settings["metadata"] = SAEMetadata(**settings["metadata"])
    torch.manual_seed(seed)
    sae = model(config(d_in=d_in, d_sae=d_sae, **settings))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name in ("b_enc", "b_dec"):
                p.copy_(torch.randn_like(p) * 0.3)
            elif name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
    return sae


def tokens(store: ActivationStore, n: int = 4) -> torch.Tensor:
    return store.read(LAYER, 0, n)[:, 1:].reshape(-1, store.layer(LAYER).d).float()


def our_codes(url: str, x: torch.Tensor) -> torch.Tensor:
    sae, norm = checkpoint.load(url)
    acts = sae.encode(norm.apply(x) if norm is not None else x)
    return acts.to_dense() if hasattr(acts, "to_dense") else acts


@pytest.mark.parametrize("kind, settings", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("topk", {"k": 8}),
    ("topk", {"k": 8, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
])
def test_saelens_codes_equal_saelens_encode(service_store, tmp_path, kind, settings):
    store = ActivationStore(str(service_store / "store"))
    peer = saelens_sae(kind, store.layer(LAYER).d, **settings)
    peer.save_model(str(tmp_path / "sl"))
    x = tokens(store)
    with torch.no_grad():
        expected = peer.encode(x)
        ours = our_codes(str(tmp_path / "sl"), x)  # found from its files
        named = our_codes(f"saelens:{tmp_path / 'sl'}", x)
    assert torch.equal(ours, named)
    assert ((ours > 0) == (expected > 0)).float().mean() > 0.999  # the same latents fire
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4 * max(1.0, expected.abs().max().item()), difference
    print(f"saelens {kind} {settings}: max |ours - saelens| = {difference:.2e}")


def test_our_export_reads_back_with_its_origin(service_store, tmp_path):
    from actstore.loader import Normalization
    from sae import SAEConfig, SparseAutoencoder, export_saelens

    store = ActivationStore(str(service_store / "store"))
    norm = Normalization.from_stats(store.stats(LAYER, "patches"), LAYER, "patches")
    ours = SparseAutoencoder(SAEConfig(d_in=store.layer(LAYER).d, d_sae=64, kind="topk", k=6))
    export_saelens(ours, str(tmp_path / "sl"), normalization=norm, origin=checkpoint.origin(store, LAYER))
    sae, loaded_norm, spec = checkpoint.load_on_store(str(tmp_path / "sl"), store)  # no --layer: it records one
    assert spec.name == LAYER and loaded_norm is None  # the normalization is folded into the weights
    x = tokens(store)
    with torch.no_grad():
        expected = ours.encode(norm.apply(x)).to_dense()
        got = sae.encode(x).to_dense()
    assert (got - expected).abs().max().item() < 1e-4
    assert checkpoint.read_extra(str(tmp_path / "sl"))["imported"]["format"] == "saelens"


def test_an_unmapped_model_needs_layer_and_the_cli_stages_run(service_store, tmp_path, capsys):
    from actstore_cli import main

    store_url = str(service_store / "store")
    store = ActivationStore(store_url)
    peer = saelens_sae("topk", store.layer(LAYER).d, d_sae=64, k=4,
                       metadata={"model_name": "vit-tiny-prisma", "hook_name": f"blocks.{LAYER}.hook_resid_post"})
    peer.save_model(str(tmp_path / "sl"))
    sae = f"saelens:{tmp_path / 'sl'}"
    with pytest.raises(ConfigError, match="a model we cannot map to one of ours: pass --layer"):
        checkpoint.load_on_store(sae, store)
    from services.spliced import load_in_model

    with pytest.raises(ConfigError, match="a model we cannot map"):  # the hook's layer is no user's say-so
        load_in_model(sae, store=store_url)
    other = saelens_sae("topk", store.layer(LAYER).d, d_sae=64, k=4,
                        metadata={"model_name": "vit-tiny-prisma", "hook_name": "blocks.9.hook_resid_post"})
    other.save_model(str(tmp_path / "sl9"))
    with pytest.raises(ConfigError, match=f"names layer 9 .* asked to read layer {LAYER}"):
        checkpoint.load_on_store(str(tmp_path / "sl9"), store, layer=LAYER)
    assert main(["index", "--store", store_url, "--sae", sae, "--out", str(tmp_path / "index"), "--layer", LAYER,
                 "--k", "4", "-q"]) == 0
    index = json.loads((tmp_path / "index" / "index.json").read_text())
    assert json.dumps(index).count("saelens") >= 1  # the index says what it indexed
    assert main(["index", "--store", store_url, "--sae", sae, "--out", str(tmp_path / "index2"), "-q"]) == 1
    assert "pass --layer" in capsys.readouterr().err and not (tmp_path / "index2").exists()


@pytest.mark.parametrize("change, message", [
    ({"normalize_activations": "layer_norm"}, "transforms each token on its own"),
    ({"normalize_activations": "expected_average_only_in"}, "has no norm_scaling_factor"),
    ({"architecture": "gated"}, "a SAELens 'gated' SAE"),
])
def test_what_we_cannot_represent_is_refused(tmp_path, change, message):
    peer = saelens_sae("standard", 16, d_sae=32)
    peer.save_model(str(tmp_path / "sl"))
    cfg_path = Path(tmp_path / "sl" / "cfg.json")
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(str(tmp_path / "sl"))
    assert "\n" not in str(e.value)


def test_export_command_writes_what_saelens_loads(service_store, tmp_path, capsys):
    from sae_lens import SAE

    from actstore.loader import Normalization
    from actstore_cli import main
    from sae import SAEConfig, SparseAutoencoder

    store = ActivationStore(str(service_store / "store"))
    norm = Normalization.from_stats(store.stats(LAYER, "patches"), LAYER, "patches")
    torch.manual_seed(1)
    ours = SparseAutoencoder(SAEConfig(d_in=store.layer(LAYER).d, d_sae=64, kind="jumprelu"))
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.5)
        ours.threshold.uniform_(0, 0.5)
    checkpoint.save(ours, str(tmp_path / "ours"), normalization=norm, extra=checkpoint.origin(store, LAYER))
    out = tmp_path / "exported"
    assert main(["export", "--sae", str(tmp_path / "ours"), "--to", "saelens", "--out", str(out), "-q"]) == 0
    assert f"layer {LAYER} of its store's model recorded" in capsys.readouterr().out
    x = tokens(store)
    with torch.no_grad():
        expected = ours.encode(norm.apply(x))
        theirs = SAE.load_from_disk(str(out)).encode(x)  # raw activations: the normalization is folded in
        back, _, _ = checkpoint.load_on_store(str(out), store)  # the origin came along: no --layer needed
        again = back.encode(x)
    assert (theirs - expected).abs().max().item() < 1e-4 and (again - expected).abs().max().item() < 1e-4
    assert main(["export", "--sae", str(tmp_path / "ours"), "--out", str(out), "-q"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--sae", str(tmp_path / "ours"), "--out", str(out), "--overwrite", "-q"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["export", "--sae", str(tmp_path / "ours"), "--out", str(mine), "--overwrite", "-q"]) == 1
    assert "is not an SAE export of ours" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"
