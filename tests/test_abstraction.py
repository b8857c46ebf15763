"""Feature levels in a label hierarchy: on planted features (one leaf, one family, anything) they sit at the planted
level, and every level equals a brute-force count over all nodes; hierarchies from parents, a table and label
columns agree, and bad ones are refused in one line.

Then `actstore abstraction` on two planted models over the shapes images (a feature per shape; a feature per family
of shapes): placed at the planted depths from a parents CSV and from the store's label columns, its files equal to
feature_levels on labels read with plain zarr and pyarrow, its refusals one line that touch nothing, the level and
the profile served over real HTTP and shown by the dashboard, the report rendered by Chromium."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import numpy as np
import pytest

from actstore.errors import ConfigError
from services.abstraction import Hierarchy, feature_levels

FAMILIES = {"felid": ["cat", "lion", "tiger"], "canid": ["dog", "wolf"], "bird": ["owl", "crow", "hawk"]}
PARENTS = {**{leaf: family for family, leaves in FAMILIES.items() for leaf in leaves},
           **{"felid": "mammal", "canid": "mammal", "mammal": "animal", "bird": "animal"}}


def brute_force(labels: list[int], h: Hierarchy, min_share: float) -> tuple[int, int, float]:
    """(node, depth, share): every node, its labelled images counted by walking each label's parents."""
    labels = [x for x in labels if x >= 0]
    best = (-1, -1, 0.0)
    for node in range(len(h.names)):
        under = 0
        for x in labels:
            j = x
            while j >= 0 and j != node:
                j = int(h.parents[j])
            under += j == node
        share = under / len(labels) if labels else 0.0
        depth = int(h.depths[node])
        if labels and under >= min_share * len(labels) - 1e-9 and (depth, share) > (best[1], best[2]):
            best = (node, depth, share)
    return best


def test_planted_features_sit_at_their_planted_level() -> None:
    h = Hierarchy.from_parents(PARENTS)
    assert [h.depths[i] for i in h.index(["animal", "mammal", "felid", "cat", "bird", "owl"])] == [0, 1, 2, 3, 1, 2]
    rng = np.random.default_rng(0)
    leaves = [leaf for family in FAMILIES.values() for leaf in family]
    planted = []
    for leaf in leaves:  # fires on one leaf
        planted.append(("leaf", leaf, [leaf] * 8))
    for family, members in FAMILIES.items():  # on a whole family
        planted.append(("family", family, list(rng.choice(members, 8)) + members))
    planted.append(("anything", "animal", list(rng.choice(leaves, 14))))
    k = max(len(p[2]) for p in planted)
    top = np.full((len(planted), k), -1)
    for i, (_, _, labels) in enumerate(planted):
        top[i, :len(labels)] = h.index(labels)
    levels = feature_levels(top, h, min_share=1.0)
    for i, (_, node, _) in enumerate(planted):
        assert h.names[levels.node[i]] == node and levels.share[i] == 1.0
    # a family feature with one stray label: at min_share 0.9 it stays at its family, at 1.0 it climbs to the root
    stray = np.array([h.index(["cat"] * 5 + ["lion"] * 5 + ["owl"])])
    assert h.names[feature_levels(stray, h, 0.9).node[0]] == "felid"
    assert h.names[feature_levels(stray, h, 1.0).node[0]] == "animal"


def test_levels_equal_a_brute_force_count() -> None:
    h = Hierarchy.from_parents(PARENTS)
    rng = np.random.default_rng(1)
    top = rng.integers(-1, len(h.names), size=(300, 9))  # any node, with gaps
    top[::7] = h.index(["wolf"])[0]
    top[3] = -1  # a feature with no labelled image
    for min_share in (0.34, 0.5, 0.75, 1.0):
        levels = feature_levels(top, h, min_share)
        for i in range(len(top)):
            node, depth, share = brute_force(list(top[i]), h, min_share)
            assert (levels.node[i], levels.depth[i]) == (node, depth), (i, min_share)
            assert levels.share[i] == pytest.approx(share)
    assert levels.node[3] == -1 and levels.n[3] == 0


