"""The patch loader: exactly-once delivery, determinism, ranks, resume, values, errors (local and S3).

Every expectation is computed independently of the loader: from the arrays and tables the test
wrote, or from plain zarr reads and numpy.
"""

from __future__ import annotations

import gc
import json
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.errors import ConfigError, CorruptDataError, IncompleteStoreError
from actstore.loader import LoaderConfig, Normalization, PatchLoader
from actstore.store import LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.synthetic import vit_like_activations

N, GRID, D = 61, (2, 3), 24  # 7 tokens per image; 16 chunks of 4 images, the last one partial
IPC, IPS = 4, 16
T = 1 + GRID[0] * GRID[1]
REJECTED = [0, 5, 6, 17, 40, 41, 42, 43]  # images 40-43 are one whole chunk
B = 20
SMALL = 60 * D * 2  # a 60-row buffer: fill, steady state and drain all happen in an epoch


def write_store(url, dtype="bfloat16", codec="blosc-lz4", n=N, rejected=REJECTED, labels=False, seed=0,
                storage_options=None):
    """Write a one-layer store; returns (acts float32 as written, ok mask, labels or None)."""
    spec = StoreSpec(n_images=n, layers=(LayerSpec("4", D, TokenLayout(cls=True, grid=GRID), index=4),),
                     dtype=dtype, codec=codec, images_per_shard=IPS, images_per_chunk=IPC,
                     backbone={"family": "test", "name": "tiny", "n_blocks": 6},
                     dataset={"source": "test", "fingerprint": f"loader-{seed}"}, has_labels=labels)
    acts = vit_like_activations(n, T, D, seed=seed, heavy_scale=20)
    ok = np.ones(n, bool)
    ok[[r for r in rejected if r < n]] = False
    lab = np.random.default_rng(seed).integers(0, 4, (n, T - 1)).astype(np.int32) if labels else None
    w = StoreWriter.create(url, spec, storage_options)
    for k in range(spec.n_units):
        a, b = spec.unit_range(k)
        status = ["ok" if v else "rejected" for v in ok[a:b]]
        w.write_unit(k, {"4": acts[a:b]}, images={"status": status, "reason": ["" if v else "bad" for v in ok[a:b]]},
                     labels=None if lab is None else lab[a:b])
    w.finalize()
    return acts, ok, lab


def plain_values(url, storage_options=None) -> np.ndarray:
    """The layer as float32, read with plain zarr and numpy only."""
    group = zarr.open_group(url, mode="r", storage_options=storage_options)
    stored = group["layers/4/acts"][:]
    if group.attrs["actstore"]["dtype"] == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def expected_rows(ok, tokens="patches") -> set[tuple[int, int]]:
    tok = {"patches": range(1, T), "cls": range(0, 1), "all": range(0, T)}[tokens]
    return {(i, t) for i in np.flatnonzero(ok) for t in tok}


def collect(loader, limit=None, epochs=None):
    """[(x, image_idx, token_idx)] as numpy, for a loader with return_indices=True; `epochs` gets
    each batch's epoch (from the loader's position after it)."""
    out = []
    if limit == 0:
        return out
    for x, img, tok in loader:
        out.append((x.numpy().copy(), img.numpy(), tok.numpy()))
        if epochs is not None:
            epochs.append(loader.state_dict()["epoch"])
        if len(out) == limit:
            break
    return out


def rows_of(batches) -> list[tuple[int, int]]:
    return [(int(i), int(t)) for _, img, tok in batches for i, t in zip(img, tok)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "s")
    acts, ok, _ = write_store(url)
    return url, ok, plain_values(url)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("loader") / "l")
    _, ok, lab = write_store(url, labels=True, seed=3)
    return url, ok, lab, plain_values(url)


def make(url, **kw) -> PatchLoader:
    kw = {"batch_size": B, "buffer_bytes": SMALL, "return_indices": True, **kw}
    return PatchLoader(url, kw.pop("layer", 4), **kw)


