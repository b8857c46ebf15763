"""The pipeline over a faulty S3: extract -> train -> index through a proxy that fails 10% of the requests
(500, 503 SlowDown, connection resets, truncated bodies) gives the same store, checkpoint and index as the
same run without faults, and the loader the same batches. Run with -s to see the figures."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import torch

from actstore.testing.faults import FAULTS, FaultProxy

N_IMAGES, PER_SHARD = 32, 16
RATE = 0.1
LOADER_RATE = 0.2  # the loader makes few requests (one per chunk): a higher rate makes sure some fail
SAE_NAME = "sae"


def _pipeline(prefix: str, images: str, opts: dict, index_out) -> None:
    from actstore.extract import ExtractConfig, run_extract
    from sae.train import TrainConfig, train
    from services.index import IndexConfig, build_index

    run_extract(ExtractConfig(images=images, model="timm:vit_tiny_patch16_224", out=f"{prefix}/store", batch_size=16,
                              images_per_shard=PER_SHARD, storage_options=opts, image_storage_options=opts),
                progress=False)
    train(TrainConfig(store=f"{prefix}/store", out=f"{prefix}/train", layer=-2, batch_size=256, tokens=256 * 12,
                      sae=({"name": SAE_NAME, "kind": "topk", "k": 8, "d_sae": 256},), lr=1e-3, lr_warmup_steps=2,
                      sparsity_warmup_steps=2, log_every=4, checkpoint_every=6, buffer_bytes=1 << 21,
                      num_workers=1, storage_options=opts), progress=False)
    build_index(IndexConfig(f"{prefix}/store", f"{prefix}/train/{SAE_NAME}", str(index_out), k=8,
                            storage_options=opts), progress=False)


def _objects(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    root = fs._strip_protocol(root).rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_WALL_CLOCK = re.compile(r"(^|_)(seconds|time|per_s|per_second)$")


def _comparable(key: str, data: bytes, subs: list[tuple[str, str]]) -> object:
    """An object as compared: text with the faulty run's URLs renamed to the clean run's, and JSON (lines)
    without wall-clock figures (the metrics' tokens_per_s); anything else as its bytes."""
    if not key.endswith((".json", ".jsonl")):
        return data
    text = data.decode()
    for old, new in subs:
        text = text.replace(old, new)

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if not _WALL_CLOCK.search(k)}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return [strip(json.loads(line)) for line in text.splitlines() if line.strip()] if key.endswith(".jsonl") \
        else strip(json.loads(text))


def _differences(clean: dict[str, bytes], faulty: dict[str, bytes], subs: list[tuple[str, str]]) -> list[str]:
    """Keys whose content differs between the runs (see _comparable)."""
    assert sorted(clean) == sorted(faulty), sorted(set(clean) ^ set(faulty))
    return [k for k in clean
            if clean[k] != faulty[k] and _comparable(k, clean[k], subs) != _comparable(k, faulty[k], subs)]


def test_fault_proxy_faults_keep_alive_and_chunked_bodies(s3):
    """Each fault as a plain HTTP client sees it; a chunked PUT and keep-alive pass through unharmed."""
    import http.client

    def client(proxy):
        return http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1]), timeout=10)

    key = f"/{s3.bucket}/proxy-{uuid.uuid4().hex[:8]}"
    with FaultProxy(s3.storage_options, rate=0.0) as proxy:
        c = client(proxy)
        c.request("PUT", key, body=iter([b"hello ", b"world"]), encode_chunked=True,  # Transfer-Encoding: chunked
                  headers={"x-amz-acl": "public-read"})  # unsigned GETs below
        assert c.getresponse().read() == b"" and proxy.counts["forwarded"] == 1
        c.request("GET", key)  # the same connection (keep-alive)
        assert c.getresponse().read() == b"hello world"
    for kind, expect in [("500", "InternalError"), ("503", "SlowDown")]:
        with FaultProxy(s3.storage_options, rate=1.0, faults=[kind]) as proxy:
            c = client(proxy)
            c.request("GET", key)
            r = c.getresponse()
            assert r.status == int(kind) and f"<Code>{expect}</Code>" in r.read().decode()
            assert proxy.counts == {**proxy.counts, "requests": 1, "forwarded": 0, "failed": 1, kind: 1}
    with FaultProxy(s3.storage_options, rate=1.0, faults=["reset"]) as proxy:
        c = client(proxy)
        c.request("GET", key)
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            c.getresponse()
        assert proxy.counts["forwarded"] == 0 and proxy.counts["reset"] == 1
    with FaultProxy(s3.storage_options, rate=1.0, faults=["truncated"]) as proxy:
        c = client(proxy)
        c.request("GET", key)
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == "11"
        with pytest.raises(http.client.IncompleteRead):
            r.read()
        assert proxy.counts["forwarded"] == 1 and proxy.counts["truncated"] == 1


