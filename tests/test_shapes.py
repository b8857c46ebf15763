"""The generated shapes dataset: deterministic bytes, factors that match the pixels."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actstore.errors import ConfigError
from actstore.testing.shapes import SHAPES, generate_dataset
from actstore.extract.sources import build_manifest


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_dataset(str(tmp_path / "a"), 30, seed=5)
    generate_dataset(str(tmp_path / "b"), 30, seed=5)
    generate_dataset(str(tmp_path / "c"), 30, seed=6)
    generate_dataset(str(tmp_path / "small"), 12, seed=5)
    a, b, c, small = (_files(tmp_path / n) for n in ["a", "b", "c", "small"])
    assert len(a) == 30 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    assert small == {k: a[k] for k in small}  # image i depends on (seed, i) only
    assert pq.read_table(tmp_path / "a" / "factors.parquet").equals(pq.read_table(tmp_path / "b" / "factors.parquet"))


def test_factors_match_files_and_manifest(tmp_path):
    ds = generate_dataset(str(tmp_path), 60, seed=2, image_size=64)
    factors = pq.read_table(tmp_path / "factors.parquet")
    assert factors.equals(ds.factors) and len(ds) == 60
    m = build_manifest(str(tmp_path))
    assert m.class_names == list(SHAPES)
    assert [u[len(str(tmp_path)) + 1:] for u in m.uris] == factors.column("path").to_pylist()
    assert m.labels.tolist() == factors.column("label").to_pylist()
    assert sorted(factors.column("index").to_pylist()) == list(range(60))
    for row in factors.to_pylist():
        pixels = np.asarray(Image.open(tmp_path / row["path"]))
        assert pixels.shape == (64, 64, 3)
        color = np.array([row["color_r"], row["color_g"], row["color_b"]])
        assert pixels[0, 0].tolist() == [row["background_r"], row["background_g"], row["background_b"]]
        centre = pixels[row["y"], row["x"]]
        assert np.array_equal(centre, color) or np.array_equal(centre, (color * 0.45).astype(np.uint8))
        assert row["size"] <= row["x"] < 64 - row["size"] and row["size"] <= row["y"] < 64 - row["size"]
    assert set(factors.column("texture").to_pylist()) == {"solid", "stripes", "dots", "checker"}


def test_refuses_to_overwrite_unless_asked(tmp_path):
    generate_dataset(str(tmp_path), 6)
    with pytest.raises(ConfigError, match="overwrite=True"):
        generate_dataset(str(tmp_path), 6)
    generate_dataset(str(tmp_path), 3, overwrite=True)
    assert len(_files(tmp_path)) == 3
