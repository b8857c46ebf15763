"""POST /steer, GET /steer/heads and GET /images/{id}/patches/{p} over real HTTP: the same before/after as the
Steerer, bounded bodies, bad edits as 4xx with a clear message, and schema-driven fuzzing without a 5xx."""

from __future__ import annotations

import pytest
import requests

from test_api import fuzz


@pytest.fixture(scope="module")
def steer_api(index_dir):
    """The conftest's service index with steering through the model's own classifier."""
    from conftest import _serve
    from services.api import create_app

    yield from _serve(create_app(index_dir, steer_heads=("model",)))


def test_steer_equals_the_steerer(steer_api, service_store, index_dir) -> None:
    from services.steer import Steerer

    heads = requests.get(f"{steer_api}/steer/heads", timeout=60).json()
    assert heads["grid"] == [14, 14] and heads["cls"] and heads["d_sae"] == 256 and heads["max_edits"] == 64
    assert heads["heads"] == [{"name": "model", "kind": "class", "classes": [str(i) for i in range(1000)]}]
    body = {"image": 4, "head": "model", "edits": [{"feature": 17, "op": "add", "value": 40.0, "where": "all"},
                                                    {"feature": 3, "op": "set", "value": 0, "where": [0, 1]}]}
    r = requests.post(f"{steer_api}/steer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    s = Steerer(str(service_store / "sae"), store=str(service_store / "store"))
    expect = s.steer(s.image(4), s.edits(["17:add:40@all", "3:set:0@0,1"]), s.head("model"))
    assert got["edits"] == ["17:add:40@all", "3:set:0@0,1"] and got["kind"] == "class"
    for side in ("before", "after"):
        assert [c for c, _ in got[side]["top5"]] == [c for c, _ in expect[side]["top5"]]
        assert [p for _, p in got[side]["top5"]] == pytest.approx([p for _, p in expect[side]["top5"]], rel=1e-5)
    assert got["before"] != got["after"]
    clean = requests.post(f"{steer_api}/steer", json={"image": 4}, timeout=60).json()
    assert clean["before"] == clean["after"] == got["before"]


def test_patch_features(steer_api, service_store) -> None:
    from services.steer import Steerer

    r = requests.get(f"{steer_api}/images/6/patches/30", timeout=60)
    assert r.status_code == 200
    s = Steerer(str(service_store / "sae"), store=str(service_store / "store"))
    expect = s.patch_features(6, 30)
    assert [f["feature"] for f in r.json()["features"]] == [f for f, _ in expect]
    assert requests.get(f"{steer_api}/images/6/patches/196", timeout=60).status_code == 422
    assert requests.get(f"{steer_api}/images/480/patches/0", timeout=60).status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"image": 1, "edits": [{"feature": 999, "op": "set", "value": 0}]}, 422, "the SAE has 256 features"),
    ({"image": 1, "edits": [{"feature": 1, "op": "set", "value": 0, "where": [196]}]}, 422, "patch indices must be"),
    ({"image": 1, "edits": [{"feature": 1, "op": "mul", "value": 0}]}, 422, "edits.0.op"),
    ({"image": 1, "edits": [{"feature": 1, "op": "set", "value": 0}] * 65}, 422, "edits"),
    ({"image": 1, "edits": [{"feature": 1, "op": "set", "value": 1e300}]}, 422, "edits.0.value"),
    ({"image": 1, "head": "zeroshot"}, 404, "heads: model"),
    ({"image": 4800}, 404, "the store has images"),
    ({"image": 1, "extra": 1}, 422, "extra"),
])
def test_bad_requests_are_4xx_with_a_clear_message(steer_api, body, status, words) -> None:
    r = requests.post(f"{steer_api}/steer", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_bodies_are_bounded(steer_api) -> None:
    r = requests.post(f"{steer_api}/steer", data=b"{" + b" " * (2 << 20) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "at most" in r.json()["detail"]

    def chunks():
        yield b'{"image": 1}'
    r = requests.post(f"{steer_api}/steer", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 411


def test_a_service_without_steering_names_the_flag(api_url) -> None:
    r = requests.post(f"{api_url}/steer", json={"image": 1}, timeout=60)
    assert r.status_code == 404 and "--steer" in r.json()["detail"]


def test_fuzz_steer_no_server_errors(steer_api) -> None:
    """Schema-valid edits may still be 422: the schema cannot know the SAE's width or the grid (checked above)."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    paths = ("/steer", "/steer/heads", "/images/{iid}/patches/{patch}")
    assert fuzz(steer_api, max_examples=30, paths=paths, excluded=(positive_data_acceptance,)) == 3
