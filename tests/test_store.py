"""The activation store: round trips, byte-identical rewrites, concurrency, integrity, errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.errors import (ConfigError, CorruptDataError, DtypeOverflowError, IncompleteStoreError,
                             StoreFormatError, StoreNotFoundError)
from actstore.store import (CODECS, DTYPES, ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout,
                            verify_store)
from actstore.testing.synthetic import vit_like_activations
from actstore_cli import main

ACTSTORE = str(Path(sys.executable).parent / "actstore")  # the installed console script
N, GRID, D = 45, (2, 3), 24  # 45 images: the last shard and the last chunk are partial


def make_spec(dtype="float16", codec="blosc-lz4", n=N, labels=False, **kw) -> StoreSpec:
    layers = (LayerSpec("4", D, TokenLayout(cls=True, grid=GRID), index=4),
              LayerSpec("5", D + 8, TokenLayout(cls=True, grid=GRID), index=5))
    return StoreSpec(n_images=n, layers=layers, dtype=dtype, codec=codec, images_per_shard=16,
                     images_per_chunk=4, backbone={"family": "test", "name": "tiny", "n_blocks": 6},
                     dataset={"source": "test"}, has_labels=labels, **kw)


def make_acts(spec: StoreSpec, seed: int = 0) -> dict[str, np.ndarray]:
    return {l.name: vit_like_activations(spec.n_images, l.tokens.n_tokens, l.d, seed=seed + i, heavy_scale=20)
            for i, l in enumerate(spec.layers)}


def write_all(url, spec, acts, storage_options=None, images=None, labels=None) -> None:
    w = StoreWriter.create(url, spec, storage_options)
    for k in range(spec.n_units):
        a, b = spec.unit_range(k)
        w.write_unit(k, {name: x[a:b] for name, x in acts.items()},
                     images=None if images is None else {c: v[a:b] for c, v in images.items()},
                     labels=None if labels is None else labels[a:b])
    w.finalize()


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even, in plain numpy (independent of torch)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def expected_plain(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a plain zarr reader sees on disk for float32 input x."""
    return {"float32": lambda: x.astype("<f4"), "float16": lambda: x.astype("<f2"),
            "bfloat16": lambda: bf16_bits(x)}[dtype]()


def as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_local(tmp_path, dtype, codec):
    spec = make_spec(dtype, codec)
    acts = make_acts(spec)
    url = str(tmp_path / "s")
    write_all(url, spec, acts)
    with ActivationStore(url) as store:
        for name, x in acts.items():
            want = as_float(expected_plain(x, dtype), dtype)
            got = store.read(name)
            assert got.dtype == {"float32": torch.float32, "float16": torch.float16,
                                 "bfloat16": torch.bfloat16}[dtype]
            np.testing.assert_array_equal(got.float().numpy(), want)
            # ranges across chunk and shard boundaries, and single chunks, agree with the whole read
            for a, b in [(0, 1), (3, 21), (15, 17), (30, 45), (44, 45), (7, 7)]:
                np.testing.assert_array_equal(store.read(name, a, b).float().numpy(), want[a:b])
            for i in range(spec.n_chunks):
                a, b = spec.chunk_range(i)
                np.testing.assert_array_equal(store.read_chunk(name, i).float().numpy(), want[a:b])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", ["none", "blosc-lz4"])
def test_round_trip_s3(s3, s3_url, dtype, codec):
    spec = make_spec(dtype, codec, n=20)
    acts = make_acts(spec, seed=3)
    write_all(s3_url, spec, acts, s3.storage_options)
    with ActivationStore(s3_url, s3.storage_options) as store:
        for name, x in acts.items():
            want = as_float(expected_plain(x, dtype), dtype)
            np.testing.assert_array_equal(store.read(name).float().numpy(), want)
            np.testing.assert_array_equal(store.read(name, 5, 18).float().numpy(), want[5:18])
        assert store.images().num_rows == 20
    # plain zarr over S3 sees the same bits
    group = zarr.open_group(s3_url, mode="r", storage_options=s3.storage_options)
    np.testing.assert_array_equal(group["layers/4/acts"][:], expected_plain(acts["4"], dtype))
    assert verify_store(s3_url, s3.storage_options, progress=False).ok


