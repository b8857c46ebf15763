"""Feature levels in a label hierarchy: on planted features (one leaf, one family, anything) they sit at the planted
level, and every level equals a brute-force count over all nodes; hierarchies from parents, a table and label
columns agree, and bad ones are refused in one line."""

from __future__ import annotations

from pathlib import Path

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
    import json

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
