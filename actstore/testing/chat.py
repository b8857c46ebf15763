"""An OpenAI-compatible chat-completions server on 127.0.0.1 that looks at the shapes images it is sent, for tests.

`actstore explain` talks to vision-language models over HTTP; the tests run it against this real server instead of
a model. Its answers depend on the images (actstore.testing.shapes' drawings), so that an explanation or a judgement
is right or wrong for a reason the test can compute independently:

- an explain request (any request without the line `Answer Yes or No.`) shows a feature's top images, each with the
  firing region highlighted and the rest dimmed (pixels * 0.3). Each image's dominant colour is the majority colour
  of its bright saturated pixels (dimmed parts and the plain backgrounds drop out); the answer is the colour a
  majority (> 50%) of the images share, else the texture a majority of the highlighted shapes share (`texture`),
  else "various things".
- a judge request (one holding the line `Answer Yes or No.` and the explanation as `Explanation: "<text>"`) shows one
  image. The verdict is yes iff every attribute the explanation names holds for the image: a colour of COLORS (the
  image's dominant colour is one of those named) and a texture of TEXTURES ("stripe", "striped", "dots", ... count);
  an explanation naming neither gets no. With `logprobs: true` (and the server's `logprobs` option on) the first
  token's `top_logprobs` list "Yes" and "No", the verdict's probability between 0.5 and 0.95 by how clearly the image
  shows its colour (the dominant colour's share of the coloured pixels).

Also served: `GET /v1/models`; an `api_key` that requests must bear (`Authorization: Bearer <key>`, else 401);
`faults`, HTTP statuses answered to the first chat requests in order (a 429 with `Retry-After: 0`), as real endpoints
fail under load; `delay` seconds per chat request, so that a test can see concurrent clients overlap (`max_in_flight`).
Every request is recorded in `requests` (path, headers with lower-cased names, parsed JSON body).

Stdlib HTTP (a ThreadingHTTPServer, HTTP/1.1 keep-alive), numpy and PIL for the images.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from actstore.testing.shapes import COLORS

__all__ = ["JUDGE_LINE", "ChatServer", "Received", "dominant_color", "judge_image", "texture"]

JUDGE_LINE = "Answer Yes or No."
"""The line that makes a request a judge request."""
_EXPLANATION = re.compile(r'Explanation: "(.*)"')
_NAMES = tuple(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)
_CHROMA = (_RGB / _RGB.max(axis=1, keepdims=True)).astype(np.float32)  # compared by hue: a shade votes as its colour
_BRIGHT, _SATURATED = 100, 0.4  # a colour pixel: max channel >= 100 (a dimmed one is <= 0.3 * 245) and saturated
_ON, _SHADE_LOW = 0.725, 0.375  # brightness / the colour's: >= _ON its colour, >= _SHADE_LOW its 0.45 shade
_TEXTURE_WORDS = {"solid": ("solid",), "stripes": ("stripe", "stripes", "striped", "stripy"),
                  "dots": ("dot", "dots", "dotted", "spotted", "polka"),
                  "checker": ("checker", "checkered", "checkerboard", "chequered")}
"""The words that name each texture of TEXTURES in an explanation."""


def _colour_pixels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(max channel, saturation, nearest colour index by hue) per pixel of an (H, W, 3) image, flattened."""
    px = pixels.reshape(-1, 3).astype(np.float32)
    top = px.max(axis=1)
    saturation = (top - px.min(axis=1)) / np.maximum(top, 1.0)
    chroma = px / np.maximum(top, 1.0)[:, None]
    nearest = np.argmin(np.stack([((chroma - c) ** 2).sum(axis=1) for c in _CHROMA]), axis=0)
    return top, saturation, nearest


def _dominant(top: np.ndarray, saturation: np.ndarray, nearest: np.ndarray) -> tuple[str | None, float]:
    counts = np.bincount(nearest[(top >= _BRIGHT) & (saturation >= _SATURATED)], minlength=len(_NAMES))
    if counts.sum() == 0:
        return None, 0.0
    k = int(counts.argmax())
    return _NAMES[k], float(counts[k] / counts.sum())


