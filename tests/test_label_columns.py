"""Extra per-image label columns (a store's dataset label_columns, e.g. iNat2021's taxonomy levels): written per
unit and finalized after the standard columns as strings ("" or None: no label), checked by verify, read by a cls
probe's --label-column without --labels; undeclared, clashing, missing or misplaced ones are one-line refusals that
write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.errors import ConfigError
from actstore.store import IMAGES_SCHEMA, ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout, verify_store
from actstore_cli import main
from services.probe import ProbeConfig, load_probe, train_probe

N, D, SHARD = 96, 16, 32
COLUMNS = ["kingdom", "family"]
FAMILIES = ["Lumbricidae", "Apidae", "Felidae"]
REJECTED = (5, 40)
NO_FAMILY = (3, 33, 70)


def written() -> dict[str, list]:
    """The rows each unit is given: families cycle (none for NO_FAMILY: "" or None), two kingdoms by family."""
    family = [None if i == 70 else "" if i in NO_FAMILY else FAMILIES[i % 3] for i in range(N)]
    kingdom = ["Animalia" if f else "" for f in family]
    status = ["rejected" if i in REJECTED else "ok" for i in range(N)]
    return {"uri": [f"img/{i}.jpg" for i in range(N)], "label": [i % 3 for i in range(N)], "status": status,
            "reason": ["broken" if s == "rejected" else "" for s in status], "kingdom": kingdom, "family": family}


def spec(columns: object = COLUMNS) -> StoreSpec:
    return StoreSpec(n_images=N, layers=(LayerSpec("3", D, TokenLayout(cls=True, grid=(2, 2)), index=3),),
                     dtype="float32", images_per_shard=SHARD, images_per_chunk=16,
                     dataset={"source": "test", "class_names": ["a", "b", "c"], "label_columns": columns})


def acts() -> np.ndarray:
    """Noise with each family's direction planted on the CLS token (strong: a probe separates them exactly)."""
    rng = np.random.default_rng(0)
    dirs = 6 * rng.standard_normal((len(FAMILIES), D))
    a = rng.standard_normal((N, 5, D)).astype(np.float32)
    for i, f in enumerate(written()["family"]):
        if f:
            a[i, 0] += dirs[FAMILIES.index(f)]
    return a


def write_units(w: StoreWriter, rows: dict[str, list]) -> None:
    a = acts()
    for k in range(w.spec.n_units):
        s, e = w.spec.unit_range(k)
        w.write_unit(k, {"3": a[s:e]}, images={c: v[s:e] for c, v in rows.items()})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("labels") / "store")
    w = StoreWriter.create(url, spec())
    write_units(w, written())
    with ActivationStore(url, allow_partial=True) as partial:  # before finalize: the units' tables
        assert partial.images().column_names[-2:] == COLUMNS
    w.finalize()
    return url


def test_label_columns_follow_the_standard_ones(store: str) -> None:
    rows = written()
    on_disk = pq.read_table(Path(store) / "images.parquet")
    assert on_disk.column_names == [*IMAGES_SCHEMA.names, *COLUMNS]
    assert on_disk.schema.field("family").type == pa.string() and on_disk.schema.field("kingdom").type == pa.string()
    assert on_disk.column("family").to_pylist() == [f or "" for f in rows["family"]]  # None stored as ""
    assert on_disk.column("kingdom").to_pylist() == rows["kingdom"]
    assert on_disk.column("uri").to_pylist() == rows["uri"] and on_disk.column("index").to_pylist() == list(range(N))
    unit = pq.read_table(Path(store) / "_units" / "1.parquet")
    assert unit.column("family").to_pylist() == [f or "" for f in rows["family"][SHARD:2 * SHARD]]
    with ActivationStore(store) as s:
        assert s.label_columns == tuple(COLUMNS) and s.images().equals(on_disk)
    report = verify_store(store, progress=False)
    assert report.ok, report.problems


