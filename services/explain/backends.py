"""The vision-language models `actstore explain` asks for explanations and judgements: `open_backend(spec)`.

Two kinds, one interface (Backend): `ask` runs prompts (images, then text) and yields each answer as it finishes;
`judge` asks the judge's yes-or-no question and yields Verdicts, with P(yes) where the backend gives it.

- `openai:MODEL` (OpenAIBackend): any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, hosted APIs).
  Images go as data URLs; the key is read from one environment variable only (none: no Authorization header, as a
  local vLLM needs) and never appears in `model`, a repr or an error. `concurrency` requests in flight; 429, 5xx
  and connection errors retried with exponential backoff and jitter (Retry-After honoured, capped), other 4xx fail
  at once. HTTP through `requests` (which Ray brings; it honours HTTPS_PROXY and NO_PROXY), one session per thread.
- `hf:MODEL` (HFBackend): a transformers VLM (a hub id or a folder), greedy answers, P(yes) from one forward pass.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from actstore.errors import AccessDeniedError, ConfigError, StorageError

__all__ = ["DEFAULT_ENDPOINT", "Backend", "HFBackend", "OpenAIBackend", "Prompt", "Verdict", "open_backend"]

DEFAULT_ENDPOINT = "https://api.openai.com/v1"
_MAX_WAIT = 60.0  # seconds: the longest backoff or Retry-After a retry waits
_TOP_LOGPROBS = 10
_T = TypeVar("_T")


@dataclass(frozen=True)
class Prompt:
    """One user turn: images (encoded PNG or JPEG bytes) then the text."""

    images: tuple[bytes, ...]
    text: str


@dataclass(frozen=True)
class Verdict:
    """A judge's answer to a yes-or-no question."""

    yes: bool
    p_yes: float | None
    """The backend's probability of "yes", when it gives one (then yes == (p_yes >= 0.5))."""


class Backend(Protocol):
    """A VLM that answers prompts."""

    model: str
    """The id recorded in the output: "openai:MODEL@HOST" (host and port only: no path, no key) or "hf:MODEL"."""
    probabilities: bool
    """Whether judge() gives p_yes."""

    def ask(self, prompts: Sequence[Prompt], max_tokens: int = 64) -> Iterator[tuple[int, str]]:
        """Run the prompts (concurrently where the backend can); yield (position in prompts, answer) as they finish."""
        ...

    def judge(self, prompts: Sequence[Prompt]) -> Iterator[tuple[int, Verdict]]:
        """The verdicts on yes-or-no prompts, as ask yields answers."""
        ...

    def close(self) -> None:
        ...


def open_backend(spec: str, *, endpoint: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 retries: int = 6, timeout: float = 120.0, device: str = "cpu", backoff: float = 1.0) -> Backend:
    """The backend `spec` names: `openai:MODEL` at `endpoint` (default DEFAULT_ENDPOINT) with the key in the
    environment variable `api_key_env`, or `hf:MODEL` (a hub id or a folder) on `device`."""
    kind, _, name = str(spec).partition(":")
    if kind == "openai" and name.strip():
        return OpenAIBackend(name.strip(), endpoint=endpoint or DEFAULT_ENDPOINT, api_key_env=api_key_env,
                             concurrency=concurrency, retries=retries, timeout=timeout, backoff=backoff)
    if kind == "hf" and name.strip():
        return HFBackend(name.strip(), device=device)
    raise ConfigError(f"unknown VLM {spec!r}; use openai:MODEL (an OpenAI-compatible endpoint) or hf:MODEL "
                      "(a transformers VLM: hub id or folder)")