def test_hierarchies_from_a_table_and_from_label_columns(tmp_path: Path) -> None:
    table = tmp_path / "tree.csv"
    table.write_text("label,parent\n" + "".join(f"{c},{p}\n" for c, p in PARENTS.items()) + "animal,\n")
    a, b = Hierarchy.from_parents(PARENTS), Hierarchy.from_table(str(table))
    assert {n: a.depths[i] for i, n in enumerate(a.names)} == {n: b.depths[i] for i, n in enumerate(b.names)}
    rows = [("Animalia", "Felidae", "cat"), ("Animalia", "Felidae", "lion"), ("Animalia", "Canidae", "dog")]
    c = Hierarchy.from_columns(rows, ("kingdom", "family", "species"))
    top = np.array([c.index(["species:cat", "species:lion"]), c.index(["species:cat", "species:dog"])])
    assert [c.names[i] for i in feature_levels(top, c, 1.0).node] == ["family:Felidae", "kingdom:Animalia"]


def test_bad_hierarchies_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'a' is its own ancestor"):
        Hierarchy.from_parents({"a": "b", "b": "a"})
    bad = tmp_path / "bad.csv"
    bad.write_text("cat,felid\ncat,canid\n")
    with pytest.raises(ConfigError, match="'cat' has two parents"):
        Hierarchy.from_table(str(bad))
    (tmp_path / "three.csv").write_text("cat,felid,mammal\n")
    with pytest.raises(ConfigError, match=r"expected label,parent rows \(row 1\)"):
        Hierarchy.from_table(str(tmp_path / "three.csv"))
    with pytest.raises(ConfigError, match="no such file|No such file"):
        Hierarchy.from_table(str(tmp_path / "missing.csv"))
    with pytest.raises(ConfigError, match="sits under both"):
        Hierarchy.from_columns([("A", "x"), ("B", "x")], ("family", "species"))
    with pytest.raises(ConfigError, match="no node 'zebra'"):
        Hierarchy.from_parents(PARENTS).index(["zebra"])
    with pytest.raises(ConfigError, match="min_share"):
        feature_levels(np.zeros((1, 1), int), Hierarchy.from_parents(PARENTS), 0)


def test_an_index_placed_in_a_shape_hierarchy(tmp_path: Path) -> None:
    """The planted shapes index (red, stripes, random features over six shape classes) against a two-family shape
    tree: the levels equal feature_levels on labels read with plain zarr and pyarrow; the profile counts them."""
    import pyarrow.parquet as pq
    import zarr

    from planted_shapes import write_planted_shapes
    from services.abstraction import depth_counts, index_levels

    planted = write_planted_shapes(str(tmp_path / "planted"), n_images=96, k=8)
    tree = {"circle": "round", "hexagon": "round", "cross": "angular", "square": "angular", "star": "angular",
            "triangle": "angular", "round": "shape", "angular": "shape"}
    h = Hierarchy.from_parents(tree)
    names = json.loads((Path(planted.index) / "index.json").read_text())["class_names"]
    labels = pq.read_table(Path(planted.index) / "images.parquet").column("label").to_numpy()
    top = np.asarray(zarr.open_array(str(Path(planted.index) / "arrays" / "top_images"), mode="r"))[:, :6]
    expected = feature_levels(np.where(top >= 0, h.index(names)[labels[np.maximum(top, 0)]], -1), h, 0.6)
    levels = index_levels(planted.index, h, min_share=0.6, k=6)
    assert np.array_equal(levels.node, expected.node) and np.array_equal(levels.share, expected.share)
    red = planted.features["red"]
    assert levels.n[red] == 6 and levels.node[red] >= 0  # a live feature is placed somewhere in the tree
    counts = depth_counts(levels, h)
    assert counts.sum() == (levels.depth >= 0).sum() and len(counts) == 3
    with pytest.raises(ConfigError, match="no node 'circle'"):
        index_levels(planted.index, Hierarchy.from_parents({"dog": "animal"}))


