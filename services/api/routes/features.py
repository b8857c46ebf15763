"""/features: browse the SAE's features by density or search their explanations, one feature's top images, value
bands and explanations, and its matches in the other SAE of the comparison the service was started with (--compare).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from services.api.deps import matches_of, reader_of
from services.api.reader import SORTS
from services.api.routes import NOT_FOUND, json_response
from services.api.schemas import Feature, FeatureMatches, FeaturePage

__all__ = ["list_features", "read_feature", "read_feature_matches", "router"]

FeatureId = Annotated[int, Path(ge=0, lt=2**31, description="feature id")]
MAX_QUERY = 200
SEARCH = ("words searched in the features' explanations and vocabulary words (each whole or as a prefix, all "
          "required; anything but letters and digits separates them); hits come most relevant first, `sort` unused")


async def list_features(request: Request, sort: Literal[SORTS] = "id",  # type: ignore[valid-type]
                        min_freq: Annotated[float, Query(ge=0, le=1)] = 0.0,
                        max_freq: Annotated[float, Query(ge=0, le=1)] = 1.0,
                        offset: Annotated[int, Query(ge=0, lt=2**31)] = 0,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                        q: Annotated[str | None, Query(max_length=MAX_QUERY, description=SEARCH)] = None) -> Response:
    """Features whose firing frequency over patches is in [min_freq, max_freq], sorted ("-" = descending); with
    `q`, those whose explanations hold its words, most relevant first (404 when the index has no explanations)."""
    reader = reader_of(request)
    if q:  # a search takes up to a second (the worker's first one builds the index): off the event loop
        return json_response(await run_in_threadpool(reader.browse, sort, min_freq, max_freq, offset, limit, q))
    return json_response(reader.browse(sort, min_freq, max_freq, offset, limit))


async def read_feature(request: Request, fid: FeatureId,
                       k: Annotated[int | None, Query(ge=1, le=1024)] = None) -> Response:
    """A feature's stats, its top images (strongest first) with its value at every patch, and its value bands."""
    return json_response(reader_of(request).feature(fid, k))


async def read_feature_matches(request: Request, fid: FeatureId,
                               k: Annotated[int | None, Query(ge=1, le=1024)] = None) -> Response:
    """The feature's best match in the other SAE of the comparison and, when different, its assigned partner,
    each with the other index's top images (at most k); none for a dead feature. 404 without --compare."""
    matches = matches_of(request)
    reader_of(request).check_feature(fid)
    return json_response(matches.matches(fid, k))


def router(**options: Any) -> APIRouter:
    """The /features routes; `options` are APIRouter's (create_app passes deps.secured)."""
    r = APIRouter(prefix="/features", **options)
    r.add_api_route("", list_features, response_model=FeaturePage, responses=NOT_FOUND, name="browse")
    r.add_api_route("/{fid}", read_feature, response_model=Feature, responses=NOT_FOUND, name="feature")
    r.add_api_route("/{fid}/matches", read_feature_matches, response_model=FeatureMatches, responses=NOT_FOUND,
                    name="feature_matches")
    return r
