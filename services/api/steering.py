"""The service's steering (POST /steer, GET /steer/heads, GET /images/{id}/patches/{p}): the index's SAE inside its
backbone (services.steer.Steerer), loaded on first use, with the heads `actstore serve --steer` named.

Requests are bounded: a body of at most MAX_BODY bytes (BodyLimit), an image of the served store by index, at most
64 edits (services.api.schemas), patch indices inside the grid (checked by sae.edits), and in time and number:

- slots: at most `SteerOptions.slots` steering requests are in flight in a worker (running, or waiting for the model,
  which steers one request at a time: a splice is a hook on the shared model); one more is refused at once with a 429
  and `Retry-After: SteerOptions.retry_after_s`, so a burst never builds a queue that later requests wait behind;
- time: a request past `SteerOptions.timeout_s` is stopped where it stands (between the before and after passes,
  while it waits for the model, at a VLM's next generated token) and answered 503 once it has stopped, so its slot
  is free again when the client hears of it;
- the event loop never runs torch: the model and the heads load, and the requests steer, in the worker's one steering
  thread (the load once: concurrent first requests wait on that one load, and other routes keep answering
  meanwhile). Runs wait their turn in its queue, where one past its bound is dropped without starting;
- the CPU goes to the event loop first: the steering thread runs at the lowest priority (`SteerOptions.nice`), and
  with `SteerOptions.threads` torch's CPU threads (`actstore serve` leaves a core to each worker's event loop; on a busy
  2-core machine a request of the tests' tiny VLM took 25 ms with one thread and 0.2-2.9 s with two, measured).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from actstore.errors import ConfigError, NotFoundError
from services.api.errors import SteeringBusy, SteeringTimeout
from services.api.schemas import MAX_EDITS

__all__ = ["MAX_BODY", "NO_STEERING", "BodyLimit", "SteerOptions", "Steering", "head_name", "steer_device"]

MAX_BODY = 1 << 20
"""Bytes of a POST /steer body at most (64 edits of a few thousand patch indices fit well inside)."""
NO_STEERING = "this service does not steer: start it with --steer HEAD (model, zeroshot[:FILE], probe:DIR, vlm)"
_DEVICE = re.compile(r"auto|cpu|(cuda|mps|xpu)(:\d+)?")


@dataclass(frozen=True)
class SteerOptions:
    """How one worker steers: where the model runs, how many requests it takes on, how long each may take."""

    timeout_s: float = 30.0
    """Seconds a steering request may take, model loading included; past it the request is stopped and answered 503."""
    device: str = "auto"
    """Where the backbone, the SAE and the heads run: auto (cuda when present, else cpu), cpu, cuda, cuda:N..."""
    slots: int = 2
    """Steering requests in flight per worker at most (one runs, the others wait for the model); one more gets a
    429 at once."""
    retry_after_s: int = 2
    """The Retry-After (seconds) of that 429."""
    threads: int | None = None
    """torch's CPU threads in this worker (torch.set_num_threads); None: torch's default. `actstore serve` leaves a
    core to each worker's event loop (see ServeConfig.steer_threads)."""
    nice: int = 19
    """The steering thread's CPU priority (Linux nice, 0-19; torch's threads it starts inherit it): 19, the lowest,
    lets the worker's event loop (and the rest of the machine) go first; 0 shares the CPU evenly. Measured by
    benchmarks/bench_steer_load.py on 2 cores (other work running): /features p99 under 32 steering clients 6-8 ms at
    0, 5-6.5 ms at 10, 2.5-4.4 ms at 19, against 1.1-1.6 ms unloaded; at 19 steering yields to the other work too."""

    fidelity_check: bool = True
    """Check, when the model loads, that the rebuilt backbone makes the store's activations (services.spliced); off:
    steer anyway (a warning is logged)."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"steer_timeout must be > 0, got {self.timeout_s}")
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise ConfigError(f"steer_slots must be an integer >= 1, got {self.slots!r}")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            raise ConfigError(f"steer_retry_after must be an integer >= 0 (seconds), got {self.retry_after_s!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"steer_threads must be an integer >= 1, got {self.threads!r}")
        if isinstance(self.nice, bool) or not isinstance(self.nice, int) or not 0 <= self.nice <= 19:
            raise ConfigError(f"steer_nice must be an integer from 0 to 19, got {self.nice!r}")
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"steer_device must be auto, cpu, cuda, cuda:N, mps or xpu, got {self.device!r}")


def head_name(spec: str) -> str:
    """The name a head spec is served under: model, zeroshot, vlm, probe:<folder name>."""
    kind, _, arg = spec.partition(":")
    return f"probe:{arg.rstrip('/').rsplit('/', 1)[-1]}" if kind == "probe" else kind


def steer_device(device: str) -> str:
    """`device`, with auto resolved; a CUDA device where torch sees none is a one-line error (imports torch)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--steer-device {device}: torch sees no CUDA device here; use cpu or auto")
    return device