def _image_type(data: bytes, k: int) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    raise ConfigError(f"prompt image {k} is neither PNG nor JPEG")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _server_message(body: bytes) -> str:
    """The error message in a response body: OpenAI's {"error": {"message"}}, vLLM's {"message"}, else the text."""
    try:
        value = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    error = value.get("error", value) if isinstance(value, dict) else value
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or value
    return error if isinstance(error, str) else json.dumps(error)


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None without one."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _p_yes(choice: dict[str, Any]) -> float | None:
    """P(yes) / (P(yes) + P(no)) over the first generated token's top logprobs (tokens stripped and lower-cased),
    or None when the answer has no logprobs or neither token is among them."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content or not isinstance(content[0], dict):
        return None
    p = {"yes": 0.0, "no": 0.0}
    for item in content[0].get("top_logprobs") or [content[0]]:
        token = str(item.get("token", "")).strip().lower()
        if token in p and item.get("logprob") is not None:
            p[token] += math.exp(float(item["logprob"]))
    total = p["yes"] + p["no"]
    return p["yes"] / total if total > 0 else None


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint; see the module docstring.

    `probabilities` is True until a judge answer comes back without usable logprobs (a server that ignores them),
    False from then on; each Verdict's p_yes says it for that verdict. `backoff` is the first retry's wait in
    seconds (doubled each retry, times a jitter in [0.5, 1], at most 60 s). Requests send `max_tokens` and
    `temperature: 0`, which vLLM, SGLang and chat models take (OpenAI's reasoning models refuse both).
    """

    def __init__(self, name: str, *, endpoint: str = DEFAULT_ENDPOINT, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, retries: int = 6, timeout: float = 120.0, backoff: float = 1.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"endpoint must be an http(s) URL such as {DEFAULT_ENDPOINT}, got {parts.scheme}://"
                              f"{parts.hostname or ''}{parts.path}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {retries!r}")
        if not timeout > 0 or not backoff >= 0:
            raise ConfigError(f"timeout must be > 0 and backoff >= 0, got {timeout} and {backoff}")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.name, self.host, self.model = name, host, f"openai:{name}@{host}"
        self.concurrency = concurrency
        self.probabilities = True
        self._url = f"{parts.scheme}://{host}{parts.path.rstrip('/')}/chat/completions"  # no user:password@
        self._key_env, self._key = api_key_env, os.environ.get(api_key_env) or None
        self._headers = {"Content-Type": "application/json",
                         **({"Authorization": f"Bearer {self._key}"} if self._key else {})}
        self._retries, self._timeout, self._backoff = retries, float(timeout), float(backoff)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="explain-openai")
        self._local, self._sessions, self._lock = threading.local(), [], threading.Lock()
        self._random = random.Random()

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.model!r}, concurrency={self.concurrency})"

    def _session(self) -> Any:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def _fail(self, error: type[Exception], what: str, detail: str = "", tries: int = 1) -> Exception:
        """One line: status or failure, host, model, the server's message truncated; the key never."""
        text = _one_line(f"{self.model}: {what}{f' after {tries} tries' if tries > 1 else ''}"
                         f"{f': {detail}' if detail else ''}", 300)
        return error(text.replace(self._key, "***") if self._key else text)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The endpoint's JSON answer to `payload`, retried on 429, 5xx and connection errors."""
        import requests

        body = json.dumps(payload).encode()
        for attempt in range(self._retries + 1):
            wait = None
            try:
                response = self._session().post(self._url, data=body, headers=self._headers, timeout=self._timeout)
            except requests.RequestException as e:  # the URL is checked: what is left is the network's or server's
                reason = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's, without the URL
                what = ("timed out" if isinstance(e, requests.Timeout) else
                        "cannot connect" if isinstance(e, requests.ConnectionError) else "a broken answer")
                failure = (StorageError, what, _one_line(str(reason or e)))
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise self._fail(StorageError, "an answer that is not JSON") from None
                failure = (StorageError, f"HTTP {status}", _one_line(_server_message(response.content)))
                if status in (401, 403):
                    raise self._fail(AccessDeniedError, f"HTTP {status} (check the key in ${self._key_env})",
                                     failure[2]) from None
                if status != 429 and status < 500:
                    raise self._fail(ConfigError, *failure[1:]) from None
                wait = _retry_after(response.headers.get("Retry-After"))
            if attempt < self._retries:
                backoff = self._backoff * 2 ** attempt * self._random.uniform(0.5, 1.0)
                time.sleep(min(_MAX_WAIT, backoff if wait is None else wait))
        raise self._fail(*failure, tries=self._retries + 1) from None

    def _chat(self, prompt: Prompt, **options: Any) -> dict[str, Any]:
        """The first choice of the endpoint's answer to one user turn."""
        content = [{"type": "image_url", "image_url": {
            "url": f"data:{_image_type(data, k)};base64,{base64.b64encode(data).decode()}"}}
            for k, data in enumerate(prompt.images)]
        payload = {"model": self.name, "messages": [{"role": "user", "content": [
            *content, {"type": "text", "text": prompt.text}]}], "temperature": 0, **options}
        answer = self._post(payload)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise self._fail(StorageError, "an answer without choices", _one_line(json.dumps(answer)))
        return choices[0]

    def _each(self, prompts: Sequence[Prompt], run: Callable[[Prompt], _T]) -> Iterator[tuple[int, _T]]:
        """run(prompt) for every prompt on the pool, yielded as they finish; what has not started is cancelled
        when the caller stops early or one fails."""
        futures: dict[Future, int] = {self._pool.submit(run, p): i for i, p in enumerate(prompts)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def ask(self, prompts: Sequence[Prompt], max_tokens: int = 64) -> Iterator[tuple[int, str]]:
        def run(prompt: Prompt) -> str:
            return str((self._chat(prompt, max_tokens=max_tokens).get("message") or {}).get("content") or "").strip()

        return self._each(prompts, run)

    def judge(self, prompts: Sequence[Prompt]) -> Iterator[tuple[int, Verdict]]:
        def run(prompt: Prompt) -> Verdict:
            choice = self._chat(prompt, max_tokens=1, logprobs=True, top_logprobs=_TOP_LOGPROBS)
            p_yes = _p_yes(choice)
            if p_yes is None:
                self.probabilities = False
                text = str((choice.get("message") or {}).get("content") or "")
                return Verdict(text.strip().lower().startswith("yes"), None)
            return Verdict(p_yes >= 0.5, p_yes)

        return self._each(prompts, run)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


class HFBackend:
    """A local transformers VLM (AutoProcessor + AutoModelForImageTextToText, the checkpoint's own dtype) on
    `device`: the processor's chat template with the images, then the text; greedy answers (`generate`), and P(yes)
    as the softmax over the next-token logits of "Yes" and "No" (the first token of each as the tokenizer encodes
    them) from one forward pass. One prompt at a time, in order: on a CPU there is nothing to overlap, and a
    batch of prompts with different image counts would need padding the model's processor may not do."""

    probabilities = True

    def __init__(self, name: str, *, device: str = "cpu") -> None:
        import torch
        import transformers

        from actstore.extract.hf import hf_source

        source, where = hf_source(name)
        if source == "builtin":
            raise ConfigError(f"hf:{name} is a vision tower, not a vision-language model; name a VLM's hub id or "
                              "folder")
        try:
            self.device = torch.device(device)
            self.processor = transformers.AutoProcessor.from_pretrained(where)
            self.vlm = transformers.AutoModelForImageTextToText.from_pretrained(where, dtype="auto")
        except (OSError, ValueError, RuntimeError) as e:  # no such repo or file, a model type it cannot load
            raise ConfigError(f"hf:{name}: {_one_line(str(e), 300)}") from None
        self.vlm.to(self.device).eval()
        self.model = f"hf:{name}"
        tokenizer = self.processor.tokenizer
        self._yes_no = [tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No")]
        if self._yes_no[0] == self._yes_no[1]:
            raise ConfigError(f"{self.model}: its tokenizer starts Yes and No with the same token")

    def __repr__(self) -> str:
        return f"HFBackend({self.model!r}, device={str(self.device)!r})"

    def _inputs(self, prompt: Prompt) -> Any:
        from PIL import Image

        from actstore.extract.vlm import FALLBACK_PROMPT

        images = []
        for k, data in enumerate(prompt.images):
            _image_type(data, k)
            with Image.open(io.BytesIO(data)) as image:
                images.append(image.convert("RGB"))
        if self.processor.chat_template:
            text = self.processor.apply_chat_template([{"role": "user", "content": [
                *({"type": "image"} for _ in images), {"type": "text", "text": prompt.text}]}],
                add_generation_prompt=True)
        else:
            text = FALLBACK_PROMPT.format(image="".join(self.processor.image_token for _ in images),
                                          prompt=prompt.text)
        inputs = self.processor(images=images or None, text=text, return_tensors="pt")
        return inputs.to(self.device, dtype=self.vlm.dtype)

    def ask(self, prompts: Sequence[Prompt], max_tokens: int = 64) -> Iterator[tuple[int, str]]:
        import torch

        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for i, prompt in enumerate(prompts):
            inputs = self._inputs(prompt)
            with torch.inference_mode():
                out = self.vlm.generate(**inputs, do_sample=False, max_new_tokens=max_tokens, pad_token_id=pad)
            answer = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            yield i, answer[0].strip()

    def judge(self, prompts: Sequence[Prompt]) -> Iterator[tuple[int, Verdict]]:
        import torch

        for i, prompt in enumerate(prompts):
            with torch.inference_mode():
                logits = self.vlm(**self._inputs(prompt)).logits[0, -1, self._yes_no].float()
            p_yes = float(torch.softmax(logits, dim=0)[0])
            yield i, Verdict(p_yes >= 0.5, p_yes)

    def close(self) -> None:
        """Let the model's memory go (the backend cannot be used after)."""
        self.vlm = self.processor = None
