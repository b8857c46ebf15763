"""Cross-model comparison: the streamed statistics against numpy, the matching against brute force and scipy's
dense assignment, planted shared and private concepts recovered through trained SAEs, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import sae
from actstore.errors import ConfigError
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore.testing.synthetic import write_planted_pair
from actstore_cli import main
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from sae.train import TrainConfig, train
from services.compare import CompareConfig, read_comparison, read_table, run_compare
from services.compare.match import Scan, assign, jaccard
from services.compare.run import pair_plan
from services.compare.sides import open_side
from services.compare.stream import MaxDiff, PairStats
from services.index import IndexConfig, build_index

N_SHARED, N_PRIVATE = 6, 4


# the streaming core against numpy ----------------------------------------------------------------

def columns(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 8) non-negative features: sparse, dead, tied (integer values), one firing on a single row, one
    dense around a large offset (cancellation), and ordinary ones."""
    x = np.where(rng.random((n, 8)) < 0.4, rng.uniform(0, 3, (n, 8)), 0.0)
    x[:, 1] = 0                                        # dead
    x[:, 2] = rng.integers(0, 3, n)                    # ties
    x[:, 3] = 0
    x[n // 2, 3] = 5                                   # fires once
    x[:, 4] = 50 + 0.01 * rng.standard_normal(n)       # dense, large offset
    return x.astype(np.float32)


def feed(stats: PairStats, xa: np.ndarray, xb: np.ndarray) -> PairStats:
    """One pass over the rows, in blocks of 1 to 17 rows."""
    start = 0
    for size in (1, 5, 1, 13, 17):
        stop = start + size
        stats.update(torch.from_numpy(xa[start:stop]), torch.from_numpy(xb[start:stop]), torch.arange(start, stop))
        start = stop
    return stats.finish()


@pytest.mark.parametrize("rows_per_update", [1, 6, 1000])
def test_streamed_statistics_equal_numpy(rows_per_update):
    rng = np.random.default_rng(0)
    n, k = 37, 5
    xa, xb = columns(rng, n), columns(rng, n)[:, :7]
    xb[:, 6] = xa[:, 0] * 2 + 1                        # perfectly correlated with a's feature 0
    stats = PairStats(8, 7, k, rows_per_update=rows_per_update)
    feed(stats, xa, xb)
    assert stats.n == n
    np.testing.assert_array_equal(stats.a.fired.numpy(), (xa > 0).sum(0))
    mean_a, std_a, _ = stats.a.moments(n)
    np.testing.assert_allclose(mean_a.numpy(), xa.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std_a.numpy(), xa.astype(np.float64).std(0), rtol=1e-4, atol=1e-6)
    r = stats.pearson().numpy()
    full = np.corrcoef(xa.T.astype(np.float64), xb.T.astype(np.float64))[:8, 8:]
    varies_a, varies_b = xa.std(0) > 0, xb.std(0) > 0
    np.testing.assert_allclose(r[np.ix_(varies_a, varies_b)], full[np.ix_(varies_a, varies_b)], atol=2e-5)
    assert (r[~varies_a] == 0).all() and (r[:, ~varies_b] == 0).all()
    assert r[0, 6] == pytest.approx(1, abs=1e-6)
    # in tiles of A's features, one pass over the rows each: the same correlations
    tiled = PairStats(8, 7, k, rows_per_update=rows_per_update, tile=slice(0, 3))
    parts = [feed(tiled, xa, xb).pearson().numpy()]
    for tile in (slice(3, 6), slice(6, 8)):
        tiled.next_tile(tile)
        parts.append(feed(tiled, xa, xb).pearson().numpy())
    assert tiled.n == n
    np.testing.assert_allclose(np.concatenate(parts), r, atol=1e-6)
    # top-k rows: positive values, strongest first, ties to the earlier row
    for f in range(8):
        order = sorted((i for i in range(n) if xa[i, f] > 0), key=lambda i: (-xa[i, f], i))[:k]
        got = stats.a.top.sets()[f].tolist()
        assert got == order + [-1] * (k - len(order)), f


def scan(s: np.ndarray, live_a: np.ndarray, live_b: np.ndarray, candidates: int, tile: int) -> Scan:
    """The similarity matrix s through a Scan, in tiles of `tile` rows."""
    sc = Scan(torch.from_numpy(live_a), torch.from_numpy(live_b), *s.shape, candidates)
    for start in range(0, s.shape[0], tile):
        sc.add(start, torch.from_numpy(s[start:start + tile].copy()))
    return sc


@pytest.mark.parametrize("tile", [30, 7, 1])
def test_matching_equals_brute_force(tile):
    rng = np.random.default_rng(1)
    fa, fb = 30, 24
    s = rng.uniform(-0.3, 1, (fa, fb)).astype(np.float32)
    live_a, live_b = np.setdiff1d(np.arange(fa), [3, 17]), np.setdiff1d(np.arange(fb), [0, 5, 23])
    m = scan(s, live_a, live_b, fb, tile).matches()
    sub = s[np.ix_(live_a, live_b)]
    np.testing.assert_array_equal(m.best_b.numpy(), live_b[sub.argmax(1)])
    np.testing.assert_array_equal(m.best_a.numpy(), live_a[sub.argmax(0)])
    np.testing.assert_allclose(m.sim_a.numpy(), sub.max(1))
    best_of_b = dict(zip(live_b, live_a[sub.argmax(0)]))
    np.testing.assert_array_equal(m.mutual_a.numpy(), [best_of_b[b] == a for a, b in zip(live_a, m.best_b.numpy())])
    # with every partner a candidate, the sparse matching is scipy's dense assignment (pairs <= 0 add nothing)
    pairs = assign(scan(s, live_a, live_b, fb, tile).edges(), torch.from_numpy(live_a), fa, fb)
    rows, cols = linear_sum_assignment(np.maximum(sub, 0), maximize=True)
    assert pairs.column("similarity").to_numpy().sum() == pytest.approx(np.maximum(sub, 0)[rows, cols].sum(), rel=1e-5)
    # with 2 candidates: each feature's 2 best partners both ways, whatever the tiles
    few_edges = scan(s, live_a, live_b, 2, tile).edges()
    want = {(a, b) for a in live_a for b in live_b if s[a, b] > 0 and
            (s[a, b] >= np.sort(sub[list(live_a).index(a)])[-2] or s[a, b] >= np.sort(sub[:, list(live_b).index(b)])[-2])}
    assert set(zip(*few_edges[:2])) == want
    few = assign(few_edges, torch.from_numpy(live_a), fa, fb).to_pydict()
    assert len(set(few["feature_a"])) == len(few["feature_a"]) and len(set(few["feature_b"])) == len(few["feature_b"])
    assert set(few["feature_a"]) <= set(live_a) and set(few["feature_b"]) <= set(live_b)
    np.testing.assert_allclose(few["similarity"], s[few["feature_a"], few["feature_b"]])
    # top-k overlap and the standardized difference
    ta = torch.tensor([[1, 2, 3, -1], [-1, -1, -1, -1], [4, 5, 6, 7]])
    tb = torch.tensor([[3, 2, 9, 8], [-1, -1, -1, -1], [4, 5, 6, 7]])
    np.testing.assert_allclose(jaccard(ta, tb).numpy(), [2 / 5, 0, 1])
    xa, xb = rng.random((20, 3)).astype(np.float32), rng.random((20, 4)).astype(np.float32)
    pa_, pb_ = torch.tensor([0, 2]), torch.tensor([3, 1])
    mean_a, std_a = torch.from_numpy(xa.mean(0)).double(), torch.from_numpy(xa.std(0)).double()
    mean_b, std_b = torch.from_numpy(xb.mean(0)).double(), torch.from_numpy(xb.std(0)).double()
    diff = MaxDiff(pa_, pb_, mean_a, std_a, mean_b, std_b)
    diff.update(torch.from_numpy(xa[:7]), torch.from_numpy(xb[:7]))
    diff.update(torch.from_numpy(xa[7:]), torch.from_numpy(xb[7:]))
    za, zb = (xa - xa.mean(0)) / xa.std(0), (xb - xb.mean(0)) / xb.std(0)
    np.testing.assert_allclose(diff.value.numpy(), np.abs(za[:, [0, 2]] - zb[:, [3, 1]]).max(0), rtol=1e-5)


# planted concepts through trained SAEs -----------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two stores sharing 6 concepts (private 4 each) over 1200 images, a TopK SAE trained on each, and an index of A."""
    root = tmp_path_factory.mktemp("planted")
    atoms = write_planted_pair(str(root / "a"), str(root / "b"), n_shared=N_SHARED, n_private=N_PRIVATE)
    for name in "ab":
        train(TrainConfig(store=str(root / name), out=str(root / f"run-{name}"), layer="0",
                          sae=({"name": "s", "kind": "topk", "d_sae": 32, "k": 2},), tokens=150_000, batch_size=512,
                          lr=3e-3, lr_warmup_steps=20, sparsity_warmup_steps=0, checkpoint_every=None, amp=False),
              progress=False)
    build_index(IndexConfig(str(root / "a"), str(root / "run-a" / "s"), str(root / "index-a"), k=8), progress=False)
    return root, atoms


def atom_features(path: Path, atoms: np.ndarray) -> np.ndarray:
    """The SAE feature whose decoder direction is each planted atom (cosine > 0.95 asserted)."""
    model, norm = sae.load(str(path))
    w = torch.nn.functional.normalize(model.W_dec.detach(), dim=1).numpy()
    cos = atoms @ w.T  # the loader's normalization only shifts and scales isotropically: directions survive
    assert (cos.max(1) > 0.95).all(), cos.max(1)
    return cos.argmax(1)


def test_planted_shared_concepts_match_and_private_ones_do_not(planted, tmp_path, capsys):
    root, atoms = planted
    fa, fb = atom_features(root / "run-a" / "s", atoms["a"]), atom_features(root / "run-b" / "s", atoms["b"])
    out = tmp_path / "cmp"
    # A as an index folder, B as SAE_DIR@STORE_URL, through the command line
    assert main(["compare", "--a", str(root / "index-a"), "--b", f"{root / 'run-b' / 's'}@{root / 'b'}",
                 "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    summary = read_comparison(out)
    assert summary["a"]["index"] == str((root / "index-a").resolve()) and summary["b"]["index"] is None
    matches = read_table(out, "matches_a.parquet").to_pandas().set_index("feature_a")
    for s in range(N_SHARED):
        row = matches.loc[fa[s]]
        assert row.best_b == fb[s] and row.pearson > 0.9 and row.mutual, (s, row)
        assert row.jaccard_topk > 0.5
    for p in range(N_SHARED, N_SHARED + N_PRIVATE):
        assert matches.loc[fa[p]].pearson < 0.5, p
    back = read_table(out, "matches_b.parquet").to_pandas().set_index("feature_b")
    for p in range(N_SHARED, N_SHARED + N_PRIVATE):
        assert back.loc[fb[p]].pearson < 0.5
    pairs = read_table(out, "assignment.parquet").to_pandas()
    assigned = dict(zip(pairs.feature_a, pairs.feature_b))
    assert all(assigned.get(fa[s]) == fb[s] for s in range(N_SHARED))
    assert summary["best"]["a"]["above"]["0.9"] >= N_SHARED and summary["mutual"] >= N_SHARED
    assert {(t["feature_a"], t["feature_b"]) for t in summary["top_matches"][:N_SHARED]} == \
        {(int(fa[s]), int(fb[s])) for s in range(N_SHARED)}
    # the printed table starts with the shared pairs
    table = printed.split("top matches")[1].splitlines()[2:2 + N_SHARED]
    assert {tuple(map(int, line.split()[:2])) for line in table} == {(int(fa[s]), int(fb[s])) for s in range(N_SHARED)}
    # patch level: the shared concepts sit at the same patch in both stores
    patch = run_compare(CompareConfig(a=str(root / "index-a"), b=f"{root / 'run-b' / 's'}@{root / 'b'}",
                                      out=str(tmp_path / "patch"), level="patch"), progress=False)
    by_patch = read_table(tmp_path / "patch", "matches_a.parquet").to_pandas().set_index("feature_a")
    assert patch["n_rows"] == 1200 * 4
    assert all(by_patch.loc[fa[s]].best_b == fb[s] and by_patch.loc[fa[s]].pearson > 0.9 for s in range(N_SHARED))


def test_decoder_similarity_recovers_a_permuted_copy(planted, tmp_path):
    """Two SAEs of one layer: B is A with its features permuted; the decoder cosine pairs them back."""
    root, _ = planted
    model, norm = sae.load(str(root / "run-a" / "s"))
    perm = torch.randperm(model.cfg.d_sae, generator=torch.Generator().manual_seed(0))
    copy = SparseAutoencoder(model.cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(copy, name).copy_(getattr(model, name)[perm])
        copy.b_dec.copy_(model.b_dec)
    sae.save(copy, str(tmp_path / "perm"), normalization=norm, extra=sae.read_extra(str(root / "run-a" / "s")))
    summary = run_compare(CompareConfig(a=f"{root / 'run-a' / 's'}@{root / 'a'}", b=f"{tmp_path / 'perm'}@{root / 'a'}",
                                        out=str(tmp_path / "cmp"), by="decoder"), progress=False)
    m = read_table(tmp_path / "cmp", "matches_a.parquet").to_pandas()
    inverse = torch.argsort(perm).numpy()
    np.testing.assert_array_equal(m.best_b, inverse[m.feature_a])   # copy's feature j is A's feature perm[j]
    assert (m.cosine > 0.999).all() and m.mutual.all() and (m.jaccard_topk == 1).all()
    assert (m.max_diff < 1e-3).all()
    pairs = read_table(tmp_path / "cmp", "assignment.parquet").to_pandas()
    np.testing.assert_array_equal(pairs.feature_b, inverse[pairs.feature_a])
    assert summary["assignment"]["pairs"] == summary["a"]["live"]
    with pytest.raises(ConfigError, match="same layer of the same model"):
        run_compare(CompareConfig(a=str(root / "index-a"), b=f"{root / 'run-b' / 's'}@{root / 'b'}",
                                  out=str(tmp_path / "x"), by="decoder"), progress=False)


def test_a_pooled_layer_compares_its_one_token_as_numpy_does(tmp_path):
    """A layer of one pooled token (a ResNet's attnpool): each image's value is the SAE's on that token."""
    n, d = 64, 12
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, 1, d)).astype(np.float32)
    spec = StoreSpec(n_images=n, layers=(LayerSpec("attnpool", d, TokenLayout(cls=True, grid=(0, 0)), 4),),
                     backbone={"family": "synthetic", "name": "pooled", "n_blocks": 5},
                     dataset={"source": "synthetic", "fingerprint": "p"}, images_per_shard=32, dtype="float32")
    writer = StoreWriter.create(str(tmp_path / "store"), spec)
    for k in range(spec.n_units):
        writer.write_unit(k, {"attnpool": x[k * 32:(k + 1) * 32]})
    writer.finalize()
    norm = sae.Normalization(layer="attnpool", tokens="cls", mean=torch.zeros(d), scale=1.0)
    acts = []
    for seed in (0, 1):
        model = SparseAutoencoder(SAEConfig(d_in=d, d_sae=20, kind="relu", init_seed=seed))
        with torch.no_grad():
            model.b_enc.fill_(0.1)
        sae.save(model, str(tmp_path / f"sae{seed}"), normalization=norm,
                 extra=sae.checkpoint.origin(ActivationStore(str(tmp_path / "store")), "attnpool", "cls"))
        acts.append(model.encode(torch.from_numpy(x[:, 0])).detach().numpy())
    run_compare(CompareConfig(a=f"{tmp_path / 'sae0'}@{tmp_path / 'store'}", b=f"{tmp_path / 'sae1'}@{tmp_path / 'store'}",
                              out=str(tmp_path / "cmp")), progress=False)
    m = read_table(tmp_path / "cmp", "matches_a.parquet").to_pandas()
    live_a, live_b = acts[0].std(0) > 0, acts[1].std(0) > 0
    r = np.corrcoef(acts[0].T, acts[1].T)[:20, 20:]
    r[:, ~live_b] = -np.inf
    np.testing.assert_array_equal(m.feature_a, np.flatnonzero(live_a))
    np.testing.assert_array_equal(m.best_b, r[live_a].argmax(1))
    np.testing.assert_allclose(m.pearson, r[live_a].max(1), atol=1e-5)


def test_refusals_name_the_problem_and_touch_nothing(planted, tmp_path):
    root, _ = planted
    a, b = f"{root / 'run-a' / 's'}@{root / 'a'}", f"{root / 'run-b' / 's'}@{root / 'b'}"
    other = tmp_path / "other"
    write_planted_pair(str(other / "a"), str(other / "b"), n_images=40, seed=1, grid=(1, 2))
    with pytest.raises(ConfigError, match=r"not over the same images: image 0 is 'synthetic://planted-1/0' in A"):
        run_compare(CompareConfig(a=f"{root / 'run-a' / 's'}@{other / 'a'}", b=b, out=str(tmp_path / "x")))
    # same images, another grid: image level works, patch level is refused
    write_planted_pair(str(other / "grid"), str(other / "grid-b"), n_images=1200, seed=0, grid=(1, 2))
    model = SparseAutoencoder(SAEConfig(d_in=24, d_sae=16, kind="topk", k=2))
    sae.save(model, str(other / "sae"), normalization=sae.Normalization("0", "patches", torch.zeros(24), 1.0),
             extra=sae.checkpoint.origin(ActivationStore(str(other / "grid")), "0"))
    with pytest.raises(ConfigError, match="same patch grid; A's layer 0 is 2x2, B's layer 0 is 1x2"):
        run_compare(CompareConfig(a=a, b=f"{other / 'sae'}@{other / 'grid'}", out=str(tmp_path / "x"), level="patch"))
    with pytest.raises(ConfigError, match="neither an index folder"):
        run_compare(CompareConfig(a=str(tmp_path), b=b, out=str(tmp_path / "x")))
    # a researcher's folder as --out is refused and left as it was; a comparison is replaced only when asked
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    assert main(["compare", "--a", a, "--b", b, "--out", str(mine), "-q"]) == 1
    assert [p.name for p in mine.iterdir()] == ["todo.txt"] and (mine / "todo.txt").read_text() == "keep me"
    run_compare(CompareConfig(a=a, b=b, out=str(tmp_path / "cmp")), progress=False)
    with pytest.raises(ConfigError, match="already there"):
        run_compare(CompareConfig(a=a, b=b, out=str(tmp_path / "cmp")), progress=False)
    run_compare(CompareConfig(a=a, b=b, out=str(tmp_path / "cmp"), overwrite=True), progress=False)
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["n_images"] == 1200
    assert not list(tmp_path.glob(".*.tmp*"))
    assert ActivationStore(str(root / "a")).n_images == 1200  # inputs untouched
    assert pq.read_metadata(tmp_path / "cmp" / "matches_a.parquet").num_rows > 0


def test_credentials_stay_out_of_the_comparison(planted, tmp_path):
    """storage_options reach the stores and SAEs but no file the comparison writes, nor what it returns."""
    root, _ = planted
    secret, key = "s3cr3t-7f1c0ffee", "AKIA-7f1c0ffee"
    options = {"key": key, "secret": secret}
    summary = run_compare(CompareConfig(a=str(root / "index-a"), b=f"{root / 'run-b' / 's'}@{root / 'b'}",
                                        out=str(tmp_path / "cmp"), storage_options=options), progress=False)
    assert summary["config"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    for path in (tmp_path / "cmp").iterdir():
        data = path.read_bytes()
        assert secret.encode() not in data and key.encode() not in data, path
    assert secret not in json.dumps(summary) and key not in json.dumps(summary)


def test_a_small_budget_tiles_the_matrix_and_changes_nothing(planted, tmp_path):
    """A budget that holds a few rows of the 32 x 32 similarity matrix: the matrix is computed in tiles, one pass over
    both stores each, and the tables equal those of one pass; a budget too small for one row is refused."""
    root, _ = planted
    write_planted_pair(str(tmp_path / "a"), str(tmp_path / "b"), n_images=240, n_shared=N_SHARED, n_private=N_PRIVATE)
    a, b = f"{root / 'run-a' / 's'}@{tmp_path / 'a'}", f"{root / 'run-b' / 's'}@{tmp_path / 'b'}"
    cfg = CompareConfig(a=a, b=b, out=str(tmp_path / "one"))
    sides = [open_side(spec, name, {}, torch.device("cpu")) for spec, name in ((a, "a"), (b, "b"))]
    gb = next(g for g in np.geomspace(1e-4, 1e-2, 200)
              if _fits(cfg, sides, g) and -(-32 // pair_plan(replace(cfg, memory_gb=g), *sides).tile) in (3, 4))
    one = run_compare(cfg, progress=False)
    tiled = run_compare(replace(cfg, out=str(tmp_path / "tiled"), memory_gb=gb), progress=False)
    assert one["plan"]["passes"] == 2 and tiled["plan"]["passes"] in (4, 5)
    assert one["a"]["live"] > 20 and one["mutual"] >= N_SHARED
    for name in ("matches_a.parquet", "matches_b.parquet", "assignment.parquet"):
        x, y = (read_table(tmp_path / d, name).to_pandas() for d in ("one", "tiled"))
        assert x.columns.tolist() == y.columns.tolist()
        for col in x.columns:
            # other staging: other shifts, so the float32 sums round differently
            np.testing.assert_allclose(x[col].to_numpy(), y[col].to_numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    with pytest.raises(ConfigError, match=r"^compare: --memory-gb \S+ is too small: .* per staged row; give at least"):
        run_compare(replace(cfg, out=str(tmp_path / "x"), memory_gb=1e-6), progress=False)
    assert not (tmp_path / "x").exists()


def _fits(cfg: CompareConfig, sides: list, gb: float) -> bool:
    try:
        pair_plan(replace(cfg, memory_gb=gb), *sides)
    except ConfigError:
        return False
    return True
