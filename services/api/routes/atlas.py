"""/atlas: the 2-D map of the SAE's features (from `actstore atlas`), when the index has one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from actstore.errors import NotFoundError
from services.api.deps import reader_of
from services.api.routes import NOT_FOUND
from services.api.schemas import Atlas

__all__ = ["read_atlas", "router"]

NO_ATLAS = "this index has no atlas: run `actstore atlas --index DIR` on it, then restart the service"


async def read_atlas(request: Request) -> Response:
    """UMAP and PCA coordinates of every feature's decoder direction, with its log10 density (null: dead)."""
    body = reader_of(request).atlas
    if body is None:
        raise NotFoundError(NO_ATLAS)
    return Response(body, media_type="application/json")


def router(**options: Any) -> APIRouter:
    """The /atlas route; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(**options)
    r.add_api_route("/atlas", read_atlas, response_model=Atlas, responses=NOT_FOUND, name="atlas")
    return r
