"""The atlas (`actstore atlas`: UMAP and PCA of an SAE's decoder directions, kept in its index) and the service's
comparison (`actstore serve --compare`): /atlas, /features/{id}/matches and the other SAE's images, over real HTTP.

The atlas under test is conftest's atlas_index_dir (a 64-feature SAE whose decoder rows 5-7 are near-copies of
row 4); the comparison is conftest's compare_dir (A: index_dir's SAE, B: that one), served from side B.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from fastapi.testclient import TestClient

from actstore.errors import ConfigError
from actstore_cli import main
from services.api import create_app
from services.api.schemas import Atlas, FeatureMatches
from services.index.atlas import AtlasConfig, block_rows, build_atlas, knn_cosine, umap_2d, unit_rows
from services.index.layout import open_array, read_index_meta
from conftest import OTHER_D_SAE, OTHER_TWINS
from test_api import fuzz


def get(url: str, **kw) -> requests.Response:
    return requests.get(url, timeout=30, **kw)


def decoder_rows(index: Path) -> np.ndarray:
    """W_dec of the index's SAE, read from its safetensors file (not through the project's loader)."""
    from safetensors.numpy import load_file

    return load_file(str(Path(read_index_meta(index)["sae"]) / "sae.safetensors"))["W_dec"].astype(np.float64)


def atlas_table(index: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(index / "atlas.parquet")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


# ---- the atlas file ----------------------------------------------------------------------------

def test_pca_is_the_covariance_eigenvectors(atlas_index_dir):
    """PCA coordinates against an eigendecomposition of the directions' covariance (no SVD, no sklearn)."""
    w = decoder_rows(atlas_index_dir)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    c = u - u.mean(axis=0)
    values, vectors = np.linalg.eigh(c.T @ c)
    values, vectors = values[::-1], vectors[:, ::-1]
    t = atlas_table(atlas_index_dir)
    got = np.stack([t["pca_x"], t["pca_y"]], axis=1)
    for j in range(2):
        axis = vectors[:, j] * np.sign(vectors[np.abs(vectors[:, j]).argmax(), j])  # largest loading positive
        np.testing.assert_allclose(got[:, j], c @ axis, atol=2e-5)
    info = json.loads(pq.read_schema(atlas_index_dir / "atlas.parquet").metadata[b"actstore"])
    np.testing.assert_allclose(info["pca_explained"], values[:2] / values.sum(), rtol=1e-5)


def test_umap_keeps_near_duplicates_together_and_density_is_the_index(atlas_index_dir):
    t = atlas_table(atlas_index_dir)
    assert t["id"].tolist() == list(range(OTHER_D_SAE))
    xy = np.stack([t["umap_x"], t["umap_y"]], axis=1)
    assert xy.shape == (OTHER_D_SAE, 2) and np.isfinite(xy).all()
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    twins = [4, *OTHER_TWINS]
    spread = dist[np.ix_(twins, twins)].max()
    assert spread < np.quantile(dist[np.triu_indices(OTHER_D_SAE, 1)], 0.05), "near-duplicate directions spread apart"
    freq = pq.read_table(atlas_index_dir / "features.parquet").column("freq_patches").to_numpy()
    assert (t["dead"] == (freq == 0)).all()
    np.testing.assert_allclose(t["log10_density"][freq > 0], np.log10(freq[freq > 0]), rtol=1e-6)
    assert np.isnan(t["log10_density"][freq == 0]).all()  # nulls


