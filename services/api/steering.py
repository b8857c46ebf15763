"""The service's steering (POST /steer, GET /steer/heads, GET /images/{id}/patches/{p}): the index's SAE inside its
backbone (services.steer.Steerer), loaded on first use, with the heads `actstore serve --steer` named.

Requests are bounded: a body of at most MAX_BODY bytes (BodyLimit), an image of the served store by index, at most
64 edits (services.api.schemas), patch indices inside the grid (checked by sae.edits), and in time and number:

- slots: at most `SteerOptions.slots` steering requests are in flight in a worker (running, or waiting for the model,
  which steers one request at a time: a splice is a hook on the shared model); one more is refused at once with a 429
  and `Retry-After: SteerOptions.retry_after_s`, so a burst never builds a queue that later requests wait behind;
- time: a request past `SteerOptions.timeout_s` is stopped where it stands (between the before and after passes,
  while it waits for the model, at a VLM's next generated token, at a generator's next denoising step) and answered
  503 once it has stopped, so its slot is free again when the client hears of it;
- the event loop never runs torch, nor shares the GIL with it: the model and the heads load, and the requests steer,
  in the worker's one steering process (spawned on the first steering request; the load once: concurrent first
  requests wait on that one load, and other routes keep answering meanwhile). A steering thread in the worker held
  the GIL between its torch calls and stalled the event loop: /features p99 under 32 steering clients was 3.8-4x its
  unloaded p99 with a thread, 1.4x with the process (benchmarks/bench_steer_load.py, 2 cores). Runs wait their turn
  in its queue, where one past its bound never starts (each slot's cancel flag lives in shared memory);
- the CPU: the steering process runs at `SteerOptions.nice` with `SteerOptions.threads` torch CPU threads
  (`actstore serve` leaves a core to each worker's event loop; on a busy 2-core machine a request of the tests' tiny
  VLM took 25 ms with one thread and 0.2-2.9 s with two, measured);
- the steering process ends with its worker (it watches its parent), and with the app (`Steering.close`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from actstore.errors import ConfigError, NotFoundError
from services.api.errors import SteeringBusy, SteeringTimeout
from services.api.schemas import MAX_EDITS

__all__ = ["MAX_BODY", "NO_STEERING", "BodyLimit", "SteerOptions", "Steering", "head_name", "served_heads",
           "steer_device"]

MAX_BODY = 1 << 20
"""Bytes of a POST /steer body at most (64 edits of a few thousand patch indices fit well inside)."""
NO_STEERING = ("this service does not steer: start it with --steer HEAD (model, zeroshot[:FILE], probe:DIR, vlm, "
               "generate[:PIPELINE[@ADAPTER]])")
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
    """torch's CPU threads in the steering process (torch.set_num_threads); None: torch's default. `actstore serve`
    leaves a core to each worker's event loop (see ServeConfig.steer_threads)."""
    nice: int = 0
    """The steering process's CPU priority (Linux nice, 0-19). Measured by benchmarks/bench_steer_load.py on 2 cores:
    /features p99 under 32 steering clients 1.6 ms at 0 and 1.8 ms at 19, against 1.3-1.4 ms unloaded; with steering
    in a thread of the worker it was 6-8 ms at 0 and 2.5-4.7 ms at 19. Up to 19 lets the rest of the machine go
    first, and steering then misses its bound when the machine is busy."""

    fidelity_check: bool = True
    """Check, when the model loads, that the rebuilt backbone makes the store's activations (services.spliced); off:
    steer anyway (a warning is logged)."""
    trust_remote_code: bool = False
    """Run the modeling code an hf: model ships (a remote-code VLM's tower: actstore.extract.remote_vlm)."""

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
    """The name a head spec is served under: model, zeroshot, vlm, generate, probe:<folder name>."""
    kind, _, arg = spec.partition(":")
    return f"probe:{arg.rstrip('/').rsplit('/', 1)[-1]}" if kind == "probe" else kind


def served_heads(sae: str, store: str, heads: Sequence[str], storage_options: dict[str, Any],
                 layer: str | None = None) -> dict[str, str]:
    """The head specs by the name each is served under, checked (two heads of one name are refused), once the index's
    SAE is checked against its store's model and the index's `layer` (from its config: no weights read, no process
    started)."""
    from actstore.store import ActivationStore
    from sae.checkpoint import check_saved_origin

    with ActivationStore(store, storage_options) as opened:  # refuse another model's SAE at start
        check_saved_origin(sae, opened, storage_options, layer)
    specs: dict[str, str] = {}
    for spec in heads:
        name = head_name(spec)
        if name in specs:
            raise ConfigError(f"--steer names two heads called {name!r}")
        specs[name] = spec
    return specs


