"""The report of a feature index: its density histogram, random live features with their top images, and its
explanations when `actstore explain` wrote them (services.report.explanations).

A tile is what the feature browser shows for a top image: the region the model saw (the service's own crop,
IndexReader.thumbnail) with the feature's per-patch values painted over it in the browser's colour, at
alpha = 0.8 * value / max_act, so a tile here and the page at `actstore serve` look alike.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from actstore.errors import AccessDeniedError, NotFoundError
from services.abstraction import level_line
from services.api.reader import IndexReader
from services.report.config import ReportConfig
from services.report.page import Page, Tile, tiles
from services.report.plots import density_plot

__all__ = ["HEAT_MAX_ALPHA", "HEAT_RGB", "TILE", "feature_tiles", "heat_tile", "index_report"]

HEAT_RGB, HEAT_MAX_ALPHA = (255, 40, 0), 0.8
"""The heatmap colour and its alpha at the feature's max activation, as services/static/app.js paints them."""
TILE = 128
"""Pixels of a tile's side."""


def heat_tile(jpeg: bytes, heatmap: np.ndarray, grid: tuple[int, int], max_act: float, size: int = TILE) -> bytes:
    """The PNG of the image with the heatmap (one value per patch, row-major on the grid) painted over it."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")  # size x size: IndexReader.thumbnail's
    scaled = np.clip(np.asarray(heatmap, np.float32) / max_act, 0, 1) if max_act > 0 else np.zeros(len(heatmap))
    alpha = np.round(255 * HEAT_MAX_ALPHA * scaled).astype(np.uint8).reshape(grid)
    mask = Image.fromarray(alpha, "L").resize((size, size), Image.Resampling.NEAREST)
    image.paste(Image.new("RGB", (size, size), HEAT_RGB), mask=mask)
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def feature_tiles(reader: IndexReader, fid: int, n: int, size: int = TILE) -> list[Tile]:
    """The feature's top images (at most n), strongest first, each with its heatmap; an image that cannot be read
    (moved, outside the dataset root, undecodable) is a tile saying why."""
    f = reader.feature(fid, n)
    out = []
    for top in f["top_images"]:
        i = top["image"]
        caption = f"#{i} · {top['value']:.3g}" + (f" · {top['class_name']}" if top["class_name"] else "")
        try:
            png = heat_tile(reader.thumbnail(i, size), top["heatmap"], tuple(f["grid"]), f["max_act"], size)
        except (NotFoundError, AccessDeniedError) as e:
            out.append(Tile(fid, i, caption, size, missing=str(e)))
        else:
            out.append(Tile(fid, i, caption, size, png))
    return out


def feature_section(page: Page, reader: IndexReader, fid: int, n: int, label: str = "", level: int = 3) -> None:
    """One feature: its statistics, its level when the index has an abstraction profile, and its top images."""
    f = reader.features
    page.heading(f"{label}feature #{fid}", level=level, feature=fid)
    page.text(f"fires on {f['freq_patches'][fid]:.3%} of patches and {f['freq_images'][fid]:.2%} of images; "
              f"max activation {f['max_act'][fid]:.3g}, mean when firing {f['mean_act'][fid]:.3g}")
    if reader.abstraction is not None:  # from `actstore abstraction`
        page.text(level_line(reader.abstraction.level(fid)))
    page.raw(tiles(feature_tiles(reader, fid, n), feature=fid))


def live_features(reader: IndexReader) -> np.ndarray:
    """Features with at least one top image (they fired on some image)."""
    return np.flatnonzero(reader.features["n_images_fired"] > 0)


def index_report(cfg: ReportConfig, path: Path, config: dict) -> Page:
    reader = IndexReader(path)
    meta = reader.meta
    live = live_features(reader)
    rng = np.random.default_rng(cfg.seed)
    chosen = np.sort(rng.choice(live, min(cfg.features, live.size), replace=False)) if live.size else live
    backbone = meta.get("backbone") or {}
    page = Page(f"Feature index report: {path.name}", "index", [
        ("index", path), ("store", meta["store"]),
        ("SAE", f"{meta['sae']} ({meta.get('sae_kind', '?')}, {meta['d_sae']} features)"),
        ("backbone, layer", f"{backbone.get('family')}:{backbone.get('name')}, layer {meta['layer']}"),
        ("images", f"{meta['n_images']} ({meta['n_images_ok']} ok), {meta['n_patches']} patches each"),
        ("live features", f"{live.size} of {meta['d_sae']}")], config)
    png, size, values = density_plot(meta["histogram"], "Feature density over the index's patches")
    page.heading("Feature density")
    page.plot("density", png, size, f"{values['n_features'] - values['dead']} live and {values['dead']} dead "
              "features by log10 firing frequency over every patch of the store", values)
    page.heading(f"{chosen.size} random live features, top {cfg.images} images each (seed {cfg.seed})")
    if not chosen.size:
        page.text("no feature fired on any image: nothing to show", note=True)
    for fid in chosen.tolist():
        feature_section(page, reader, fid, cfg.images)
    from services.report.explanations import explanations_section  # here: it imports feature_section

    explanations_section(page, reader, cfg)
    return page