def test_a_store_without_label_columns_keeps_the_standard_table(tmp_path: Path) -> None:
    url = str(tmp_path / "plain")
    w = StoreWriter.create(url, spec(columns=None))
    write_units(w, {k: v for k, v in written().items() if k not in COLUMNS})
    w.finalize()
    assert pq.read_table(Path(url) / "images.parquet").schema.equals(IMAGES_SCHEMA)
    with ActivationStore(url) as s:
        assert s.label_columns == ()
    # a table that lost the declared columns is a problem verify names
    declared = str(tmp_path / "declared")
    w = StoreWriter.create(declared, spec())
    write_units(w, written())
    w.finalize()
    (Path(declared) / "images.parquet").write_bytes((Path(url) / "images.parquet").read_bytes())
    problems = verify_store(declared, progress=False).problems
    assert len(problems) == 1 and problems[0].startswith("images.parquet: columns (index int64, uri string")
    assert "reason string, kingdom string, family string)" in problems[0]


def test_a_probe_reads_a_store_label_column(store: str, tmp_path: Path) -> None:
    out = tmp_path / "family"
    meta = train_probe(ProbeConfig(store, "cls", str(out), label_column="family"), progress=False)
    assert meta["class_names"] == sorted(FAMILIES) and meta["label_column"] == "family"
    assert json.loads((out / "probe.json").read_text())["label_column"] == "family"
    family = written()["family"]
    usable = [i for i in range(N) if family[i] and i not in REJECTED]
    assert meta["n_train"] + meta["n_test"] == len(usable) and meta["metrics"]["accuracy"] == 1.0
    # the class numbers mean the written names: the probe names every usable image's family
    with ActivationStore(store) as s:
        x = s.read("3")
    pred = load_probe(str(out)).logits(x[usable]).argmax(-1)
    assert [meta["class_names"][k] for k in pred.tolist()] == [family[i] for i in usable]
    # "label" is still the images' label with the dataset's class names
    meta = train_probe(ProbeConfig(store, "cls", str(tmp_path / "label"), steps=5), progress=False)
    assert meta["class_names"] == ["a", "b", "c"] and meta["label_column"] == "label"


def test_a_column_the_store_lacks_is_one_line_and_writes_nothing(store: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "genus"
    with pytest.raises(ConfigError, match=r"no label column 'genus'; it has label, kingdom, family \(or pass"):
        train_probe(ProbeConfig(store, "cls", str(out), label_column="genus"), progress=False)
    assert main(["probe", "--store", store, "--task", "cls", "--out", str(out), "--label-column", "genus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no label column 'genus'" in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(ConfigError, match="--label-column is for cls probes"):
        ProbeConfig(store, "seg", str(out), label_column="family")


def test_undeclared_or_bad_unit_columns_are_refused(tmp_path: Path) -> None:
    for columns, rows, message in ((COLUMNS, {"genus": ["Apis"] * SHARD},
                                    r"unknown columns \['genus'\] \(the store's label columns: kingdom, family\)"),
                                   (None, {"family": ["Apidae"] * SHARD}, r"unknown columns \['family'\]"),
                                   (COLUMNS, {"family": [1] * SHARD}, "label column 'family' must hold strings"),
                                   (COLUMNS, {"family": ["Apidae"]}, "column 'family' has 1 rows, unit has 32")):
        url = str(tmp_path / "s")
        w = StoreWriter.create(url, spec(columns), overwrite=True)
        with pytest.raises(ConfigError, match=message):
            w.write_unit(0, {"3": acts()[:SHARD]}, images=rows)
        assert w.units_done() == set()


@pytest.mark.parametrize("columns,message", [
    (["kingdom", "label"], r"label_columns: label already in the images table \(index, uri"),
    (["status"], "label_columns: status already in the images table"),
    (["family", "family"], r"distinct, non-empty names, got \['family', 'family'\]"),
    (["", "family"], "distinct, non-empty names"),
    ("family", "must be a list of column names, got 'family'"),
])
def test_a_bad_declaration_is_refused_before_anything_is_written(tmp_path: Path, columns: object,
                                                                  message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StoreWriter.create(str(tmp_path / "s"), spec(columns))
    assert not (tmp_path / "s").exists()
