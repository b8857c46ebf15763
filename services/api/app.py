"""`create_app`: the service over one index folder (and optionally a comparison), wired from its parts (readers,
routes, error handlers)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from services.api.deps import secured
from services.api.errors import add_error_handlers
from services.api.matches import MatchReader
from services.api.reader import IndexReader
from services.api.routes import atlas, features, images, stats, steer
from services.api.steering import BodyLimit, Steering

__all__ = ["STATIC", "TOKEN_ENV", "create_app"]

TOKEN_ENV = "ACTSTORE_TOKEN"
"""Environment variable holding the bearer token when --token is not given."""
STATIC = Path(__file__).parents[1] / "static"
"""The feature browser's files, served at / and /static."""


def create_app(index: str | Path, token: str | None = None, storage_options: dict[str, Any] | None = None,
               compare: str | Path | None = None, steer_heads: Sequence[str] = (), steer_timeout: float = 30.0
               ) -> FastAPI:
    """The service over the index folder at `index`; `token` (or $ACTSTORE_TOKEN) protects the API routes.
    `compare`: a comparison folder (from `actstore compare`) one of whose sides is this index, for the
    features' matches in the other SAE. `steer_heads`: the heads POST /steer may read out (services.steer.heads;
    none: no steering), each request bounded by `steer_timeout` seconds."""
    reader = IndexReader(index, storage_options)
    matches = MatchReader(compare, reader, storage_options) if compare else None
    steering = Steering(reader.meta["sae"], reader.meta["store"], steer_heads, storage_options,
                        steer_timeout) if steer_heads else None
    token = token or os.environ.get(TOKEN_ENV) or None
    app = FastAPI(title="actstore feature service", version="1",
                  description=f"SAE features of layer {reader.meta['layer']} of {reader.meta['store']}.")
    app.state.reader, app.state.matches, app.state.steering = reader, matches, steering
    add_error_handlers(app)
    api = secured(token)
    for router in (stats.health_router(), features.router(**api), images.router(**api), stats.router(**api),
                   atlas.router(**api), steer.router(**api)):
        # the routes themselves, not include_router: FastAPI matches each included router as one more
        # layer on every request (~5 us here, where a feature lookup takes ~90 us)
        app.router.routes.extend(router.routes)

    @app.get("/", include_in_schema=False)
    async def read_browser() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit)
    return app
