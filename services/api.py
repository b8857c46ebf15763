"""The query service: a FastAPI app over one feature index (`actstore serve --index DIR`).

    GET /features/{id}              stats, top images with per-patch values, value bands
    GET /features?sort=&min_freq=&max_freq=&offset=&limit=     browse and filter by density
    GET /images/{id}                the image as the model saw it (JPEG), from the store's dataset
    GET /images/{id}/features       the image's strongest features
    GET /stats/density-histogram    log10 firing frequency across features
    GET /healthz                    liveness and the index's shape
    GET /                           the feature browser (services/static/)

Why it is fast: the index's arrays are memory-mapped (services.layout.open_array), features.parquet
is 6 small columns, and nothing here imports torch, so start-up is well under a second and a feature
lookup is a few memory-mapped rows serialized by orjson. Feature endpoints are `async def` (no
thread hop); image endpoints decode files, so they run in the thread pool and are LRU-cached.

Safety: 127.0.0.1 by default; with a token, every API route needs `Authorization: Bearer <token>`
(the page and /healthz do not); an image is read only when its store row is "ok" and its file lies
under the dataset root that the index recorded (services.layout.dataset_root, symlinks resolved).
"""

from __future__ import annotations

import io
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from threading import Lock
from typing import Annotated, Any, Literal

import fsspec
import numpy as np
import orjson
import pyarrow.parquet as pq
from fastapi import Depends, FastAPI, HTTPException, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from actstore.decode import decode_image
from actstore.errors import ConfigError
from services.layout import FEATURES, IMAGES, open_array, read_index_meta

__all__ = ["TOKEN_ENV", "IndexReader", "create_app", "run", "run_ray"]

TOKEN_ENV = "ACTSTORE_TOKEN"
"""Environment variable holding the bearer token when --token is not given."""
STATIC = Path(__file__).parent / "static"
SORTS = ("id", "freq", "-freq", "freq_images", "-freq_images", "max_act", "-max_act", "mean_act", "-mean_act")
_STATS = ("freq_patches", "freq_images", "mean_act", "max_act")  # a feature's summary, as listed and shown
_SORT_COLUMNS = {"freq": "freq_patches", "freq_images": "freq_images", "max_act": "max_act", "mean_act": "mean_act"}
FeatureId = Annotated[int, PathParam(ge=0, lt=2**31, description="feature id")]
ImageId = Annotated[int, PathParam(ge=0, lt=2**31, description="image index in the store")]
_SIZE = re.compile(r"size=(\d+|[\(\[]\d+, *\d+[\)\]])")


def _held(ids: np.ndarray, limit: int | None) -> int:
    """How many leading entries of a -1-padded row to return: all held ones, at most `limit`."""
    n = int((ids >= 0).sum())
    return n if limit is None else min(limit, n)


# the index, opened lazily -----------------------------------------------------------------------