def steer_device(device: str) -> str:
    """`device`, with auto resolved; a CUDA device where torch sees none is a one-line error (imports torch)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--steer-device {device}: torch sees no CUDA device here; use cpu or auto")
    return device


@dataclass(frozen=True)
class _Loaded:
    steerer: Any
    """services.steer.Steerer"""
    heads: dict[str, Any]
    """The served heads by name (services.steer.heads)."""


_CHILD: dict[str, Any] = {}
"""In the steering process: its cancel flags (one per slot) and, once loaded, the _Loaded model."""
_WATCH_S = 0.5
"""How often the steering process checks that its worker is still there."""
_ALL = -1
"""A cancel flag's value that stops whatever runs in its slot (the service is closing)."""


class _Flag:
    """One request's cancel, read as threading.Event.is_set (what Steerer.steer polls): its slot's flag in shared
    memory holds the id of the request to stop, so a late cancel of the slot's previous request never stops the
    next one."""

    def __init__(self, index: int, request: int) -> None:
        self.index, self.request = index, request

    def is_set(self) -> bool:
        return _CHILD["flags"][self.index] in (self.request, _ALL)


def _child_start(flags: Any, nice: int, threads: int | None, parent: int) -> None:
    """The steering process's start: the shared cancel flags, its CPU priority and torch's threads, and a watch on
    its worker: when that is gone (stopped, killed), so is this process, whatever it was doing."""
    import torch

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_S)
        os._exit(0)

    threading.Thread(target=watch, name="steer-parent-watch", daemon=True).start()
    _CHILD["flags"] = flags
    if nice and sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:  # a sandbox may refuse it: steering still works, at the loop's priority
            pass
    if threads is not None:
        torch.set_num_threads(threads)


def _child_load(sae: str, store: str, storage_options: dict[str, Any], options: SteerOptions,
                specs: dict[str, str], layer: str | None) -> dict[str, Any]:
    """Load the model and heads in the steering process; what GET /steer/heads shows of them."""
    from services.steer import Steerer

    s = Steerer(sae, store, steer_device(options.device), storage_options, fidelity_check=options.fidelity_check,
                layer=layer, trust_remote_code=options.trust_remote_code)
    loaded = _Loaded(s, {name: s.head(spec) for name, spec in specs.items()})
    _CHILD["loaded"] = loaded
    return {"heads": [{"name": name, "kind": h.kind, "classes": h.classes} for name, h in loaded.heads.items()],
            "grid": list(s.layout.grid), "cls": bool(s.layout.cls), "d_sae": s.model.sae.cfg.d_sae,
            "layer": s.model.layer, "tokens": s.model.tokens, "device": str(s.device)}


def _child_steer(body: dict[str, Any], slot: int, request: int) -> dict[str, Any]:
    from sae.edits import FeatureEdit
    from services.steer.run import Cancelled

    cancel = _Flag(slot, request)
    if cancel.is_set():  # its bound passed while it was queued: never start
        raise Cancelled("the steering run was stopped")
    loaded = _CHILD["loaded"]
    s, head = loaded.steerer, loaded.heads[body["head"]]
    edits = s.edits([FeatureEdit(e["feature"], e["op"], e["value"], e["where"] if isinstance(e["where"], str)
                                 else tuple(e["where"])) for e in body["edits"]])
    images = s.image(int(body["image"]))
    out = s.steer(images, edits, head, cancel=cancel, prompt=body.get("prompt"), n=body.get("responses", 5),
                  temperature=body.get("temperature", 0.7), seed=body.get("seed", 0),
                  max_new_tokens=body.get("max_new_tokens", 24), steps=body.get("steps", 25),
                  guidance=body.get("guidance"), size=body.get("size"))
    for side in ("before", "after"):  # a generate head's embeddings stay here: the answer carries their cosine
        out[side].pop("embedding", None)
    return {"image": body["image"], "head": body["head"], "kind": head.kind,
            "classes": head.classes, "edits": [str(e) for e in edits], **out}


def _child_patch(image: int, patch: int) -> list[tuple[int, float]]:
    return _CHILD["loaded"].steerer.patch_features(image, patch)


