"""The read side of one index folder, without HTTP: what every route asks of the index.

`IndexReader` reads index.json and memory-maps every array at once, checked against it, the image table, and the
atlas when the index has one; images are read only when their store row is ok and their file lies under the dataset
root the index recorded (`read_inside`).

The image table (uri, label, ok per image: services.index.layout's IMAGE_TABLE) is memory-mapped, so the workers
share one copy: with the URIs as Python strings read from images.parquet in each, every worker of two held ~550 MiB
of its own at 1.28M images; mapping the table, ~60 MiB, as at 10K (benchmarks/bench_serve_scale.py). It is mapped
from the file the runner hands over (one for all its workers), else from the index's own images.arrow when that was
made from its images.parquet as it is now; else (an index written without one, or an images.parquet edited since)
it is read from images.parquet into this process (Arrow columns, not Python lists).
The explanations (`actstore explain`'s explanations.parquet), when the index has them, are read at start-up too;
services.api.explanations holds them and searches them. So is the abstraction profile (`actstore abstraction`'s
abstraction.parquet and .json: each feature's level in a label hierarchy, services.abstraction.layout).
Failures raise the project's error family (actstore.errors); services.api.errors turns them into HTTP.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from threading import Lock
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from actstore.errors import AccessDeniedError, NotFoundError
from actstore.extract import decode_image
from actstore.extract.sources import ImageRef, read_bytes
from services.abstraction import read_abstraction
from services.api.explanations import Explanations
from services.api.geometry import model_view
from services.index.atlas import read_atlas
from services.index.layout import (FEATURES, IMAGE_TABLE, check_index, image_arrays, images_digest, made_from,
                                   numpy_view, open_image_table, read_image_columns, read_index_meta)

__all__ = ["SORTS", "IndexReader", "read_inside"]

SORTS = ("id", "freq", "-freq", "freq_images", "-freq_images", "max_act", "-max_act", "mean_act", "-mean_act")
"""Orders of the feature list: by id, or by a statistic ("-" = descending)."""
STATS = ("freq_patches", "freq_images", "mean_act", "max_act")
"""A feature's summary, as listed and shown."""
THUMBNAILS = 256
"""JPEGs kept in the reader's LRU cache."""
_SORT_COLUMNS = {"freq": "freq_patches", "freq_images": "freq_images", "max_act": "max_act", "mean_act": "mean_act"}


def _held(ids: np.ndarray, limit: int | None) -> int:
    """How many leading entries of a -1-padded row to return: all held ones, at most `limit`."""
    n = int((ids >= 0).sum())
    return n if limit is None else min(limit, n)


