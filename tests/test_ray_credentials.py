"""No raw credentials in what Ray records: Ray Train's run state (the dashboard's Train view), Ray Data's
operator arguments (its dataset metadata export), any file under the Ray session's folder, or the outputs.
moto takes any key pair, so the storage options carry a made-up secret that must show up nowhere."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from actstore.extract import ExtractConfig
from actstore.testing.synthetic import write_synthetic_store
from sae.train import TrainConfig, train

SECRET, KEY = "fake-secret-7f1c0ffee", "AKIAFAKE7f1c0ffee"


@pytest.fixture
def options(s3) -> dict:
    return {**s3.storage_options, "key": KEY, "secret": SECRET}


def _session_files_holding(text: str) -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]


def _objects_holding(url: str, options: dict, text: str) -> list[str]:
    fs = fsspec.filesystem("s3", **options)
    return [p for p in fs.find(url) if text.encode() in fs.cat_file(p)]


def test_ray_train_records_no_credentials(ray_local, s3_url, options, monkeypatch):
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the dashboard's Train view: Ray keeps each run
    store, out = f"{s3_url}/store", f"{s3_url}/run"
    write_synthetic_store(store, 64, grid=(2, 2), d=8, progress=False, images_per_shard=16, storage_options=options)
    train(TrainConfig(store=store, out=out, layer=10, sae=({"kind": "topk", "k": 2, "d_sae": 16},), tokens=2048,
                      batch_size=64, checkpoint_every=None, num_workers=2, storage_options=options), progress=False)
    assert _objects_holding(out, options, "topk-k2-m16")  # it trained, reading and writing through the options
    runs = ray.get(get_state_actor().get_train_runs.remote())
    recorded = json.dumps([run.model_dump(mode="json") for run in runs.values()], default=str)
    assert '"secret": "<redacted>"' in recorded  # the run's config is recorded, for people to read: redacted
    assert SECRET not in recorded and KEY not in recorded
    assert _session_files_holding(SECRET) == [] and _session_files_holding(KEY) == []
    assert _objects_holding(out, options, SECRET) == [] and _objects_holding(out, options, KEY) == []


def test_ray_data_records_no_credentials(ray_local, s3_url, options):
    """What Ray Data records of the extraction's operators (their arguments, as its dataset metadata export
    writes them under the session's logs: through Ray's own sanitize_for_struct) holds no credential."""
    from ray.data._internal.metadata_exporter import sanitize_for_struct

    from actstore.extract.backbones import load_backbone
    from actstore.extract.job import _pipeline
    from actstore.store import StoreWriter

    out = f"{s3_url}/store"
    write_synthetic_store(out, 4, grid=(2, 2), d=8, progress=False, storage_options=options)
    cfg = ExtractConfig(images=f"{s3_url}/images", model="timm:vit_tiny_patch16_224", out=out,
                        storage_options=options, image_storage_options=options)
    units = [{"unit": 0, "uris": json.dumps([f"{s3_url}/images/a.png"]), "labels": "[0]"}]
    ds = _pipeline(cfg, units, load_backbone(cfg.backbone).preprocessor, None, StoreWriter(out, options))
    ops, op = [], ds._logical_plan.dag
    while op is not None:
        ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    recorded = json.dumps([sanitize_for_struct(op._get_args()) for op in ops])
    assert "MapBatches(_decode_unit)" in recorded and '"storage_options": "ObjectRef(' in recorded
    assert SECRET not in recorded and KEY not in recorded