class Steering:
    """The steering state of one app (one worker): which heads, the steering process and its model (started and
    loaded on first use, once), the slots.

    The model runs in a process of its own (spawned, one per worker), not in a thread of the worker: a steering run
    holds the GIL between its torch calls (a VLM's generation loop above all), and a thread holding the GIL while the
    OS runs something else stalled the event loop for milliseconds (benchmarks/bench_steer_load.py). Requests go to
    that process one at a time; a request's time bound reaches it through a cancel flag per slot in shared memory.
    """

    def __init__(self, sae: str, store: str, heads: Sequence[str], storage_options: dict[str, Any] | None = None,
                 options: SteerOptions | None = None, layer: str | None = None) -> None:
        self.sae, self.store, self.layer = sae, store, layer
        self.storage_options = dict(storage_options or {})
        self.options = options or SteerOptions()
        self.specs = served_heads(sae, store, heads, self.storage_options, layer)
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._flags = self._context.RawArray("q", self.options.slots)
        self._requests = itertools.count(1)
        self._pool: ProcessPoolExecutor | None = None
        self._free = list(range(self.options.slots))
        """Slots not in flight (their indices into the cancel flags)."""
        self._count = threading.Lock()
        self._loading: Future | None = None
        self._load_lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Steering requests holding a slot now."""
        return self.options.slots - len(self._free)

    @property
    def state(self) -> str:
        """The model's: idle (not asked for yet), loading, ready, or failed (the next request loads it again)."""
        done = self._loading
        if done is None:
            return "idle"
        if not done.done():
            return "loading"
        return "failed" if done.exception() is not None else "ready"

    def close(self) -> None:
        """Stop the steering process (every run in flight told to stop first)."""
        for i in range(self.options.slots):
            self._flags[i] = _ALL
        with self._load_lock:
            pool, self._pool, self._loading = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _start(self) -> Future:
        """The load, in a new steering process when there is none (or it died)."""
        if self._pool is None:
            self._flags[:] = [0] * self.options.slots
            self._pool = ProcessPoolExecutor(1, mp_context=self._context, initializer=_child_start,
                                             initargs=(self._flags, self.options.nice, self.options.threads,
                                                       os.getpid()))
        return self._pool.submit(_child_load, self.sae, self.store, self.storage_options, self.options, self.specs,
                                 self.layer)

    async def _model(self, deadline: float) -> dict[str, Any]:
        """What the loaded model shows (GET /steer/heads); the first call starts the one load (a failed load is
        retried by the next call), every call waits for it off the event loop, until `deadline`."""
        with self._load_lock:
            if self._loading is None or self._loading.done() and self._loading.exception() is not None:
                if self._loading is not None and isinstance(self._loading.exception(), BrokenProcessPool):
                    self._pool = None
                self._loading = self._start()
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
        info = await self._model(self._deadline())
        return {**info, "max_edits": MAX_EDITS, "timeout_s": self.options.timeout_s, "slots": self.options.slots}

    def _take_slot(self) -> int:
        with self._count:
            if not self._free:
                raise SteeringBusy(f"{self.options.slots} steering requests are in flight in this worker; retry in "
                                   f"{self.options.retry_after_s} s", self.options.retry_after_s)
            return self._free.pop()

    def _free_slot(self, slot: int) -> None:
        with self._count:
            self._free.append(slot)

    def _submit(self, fn: Any, *args: Any) -> Future:
        try:
            return self._pool.submit(fn, *args)
        except BrokenProcessPool:  # the process died (killed, out of memory): the next request starts a new one
            with self._load_lock:
                self._pool, self._loading = None, None
            raise SteeringTimeout("the steering process stopped; the next request starts it again") from None

    async def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The before/after of one request: a slot (else a 429 at once), then the run within the time bound (else
        it is stopped, and once it has stopped, a 503)."""
        if body["head"] not in self.specs:
            raise NotFoundError(f"head {body['head']!r} is not served here; heads: {', '.join(self.specs)}")
        deadline = self._deadline()
        slot, request = self._take_slot(), next(self._requests)
        try:
            await self._model(deadline)
            job = self._submit(_child_steer, body, slot, request)
        except BaseException:
            self._free_slot(slot)
            raise
        job.add_done_callback(lambda _: self._free_slot(slot))  # before the request hears: free when it does
        waiter = asyncio.wrap_future(job)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), deadline - time.monotonic())
        except TimeoutError:
            from services.steer.run import Cancelled

            self._flags[slot] = request  # running: it stops at its next pass or token; queued: it never starts
            await asyncio.wait([waiter])
            if not isinstance(waiter.exception(), Cancelled):
                return waiter.result()  # it finished (or failed) before it saw the cancel
            raise SteeringTimeout(f"steering took longer than {self.options.timeout_s:g} s and was stopped; try "
                                  "fewer edits, fewer or shorter answers, fewer denoising steps or smaller pictures, "
                                  "or later") from None
        except asyncio.CancelledError:  # the server is going away: stop the work too
            self._flags[slot] = request
            raise

    async def patch_features(self, image: int, patch: int) -> dict[str, Any]:
        await self._model(self._deadline())
        found = await asyncio.wrap_future(self._submit(_child_patch, image, patch))
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
