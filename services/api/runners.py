"""Running the service: uvicorn (`run`, one process or several workers) or Ray Serve (`run_ray`), once `check` has
refused what create_app would (one line each), without an app of its own kept beside the workers."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI

from actstore.errors import ConfigError
from actstore.store import normalize_url
from services.api.app import TOKEN_ENV, create_app
from services.api.matches import MatchReader
from services.api.reader import IndexReader
from services.api.steering import SteerOptions, served_heads, steer_device
from services.compare import read_comparison
from services.index.layout import IMAGE_TABLE, images_digest, made_from, read_index_meta, write_image_table

__all__ = ["app_from_env", "build_app", "check", "run", "run_ray"]

INDEX_ENV, OPTIONS_ENV, COMPARE_ENV = "ACTSTORE_INDEX", "ACTSTORE_STORAGE_OPTIONS", "ACTSTORE_COMPARE"
STEER_ENV, IMAGES_ENV = "ACTSTORE_STEER", "ACTSTORE_IMAGE_TABLE"
"""How `run` hands the index folder, storage options, comparison folder, steering heads and image table to its
worker processes."""


def check(index: str, storage_options: dict[str, Any] | None = None, compare: str | None = None,
          steer: Sequence[str] = (), steer_options: SteerOptions | None = None,
          image_table: str | Path | None = None) -> None:
    """What create_app refuses (a damaged index or image table, a comparison the index is not part of, another model's
    SAE, two heads of one name), and a steering device torch cannot see, refused here as one line each, without
    making an app: nothing of it (readers, maps, a store) outlives the call."""
    reader = IndexReader(index, storage_options, image_table)
    if compare:
        MatchReader(compare, reader, storage_options)
    if steer:
        served_heads(reader.meta["sae"], reader.meta["store"], steer, dict(storage_options or {}), reader.meta["layer"])
    _check_device(steer, steer_options)


def _check_device(steer: Sequence[str], steer_options: SteerOptions | None) -> None:
    """A steering device torch cannot see, refused before serving starts (imports torch: in the process that starts
    the workers, not in each worker)."""
    device = (steer_options or SteerOptions()).device
    if steer and device != "auto":
        steer_device(device)


def run(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
        storage_options: dict[str, Any] | None = None, workers: int = 1, compare: str | None = None,
        steer: Sequence[str] = (), steer_options: SteerOptions | None = None) -> None:
    """Serve with uvicorn (blocks), once `check` passes. Several workers each memory-map the same index pages and
    the same image table (and load their own model for steering, with their own slots); the process that starts
    them holds no app. `compare`, `steer` (the heads), `steer_options`: as create_app's."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    options = {"host": host, "port": port, "log_level": "warning", "access_log": False}
    if workers == 1:
        app = create_app(index, token, storage_options, compare, steer, steer_options)  # refuses what check does
        _check_device(steer, steer_options)
        _serving(index, host, port)
        uvicorn.run(app, **options)
        return
    with tempfile.TemporaryDirectory(prefix="actstore-serve-") as folder:
        table = _shared_image_table(index, Path(folder))
        check(index, storage_options, compare, steer, steer_options, table)
        os.environ[INDEX_ENV], os.environ[OPTIONS_ENV] = index, orjson.dumps(storage_options or {}).decode()
        os.environ[COMPARE_ENV], os.environ[IMAGES_ENV] = compare or "", str(table)
        os.environ[STEER_ENV] = orjson.dumps({"heads": list(steer),
                                              **asdict(steer_options or SteerOptions())}).decode()
        if token:
            os.environ[TOKEN_ENV] = token
        _serving(index, host, port)
        uvicorn.run("services.api.runners:app_from_env", factory=True, workers=workers, **options)


def _shared_image_table(index: str, folder: Path) -> Path:
    """The image table every worker maps: the index's own images.arrow when it was made from its images.parquet as
    it is now, else one written from images.parquet into `folder` (this run's temporary folder, removed when serving
    ends: nothing is written into the index, which belongs to `actstore index`)."""
    read_index_meta(index)  # not an index at all: say that first
    own = Path(normalize_url(index)) / IMAGE_TABLE
    return own if made_from(own) == images_digest(index) else write_image_table(index, folder / IMAGE_TABLE)


def _serving(index: str, host: str, port: int, how: str = "") -> None:
    print(f"serving {index}{how} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the index, options and image table come through the environment."""
    steer = orjson.loads(os.environ.get(STEER_ENV) or '{"heads": []}')
    heads = steer.pop("heads")
    return create_app(os.environ[INDEX_ENV], None, orjson.loads(os.environ.get(OPTIONS_ENV, "{}")),
                      os.environ.get(COMPARE_ENV) or None, heads, SteerOptions(**steer),
                      os.environ.get(IMAGES_ENV) or None)


def run_ray(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
            storage_options: dict[str, Any] | None = None, replicas: int = 1, blocking: bool = True,
            compare: str | None = None, steer: Sequence[str] = (), steer_options: SteerOptions | None = None) -> None:
    """Serve the same app through Ray Serve: replicas on the Ray cluster this process is connected to
    (else $RAY_ADDRESS's, else a new local one; see actstore.cluster.init_ray); each replica has its own slots."""
    from ray import serve

    from actstore.cluster import init_ray

    check(index, storage_options, compare, steer, steer_options)
    app = _application(index, token, storage_options, replicas, compare, steer, steer_options)
    init_ray()
    _serving(index, host, port, " through Ray Serve")
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
