"""Stage configs: frozen dataclasses loaded from TOML, overridden on the command line.

Every stage writes the config it ran with next to its output, so a store or a
checkpoint says how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from actstore.errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Build `cls` from a TOML file's fields, then from the non-None overrides (CLI flags win)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config {path}: {e}") from None
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            values[name] = tuple(value)
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


REDACTED = "<redacted>"
# option names whose values are credentials (s3fs key/secret/token, botocore aws_*_key(_id), gcsfs token,
# adlfs account_key/sas_token/client_secret, http auth/headers, passwords), matched anywhere in the name
_SECRET_NAME = re.compile(r"key|secret|token|passw|credential|session|auth|signature|header", re.I)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(options: Any) -> Any:
    """Storage options with every credential replaced by REDACTED: values under credential-like names at
    any depth, and user:password@ in URLs. With public_config, the one way a config leaves memory, so
    written configs, checkpoints, trackers, logs and messages never hold a secret."""
    if isinstance(options, Mapping):
        return {k: REDACTED if isinstance(k, str) and _SECRET_NAME.search(k) and v not in (None, "")
                else redact(v) for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [redact(v) for v in options]
    return _URL_USERINFO.sub(f"{REDACTED}@", options) if isinstance(options, str) else options


def public_config(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-friendly dict (tuples as lists, "type" its class) with credentials redacted:
    every `*storage_options` field through redact, and user:password@ in any URL."""
    fields = {k: redact(v) if k.endswith("storage_options") else
              _URL_USERINFO.sub(f"{REDACTED}@", v) if isinstance(v, str) else v
              for k, v in dataclasses.asdict(cfg).items()}
    return json.loads(json.dumps({"type": type(cfg).__name__, **fields}, default=str))


def check_at_least(cfg: Any, command: str, lows: Mapping[str, int]) -> None:
    """A one-line ConfigError naming the first field of `cfg` below its lower bound in `lows`."""
    for name, low in lows.items():
        if getattr(cfg, name) < low:
            raise ConfigError(f"{command}: {name} must be >= {low}, got {getattr(cfg, name)}")


def config_json(cfg: Any) -> str:
    """public_config as JSON, for writing next to an output."""
    return json.dumps(public_config(cfg), indent=2, sort_keys=True)
