"""The project's error family.

Each error also inherits the built-in it refines, so callers that only know
Python's own exceptions still catch it. The CLI prints these as one line,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "ActstoreError",
    "ConfigError",
    "CorruptDataError",
    "DtypeOverflowError",
    "IncompleteStoreError",
    "NotFoundError",
    "StoreFormatError",
    "StoreNotFoundError",
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
