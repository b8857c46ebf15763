"""`create_app`: the service over one index folder (and optionally a comparison), wired from its parts (readers,
routes, error handlers). With a token, the API's schema and docs (/openapi.json, /docs, /redoc) are behind it too."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from actstore.config import redact
from services.api.deps import BearerAuth, secured
from services.api.errors import add_error_handlers
from services.api.matches import MatchReader
from services.api.reader import IndexReader
from services.api.routes import abstraction, atlas, features, images, stats, steer
from services.api.steering import BodyLimit, SteerOptions, Steering

__all__ = ["STATIC", "TOKEN_ENV", "create_app"]

TOKEN_ENV = "ACTSTORE_TOKEN"
"""Environment variable holding the bearer token when --token is not given."""
STATIC = Path(__file__).parents[1] / "static"
"""The feature browser's files, served at / and /static."""


def create_app(index: str | Path, token: str | None = None, storage_options: dict[str, Any] | None = None,
               compare: str | Path | None = None, steer_heads: Sequence[str] = (),
               steer_options: SteerOptions | None = None, image_table: str | Path | None = None) -> FastAPI:
    """The service over the index folder at `index`; `token` (or $ACTSTORE_TOKEN) protects the API routes and their
    docs. `compare`: a comparison folder (from `actstore compare`) one of whose sides is this index, for the
    features' matches in the other SAE. `steer_heads`: the heads POST /steer may read out (services.steer.heads;
    none: no steering), with `steer_options`' device, slots and time bound. `image_table`: the image table its
    runner made for all its workers (services.api.reader)."""
    reader = IndexReader(index, storage_options, image_table)
    matches = MatchReader(compare, reader, storage_options) if compare else None
    steering = Steering(reader.meta["sae"], reader.meta["store"], steer_heads, storage_options,
                        steer_options, reader.meta["layer"]) if steer_heads else None
    token = token or os.environ.get(TOKEN_ENV) or None
    docs = {"openapi_url": None, "docs_url": None, "redoc_url": None} if token else {}
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if steering is not None:  # the worker is going away: so does its steering process
            steering.close()

    app = FastAPI(title="actstore feature service", version="1", lifespan=lifespan, **docs,
                  description=f"SAE features of layer {reader.meta['layer']} of {redact(reader.meta['store'])}.")
    app.state.reader, app.state.matches, app.state.steering = reader, matches, steering
    add_error_handlers(app)
    if token:
        _docs_behind(app, token)
    api = secured(token)
    for router in (stats.health_router(), features.router(**api), images.router(**api), stats.router(**api),
                   atlas.router(**api), abstraction.router(**api), steer.router(**api)):
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


def _docs_behind(app: FastAPI, token: str) -> None:
    """FastAPI's /openapi.json, /docs and /redoc, behind the bearer token (they name the store and every route)."""
    guard = [Depends(BearerAuth(token))]

    async def read_openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    async def read_docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    async def read_redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    for path, endpoint in (("/openapi.json", read_openapi), ("/docs", read_docs), ("/redoc", read_redoc)):
        app.add_api_route(path, endpoint, include_in_schema=False, dependencies=guard)
