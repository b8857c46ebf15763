"""The `actstore` command, stage after stage: on S3 (moto) with one-off credentials, and the demo.

extract -> train (two Ray Train workers) -> index run through the command's entry point (actstore_cli.main) in
this process, on the session's Ray, and serve as a subprocess of the installed console script: a
subprocess per stage would import torch and start Ray workers for its own job again (tens of seconds,
nothing more tested). Afterwards the credentials appear in no object, file, output or log that any
stage wrote, and a run resumes after its keys were rotated.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from actstore.config import REDACTED
from actstore.testing.cluster import free_port
from actstore_cli import main

ACTSTORE = str(Path(sys.executable).parent / "actstore")
SAE = "topk-k8-m64"


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run `actstore args...` in this process; returns its stdout + stderr (asserting exit 0)."""
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out + out.err


def _get(url: str, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture
def secret_options(s3) -> dict[str, str]:
    """moto takes any credentials: a unique key id and secret, to look for afterwards."""
    return {"endpoint_url": s3.endpoint_url, "key": f"AKIA{uuid.uuid4().hex[:16].upper()}",
            "secret": f"sEcReT{uuid.uuid4().hex}"}


def test_stages_through_the_cli_on_s3_leave_no_credential_behind(ray_local, s3, s3_url, secret_options, tmp_path,
                                                                 capsys, caplog):
    from actstore.store import filesystem
    from actstore.testing.shapes import generate_dataset
    from sae.train import TrainConfig, Trainer

    opts = secret_options
    flag = json.dumps(opts)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    caplog.set_level(logging.INFO)  # what -v logs (pytest's capture handler holds the root logger here)
    generate_dataset(f"{s3_url}/images", 24, seed=1, image_size=64, storage_options=opts)
    logs = [_cli(capsys, "extract", "--images", f"{s3_url}/images", "--image-storage-options", flag,
                 "--model", "timm:vit_tiny_patch16_224", "--out", f"{s3_url}/store", "--storage-options", flag,
                 "--batch-size", "8", "--images-per-shard", "8", "-v")]
    logs.append(_cli(capsys, "train", "--store", f"{s3_url}/store", "--out", f"{s3_url}/run", "--storage-options",
                     flag, "--layer", "10", "--tokens", str(2 * 256 * 8), "--batch-size", "256", "--num-workers", "2",
                     "--sae", "topk", "--k", "8", "--d-sae", "64", "--log-every", "2", "--checkpoint-every", "4",
                     "-v"))
    logs.append(_cli(capsys, "index", "--store", f"{s3_url}/store", "--sae", f"{s3_url}/run/{SAE}",
                     "--out", str(tmp_path / "index"), "--storage-options", flag, "-v"))
    port = free_port()
    server = subprocess.Popen([ACTSTORE, "serve", "--index", str(tmp_path / "index"), "--port", str(port),
                               "--workers", "1", "--storage-options", flag, "-v"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert json.loads(_get(f"http://127.0.0.1:{port}/features?limit=3"))["features"]
        assert _get(f"http://127.0.0.1:{port}/images/0")[:2] == b"\xff\xd8"  # a JPEG, read from S3 with the options
    finally:
        server.terminate()
        logs.append(server.communicate(timeout=30)[0])

    # a resume after rotating keys continues the run (configs are compared without credentials)
    rotated = {**opts, "key": f"AKIA{uuid.uuid4().hex[:16].upper()}", "secret": f"sEcReT{uuid.uuid4().hex}"}
    base = dict(store=f"{s3_url}/store", out=f"{s3_url}/rotated", layer=10, tokens=256 * 6, batch_size=256,
                sae=({"kind": "topk", "k": 8, "d_sae": 64},), log_every=2, checkpoint_every=2)
    Trainer(TrainConfig(**base, storage_options=opts)).fit(progress=False, stop_after=2)
    resumed = Trainer(TrainConfig(**base, storage_options=rotated))
    resumed.fit(progress=False)
    assert resumed.step == 6

    secrets = [v for o in (opts, rotated) for k, v in o.items() if k != "endpoint_url"]
    fs, root = filesystem(s3_url, opts)
    written = {f"s3://{p}": fs.cat_file(p) for p in fs.find(root)}
    written.update({str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()})
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    written.update({str(p): p.read_bytes() for p in (session / "logs").rglob("*") if p.is_file()})
    written.update({f"log {i}": text.encode() for i, text in enumerate([*logs, caplog.text])})
    for name in ("store/extract_config.json", "run/train_config.json", "run/checkpoint/state.json"):
        text = next(v for k, v in written.items() if k.endswith(name)).decode()
        assert REDACTED in text and opts["endpoint_url"] in text, name  # what is not secret is kept
    leaks = sorted(name for name, data in written.items() if any(s.encode() in data for s in secrets))
    assert not leaks, leaks
    assert len(written) > 50


def test_demo_through_the_cli(ray_local, tmp_path, capsys):
    """Every stage once, through the command in this process, on the session's Ray (a rerun reuses images,
    stores and runs: the stages' own resume tests cover that)."""
    paths = {name: str(tmp_path / name) for name in ("images", "store", "index", "store-b", "index-b", "compare")}
    args = ["demo", "--images", paths["images"], "--store", paths["store"], "--sae-out", str(tmp_path / "run"),
            "--index", paths["index"], "--store-b", paths["store-b"], "--sae-out-b", str(tmp_path / "run-b"),
            "--index-b", paths["index-b"], "--compare", paths["compare"], "--report", str(tmp_path / "report.html"),
            "--model", "timm:vit_tiny_patch16_224", "--n-images", "16", "--tokens", "4096", "--evaluate-images", "4"]
    out = _cli(capsys, *args)
    assert "4 images (0 rejected)" in out and "recovered" in out  # the SAE evaluated spliced into its model
    assert f"actstore serve --index {tmp_path / 'index'} --compare {tmp_path / 'compare'}" in out
    meta = json.loads((tmp_path / "index/index.json").read_text())
    assert meta["n_images"] == 16 and meta["sae_kind"] == "topk"
    assert (tmp_path / "index" / "atlas.parquet").is_file()
    summary = json.loads((tmp_path / "compare" / "summary.json").read_text())
    assert summary["b"]["backbone"] == {"family": "hf", "name": "dinov2-small"} and summary["n_images"] == 16
    assert f"{summary['mutual']} mutual best matches" in out
    assert 'content="actstore report"' in (tmp_path / "report.html").read_text()
