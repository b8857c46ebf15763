"""The service's response models: they make the OpenAPI schema (`/openapi.json`, `/docs`).

The routes return orjson bytes built by services.api.reader, not these models: FastAPI validates
nothing on the way out, so the models and the reader's dicts must agree (the API tests check both).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AbstractionProfile", "Atlas", "Band", "BandExample", "EditIn", "Error", "Explanation", "Feature",
           "FeatureMatches", "FeaturePage", "FeatureSummary", "Health", "Histogram", "ImageFeature", "ImageFeatures",
           "Level", "ListedFeature", "Match", "OtherSAE", "PatchFeatures", "Prediction", "Profile", "SearchMatch",
           "SteerHeads", "SteerRequest", "SteerResult", "TopImage"]


class FeatureSummary(BaseModel):
    id: int
    freq_patches: float
    freq_images: float
    mean_act: float
    max_act: float
    explanation: str | None
    """The VLM's explanation when there is one, else the vocabulary's words; null: not explained."""


class SearchMatch(BaseModel):
    """The explanation a search (GET /features?q=) matched the feature by: its best-ranked one."""
    explainer: str
    explanation: str | None
    score: float
    """bm25 relevance (SQLite FTS5's, negated): higher is better."""


class ListedFeature(FeatureSummary):
    match: SearchMatch | None = None
    """With ?q= only."""


class Explanation(BaseModel):
    """One explainer's words for a feature and their scores (services.explain.layout); null: not scored."""
    explainer: str
    explanation: str | None
    model: str | None
    judge: str | None
    words: list[str]
    word_scores: list[float | None]
    detection_accuracy: float | None
    detection_auroc: float | None
    detection_n: int
    embedding_auroc: float | None


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


class Level(BaseModel):
    """Where a feature sits in the label hierarchy of `actstore abstraction` (services.abstraction): the deepest node
    holding at least min_share of its n labelled top images; node, depth and share null when none does."""
    node: str | None
    depth: int | None
    depth_name: str | None
    """The label column of that depth (a hierarchy from label columns); null for a parents table."""
    share: float | None
    n: int
    min_share: float


class Feature(FeatureSummary):
    n_patches_fired: int
    n_images_fired: int
    grid: list[int]
    top_images: list[TopImage]
    bands: list[Band]
    explanations: list[Explanation]
    """One per explainer ("vlm" first, then "vocabulary"); empty when the index has none for it."""
    level: Level | None = None
    """Null when the index has no abstraction profile."""


class Profile(BaseModel):
    """Features per depth of the hierarchy (counts, and their share of the placed ones), their mean depth, and the
    features left out: unplaced (no node holds min_share of their top images) and no_images (dead)."""
    features: int
    placed: int
    unplaced: int
    no_images: int
    counts: list[int]
    share: list[float]
    mean_depth: float | None


class AbstractionProfile(BaseModel):
    """abstraction.json as `actstore abstraction` wrote it into the index (services.abstraction.layout)."""
    format: str
    format_version: int
    index: str
    store: str
    sae: str
    layer: str | int
    backbone: dict[str, Any]
    hierarchy: dict[str, Any]
    """source ("parents": its file, or "columns": the label columns), nodes, depth."""
    depth_names: list[str] | None
    min_share: float
    k: int
    profile: Profile
    config: dict[str, Any]


class FeaturePage(BaseModel):
    total: int
    offset: int
    limit: int
    features: list[ListedFeature]


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
    steering: Literal["idle", "loading", "ready", "failed"] | None = None
    """The steering model's state (null: this service does not steer); "failed": the next request loads again."""


class Atlas(BaseModel):
    """Per feature (column i = feature i): UMAP and PCA coordinates of its decoder direction, log10 density
    (null: dead), dead, the explanation a list shows (null: not explained; FeatureSummary.explanation)."""
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
    explanation: list[str | None]


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


# steering: the one request body the service parses (bounded here; sae.edits checks features and patches) ------

MAX_EDITS, MAX_PROMPT, MAX_VALUE = 64, 1000, 1e6
"""At most 64 edits and a 1000-character prompt per request; |value| <= 1e6 (as sae.edits.MAX_VALUE)."""
MAX_STEPS, MAX_GUIDANCE, MAX_SIZE = 200, 100.0, 2048
"""A generate head's request: at most 200 denoising steps, a guidance scale of at most 100, pictures of at most
2048 px a side (the time bound stops what is still too slow, at its next step)."""


class EditIn(BaseModel):
    """One feature edit (sae.edits.FeatureEdit): `op` with `value` on the tokens `where` names."""

    model_config = ConfigDict(extra="forbid")
    feature: int = Field(ge=0, lt=2**31)
    op: Literal["scale", "add", "set", "clamp"]
    value: float = Field(ge=-MAX_VALUE, le=MAX_VALUE, allow_inf_nan=False)
    where: Literal["all", "cls", "patches"] | Annotated[list[Annotated[int, Field(ge=0, lt=2**20)]],
                                                        Field(min_length=1, max_length=4096)] = "all"


class SteerRequest(BaseModel):
    """An image of the served store, the edits, the head to read out (GET /steer/heads lists them)."""

    model_config = ConfigDict(extra="forbid")
    image: int = Field(ge=0, lt=2**31)
    head: str = Field("model", min_length=1, max_length=200)
    edits: list[EditIn] = Field(default_factory=list, max_length=MAX_EDITS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT)
    responses: int = Field(5, ge=1, le=10)
    temperature: float = Field(0.7, gt=0, le=5, allow_inf_nan=False)
    seed: int = Field(0, ge=0, lt=2**31)
    max_new_tokens: int = Field(24, ge=1, le=128)
    steps: int = Field(25, ge=1, le=MAX_STEPS)
    """Denoising steps (generate heads)."""
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    """Classifier-free guidance scale (generate heads); null: the pipeline's own."""
    size: int | None = Field(None, ge=8, le=MAX_SIZE, multiple_of=8)
    """Height and width of the pictures in pixels, a multiple of 8 (generate heads); null: the pipeline's own."""


class Prediction(BaseModel):
    top5: list[list[float]] | None = None
    """[[class index, probability], ...], most probable first (class and segmentation heads)."""
    mask: list[list[int]] | None = None
    """The grid of per-patch labels (segmentation heads)."""
    responses: list[str] | None = None
    """Sampled answers (vlm heads)."""
    image: str | None = None
    """The generated picture, base64 PNG (generate heads)."""


class SteerResult(BaseModel):
    image: int
    head: str
    kind: str
    classes: list[str]
    edits: list[str]
    before: Prediction
    after: Prediction
    cosine: float | None = None
    """Cosine of the image embeddings before and after (generate heads): 1 without edits."""


class SteerHead(BaseModel):
    name: str
    kind: str
    classes: list[str]


class SteerHeads(BaseModel):
    heads: list[SteerHead]
    grid: list[int]
    cls: bool
    d_sae: int
    layer: str
    tokens: str
    max_edits: int
    timeout_s: float
    slots: int
    """Steering requests one worker takes on at once (one more: 429)."""
    device: str
    """Where the model steers (cpu, cuda...)."""


class PatchFeature(BaseModel):
    feature: int
    value: float


class PatchFeatures(BaseModel):
    image: int
    patch: int
    features: list[PatchFeature]