def dominant_color(pixels: np.ndarray) -> tuple[str | None, float]:
    """(the name in COLORS most of the image's bright saturated pixels are nearest to, its share of them), or
    (None, 0.0) when the image has no such pixels (a plain background, a dimmed region)."""
    return _dominant(*_colour_pixels(pixels))


def texture(pixels: np.ndarray, color: str | None = None) -> str | None:
    """The texture (one of TEXTURES) of the undimmed pixels of the image's shape of colour `color` (default: the
    dominant one), or None without one. The generator paints a shape in its colour and, where its pattern is off,
    in 0.45 of it: solid has (almost) no shade; stripes are rows all colour or all shade; dots shade about a third
    of the shape in spots; checker half of it, in every row."""
    top, saturation, nearest = _colour_pixels(pixels)
    color = color or _dominant(top, saturation, nearest)[0]
    if color is None:
        return None
    k = _NAMES.index(color)
    level = top / _RGB[k].max()
    shape = ((saturation >= _SATURATED) & (nearest == k) & (level >= _SHADE_LOW)).reshape(pixels.shape[:2])
    n = int(shape.sum())
    if n < 16:
        return None
    shade = shape & (level < _ON).reshape(pixels.shape[:2])
    shaded = shade.sum() / n
    if shaded < 0.12:
        return "solid"
    per_row, shade_row = shape.sum(axis=1), shade.sum(axis=1)
    rows = per_row > 0
    fraction = shade_row[rows] / per_row[rows]
    mixed = float((per_row[rows] * np.minimum(fraction, 1 - fraction)).sum() / n)
    if mixed < 0.1:
        return "stripes"
    return "dots" if shaded < 0.42 else "checker"


