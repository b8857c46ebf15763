"""The explainer and judge backends: an OpenAI-compatible endpoint over real HTTP (actstore.testing.chat's server,
which looks at the shapes images) and a tiny random transformers LLaVA through `hf:<folder>`."""

from __future__ import annotations

import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

from actstore.errors import AccessDeniedError, ConfigError, StorageError
from actstore.testing.chat import ChatServer, dominant_color
from actstore.testing.shapes import generate_dataset
from actstore.testing.tiny_vlm import write_tiny_llava
from services.explain.backends import Prompt, Verdict, open_backend

KEY_ENV = "ACTSTORE_TEST_VLM_KEY"
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """(factor rows, PNG bytes, RGB pixels) of 48 generated images."""
    root = tmp_path_factory.mktemp("backends")
    ds = generate_dataset(str(root / "img"), 48, seed=5, image_size=64)
    rows = ds.factors.to_pylist()
    data = [(root / "img" / r["path"]).read_bytes() for r in rows]
    return rows, data, [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in data]


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=92)
    return out.getvalue()


def _judge(image: bytes, explanation: str) -> Prompt:
    return Prompt((image,), f'A feature.\nExplanation: "{explanation}"\nDoes it fire on this image?\nAnswer Yes or No.')


def _colour_of(image: bytes) -> str:
    return dominant_color(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))[0]


def _backend(server: ChatServer, **options):
    return open_backend("openai:shapes-vlm", endpoint=server.url, api_key_env=KEY_ENV, **options)


def test_answers_and_verdicts_follow_the_images(shapes, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    rows, data, pixels = shapes
    red = [i for i, r in enumerate(rows) if r["color"] == "red"]
    striped = [i for i, r in enumerate(rows) if r["texture"] == "stripes"]
    prompts = [Prompt(tuple(_jpeg(pixels[i]) for i in red), "What do these share?"),
               Prompt(tuple(data[i] for i in striped), "What do these share?"),
               Prompt(tuple(data), "What do these share?")]
    with ChatServer() as server:
        backend = _backend(server)
        try:
            answers = dict(backend.ask(prompts))
            verdicts = dict(backend.judge([_judge(b, "red") for b in data]))
        finally:
            backend.close()
        received = list(server.requests)
    assert len(red) >= 3 and len({rows[i]["color"] for i in striped}) > 2
    assert answers == {0: "red", 1: "stripes", 2: "various things"}
    assert not any("authorization" in r.headers for r in received)  # no key in the environment: none sent
    asked = sorted((r.body["messages"][0]["content"] for r in received[:3]), key=len)
    assert [len(parts) for parts in asked] == [len(red) + 1, len(striped) + 1, len(data) + 1]
    assert [p["type"] for p in asked[0]] == ["image_url"] * len(red) + ["text"]
    assert all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in asked[0][:-1])
    assert asked[0][-1]["text"] == "What do these share?"
    assert backend.probabilities
    for i, r in enumerate(rows):
        colour, share = dominant_color(pixels[i])  # the server's p is 0.5 + 0.45 * share for its verdict
        truth = r["color"] == "red"
        assert verdicts[i].yes == truth
        assert verdicts[i].p_yes == pytest.approx(0.5 + 0.45 * share if truth else 0.5 - 0.45 * share)
    judged = [r.body for r in received[3:]]
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 and b["logprobs"] is True and b["top_logprobs"] == 10
               for b in judged)
    assert all(b["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,") for b in judged)


def test_without_logprobs_the_verdict_comes_from_the_text(shapes):
    rows, data, _ = shapes
    with ChatServer(logprobs=False) as server:
        backend = _backend(server)
        verdicts = dict(backend.judge([_judge(b, "striped") for b in data[:12]]))
        backend.close()
    assert backend.probabilities is False
    assert verdicts == {i: Verdict(rows[i]["texture"] == "stripes", None) for i in range(12)}


def test_requests_overlap_up_to_the_concurrency():
    with ChatServer(delay=0.25) as server:
        backend = _backend(server, concurrency=4)
        start = time.monotonic()
        order = [i for i, _ in backend.ask([Prompt((), f"question {i}") for i in range(8)])]
        elapsed = time.monotonic() - start
        backend.close()
    assert sorted(order) == list(range(8))
    assert server.max_in_flight == 4 and elapsed < 8 * 0.25 * 0.6


