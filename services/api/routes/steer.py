"""/steer: SAE features edited inside the model, its predictions before and after (the dashboards' backend), and
/images/{id}/patches/{p}: the features active at a patch."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response

from services.api.deps import steering_of
from services.api.routes import NOT_FOUND, json_response
from services.api.routes.images import ImageId
from services.api.schemas import Error, PatchFeatures, SteerHeads, SteerRequest, SteerResult

__all__ = ["list_heads", "list_patch_features", "router", "steer_image"]

PatchId = Annotated[int, Path(ge=0, lt=2**20, description="patch index, row-major in the grid")]


async def list_heads(request: Request) -> Response:
    """The heads this service steers through, with their classes, and the grid and limits of a request."""
    return json_response(await steering_of(request).heads())


async def steer_image(request: Request, body: SteerRequest) -> Response:
    """One image of the served store through the model, before and after the edits, read out by one head. 429 (with
    Retry-After) when the worker's steering slots are all taken; 503 past the time bound (the run is stopped)."""
    return json_response(await steering_of(request).steer(body.model_dump()))


async def list_patch_features(request: Request, iid: ImageId, patch: PatchId) -> Response:
    """The SAE's active features on the stored token of one patch, strongest first."""
    return json_response(await steering_of(request).patch_features(iid, patch))


def router(**options: Any) -> APIRouter:
    """The /steer and patch routes; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(**options)
    errors = {**NOT_FOUND, 422: {"model": Error}, 503: {"model": Error}}
    busy = {429: {"model": Error, "headers": {"Retry-After": {"description": "seconds to wait",
                                                               "schema": {"type": "integer"}}}}}
    r.add_api_route("/steer/heads", list_heads, response_model=SteerHeads, responses=errors, name="steer_heads")
    r.add_api_route("/steer", steer_image, methods=["POST"], response_model=SteerResult, responses={**errors, **busy},
                    name="steer")
    r.add_api_route("/images/{iid}/patches/{patch}", list_patch_features, response_model=PatchFeatures,
                    responses=errors, name="patch_features")
    return r