@pytest.mark.parametrize("tokens", ["patches", "cls", "all"])
def test_every_selected_row_exactly_once_with_its_values(store, tokens):
    url, ok, values = store
    with make(url, tokens=tokens) as loader:
        batches = collect(loader)
        assert len(loader) == len(batches) and loader.n_patches == len(expected_rows(ok, tokens))
    rows = rows_of(batches)
    assert len(rows) == len(set(rows))
    assert set(rows) == expected_rows(ok, tokens)
    assert all(len(b[0]) == B for b in batches[:-1]) and 0 < len(batches[-1][0]) <= B
    for x, img, tok in batches:
        assert x.dtype == np.float32 and x.shape[1] == D
        np.testing.assert_array_equal(x, values[img, tok])


def test_the_buffer_shuffles_across_chunks(store):
    url, ok, _ = store
    with make(url) as loader:
        first = collect(loader, limit=1)[0]
    # 20 rows drawn from a 60-row buffer of ~10 images: several images, not one chunk's run of rows
    assert len(set(first[1].tolist())) >= 5
    assert sorted(set(first[1] // IPC)) != [first[1][0] // IPC]


def reference_stream(ok, capacity, seed=0, epoch=0, tokens=range(1, T)) -> list[list[tuple[int, int]]]:
    """The loader's batches the slow, obvious way: Python lists of (image, token), one row at a time.

    Chunks enter in the epoch's order while they fit; each batch is rng.choice over the whole buffer;
    drawn rows leave and the survivors of the buffer's last k places fill the holes, in order.
    """
    from actstore.loader._order import _DRAWS, _ORDER

    n_chunks = -(-N // IPC)
    pending = [[(i, t) for i in range(c * IPC, min((c + 1) * IPC, N)) if ok[i] for t in tokens]
               for c in np.random.default_rng([_ORDER, seed, epoch]).permutation(n_chunks)]
    rng = np.random.default_rng([_DRAWS, seed, epoch, 0])
    live: list[tuple[int, int]] = []
    batches = []
    while True:
        while pending and len(live) + len(pending[0]) <= capacity:
            live += pending.pop(0)
        k = min(B, len(live))
        if k == 0:
            return batches
        pos = [int(p) for p in rng.choice(len(live), k, replace=False)]
        batches.append([live[p] for p in pos])
        rest = len(live) - k
        holes = [p for p in pos if p < rest]
        survivors = [live[p] for p in range(rest, len(live)) if p not in set(pos)]
        for hole, row in zip(holes, survivors):
            live[hole] = row
        del live[rest:]


def test_matches_the_slow_obvious_twin(store):
    url, ok, values = store
    for capacity, seed in [(60, 0), (47, 3), (1000, 1)]:  # steady state, the smallest buffer, all rows at once
        with make(url, buffer_bytes=capacity * D * 2, seed=seed) as loader:
            assert loader.capacity == min(capacity, len(expected_rows(ok)))
            got = collect(loader)
        want = reference_stream(ok, capacity, seed)
        assert [list(zip(img.tolist(), tok.tolist())) for _, img, tok in got] == want
        for x, img, tok in got:
            np.testing.assert_array_equal(x, values[img, tok])


def test_same_seed_same_batches_other_seed_other_batches(store):
    url, _, _ = store
    runs = []
    for seed in (7, 7, 8):
        with make(url, seed=seed, concurrency=1 + seed % 2 * 5, decode_threads=1 + seed % 2) as loader:
            runs.append(collect(loader))
    config = LoaderConfig(layer=4, batch_size=B, buffer_bytes=SMALL, return_indices=True, seed=7)
    with PatchLoader.from_config(url, LoaderConfig(**json.loads(json.dumps(asdict(config))))) as loader:
        runs.append(collect(loader))  # a config saved as JSON reproduces the stream
    a, b, c, d = runs
    assert rows_of(d) == rows_of(a)
    assert len(a) == len(b)
    for (xa, ia, ta), (xb, ib, tb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(xa, xb)
    assert rows_of(a) != rows_of(c) and set(rows_of(a)) == set(rows_of(c))


def test_epochs_are_each_exactly_once_in_new_orders(store):
    url, ok, _ = store
    with make(url, epochs=3) as loader:
        batches = collect(loader)
        assert len(loader) == len(batches)
    per_epoch = len(batches) // 3
    epochs = [rows_of(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    for rows in epochs:
        assert len(rows) == len(set(rows)) and set(rows) == expected_rows(ok)
    assert epochs[0] != epochs[1] != epochs[2]


def test_ranks_are_disjoint_and_cover_the_store(store):
    url, ok, _ = store
    per_rank = []
    for rank in range(3):
        with make(url, rank=rank, world_size=3, epochs=2) as loader:
            epochs: list[int] = []
            batches = collect(loader, epochs=epochs)
            assert len(loader) == len(batches) and loader.n_patches == len(rows_of(batches))
            per_rank.append((batches, epochs))
    for epoch in range(2):
        sets = []
        for batches, epochs in per_rank:
            part = rows_of([b for b, e in zip(batches, epochs) if e == epoch])
            assert len(part) == len(set(part))
            sets.append(set(part))
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sets[0] | sets[1] | sets[2] == expected_rows(ok)
        chunks = [{i // IPC for i, _ in s} for s in sets]
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 2  # 16 chunks: 6/5/5, one all rejected


def test_drop_last(store):
    url, ok, _ = store
    with make(url, drop_last=True, epochs=2) as loader:
        batches = collect(loader)
        assert len(loader) == len(batches)
    n = len(expected_rows(ok))
    assert all(len(b[0]) == B for b in batches)
    assert len(batches) == 2 * (n // B)
    first = rows_of(batches[: n // B])
    assert len(first) == len(set(first)) and set(first) <= expected_rows(ok)


def test_normalization_against_numpy(store):
    url, ok, values = store
    with make(url, normalize=True, return_indices=False, buffer_bytes=1 << 20) as loader:
        x = torch.cat(list(loader)).double().numpy()
        norm = loader.normalization
    patches = values[ok][:, 1:].reshape(-1, D).astype(np.float64)
    mean = patches.mean(0)
    scale = np.sqrt(D / ((patches - mean) ** 2).sum(1).mean())
    np.testing.assert_allclose(norm.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    assert norm.scale == pytest.approx(scale, rel=1e-5)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    assert (x**2).sum(1).mean() == pytest.approx(D, rel=1e-4)
    # the transform round-trips through JSON and safetensors-style tensors, and undoes itself
    again = Normalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again.scale == norm.scale and torch.equal(again.mean, norm.mean)
    assert set(norm.state_dict()) == {"mean", "scale"}
    raw = torch.from_numpy(patches[:5].astype(np.float32))
    torch.testing.assert_close(norm.undo(norm.apply(raw)), raw, rtol=1e-5, atol=1e-4)
    with make(url, return_indices=False) as plain_loader:
        assert plain_loader.normalization is None


def test_normalization_of_cls_and_bfloat16_output(store):
    url, ok, values = store
    with make(url, tokens="cls", normalize=True, dtype=torch.bfloat16) as loader:
        batches = list(loader)
        norm = loader.normalization
    assert batches[0][0].dtype == torch.bfloat16
    cls = values[ok][:, 0].astype(np.float64)
    assert norm.tokens == "cls"
    np.testing.assert_allclose(norm.mean.numpy(), cls.mean(0), rtol=1e-5, atol=1e-5)
    for x, img, tok in batches:
        want = norm.apply(torch.from_numpy(values[img.numpy(), tok.numpy()])).to(torch.bfloat16)
        torch.testing.assert_close(x, want, rtol=0.01, atol=0.02)


def test_label_filter(labelled):
    url, ok, lab, values = labelled
    with make(url, label_filter=[1, 3]) as loader:
        batches = collect(loader)
        assert loader.n_patches == len(rows_of(batches)) and len(loader) == len(batches)
    rows = rows_of(batches)
    img, patch = np.nonzero(np.isin(lab, [1, 3]) & ok[:, None])
    assert len(rows) == len(set(rows))
    assert set(rows) == set(zip(img.tolist(), (patch + 1).tolist()))
    for x, i, t in batches:
        assert np.isin(lab[i, t - 1], [1, 3]).all()
        np.testing.assert_array_equal(x, values[i, t])
    with make(url, label_filter=2, return_indices=False) as loader:
        assert sum(len(x) for x in loader) == int((np.isin(lab, [2]) & ok[:, None]).sum())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_stored_dtypes_convert_like_the_store(tmp_path, dtype):
    from actstore.store import ActivationStore

    url = str(tmp_path / "s")
    write_store(url, dtype=dtype, codec="zstd" if dtype == "float16" else "none", n=30)
    with ActivationStore(url) as s:
        stored = s.read("4")
    for out in (torch.float32, getattr(torch, dtype)):
        with make(url, tokens="all", dtype=out, buffer_bytes=60 * D * 4) as loader:
            for x, img, tok in loader:
                assert x.dtype == out
                assert torch.equal(x, stored[img, tok].to(out))


def _corrupt(url: Path, shard: int, inner: int) -> None:
    f = url / f"layers/4/acts/c/{shard}/0/0"
    raw = bytearray(f.read_bytes())
    index = np.frombuffer(bytes(raw[-(IPS // IPC * 16 + 4):-4]), "<u8").reshape(-1, 2)
    off, nbytes = int(index[inner, 0]), int(index[inner, 1])
    raw[off + nbytes // 2] ^= 0xFF
    f.write_bytes(bytes(raw))


def test_corrupted_chunk_is_named_and_never_delivered(tmp_path):
    url = tmp_path / "s"
    write_store(str(url))
    _corrupt(url, 1, 2)  # chunk 6: images 24-27
    delivered = []
    with make(str(url), buffer_bytes=44 * D * 2) as loader:
        with pytest.raises(CorruptDataError, match=r"layers/4/acts/c/1/0/0 inner chunk 2 \(layer 4, images 24-27\)"):
            for x, img, tok in loader:
                delivered.append(img.numpy())
    assert delivered, "the bad chunk is not the first of the epoch with this seed"
    assert not any(((24 <= i) & (i <= 27)).any() for i in delivered)


def test_resume_gives_the_same_remaining_stream(store):
    url, _, _ = store
    with make(url, epochs=2) as loader:
        full = collect(loader)
    per_epoch = len(full) // 2
    for k in (1, 4, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch):
        with make(url, epochs=2) as first:
            head = collect(first, limit=k)
            state = json.loads(json.dumps(first.state_dict()))
        assert rows_of(head) == rows_of(full[:k])
        with make(url, epochs=2) as resumed:
            resumed.load_state_dict(state)
            rest = collect(resumed)
            assert resumed.stats.chunks_read <= 16 * 2
        assert len(rest) == len(full) - k
        for (xa, ia, ta), (xb, ib, tb) in zip(rest, full[k:]):
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(ta, tb)
            np.testing.assert_array_equal(xa, xb)


def test_resume_with_label_filter_and_a_break_in_the_loop(labelled):
    url, _, _, _ = labelled
    with make(url, label_filter=[0, 2], seed=4) as loader:
        full = collect(loader)
    with make(url, label_filter=[0, 2], seed=4) as loader:
        head = collect(loader, limit=3)
        rest = collect(loader)  # iterating again continues after the batches delivered
        state = loader.state_dict()
    assert rows_of(head + rest) == rows_of(full)
    assert state["epoch"] == 1 and state["batch"] == 0
    with make(url, label_filter=[0], seed=4) as other, pytest.raises(ConfigError, match="label_filter"):
        other.load_state_dict(state)
    with make(url, label_filter=[0, 2], seed=4, batch_size=7) as other, pytest.raises(ConfigError, match="batch_size"):
        other.load_state_dict(state)


def test_batches_kept_by_the_caller_stay_intact(store):
    url, _, values = store
    with make(url, buffer_bytes=200 * D * 2, prefetch=1) as loader:
        kept = list(loader)  # every tensor held: recycled memory must never be written under them
    for x, img, tok in kept:
        np.testing.assert_array_equal(x.numpy(), values[img.numpy(), tok.numpy()])
    with make(url, buffer_bytes=200 * D * 2, prefetch=1, batch_size=8, drop_last=True) as loader:
        slices, pointers = [], set()
        for x, img, tok in loader:  # only a slice of each batch kept: its memory is never reused under it
            slices.append((x[2:5], img[2:5], tok[2:5]))
        for x, img, tok in slices:
            np.testing.assert_array_equal(x.numpy(), values[img.numpy(), tok.numpy()])
        for x, _, _ in loader:  # batches dropped at once: a few arrays serve every batch
            pointers.add(x.data_ptr())
        assert len(loader) > 10 and len(pointers) <= 3


def test_stats_device_and_threads_are_released(store):
    url, ok, _ = store
    before = threading.active_count()
    with make(url, return_indices=False, device="cpu", pin_memory=True) as loader:
        n = sum(len(x) for x in loader)
        s = loader.stats
        assert s.patches == n == len(expected_rows(ok)) and s.batches == len(loader)
        assert s.chunks_read == 15 and s.bytes_read > 0 and s.patches_per_s > 0 and s.seconds > 0
        assert "patches/s" in str(s)
    del loader
    gc.collect()
    for t in threading.enumerate():
        if t.name.startswith("actstore-loader"):
            t.join(timeout=5)
    assert threading.active_count() <= before


def test_bad_arguments_are_config_errors(store, labelled, tmp_path):
    url, _, _ = store
    for kw, match in [({"batch_size": 0}, "batch_size"), ({"tokens": "registers"}, "tokens"),
                      ({"rank": 3, "world_size": 3}, "rank"), ({"world_size": 17}, "world_size"),
                      ({"label_filter": [1]}, "no(ne)?$|labels"), ({"buffer_bytes": 10 * D * 2}, "buffer_bytes"),
                      ({"dtype": torch.int32}, "dtype"), ({"epochs": 0}, "epochs"), ({"layer": 7}, "not in")]:
        with pytest.raises(ConfigError, match=match):
            make(url, **kw)
    with pytest.raises(ConfigError, match="tokens='patches'"):
        make(labelled[0], tokens="all", label_filter=[1])
    assert LoaderConfig(dtype=torch.bfloat16, label_filter=[2]).dtype == "bfloat16"
    spec = StoreSpec(n_images=20, layers=(LayerSpec("4", D, TokenLayout(cls=True, grid=GRID), index=4),),
                     images_per_shard=IPS, images_per_chunk=IPC)
    w = StoreWriter.create(str(tmp_path / "partial"), spec)
    w.write_unit(0, {"4": vit_like_activations(16, T, D)})
    with pytest.raises(IncompleteStoreError):
        make(str(tmp_path / "partial"))


def test_s3_exactly_once_and_deterministic(s3, s3_url):
    opts = s3.storage_options
    _, ok, _ = write_store(s3_url, n=40, rejected=[], storage_options=opts)  # no images table read
    values = plain_values(s3_url, opts)
    runs = []
    for _ in range(2):
        with make(s3_url, storage_options=opts, seed=5) as loader:
            runs.append(collect(loader))
    rows = rows_of(runs[0])
    assert len(rows) == len(set(rows)) and set(rows) == expected_rows(ok)
    assert rows == rows_of(runs[1])
    for (xa, ia, ta), (xb, _, _) in zip(*runs):
        np.testing.assert_array_equal(xa, values[ia, ta])
        np.testing.assert_array_equal(xa, xb)
