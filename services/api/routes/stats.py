"""/stats: the index as a whole (the density histogram), and /healthz (open even with a token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from services.api.deps import reader_of
from services.api.routes import NOT_FOUND, json_response
from services.api.schemas import Health, Histogram

__all__ = ["health_router", "read_density_histogram", "read_health", "router"]


async def read_density_histogram(request: Request) -> Response:
    """Histogram across features of log10 firing frequency over patches; `dead` never fired."""
    return json_response(reader_of(request).meta["histogram"])


async def read_health(request: Request) -> Response:
    """Liveness, the index's shape, and the steering model's state (null: no steering)."""
    reader, steering = reader_of(request), request.app.state.steering
    return json_response({"status": "ok", "n_features": reader.n_features, "n_images": reader.n_images,
                          "k": int(reader.meta["k"]), "grid": reader.meta["grid"],
                          "steering": steering.state if steering is not None else None})


def router(**options: Any) -> APIRouter:
    """The /stats routes; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(prefix="/stats", **options)
    r.add_api_route("/density-histogram", read_density_histogram, response_model=Histogram, responses=NOT_FOUND,
                    name="density_histogram")
    return r


def health_router() -> APIRouter:
    """/healthz, for probes: never behind the token."""
    r = APIRouter()
    r.add_api_route("/healthz", read_health, response_model=Health, name="healthz")
    return r
