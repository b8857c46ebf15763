"""A command replaces only what it recognizes as its own output, and only when asked; anything else stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from actstore.errors import ConfigError
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.shapes import generate_dataset
from actstore.testing.synthetic import write_synthetic_store
from actstore_cli import main
from sae.train import TrainConfig, Trainer
from services.index import IndexConfig, build_index


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    """A researcher's folder: no command made it."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("keep me")
    return folder


def _intact(folder: Path) -> bool:
    return sorted(p.name for p in folder.iterdir()) == ["chapter1.tex"] and \
        (folder / "chapter1.tex").read_text() == "keep me"


def _spec() -> StoreSpec:
    return StoreSpec(n_images=4, layers=(LayerSpec("0", 8, TokenLayout(cls=False, grid=(2, 2)), 0),),
                     images_per_shard=4, images_per_chunk=2, dtype="float32", backbone={"n_blocks": 1})


def test_store_overwrite_replaces_a_store_only(thesis, tmp_path):
    with pytest.raises(ConfigError, match="not an activation store"):
        StoreWriter.create(str(thesis), _spec(), overwrite=True)
    assert _intact(thesis)
    url = str(tmp_path / "store")
    write_synthetic_store(url, 4, grid=(2, 2), d=8, progress=False)
    StoreWriter.create(url, _spec(), overwrite=True)  # a store of another spec: replaced when asked
    assert ActivationStore(url, allow_partial=True).spec.layers[0].d == 8 and not ActivationStore(
        url, allow_partial=True).complete


def test_index_replaces_an_index_only(thesis):
    with pytest.raises(ConfigError, match="not a feature index"):
        build_index(IndexConfig(store="unused", sae="unused", out=str(thesis), overwrite=True))
    assert _intact(thesis)


def test_generated_images_replace_generated_images_only(thesis, tmp_path):
    with pytest.raises(ConfigError, match="not a generated shapes dataset"):
        generate_dataset(str(thesis), 6, overwrite=True)
    assert _intact(thesis)
    assert main(["demo", "--images", str(thesis), "--store", str(tmp_path / "s")]) == 1  # one line, nothing lost
    assert _intact(thesis) and not (tmp_path / "s").exists()
    generate_dataset(str(tmp_path / "imgs"), 6)
    (tmp_path / "imgs" / "factors.parquet").unlink()  # a generation that stopped half-way is still ours
    generate_dataset(str(tmp_path / "imgs"), 6, overwrite=True)
    assert (tmp_path / "imgs" / "factors.parquet").exists()


def test_training_writes_into_its_own_run_folder_only(thesis, tmp_path):
    store = str(tmp_path / "store")
    write_synthetic_store(store, 32, grid=(2, 2), d=8, progress=False, images_per_shard=8)
    cfg = TrainConfig(store=store, out=str(thesis), layer=10, sae=({"kind": "topk", "k": 2, "d_sae": 16},),
                      tokens=256, batch_size=32, checkpoint_every=None)
    with pytest.raises(ConfigError, match="not a training run folder"):
        Trainer(cfg).fit(progress=False)
    assert _intact(thesis)
    run = tmp_path / "run"
    Trainer(TrainConfig(**{**cfg.__dict__, "out": str(run)})).fit(progress=False)
    (run / "checkpoint" / "state.json").unlink()  # a run that never checkpointed: the same command starts over
    Trainer(TrainConfig(**{**cfg.__dict__, "out": str(run)})).fit(progress=False)
    assert (run / "checkpoint" / "state.json").exists()


def test_a_local_cluster_refuses_a_folder_it_did_not_make(thesis):
    """Its logs and token would overwrite same-named files: a folder holding anything else is refused, untouched."""
    from actstore.testing.cluster import LocalCluster

    with pytest.raises(ConfigError, match="not a cluster state folder"):
        LocalCluster(thesis).up()
    assert _intact(thesis)
