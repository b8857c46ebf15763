"""Comparing several models at once (`actstore compare --side ...`): every pair equals today's two-sided comparison
of it, the matrix equals the pairwise summaries, and planted shared/partly shared/unique concepts land in their
groups; one pass for all pairs where the budget allows, pair by pair (same numbers) where it does not."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from actstore.errors import ConfigError
from actstore.store import ActivationStore
from actstore.testing.synthetic import write_planted_models
from actstore_cli import main
from sae import checkpoint
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from services.compare import CompareConfig, read_comparison, read_table, run_compare
from services.compare.many import joint_plans
from services.compare.run import GEMM_ROWS, pair_plan
from services.compare.sides import open_side

MODELS = ("clip", "siglip", "dino", "vjepa")
CONCEPTS = [MODELS, MODELS, ("clip", "siglip"), ("dino", "vjepa"), ("clip",), ("siglip",), ("dino",), ("vjepa",)]
"""Two concepts in every model, one in the language-vision pair only, one in the vision-only pair only, and one of
each model's own."""
DEAD = 3
"""Dead features appended to each planted SAE."""


def planted_sae(url: str, atoms: np.ndarray, store: str) -> None:
    """A relu SAE reading each planted atom (encoder = decoder = the atom, a margin of 5 noise std), then DEAD dead
    features."""
    d_sae, d = atoms.shape[0] + DEAD, atoms.shape[1]
    rng = np.random.default_rng(d_sae)
    w = np.concatenate([atoms, np.linalg.qr(rng.standard_normal((d, DEAD)))[0].T]).astype(np.float32)
    bias = np.concatenate([np.full(atoms.shape[0], -0.1), np.full(DEAD, -10.0)]).astype(np.float32)
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=d_sae, kind="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w))
        sae.W_dec.copy_(torch.from_numpy(w))
        sae.b_enc.copy_(torch.from_numpy(bias))
    checkpoint.save(sae, url, extra=checkpoint.origin(ActivationStore(store), "0"))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four planted models over the same 600 images, each with its SAE: the sides SAE_DIR@STORE, in MODELS order."""
    root = tmp_path_factory.mktemp("four")
    atoms = write_planted_models({m: str(root / m) for m in MODELS}, CONCEPTS, n_images=600,
                                 d={"clip": 24, "siglip": 20, "dino": 16, "vjepa": 24})
    for m in MODELS:
        planted_sae(str(root / f"sae-{m}"), atoms[m], str(root / m))
    return root, [f"{root / f'sae-{m}'}@{root / m}" for m in MODELS]


def concept_feature(model: str) -> dict[int, int]:
    """{concept: the planted SAE's feature reading it} for a model (its concepts in order)."""
    return {c: i for i, c in enumerate(c for c, members in enumerate(CONCEPTS) if model in members)}


def test_every_pair_equals_the_two_sided_comparison(four, tmp_path, capsys):
    root, sides = four
    out = tmp_path / "set"
    argv = ["compare", "--out", str(out), "--threshold", "0.7", "-q"]
    for side, name in zip(sides, MODELS):
        argv += ["--side", side, "--name", name]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = read_comparison(out, "actstore-compare-set")
    assert summary["names"] == list(MODELS) and summary["joint"] and summary["passes"] == 2
    assert [(p["a"], p["b"]) for p in summary["pairs"]] == list(itertools.combinations(range(4), 2))
    for p in summary["pairs"]:
        alone = tmp_path / f"pair-{p['a']}-{p['b']}"
        ref = run_compare(CompareConfig(a=sides[p["a"]], b=sides[p["b"]], out=str(alone)), progress=False)
        mine = read_comparison(out / p["folder"])
        for key in ("best", "mutual", "assignment", "n_images", "n_rows", "top_matches", "a", "b"):
            assert json.dumps(mine[key], sort_keys=True) == json.dumps(ref[key], sort_keys=True), (p, key)
        for name in ("matches_a.parquet", "matches_b.parquet", "assignment.parquet"):
            assert read_table(out / p["folder"], name).equals(read_table(alone, name)), (p, name)
        # the matrix holds the pair's numbers, both ways
        m = summary["matrix"]
        assert m["mean_best"][p["a"]][p["b"]] == ref["best"]["a"]["mean"]
        assert m["mean_best"][p["b"]][p["a"]] == ref["best"]["b"]["mean"]
        assert m["mutual"][p["a"]][p["b"]] == m["mutual"][p["b"]][p["a"]] == ref["mutual"]
        for t in ("0.5", "0.7", "0.9"):
            assert m["above"][t][p["b"]][p["a"]] == ref["best"]["b"]["above"][t] / ref["best"]["b"]["n"]
    assert all(summary["matrix"]["mean_best"][i][i] is None for i in range(4))
    assert "mean best pearson" in printed and "shared by all" in printed and "pairs in 2 passes" in printed


def test_planted_concepts_land_in_their_groups(four, tmp_path):
    """Each planted feature's group is the set of models its concept was planted in; shared.parquet's partners are
    the planted features of the other models."""
    _, sides = four
    summary = run_compare(CompareConfig(out=str(tmp_path / "set"), side=tuple(sides), name=MODELS), progress=False)
    table = pq.read_table(tmp_path / "set" / "shared.parquet").to_pandas()
    for k, model in enumerate(MODELS):
        mine = table[table.side == model].set_index("feature")
        assert sorted(mine.index) == sorted(concept_feature(model).values())  # dead features are left out
        for c, f in concept_feature(model).items():
            row = mine.loc[f]
            assert row.group == "+".join(m for m in MODELS if m in CONCEPTS[c]), (model, c)
            assert row.n_models == len(CONCEPTS[c])
            for j, other in enumerate(MODELS):
                if other == model:
                    assert row[f"partner_{j + 1}"] == -1 and np.isnan(row[f"sim_{j + 1}"])
                elif other in CONCEPTS[c]:
                    assert row[f"partner_{j + 1}"] == concept_feature(other)[c] and row[f"sim_{j + 1}"] > 0.95
                else:
                    assert row[f"sim_{j + 1}"] < 0.5
        groups = {g["group"]: g["features"] for g in summary["groups"][k]}
        assert groups["+".join(MODELS)] == 2 and groups[model] == 1
        assert groups["clip+siglip" if model in ("clip", "siglip") else "dino+vjepa"] == 1
    shared_all = [e for e in summary["examples"] if e["n_models"] == 4]
    assert shared_all and all(len(e["partners"]) == 3 for e in shared_all)


def assert_close_tables(x_dir, y_dir) -> None:
    """Two comparisons of one pair with other staging or tiles: float32 sums round differently, so the numbers agree
    to rounding and the assignment's order (by similarity) may swap near ties: it is compared by feature."""
    for name, key in (("matches_a.parquet", "feature_a"), ("matches_b.parquet", "feature_b"),
                      ("assignment.parquet", "feature_a")):
        x, y = (read_table(d, name).to_pandas().sort_values(key).reset_index(drop=True) for d in (x_dir, y_dir))
        for col in x.columns:
            np.testing.assert_allclose(x[col].to_numpy(), y[col].to_numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def _mode(cfg: CompareConfig, sides: list, gb: float) -> str:
    """How a comparison of `sides` runs in gb: "whole" (every pair's whole matrix in its share, two passes),
    "tiled" (all the pairs together, tile by tile), "apart" (pair by pair) or "refused"."""
    cfg, pairs = replace(cfg, memory_gb=float(gb)), list(itertools.combinations(range(len(sides)), 2))
    try:
        for i, j in pairs:
            pair_plan(cfg, sides[i], sides[j])
    except ConfigError:
        return "refused"
    plans = joint_plans(cfg, sides, pairs)
    if plans is None:
        return "apart"
    return "whole" if all(pl.tile >= sides[i].sae.cfg.d_sae for (i, _), pl in plans.items()) else "tiled"


def test_a_tight_joint_budget_still_adds_every_sum_in_the_pairs_own_order(tmp_path):
    """At the smallest budget where every pair's whole matrix and its own staging fit its share, the share would
    give it fewer staged rows than the pair alone stages; over more rows than either stages (each image's 4
    patches), float32 sums staged differently round differently (near-tied assignments flip). Each pair stages its
    own comparison's rows, so its tables are equal bit for bit."""
    models, n = MODELS[:3], GEMM_ROWS // 4 + 300
    atoms = write_planted_models({m: str(tmp_path / m) for m in models}, CONCEPTS, n_images=n, d=16, seed=5)
    sides = []
    for m in models:
        planted_sae(str(tmp_path / f"sae-{m}"), atoms[m], str(tmp_path / m))
        sides.append(f"{tmp_path / f'sae-{m}'}@{tmp_path / m}")
    cfg = CompareConfig(out=str(tmp_path / "set"), side=tuple(sides), level="patch")
    opened = [open_side(s, f"side {i}", {}, torch.device("cpu")) for i, s in enumerate(sides)]
    pairs = list(itertools.combinations(range(3), 2))

    def own_rows(g: float) -> dict:
        return {(i, j): pair_plan(cfg, opened[i], opened[j], g).rows_per_update for i, j in pairs}

    def staged(g: float) -> dict:
        return {p: pl.rows_per_update for p, pl in joint_plans(replace(cfg, memory_gb=g), opened, pairs).items()}

    gb = float(next(g for g in np.geomspace(1e-3, 1, 300) if _mode(cfg, opened, g) == "whole"
                    and staged(g) == own_rows(g)))
    own = own_rows(gb)
    assert pair_plan(cfg, opened[0], opened[1], gb / 3).rows_per_update < own[(0, 1)] < 4 * n  # several updates
    summary = run_compare(replace(cfg, memory_gb=gb), progress=False)
    assert summary["joint"] and all(p["plan"]["rows_per_update"] == own[(p["a"], p["b"])] for p in summary["pairs"])
    for p in summary["pairs"]:
        alone = tmp_path / f"pair-{p['a']}-{p['b']}"
        run_compare(CompareConfig(a=sides[p["a"]], b=sides[p["b"]], out=str(alone), level="patch", memory_gb=gb),
                    progress=False)
        for name in ("matches_a.parquet", "matches_b.parquet", "assignment.parquet"):
            assert read_table(tmp_path / "set" / p["folder"], name).equals(read_table(alone, name)), (p, name)


def test_a_budget_for_part_of_each_matrix_reads_every_pair_tile_by_tile(four, tmp_path):
    """Where a pair's share holds only part of its matrix, the pairs are still read together: one pass per tile of
    the tightest pair (the first also gathers the statistics), then max_diff, fewer store reads than pair by pair; each
    pair's tables are its own comparison's up to float32 rounding, its best partners and the groups exactly."""
    _, sides = four
    cfg = CompareConfig(out=str(tmp_path / "tiled"), side=tuple(sides), name=MODELS)
    opened = [open_side(s, f"side {i}", {}, torch.device("cpu")) for i, s in enumerate(sides)]
    gb = float(max(g for g in np.geomspace(1e-4, 1e-2, 200) if _mode(cfg, opened, g) == "tiled"))  # fewest tiles
    tiled = run_compare(replace(cfg, memory_gb=gb), progress=False)
    tiles = max(-(-opened[p["a"]].sae.cfg.d_sae // p["plan"]["tile"]) for p in tiled["pairs"])
    assert tiled["joint"] and tiles >= 2 and tiled["passes"] == tiles + 1
    apart_passes = 0
    for p in tiled["pairs"]:
        alone = tmp_path / f"pair-{p['a']}-{p['b']}"
        apart_passes += run_compare(CompareConfig(a=sides[p["a"]], b=sides[p["b"]], out=str(alone), memory_gb=gb),
                                    progress=False)["plan"]["passes"]
        assert_close_tables(tmp_path / "tiled" / p["folder"], alone)
    assert tiled["passes"] * len(sides) < 2 * apart_passes  # store reads: every store a pass, two a pair's pass
    whole = run_compare(replace(cfg, out=str(tmp_path / "whole")), progress=False)
    assert whole["passes"] == 2 and whole["groups"] == tiled["groups"]


def test_a_budget_too_small_for_one_pass_goes_pair_by_pair(four, tmp_path):
    _, sides = four
    cfg = CompareConfig(out=str(tmp_path / "joint"), side=tuple(sides[:3]))
    opened = [open_side(s, f"side {i}", {}, torch.device("cpu")) for i, s in enumerate(cfg.side)]
    gb = next(g for g in np.geomspace(1e-4, 1e-1, 300) if _mode(cfg, opened, g) == "apart")
    joint = run_compare(cfg, progress=False)
    apart = run_compare(replace(cfg, out=str(tmp_path / "apart"), memory_gb=float(gb)), progress=False)
    assert joint["joint"] and not apart["joint"] and apart["passes"] >= 6
    for p in joint["pairs"]:
        assert_close_tables(tmp_path / "joint" / p["folder"], tmp_path / "apart" / p["folder"])
    assert [g["features"] for g in joint["groups"][0]] == [g["features"] for g in apart["groups"][0]]


def test_refusals_are_one_line_and_touch_nothing(four, tmp_path):
    root, sides = four
    with pytest.raises(ConfigError, match="needs two or more sides"):
        CompareConfig(out=str(tmp_path / "x"), side=(sides[0],))
    with pytest.raises(ConfigError, match="not both"):
        CompareConfig(out=str(tmp_path / "x"), a=sides[0], b=sides[1], side=tuple(sides))
    with pytest.raises(ConfigError, match="2 names for 3 sides"):
        CompareConfig(out=str(tmp_path / "x"), side=tuple(sides[:3]), name=("a", "b"))
    other = tmp_path / "other"
    write_planted_models({"x": str(other / "x")}, CONCEPTS, n_images=40, seed=3)
    planted_sae(str(other / "sae"), np.eye(24, dtype=np.float32)[:2], str(other / "x"))
    with pytest.raises(ConfigError, match=r"clip and odd are not over the same images: image 0 is "):
        run_compare(CompareConfig(out=str(tmp_path / "x"), side=(sides[0], sides[1], f"{other / 'sae'}@{other / 'x'}"),
                                  name=("clip", "siglip", "odd")), progress=False)
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep me")
    assert main(["compare", "--out", str(mine), "--side", sides[0], "--side", sides[1], "-q"]) == 1
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    # a set is replaced only when asked, and the pair reader says what it is
    run_compare(CompareConfig(out=str(tmp_path / "set"), side=tuple(sides[:2])), progress=False)
    with pytest.raises(ConfigError, match="already there"):
        run_compare(CompareConfig(out=str(tmp_path / "set"), side=tuple(sides[:2])), progress=False)
    with pytest.raises(Exception, match="its pairs are under pairs/"):
        read_comparison(tmp_path / "set")
    assert (root / "clip").is_dir()


def test_credentials_stay_out_of_every_file_of_the_set(four, tmp_path):
    """storage_options reach every side's store and SAE, but no file of the set (its pairs' folders included), nor
    the summary it returns."""
    _, sides = four
    secret, key = "s3cr3t-5e7c0ffee", "AKIA-5e7c0ffee"
    summary = run_compare(CompareConfig(out=str(tmp_path / "set"), side=tuple(sides[:3]),
                                        storage_options={"key": key, "secret": secret}), progress=False)
    assert summary["config"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    files = [p for p in (tmp_path / "set").rglob("*") if p.is_file()]
    assert len(files) > 3 * 4
    for path in files:
        data = path.read_bytes()
        assert secret.encode() not in data and key.encode() not in data, path
    assert secret not in json.dumps(summary) and key not in json.dumps(summary)