def test_retries_recover_and_honour_retry_after(shapes, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    _, data, _ = shapes
    with ChatServer(api_key=KEY, faults=[429, 500, 503]) as server:
        backend = _backend(server, concurrency=1, backoff=0.01)
        assert dict(backend.ask([Prompt((data[0],), "What?")])) == {0: _colour_of(data[0])}
        backend.close()
        assert len(server.requests) == 4 and not server.faults
    # a 429's Retry-After: 0 wins over a long backoff
    with ChatServer(faults=[429, 429]) as server:
        backend = _backend(server, backoff=30.0)
        start = time.monotonic()
        assert dict(backend.ask([Prompt((), "What?")])) == {0: "various things"}
        assert time.monotonic() - start < 10
        backend.close()


def test_failures_are_one_line_without_the_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with ChatServer(api_key=KEY, faults=[503] * 3) as server:
        backend = _backend(server, retries=2, backoff=0.01)
        with pytest.raises(StorageError) as failed:
            list(backend.ask([Prompt((), "What?")]))
        backend.close()
        assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {KEY}"] * 3
    message = str(failed.value)
    assert "\n" not in message and "HTTP 503" in message and "after 3 tries" in message
    assert backend.model in message and "injected fault 503" in message
    assert backend.model == f"openai:shapes-vlm@127.0.0.1:{server.url.split(':')[2].split('/')[0]}"
    for text in (message, repr(failed.value), backend.model, repr(backend)):
        assert KEY not in text
    assert failed.value.__cause__ is None and failed.value.__context__ is None  # no request (headers) kept
    with ChatServer(faults=[400, 503]) as server:  # a bad request is not retried
        backend = _backend(server, backoff=0.01)
        with pytest.raises(ConfigError, match="HTTP 400"):
            list(backend.judge([Prompt((), "Answer Yes or No.")]))
        backend.close()
        assert len(server.requests) == 1
    with ChatServer(api_key="sk-another") as server:  # a refused key: named by its variable, never shown
        backend = _backend(server, backoff=0.01)
        with pytest.raises(AccessDeniedError) as refused:
            list(backend.ask([Prompt((), "What?")]))
        backend.close()
        assert len(server.requests) == 1
    assert KEY_ENV in str(refused.value) and KEY not in str(refused.value) and "HTTP 401" in str(refused.value)


def test_connection_errors_are_retried_then_reported():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = open_backend("openai:m", endpoint=f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    with pytest.raises(StorageError, match=r"cannot connect after 2 tries") as failed:
        list(backend.ask([Prompt((), "What?")]))
    backend.close()
    assert "Connection refused" in str(failed.value) and failed.value.__context__ is None


def test_bad_specs_and_images():
    with pytest.raises(ConfigError, match="openai:MODEL .* hf:MODEL"):
        open_backend("gpt-4o")
    with pytest.raises(ConfigError, match="openai:MODEL"):
        open_backend("openai:")
    with pytest.raises(ConfigError, match="endpoint must be an http"):
        open_backend("openai:m", endpoint="ftp://example.com/v1")
    with pytest.raises(ConfigError, match="vision tower"):
        open_backend("hf:clip-vit-base-patch32")
    with ChatServer() as server:
        backend = _backend(server)
        with pytest.raises(ConfigError, match="image 1 is neither PNG nor JPEG"):
            list(backend.ask([Prompt((b"\x89PNG\r\n\x1a\n", b"GIF89a"), "What?")]))
        backend.close()
        assert not server.requests


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return write_tiny_llava(str(tmp_path_factory.mktemp("llava") / "vlm"))


def test_local_vlm_answers_and_judges(shapes, tiny_llava):
    import torch

    _, data, _ = shapes
    backend = open_backend(f"hf:{tiny_llava}")
    assert backend.model == f"hf:{tiny_llava}" and backend.probabilities
    prompts = [Prompt(tuple(data[:3]), "What do the bright regions share?"), Prompt((), "Say something.")]
    answers = dict(backend.ask(prompts, max_tokens=6))
    assert set(answers) == {0, 1} and all(isinstance(a, str) for a in answers.values())
    assert dict(backend.ask(prompts[:1], max_tokens=6)) == {0: answers[0]}  # greedy: the same again
    verdicts = dict(backend.judge([_judge(data[i], "red") for i in range(4)]))
    assert all(0 <= v.p_yes <= 1 and v.yes == (v.p_yes >= 0.5) for v in verdicts.values())
    assert len({round(v.p_yes, 6) for v in verdicts.values()}) > 1  # the image matters
    # independently: the first generated token's scores, renormalised over "Y" and "N" (the byte tokenizer's first)
    processor, vlm = backend.processor, backend.vlm
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": _judge(data[0], "red").text}]}], add_generation_prompt=True)
    inputs = processor(images=[Image.open(io.BytesIO(data[0])).convert("RGB")], text=text, return_tensors="pt")
    out = vlm.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True,
                       pad_token_id=processor.tokenizer.pad_token_id)
    probs = torch.softmax(out.scores[0][0].float(), dim=0)
    yes, no = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("Y", "N"))
    assert verdicts[0].p_yes == pytest.approx(float(probs[yes] / (probs[yes] + probs[no])), abs=1e-5)
    backend.close()