@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_zarr_reads_the_same_values(tmp_path, dtype):
    spec = make_spec(dtype, "zstd")
    acts = make_acts(spec, seed=7)
    url = str(tmp_path / "s")
    write_all(url, spec, acts)
    group = zarr.open_group(url, mode="r")  # no project code from here on
    meta = group.attrs["actstore"]
    assert meta["format_version"] == 1 and meta["complete"] is True
    assert meta["storage_dtype"] == {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}[dtype]
    for name, x in acts.items():
        arr = group[f"layers/{name}/acts"]
        assert arr.shape == (N, 7, x.shape[-1])
        plain = arr[:]
        np.testing.assert_array_equal(plain, expected_plain(x, dtype))
        # statistics, read plainly, equal numpy's over the stored patch tokens
        patches = as_float(plain, dtype)[:, 1:].reshape(-1, x.shape[-1]).astype(np.float64)
        stats = group[f"layers/{name}/stats/patches"]
        assert stats.attrs["count"] == patches.shape[0]
        np.testing.assert_allclose(stats["mean"][:], patches.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats["var"][:], patches.var(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.attrs["mean_sq_norm"], (patches**2).sum(1).mean(), rtol=1e-6)


def test_rejected_images_are_zeroed_and_excluded_from_stats(tmp_path):
    spec = make_spec("float32", "none")
    acts = make_acts(spec)
    status = np.array(["ok"] * N, dtype=object)
    status[[0, 5, 16, 44]] = "rejected"
    reason = np.where(status == "ok", "", "truncated")
    images = {"uri": [f"img{i}.png" for i in range(N)], "label": list(range(N)), "status": list(status),
              "reason": list(reason)}
    url = str(tmp_path / "s")
    write_all(url, spec, acts, images=images)
    with ActivationStore(url) as store:
        table = store.images()
        assert table.column("index").to_pylist() == list(range(N))
        assert table.column("status").to_pylist() == list(status)
        assert store.attrs["summary"]["n_rejected"] == 4
        got = store.read("4").numpy()
        ok = status == "ok"
        assert not got[~ok].any()
        np.testing.assert_array_equal(got[ok], acts["4"][ok])
        st = store.stats("4", "cls")
        cls = acts["4"][ok][:, 0].astype(np.float64)
        assert st.count == ok.sum()
        np.testing.assert_allclose(st.mean, cls.mean(0), rtol=1e-9, atol=1e-9)
        all_ = store.stats("4", "all")
        tokens = acts["4"][ok].reshape(-1, D).astype(np.float64)
        np.testing.assert_allclose(all_.var, tokens.var(0), rtol=1e-7, atol=1e-9)


def test_a_unit_of_only_rejected_images_verifies_reads_and_loads(tmp_path):
    """zarr skips chunks equal to the fill value: the writer must still leave the unit's shard."""
    from actstore.loader import PatchLoader

    spec = make_spec("float16", "blosc-lz4", labels=True)
    acts = make_acts(spec)
    status = np.array(["ok"] * 16 + ["rejected"] * 16 + ["ok"] * 3 + ["rejected"] * 10, dtype=object)
    images = {"uri": [f"img{i}.png" for i in range(N)], "label": [0] * N, "status": list(status),
              "reason": ["" if s == "ok" else "bad" for s in status]}
    labels = np.zeros((N, GRID[0] * GRID[1]), np.int32)  # all fill value too
    url = str(tmp_path / "s")
    write_all(url, spec, acts, images=images, labels=labels)
    report = verify_store(url, progress=False)
    assert report.ok, report.problems
    ok = status == "ok"
    with ActivationStore(url) as store:
        got = store.read("5").numpy()
        assert not got[~ok].any()
        np.testing.assert_array_equal(got[ok], acts["5"][ok].astype(np.float16))
        assert store.images().column("status").to_pylist() == list(status)
    with PatchLoader(url, "5", batch_size=6, tokens="all", drop_last=False) as loader:
        rows = torch.cat(list(loader))
    want = acts["5"][ok].astype(np.float16).astype(np.float32).reshape(-1, D + 8)
    assert rows.shape == want.shape
    np.testing.assert_array_equal(np.sort(rows.numpy(), axis=0), np.sort(want, axis=0))


def test_labels_round_trip(tmp_path):
    spec = make_spec(labels=True)
    labels = np.random.default_rng(0).integers(0, 5, (N, GRID[0] * GRID[1])).astype(np.int32)
    url = str(tmp_path / "s")
    write_all(url, spec, make_acts(spec), labels=labels)
    with ActivationStore(url) as store:
        np.testing.assert_array_equal(store.labels(), labels)
        np.testing.assert_array_equal(store.labels(10, 20), labels[10:20])
    assert verify_store(url, progress=False).ok


def _object_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rewriting_a_unit_gives_identical_bytes(tmp_path):
    spec = make_spec("bfloat16", "blosc-lz4")
    acts = make_acts(spec)
    url = tmp_path / "s"
    write_all(str(url), spec, acts)
    before = _object_bytes(url)
    w = StoreWriter(str(url))
    a, b = spec.unit_range(1)
    w.write_unit(1, {name: x[a:b] for name, x in acts.items()})
    w.finalize()
    after = _object_bytes(url)
    assert after.keys() == before.keys()
    assert [k for k in before if before[k] != after[k]] == []
    # and a second, independent store from the same input is byte-identical too
    other = tmp_path / "t"
    write_all(str(other), spec, acts)
    assert _object_bytes(other) == before


def _write_units_in_process(url: str, units: list[int], seed: int) -> None:
    w = StoreWriter(url)
    acts = make_acts(w.spec, seed)
    for k in units:
        a, b = w.spec.unit_range(k)
        w.write_unit(k, {name: x[a:b] for name, x in acts.items()})


def test_units_written_concurrently_by_processes(tmp_path):
    spec = make_spec("float16", "zstd", n=150)  # 10 units
    url = str(tmp_path / "s")
    StoreWriter.create(url, spec)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_units_in_process, args=(url, list(range(i, spec.n_units, 3)), 11))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    StoreWriter(url).finalize()
    reference = str(tmp_path / "ref")
    write_all(reference, spec, make_acts(spec, 11))
    assert _object_bytes(Path(url)) == _object_bytes(Path(reference))


