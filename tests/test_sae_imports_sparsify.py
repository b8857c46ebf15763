"""sparsify SAEs read as ours: written by eai-sparsify's own SparseCoder.save_to_disk, our codes equal its encode.

sparsify's folders have our checkpoints' file names (cfg.json + sae.safetensors): both kinds are told apart.
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


def sparsify_sae(d_in: int, num_latents: int = 96, k: int = 8, seed: int = 0, **settings):
    """A sparsify SparseCoder with random weights, its biases too (sparsify starts them at zero)."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=num_latents, k=k, **settings))
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.randn_like(sae.encoder.bias) * 0.3)
        sae.b_dec.copy_(torch.randn_like(sae.b_dec) * 0.3)
    return sae


def tokens(store: ActivationStore, n: int = 4) -> torch.Tensor:
    return store.read(LAYER, 0, n)[:, 1:].reshape(-1, store.layer(LAYER).d).float()


def sparsify_codes(peer, x: torch.Tensor) -> torch.Tensor:
    """sparsify's own encode (its k values and indices) as dense codes."""
    top_acts, top_indices, _ = peer.encode(x)
    return torch.zeros(x.shape[0], peer.num_latents).scatter_(1, top_indices, top_acts)


@pytest.mark.parametrize("settings", [{}, {"multi_topk": True, "normalize_decoder": False}])
def test_sparsify_codes_equal_sparsify_encode(service_store, tmp_path, settings):
    from sparsify.utils import eager_decode

    store = ActivationStore(str(service_store / "store"))
    peer = sparsify_sae(store.layer(LAYER).d, **settings)
    peer.save_to_disk(tmp_path / "layers.10")
    x = tokens(store)
    with torch.no_grad():
        expected = sparsify_codes(peer, x)
        found = checkpoint.load(str(tmp_path / "layers.10"))[0]  # found from its files
        named = checkpoint.load(f"sparsify:{tmp_path / 'layers.10'}")[0]
        ours, decoded = found.encode(x).to_dense(), found.decode(found.encode(x))
        assert torch.equal(ours, named.encode(x).to_dense())
        top_acts, top_indices, _ = peer.encode(x)  # sparsify's decode is its eager_decode + b_dec (triton: GPU)
        peer_decoded = eager_decode(top_indices, top_acts, peer.W_dec.mT) + peer.b_dec
    assert found.cfg.kind == "topk" and found.cfg.k == 8 and found.cfg.d_sae == 96
    assert ((ours > 0) == (expected > 0)).float().mean() > 0.999  # the same latents fire
    difference = (ours - expected).abs().max().item()
    assert difference < 1e-4 * max(1.0, expected.abs().max().item()), difference
    assert (decoded - peer_decoded).abs().max().item() < 1e-4 * max(1.0, peer_decoded.abs().max().item())
    print(f"sparsify {settings}: max |ours - sparsify| codes {difference:.2e}, "
          f"reconstructions {(decoded - peer_decoded).abs().max().item():.2e}")


def test_our_checkpoints_still_load_as_ours(tmp_path):
    from sae import SAEConfig, SparseAutoencoder

    ours = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, kind="relu"))
    checkpoint.save(ours, str(tmp_path / "ours"), extra={"trained_tokens": 5})
    sae, _ = checkpoint.load(str(tmp_path / "ours"))
    assert sae.cfg == ours.cfg and checkpoint.read_extra(str(tmp_path / "ours")) == {"trained_tokens": 5}
    with pytest.raises(ConfigError, match="no sparsify SAE there"):
        checkpoint.load(f"sparsify:{tmp_path / 'ours'}")


def test_the_hookpoint_names_the_layer_and_the_model_needs_layer(service_store, tmp_path):
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    run = tmp_path / "run"
    sparsify_sae(d, 64, 4).save_to_disk(run / "layers.10")
    sparsify_sae(d, 64, 4).save_to_disk(run / "layers.9")
    (run / "config.json").write_text(json.dumps({"model": "vit-tiny-hf", "hookpoints": ["layers.9", "layers.10"]}))
    extra = checkpoint.read_extra(str(run / "layers.10"))
    assert extra["layer"] == LAYER and extra["names"] == "vit-tiny-hf layers.10"
    assert extra["imported"]["format"] == "sparsify"
    with pytest.raises(ConfigError, match="a model we cannot map to one of ours: pass --layer"):
        checkpoint.load_on_store(str(run / "layers.10"), store)
    sae, norm, spec = checkpoint.load_on_store(str(run / "layers.10"), store, layer=LAYER)
    assert spec.name == LAYER and norm is None and sae.cfg.d_sae == 64
    with pytest.raises(ConfigError, match=f"names layer 9 .* asked to read layer {LAYER}"):
        checkpoint.load_on_store(str(run / "layers.9"), store, layer=LAYER)
    sparsify_sae(d, 64, 4).save_to_disk(tmp_path / "mine")  # a folder named otherwise: no layer
    assert "layer" not in checkpoint.read_extra(str(tmp_path / "mine"))


@pytest.mark.parametrize("settings, message", [
    ({"skip_connection": True}, "skip_connection=true adds a linear map"),
    ({"transcode": True}, "transcode=true is a transcoder"),
    ({"activation": "groupmax"}, "a sparsify 'groupmax' SAE"),
    ({"signed": True}, "settings this reader does not know: signed"),
])
def test_what_we_cannot_represent_is_refused(tmp_path, settings, message):
    known = {key: value for key, value in settings.items() if key != "signed"}
    sparsify_sae(16, 32, 4, **known).save_to_disk(tmp_path / "sp")
    cfg_path = Path(tmp_path / "sp" / "cfg.json")
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **settings}))
    with pytest.raises(ConfigError, match=message) as e:
        checkpoint.load(str(tmp_path / "sp"))
    assert "\n" not in str(e.value)