# ---- planted models on the shapes images: the command, its files, its refusals, the service and the report ---------

SHAPE_FAMILY = {"circle": "round", "hexagon": "round", "cross": "angular", "square": "angular", "star": "angular",
                "triangle": "angular"}
SHAPE_TREE = {**SHAPE_FAMILY, "round": "shape", "angular": "shape"}
LABEL_COLUMNS = ("kind", "family", "shape")
N_SHAPES, D_SAE, K = 48, 8, 8
MIN_SHARE = "0.75"
"""A two-shape family's top images split 4/4 between its shapes: above 0.5, no single shape holds them."""
ONLY_FAMILY, NO_LABEL = 0, 1
"""Images whose label columns stop early: no shape (they sit at their family), nothing (unlabelled)."""


@dataclass(frozen=True)
class Model:
    """One planted "model": its store (the shapes images, class names and label columns), SAE and index."""

    store: str
    index: str
    features: dict[str, int]
    """{shape or family: its SAE feature}; the other features are dead."""


def planted_acts(shapes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4 patches, 8) float32: each image's shape atom at every patch, strength 3 - 0.2 x its rank among the
    images of its shape (so a family's top images take turns over its shapes), plus noise; and the atoms (6, 8)."""
    rng = np.random.default_rng(0)
    atoms = np.linalg.qr(rng.standard_normal((D_SAE, D_SAE)))[0][:len(SHAPE_FAMILY)].astype(np.float32)
    order = sorted(SHAPE_FAMILY)
    rank = {s: 0 for s in order}
    acts = 0.01 * rng.standard_normal((len(shapes), 4, D_SAE)).astype(np.float32)
    for i, shape in enumerate(shapes):
        acts[i] += (3.0 - 0.2 * rank[shape]) * atoms[order.index(shape)]
        rank[shape] += 1
    return acts, atoms


def write_model(root: Path, name: str, manifest, acts: np.ndarray, encoder: dict[str, np.ndarray]) -> Model:
    """A one-layer store of `acts` (label columns kind, family, shape), a relu SAE whose features read the given
    directions (the rest dead), and its index."""
    import torch

    from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
    from sae import checkpoint
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder
    from services.index import IndexConfig, build_index

    shapes = [manifest.class_names[c] for c in manifest.labels]
    columns = {"kind": ["shape"] * len(shapes), "family": [SHAPE_FAMILY[s] for s in shapes], "shape": list(shapes)}
    columns["shape"][ONLY_FAMILY] = ""
    for c in LABEL_COLUMNS:
        columns[c][NO_LABEL] = ""
    spec = StoreSpec(n_images=len(shapes), layers=(LayerSpec("0", D_SAE, TokenLayout(cls=False, grid=(2, 2)), 0),),
                     dtype="float32", images_per_shard=len(shapes),
                     backbone={"family": "synthetic", "name": f"{name}net", "n_blocks": 1, "init_seed": 0},
                     dataset={"source": manifest.source, "fingerprint": manifest.fingerprint,
                              "class_names": list(manifest.class_names), "label_columns": list(LABEL_COLUMNS)})
    store, sae_dir, index = (str(root / f"{name}-{part}") for part in ("store", "sae", "index"))
    writer = StoreWriter.create(store, spec)
    writer.write_unit(0, {"0": acts}, images={"uri": manifest.uris, "label": manifest.labels.tolist(),
                                              "width": [32] * len(shapes), "height": [32] * len(shapes), **columns})
    writer.finalize()
    sae = SparseAutoencoder(SAEConfig(d_in=D_SAE, d_sae=D_SAE, kind="relu"))
    w, bias = np.zeros((D_SAE, D_SAE), np.float32), np.full(D_SAE, -10.0, np.float32)
    for j, direction in enumerate(encoder.values()):
        w[j], bias[j] = direction, -0.2
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(w))
        sae.W_dec.copy_(torch.from_numpy(w))
        sae.b_enc.copy_(torch.from_numpy(bias))
    checkpoint.save(sae, sae_dir, extra=checkpoint.origin(ActivationStore(store), "0"))
    build_index(IndexConfig(store, sae_dir, out=index, k=K), progress=False)
    return Model(store, index, {name: j for j, name in enumerate(encoder)})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Model]:
    """"leaf": a feature per shape; "family": one for round shapes (circle, hexagon), one for the angular rest."""
    from actstore.extract import build_manifest
    from actstore.testing.shapes import generate_dataset

    root = tmp_path_factory.mktemp("planted-levels")
    generate_dataset(str(root / "images"), N_SHAPES, seed=0, image_size=32)
    manifest = build_manifest(str(root / "images"))
    acts, atoms = planted_acts([manifest.class_names[c] for c in manifest.labels])
    atom = dict(zip(sorted(SHAPE_FAMILY), atoms))
    families = {f: sum(atom[s] for s in SHAPE_FAMILY if SHAPE_FAMILY[s] == f) for f in ("round", "angular")}
    return {"leaf": write_model(root, "leaf", manifest, acts, atom),
            "family": write_model(root, "family", manifest, acts, families)}


