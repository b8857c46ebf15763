"""The steering page's generation view (services/static/steer.js, #steer?view=gen) in headless Chromium against
`actstore serve --steer generate:PIPELINE` (conftest's generation_url): opened from its URL hash alone, it shows the
source image, the edits, the options, and the API's two pictures side by side with their embedding cosine; with no
edit the two pictures are the same. A service without a generate head hides the view's link. Screenshot:
test-artifacts/steer-gen.png."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from conftest import _serve
from PIL import Image
from test_browser_steer import STEER_SIZE, crop, page_url, post, render, request_body, screenshot

from services.api import create_app

OPTIONS = {"steps": 2, "seed": 3, "size": 32}
"""What the hash asks for; the page sends the same (and the API's defaults for the rest)."""


def shown(page, expected: dict) -> dict:
    """The view's pictures by side, asserted finished, without an error, with the expected request's edits, options
    and cosine."""
    section = page.by_id("steer")
    error = page.by_id("steer-error")
    assert "hidden" in error.attrs, f"the page shows an error: {error.all_text()!r}"
    assert section.attrs.get("data-state") == "done" and section.attrs["data-edits"] == " ".join(expected["edits"])
    (link,) = [a for a in page.by_id("steer-views").find_all("a") if a.attrs["data-view"] == "gen"]
    assert "hidden" not in link.attrs and "aria-current" in link.attrs
    (source,) = [img for img in section.find_all("img") if "generated" not in img.attrs.get("class", "")]
    assert int(source.attrs["data-natural-width"]) == STEER_SIZE, "the source image is shown"
    for name, value in OPTIONS.items():
        (box,) = [n for n in section.find_all("input") if n.attrs.get("name") == name]
        assert box.attrs["value"] == str(value), f"the {name} box"
    assert [li.attrs["data-edit"] for li in section.find_all("li") if "data-edit" in li.attrs] == expected["edits"]
    pictures = {img.attrs["data-side"]: img for img in section.find_all("img", "generated")}
    assert set(pictures) == {"before", "after"}
    for side, img in pictures.items():
        assert img.attrs["src"] == f"data:image/png;base64,{expected[side]['image']}", f"the {side} picture"
        assert int(img.attrs["data-natural-width"]) == OPTIONS["size"], "decoded at the asked size"
    (cosine,) = section.find_all("span", "cosine")
    assert float(cosine.attrs["data-cosine"]) == expected["cosine"]
    assert cosine.all_text() == f"{expected['cosine']:.6f}"
    return pictures


def test_generation_view_shows_both_pictures_and_the_cosine(generation_url, tmp_path) -> None:
    found = requests.get(f"{generation_url}/images/2/patches/5", timeout=60).json()["features"]
    edits = [f"{found[0]['feature']}:add:20@all", f"{found[1]['feature']}:set:0@cls"]
    expected = post(generation_url, request_body(2, "generate", edits, **OPTIONS))
    assert expected["before"]["image"] != expected["after"]["image"] and expected["cosine"] < 1 - 1e-4
    url = page_url(generation_url, edits, view="gen", image=2, **OPTIONS)
    pictures = shown(render(tmp_path, url), expected)
    assert pictures["before"].attrs["src"] != pictures["after"].attrs["src"]

    rgb = screenshot(tmp_path, url, "gen")
    drawn = {side: crop(rgb, img).astype(float) for side, img in pictures.items()}
    for side, pixels in drawn.items():
        png = Image.open(io.BytesIO(base64.b64decode(expected[side]["image"]))).convert("RGB")
        scaled = np.asarray(png.resize(pixels.shape[1::-1], Image.NEAREST), dtype=float)
        assert np.abs(pixels - scaled).mean() < 8, f"the {side} picture is not what the screenshot shows"
    assert np.abs(drawn["before"] - drawn["after"]).mean() > 1, "the two pictures look the same"


def test_generation_view_without_edits_shows_the_same_picture_twice(generation_url, tmp_path) -> None:
    expected = post(generation_url, request_body(4, "generate", [], **OPTIONS))
    pictures = shown(render(tmp_path, page_url(generation_url, view="gen", image=4, **OPTIONS)), expected)
    assert pictures["before"].attrs["src"] == pictures["after"].attrs["src"]
    assert expected["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_without_a_generate_head_the_view_is_hidden(generation_index, tmp_path) -> None:
    """The same index served without steering: the view's link stays hidden, the page shows the API's 404."""
    _, index = generation_index
    for url in _serve(create_app(index)):
        page = render(tmp_path, page_url(url, view="gen", image=0))
        (link,) = [a for a in page.by_id("steer-views").find_all("a") if a.attrs["data-view"] == "gen"]
        assert "hidden" in link.attrs
        assert page.by_id("steer").attrs["data-state"] == "error" and not page.find_all("img", "generated")
        assert "--steer" in page.by_id("steer-error").all_text()