def _background(nice: int) -> None:
    """This thread (the steering thread; torch's CPU threads it starts inherit it) at CPU priority `nice`, so that the
    worker's event loop gets a core first. Linux only (elsewhere a thread has no nice value of its own)."""
    if nice and sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError:  # a sandbox may refuse it: steering still works, at the loop's priority
            pass


@dataclass(frozen=True)
class _Loaded:
    steerer: Any
    """services.steer.Steerer"""
    heads: dict[str, Any]
    """The served heads by name (services.steer.heads)."""


class Steering:
    """The steering state of one app (one worker): which heads, the model (loaded on first use, once), the slots."""

    def __init__(self, sae: str, store: str, heads: Sequence[str], storage_options: dict[str, Any] | None = None,
                 options: SteerOptions | None = None) -> None:
        from actstore.store import ActivationStore
        from sae.checkpoint import check_saved_origin

        self.sae, self.store = sae, store
        self.storage_options = dict(storage_options or {})
        self.options = options or SteerOptions()
        with ActivationStore(store, self.storage_options) as opened:  # refuse another model's SAE at start
            check_saved_origin(sae, opened, self.storage_options)
        self.specs: dict[str, str] = {}
        for spec in heads:
            name = head_name(spec)
            if name in self.specs:
                raise ConfigError(f"--steer names two heads called {name!r}")
            self.specs[name] = spec
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer")
        """Loads the model and runs the requests, one at a time (the others wait in its queue)."""
        self._slots = threading.BoundedSemaphore(self.options.slots)
        self._in_flight = 0
        self._count = threading.Lock()
        self._loading: Future | None = None
        self._load_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Steering requests holding a slot now."""
        return self._in_flight

    @property
    def state(self) -> str:
        """The model's: idle (not asked for yet), loading, ready, or failed (the next request loads it again)."""
        done = self._loading
        if done is None:
            return "idle"
        if not done.done():
            return "loading"
        return "failed" if done.exception() is not None else "ready"

    @property
    def loaded(self) -> Any:
        """The Steerer once ready, else None (nothing is started)."""
        return self._loading.result().steerer if self.state == "ready" else None

    def _load(self) -> _Loaded:
        import torch

        from services.steer import Steerer

        _background(self.options.nice)
        if self.options.threads is not None:
            torch.set_num_threads(self.options.threads)
        steerer = Steerer(self.sae, self.store, steer_device(self.options.device), self.storage_options,
                          fidelity_check=self.options.fidelity_check)
        return _Loaded(steerer, {name: steerer.head(spec) for name, spec in self.specs.items()})

    async def _model(self, deadline: float) -> _Loaded:
        """The loaded model and heads; the first call starts the one load (a failed load is retried by the next
        call), every call waits for it off the event loop, until `deadline` (time.monotonic())."""
        with self._load_lock:
            if self._loading is None or self._loading.done() and self._loading.exception() is not None:
                self._loading = self._thread.submit(self._load)
            loading = self._loading
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(loading)), deadline - time.monotonic())
        except TimeoutError:
            raise SteeringTimeout(f"the steering model is still loading after {self.options.timeout_s:g} s; "
                                  "try again shortly") from None

    def _deadline(self) -> float:
        return time.monotonic() + self.options.timeout_s

    async def heads(self) -> dict[str, Any]:
        """What the dashboards need: each head's kind and classes, the grid, the SAE's width, the limits."""
        loaded = await self._model(self._deadline())
        s = loaded.steerer
        heads = [{"name": name, "kind": h.kind, "classes": h.classes} for name, h in loaded.heads.items()]
        return {"heads": heads, "grid": list(s.layout.grid), "cls": bool(s.layout.cls), "d_sae": s.model.sae.cfg.d_sae,
                "layer": s.model.layer, "tokens": s.model.tokens, "max_edits": MAX_EDITS,
                "timeout_s": self.options.timeout_s, "slots": self.options.slots, "device": str(s.device)}

    def _take_slot(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise SteeringBusy(f"{self.options.slots} steering requests are in flight in this worker; retry in "
                               f"{self.options.retry_after_s} s", self.options.retry_after_s)
        with self._count:
            self._in_flight += 1

    def _free_slot(self, *_: Any) -> None:
        with self._count:
            self._in_flight -= 1
        self._slots.release()

    @staticmethod
    def _steer(loaded: _Loaded, body: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
        from sae.edits import FeatureEdit

        s, head = loaded.steerer, loaded.heads[body["head"]]
        edits = s.edits([FeatureEdit(e["feature"], e["op"], e["value"], e["where"] if isinstance(e["where"], str)
                                     else tuple(e["where"])) for e in body["edits"]])
        images = s.image(int(body["image"]))
        out = s.steer(images, edits, head, cancel=cancel, prompt=body.get("prompt"), n=body.get("responses", 5),
                      temperature=body.get("temperature", 0.7), seed=body.get("seed", 0),
                      max_new_tokens=body.get("max_new_tokens", 24))
        return {"image": body["image"], "head": body["head"], "kind": head.kind,
                "classes": head.classes, "edits": [str(e) for e in edits], **out}

    async def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The before/after of one request: a slot (else a 429 at once), then the run within the time bound (else
        it is stopped, and once it has stopped, a 503)."""
        if body["head"] not in self.specs:
            raise NotFoundError(f"head {body['head']!r} is not served here; heads: {', '.join(self.specs)}")
        deadline = self._deadline()
        self._take_slot()
        cancel = threading.Event()
        try:
            loaded = await self._model(deadline)
            job = self._thread.submit(self._steer, loaded, body, cancel)
        except BaseException:
            self._free_slot()
            raise
        job.add_done_callback(self._free_slot)  # before the request hears: the slot is free when it does
        waiter = asyncio.wrap_future(job)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), deadline - time.monotonic())
        except TimeoutError:
            from services.steer.run import Cancelled  # torch is imported by now: the model has loaded

            cancel.set()  # running: it stops at its next pass, token or wait for the model
            job.cancel()  # still queued: it never starts
            await asyncio.wait([waiter])
            if not job.cancelled() and not isinstance(waiter.exception(), Cancelled):
                return waiter.result()  # it finished (or failed) before it saw the cancel
            raise SteeringTimeout(f"steering took longer than {self.options.timeout_s:g} s and was stopped; try "
                                  "fewer edits, fewer or shorter answers, or later") from None
        except asyncio.CancelledError:  # the server is going away: stop the work too
            cancel.set()
            job.cancel()
            raise

    async def patch_features(self, image: int, patch: int) -> dict[str, Any]:
        loaded = await self._model(self._deadline())
        found = await asyncio.to_thread(loaded.steerer.patch_features, image, patch)
        return {"image": image, "patch": patch, "features": [{"feature": f, "value": v} for f, v in found]}


class BodyLimit:
    """ASGI middleware: a POST to `path` must say its length (411) and keep under `max_bytes` (413), before any of
    it is read; every other request passes untouched."""

    def __init__(self, app: Any, path: str = "/steer", max_bytes: int = MAX_BODY) -> None:
        self.app, self.path, self.max_bytes = app, path, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            length = dict(scope["headers"]).get(b"content-length")
            status = 411 if length is None or not length.isdigit() else 413 if int(length) > self.max_bytes else 0
            if status:
                from fastapi.responses import JSONResponse

                detail = ("a POST /steer body must state its Content-Length" if status == 411 else
                          f"a POST /steer body is at most {self.max_bytes} bytes")
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