def test_exact_cosine_neighbours_in_blocks():
    """The neighbour graph handed to UMAP against a brute-force argsort, computed in several blocks."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(37, 9))
    w[5] = w[4] * 3  # an exact duplicate direction: each must still be its own first neighbour
    u = unit_rows(w)
    idx, dist = knn_cosine(u, 6, block=8)
    full = 1 - u.astype(np.float64) @ u.T.astype(np.float64)
    assert (idx[:, 0] == np.arange(37)).all() and (dist[:, 0] == 0).all()
    assert idx[4, 1] == 5 and idx[5, 1] == 4
    for i in range(37):
        # rows 4 and 5 are at the same distance from every row: either may take a last slot, so the check is that
        # idx[i] holds 6 distinct rows at the 6 smallest brute-force distances
        want = np.sort(np.where(np.arange(37) == i, -1, full[i]))[:6]
        assert len(set(idx[i])) == 6, i
        np.testing.assert_allclose(np.sort(full[i, idx[i]])[1:], want[1:], atol=1e-6, err_msg=str(i))
        np.testing.assert_allclose(dist[i, 1:], want[1:], atol=1e-6, err_msg=str(i))


def test_cli_same_seed_same_map_and_only_its_own_file(atlas_index_dir, tmp_path, capsys):
    index = tmp_path / "index"
    shutil.copytree(atlas_index_dir, index)
    others = {p: p.read_bytes() for p in index.rglob("*") if p.is_file() and p.name != "atlas.parquet"}
    assert main(["atlas", "--index", str(index), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err
    # a budget of a few rows of the neighbour search and of PCA at once: the same map
    cfg = AtlasConfig(str(index))
    n, d = decoder_rows(atlas_index_dir).shape
    gb = next(g for g in np.geomspace(1e-4, 1, 400) if _fits(cfg, g, n, d) and
              2 <= block_rows(replace(cfg, memory_gb=g), n, d, 15) <= n // 4)
    assert main(["atlas", "--index", str(index), "--overwrite", "--memory-gb", str(gb), "-q"]) == 0
    assert "actstore serve --index" in capsys.readouterr().out
    before, after = atlas_table(atlas_index_dir), atlas_table(index)
    for column in ("umap_x", "umap_y", "pca_x", "pca_y"):
        np.testing.assert_allclose(after[column], before[column], atol=1e-5, err_msg=column)
    assert {p: p.read_bytes() for p in index.rglob("*") if p.is_file() and p.name != "atlas.parquet"} == others
    assert not list(index.glob(".*")), "a temporary file was left behind"
    u = unit_rows(decoder_rows(atlas_index_dir))
    assert not np.allclose(umap_2d(u, 15, 0.1, seed=1, block=n), np.stack([before["umap_x"], before["umap_y"]], 1))
    with pytest.raises(ConfigError, match=r"^atlas: --memory-gb \S+ is too small: .* per row of the neighbour search"):
        build_atlas(replace(cfg, memory_gb=1e-6, overwrite=True), progress=False)
    assert main(["atlas", "--index", str(tmp_path / "nothing"), "-q"]) == 1
    assert "not a feature index" in capsys.readouterr().err


def _fits(cfg: AtlasConfig, gb: float, n: int, d: int) -> bool:
    try:
        block_rows(replace(cfg, memory_gb=gb), n, d, 15)
    except ConfigError:
        return False
    return True


# ---- the service ---------------------------------------------------------------------------------

def test_atlas_endpoint_is_the_file(compare_url, atlas_index_dir):
    body = get(f"{compare_url}/atlas").json()
    Atlas.model_validate(body)
    t = atlas_table(atlas_index_dir)
    assert body["n_features"] == OTHER_D_SAE and body["n_dead"] == int(t["dead"].sum())
    for column in ("umap_x", "umap_y", "pca_x", "pca_y"):
        np.testing.assert_allclose(body[column], t[column], rtol=1e-6)
    assert [d is None for d in body["log10_density"]] == t["dead"].tolist() == body["dead"]


def test_without_atlas_or_comparison_the_new_routes_say_what_to_run(api_url):
    for path, hint in (("/atlas", "actstore atlas --index"), ("/features/0/matches", "--compare"),
                       ("/images/0?other=true", "--compare")):
        r = get(api_url + path)
        assert r.status_code == 404 and hint in r.json()["detail"], path


def _expected_matches(compare_dir: Path, fid: int) -> list[tuple[int, bool, bool, float]]:
    """(feature, best, assigned, similarity) of B's feature fid, straight from the comparison's tables."""
    best = pq.read_table(compare_dir / "matches_b.parquet").to_pandas().set_index("feature_b")
    pairs = pq.read_table(compare_dir / "assignment.parquet").to_pandas().set_index("feature_b")
    out = []
    partner = int(pairs.loc[fid, "feature_a"]) if fid in pairs.index else -1
    if fid in best.index:
        out.append((int(best.loc[fid, "best_a"]), True, bool(partner == best.loc[fid, "best_a"]),
                    float(best.loc[fid, "pearson"])))
    if partner >= 0 and (not out or out[0][0] != partner):
        out.append((partner, False, True, float(pairs.loc[fid, "pearson"])))
    return out


def test_matches_are_the_comparison_with_the_other_index_top_images(compare_url, compare_dir, index_dir):
    best = pq.read_table(compare_dir / "matches_b.parquet").to_pandas().set_index("feature_b")
    pairs = pq.read_table(compare_dir / "assignment.parquet").to_pandas().set_index("feature_b")
    differs = [f for f in pairs.index if f in best.index and pairs.loc[f, "feature_a"] != best.loc[f, "best_a"]]
    agrees = [f for f in pairs.index if f in best.index and pairs.loc[f, "feature_a"] == best.loc[f, "best_a"]]
    dead = [f for f in range(OTHER_D_SAE) if f not in best.index and f not in pairs.index]
    assert differs and agrees and dead, "the test comparison should hold all three cases"
    top_a, values_a = open_array(index_dir, "top_images"), open_array(index_dir, "top_values")
    for fid in (differs[0], agrees[0], dead[0]):
        body = get(f"{compare_url}/features/{fid}/matches", params={"k": 3}).json()
        FeatureMatches.model_validate(body)
        assert (body["id"], body["side"], body["by"]) == (fid, "b", "activations")
        assert body["other"]["side"] == "a" and body["other"]["index"] == str(index_dir.resolve())
        assert body["other"]["d_sae"] == read_index_meta(index_dir)["d_sae"] and body["other"]["layer"] == "10"
        want = _expected_matches(compare_dir, fid)
        assert [(m["feature"], m["best"], m["assigned"]) for m in body["matches"]] == [w[:3] for w in want], fid
        assert [m["similarity"] for m in body["matches"]] == pytest.approx([w[3] for w in want])
        for m in body["matches"]:
            g = m["feature"]
            n = min(3, int((top_a[g] >= 0).sum()))
            assert [t["image"] for t in m["top_images"]] == top_a[g, :n].tolist()
            np.testing.assert_allclose([t["value"] for t in m["top_images"]], values_a[g, :n], rtol=1e-6)
            assert m["grid"] == [14, 14] and all(len(t["heatmap"]) == 196 for t in m["top_images"])
            if m["best"]:
                assert m["mutual"] == bool(best.loc[fid, "mutual"])
                assert m["jaccard_topk"] == pytest.approx(best.loc[fid, "jaccard_topk"])
    assert get(f"{compare_url}/features/{OTHER_D_SAE}/matches").status_code == 404


def test_other_images_come_from_the_other_index(compare_url, api_url):
    assert get(f"{compare_url}/images/3", params={"other": "true", "size": 64}).content == \
        get(f"{api_url}/images/3", params={"size": 64}).content
    assert get(f"{compare_url}/images/48", params={"other": "true"}).status_code == 404


def test_a_comparison_other_side_without_index_gives_matches_without_images(compare_dir, atlas_index_dir, tmp_path):
    copy = tmp_path / "cmp"
    shutil.copytree(compare_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["a"]["index"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    fid = int(pq.read_table(copy / "matches_b.parquet").column("feature_b")[0].as_py())
    client = TestClient(create_app(atlas_index_dir, compare=copy))
    body = client.get(f"/features/{fid}/matches").json()
    assert body["other"]["index"] is None and body["matches"]
    assert all(m["top_images"] == [] and m["grid"] is None for m in body["matches"])
    assert client.get("/images/3?other=true").status_code == 404


def test_serve_refuses_a_comparison_the_index_is_not_part_of(compare_dir, index_dir, tmp_path, capsys):
    stranger = tmp_path / "stranger"
    shutil.copytree(index_dir, stranger)
    with pytest.raises(ConfigError, match="neither side"):
        create_app(stranger, compare=compare_dir)
    assert main(["serve", "--index", str(stranger), "--compare", str(compare_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "neither side" in err
    assert main(["serve", "--index", str(stranger), "--compare", str(tmp_path)]) == 1
    assert "not a comparison" in capsys.readouterr().err


def test_fuzz_the_new_routes(compare_url):
    """schemathesis on the atlas and matches routes of a service that has both: no 5xx, responses as documented."""
    assert fuzz(compare_url, max_examples=10, paths=("/atlas", "/features/{fid}/matches")) == 2
