"""The test stand-in of a VLM endpoint (actstore.testing.chat): what it sees in the shapes images agrees with the
factors that drew them, and it speaks OpenAI's chat-completions protocol over real HTTP (a stdlib client here)."""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from actstore.testing.chat import ChatServer, dominant_color, texture
from actstore.testing.shapes import COLORS, TEXTURES, generate_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(factor rows, RGB pixels, shape masks) of 240 generated images."""
    root = tmp_path_factory.mktemp("chat")
    ds = generate_dataset(str(root / "img"), 240, seed=3, image_size=64, masks=str(root / "masks"))
    rows = ds.factors.to_pylist()
    pixels = [np.asarray(Image.open(root / "img" / r["path"]).convert("RGB")) for r in rows]
    masks = [np.asarray(Image.open(root / "masks" / r["path"])) > 0 for r in rows]
    return rows, pixels, masks


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def _highlight(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The region as the explainer sees it: 8 px patches touching the mask as they are, the rest * 0.3."""
    h, w = mask.shape
    patches = mask.reshape(h // 8, 8, w // 8, 8).any(axis=(1, 3)).repeat(8, 0).repeat(8, 1)
    return np.where(patches[..., None], pixels, (pixels * 0.3).astype(np.uint8))


def test_colour_and_texture_agree_with_the_factors(shapes):
    rows, pixels, masks = shapes
    seen, colour_ok, texture_ok = Counter(), Counter(), Counter()
    for r, px, mask in zip(rows, pixels, masks):
        seen[r["color"]] += 1
        colour_ok[r["color"]] += dominant_color(px)[0] == r["color"]
        texture_ok[r["texture"]] += texture(px) == r["texture"]
        # dimmed outside the shape's patches: the same answers, from what stays bright
        lit = _highlight(px, mask)
        colour_ok["highlighted"] += dominant_color(lit)[0] == r["color"]
        texture_ok["highlighted"] += texture(lit) == r["texture"]
    assert set(seen) == set(COLORS)
    for colour in COLORS:
        assert colour_ok[colour] >= 0.95 * seen[colour], (colour, colour_ok[colour], seen[colour])
    counts = Counter(r["texture"] for r in rows)
    for name in TEXTURES:
        assert texture_ok[name] >= 0.95 * counts[name], (name, texture_ok[name], counts[name])
    assert colour_ok["highlighted"] >= 0.95 * len(rows) and texture_ok["highlighted"] >= 0.95 * len(rows)


def test_a_dimmed_region_shows_no_colour(shapes):
    rows, pixels, _ = shapes
    a = next(i for i, r in enumerate(rows) if r["color"] == "red" and r["texture"] == "stripes")
    b = next(i for i, r in enumerate(rows) if r["color"] == "blue" and r["texture"] == "solid")
    assert dominant_color((pixels[b] * 0.3).astype(np.uint8)) == (None, 0.0)
    assert texture((pixels[b] * 0.3).astype(np.uint8)) is None
    both = np.hstack([pixels[a], (pixels[b] * 0.3).astype(np.uint8)])  # red stripes beside a dimmed blue square
    assert dominant_color(both) == ("red", 1.0)
    assert texture(both) == "stripes"
    assert dominant_color(np.hstack([pixels[a], pixels[b]]))[1] < 1.0  # undimmed, the blue counts


def _post(url: str, body: dict, key: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"{url}/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _data_url(image: bytes) -> str:
    kind = "png" if image.startswith(b"\x89PNG") else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def _chat(images: list[bytes], text: str, **options) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": _data_url(b)}} for b in images]
    return {"model": "m", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            **options}


def _judge_text(explanation: str) -> str:
    return f'Here is a feature.\nExplanation: "{explanation}"\nDoes it fire on the image?\nAnswer Yes or No.'


def test_explain_names_the_shared_colour_else_texture(shapes):
    rows, pixels, masks = shapes
    lit = [_encode(_highlight(px, m), "JPEG") for px, m in zip(pixels, masks)]
    red = [lit[i] for i, r in enumerate(rows) if r["color"] == "red"][:6]
    striped = [lit[i] for i, r in enumerate(rows) if r["texture"] == "stripes"][:8]
    assert len({rows[i]["color"] for i, r in enumerate(rows) if r["texture"] == "stripes"}) > 2
    mixed = lit[:12]
    with ChatServer() as server:
        answers = [_post(server.url, _chat(images, "What does the feature detect?"))
                   for images in (red, striped, mixed, [])]
    assert [a[0] for a in answers] == [200] * 4
    texts = [a[2]["choices"][0]["message"]["content"] for a in answers]
    assert texts == ["red", "stripes", "various things", "various things"]
    first = answers[0][2]
    assert first["object"] == "chat.completion" and first["model"] == "m" and first["choices"][0]["index"] == 0
    assert first["choices"][0]["finish_reason"] == "stop" and first["usage"]["total_tokens"] > 0


def test_judge_answers_by_the_image_with_logprobs(shapes):
    rows, pixels, _ = shapes
    picks = list(range(0, 240, 7))
    with ChatServer() as server:
        for i in picks:
            for explanation, truth in (("red things", rows[i]["color"] == "red"),
                                       ("striped shapes", rows[i]["texture"] == "stripes"),
                                       ("red stripes", rows[i]["color"] == "red" and rows[i]["texture"] == "stripes"),
                                       ("round things", False)):
                body = _chat([_encode(pixels[i])], _judge_text(explanation), max_tokens=1, logprobs=True,
                             top_logprobs=5)
                status, _, answer = _post(server.url, body)
                assert status == 200
                choice = answer["choices"][0]
                assert choice["message"]["content"] == ("Yes" if truth else "No"), (i, explanation)
                first = choice["logprobs"]["content"][0]
                p = {t["token"]: math.exp(t["logprob"]) for t in first["top_logprobs"]}
                assert set(p) == {"Yes", "No"} and p["Yes"] + p["No"] == pytest.approx(1)
                assert (p["Yes"] > 0.5) == truth and first["token"] == choice["message"]["content"]
        one = _post(server.url, _chat([_encode(pixels[0])], _judge_text("red"), logprobs=True, top_logprobs=1))[2]
        assert len(one["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 1
        plain = _post(server.url, _chat([_encode(pixels[0])], _judge_text("red")))[2]
        assert plain["choices"][0]["logprobs"] is None  # not asked for
    with ChatServer(logprobs=False) as server:
        ignored = _post(server.url, _chat([_encode(pixels[0])], _judge_text("red"), logprobs=True, top_logprobs=5))
        assert ignored[2]["choices"][0]["logprobs"] is None


def test_key_faults_models_and_bad_requests(shapes):
    _, pixels, _ = shapes
    body = _chat([_encode(pixels[0])], "What?")
    with ChatServer(api_key="sk-test", faults=[429, 503]) as server:
        assert _post(server.url, body)[0] == 401  # no key: refused before any fault is spent
        assert _post(server.url, body, key="sk-wrong")[0] == 401
        status, headers, answer = _post(server.url, body, key="sk-test")
        assert status == 429 and headers["Retry-After"] == "0" and "message" in answer["error"]
        status, headers, _ = _post(server.url, body, key="sk-test")
        assert status == 503 and "Retry-After" not in headers
        assert _post(server.url, body, key="sk-test")[0] == 200
        bad = _chat([b"not an image"], "What?")
        status, _, answer = _post(server.url, bad, key="sk-test")
        assert status == 400 and "could not decode the image" in answer["error"]["message"]
        remote = {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}
        status, _, answer = _post(server.url, remote, key="sk-test")
        assert status == 400 and "data URL" in answer["error"]["message"]
        assert _post(server.url, {"messages": []}, key="sk-test")[0] == 400
        models = urllib.request.Request(f"{server.url}/models", headers={"Authorization": "Bearer sk-test"})
        with urllib.request.urlopen(models, timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "shapes-vlm"
        received = list(server.requests)
    assert [r.path for r in received] == ["/v1/chat/completions"] * 8 + ["/v1/models"]
    assert received[2].headers["authorization"] == "Bearer sk-test" and "authorization" not in received[0].headers
    assert received[2].body == body


def test_delay_shows_overlapping_requests():
    with ChatServer(delay=0.3) as server:
        start = time.monotonic()
        threads = [threading.Thread(target=_post, args=(server.url, _chat([], "hi"))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
    assert server.max_in_flight == 4 and server.in_flight == 0 and elapsed < 1.0

