"""A real multi-node run: deploy/local's two Ray nodes and S3 endpoint on 127.0.0.1, the stages submitted
as Ray jobs with the same commands as on a laptop, everything on S3; the cluster stops whatever happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actstore.testing.cluster import BUCKET, LocalCluster

ACTSTORE = str(Path(sys.executable).parent / "actstore")
RAY = str(Path(sys.executable).parent / "ray")
STORE, RUN, SAE = f"s3://{BUCKET}/store", f"s3://{BUCKET}/run", "topk-k8-m128"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """deploy/local/up.sh's cluster, stopped (by its pids) at the end, also when a test fails."""
    state = tmp_path_factory.mktemp("cluster")
    up = subprocess.run(["bash", "deploy/local/up.sh"], env={**os.environ, "STATE_DIR": str(state)},
                        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert up.returncode == 0, up.stderr[-3000:]
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                   if line.startswith("export "))
    c = LocalCluster(state)
    c.state = json.loads((state / "cluster.json").read_text())
    assert exports == c.env()
    try:
        yield c
    finally:
        pids = [p["pid"] for p in c.state["processes"]]
        subprocess.run(["bash", "deploy/local/down.sh"], env={**os.environ, "STATE_DIR": str(state)}, timeout=120,
                       cwd=Path(__file__).parents[1])
        for pid in pids:  # every process group it started is gone
            with pytest.raises(ProcessLookupError):
                os.killpg(pid, 0)
        # and a plain ray.init() here will not try to join it (Ray's "current cluster" file is elsewhere)
        current = Path("/tmp/ray/ray_current_cluster")
        assert not current.exists() or f":{c.state['gcs_port']}" not in current.read_text()
        assert not Path(c.state["ray_temp"]).exists()


def _job(cluster: LocalCluster, *command: str) -> str:
    """`ray job submit -- actstore ...` as the README says (the address from up.sh's exports, `actstore`
    found on the head's PATH); waits for the job, returns its output, asserting success."""
    env = {**os.environ, **cluster.env()}
    r = subprocess.run([RAY, "job", "submit", "--", "actstore", *command],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    return r.stdout


def test_extract_train_index_serve_on_a_two_node_cluster(cluster, tmp_path, monkeypatch):
    from actstore.store import ActivationStore, verify_store
    from actstore.testing.shapes import generate_dataset
    from actstore_cli import main
    from sae.checkpoint import load
    from services.api import create_app

    for k, v in cluster.env().items():  # this process reads and writes the cluster's S3 like the jobs do
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    generate_dataset(f"s3://{BUCKET}/images", 32, seed=2, image_size=64)
    out = _job(cluster, "extract", "--images", f"s3://{BUCKET}/images", "--model", "timm:vit_tiny_patch16_224",
               "--out", STORE, "--batch-size", "16", "--images-per-shard", "8", "-q")
    assert f"{STORE}: complete; 4 units written" in out
    with ActivationStore(STORE) as store:
        nodes = {store.unit_record(k)["node"] for k in range(store.spec.n_units)}
    assert cluster.alive_nodes() == 2  # both nodes outlived the job (a driver counts them too: the refusal below)
    assert len(nodes) == 2, nodes  # units were written by tasks on both nodes
    assert verify_store(STORE, progress=False).ok

    out = _job(cluster, "train", "--store", STORE, "--out", RUN, "--num-workers", "2", "--layer", "-2",
               "--batch-size", "256", "--tokens", "8192", "--sae", "topk", "--k", "8", "--d-sae", "128",
               "--log-every", "4", "--checkpoint-every", "8", "-q")
    assert f"{RUN}/{SAE}: step 16, 8192 tokens" in out
    sae, norm = load(f"{RUN}/{SAE}")
    assert sae.cfg.d_sae == 128 and norm is not None

    # index runs where its user is (no Ray): here, with the cluster's S3 in the environment, like the jobs
    assert main(["index", "--store", STORE, "--sae", f"{RUN}/{SAE}", "--out", str(tmp_path / "index"), "-q"]) == 0
    from fastapi.testclient import TestClient

    with TestClient(create_app(tmp_path / "index")) as client:
        page = client.get("/features?limit=5").json()
        assert len(page["features"]) == 5
        assert client.get("/images/0").headers["content-type"] == "image/jpeg"  # read from S3

    # a local path on a multi-node cluster is refused, in one line
    r = subprocess.run([ACTSTORE, "extract", "--images", f"s3://{BUCKET}/images", "--model",
                        "timm:vit_tiny_patch16_224", "--out", str(tmp_path / "local-store")],
                       env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "a local path, but the Ray cluster has 2 nodes" in r.stderr, r.stderr
    assert not (tmp_path / "local-store").exists()
