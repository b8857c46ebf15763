"""One identity for the triple (backbone, store, SAE): a store records the model that made it (resolved weights,
library versions), an SAE records the store's model and layer, and every command that puts an SAE on a store or in a
model refuses one from another model or layer, in one line naming both sides; a rebuilt backbone is checked against
the stored activations (services.spliced.check_fidelity) before its numbers are trusted."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from actstore.errors import ConfigError
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore.loader import Normalization
from actstore.store import ActivationStore, identity_differences, model_identity
from actstore.testing.synthetic import write_synthetic_store
from actstore_cli import main
from sae import SAEConfig, SparseAutoencoder, checkpoint
from services.api import create_app
from services.compare import CompareConfig, run_compare
from services.index import IndexConfig, build_index
from services.spliced import load_in_model
from services.steer import Steerer

D = 16


def set_backbone(store: str, **changes) -> None:
    """Edit a store's record of its backbone in place (what a stale or hand-edited record looks like)."""
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs["actstore"])
    attrs["backbone"] = {**attrs["backbone"], **changes}
    group.attrs["actstore"] = attrs


def sae_on(store: str, folder: Path, layer: str = "10", record: bool = True) -> str:
    s = ActivationStore(store)
    norm = Normalization.from_stats(s.stats(layer, "patches"), layer, "patches")
    model = SparseAutoencoder(SAEConfig(d_in=s.layer(layer).d, d_sae=32, kind="topk", k=4))
    checkpoint.save(model, str(folder), normalization=norm, extra=checkpoint.origin(s, layer) if record else {})
    return str(folder)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict[str, str]:
    """Two 16-wide stores at layer 10 from different models (random seeds 0 and 1), and an SAE trained on each."""
    root = tmp_path_factory.mktemp("identity")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        write_synthetic_store(str(root / name), 24, grid=(2, 2), d=D, seed=seed, progress=False, images_per_shard=8)
        out[name] = str(root / name)
        out[f"sae_{name}"] = sae_on(out[name], root / f"sae-{name}")
    out["root"] = str(root)
    return out


def test_identity_is_the_model_not_the_dataset() -> None:
    random0 = {"family": "timm", "name": "vit_tiny_patch16_224", "checkpoint": None, "init_seed": 0}
    assert identity_differences(model_identity(random0), model_identity({**random0, "n_blocks": 12})) == []
    assert identity_differences(model_identity(random0), model_identity({**random0, "init_seed": 1})) == [
        "weights: random, init seed 0 vs random, init seed 1"]
    dino = {**random0, "family": "hf", "name": "dinov2-small", "config": {"hidden_size": 384}}
    assert identity_differences(model_identity(random0), model_identity(dino)) == [
        "model: timm:vit_tiny_patch16_224 vs hf:dinov2-small"]
    # one checkpoint file's bytes, wherever it lay; another file is another model
    file_a = {**random0, "checkpoint": "/a/w.pt", "weights": {"sha256": "ab" * 32}}
    assert identity_differences(model_identity(file_a), model_identity({**file_a, "checkpoint": "/b/w.pt"})) == []
    assert identity_differences(model_identity(file_a),
                                model_identity({**file_a, "weights": {"sha256": "cd" * 32}}))[0].startswith("sha256:")
    # timm's "hub" is the tag it resolved to: another default tag is another model
    hub = {**random0, "checkpoint": "hub", "weights": {"tag": "augreg_in21k_ft_in1k"}}
    assert identity_differences(model_identity(hub), model_identity({**hub, "weights": {"tag": "augreg2"}})) == [
        "tag: augreg_in21k_ft_in1k vs augreg2"]