def _named(text: str, words: Sequence[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)


def _explain(images: list[np.ndarray]) -> str:
    colours = [dominant_color(image)[0] for image in images]
    for found in (colours, [texture(image, c) for image, c in zip(images, colours)]):
        named = [c for c in found if c is not None]
        if named:
            best = max(set(named), key=named.count)
            if named.count(best) > len(images) / 2:
                return best
    return "various things"


def judge_image(image: np.ndarray | None, explanation: str) -> tuple[bool, float]:
    """The server's judgement of one image (None: no image) against an explanation: (the verdict, its probability)."""
    text = explanation.lower()
    colours = [c for c in _NAMES if _named(text, (c,))]
    textures = [t for t, words in _TEXTURE_WORDS.items() if _named(text, words)]
    colour, share = dominant_color(image) if image is not None else (None, 0.0)
    yes = bool(colours or textures) and image is not None
    if colours:
        yes = yes and colour in colours
    if textures:
        yes = yes and texture(image, colour) in textures
    return yes, 0.5 + 0.45 * (share if colour is not None else 1.0)


class Received(NamedTuple):
    """One request the server received."""

    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: Any
    """The parsed JSON body; None for a GET or a body that is not JSON."""


class _BadRequest(Exception):
    pass


def _decode_image(url: str) -> np.ndarray:
    head, _, data = url.partition(",")
    if not re.fullmatch(r"data:image/(png|jpeg|jpg|webp);base64", head):
        raise _BadRequest("image_url must be a data URL (data:image/png;base64,... or image/jpeg)")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            return np.asarray(image.convert("RGB"))
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise _BadRequest(f"could not decode the image: {e}") from None


def _read_messages(body: Any) -> tuple[str, list[np.ndarray]]:
    """(all text of the messages joined by newlines, the images in order), or _BadRequest as OpenAI's API."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _BadRequest("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty array")
    texts, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(_decode_image(str(part["image_url"].get("url", ""))))
            else:
                raise _BadRequest(f"invalid content part: {json.dumps(part)[:80]}")
    return "\n".join(texts), images


def _logprobs(verdict: str, p: float, top: int) -> dict[str, Any]:
    other = "No" if verdict == "Yes" else "Yes"
    ranked = [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())}
              for t, q in ((verdict, p), (other, 1 - p))]
    return {"content": [{**ranked[0], "top_logprobs": ranked[:max(0, top)]}]}


def _completion(body: dict[str, Any], honour_logprobs: bool) -> dict[str, Any]:
    text, images = _read_messages(body)
    logprobs = None
    if JUDGE_LINE in text:
        found = _EXPLANATION.findall(text)
        yes, p = judge_image(images[0] if images else None, found[-1] if found else "")
        content = "Yes" if yes else "No"
        if honour_logprobs and body.get("logprobs"):
            logprobs = _logprobs(content, p, int(body.get("top_logprobs") or 0))
    else:
        content = _explain(images)
    prompt_tokens = len(text.split()) + 85 * len(images)
    return {"id": f"chatcmpl-{time.monotonic_ns():x}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                 "finish_reason": "stop", "logprobs": logprobs}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                      "total_tokens": prompt_tokens + len(content.split())}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: ChatServer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as clients' connection pools expect
    disable_nagle_algorithm = True  # headers and body go in separate writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet: `requests` says what happened
        pass

    def _send(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        for key, item in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                          **(headers or {})}.items():
            self.send_header(key, item)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, headers)

    def _receive(self) -> Any:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        return body

    def _authorized(self) -> bool:
        key = self.server.owner.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "Incorrect API key provided.", "invalid_request_error")
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._receive()
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/models":
            return self._error(404, f"no route {self.path}", "invalid_request_error")
        self._send(200, {"object": "list", "data": [{"id": self.server.owner.model, "object": "model",
                                                     "created": 0, "owned_by": "actstore-testing"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = self._receive()
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}", "invalid_request_error")
        owner = self.server.owner
        with owner.lock:
            fault = owner.faults.popleft() if owner.faults else None
            owner.served += 1
            if fault is None and owner.fail_from is not None and owner.served > owner.fail_from:
                fault = 400
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            time.sleep(owner.delay)
            if fault is not None:
                retry = {"Retry-After": "0"} if fault == 429 else {}
                return self._error(fault, f"injected fault {fault}", "server_error" if fault >= 500 else
                                   "invalid_request_error", retry)
            try:
                answer = _completion(body, owner.logprobs)
            except _BadRequest as e:
                return self._error(400, str(e), "invalid_request_error")
            self._send(200, answer)
        finally:
            with owner.lock:
                owner.in_flight -= 1


class ChatServer:
    """The chat-completions server, on 127.0.0.1 at a free port while open (`with ChatServer() as server:`);
    `url` is its base URL ("http://127.0.0.1:PORT/v1") for an OpenAI client."""

    def __init__(self, *, api_key: str | None = None, faults: Sequence[int] = (), logprobs: bool = True,
                 delay: float = 0.0, model: str = "shapes-vlm", fail_from: int | None = None) -> None:
        self.api_key = api_key
        """When set, requests without `Authorization: Bearer <api_key>` get 401."""
        self.faults: deque[int] = deque(int(f) for f in faults)
        """HTTP statuses still to answer, in order, to the next chat requests (popped as they are served)."""
        self.logprobs = logprobs
        """Whether judge answers carry the `logprobs` a request asks for."""
        self.delay = delay
        """Seconds each chat request takes."""
        self.fail_from = fail_from
        """When set, every chat request after the first `fail_from` gets a 400 (a run cut off midway)."""
        self.served = 0
        """Chat requests received so far."""
        self.model = model
        """The model `GET /v1/models` lists (chat answers echo the requested one)."""
        self.lock = threading.Lock()
        self.requests: list[Received] = []
        self.in_flight = self.max_in_flight = 0
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ChatServer:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="chat-server")
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = self._thread = None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
