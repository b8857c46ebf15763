"""The query service over real HTTP: every endpoint against the index's own arrays, errors, auth, fuzzing."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image

from actstore.errors import CorruptDataError
from actstore.extract.backbones import BackboneConfig, load_backbone
from actstore_cli import main
from services.api import create_app, model_view
from services.index.layout import open_array, read_index_meta


def get(url: str, **kw) -> requests.Response:
    return requests.get(url, timeout=30, **kw)


def test_health_browse_and_histogram(api_url, index_dir):
    meta = read_index_meta(index_dir)
    assert get(f"{api_url}/healthz").json() == {"status": "ok", "n_features": meta["d_sae"],
                                                 "n_images": meta["n_images"], "k": 8, "grid": [14, 14],
                                                 "steering": None}
    feats = pq.read_table(index_dir / "features.parquet").to_pydict()
    freq = np.array(feats["freq_patches"])
    lo, hi = np.quantile(freq[freq > 0], [0.2, 0.8])
    page = get(f"{api_url}/features", params={"sort": "-freq", "min_freq": lo, "max_freq": hi, "limit": 7,
                                              "offset": 3}).json()
    want = [i for i in np.argsort(-freq, kind="stable") if lo <= freq[i] <= hi]
    assert page["total"] == len(want) and (page["offset"], page["limit"]) == (3, 7)
    assert [f["id"] for f in page["features"]] == want[3:10]
    assert all(f["freq_patches"] == pytest.approx(freq[f["id"]]) for f in page["features"])
    by_id = get(f"{api_url}/features", params={"limit": 1000}).json()["features"]
    assert [f["id"] for f in by_id] == list(range(meta["d_sae"]))
    ascending = get(f"{api_url}/features", params={"sort": "max_act", "limit": 1000}).json()["features"]
    assert [f["max_act"] for f in ascending] == sorted(feats["max_act"])
    assert get(f"{api_url}/stats/density-histogram").json() == meta["histogram"]


def test_feature_equals_the_index_arrays(api_url, index_dir):
    top, values, heat = (open_array(index_dir, n) for n in ("top_images", "top_values", "heatmaps"))
    fid = int(np.argmax((top >= 0).sum(1)))
    body = get(f"{api_url}/features/{fid}").json()
    n = int((top[fid] >= 0).sum())
    assert [t["image"] for t in body["top_images"]] == top[fid, :n].tolist()
    np.testing.assert_allclose([t["value"] for t in body["top_images"]], values[fid, :n], rtol=1e-6)
    np.testing.assert_allclose(np.array([t["heatmap"] for t in body["top_images"]]), heat[fid, :n], rtol=1e-3)
    assert body["grid"] == [14, 14] and all(len(t["heatmap"]) == 196 for t in body["top_images"])
    assert body["top_images"][0]["class_name"] in {"circle", "cross", "hexagon", "square", "star", "triangle"}
    assert sum(b["count"] for b in body["bands"]) == body["n_images_fired"]
    assert all(b["lo"] <= e["value"] < b["hi"] for b in body["bands"] for e in b["examples"])
    assert len(get(f"{api_url}/features/{fid}", params={"k": 2}).json()["top_images"]) == min(2, n)
    image = body["top_images"][0]["image"]
    feats = get(f"{api_url}/images/{image}/features", params={"m": 4}).json()
    want = open_array(index_dir, "image_features")[image]
    assert [f["id"] for f in feats["features"]] == want[want >= 0][:4].tolist()


def test_image_is_the_models_view(api_url, index_dir):
    r = get(f"{api_url}/images/3", params={"size": 112})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (112, 112)
    uri = pq.read_table(index_dir / "images.parquet").column("uri")[3].as_py()
    backbone = load_backbone(BackboneConfig("timm:vit_tiny_patch16_224", layers=(-2,)))
    want = np.asarray(backbone.preprocessor.pil_transform(Image.open(uri).convert("RGB")).resize((112, 112)))
    assert np.abs(np.asarray(im, dtype=np.float32) - want).mean() < 4  # JPEG and one resample vs two


@pytest.mark.parametrize("model", ["timm:vit_tiny_patch16_224", "timm:vit_small_patch14_reg4_dinov2",
                                   "open_clip:ViT-B-16-SigLIP"])
def test_model_view_matches_the_models_own_transform(model):
    """Non-square photos-like input through each family's eval transform (shorter-side resize, squash)."""
    backbone = load_backbone(BackboneConfig(model, layers=(-2,)))
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((10, 10, 1))).astype(np.uint8)
    image = Image.fromarray(smooth)  # 400 x 300
    h, w = backbone.preprocessor.image_size
    want = np.asarray(backbone.preprocessor.pil_transform(image), dtype=np.float32)
    got = np.asarray(model_view(image, backbone.metadata()["preprocessing"], w), dtype=np.float32)
    assert got.shape == want.shape == (h, w, 3)
    assert np.abs(got - want).mean() < 6, "the served view is not the region the model saw"


