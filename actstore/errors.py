"""The project's error family.

Each error also inherits the built-in it refines, so callers that only know
Python's own exceptions still catch it. The CLI prints these as one line,
without a traceback, wherever they were raised (user_error takes them out of
Ray's wrappers and names storage failures); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import re

__all__ = [
    "AccessDeniedError",
    "ActstoreError",
    "ConfigError",
    "CorruptDataError",
    "DtypeOverflowError",
    "IncompleteStoreError",
    "NotFoundError",
    "StoreFormatError",
    "StorageError",
    "StoreNotFoundError",
    "user_error",
]


class ActstoreError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ActstoreError, ValueError):
    """A configuration or argument is invalid; the message says which and why."""


class StoreNotFoundError(ActstoreError, FileNotFoundError):
    """Nothing is at the URL, or what is there is not an activation store."""


class StoreFormatError(ActstoreError, ValueError):
    """The store exists but has another format version or inconsistent metadata."""


class IncompleteStoreError(ActstoreError, RuntimeError):
    """The store's extraction has not finished (some work units are missing)."""


class CorruptDataError(ActstoreError, OSError):
    """Stored bytes fail their checksum or do not decode; `key` names the object."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DtypeOverflowError(ActstoreError, OverflowError):
    """Values do not fit the store's dtype (e.g. |x| > 65504 in float16)."""


class NotFoundError(ActstoreError, LookupError):
    """A requested item (a feature, an image, its file) does not exist or cannot be served."""


class AccessDeniedError(ActstoreError, PermissionError):
    """A read was refused: the object lies outside what may be served (e.g. outside the dataset root)."""


class StorageError(ActstoreError, OSError):
    """A storage backend (S3, GCS, ...) refused or could not be reached; the message says what to set."""


_NO_CREDENTIALS = ("no credentials found for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                   "(or AWS_PROFILE), or give key and secret in --storage-options")


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_RAISED_HERE = re.compile(r"^actstore\.errors\.(\w+): (.+)$", re.M)
_RAY_WRAPPERS = {"RayError", "RayTaskError", "UserCodeException", "TrainingFailedError", "ControllerError"}


def _from_worker_text(exc: BaseException) -> BaseException:
    """Our error as a Ray wrapper's text shows it (the last `actstore.errors.X: message` line of the worker's
    traceback): Ray Data re-raises a UDF's error as a UserCodeException that arrives without its cause."""
    found = _RAISED_HERE.findall(str(exc))
    cls = globals().get(found[-1][0]) if found else None
    if isinstance(cls, type) and issubclass(cls, ActstoreError):
        return cls(found[-1][1])
    return exc


def _unwrap(exc: BaseException) -> BaseException:
    """The error a worker raised, out of Ray's wrappers (a task's RayTaskError, Ray Data's UserCodeException,
    Ray Train's worker-group failure) and the exception chains around them."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        names = _names(exc)
        failures = getattr(exc, "worker_failures", None)  # Ray Train: {rank: exception}
        if failures:
            exc = failures[min(failures)]
        elif "RayTaskError" in names:  # its text holds the worker's traceback; its cause may have lost it
            ours = _from_worker_text(exc)
            if ours is not exc or getattr(exc, "cause", None) is None:
                return ours
            exc = exc.cause
        elif isinstance(exc, ActstoreError) or not names & _RAY_WRAPPERS:
            return exc
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            return _from_worker_text(exc)
    return exc


def user_error(exc: BaseException) -> ActstoreError | None:
    """The project's one-line error for `exc`, wherever it was raised (this process or a Ray worker), or
    None for a bug (which keeps its traceback). Storage failures become StorageError saying what to set:
    missing credentials, access denied, no such bucket or object, an endpoint that cannot be reached."""
    exc = _unwrap(exc)
    if isinstance(exc, ActstoreError):
        return exc
    names, text = _names(exc), _one_line(str(exc))
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return StorageError(_NO_CREDENTIALS)
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}:
        return StorageError(f"cannot reach the storage endpoint ({text}): check endpoint_url in "
                            "--storage-options (or AWS_ENDPOINT_URL) and the network")
    if isinstance(exc, PermissionError) or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return StorageError(f"access denied ({text}): check the credentials and that they may use this bucket")
    if isinstance(exc, FileNotFoundError):
        what = "no such bucket" if "NoSuchBucket" in text or "bucket" in text.lower() else "not found"
        return StorageError(f"{what}: {text}")
    return None
