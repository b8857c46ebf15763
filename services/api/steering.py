"""The service's steering (POST /steer, GET /steer/heads, GET /images/{id}/patches/{p}): the index's SAE inside its
backbone (services.steer.Steerer), loaded on first use, with the heads `actstore serve --steer` named.

Requests are bounded: a body of at most MAX_BODY bytes (BodyLimit), an image of the served store by index, at most
64 edits (services.api.schemas), patch indices inside the grid (checked by sae.edits), and a time bound per request (the steered
forward runs in a worker thread; past the bound the client gets a 503 and the run's result is dropped). Steered
forward passes run one at a time (a splice is a hook on the shared model).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from actstore.errors import ActstoreError, ConfigError, NotFoundError
from services.api.schemas import MAX_EDITS

__all__ = ["MAX_BODY", "NO_STEERING", "BodyLimit", "Steering", "SteeringTimeout", "head_name"]

MAX_BODY = 1 << 20
"""Bytes of a POST /steer body at most (64 edits of a few thousand patch indices fit well inside)."""
NO_STEERING = "this service does not steer: start it with --steer HEAD (model, zeroshot[:FILE], probe:DIR, vlm)"


class SteeringTimeout(ActstoreError, TimeoutError):
    """A steering request ran past the service's time bound (503)."""


def head_name(spec: str) -> str:
    """The name a head spec is served under: model, zeroshot, vlm, probe:<folder name>."""
    kind, _, arg = spec.partition(":")
    return f"probe:{arg.rstrip('/').rsplit('/', 1)[-1]}" if kind == "probe" else kind


class Steering:
    """The steering state of one app: which heads, and the Steerer (built on first use, once)."""

    def __init__(self, sae: str, store: str, heads: Sequence[str], storage_options: dict[str, Any] | None = None,
                 timeout_s: float = 30.0, device: str = "cpu") -> None:
        self.sae, self.store, self.device = sae, store, device
        self.storage_options = dict(storage_options or {})
        self.timeout_s = timeout_s
        self.specs: dict[str, str] = {}
        for spec in heads:
            name = head_name(spec)
            if name in self.specs:
                raise ConfigError(f"--steer names two heads called {name!r}")
            self.specs[name] = spec
        self._steerer: Any = None
        self._lock = threading.Lock()

    def steerer(self) -> Any:
        """The Steerer (torch, the backbone and the SAE load on the first call)."""
        with self._lock:
            if self._steerer is None:
                from services.steer import Steerer

                self._steerer = Steerer(self.sae, self.store, self.device, self.storage_options)
            return self._steerer

    def head(self, name: str) -> Any:
        if name not in self.specs:
            raise NotFoundError(f"head {name!r} is not served here; heads: {', '.join(self.specs)}")
        return self.steerer().head(self.specs[name])

    def heads(self) -> dict[str, Any]:
        """What the dashboards need: each head's kind and classes, the grid, the SAE's width, the limits."""
        s = self.steerer()
        heads = []
        for name in self.specs:
            h = self.head(name)
            heads.append({"name": name, "kind": h.kind, "classes": h.classes})
        layout = s.layout
        return {"heads": heads, "grid": list(layout.grid), "cls": bool(layout.cls), "d_sae": s.model.sae.cfg.d_sae,
                "layer": s.model.layer, "tokens": s.model.tokens, "max_edits": MAX_EDITS,
                "timeout_s": self.timeout_s}

    def _steer(self, body: dict[str, Any]) -> dict[str, Any]:
        from sae.edits import FeatureEdit

        s = self.steerer()
        head = self.head(body["head"])
        edits = s.edits([FeatureEdit(e["feature"], e["op"], e["value"], e["where"] if isinstance(e["where"], str)
                                     else tuple(e["where"])) for e in body["edits"]])
        images = s.image(int(body["image"]))
        out = s.steer(images, edits, head, prompt=body.get("prompt"), n=body.get("responses", 5),
                      temperature=body.get("temperature", 0.7), seed=body.get("seed", 0),
                      max_new_tokens=body.get("max_new_tokens", 24))
        return {"image": body["image"], "head": body["head"], "kind": head.kind,
                "classes": head.classes, "edits": [str(e) for e in edits], **out}

    async def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The before/after of one request, within the time bound."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._steer, body), self.timeout_s)
        except TimeoutError:
            raise SteeringTimeout(f"steering took longer than {self.timeout_s:g} s; try fewer edits or later") \
                from None

    async def patch_features(self, image: int, patch: int) -> dict[str, Any]:
        s = await asyncio.to_thread(self.steerer)
        found = await asyncio.to_thread(s.patch_features, image, patch)
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
