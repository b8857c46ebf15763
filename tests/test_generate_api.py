"""POST /steer through a generate head over real HTTP (`actstore serve --steer generate:PIPELINE`, conftest's
generation_url): the pictures are PNGs of the asked size, equal to the Steerer's own for the same request (steps,
size, seed and guidance reach the pipeline); no edit gives the same picture before and after and a cosine of 1, an
edit another picture and a cosine below 1; bad generation options are 422; a generation past the time bound is
stopped at its next denoising step and answered 503, its slot free."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import requests
from conftest import GENERATION_TIMEOUT_S
from PIL import Image

from services.steer import Steerer

SMALL = {"steps": 2, "size": 32}


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/steer", json={"head": "generate", **body}, timeout=120)


def pixels(data: str) -> np.ndarray:
    """The base64 PNG's pixels, (H, W, 3) uint8."""
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.format == "PNG"
    return np.asarray(picture.convert("RGB"))


@pytest.fixture(scope="module")
def steerer(generation_index) -> Steerer:
    """The same SAE in this process: what the service should answer."""
    g, _ = generation_index
    return Steerer(g.sae, g.store)


@pytest.fixture(scope="module")
def edit(generation_url) -> dict:
    """Add 20 of the strongest feature of image 1's patch 3, on every token."""
    found = requests.get(f"{generation_url}/images/1/patches/3", timeout=60).json()["features"]
    return {"feature": found[0]["feature"], "op": "add", "value": 20.0, "where": "all"}


def test_heads_list_the_generate_head(generation_url) -> None:
    heads = requests.get(f"{generation_url}/steer/heads", timeout=60).json()
    assert heads["heads"] == [{"name": "generate", "kind": "generate", "classes": []}]
    assert heads["slots"] == 1 and heads["timeout_s"] == GENERATION_TIMEOUT_S


def test_without_edits_before_equals_after(generation_url) -> None:
    r = post(generation_url, {"image": 1, **SMALL})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["kind"] == "generate" and got["edits"] == [] and got["classes"] == []
    assert got["before"]["image"] == got["after"]["image"]
    assert got["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert pixels(got["before"]["image"]).shape == (32, 32, 3)
    assert "embedding" not in got["before"] and "embedding" not in got["after"], "the response stays small"


@pytest.mark.parametrize("size", [32, 48])
def test_the_pictures_are_the_steerers(generation_url, steerer, edit, size) -> None:
    """Steps, size, seed and guidance reach the pipeline: the service's pictures and cosine are the Steerer's for the
    same options, and each option changes the picture (so a dropped one would show)."""
    options = {"steps": 3, "size": size, "seed": 7, "guidance": 4.0}
    r = post(generation_url, {"image": 2, "edits": [edit], **options})
    assert r.status_code == 200, r.text
    got = r.json()
    images = steerer.image(2)
    edits = steerer.edits([f"{edit['feature']}:add:20@all"])
    head = steerer.head("generate")
    mine = steerer.steer(images, edits, head, **options)
    for side in ("before", "after"):
        ours, theirs = pixels(got[side]["image"]).astype(int), pixels(mine[side]["image"]).astype(int)
        assert ours.shape == (size, size, 3)
        assert np.abs(ours - theirs).max() <= 1, f"{side}: the service's picture is not the Steerer's"
    assert got["cosine"] == pytest.approx(mine["cosine"], abs=1e-5) and got["cosine"] < 1 - 1e-4
    assert not np.array_equal(pixels(got["before"]["image"]), pixels(got["after"]["image"])), "the edit changed nothing"
    for change in ({"seed": 8}, {"guidance": 1.5}, {"steps": 2}):
        other = steerer.steer(images, [], head, **{**options, **change})["before"]["image"]
        assert not np.array_equal(pixels(other), pixels(got["before"]["image"])), f"{change} changes nothing"


@pytest.mark.parametrize("extra, words", [
    ({"size": 30}, "size: Input should be a multiple of 8"),
    ({"size": 0}, "size: Input should be greater than or equal to 8"),
    ({"size": 4096}, "size: Input should be less than or equal to 2048"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
    ({"steps": 201}, "steps: Input should be less than or equal to 200"),
    ({"guidance": -1}, "guidance: Input should be greater than or equal to 0"),
    ({"guidance": 101}, "guidance: Input should be less than or equal to 100"),
])
def test_bad_generation_options_are_422(generation_url, extra, words) -> None:
    r = post(generation_url, {"image": 1, **SMALL, **extra})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_a_generation_past_its_bound_is_stopped_at_its_next_step(generation_url) -> None:
    """200 steps at 128 px take more than a minute a picture on one thread: the request is stopped at the bound, in
    the middle of its first picture (within a few steps of it), answered 503; the one slot is free at once."""
    started = time.monotonic()
    r = post(generation_url, {"image": 1, "steps": 200, "size": 128})
    elapsed = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert "was stopped" in r.json()["detail"] and "fewer denoising steps" in r.json()["detail"]
    assert GENERATION_TIMEOUT_S <= elapsed < GENERATION_TIMEOUT_S + 15, f"answered after {elapsed:.1f} s"
    r = post(generation_url, {"image": 1, **SMALL})
    assert r.status_code == 200, r.text
