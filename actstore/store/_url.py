"""URL spelling, without importing zarr or fsspec: the query service uses it at start-up."""

from __future__ import annotations


def normalize_url(url: str) -> str:
    """Strip a trailing slash and the file:// prefix (local paths use LocalStore)."""
    url = str(url).rstrip("/")
    return url[len("file://"):] if url.startswith("file://") else url


def is_local(url: str) -> bool:
    return "://" not in normalize_url(url)
