"""A command replaces only what it recognizes as its own output, and only when asked; anything else stays."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from actstore.errors import ConfigError, StoreNotFoundError
from actstore.loader import Normalization
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.shapes import generate_dataset
from actstore.testing.synthetic import write_synthetic_store
from actstore_cli import main
from sae import SparseAutoencoder, checkpoint
from sae.config import SAEConfig
from sae.train import TrainConfig, Trainer
from services.index import IndexConfig, build_index
from services.index.layout import open_array, read_index_meta


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


def _index_inputs(tmp_path: Path) -> tuple[str, str]:
    """A small store and a random TopK SAE on it."""
    store, sae = str(tmp_path / "store"), str(tmp_path / "sae")
    write_synthetic_store(store, 24, grid=(2, 2), d=8, progress=False, images_per_shard=8)
    norm = Normalization.from_stats(ActivationStore(store).stats("10", "patches"), "10", "patches")
    checkpoint.save(SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, kind="topk", k=2)), sae, normalization=norm,
                    extra=checkpoint.origin(ActivationStore(store), "10"))
    return store, sae


def _index_arrays(index: Path) -> dict[str, np.ndarray]:
    meta = read_index_meta(index)
    assert meta["n_images"] == 24 and meta["d_sae"] == 16
    return {name: np.asarray(open_array(index, name)) for name in ("top_images", "top_values", "image_features")}


def test_index_runs_to_one_output_keep_each_others_work(tmp_path):
    """Each run builds in a temporary sibling of its own: two runs at once never clear each other's work, and
    what lands at --out is one whole index."""
    store, sae = _index_inputs(tmp_path)
    want = _index_arrays(build_index(IndexConfig(store, sae, str(tmp_path / "reference"), k=2), progress=False))
    out = tmp_path / "index"
    theirs = tmp_path / f".index.tmp-{os.getpid() + 1}-0123456789ab"  # another run, still at work
    theirs.mkdir()
    (theirs / "index.json").write_text("half")
    with pytest.raises(StoreNotFoundError):  # a failing run takes its own temporary folder away, nothing else
        build_index(IndexConfig(str(tmp_path / "missing"), sae, str(out), k=2), progress=False)
    for overwrite in (False, True):  # two runs at once: without overwrite one is refused, with it both finish
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(build_index, IndexConfig(store, sae, str(out), k=2, overwrite=overwrite), False)
                    for _ in range(2)]
        errors = [run.exception() for run in runs]
        if overwrite:
            assert errors == [None, None]
        else:
            assert sum(e is None for e in errors) == 1 and all(isinstance(e, ConfigError) and "already there" in str(e)
                                                               for e in errors if e is not None)
        got = _index_arrays(out)
        assert all(np.array_equal(got[name], want[name]) for name in want)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [theirs.name]
        assert (theirs / "index.json").read_text() == "half"


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