def test_units_written_concurrently_by_ray_tasks(ray_local, s3, s3_url):
    spec = make_spec("bfloat16", "blosc-lz4", n=80)  # 5 units, each written by its own task
    opts = s3.storage_options
    StoreWriter.create(s3_url, spec, opts)
    writer = StoreWriter(s3_url, opts)  # pickled into every task

    @ray_local.remote
    def write(k: int) -> int:  # only package code inside: workers cannot import this test module
        acts = {l.name: vit_like_activations(spec.n_images, l.tokens.n_tokens, l.d, seed=5 + i, heavy_scale=20)
                for i, l in enumerate(writer.spec.layers)}
        a, b = writer.spec.unit_range(k)
        writer.write_unit(k, {name: x[a:b] for name, x in acts.items()})
        return k

    assert sorted(ray_local.get([write.remote(k) for k in range(spec.n_units)])) == list(range(spec.n_units))
    writer.finalize()
    acts = make_acts(spec, 5)
    with ActivationStore(s3_url, opts) as store:
        for name, x in acts.items():
            np.testing.assert_array_equal(store.read(name).view(torch.int16).numpy().view(np.uint16),
                                          bf16_bits(x))
    assert verify_store(s3_url, opts, progress=False).ok


def _chunk_offset(shard_file: Path, inner: int, chunks_per_shard: int) -> tuple[int, int]:
    raw = shard_file.read_bytes()
    index = np.frombuffer(raw[-(chunks_per_shard * 16 + 4):-4], "<u8").reshape(-1, 2)
    return int(index[inner, 0]), int(index[inner, 1])