class IndexReader:
    """Read side of an index folder: index.json at once, everything else memory-mapped on first use."""

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = read_index_meta(self.path)
        self.storage_options = dict(storage_options or {})
        self.n_features, self.n_images = int(self.meta["d_sae"]), int(self.meta["n_images"])
        self.class_names: list[str] = list(self.meta.get("class_names") or [])
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = Lock()

    def array(self, name: str) -> np.ndarray:
        arrays = self.__dict__.setdefault("_arrays", {})
        if name not in arrays:
            arrays[name] = open_array(self.path, name)
        return arrays[name]

    @cached_property
    def features(self) -> dict[str, np.ndarray]:
        table = pq.read_table(self.path / FEATURES)
        return {name: table.column(name).to_numpy() for name in table.column_names}

    @cached_property
    def images(self) -> dict[str, Any]:
        table = pq.read_table(self.path / IMAGES)
        return {"uri": table.column("uri").to_pylist(), "label": table.column("label").to_numpy(),
                "ok": np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok")}

    def image_info(self, ids: list[int]) -> list[dict[str, Any]]:
        names = self.class_names
        return [{"label": v, "class_name": names[v] if 0 <= v < len(names) else None}
                for v in self.images["label"][ids].tolist()]

    def feature_stats(self, ids: np.ndarray) -> list[dict[str, Any]]:
        cols = {c: self.features[c][ids].tolist() for c in _STATS}
        return [{"id": i, **{c: v[j] for c, v in cols.items()}} for j, i in enumerate(ids.tolist())]

    def feature(self, fid: int, k: int | None) -> dict[str, Any]:
        f = self.features
        held = self.array("top_images")[fid]
        n = _held(held, k)
        images, values = held[:n].tolist(), self.array("top_values")[fid, :n].tolist()
        heat = self.array("heatmaps")[fid, :n].astype(np.float32)
        top = [{"image": i, "value": v, **info, "heatmap": h}
               for i, v, info, h in zip(images, values, self.image_info(images), heat)]
        lo_exp = int(self.meta["band_exponents"][0])
        counts = self.array("band_counts")[fid]
        band_images, band_values = self.array("band_images")[fid], self.array("band_values")[fid]
        bands = []
        for b in np.flatnonzero(counts)[::-1].tolist():
            ok = band_images[b] >= 0
            bands.append({"lo": 2.0 ** (lo_exp + b), "hi": 2.0 ** (lo_exp + b + 1), "count": int(counts[b]),
                          "examples": [{"image": i, "value": v} for i, v in
                                       zip(band_images[b][ok].tolist(), band_values[b][ok].tolist())]})
        return {"id": fid, **{c: float(f[c][fid]) for c in _STATS}, "n_patches_fired": int(f["n_patches_fired"][fid]),
                "n_images_fired": int(f["n_images_fired"][fid]), "grid": self.meta["grid"],
                "top_images": top, "bands": bands}

    def browse(self, sort: str, min_freq: float, max_freq: float, offset: int, limit: int) -> dict[str, Any]:
        freq = self.features["freq_patches"]
        ids = np.flatnonzero((freq >= min_freq) & (freq <= max_freq))
        if sort != "id":
            key = self.features[_SORT_COLUMNS[sort.lstrip("-")]][ids]
            ids = ids[np.argsort(-key if sort.startswith("-") else key, kind="stable")]
        return {"total": int(ids.size), "offset": offset, "limit": limit,
                "features": self.feature_stats(ids[offset:offset + limit])}

    def image_features(self, i: int, m: int | None) -> dict[str, Any]:
        feats, vals = self.array("image_features")[i], self.array("image_values")[i]
        n = _held(feats, m)
        return {"image": i, **self.image_info([i])[0],
                "features": [{"id": f, "value": v} for f, v in zip(feats[:n].tolist(), vals[:n].tolist())]}

    def thumbnail(self, i: int, size: int) -> bytes:
        """JPEG of image i as the model saw it, size x size; LRU-cached (256 entries)."""
        with self._lock:
            if (i, size) in self._thumbs:
                self._thumbs.move_to_end((i, size))
                return self._thumbs[(i, size)]
        data = _read_inside(self.images["uri"][i], self.meta["dataset_root"], self.storage_options)
        decoded = decode_image(data)
        if decoded.image is None:
            raise HTTPException(404, f"image {i}: cannot be decoded ({decoded.reason})")
        view = model_view(decoded.image, self.meta.get("preprocessing"), size)
        buf = io.BytesIO()
        view.save(buf, "JPEG", quality=90)
        with self._lock:
            self._thumbs[(i, size)] = buf.getvalue()
            while len(self._thumbs) > 256:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


def _read_inside(uri: str, root: str, storage_options: dict[str, Any]) -> bytes:
    """The file's bytes, if it lies under root; 403 otherwise (a store row edited to point elsewhere)."""
    if "://" in uri:
        inside = uri.startswith(root) and ".." not in uri[len(root):].split("/")
        path = uri
    else:
        path = os.path.realpath(uri)
        inside = bool(root) and (path == root or path.startswith(root.rstrip(os.sep) + os.sep))
    if not inside:
        raise HTTPException(403, "image lies outside the registered dataset")
    try:
        fs, p = fsspec.core.url_to_fs(path, **storage_options)
        return fs.cat_file(p)
    except (FileNotFoundError, PermissionError, OSError) as e:
        raise HTTPException(404, f"image file unavailable ({type(e).__name__})") from None


def _parse_size(step: str) -> tuple[int, int] | int | None:
    m = _SIZE.search(step)
    if m is None:
        return None
    nums = [int(v) for v in re.findall(r"\d+", m.group(1))]
    return nums[0] if len(nums) == 1 else (nums[0], nums[1])


def model_view(image: Image.Image, preprocessing: dict[str, Any] | None, size: int) -> Image.Image:
    """The region the backbone saw (its Resize then CenterCrop, from the store's preprocessing record),
    resampled once to size x size. Steps it does not recognise leave the image whole."""
    w, h = image.size
    box = (0.0, 0.0, float(w), float(h))
    steps = (preprocessing or {}).get("steps") or []
    scale_x = scale_y = 1.0
    for step in steps:
        target = _parse_size(step)
        if step.startswith("Resize(") and target is not None:
            if isinstance(target, int):  # shorter side to target, as torchvision does
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = target, int(target * long / short)
                rw, rh = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                rh, rw = target
            scale_x, scale_y = rw / w, rh / h
            box = (0.0, 0.0, float(rw), float(rh))
        elif step.startswith("CenterCrop(") and target is not None:
            ch, cw = (target, target) if isinstance(target, int) else target
            bw, bh = box[2] - box[0], box[3] - box[1]
            top, left = round((bh - ch) / 2.0), round((bw - cw) / 2.0)
            box = (box[0] + left, box[1] + top, box[0] + left + cw, box[1] + top + ch)
    src = (box[0] / scale_x, box[1] / scale_y, box[2] / scale_x, box[3] / scale_y)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=src)


# response models (the OpenAPI schema; handlers return orjson bytes directly) ---------------------

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


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