def test_errors_are_json_4xx(api_url, index_dir):
    n_features = read_index_meta(index_dir)["d_sae"]
    cases = {
        f"/features/{n_features}": 404, "/features/99999999": 404, "/features/abc": 422, "/features/-1": 422,
        "/features/1.5": 422, "/features?limit=0": 422, "/features?limit=5000": 422, "/features?sort=bogus": 422,
        "/features?min_freq=2": 422, "/features?offset=-3": 422, "/features/0?k=0": 422,
        "/images/48": 404, "/images/x": 422, "/images/0?size=5": 422, "/images/48/features": 404,
        "/nope": 404,
    }
    for path, status in cases.items():
        r = get(api_url + path)
        assert r.status_code == status, path
        assert r.headers["content-type"] == "application/json" and isinstance(r.json()["detail"], str), path


def test_path_traversal_is_refused(api_url, index_dir, tmp_path):
    secret = "never-serve-this"
    for path in ("/static/../services/api.py", "/static/%2e%2e/api.py", "/static/..%2F..%2Fpyproject.toml",
                 "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e/features", "/static//etc/passwd",
                 "/static/%2Fetc%2Fpasswd"):
        r = _raw_get(api_url, path)  # clients would normalise ".." away
        assert r[0] in (400, 404, 422), (path, r)
        assert b"def create_app" not in r[1] and b"root:" not in r[1] and secret.encode() not in r[1]
    # an index whose images table was edited to point outside the dataset root
    edited = tmp_path / "edited"
    shutil.copytree(index_dir, edited)
    (tmp_path / "secret.png").write_bytes(secret.encode())
    table = pq.read_table(edited / "images.parquet")
    uris = table.column("uri").to_pylist()
    inside = uris[1]
    uris[0] = str(tmp_path / "secret.png")
    uris[1] = os.path.join(os.path.dirname(inside), "..", "..", "secret.png")
    pq.write_table(table.set_column(1, "uri", pa.array(uris)), edited / "images.parquet")
    link = os.path.join(os.path.dirname(inside), "link.png")
    os.symlink(tmp_path / "secret.png", link)
    uris[2] = link
    pq.write_table(table.set_column(1, "uri", pa.array(uris)), edited / "images.parquet")
    from fastapi.testclient import TestClient

    client = TestClient(create_app(edited))
    try:
        for i in (0, 1, 2):
            r = client.get(f"/images/{i}")
            assert r.status_code == 403 and secret not in r.text, i
        assert client.get("/images/3").status_code == 200
    finally:
        os.unlink(link)


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (clients normalise '..' away)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_bearer_token(api_url_token):
    url, token = api_url_token
    assert get(f"{url}/healthz").status_code == 200
    assert get(f"{url}/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}, {"Authorization": "Basic x"}):
        for path in ("/features/0", "/features", "/images/0", "/images/0/features", "/stats/density-histogram"):
            r = get(url + path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, headers)
    ok = {"Authorization": f"Bearer {token}"}
    assert get(f"{url}/features/0", headers=ok).status_code == 200
    assert get(f"{url}/images/0", headers=ok).status_code == 200


def test_docs_are_behind_the_token(api_url_token, index_dir, tmp_path):
    """With a token, the schema and the docs pages need it too (they name the store and every route); the store's
    URL is shown without its credentials."""
    url, token = api_url_token
    for path in ("/openapi.json", "/docs", "/redoc"):
        r = get(url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert r.json() == {"detail": "missing or wrong bearer token"}
        assert get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = {"Authorization": f"Bearer {token}"}
    schema = get(f"{url}/openapi.json", headers=ok).json()
    assert "/features/{fid}" in schema["paths"] and "HTTPBearer" in schema["components"]["securitySchemes"]
    for path in ("/docs", "/redoc"):
        r = get(url + path, headers=ok)
        assert r.status_code == 200 and "/openapi.json" in r.text, path
    from fastapi.testclient import TestClient

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["store"] = "s3://reader:pa55word@bucket/stores/demo"
    (copy / "index.json").write_text(json.dumps(meta))
    description = TestClient(create_app(copy)).get("/openapi.json").json()["info"]["description"]
    assert "pa55word" not in description and "bucket/stores/demo" in description


def test_openapi_schema_documents_every_route(api_url):
    schema = get(f"{api_url}/openapi.json").json()
    assert set(schema["paths"]) == {"/healthz", "/features", "/features/{fid}", "/features/{fid}/matches",
                                    "/images/{iid}", "/images/{iid}/features", "/stats/density-histogram", "/atlas",
                                    "/abstraction", "/steer", "/steer/heads", "/images/{iid}/patches/{patch}"}
    assert schema["paths"]["/features/{fid}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]


def test_fuzz_no_server_errors(api_url):
    """Schema-driven requests for every operation (schemathesis, valid and invalid data): no 5xx, and
    every response is one the schema documents. (schemathesis' pytest plugin does not load on pytest 9.)"""
    assert fuzz(api_url, max_examples=40) == 12


def fuzz(url: str, max_examples: int, paths: tuple[str, ...] | None = None, excluded: tuple = ()) -> int:
    """schemathesis cases for the service's operations (those at `paths`, or all): no 5xx, and every response
    one the schema documents (`excluded`: schemathesis checks to skip); returns how many operations were fuzzed."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations() if paths is None or r.ok().path in paths]
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=list(excluded))

        check()
    return len(operations)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_starts_fast_and_reads_the_token_from_the_environment(index_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "ACTSTORE_TOKEN": "from-env"}
    cmd = [sys.executable, "-m", "actstore_cli", "serve", "--index", str(index_dir), "--port", str(port)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                if get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() - t0 < 60
                time.sleep(0.05)
        assert get(f"http://127.0.0.1:{port}/features/0").status_code == 401
        headers = {"Authorization": "Bearer from-env"}
        assert get(f"http://127.0.0.1:{port}/features/0", headers=headers).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "actstore_cli", "serve", "--index", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: ") and "not a feature index" in bad.stderr


def test_ray_serve_gives_the_same_answers(ray_local, api_url, index_dir):
    from ray import serve

    from services.api import run_ray

    port = _free_port()
    run_ray(str(index_dir), port=port, blocking=False)
    try:
        for path in ("/features/3", "/features?sort=-freq&limit=5", "/stats/density-histogram"):
            assert get(f"http://127.0.0.1:{port}{path}").json() == get(api_url + path).json(), path
        assert get(f"http://127.0.0.1:{port}/images/2").content == get(f"{api_url}/images/2").content
        assert get(f"http://127.0.0.1:{port}/features/99999").status_code == 404
    finally:
        serve.shutdown()


def test_index_cli_and_its_errors(service_store, tmp_path, capsys):
    """The command as a process once; the refusal in this process (another process would import torch again)."""
    out = tmp_path / "idx"
    r = subprocess.run([sys.executable, "-m", "actstore_cli", "index", "--store", str(service_store / "store"),
                        "--sae", str(service_store / "sae"), "--out", str(out), "--k", "3", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"actstore serve --index {out}" in r.stdout
    assert json.loads((out / "index.json").read_text())["k"] == 3
    assert main(["index", "--store", str(service_store / "store"), "--sae", str(service_store / "sae"),
                 "--out", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err


@pytest.mark.parametrize("damage", ["truncated array", "resized array", "short table"])
def test_a_damaged_index_is_refused_at_start_up(index_dir, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(index_dir, bad)
    if damage == "truncated array":
        chunk = bad / "arrays/heatmaps/c/0/0/0"
        chunk.write_bytes(chunk.read_bytes()[:-7])
        named = "heatmaps"
    elif damage == "resized array":  # bytes and zarr.json agree with each other, not with index.json
        meta_path = bad / "arrays/top_values/zarr.json"
        meta = json.loads(meta_path.read_text())
        d_sae, k = meta["shape"]
        meta["shape"] = meta["chunk_grid"]["configuration"]["chunk_shape"] = [d_sae // 2, 2 * k]
        meta_path.write_text(json.dumps(meta))
        named = "top_values"
    else:
        table = pq.read_table(bad / "features.parquet")
        pq.write_table(table.slice(0, 10), bad / "features.parquet")
        named = "features.parquet"
    r = subprocess.run([sys.executable, "-m", "actstore_cli", "serve", "--index", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert named in r.stderr, r.stderr
    with pytest.raises(CorruptDataError, match=named):
        create_app(bad)


def test_any_error_at_request_time_is_json(index_dir, tmp_path):
    from fastapi.testclient import TestClient

    copy = tmp_path / "copy"
    shutil.copytree(index_dir, copy)
    app = create_app(copy)
    app.state.reader.images  # loaded, then the table's URIs are made unusable: a bug path, not a 4xx
    app.state.reader.images["uri"] = None
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/images/0")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["detail"].startswith("internal error")
