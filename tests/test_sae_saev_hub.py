"""saev SAEs read from the Hugging Face Hub (hf://, huggingface_hub's own HfFileSystem against a local stand-in of the
hub's API, tests/hubserver.py): a repo of several checkpoints picked by layer through its manifest.jsonl, as the
osunlp DINOv3 repos are laid out (saev's contrib/trait_discovery/scripts/push_dinov3.py), and a published
single-checkpoint repo mapped to our backbone and layer."""

from __future__ import annotations

import json

import pytest
import torch

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from hubserver import serve
from sae import checkpoint
from test_sae_imports_saev import LAYER, header, random_state, saev_encode, tokens, write_sae_pt

RUNS = {"layer_10/aaa": 10, "layer_11/bbb": 11, "layer_11/ccc": 11}


@pytest.fixture
def hub(tmp_path):
    server, endpoint = serve(tmp_path / "hub")
    yield tmp_path / "hub", {"endpoint": endpoint}
    server.shutdown()


def dinov3_repo(root, d: int) -> str:
    repo = root / "osunlp" / "SAE_DINOv3_Test"
    lines = []
    for i, (run, layer) in enumerate(RUNS.items()):
        write_sae_pt(repo / run / "sae.pt", header(5, "TopK", d), random_state(d, seed=i))
        lines.append(json.dumps({"run_id": run.split("/")[1], "layer": layer, "l0": 8.0 + i, "mse": 0.1,
                                 "sha256": "0" * 64, "path": f"{run}/sae.pt"}))
    (repo / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return "hf://osunlp/SAE_DINOv3_Test"


def test_a_manifest_repo_is_picked_by_layer(service_store, hub):
    root, options = hub
    store = ActivationStore(str(service_store / "store"))
    url = dinov3_repo(root, store.layer(LAYER).d)
    sae, norm, spec = checkpoint.load_on_store(url, store, LAYER, storage_options=options)
    x = tokens(store, 2).float()
    with torch.no_grad():
        expected = saev_encode(random_state(spec.d, seed=0), x, "TopK", 8, subtract_b_dec=False).relu()
        assert (sae.encode(x).to_dense() - expected).abs().max() < 1e-4
    assert spec.name == LAYER and norm is None
    assert checkpoint.read_extra(f"{url}/layer_10/aaa/sae.pt", options)["layer"] == "10"  # from the manifest
    with pytest.raises(ConfigError, match="holds 3 saev checkpoints .layers 10, 11.: pass --layer"):
        checkpoint.load_on_store(url, store, storage_options=options)
    with pytest.raises(ConfigError, match="2 saev checkpoints of layer 11.*layer_11/bbb/sae.pt .L0 9.0.*ccc"):
        checkpoint.load_on_store(url, store, "11", storage_options=options)
    with pytest.raises(ConfigError, match="names layer 11"):  # a checkpoint named by path keeps its layer
        checkpoint.load_on_store(f"{url}/layer_11/bbb", store, LAYER, storage_options=options)


def test_a_published_repo_maps_to_our_backbone_and_is_checked(service_store, hub):
    root, options = hub
    store = ActivationStore(str(service_store / "store"))
    d = store.layer(LAYER).d
    write_sae_pt(root / "osunlp" / "SAE_CLIP_24K_ViT-B-16_IN1K" / "sae.pt", header(5, "Relu", d),
                 random_state(d, seed=3))
    url = "hf://osunlp/SAE_CLIP_24K_ViT-B-16_IN1K"
    extra = checkpoint.read_extra(url, options)
    assert extra["backbone"] == {"model": "open_clip:ViT-B-16", "weights": "openai"} and extra["layer"] == "10"
    # our test store holds a random-weight timm ViT: OpenAI CLIP's SAE is refused on it, --layer or not
    for layer in (None, LAYER):
        with pytest.raises(ConfigError, match="open_clip:ViT-B-16 .openai.*not the same model"):
            checkpoint.load_on_store(url, store, layer, storage_options=options)