def fresh(models: dict[str, Model], tmp_path: Path) -> dict[str, Path]:
    """Copies of the two indexes, so that each test writes into its own."""
    import shutil

    return {name: Path(shutil.copytree(m.index, tmp_path / name)) for name, m in models.items()}


def parents_csv(tmp_path: Path) -> Path:
    path = tmp_path / "shapes.csv"
    path.write_text("label,parent\n" + "".join(f"{c},{p}\n" for c, p in SHAPE_TREE.items()) + "shape,\n")
    return path


def written(index: Path) -> tuple[dict, dict[str, list]]:
    """abstraction.json and abstraction.parquet's columns, read with json and pyarrow."""
    import pyarrow.parquet as pq

    return (json.loads((index / "abstraction.json").read_text()),
            pq.read_table(index / "abstraction.parquet").to_pydict())


def independent_levels(index: Path, columns: bool, min_share: float) -> tuple[list[str | None], np.ndarray,
                                                                                np.ndarray, np.ndarray]:
    """(node names, depth, share, n) per feature from labels read with plain zarr and pyarrow: the store's label
    columns (each image at its finest value before the first empty one) or the index's class names in the tree."""
    import pyarrow.parquet as pq
    import zarr

    meta = json.loads((index / "index.json").read_text())
    if columns:
        rows = pq.read_table(Path(meta["store"]) / "images.parquet").to_pydict()
        paths = []
        for i in range(len(rows["uri"])):
            path = []
            for c in LABEL_COLUMNS:
                if not rows[c][i]:
                    break
                path.append(rows[c][i])
            paths.append(path)
        h = Hierarchy.from_columns([p for p in paths if p], LABEL_COLUMNS)
        nodes = np.array([h.index([f"{LABEL_COLUMNS[len(p) - 1]}:{p[-1]}"])[0] if p else -1 for p in paths])
    else:
        h = Hierarchy.from_parents(SHAPE_TREE)
        labels = pq.read_table(index / "images.parquet").column("label").to_numpy()
        nodes = h.index(meta["class_names"])[labels]
    top = np.asarray(zarr.open_array(str(index / "arrays" / "top_images"), mode="r"))
    levels = feature_levels(np.where(top >= 0, nodes[np.maximum(top, 0)], -1), h, min_share)
    return [h.names[j] if j >= 0 else None for j in levels.node], levels.depth, levels.share, levels.n


