"""The Ray extraction job end to end: values, S3, resume, a killed worker, bad images."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import timm
import torch
from PIL import Image

from actstore.errors import IncompleteStoreError
from actstore.extract import ExtractConfig, run_extract
from actstore.testing.shapes import generate_dataset
from actstore.store import ActivationStore, StoreWriter, verify_store
from actstore.testing.images import hard_images

MODEL, ARCH, LAYER = "timm:vit_tiny_patch16_224", "vit_tiny_patch16_224", "10"  # -2 of 12 blocks
N_IMAGES, PER_SHARD = 48, 8  # 6 units


def extract(images: str, out: str, **kw) -> object:
    cfg = ExtractConfig(images=images, model=MODEL, out=out, batch_size=8, images_per_shard=PER_SHARD, **kw)
    return run_extract(cfg, progress=False)


def objects(root: Path) -> dict[str, bytes]:
    """Every object of a store but the run's config, which names the store's own path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "extract_config.json"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("data") / "shapes"
    generate_dataset(str(out), N_IMAGES, seed=1, image_size=64)
    return str(out)


@pytest.fixture(scope="module")
def clean(ray_local, images, tmp_path_factory) -> Path:
    """A store from one uninterrupted run: the reference for resume and fault tests."""
    out = tmp_path_factory.mktemp("clean") / "store"
    result = extract(images, str(out))
    assert result.complete and result.units_written == N_IMAGES // PER_SHARD
    return out


def test_values_equal_timms_own_intermediates(clean, images):
    store = ActivationStore(str(clean))
    spec = store.spec
    assert [l.name for l in spec.layers] == [LAYER] and spec.shape(-2) == (N_IMAGES, 197, 192)
    assert spec.backbone["family"] == "timm" and spec.backbone["name"] == ARCH
    assert spec.backbone["init_seed"] == 0 and spec.dtype == "bfloat16"
    table = store.images().to_pandas()
    assert (table.status == "ok").all() and list(table.index) == list(range(N_IMAGES))
    assert list(table.uri) == sorted(table.uri, key=lambda u: Path(u).relative_to(images).parts)
    assert (table.label == [spec.dataset["class_names"].index(Path(u).parent.name) for u in table.uri]).all()
    assert (table.width == 64).all()

    # independently: timm's own model, transform and forward_intermediates (items are (patches, prefix))
    torch.manual_seed(0)
    model = timm.create_model(ARCH).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    pick = [0, 17, 30, 47]
    x = torch.stack([transform(Image.open(table.uri[i]).convert("RGB")) for i in pick])
    with torch.inference_mode():
        patches, prefix = model.forward_intermediates(x, indices=[10], output_fmt="NLC", norm=False,
                                                      return_prefix_tokens=True, intermediates_only=True)[0]
    want = torch.cat([prefix, patches], dim=1)
    got = torch.stack([store.read(-2, i, i + 1)[0] for i in pick]).float()
    torch.testing.assert_close(got, want.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-3)
    st = store.stats(-2, "patches")
    assert st.count == N_IMAGES * 196
    assert verify_store(str(clean), progress=False).ok


def test_store_on_s3_from_images_on_s3(clean, images, s3, s3_url):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(images, s3_url + "/images", recursive=True)
    out = s3_url + "/store"
    result = extract(s3_url + "/images", out, storage_options=s3.storage_options,
                     image_storage_options=s3.storage_options)
    assert result.complete and result.n_rejected == 0
    remote = ActivationStore(out, s3.storage_options)
    local = ActivationStore(str(clean))
    assert torch.equal(remote.read(LAYER).view(torch.int16), local.read(LAYER).view(torch.int16))
    assert remote.images().column("uri").to_pylist()[0].startswith("s3://")
    assert verify_store(out, s3.storage_options, progress=False).ok


def test_rerun_resumes_and_gives_the_same_bytes(clean, images, tmp_path):
    out = tmp_path / "store"
    first = extract(images, str(out), max_units=3)
    assert not first.complete and first.units_written == 3
    with pytest.raises(IncompleteStoreError):
        ActivationStore(str(out))
    second = extract(images, str(out))
    assert second.complete and second.units_skipped == 3 and second.units_written == 3
    assert objects(out) == objects(clean)
    third = extract(images, str(out))  # nothing left to do
    assert third.units_written == 0 and third.complete


def _forward_workers() -> list[psutil.Process]:
    """This session's forward actors: descendants of this process (ray.init started the raylet, whose
    children the workers are), so that no other Ray on the machine (another test worker's) loses one."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("MapBatches(_Forward)" in part for part in p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_worker_is_survived(clean, images, tmp_path):
    out = tmp_path / "store"
    result: dict[str, object] = {}
    job = threading.Thread(target=lambda: result.update(r=extract(images, str(out))))
    job.start()
    killed_with_units_left = False
    deadline = time.monotonic() + 300
    while job.is_alive() and time.monotonic() < deadline:
        done = len(StoreWriter(str(out)).units_done()) if (out / "zarr.json").exists() else 0
        workers = _forward_workers()
        if done >= 1 and workers:
            killed_with_units_left = done < N_IMAGES // PER_SHARD - 1
            for w in workers:
                os.kill(w.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    job.join(300)
    assert killed_with_units_left, "the job finished before a worker could be killed"
    assert result["r"].complete
    assert objects(out) == objects(clean)


def test_bad_images_are_recorded_and_skipped(ray_local, images, tmp_path):
    src = tmp_path / "mixed"
    good = sorted(Path(images).glob("circle/*.png"))[:5]
    (src / "good").mkdir(parents=True)
    for f in good:
        (src / "good" / f.name).write_bytes(f.read_bytes())
    (src / "hard").mkdir()
    corpus = hard_images()
    for name, (data, _) in corpus.items():
        (src / "hard" / name).write_bytes(data)
    (src / "hard" / "unreadable.png").mkdir()  # listed as an image, but a read fails
    result = extract(str(src), str(tmp_path / "store"))
    assert result.complete
    store = ActivationStore(str(tmp_path / "store"))
    table = store.images().to_pandas()
    expected = {name: status for name, (_, status) in corpus.items()}
    for _, row in table.iterrows():
        name = Path(row.uri).name
        if Path(row.uri).parent.name == "good":
            assert row.status == "ok"
        elif name in expected:
            assert row.status == expected[name], (name, row.reason)
    reasons = dict(zip(table.uri.map(lambda u: Path(u).name), table.reason))
    assert reasons["truncated.png"].startswith("truncated") and reasons["bomb.png"].startswith("too large")
    assert reasons["empty.png"] == "empty file" and reasons["text.jpg"].startswith("not an image")
    n_rejected = (table.status == "rejected").sum()
    assert result.n_rejected == n_rejected == store.attrs["summary"]["n_rejected"]
    acts = store.read(LAYER).float()
    ok = torch.from_numpy((table.status == "ok").to_numpy().copy())
    assert (acts[~ok] == 0).all() and (acts[ok].abs().sum(dim=(1, 2)) > 0).all()
    assert store.stats(LAYER, "cls").count == int(ok.sum())
