"""The service's response models: they make the OpenAPI schema (`/openapi.json`, `/docs`).

The routes return orjson bytes built by services.api.reader, not these models: FastAPI validates
nothing on the way out, so the models and the reader's dicts must agree (the API tests check both).
"""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["Band", "BandExample", "Error", "Feature", "FeaturePage", "FeatureSummary", "Health", "Histogram",
           "ImageFeature", "ImageFeatures", "TopImage"]


class FeatureSummary(BaseModel):
    id: int
    freq_patches: float
    freq_images: float
    mean_act: float
    max_act: float


class TopImage(BaseModel):
    image: int
    value: float
    label: int
    class_name: str | None
    heatmap: list[float]


class BandExample(BaseModel):
    image: int
    value: float


class Band(BaseModel):
    lo: float
    hi: float
    count: int
    examples: list[BandExample]


class Feature(FeatureSummary):
    n_patches_fired: int
    n_images_fired: int
    grid: list[int]
    top_images: list[TopImage]
    bands: list[Band]


class FeaturePage(BaseModel):
    total: int
    offset: int
    limit: int
    features: list[FeatureSummary]


class ImageFeature(BaseModel):
    id: int
    value: float


class ImageFeatures(BaseModel):
    image: int
    label: int
    class_name: str | None
    features: list[ImageFeature]


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]
    dead: int
    n_features: int


class Health(BaseModel):
    status: str
    n_features: int
    n_images: int
    k: int
    grid: list[int]


class Error(BaseModel):
    detail: str
