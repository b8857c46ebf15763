"""The planted-shapes fixture (tests/planted_shapes.py): its index finds what was planted, checked against the
dataset's factors and masks, and the service shows its images so that the heatmaps lie on the shapes."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actstore.store import ActivationStore
from actstore.testing.shapes import SHAPES
from planted_shapes import FEATURES, write_planted_shapes
from services.api.reader import IndexReader

N, SIZE, GRID, K = 240, 96, (6, 6), 16


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_shapes(str(tmp_path_factory.mktemp("planted")), n_images=N, image_size=SIZE, grid=GRID, k=K)


@pytest.fixture(scope="module")
def reader(planted):
    return IndexReader(planted.index)


def _covered(planted, i: int) -> np.ndarray:
    """(36,) bool: the patches of image i that its mask touches, by blocks of the mask (not the fixture's code)."""
    path = planted.factors.column("path")[i].as_py()
    mask = np.asarray(Image.open(os.path.join(planted.masks, path))) > 0
    ph, pw = SIZE // GRID[0], SIZE // GRID[1]
    return mask.reshape(GRID[0], ph, GRID[1], pw).any(axis=(1, 3)).reshape(-1)


def _coverage(planted, i: int) -> np.ndarray:
    path = planted.factors.column("path")[i].as_py()
    mask = np.asarray(Image.open(os.path.join(planted.masks, path))) > 0
    return mask.reshape(GRID[0], SIZE // GRID[0], GRID[1], SIZE // GRID[1]).mean(axis=(1, 3)).reshape(-1)


def _column(planted, name: str) -> np.ndarray:
    return np.array(planted.factors.column(name).to_pylist())


def _fired(reader, fid: int) -> set[int]:
    """The images on which feature fid fires, from the index's per-image top features."""
    feats = reader.array("image_features")
    return set(np.flatnonzero((feats == fid).any(axis=1)).tolist())


def test_store_records_the_images_as_extraction_does(planted):
    store = ActivationStore(planted.store)
    table = store.images().to_pydict()
    paths = planted.factors.column("path").to_pylist()
    assert table["uri"] == [os.path.join(planted.images, p) for p in paths]
    assert all(os.path.isabs(u) and os.path.isfile(u) for u in table["uri"])
    assert table["label"] == [SHAPES.index(p.split("/")[0]) for p in paths] == planted.factors["label"].to_pylist()
    assert store.attrs["dataset"]["class_names"] == list(SHAPES)
    prep = store.attrs["backbone"]["preprocessing"]
    assert prep["resize"] == [SIZE, SIZE] and prep["crop"] is None and prep["image_size"] == [SIZE, SIZE]
    layer = store.layer("0")
    assert (layer.tokens.cls, layer.tokens.grid, store.spec.dtype) == (False, GRID, "float32")
    with open(os.path.join(planted.index, "index.json")) as f:
        meta = json.load(f)
    assert meta["class_names"] == list(SHAPES) and meta["preprocessing"] == prep
    assert meta["dataset_root"] == os.path.realpath(planted.images)
    assert planted.features == FEATURES == {"red": 0, "stripes": 1, "random": 2}


@pytest.mark.parametrize("name, column, value", [("red", "color", "red"), ("stripes", "texture", "stripes")])
def test_content_feature_fires_on_its_images_and_on_their_shapes(planted, reader, name, column, value):
    fid = planted.features[name]
    has = _column(planted, column) == value
    assert _fired(reader, fid) == set(np.flatnonzero(has).tolist())  # every such image, no other
    top = reader.top_images(fid, None)
    assert len(top) == min(K, has.sum())
    for t in top:
        i, heat = t["image"], np.asarray(t["heatmap"])
        assert has[i], (name, i)
        fires, covered, coverage = heat > 0, _covered(planted, i), _coverage(planted, i)
        assert not (fires & ~covered).any(), "fires off the shape"
        assert fires[coverage > 0.1].all(), "misses a patch the shape covers"
        assert t["value"] == pytest.approx(2 * coverage.max() - 0.06, abs=0.05)  # planted 2 x coverage
    values = [t["value"] for t in top]
    assert values == sorted(values, reverse=True)


def test_random_feature_fires_at_one_patch_whatever_the_image_shows(planted, reader):
    fid = planted.features["random"]
    fired = sorted(_fired(reader, fid))
    assert 0.1 * N < len(fired) < 0.3 * N
    colors, textures = _column(planted, "color")[fired], _column(planted, "texture")[fired]
    # independent of content: spread over the colours and textures about as the dataset is (8 and 4 equally likely)
    assert len(set(colors)) >= 6 and max(np.unique(colors, return_counts=True)[1]) < 0.3 * len(fired)
    assert len(set(textures)) == 4 and max(np.unique(textures, return_counts=True)[1]) < 0.5 * len(fired)
    top = reader.top_images(fid, None)
    assert len(top) == K and len({colors.tolist()[fired.index(t["image"])] for t in top}) >= 3
    assert all((np.asarray(t["heatmap"]) > 0).sum() == 1 for t in top)
    assert all(0.9 < t["value"] < 3 for t in top)


def test_other_features_are_dead(planted):
    fired = pq.read_table(os.path.join(planted.index, "features.parquet")).column("n_patches_fired").to_numpy()
    assert (fired[:3] > 0).all() and (fired[3:] == 0).all()


def test_thumbnail_is_the_image_and_the_heatmap_lies_on_the_shape(planted, reader):
    fid = planted.features["red"]
    for t in reader.top_images(fid, 4):
        i, heat = t["image"], np.asarray(t["heatmap"], dtype=np.float32).reshape(GRID)
        thumb = np.asarray(Image.open(io.BytesIO(reader.thumbnail(i, SIZE))).convert("RGB"), dtype=np.float32)
        original = np.asarray(Image.open(os.path.join(planted.images, planted.factors["path"][i].as_py())))
        assert thumb.shape == (SIZE, SIZE, 3)
        assert np.abs(thumb - original).mean() < 6  # JPEG of the whole image, not a crop of it
        ph, pw = SIZE // GRID[0], SIZE // GRID[1]
        patches = thumb.reshape(GRID[0], ph, GRID[1], pw, 3).mean(axis=(1, 3))  # (6, 6, 3) mean colour per patch
        strong = patches[heat >= 0.75 * heat.max()].mean(axis=0)
        assert strong[0] - max(strong[1], strong[2]) > 50, f"image {i}: not red under its strongest patches"
        row = planted.factors.slice(i, 1).to_pylist()[0]
        background = np.array([row["background_r"], row["background_g"], row["background_b"]], np.float32)
        assert np.abs(patches[heat <= 0] - background).max() < 12, f"image {i}: the shape under a silent patch"