class IndexReader:
    """Read side of an index folder: index.json, the checked, memory-mapped arrays, the image table and the
    explanations at once; features.parquet on first use. `image_table`: an image table made from this index's
    images.parquet (the runner's, shared by its workers); a CorruptDataError when it is not that."""

    def __init__(self, path: str | Path, storage_options: dict[str, Any] | None = None,
                 image_table: str | Path | None = None) -> None:
        self.path = Path(path)
        self.meta = read_index_meta(self.path)
        self.storage_options = dict(storage_options or {})
        self.n_features, self.n_images = int(self.meta["d_sae"]), int(self.meta["n_images"])
        self.class_names: list[str] = list(self.meta.get("class_names") or [])
        self._arrays = check_index(self.path, self.meta)  # a truncated or resized array refuses to start
        self.image_table, self.images = self._image_table(image_table)
        self.explanations = Explanations.read(self.path, self.n_features)  # none without explanations.parquet
        atlas = read_atlas(self.path, self.n_features)  # from `actstore atlas`, when it was run
        self.atlas: bytes | None = None if atlas is None else orjson.dumps(  # GET /atlas's body, made once
            {**atlas, "explanation": self.explanations.listed_of(np.arange(self.n_features))})
        self.abstraction = read_abstraction(self.path, self.n_features)  # from `actstore abstraction`, when run
        self._thumbs: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = Lock()

    def array(self, name: str) -> np.ndarray:
        return self._arrays[name]

    @cached_property
    def features(self) -> dict[str, np.ndarray]:
        table = pq.ParquetFile(self.path / FEATURES).read()  # not read_table: it imports pandas
        return {name: numpy_view(table.column(name)) for name in table.column_names}

    def _image_table(self, handed: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
        """The image table's file (None: read into this process) and its columns (layout.image_arrays)."""
        digest = images_digest(self.path)
        own = self.path / IMAGE_TABLE
        path = Path(handed) if handed is not None else own if made_from(own) == digest else None
        if path is not None:
            return path, open_image_table(path, digest, self.n_images)
        return None, image_arrays(read_image_columns(self.path))

    def check_feature(self, fid: int) -> None:
        if fid >= self.n_features:
            raise NotFoundError(f"no feature {fid} (the SAE has {self.n_features})")

    def check_image(self, i: int) -> None:
        """Only images the store holds and accepted at extraction are served."""
        if i >= self.n_images:
            raise NotFoundError(f"no image {i} (the store has {self.n_images})")
        if not self.images["ok"][i]:
            raise NotFoundError(f"image {i} was rejected at extraction")

    def image_info(self, ids: list[int]) -> list[dict[str, Any]]:
        names = self.class_names
        return [{"label": v, "class_name": names[v] if 0 <= v < len(names) else None}
                for v in self.images["label"][ids].tolist()]

    def feature_stats(self, ids: np.ndarray) -> list[dict[str, Any]]:
        """The features' summaries, each with the explanation a list shows (None: not explained)."""
        cols = {c: self.features[c][ids].tolist() for c in STATS}
        return [{"id": i, **{c: v[j] for c, v in cols.items()}, "explanation": e}
                for j, (i, e) in enumerate(zip(ids.tolist(), self.explanations.listed_of(ids)))]

    def feature(self, fid: int, k: int | None) -> dict[str, Any]:
        """A feature's stats, its top images (at most k) with their heatmaps, its value bands, its explanations, its
        level in a label hierarchy (None: the index has no abstraction profile)."""
        self.check_feature(fid)
        f = self.features
        return {**self.feature_stats(np.array([fid]))[0], "n_patches_fired": int(f["n_patches_fired"][fid]),
                "n_images_fired": int(f["n_images_fired"][fid]), "grid": self.meta["grid"],
                "top_images": self.top_images(fid, k), "bands": self.bands(fid),
                "explanations": self.explanations.of(fid),
                "level": None if self.abstraction is None else self.abstraction.level(fid)}

    def top_images(self, fid: int, k: int | None) -> list[dict[str, Any]]:
        """A feature's top images (at most k, strongest first), each with the feature's value at every patch."""
        held = self.array("top_images")[fid]
        n = _held(held, k)
        images, values = held[:n].tolist(), self.array("top_values")[fid, :n].tolist()
        heat = self.array("heatmaps")[fid, :n].astype(np.float32)
        return [{"image": i, "value": v, **info, "heatmap": h}
                for i, v, info, h in zip(images, values, self.image_info(images), heat)]

    def bands(self, fid: int) -> list[dict[str, Any]]:
        """The feature's non-empty value octaves, highest first, each with its count and sampled examples."""
        lo_exp = int(self.meta["band_exponents"][0])
        counts = self.array("band_counts")[fid]
        band_images, band_values = self.array("band_images")[fid], self.array("band_values")[fid]
        bands = []
        for b in np.flatnonzero(counts)[::-1].tolist():
            ok = band_images[b] >= 0
            bands.append({"lo": 2.0 ** (lo_exp + b), "hi": 2.0 ** (lo_exp + b + 1), "count": int(counts[b]),
                          "examples": [{"image": i, "value": v} for i, v in
                                       zip(band_images[b][ok].tolist(), band_values[b][ok].tolist())]})
        return bands

    def browse(self, sort: str, min_freq: float, max_freq: float, offset: int, limit: int,
               q: str | None = None) -> dict[str, Any]:
        """A page of the features whose patch frequency is in [min_freq, max_freq], in `sort` order; with a query
        `q`, those its search finds, best first (`sort` unused), each with the explanation that matched."""
        freq = self.features["freq_patches"]
        keep = (freq >= min_freq) & (freq <= max_freq)
        if q:
            hits = self.explanations.search(q).where(keep)
            page = hits.page(offset, limit)
            listed = [{**f, "match": m} for f, m in zip(self.feature_stats(page.features),
                                                          self.explanations.matches(page))]
            return {"total": len(hits), "offset": offset, "limit": limit, "features": listed}
        ids = np.flatnonzero(keep)
        if sort != "id":
            key = self.features[_SORT_COLUMNS[sort.lstrip("-")]][ids]
            ids = ids[np.argsort(-key if sort.startswith("-") else key, kind="stable")]
        return {"total": int(ids.size), "offset": offset, "limit": limit,
                "features": self.feature_stats(ids[offset:offset + limit])}

    def image_features(self, i: int, m: int | None) -> dict[str, Any]:
        """The image's strongest features (at most m), strongest first."""
        self.check_image(i)
        feats, vals = self.array("image_features")[i], self.array("image_values")[i]
        n = _held(feats, m)
        return {"image": i, **self.image_info([i])[0],
                "features": [{"id": f, "value": v} for f, v in zip(feats[:n].tolist(), vals[:n].tolist())]}

    def thumbnail(self, i: int, size: int) -> bytes:
        """JPEG of image i as the model saw it, size x size; LRU-cached."""
        self.check_image(i)
        with self._lock:
            if (i, size) in self._thumbs:
                self._thumbs.move_to_end((i, size))
                return self._thumbs[(i, size)]
        data = read_inside(self.images["uri"][i].as_py(), self.meta["dataset_root"], self.storage_options)
        decoded = decode_image(data)
        if decoded.image is None:
            raise NotFoundError(f"image {i}: cannot be decoded ({decoded.reason})")
        buf = io.BytesIO()
        model_view(decoded.image, self.meta.get("preprocessing"), size).save(buf, "JPEG", quality=90)
        with self._lock:
            self._thumbs[(i, size)] = buf.getvalue()
            while len(self._thumbs) > THUMBNAILS:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


def read_inside(uri: str, root: str, storage_options: dict[str, Any]) -> bytes:
    """The image's bytes, if the file holding it (a loose file, a parquet file or a tar shard) lies under root
    (symlinks resolved); refused otherwise, as when a store row was edited to point elsewhere."""
    ref = ImageRef.parse(uri)
    if "://" in ref.file:
        inside = ref.file.startswith(root) and ".." not in ref.file[len(root):].split("/")
        path = ref.file
    else:
        path = os.path.realpath(ref.file)
        inside = bool(root) and (path == root or path.startswith(root.rstrip(os.sep) + os.sep))
    if not inside:
        raise AccessDeniedError("image lies outside the registered dataset")
    try:
        data = read_bytes([str(replace(ref, file=path))], storage_options)[0]
    except OSError as e:  # a shard that is gone or damaged, or storage that keeps failing: nothing to serve
        raise NotFoundError(f"image file unavailable ({type(e).__name__})") from None
    if isinstance(data, Exception):  # FileNotFoundError and the rest: the file is not there to serve
        raise NotFoundError(f"image file unavailable ({type(data).__name__})")
    return data
