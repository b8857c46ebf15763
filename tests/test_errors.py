"""Errors reach the user as one line and exit 1: from Ray workers, and from storage (S3 on moto)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from actstore_cli import main

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must fail with exit 1 and exactly one `error: ...` line on stderr."""
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def all_cpus_free(ray, timeout: float = 20) -> None:
    """Wait until nothing holds a CPU of the local Ray: a failed job left no actor behind."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.2)


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    """No credentials anywhere botocore looks (environment, files, instance metadata)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials(s3, no_aws_env, capsys):
    opts = json.dumps({"endpoint_url": s3.endpoint_url})
    line = one_line_error(capsys, ["info", s3.url("x"), "--storage-options", opts])
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line


def test_no_such_bucket(s3, capsys):
    line = one_line_error(capsys, ["info", "s3://absent-bkt/x", "--storage-options", json.dumps(s3.storage_options)])
    assert "bucket 'absent-bkt' does not exist" in line


def test_unreachable_endpoint(capsys):
    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    line = one_line_error(capsys, ["info", "s3://bucket/x", "--storage-options", json.dumps(opts)])
    assert "cannot reach" in line and "endpoint_url" in line


class _Deny(BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request, as a bucket policy would."""

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ACCESS_DENIED)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(ACCESS_DENIED)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:
        pass


def test_access_denied(capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{server.server_port}", "key": "k", "secret": "s3cr3t-value"}
        line = one_line_error(capsys, ["info", "s3://bucket/x", "--storage-options", json.dumps(opts)])
    finally:
        server.shutdown()
    assert "access denied" in line and "s3cr3t-value" not in line


def test_overflow_in_a_forward_actor_is_one_line(ray_local, tmp_path, capsys):
    """Weights scaled up until block 10's output overflows float16: the error is raised in a Ray
    Data actor, and reaches the CLI as the store's own message naming the layer and unit."""
    import timm
    from safetensors.torch import save_file

    from actstore.testing.shapes import generate_dataset

    model = timm.create_model("vit_tiny_patch16_224")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("mlp.fc2.weight"):
            state[k] = state[k] * 1e6
    save_file(state, str(tmp_path / "huge.safetensors"))
    generate_dataset(str(tmp_path / "images"), 8, image_size=64)
    line = one_line_error(capsys, ["extract", "--images", str(tmp_path / "images"), "--model",
                                   "timm:vit_tiny_patch16_224", "--pretrained", str(tmp_path / "huge.safetensors"),
                                   "--dtype", "float16", "--out", str(tmp_path / "store"), "-q"])
    assert "overflows float16" in line and "unit 0" in line, line
    all_cpus_free(ray_local)  # the failed pipeline's actors are gone


def test_config_errors_of_data_parallel_training_are_one_line(ray_local, tmp_path, capsys):
    """A bad SAE is refused on the driver before any worker starts; an error only a worker sees (the
    store has fewer chunks than ranks) comes back from Ray Train as the same one line (no restarts asked:
    tests/test_sae_train.py covers restarts)."""
    from actstore.testing.synthetic import write_synthetic_store

    store = str(tmp_path / "store")
    write_synthetic_store(store, n_images=32, grid=(4, 4), d=16, progress=False)
    base = ["train", "--store", store, "--layer", "10", "--num-workers", "2", "--tokens", "4096", "-q"]
    line = one_line_error(capsys, base + ["--out", str(tmp_path / "a"), "--batch-size", "64", "--sae", "topk",
                                          "--d-sae", "8", "--k", "32"])
    assert line == "error: SAEConfig: k must be in [1, d_sae=8], got 32", line
    line = one_line_error(capsys, base + ["--out", str(tmp_path / "b"), "--batch-size", "64", "--max-failures", "0"])
    assert line == "error: world_size 2 exceeds the store's 1 chunks", line
    all_cpus_free(ray_local)  # nor did Ray Train's failed workers