def test_a_store_records_its_resolved_weights_and_library_versions(tmp_path: Path) -> None:
    cfg = BackboneConfig("timm:vit_tiny_patch16_224", layers=(2,))
    meta = load_backbone(cfg).metadata()
    assert meta["weights"] == {} and meta["checkpoint"] is None and meta["init_seed"] == 0
    import timm
    import transformers

    assert meta["versions"]["timm"] == timm.__version__ and meta["versions"]["torch"] == torch.__version__.split("+")[0]
    assert meta["versions"]["transformers"] == transformers.__version__
    path = tmp_path / "weights.pt"
    torch.save(load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", init_seed=3)).model.state_dict(), path)
    meta = load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(2,), pretrained=str(path))).metadata()
    assert meta["weights"] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_an_sae_of_another_model_is_refused_by_every_command(two_models: dict[str, str], tmp_path: Path,
                                                             capsys) -> None:
    """The SAE trained on store b's model, put on store a (same width, same layer): index, compare, evaluate, steer
    and the service's steering all refuse it in one line naming both sides, and write nothing."""
    a, sae_b = two_models["a"], two_models["sae_b"]
    words = [sae_b, "was trained on layer 10 of synthetic:vit-like-d16 (random, init seed 1)", a,
             "holds synthetic:vit-like-d16 (random, init seed 0)", "not the same model"]
    with pytest.raises(ConfigError) as e:
        build_index(IndexConfig(a, sae_b, str(tmp_path / "index")), progress=False)
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value)
    assert not (tmp_path / "index").exists()
    with pytest.raises(ConfigError, match="not the same model"):
        run_compare(CompareConfig(a=f"{two_models['sae_a']}@{a}", b=f"{sae_b}@{a}", out=str(tmp_path / "cmp")),
                    progress=False)
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(ConfigError, match="not the same model"):
        load_in_model(sae_b, a)
    with pytest.raises(ConfigError, match="not the same model"):
        Steerer(sae_b, a)
    for argv in (["evaluate", "--sae", sae_b, "--store", a, "--images", two_models["root"], "-q"],
                 ["steer", "--sae", sae_b, "--store", a, "--image", "0"],
                 ["index", "--store", a, "--sae", sae_b, "--out", str(tmp_path / "cli-index"), "-q"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(w in err for w in words), err
    # the same model over other images is fine: a's SAE on a store of the same model (seed 0), other data
    same_model = str(tmp_path / "a-other-data")
    write_synthetic_store(same_model, 16, grid=(2, 2), d=D, seed=0, progress=False, images_per_shard=8)
    attrs = zarr.open_group(same_model).attrs["actstore"]
    zarr.open_group(same_model, mode="r+").attrs["actstore"] = {
        **attrs, "dataset": {**attrs["dataset"], "source": "elsewhere", "fingerprint": "other-images"}}
    assert build_index(IndexConfig(same_model, two_models["sae_a"], str(tmp_path / "ok")), progress=False).is_dir()
    # serve --steer over an index whose SAE was swapped for another model's: refused when the app is made
    meta = json.loads((tmp_path / "ok" / "index.json").read_text())
    (tmp_path / "ok" / "index.json").write_text(json.dumps({**meta, "sae": sae_b, "store": a}))
    with pytest.raises(ConfigError, match="not the same model"):
        create_app(str(tmp_path / "ok"), steer_heads=("model",))


def test_another_layer_an_unrecorded_sae_and_an_old_record(two_models: dict[str, str], tmp_path: Path) -> None:
    a = two_models["a"]
    extra = checkpoint.read_extra(two_models["sae_a"])
    assert extra["layer"] == "10" and extra["backbone"] == model_identity(ActivationStore(a).attrs["backbone"])
    layer9 = tmp_path / "layer9"  # an SAE of the same model and width, trained on layer 9
    shutil.copytree(two_models["sae_a"], layer9)
    cfg = json.loads((layer9 / "cfg.json").read_text())
    cfg["extra"]["layer"] = cfg["normalization"]["layer"] = "9"
    (layer9 / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="was trained on layer 9 of .*; asked to read layer 10"):
        build_index(IndexConfig(a, str(layer9), str(tmp_path / "x"), layer=10), progress=False)
    bare = sae_on(a, tmp_path / "bare", record=False)
    with pytest.raises(ConfigError, match="does not record the model and layer it was trained on"):
        build_index(IndexConfig(a, bare, str(tmp_path / "x")), progress=False)
    # an SAE saved before SAEs recorded their model: checked through the store it records
    old = tmp_path / "old"
    shutil.copytree(two_models["sae_b"], old)
    cfg = json.loads((old / "cfg.json").read_text())
    cfg["extra"] = {"store": two_models["b"], "layer": "10"}
    (old / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="init seed 1.*init seed 0.*not the same model"):
        build_index(IndexConfig(a, str(old), str(tmp_path / "x")), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def edited_store(service_store: Path, tmp_path_factory) -> dict[str, str]:
    """A copy of the service store whose record names other weights (init seed 1, not 0) and older libraries, and an
    SAE recorded against that record (so the SAE/store identity agrees: only the rebuild can tell)."""
    root = tmp_path_factory.mktemp("edited")
    shutil.copytree(service_store / "store", root / "store")
    set_backbone(str(root / "store"), init_seed=1, versions={
        **ActivationStore(str(root / "store")).attrs["backbone"]["versions"], "timm": "0.9.2"})
    return {"store": str(root / "store"), "sae": sae_on(str(root / "store"), root / "sae"),
            "images": str(service_store / "images"), "root": str(root)}


def test_the_rebuilt_model_is_checked_against_the_stored_activations(service_store: Path, edited_store,
                                                                     tmp_path: Path, capsys) -> None:
    good = sae_on(str(service_store / "store"), tmp_path / "sae")
    model = load_in_model(good)
    assert model.fidelity.checked and len(model.fidelity.images) == 4
    assert 0 <= model.fidelity.max_abs_diff < 0.05  # the same model: the store's own rounding

    argv = ["evaluate", "--sae", edited_store["sae"], "--images", edited_store["images"], "--max-images", "4",
            "--json", str(tmp_path / "r.json"), "-q"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "timm:vit_tiny_patch16_224 (rebuilt from" in err, err
    assert re.search(r"does not make the stored activations: layer 10 differs by [\d.]+ at image \d+ token \d+ "
                     r"channel \d+ \(stored [-\d.]+, tolerance bfloat16 rounding\)", err), err
    assert "timm 0.9.2 then" in err and "pass --no-fidelity-check" in err
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ConfigError, match="does not make the stored activations"):
        Steerer(edited_store["sae"])
    # skipped on request, and the output says so
    assert main([*argv, "--no-fidelity-check"]) == 0
    assert "fidelity check SKIPPED" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["fidelity"] == {
        "checked": False, "images": [], "max_abs_diff": None, "tolerance": None}
    assert main(["steer", "--sae", edited_store["sae"], "--image", "0"]) == 1
    assert "does not make the stored activations" in capsys.readouterr().err
    assert main(["steer", "--sae", edited_store["sae"], "--image", "0", "--no-fidelity-check"]) == 0
    assert "fidelity check SKIPPED" in capsys.readouterr().out
