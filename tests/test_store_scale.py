"""Finalize and verify at many units: binary unit statistics, older JSON-statistics stores, concurrent reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from actstore.errors import CorruptDataError
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout, ok_mask, verify_store
from actstore.store import _io
from actstore.store._stats import partial_sums
from actstore.testing.synthetic import vit_like_activations


def make_spec(n: int = 45, images_per_shard: int = 16, d: int = 24, n_layers: int = 2) -> StoreSpec:
    layers = (LayerSpec("4", d, TokenLayout(cls=True, grid=(2, 3)), 4),
              LayerSpec("5", d + 8, TokenLayout(cls=False, grid=(2, 3)), 5))
    return StoreSpec(n_images=n, layers=layers[:n_layers],
                     dtype="float16", images_per_shard=images_per_shard, images_per_chunk=2,
                     backbone={"family": "test", "name": "tiny", "n_blocks": 6}, dataset={"source": "test"})


def write_units(url: str, spec: StoreSpec, storage_options=None) -> dict[str, np.ndarray]:
    """Every unit of `spec`, with every fifth image rejected; not finalized. Returns the images' columns."""
    acts = {l.name: vit_like_activations(spec.n_images, l.tokens.n_tokens, l.d, seed=i, heavy_scale=20)
            for i, l in enumerate(spec.layers)}
    status = np.array(["rejected" if i % 5 == 3 else "ok" for i in range(spec.n_images)], dtype=object)
    images = {"uri": np.array([f"img{i}.png" for i in range(spec.n_images)], dtype=object), "status": status,
              "reason": np.where(status == "ok", "", "too small")}
    w = StoreWriter.create(url, spec, storage_options)
    for k in range(spec.n_units):
        a, b = spec.unit_range(k)
        w.write_unit(k, {name: x[a:b] for name, x in acts.items()},
                     images={c: list(v[a:b]) for c, v in images.items()})
    return images


def to_json_stats(url: str, units: list[int]) -> None:
    """Rewrite these units' records the way stores were written before stats files: each layer's partial sums
    as JSON lists inside the record, no stats_crc32c, no stats file."""
    with ActivationStore(url, allow_partial=True) as store:
        table = store.images()
        for k in units:
            a, b = store.spec.unit_range(k)
            ok = ok_mask(table.slice(a, b - a))
            record = store.unit_record(k)
            for layer in store.layers:
                sums = partial_sums(store.read(layer.name, a, b), ok, layer.tokens)
                record["layers"][layer.name]["stats"] = {
                    kind: {"count": s["count"], "sum": s["sum"].tolist(), "sumsq": s["sumsq"].tolist()}
                    for kind, s in sums.items()}
            del record["stats_crc32c"]
            (Path(url) / f"_units/{k}.json").write_text(json.dumps(record, sort_keys=True))
            (Path(url) / f"_units/{k}.stats.safetensors").unlink()


def finalized(url: str, storage_options=None) -> dict[str, object]:
    """What finalize wrote: every stats array and attr, the images table, the rejected count."""
    group = zarr.open_group(url, mode="r", storage_options=storage_options)
    out: dict[str, object] = {"summary": group.attrs["actstore"]["summary"]}
    for layer in group["layers"]:
        for kind in ("cls", "patches"):
            path = f"layers/{layer}/stats/{kind}"
            if path in group:
                out[path] = (dict(group[path].attrs), group[path]["mean"][:], group[path]["var"][:])
    with ActivationStore(url, storage_options) as store:
        out["images"] = store.images()
    return out


def assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, tuple):
            assert got[key][0] == value[0], key
            np.testing.assert_array_equal(got[key][1], value[1])  # exact: float64 sums added in unit order
            np.testing.assert_array_equal(got[key][2], value[2])
        elif key == "images":
            assert got[key].equals(value)
        else:
            assert got[key] == value