def test_corrupted_chunk_is_named_and_never_returned(tmp_path, capsys):
    spec = make_spec("float16", "blosc-lz4")
    url = tmp_path / "s"
    write_all(str(url), spec, make_acts(spec))
    shard = url / "layers/5/acts/c/1/0/0"  # shard 1 = images 16..31, inner chunk 2 = images 24..27
    off, nbytes = _chunk_offset(shard, 2, spec.chunks_per_shard)
    raw = bytearray(shard.read_bytes())
    raw[off + nbytes // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    report = verify_store(str(url), progress=False)
    assert not report.ok
    assert len(report.problems) == 1
    assert "layers/5/acts/c/1/0/0 inner chunk 2" in report.problems[0]
    assert "images 24-27" in report.problems[0]

    with ActivationStore(str(url)) as store:
        with pytest.raises(CorruptDataError, match="layers/5/acts/c/1/0/0 inner chunk 2") as e:
            store.read("5")
        assert e.value.key == "layers/5/acts/c/1/0/0 inner chunk 2 (layer 5, images 24-27)"
        store.read("5", 0, 24)  # the good chunks still read
        store.read("4")         # and the other layer is untouched
    with pytest.raises(ValueError, match="checksum"):  # plain zarr refuses it too
        zarr.open_group(str(url), mode="r")["layers/5/acts"][24:28]

    assert main(["verify", "-q", str(url)]) == 1
    assert "BAD  layers/5/acts/c/1/0/0 inner chunk 2" in capsys.readouterr().out


def test_corrupted_shard_index_and_swapped_shards_are_named(tmp_path):
    spec = make_spec("float32", "none")
    url = tmp_path / "s"
    write_all(str(url), spec, make_acts(spec))
    # a shard copied over another decodes fine but is not the unit's data
    (url / "layers/4/acts/c/2/0/0").write_bytes((url / "layers/4/acts/c/0/0/0").read_bytes())
    shard = url / "layers/5/acts/c/0/0/0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0x01
    shard.write_bytes(bytes(raw))
    problems = verify_store(str(url), progress=False).problems
    assert any("layers/5/acts/c/0/0/0 (shard index)" in p for p in problems)
    assert any(p.startswith("unit 2, layer 4: values differ") for p in problems)


def test_incomplete_store_is_refused(tmp_path):
    spec = make_spec()
    acts = make_acts(spec)
    url = str(tmp_path / "s")
    w = StoreWriter.create(url, spec)
    for k in (0, 2):
        a, b = spec.unit_range(k)
        w.write_unit(k, {name: x[a:b] for name, x in acts.items()})
    with pytest.raises(IncompleteStoreError, match="2 of 3 units done"):
        ActivationStore(url)
    with pytest.raises(IncompleteStoreError, match=r"1 of 3 units missing \(1\)"):
        w.finalize()
    with ActivationStore(url, allow_partial=True) as store:
        assert store.units_done() == [0, 2]
        assert store.read("4", 32, 45).shape == (13, 7, D)
        with pytest.raises(IncompleteStoreError, match="unit 1 not written"):
            store.read("4", 10, 20)
        with pytest.raises(IncompleteStoreError, match="finalized"):
            store.stats("4")
    problems = verify_store(url, progress=False).problems
    assert any("not finalized" in p for p in problems) and any(p.startswith("unit 1: no record") for p in problems)
    # resuming: create() with the same spec reopens; the missing unit finishes the store
    w = StoreWriter.create(url, spec)
    assert w.units_done() == {0, 2}
    a, b = spec.unit_range(1)
    w.write_unit(1, {name: x[a:b] for name, x in acts.items()})
    w.finalize()
    assert ActivationStore(url).complete


def test_paths_that_are_not_stores(tmp_path):
    with pytest.raises(StoreNotFoundError, match="nothing there"):
        ActivationStore(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="no zarr group"):
        ActivationStore(str(tmp_path / "empty"))
    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(StoreNotFoundError, match="not an activation store"):
        ActivationStore(str(tmp_path / "plain"))
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="is not an activation store; refusing to replace it"):
        StoreWriter.create(str(tmp_path / "user"), make_spec())
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"