# the app ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Auth:
    token: str

    def __call__(self, creds: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def create_app(index: str | Path, token: str | None = None, storage_options: dict[str, Any] | None = None) -> FastAPI:
    """The service over the index folder at `index`; `token` (or $ACTSTORE_TOKEN) protects the API routes."""
    reader = IndexReader(index, storage_options)
    token = token or os.environ.get(TOKEN_ENV) or None
    errors: dict[int | str, dict[str, Any]] = {404: {"model": Error}, **({401: {"model": Error}} if token else {})}
    app = FastAPI(title="actstore feature service", version="1",
                  description=f"SAE features of layer {reader.meta['layer']} of {reader.meta['store']}.")
    auth = [Depends(_Auth(token))] if token else []  # the schema declares bearer auth only when it is enforced

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    def check_feature(fid: int) -> None:
        if fid >= reader.n_features:
            raise HTTPException(404, f"no feature {fid} (the SAE has {reader.n_features})")

    def check_image(i: int) -> None:
        if i >= reader.n_images:
            raise HTTPException(404, f"no image {i} (the store has {reader.n_images})")
        if not reader.images["ok"][i]:
            raise HTTPException(404, f"image {i} was rejected at extraction")

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Response:
        return _json({"status": "ok", "n_features": reader.n_features, "n_images": reader.n_images,
                      "k": int(reader.meta["k"]), "grid": reader.meta["grid"]})

    @app.get("/features", response_model=FeaturePage, dependencies=auth, responses=errors)
    async def browse(sort: Literal[SORTS] = "id",  # type: ignore[valid-type]
                     min_freq: Annotated[float, Query(ge=0, le=1)] = 0.0,
                     max_freq: Annotated[float, Query(ge=0, le=1)] = 1.0,
                     offset: Annotated[int, Query(ge=0, lt=2**31)] = 0,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        """Features whose firing frequency over patches is in [min_freq, max_freq], sorted ("-" = descending)."""
        return _json(reader.browse(sort, min_freq, max_freq, offset, limit))

    @app.get("/features/{fid}", response_model=Feature, dependencies=auth, responses=errors)
    async def feature(fid: FeatureId, k: Annotated[int | None, Query(ge=1, le=1024)] = None) -> Response:
        """A feature's stats, its top images (strongest first) with its value at every patch, and its value bands."""
        check_feature(fid)
        return _json(reader.feature(fid, k))

    @app.get("/images/{iid}", dependencies=auth, responses={**errors, 403: {"model": Error},
                                                           200: {"content": {"image/jpeg": {}}}})
    def image(iid: ImageId, size: Annotated[int, Query(ge=16, le=1024)] = 224) -> Response:
        """The image as the model saw it (its resize and center crop), as a size x size JPEG."""
        check_image(iid)
        return Response(reader.thumbnail(iid, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/images/{iid}/features", response_model=ImageFeatures, dependencies=auth, responses=errors)
    async def image_features(iid: ImageId, m: Annotated[int | None, Query(ge=1, le=1024)] = None) -> Response:
        """The image's strongest features (by their strongest patch), strongest first."""
        check_image(iid)
        return _json(reader.image_features(iid, m))

    @app.get("/stats/density-histogram", response_model=Histogram, dependencies=auth, responses=errors)
    async def density_histogram() -> Response:
        """Histogram across features of log10 firing frequency over patches; `dead` never fired."""
        return _json(reader.meta["histogram"])

    @app.get("/", include_in_schema=False)
    async def browser() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def run(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
        storage_options: dict[str, Any] | None = None, workers: int = 1) -> None:
    """Serve with uvicorn (blocks). Several workers each memory-map the same index pages."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers > 1:
        os.environ["ACTSTORE_INDEX"], os.environ["ACTSTORE_STORAGE_OPTIONS"] = index, orjson.dumps(
            storage_options or {}).decode()
        if token:
            os.environ[TOKEN_ENV] = token
        uvicorn.run("services.api:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", access_log=False)
    else:
        uvicorn.run(create_app(index, token, storage_options), host=host, port=port, log_level="warning",
                    access_log=False)


def app_from_env() -> FastAPI:
    """uvicorn's factory for worker processes: the index and options come through the environment."""
    return create_app(os.environ["ACTSTORE_INDEX"], None,
                      orjson.loads(os.environ.get("ACTSTORE_STORAGE_OPTIONS", "{}")))


def run_ray(index: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
            storage_options: dict[str, Any] | None = None, replicas: int = 1, blocking: bool = True) -> None:
    """Serve the same app through Ray Serve (replicas on a Ray cluster; `ray.init` first to join one)."""
    from ray import serve

    index = str(Path(index).resolve())
    read_index_meta(index)  # fail here, with a one-line error, rather than in a replica

    def build() -> FastAPI:  # a plain function: Ray Serve calls builders on each replica
        return create_app(index, token, storage_options)

    # per-request log lines cost Serve two thirds of its throughput
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    deployment = serve.deployment(serve.ingress(build)(_Ingress), name="actstore-features",
                                  num_replicas=replicas, max_ongoing_requests=64, logging_config=quiet)
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(deployment.bind(), name="actstore", route_prefix="/", blocking=blocking)


class _Ingress:
    """Ray Serve's deployment class; the routes are create_app's."""