@pytest.mark.parametrize("old_units", ["all", "some"])
def test_a_store_with_json_statistics_finalizes_and_reads_the_same(tmp_path, old_units):
    """Stores written before stats files (and resumed ones, whose units mix both forms) finalize to the same
    bytes of statistics as the binary path, and verify."""
    spec = make_spec()
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    write_units(new, spec)
    shutil.copytree(new, old)
    to_json_stats(old, list(range(spec.n_units)) if old_units == "all" else [0, 2])
    assert "stats" in json.loads((Path(old) / "_units/0.json").read_text())["layers"]["4"]
    StoreWriter(new).finalize()
    StoreWriter(old).finalize()
    want = finalized(new)
    assert_same(finalized(old), want)
    assert want["summary"] == {"n_rejected": 9}
    assert "layers/5/stats/cls" not in want  # layer 5 has no CLS token
    with ActivationStore(old) as store:  # and the statistics match an independent computation
        ok = np.array([i % 5 != 3 for i in range(spec.n_images)])
        patches = store.read("5").numpy().astype(np.float64)[ok].reshape(-1, spec.layers[1].d)
        st = store.stats("5")
        assert st.count == patches.shape[0]
        np.testing.assert_allclose(st.mean, patches.mean(0), rtol=1e-6, atol=1e-7)  # float32 blocks
    assert verify_store(old, progress=False).ok


def test_a_unit_record_no_longer_carries_its_statistics(tmp_path):
    spec = make_spec(d=768)
    url = str(tmp_path / "s")
    write_units(url, spec)
    record = json.loads((Path(url) / "_units/1.json").read_text())
    assert set(record["layers"]["4"]) == {"crc32c"} and isinstance(record["stats_crc32c"], int)
    assert (Path(url) / "_units/1.json").stat().st_size < 1000  # was ~60 KB of JSON floats at this width
    assert (Path(url) / "_units/1.stats.safetensors").stat().st_size < 2 * 2 * (768 + 776) * 8 + 1000


def test_a_corrupted_or_missing_stats_file_is_named_and_never_used(tmp_path, capsys):
    from actstore_cli import main

    spec = make_spec()
    url = tmp_path / "s"
    write_units(str(url), spec)
    StoreWriter(str(url)).finalize()
    before = finalized(str(url))
    stats = url / "_units/1.stats.safetensors"
    raw = bytearray(stats.read_bytes())
    raw[-3] ^= 0x10  # a bit of one float64 sum: the file still decodes, only its checksum tells
    stats.write_bytes(bytes(raw))
    (url / "_units/2.stats.safetensors").unlink()

    assert verify_store(str(url), progress=False).problems == [
        "unit 1: _units/1.stats.safetensors does not match its record (crc32c)",
        f"unit 2: _units/2.stats.safetensors unreadable ([Errno 2] No such file or directory: "
        f"'{url}/_units/2.stats.safetensors')"]
    assert main(["verify", "-q", str(url)]) == 1
    assert "_units/1.stats.safetensors does not match its record" in capsys.readouterr().out
    with pytest.raises(CorruptDataError, match=r"unit 1: _units/1\.stats\.safetensors does not match") as e:
        StoreWriter(str(url)).finalize()
    assert e.value.key == "_units/1.stats.safetensors"
    assert_same(finalized(str(url)), before)  # the failed finalize changed nothing


def test_many_units_on_s3_are_read_concurrently_in_order(s3, s3_url, tmp_path, monkeypatch):
    """40 units on the S3 endpoint, read 16 units at a time (three batches, the last one partial): finalize
    gives what it gives for the same units on local disk, the images table in image order; verify names the two
    units whose tables were swapped, and only them (a mix-up among concurrent reads would show here)."""
    import s3fs

    monkeypatch.setattr(_io, "_UNITS_PER_READ", 16)
    spec = make_spec(n=80, images_per_shard=2, d=8, n_layers=1)
    opts = s3.storage_options
    images = write_units(s3_url, spec, opts)
    write_units(str(tmp_path / "local"), spec)
    StoreWriter(s3_url, opts).finalize()
    StoreWriter(str(tmp_path / "local")).finalize()
    got = finalized(s3_url, opts)
    assert_same(got, finalized(str(tmp_path / "local")))
    assert got["images"].column("uri").to_pylist() == list(images["uri"])

    fs = s3fs.S3FileSystem(**opts)
    root = s3_url.removeprefix("s3://")
    a, b = fs.cat_file(f"{root}/_units/37.parquet"), fs.cat_file(f"{root}/_units/38.parquet")
    fs.pipe({f"{root}/_units/37.parquet": b, f"{root}/_units/38.parquet": a})
    assert verify_store(s3_url, opts, progress=False).problems == [
        "unit 37: _units/37.parquet does not match its record", "unit 38: _units/38.parquet does not match its record"]