@pytest.mark.parametrize("source", ["parents", "columns"])
def test_the_command_places_planted_models_at_their_depths(models, tmp_path, capsys, source) -> None:
    """The leaf model's live features sit at the shapes (depth 2), the family model's at round/angular (depth 1);
    abstraction.parquet equals feature_levels on labels read with plain zarr and pyarrow; the printed table puts
    the two profiles side by side."""
    from actstore_cli import main

    idx = fresh(models, tmp_path)
    hierarchy = ["--parents", str(parents_csv(tmp_path))] if source == "parents" else ["--columns", "kind,family,shape"]
    assert main(["abstraction", "--index", str(idx["leaf"]), str(idx["family"]), *hierarchy,
                 "--min-share", MIN_SHARE, "-q"]) == 0
    out = capsys.readouterr().out
    prefix = "shape:" if source == "columns" else ""
    family_prefix = "family:" if source == "columns" else ""
    for name, model in models.items():
        info, table = written(idx[name])
        depth, node_prefix = (2, prefix) if name == "leaf" else (1, family_prefix)
        for label, fid in model.features.items():
            assert (table["node"][fid], table["depth"][fid]) == (node_prefix + label, depth), (name, label)
        dead = sorted(set(range(D_SAE)) - set(model.features.values()))
        assert all(table["depth"][f] == -1 and table["node"][f] is None and table["n"][f] == 0 for f in dead)
        counts = [0, 0, 0]
        counts[depth] = len(model.features)
        p = info["profile"]
        assert (p["counts"], p["placed"], p["no_images"], p["unplaced"]) == (counts, len(model.features), len(dead), 0)
        assert p["mean_depth"] == depth and info["k"] == K and info["min_share"] == float(MIN_SHARE)
        assert info["depth_names"] == (list(LABEL_COLUMNS) if source == "columns" else None)
        nodes, depths, shares, ns = independent_levels(idx[name], source == "columns", float(MIN_SHARE))
        assert table["node"] == nodes and table["depth"] == depths.tolist() and table["n"] == ns.tolist()
        assert np.allclose(table["share"], shares)
    # images 0 and 1 are circles: by label columns, 0 has no shape (it sits at round) and 1 no label at all
    circle = written(idx["leaf"])[1]
    fid = models["leaf"].features["circle"]
    n, share = (K - 1, (K - 2) / (K - 1)) if source == "columns" else (K, 1.0)
    assert circle["n"][fid] == n and circle["share"][fid] == pytest.approx(share)
    names = " shape" if source == "columns" else ""
    assert f"depth 1{' family' if names else ''}  " in out
    row = next(line for line in out.splitlines() if line.startswith(f"depth 2{names}"))
    assert row.split()[-4:] == ["6", "(100.0%)", "0", "(0.0%)"]
    assert next(line for line in out.splitlines() if line.startswith("mean depth")).split()[-2:] == ["2.00", "1.00"]
    assert "leaf: synthetic:leafnet layer 0, 8 features" in out and "family: synthetic:familynet" in out


