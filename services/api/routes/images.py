"""/images: an image as the model saw it (from the served index's dataset, or with `other=true` the compared
SAE's index's), and its strongest features."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from services.api.deps import matches_of, reader_of
from services.api.routes import NOT_FOUND, json_response
from services.api.schemas import Error, ImageFeatures

__all__ = ["list_image_features", "read_image", "router"]

ImageId = Annotated[int, Path(ge=0, lt=2**31, description="image index in the store")]


def read_image(request: Request, iid: ImageId, size: Annotated[int, Query(ge=16, le=1024)] = 224,
               other: Annotated[bool, Query(description="from the compared SAE's index (--compare)")] = False
               ) -> Response:
    """The image as the model saw it (its resize and center crop), as a size x size JPEG; with other=true, as
    the compared SAE's model saw it, read under that index's dataset root."""
    # a plain def: decoding runs in the thread pool, off the event loop
    reader = matches_of(request).images() if other else reader_of(request)
    return Response(reader.thumbnail(iid, size), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})


async def list_image_features(request: Request, iid: ImageId,
                              m: Annotated[int | None, Query(ge=1, le=1024)] = None) -> Response:
    """The image's strongest features (by their strongest patch), strongest first."""
    return json_response(reader_of(request).image_features(iid, m))


def router(**options: Any) -> APIRouter:
    """The /images routes; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(prefix="/images", **options)
    jpeg = {**NOT_FOUND, 403: {"model": Error}, 200: {"content": {"image/jpeg": {}}}}
    r.add_api_route("/{iid}", read_image, responses=jpeg, name="image")
    r.add_api_route("/{iid}/features", list_image_features, response_model=ImageFeatures, responses=NOT_FOUND,
                    name="image_features")
    return r
