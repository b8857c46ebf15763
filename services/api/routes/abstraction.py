"""/abstraction: the model's abstraction profile (from `actstore abstraction`), when the index has one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from actstore.errors import NotFoundError
from services.api.deps import reader_of
from services.api.routes import NOT_FOUND, json_response
from services.api.schemas import AbstractionProfile

__all__ = ["read_abstraction_profile", "router"]

NO_ABSTRACTION = ("this index has no abstraction profile: run `actstore abstraction --index DIR --parents FILE.csv` "
                  "(or --columns c1,c2,...) on it, then restart the service")


async def read_abstraction_profile(request: Request) -> Response:
    """abstraction.json: the label hierarchy's source, min_share, k, and features per depth (the profile); each
    feature's own level is in GET /features/{id}."""
    abstraction = reader_of(request).abstraction
    if abstraction is None:
        raise NotFoundError(NO_ABSTRACTION)
    return json_response(abstraction.info)


def router(**options: Any) -> APIRouter:
    """The /abstraction route; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(**options)
    r.add_api_route("/abstraction", read_abstraction_profile, response_model=AbstractionProfile,
                    responses=NOT_FOUND, name="abstraction")
    return r