def test_refusals_are_one_line_and_touch_nothing(models, tmp_path, capsys) -> None:
    """A second run needs --overwrite; a foreign abstraction.json (or a foreign report file) is never replaced,
    and nothing is written into any index; bad hierarchies are one line; a run adds only its two files."""
    import hashlib

    from actstore_cli import main

    def snapshot(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    def refused(args: list[str], message: str) -> None:
        before = {name: snapshot(path) for name, path in idx.items()}
        assert main(["abstraction", "--index", str(idx["leaf"]), str(idx["family"]), *args, "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert {name: snapshot(path) for name, path in idx.items()} == before

    idx = fresh(models, tmp_path)
    tree = ["--parents", str(parents_csv(tmp_path))]
    untouched = snapshot(idx["leaf"])
    refused([*tree, "--columns", "kind"], "either --parents FILE.csv or --columns")
    refused(["--columns", "kind,genus"], "no label column 'genus' (its label columns: kind, family, shape)")
    refused(["--parents", str(tmp_path / "missing.csv")], "missing.csv")
    foreign_report = tmp_path / "notes.html"
    foreign_report.write_text("my notes")
    refused([*tree, "--report", str(foreign_report), "--overwrite"], "is not an actstore report")
    assert foreign_report.read_text() == "my notes"
    meta = idx["family"] / "index.json"  # the second index names a class the table lacks: the first gets nothing
    original = meta.read_text()
    meta.write_text(original.replace('"circle"', '"zebra"'))
    refused(tree, "no node 'zebra'")
    meta.write_text(original)

    assert main(["abstraction", "--index", str(idx["leaf"]), str(idx["family"]), *tree, "-q"]) == 0
    capsys.readouterr()
    after = snapshot(idx["leaf"])
    assert set(after) - set(untouched) == {"abstraction.json", "abstraction.parquet"}
    assert {k: v for k, v in after.items() if k in untouched} == untouched
    refused(tree, "an abstraction profile (abstraction.json of actstore abstraction) is already there; pass "
                  "--overwrite")
    (idx["family"] / "abstraction.json").write_text('{"mine": true}')
    refused([*tree, "--overwrite"], "abstraction.json exists and is not an abstraction profile")
    assert (idx["family"] / "abstraction.json").read_text() == '{"mine": true}'
    (idx["family"] / "abstraction.json").unlink()
    refused([*tree, "--overwrite"], "abstraction.parquet exists and is not an abstraction profile")
    (idx["family"] / "abstraction.parquet").unlink()
    assert main(["abstraction", "--index", str(idx["leaf"]), str(idx["family"]), *tree, "--min-share", "1",
                 "--overwrite", "-q"]) == 0
    assert written(idx["leaf"])[0]["min_share"] == 1.0 and written(idx["family"])[0]["min_share"] == 1.0


def test_the_service_serves_levels_and_the_profile(models, tmp_path) -> None:
    """Over real HTTP: a feature's JSON carries its level, GET /abstraction is abstraction.json; an index without a
    profile has level null and a 404 naming the command; the dashboard's feature view shows the level line."""
    import urllib.error
    import urllib.request

    from conftest import _serve
    from test_browser import render

    from actstore_cli import main
    from services.abstraction import level_line
    from services.api import create_app

    def get(url: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    idx = fresh(models, tmp_path)
    assert main(["abstraction", "--index", str(idx["leaf"]), "--columns", "kind,family,shape", "-q"]) == 0
    info, table = written(idx["leaf"])
    fid = models["leaf"].features["star"]
    for url in _serve(create_app(idx["leaf"])):
        status, f = get(f"{url}/features/{fid}")
        assert status == 200 and f["level"] == {"node": "shape:star", "depth": 2, "depth_name": "shape",
                                                 "share": 1.0, "n": K, "min_share": 0.5}
        assert get(f"{url}/features/7")[1]["level"] == {"node": None, "depth": None, "depth_name": None,
                                                        "share": None, "n": 0, "min_share": 0.5}
        assert get(f"{url}/abstraction") == (200, info)
        page = render(tmp_path, f"{url}/#feature={fid}")
        assert page.find_all("body")[0].attrs.get("data-rendered") == f"feature-{fid}"
        line = page.by_id("level")
        expected = "level: shape:star (depth 2 shape, share 1.00 of 8 top images)"
        assert line.all_text() == level_line(f["level"]) == expected
        assert line.attrs["data-node"] == "shape:star" and line.attrs["data-depth"] == "2"
    for url in _serve(create_app(idx["family"])):
        assert get(f"{url}/features/0")[1]["level"] is None
        status, error = get(f"{url}/abstraction")
        assert status == 404 and "run `actstore abstraction --index DIR" in json.dumps(error)
        assert not [n for n in render(tmp_path, f"{url}/#feature=0").iter() if n.attrs.get("id") == "level"]


def test_the_report_puts_the_models_side_by_side(models, tmp_path, capsys) -> None:
    """--report writes one page: the profile figure (its values the two profiles' shares), the printed table, and
    per model example features by depth with their level line and top images; Chromium renders it."""
    import shutil

    from test_browser import ARTIFACTS, DOM, chromium

    from actstore_cli import main
    from services.abstraction import level_line, profile_table, read_abstraction

    idx = fresh(models, tmp_path)
    out = tmp_path / "abstraction.html"
    args = ["abstraction", "--index", str(idx["leaf"]), str(idx["family"]), "--parents", str(parents_csv(tmp_path)),
            "--min-share", MIN_SHARE, "--report", str(out), "--examples", "2", "--images", "3", "-q"]
    assert main(args) == 0
    assert f"{out}: report written" in capsys.readouterr().out
    page = DOM(out.read_text()).root
    infos = {name: written(path)[0] for name, path in idx.items()}
    (figure,) = [f for f in page.find_all("figure", "plot") if f.attrs["data-plot"] == "abstraction-profile"]
    values = json.loads(figure.attrs["data-values"])
    assert values["share"] == {"leaf": [0.0, 0.0, 1.0], "family": [0.0, 1.0, 0.0]}
    assert values["depths"] == ["depth 0", "depth 1", "depth 2"]
    (table,) = [t for t in page.find_all("table") if t.attrs.get("data-table") == "profile"]
    cells = [[c.all_text() for c in row.children if c.tag in ("td", "th")] for row in table.find_all("tr")]
    header, rows = profile_table(infos)
    assert cells == [header, *rows]
    texts = [p.all_text() for p in page.find_all("p")]
    for name, path in idx.items():
        a = read_abstraction(path, D_SAE)
        shown = [int(h.attrs["data-feature"]) for h in page.find_all("h4")
                 if h.all_text().startswith(f"{name} feature #")]
        assert shown == [0, 1]  # the features with the most labelled top images, then the highest share, then by id
        depth = 2 if name == "leaf" else 1
        (heading,) = [h for h in page.find_all("h3") if h.attrs.get("data-model") == name
                      and h.attrs.get("data-depth") == str(depth)]
        assert heading.all_text() == f"depth {depth}: {len(models[name].features)} features, 2 shown"
        assert all(level_line(a.level(fid)) in texts for fid in shown)
        assert [h.attrs["data-depth"] for h in page.find_all("h3") if h.attrs.get("data-model") == name] == [str(depth)]
    assert "level: circle (depth 2, share 1.00 of 8 top images)" in texts
    assert "level: angular (depth 1, share 1.00 of 8 top images)" in texts
    assert len(page.find_all("div", "tiles")) == 4  # two models x 2 examples at their one populated depth
    assert all(len(t.find_all("figure", "tile")) == 3 for t in page.find_all("div", "tiles"))
    shot = tmp_path / "shot.png"
    chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1400,1600")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-abstraction.png")
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size > 500, "rendered nearly blank"
    # the report is ours: replaced with --overwrite only
    assert main(args) == 1 and "already there; pass --overwrite" in capsys.readouterr().err
    # the index report shows each feature's level too
    from services.report import ReportConfig, write_report

    write_report(ReportConfig(str(idx["family"]), str(tmp_path / "index.html"), features=2, images=2), progress=False)
    texts = [p.all_text() for p in DOM((tmp_path / "index.html").read_text()).root.find_all("p")]
    assert "level: round (depth 1, share 1.00 of 8 top images)" in texts
    assert "level: angular (depth 1, share 1.00 of 8 top images)" in texts


def test_every_option_is_a_flag_with_its_docstring() -> None:
    import dataclasses

    from actstore_cli import build_parser
    from actstore_cli.args import field_docs
    from services.abstraction import AbstractionConfig

    sub = next(a for a in build_parser("abstraction")._actions if a.dest == "command")
    actions = {a.dest: a for a in sub.choices["abstraction"]._actions}
    for f in dataclasses.fields(AbstractionConfig):
        action = actions[f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")] and action.default is None
        assert action.help.startswith(field_docs(AbstractionConfig)[f.name])
    cfg = AbstractionConfig(index=("a",), columns=("kingdom,family", "species"))
    assert cfg.columns == ("kingdom", "family", "species") and cfg.index == ("a",)
    for bad, message in (({"columns": ("a", "a")}, "distinct"), ({"parents": "t.csv", "min_share": 0}, "min_share"),
                         ({"parents": "t.csv", "k": 0}, "k must be >= 1"),
                         ({"parents": "t.csv", "images": 0}, "images"),
                         ({"index": ("a", "./a"), "parents": "t.csv"}, "named twice"),
                         ({"index": ("s3://b/i",), "parents": "t.csv"}, "local folder")):
        with pytest.raises(ConfigError, match=message):
            AbstractionConfig(**{"index": ("a",), **bad})
