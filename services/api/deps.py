"""What the routes depend on: the index reader (and comparison) the app holds, and the optional bearer-token check.

The reader is read off the request (`reader_of`) rather than injected with `Depends`: FastAPI solves
a dependency on every request (~10 us here, a tenth of a feature lookup), and the reader never changes.
Tests swap it by setting `app.state.reader`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from actstore.errors import NotFoundError
from services.api.errors import Unauthorized
from services.api.matches import MatchReader
from services.api.reader import IndexReader
from services.api.steering import NO_STEERING, Steering
from services.api.schemas import Error

__all__ = ["BearerAuth", "matches_of", "reader_of", "secured", "steering_of"]

NO_COMPARISON = "this service has no comparison: start it with --compare DIR (a folder from `actstore compare`)"


def reader_of(request: Request) -> IndexReader:
    """The app's reader (app.state.reader, set by create_app)."""
    return request.app.state.reader


def matches_of(request: Request) -> MatchReader:
    """The app's comparison (app.state.matches, from --compare); a 404 naming the flag when it has none."""
    matches = request.app.state.matches
    if matches is None:
        raise NotFoundError(NO_COMPARISON)
    return matches


def steering_of(request: Request) -> Steering:
    """The app's steering (app.state.steering, from --steer); a 404 naming the flag when it has none."""
    steering = request.app.state.steering
    if steering is None:
        raise NotFoundError(NO_STEERING)
    return steering


@dataclass(frozen=True)
class BearerAuth:
    """Requires `Authorization: Bearer <token>` (compared in constant time); 401 otherwise (errors.Unauthorized)."""

    token: str

    async def __call__(self, creds: Annotated[HTTPAuthorizationCredentials | None,
                                              Depends(HTTPBearer(auto_error=False))]) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), self.token.encode()):
            raise Unauthorized("missing or wrong bearer token")


def secured(token: str | None) -> dict[str, Any]:
    """APIRouter options for the API routes: with a token, its check and its documented 401; else none,
    so that the schema declares bearer auth only when it is enforced."""
    if not token:
        return {}
    return {"dependencies": [Depends(BearerAuth(token))], "responses": {401: {"model": Error}}}
