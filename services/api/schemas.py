"""The service's response models: they make the OpenAPI schema (`/openapi.json`, `/docs`).

The routes return orjson bytes built by services.api.reader, not these models: FastAPI validates
nothing on the way out, so the models and the reader's dicts must agree (the API tests check both).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["Atlas", "Band", "BandExample", "Error", "Feature", "FeatureMatches", "FeaturePage", "FeatureSummary",
           "Health", "Histogram", "ImageFeature", "ImageFeatures", "Match", "OtherSAE", "TopImage"]


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


class Atlas(BaseModel):
    """Per feature (column i = feature i): UMAP and PCA coordinates of its decoder direction, log10 density
    (null: dead), dead."""
    n_features: int
    n_dead: int
    n_neighbors: int
    min_dist: float
    seed: int
    pca_explained: list[float]
    id: list[int]
    umap_x: list[float]
    umap_y: list[float]
    pca_x: list[float]
    pca_y: list[float]
    log10_density: list[float | None]
    dead: list[bool]


class OtherSAE(BaseModel):
    """The compared SAE; `index` null when the comparison recorded none (matches come without images)."""
    side: str
    sae: str | None
    store: str | None
    layer: str
    backbone: dict[str, Any]
    d_sae: int
    index: str | None


class Match(BaseModel):
    """A feature of the other SAE: the best match (`best`) and/or the assignment's partner (`assigned`);
    mutual, jaccard_topk and max_diff are the best match's; the rest is the other index's view of it."""
    feature: int
    similarity: float
    best: bool
    assigned: bool
    mutual: bool | None
    jaccard_topk: float | None
    max_diff: float | None
    freq_patches: float | None
    max_act: float | None
    grid: list[int] | None
    top_images: list[TopImage]


class FeatureMatches(BaseModel):
    id: int
    side: str
    by: str | None
    level: str | None
    other: OtherSAE
    matches: list[Match]


class Error(BaseModel):
    detail: str
