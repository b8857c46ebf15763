"""Running the service: uvicorn (`run`, one process or several workers) or Ray Serve (`run_ray`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI

from actstore.errors import ConfigError
from services.api.app import TOKEN_ENV, create_app
from services.api.steering import SteerOptions
from services.compare import read_comparison
from services.index.layout import read_index_meta

__all__ = ["app_from_env", "build_app", "run", "run_ray"]

INDEX_ENV, OPTIONS_ENV, COMPARE_ENV = "ACTSTORE_INDEX", "ACTSTORE_STORAGE_OPTIONS", "ACTSTORE_COMPARE"
STEER_ENV = "ACTSTORE_STEER"
"""How `run` hands the index folder, storage options, comparison folder and steering heads to its worker processes."""


def run(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
        storage_options: dict[str, Any] | None = None, workers: int = 1, compare: str | None = None,
        steer: Sequence[str] = (), steer_options: SteerOptions | None = None) -> None:
    """Serve with uvicorn (blocks). Several workers each memory-map the same index pages (and load their own model
    for steering, with their own slots). `compare`, `steer` (the heads), `steer_options`: as create_app's."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers > 1:
        os.environ[INDEX_ENV], os.environ[OPTIONS_ENV] = index, orjson.dumps(storage_options or {}).decode()
        os.environ[COMPARE_ENV] = compare or ""
        os.environ[STEER_ENV] = orjson.dumps({"heads": list(steer),
                                              **asdict(steer_options or SteerOptions())}).decode()
        if token:
            os.environ[TOKEN_ENV] = token
        uvicorn.run("services.api.runners:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False)
    else:
        uvicorn.run(create_app(index, token, storage_options, compare, steer, steer_options), host=host, port=port,
                    log_level="warning", access_log=False)


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the index and options come through the environment."""
    steer = orjson.loads(os.environ.get(STEER_ENV) or '{"heads": []}')
    heads = steer.pop("heads")
    return create_app(os.environ[INDEX_ENV], None, orjson.loads(os.environ.get(OPTIONS_ENV, "{}")),
                      os.environ.get(COMPARE_ENV) or None, heads, SteerOptions(**steer))


def run_ray(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
            storage_options: dict[str, Any] | None = None, replicas: int = 1, blocking: bool = True,
            compare: str | None = None, steer: Sequence[str] = (), steer_options: SteerOptions | None = None) -> None:
    """Serve the same app through Ray Serve: replicas on the Ray cluster this process is connected to
    (else $RAY_ADDRESS's, else a new local one; see actstore.cluster.init_ray); each replica has its own slots."""
    from ray import serve

    from actstore.cluster import init_ray

    app = _application(index, token, storage_options, replicas, compare, steer, steer_options)
    init_ray()
    serve.start(http_options={"host": host, "port": port}, logging_config=_QUIET)
    serve.run(app, name="actstore", route_prefix="/", blocking=blocking)


def build_app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder, for a RayService's `import_path: services.api.runners:build_app`:
    args `index` (a local folder) and optionally `storage_options`, `num_replicas`, `compare` (a comparison
    folder whose side A or B is the index), `steer` (head specs), `steer_timeout`, `steer_device`, `steer_slots`,
    `steer_retry_after`, `steer_threads`, `steer_nice` and `fidelity_check` (as `actstore serve`'s flags); the token
    comes from $ACTSTORE_TOKEN, host and port from the Serve config."""
    if "index" not in args:
        raise ConfigError("build_app needs args.index (the index folder on the replicas' nodes)")
    options = {field: args[arg] for arg, field in _STEER_ARGS.items() if arg in args}
    return _application(args["index"], None, args.get("storage_options"), int(args.get("num_replicas", 1)),
                        args.get("compare"), tuple(args.get("steer", ())), SteerOptions(**options))


_STEER_ARGS = {"steer_timeout": "timeout_s", "steer_device": "device", "steer_slots": "slots",
               "steer_retry_after": "retry_after_s", "steer_threads": "threads", "steer_nice": "nice",
               "fidelity_check": "fidelity_check"}
"""build_app's steer_* args (named as `actstore serve`'s flags) and the SteerOptions fields they set."""


_QUIET = {"enable_access_log": False, "log_level": "WARNING"}
"""Ray Serve logging: per-request log lines cost it two thirds of its throughput."""


def _application(index: str, token: str | None, storage_options: dict[str, Any] | None, replicas: int,
                 compare: str | None = None, steer: Sequence[str] = (), steer_options: SteerOptions | None = None
                 ) -> Any:
    from ray import serve

    index = str(Path(index).resolve())
    compare = str(Path(compare).resolve()) if compare else None
    read_index_meta(index)  # fail here, with a one-line error, rather than in a replica
    if compare:
        read_comparison(compare)

    def build() -> FastAPI:  # a plain function: Ray Serve calls builders on each replica
        return create_app(index, token, storage_options, compare, steer, steer_options)

    deployment = serve.deployment(serve.ingress(build)(_Ingress), name="actstore-features",
                                  num_replicas=replicas, max_ongoing_requests=64, logging_config=_QUIET)
    return deployment.bind()


class _Ingress:
    """Ray Serve's deployment class; the routes are create_app's."""
