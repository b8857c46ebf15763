"""Shared fixtures: one local Ray instance and one moto S3 server per test session."""

from __future__ import annotations

import re
import uuid
from functools import cache
from pathlib import Path

import pytest

from actstore.testing.s3 import MotoS3


# pytest-xdist (`make test`: -n 2 --dist loadfile --no-loadscope-reorder) ---------------------------------

GROUPS = {"steering": re.compile(r"\b(steer_setup|steer_url)\b"),
          "generation": re.compile(r"\b(generation_index|generation_url)\b"),
          "service": re.compile(r"\b(service_store|index_dir|atlas_index_dir|compare_dir|api_url|api_url_token|"
                                r"compare_url)\b")}
"""Files on these session fixtures (found in their source) run on one worker, so that each is built once."""
LONG_FIRST = ("test_cluster.py", "service", "test_sae_train.py", "steering", "test_pipeline_cli.py")
"""Groups of minutes, handed out first: started last, one would keep its worker busy while the other idles."""


@cache
def _group(path: Path) -> str:
    """A test file's group, which one worker runs: the first of GROUPS whose fixtures its source names (xdist's
    controller sees test ids only), so they are built once; else the file, so that its module fixtures are."""
    text = path.read_text()
    return next((name for name, fixtures in GROUPS.items() if fixtures.search(text)), path.name)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """--dist loadfile, with each group's files as one file. (--dist loadgroup cannot do it: xdist 3.8 renames
    grouped tests through an attribute that pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServiceAsOneFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(config.rootpath / nodeid.split("::", 1)[0])

    return ServiceAsOneFile(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker: one torch CPU thread per worker, as many as `make test` has cores per worker. Two
    workers with a thread team each as wide as the machine stall each other (a tiny pipeline's 2 steps: 3.5 s
    against 0.06 s with one thread, measured on a busy 2-core machine)."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        import os

        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the long groups first (the controller hands groups out in this order)."""
    if hasattr(config, "workerinput"):
        rank = {group: i for i, group in enumerate(LONG_FIRST)}
        items.sort(key=lambda item: rank.get(_group(item.path), len(LONG_FIRST)))


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (OS-assigned port), a separate process, real HTTP."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_url(s3):
    """A fresh s3:// prefix per test."""
    return s3.url(f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (num_cpus=2), started once and shared by every test that asks."""
    import ray

    from actstore.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# the feature service: real images -> Ray extraction -> SAE -> index -> uvicorn --------------------

SERVICE_IMAGES, SERVICE_D_SAE, SERVICE_K = 48, 256, 8
SERVICE_TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def service_store(ray_local, tmp_path_factory):
    """48 generated shape images through a random-weight timm ViT-Tiny (layer -2), and their folder."""
    from actstore.extract import ExtractConfig, run_extract
    from actstore.testing.shapes import generate_dataset

    root = tmp_path_factory.mktemp("service")
    generate_dataset(str(root / "images"), SERVICE_IMAGES, seed=3, image_size=64)
    run_extract(ExtractConfig(images=str(root / "images"), model="timm:vit_tiny_patch16_224", out=str(root / "store"),
                              batch_size=16, images_per_shard=16), progress=False)
    return root


@pytest.fixture(scope="session")
def index_dir(service_store):
    """A feature index of a random TopK SAE (d_sae 256, k 8) behind the store's patch normalization."""
    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from sae import checkpoint
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder
    from services.index import IndexConfig, build_index

    store = ActivationStore(str(service_store / "store"))
    norm = Normalization.from_stats(store.stats("10", "patches"), "10", "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=store.layer("10").d, d_sae=SERVICE_D_SAE, kind="topk", k=SERVICE_K))
    checkpoint.save(sae, str(service_store / "sae"), normalization=norm, extra=checkpoint.origin(store, "10"))
    return build_index(IndexConfig(str(service_store / "store"), str(service_store / "sae"),
                                   str(service_store / "index"), k=8), progress=False)


def _serve(app):
    """uvicorn on 127.0.0.1, OS-assigned port, in a thread; yields the base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="session")
def api_url(index_dir):
    """Base URL of the service over index_dir, no token."""
    from services.api import create_app

    yield from _serve(create_app(index_dir))


@pytest.fixture(scope="session")
def api_url_token(index_dir):
    """(base URL, token) of the service over index_dir with a bearer token."""
    from services.api import create_app

    for url in _serve(create_app(index_dir, token=SERVICE_TOKEN)):
        yield url, SERVICE_TOKEN


# the atlas and a comparison: a second, smaller SAE over the same store ----------------------------

OTHER_D_SAE, OTHER_TWINS = 64, (5, 6, 7)
"""The second SAE's width; its decoder rows 5-7 are near-copies of row 4 (the atlas must keep them together)."""


@pytest.fixture(scope="session")
def atlas_index_dir(service_store):
    """A feature index of a second random TopK SAE (d_sae 64, k 4, another seed) over the same store, with its
    atlas (`actstore atlas`: the session's one UMAP from scratch)."""
    import torch

    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from sae import checkpoint
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder
    from services.index import IndexConfig, build_index
    from services.index.atlas import AtlasConfig, build_atlas

    store = ActivationStore(str(service_store / "store"))
    norm = Normalization.from_stats(store.stats("10", "patches"), "10", "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=store.layer("10").d, d_sae=OTHER_D_SAE, kind="topk", k=4, init_seed=1))
    with torch.no_grad():
        noise = torch.randn((len(OTHER_TWINS), sae.cfg.d_in), generator=torch.Generator().manual_seed(0))
        sae.W_dec[list(OTHER_TWINS)] = sae.W_dec[4] + 0.02 * noise / noise.norm(dim=1, keepdim=True)
        sae.set_decoder_norm_to_unit()
    checkpoint.save(sae, str(service_store / "sae-b"), normalization=norm, extra=checkpoint.origin(store, "10"))
    index = build_index(IndexConfig(str(service_store / "store"), str(service_store / "sae-b"),
                                    str(service_store / "index-b"), k=8), progress=False)
    build_atlas(AtlasConfig(str(index)), progress=False)
    return index


@pytest.fixture(scope="session")
def compare_dir(index_dir, atlas_index_dir, tmp_path_factory):
    """`actstore compare` of the two SAEs' indexes (A: index_dir, B: atlas_index_dir), by their activations."""
    from services.compare import CompareConfig, run_compare

    out = tmp_path_factory.mktemp("compare") / "ab"
    run_compare(CompareConfig(a=str(index_dir), b=str(atlas_index_dir), out=str(out), k=8, min_images=2),
                progress=False)
    return out


@pytest.fixture(scope="session")
def compare_url(atlas_index_dir, compare_dir):
    """Base URL of the service over atlas_index_dir (side B) with the comparison: the other SAE is index_dir's."""
    from services.api import create_app

    yield from _serve(create_app(atlas_index_dir, compare=compare_dir))


# steering: shapes with masks -> open_clip ViT-S/32 layers 10 and 11 -> a trained SAE on 10, probes on 11 -------

@pytest.fixture(scope="session")
def steer_setup(ray_local, tmp_path_factory):
    """96 generated shapes (with masks, seed 5, 64 px) through a random-weight open_clip ViT-S/32 (its text tower makes
    zero-shot work offline; a 7 x 7 grid) at layers 10 and 11, a TopK SAE (d_sae 512, k 8) on 10, and on 11 a
    segmentation probe and a colour probe on the mean of the patches (which patch edits reach through the residual
    stream; a CLS probe sees them only through one attention block) (services.steer.setup)."""
    from actstore.testing.shapes import generate_dataset
    from services.steer.setup import build_steering

    root = tmp_path_factory.mktemp("steer")
    generate_dataset(str(root / "images"), 96, seed=5, image_size=64, masks=str(root / "masks"))
    s = build_steering(root, str(root / "images"), str(root / "masks"),
                       probes={"color": {"labels": str(root / "images" / "factors.parquet"), "label_column": "color",
                                         "pool": "mean"}})
    return {"root": root, "store": s.store, "sae": s.sae, "index": s.index, "seg": s.seg, "color": s.probes["color"]}


@pytest.fixture(scope="session")
def steer_url(steer_setup):
    """The service over steer_setup's index, steering through the segmentation and colour probes and zero-shot
    over the shape names (heads "probe:seg", "probe:color", "zeroshot")."""
    from services.api import create_app

    heads = (f"probe:{steer_setup['seg']}", f"probe:{steer_setup['color']}", "zeroshot")
    yield from _serve(create_app(steer_setup["index"], steer_heads=heads))


# generation: a tiny random Stable unCLIP pipeline -> a store of its image encoder -> a random SAE, its index ---------

GENERATION_TIMEOUT_S = 10.0
"""The generation service's --steer-timeout: a tiny request (a few steps at 32-64 px) takes well under a second on one
thread, 200 steps at 128 px more than a minute."""


@pytest.fixture(scope="session")
def generation_index(ray_local, tmp_path_factory):
    """(Generation, index folder): 6 generated shapes (64 px) through a tiny random Stable unCLIP pipeline's image
    encoder, a random TopK SAE (d_sae 64, k 4) on its first layer (tests/generation_setup.py), the SAE's index."""
    from generation_setup import build_generation
    from services.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("generation")
    g = build_generation(root, "unclip")
    return g, build_index(IndexConfig(g.store, g.sae, str(root / "index"), k=4), progress=False)


@pytest.fixture(scope="session")
def generation_url(generation_index, tmp_path_factory):
    """`actstore serve --steer generate:PIPELINE` over that index in a process of its own (one worker, one steering
    slot, one torch thread, a GENERATION_TIMEOUT_S bound), its model loaded; the base URL. Its log:
    <tmp>/generation-serve*/serve.log."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import requests

    g, index = generation_index
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("generation-serve") / "serve.log"
    cmd = [sys.executable, "-m", "actstore_cli", "serve", "--index", str(index), "--port", str(port), "--workers", "1",
           "--steer", f"generate:{g.pipeline}", "--steer-slots", "1", "--steer-threads", "1",
           "--steer-timeout", str(GENERATION_TIMEOUT_S)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "ACTSTORE_TOKEN": ""})
    try:
        deadline = time.monotonic() + 180
        while True:  # up, then the model loaded (the first GET starts the load, which may outlast the bound)
            assert server.poll() is None, f"actstore serve exited ({server.returncode}): {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"the generation service never got ready: {log.read_text()[-2000:]}"
            try:
                if requests.get(f"{url}/steer/heads", timeout=60).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
