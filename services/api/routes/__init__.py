"""One APIRouter per resource: `features`, `images`, `stats` (with /healthz), `atlas`, `abstraction`.

Each module has verb_noun handlers and a `router(**options)` that lays them out; create_app builds the
routers per app, since the token decides their dependencies. Handlers return orjson bytes
(`json_response`), so FastAPI neither validates nor re-serializes a response; the models in
services.api.schemas describe the responses in the OpenAPI schema. `name=` keeps each route's
operationId as the schema has always published it.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response

from services.api.schemas import Error

__all__ = ["NOT_FOUND", "json_response"]

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Error}}
"""The documented error response of the API routes (with a token, deps.secured adds 401)."""


def json_response(data: Any) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")
