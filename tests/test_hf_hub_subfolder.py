"""`hf:owner/name/sub/folder`: a model in a hub repo's subfolder (a diffusion pipeline's image_encoder), downloaded
from a local stand-in of the hub (tests/hubserver.py, huggingface_hub pointed at it) and loaded as its folder: the
same tokens as the same folder loaded locally, only that subfolder's config and safetensors downloaded, the record
naming repo, subfolder and commit; the generate head finds the pipeline it belongs to on the hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.hf_api
import pytest
import torch

from actstore.errors import ConfigError
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.extract.hf import hf_source, hub_repo
from actstore.testing.tiny_diffusion import write_tiny_unclip
from hubserver import SHA, serve
from sae import SAEConfig, SparseAutoencoder
from services.spliced import Fidelity, SAEInModel
from services.steer.generate import generate_head

ENCODER = "owner/pipe/image_encoder"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The stand-in's root: owner/pipe (a tiny unCLIP pipeline, its encoder beside weights in other formats that must
    not be downloaded) and owner/adapter/models/image_encoder (the same encoder, two levels down, as h94/IP-Adapter)."""
    root = tmp_path_factory.mktemp("hub")
    pipe = Path(write_tiny_unclip(str(root / "owner" / "pipe")))
    for other in ("pytorch_model.bin", "model.fp16.safetensors"):
        (pipe / "image_encoder" / other).write_bytes(b"not to be downloaded")
    shutil.copytree(pipe / "image_encoder", root / "owner" / "adapter" / "models" / "image_encoder")
    return root


@pytest.fixture
def hub(served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub (and so transformers and diffusers) talking to the stand-in, with an empty cache; the cache."""
    server, endpoint = serve(served)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)  # model_info's client, made at import
    yield cache
    server.shutdown()


def downloaded(cache: Path) -> list[str]:
    """The files of the cached snapshots, relative to their snapshot."""
    return sorted(str(p.relative_to(s)) for s in cache.glob("models--*/snapshots/*") for p in s.rglob("*")
                  if p.is_file())


def test_hub_ids_with_a_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hf_source(ENCODER) == ("hub", ENCODER) and hub_repo(ENCODER) == ("owner/pipe", "image_encoder")
    assert hub_repo("h94/IP-Adapter/models/image_encoder") == ("h94/IP-Adapter", "models/image_encoder")
    assert hub_repo("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", "")
    monkeypatch.chdir(tmp_path)
    for bad in ("owner/pipe/../image_encoder", "owner/pipe/./image_encoder", "owner//image_encoder",
                "owner/pipe/", "../pipe/image_encoder", "owner/pipe/image encoder"):
        with pytest.raises(ConfigError, match="hf model folder not found"):
            hf_source(bad)
    # a folder of the same spelling wins, as in transformers
    (tmp_path / ENCODER).mkdir(parents=True)
    (tmp_path / ENCODER / "config.json").write_text("{}")
    assert hf_source(ENCODER) == ("folder", str(tmp_path / ENCODER))


def test_checking_a_hub_subfolder_downloads_nothing(hub: Path) -> None:
    BackboneConfig(f"hf:{ENCODER}", pretrained="hub")
    assert not hub.exists()


def test_a_model_in_a_hub_subfolder_is_its_folder(hub: Path, served: Path) -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    local = load_backbone(BackboneConfig(f"hf:{served / ENCODER}", layers=(0, 1), pretrained="hub"))
    remote = load_backbone(BackboneConfig(f"hf:{ENCODER}", layers=(0, 1), pretrained="hub"))
    assert type(remote.model).__name__ == "CLIPVisionModelWithProjection"
    ours, theirs = remote(images), local(images)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(remote.outputs(images)[0], local.outputs(images)[0])  # the projected embedding
    assert downloaded(hub) == ["image_encoder/config.json", "image_encoder/model.safetensors"]
    record = remote.metadata()
    assert record["name"] == ENCODER and record["checkpoint"] == "hub"
    assert record["weights"] == {"hub_id": "owner/pipe", "subfolder": "image_encoder", "revision": SHA}
    # what a later command rebuilds from that record is the same model
    again = load_backbone(BackboneConfig(f"hf:{record['name']}", layers=(0,), pretrained=record["checkpoint"]))
    assert torch.equal(again(images)["0"], ours["0"])


def test_random_weights_from_a_hub_subfolder_download_its_config_only(hub: Path, served: Path) -> None:
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    remote = load_backbone(BackboneConfig(f"hf:{ENCODER}", layers=(1,), init_seed=3))
    local = load_backbone(BackboneConfig(f"hf:{served / ENCODER}", layers=(1,), init_seed=3))
    assert torch.equal(remote(images)["1"], local(images)["1"])
    assert downloaded(hub) == ["image_encoder/config.json"] and remote.metadata()["weights"] == {}


def test_missing_repos_and_subfolders_are_refused(hub: Path) -> None:
    with pytest.raises(ConfigError, match=r"hf:owner/nope/image_encoder: no such folder here, and on the hub: "):
        load_backbone(BackboneConfig("hf:owner/nope/image_encoder", pretrained="hub"))
    with pytest.raises(ConfigError, match=r"the hub repo owner/pipe has no unet2/config.json"):
        load_backbone(BackboneConfig("hf:owner/pipe/unet2", pretrained="hub"))


def in_model(backbone) -> SAEInModel:
    """A random SAE on the backbone's first layer (what the generate head reads of it: the backbone and layer)."""
    spec = backbone.spec(0)
    sae = SparseAutoencoder(SAEConfig(d_in=spec.d, d_sae=16, kind="topk", k=2, init_seed=1))
    return SAEInModel(sae, None, "", spec, "patches", backbone, torch.zeros(spec.d), Fidelity(checked=False))


def test_the_generate_head_finds_the_hub_pipeline_of_its_encoder(hub: Path) -> None:
    head = generate_head(in_model(load_backbone(BackboneConfig(f"hf:{ENCODER}", pretrained="hub"))), "")
    assert head.name == "generate"  # owner/pipe downloaded, and its image encoder checked to be the backbone
    assert "model_index.json" in downloaded(hub) and os.path.isdir(next(hub.glob("models--owner--pipe/snapshots/*"))
                                                                   / "unet")
    nested = load_backbone(BackboneConfig("hf:owner/adapter/models/image_encoder", pretrained="hub"))
    with pytest.raises(ConfigError, match=r"is not inside a pipeline's folder; name the pipeline"):
        generate_head(in_model(nested), "")