def test_other_format_version_and_other_spec(tmp_path):
    spec = make_spec()
    url = str(tmp_path / "s")
    write_all(url, spec, make_acts(spec))
    with pytest.raises(StoreFormatError, match="different spec"):
        StoreWriter.create(url, make_spec(dtype="bfloat16"))
    meta = json.loads((tmp_path / "s" / "zarr.json").read_text())
    meta["attributes"]["actstore"]["format_version"] = 2
    (tmp_path / "s" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="format version 2; this actstore reads version 1"):
        ActivationStore(url)


def test_file_url_is_the_local_path(tmp_path):
    spec = make_spec()
    acts = make_acts(spec)
    write_all(f"file://{tmp_path}/s", spec, acts)
    with ActivationStore(str(tmp_path / "s")) as store:
        np.testing.assert_array_equal(store.read("4").float().numpy(), acts["4"].astype(np.float16).astype(np.float32))


def test_float16_overflow_and_non_finite_are_errors(tmp_path):
    spec = make_spec("float16")
    acts = make_acts(spec)
    acts["5"][3, 2, 1] = -70000.0
    w = StoreWriter.create(str(tmp_path / "s"), spec)
    with pytest.raises(DtypeOverflowError, match=r"layer 5, images 0-15: largest \|value\| 70000 overflows float16"):
        w.write_unit(0, {name: x[:16] for name, x in acts.items()})
    acts["5"][3, 2, 1] = np.nan
    w = StoreWriter.create(str(tmp_path / "b"), make_spec("bfloat16"))
    with pytest.raises(DtypeOverflowError, match="layer 5, images 0-15: activations contain NaN"):
        w.write_unit(0, {name: x[:16] for name, x in acts.items()})
    assert w.units_done() == set()


def test_spec_validation():
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        make_spec(dtype="int8")
    with pytest.raises(ConfigError, match="unknown codec"):
        make_spec(codec="gzip")
    with pytest.raises(ConfigError, match="must divide"):
        StoreSpec(n_images=10, layers=(LayerSpec("0", 8),), images_per_shard=10, images_per_chunk=4)
    # auto chunking aims at ~8 MB chunks: 197 x 768 float16 = 302,592 B/image -> 16 images (4.8 MB) divides 256
    auto = StoreSpec(n_images=1000, layers=(LayerSpec("10", 768, TokenLayout(True, (14, 14)), 10),),
                     backbone={"n_blocks": 12})
    assert auto.images_per_chunk == 16 and 4 << 20 <= 16 * 197 * 768 * 2 <= 16 << 20
    assert auto.layer(-2).name == "10" and auto.layer(10).name == "10" and auto.layer("10").name == "10"
    with pytest.raises(ConfigError, match="not in the store"):
        auto.layer(-1)


def test_cli_info_and_errors(tmp_path, capsys):
    """info and verify in this process (each run of the installed script imports torch: seconds); the script
    itself once, for its exit status and its one-line error."""
    spec = make_spec()
    url = str(tmp_path / "s")
    write_all(url, spec, make_acts(spec))
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert "complete (3/3 units done)" in out
    assert "45 x 7 x 32" in out and "float16, blosc-lz4, 4 images/chunk, 16 images/shard" in out
    assert main(["info", "--json", url]) == 0
    info = json.loads(capsys.readouterr().out)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "s").rglob("*") if f.is_file())
    assert info["bytes_stored"] == on_disk
    assert info["bytes_logical"] == N * 7 * (D + D + 8) * 2
    bad = subprocess.run([ACTSTORE, "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
    assert main(["verify", "-q", url]) == 0
    assert capsys.readouterr().out.startswith("OK: 3/3 units")
