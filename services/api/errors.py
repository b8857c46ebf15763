"""The one place where the project's errors become HTTP responses, each JSON `{"detail": str}`.

    NotFoundError, StoreNotFoundError   404   no such feature or image, or its file is not there
    AccessDeniedError                   403   the image lies outside the dataset the index recorded
    ConfigError                         422   a request the model cannot run (a feature or patch out of range...)
    Unauthorized                        401   a missing or wrong bearer token (WWW-Authenticate: Bearer)
    SteeringBusy                        429   every steering slot of the worker is taken (Retry-After: seconds)
    SteeringTimeout                     503   a steering request ran past the service's time bound and was stopped
    CorruptDataError                    500   stored bytes are damaged; the detail names the object
    RequestValidationError              422   one line: where, and what is wrong
    anything else                       500   {"detail": "internal error ..."}; the traceback goes to the log

The reader raises these without knowing about HTTP; routes never raise HTTPException. An error's `headers`
(Unauthorized's, SteeringBusy's) go out with its response.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from actstore.errors import (AccessDeniedError, ActstoreError, ConfigError, CorruptDataError, NotFoundError,
                             StoreNotFoundError)

__all__ = ["STATUS", "SteeringBusy", "SteeringTimeout", "Unauthorized", "add_error_handlers"]


class Unauthorized(ActstoreError, PermissionError):
    """The bearer token is missing or wrong (401)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": "Bearer"}


class SteeringBusy(ActstoreError, RuntimeError):
    """Every steering slot of this worker is taken (429); `retry_after` seconds is the client's hint."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class SteeringTimeout(ActstoreError, TimeoutError):
    """A steering request ran past the service's time bound (503)."""


STATUS: dict[type[Exception], int] = {NotFoundError: 404, StoreNotFoundError: 404, Unauthorized: 401,
                                      AccessDeniedError: 403, ConfigError: 422, SteeringBusy: 429,
                                      SteeringTimeout: 503, CorruptDataError: 500}
"""HTTP status of each error the service translates; anything else is a bug (500, with its traceback logged)."""


async def _error(request: Request, exc: Exception) -> JSONResponse:
    status = next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)
    return JSONResponse({"detail": _detail(exc)}, status_code=status, headers=getattr(exc, "headers", None))


def _detail(exc: Exception) -> str:
    """The error's message; a corrupt object's key is added when the message does not name it already."""
    key = getattr(exc, "key", None)
    return f"{key}: {exc}" if key and key not in str(exc) else str(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """A bug is JSON too; Starlette re-raises it after this response, so the server logs its traceback."""
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
                        status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    """Register the translations above on `app`."""
    for error in STATUS:
        app.add_exception_handler(error, _error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _bug)