@pytest.fixture(scope="module")
def runs(s3, ray_local, tmp_path_factory):
    """Images on S3; the pipeline once straight to moto, once through a FaultProxy at RATE."""
    import s3fs

    from actstore.testing.shapes import generate_dataset

    tmp = tmp_path_factory.mktemp("faults")
    base = s3.url(f"faults-{uuid.uuid4().hex[:8]}")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    generate_dataset(str(tmp / "images"), N_IMAGES, seed=3, image_size=64)
    fs.put(str(tmp / "images"), f"{base}/images", recursive=True)
    clean_counter = FaultProxy(s3.storage_options, rate=0.0)  # a pass-through proxy only counts the requests
    with clean_counter:
        _pipeline(f"{base}/clean", f"{base}/images", clean_counter.storage_options, tmp / "index-clean")
    with FaultProxy(s3.storage_options, rate=RATE, seed=11) as proxy:
        _pipeline(f"{base}/faulty", f"{base}/images", proxy.storage_options, tmp / "index-faulty")
    yield {"fs": fs, "base": base, "tmp": tmp, "s3": s3, "clean": clean_counter.counts, "faulty": proxy.counts,
           "clean_endpoint": clean_counter.endpoint_url, "faulty_endpoint": proxy.endpoint_url}


def test_pipeline_through_faulty_s3_is_identical(runs):
    from actstore.store import ActivationStore

    fs, base, tmp = runs["fs"], runs["base"], runs["tmp"]
    clean, faulty = runs["clean"], runs["faulty"]
    for kind in FAULTS:
        assert faulty[kind] > 0, f"no {kind} fault injected: {faulty}"
    subs = [(f"{base}/faulty", f"{base}/clean"), (runs["faulty_endpoint"], runs["clean_endpoint"]),
            (str(tmp / "index-faulty"), str(tmp / "index-clean"))]

    # the store: every object, byte for byte (shards, unit records, tables, zarr metadata)
    store_diff = _differences(_objects(fs, f"{base}/clean/store"), _objects(fs, f"{base}/faulty/store"), subs)
    assert not store_diff, f"store objects differ: {store_diff}"
    opts = runs["s3"].storage_options
    with ActivationStore(f"{base}/clean/store", opts) as a, ActivationStore(f"{base}/faulty/store", opts) as b:
        assert a.complete and b.complete
        assert a.images().equals(b.images())
        for layer in a.layers:
            assert torch.equal(a.read(layer.name), b.read(layer.name))
        assert (a.images().column("status").to_pylist() == ["ok"] * N_IMAGES), "an image was lost to a fault"

    # training: weights, checkpoint state and metrics (all but the wall-clock figures)
    train_clean, train_faulty = _objects(fs, f"{base}/clean/train"), _objects(fs, f"{base}/faulty/train")
    assert train_clean[f"{SAE_NAME}/sae.safetensors"] == train_faulty[f"{SAE_NAME}/sae.safetensors"]
    train_diff = _differences(train_clean, train_faulty, subs)
    assert not train_diff, f"training outputs differ: {train_diff}"

    # the index: every file
    index_diff = _differences(_files(tmp / "index-clean"), _files(tmp / "index-faulty"), subs)
    assert not index_diff, f"index files differ: {index_diff}"

    failed = {k: faulty[k] for k in FAULTS}
    print(f"\n[s3 faults] pipeline: clean run {clean['requests']} requests; faulty run {faulty['requests']} requests, "
          f"{faulty['failed']} failed {failed}, ~{faulty['requests'] - clean['requests']} retries; "
          f"store, checkpoint and index identical")


def test_loader_through_faulty_s3_gives_the_same_stream(runs):
    from actstore.loader import PatchLoader

    store, opts = f"{runs['base']}/clean/store", runs["s3"].storage_options

    def stream(storage_options):
        with PatchLoader(store, -2, 500, seed=7, epochs=5, storage_options=storage_options, buffer_bytes=1 << 21,
                         concurrency=8) as loader:
            return [batch.clone() for batch in loader]  # clones: a loader may recycle its buffers

    direct = stream(opts)
    with FaultProxy(opts, rate=LOADER_RATE, seed=5) as proxy:
        proxied = stream(proxy.storage_options)
    counts = proxy.counts
    assert len(direct) == len(proxied) > 0
    assert all(torch.equal(a, b) for a, b in zip(direct, proxied))
    assert counts["failed"] > 0, counts
    print(f"\n[s3 faults] loader: {len(direct)} batches identical; {counts['requests']} requests, {counts['failed']} "
          f"failed {({k: counts[k] for k in FAULTS})}")
