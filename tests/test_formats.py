"""Dataset formats: parquet with the images inside, WebDataset tar shards, iNat2021's taxonomy, each read into the
same store as the same images in a plain folder.

The formats are written by the libraries researchers get them from (`datasets`' Image feature, webdataset's
TarWriter) from one generated shapes folder; the folder's store is the reference for every other store.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch

from actstore.errors import ActstoreError, ConfigError, CorruptDataError
from actstore.extract import ExtractConfig, run_extract
from actstore.extract.sources import TAXONOMY, ImageRef, build_manifest, read_bytes
from actstore.store import ActivationStore
from actstore.testing.shapes import SHAPES, generate_dataset

MODEL, LAYER = "timm:vit_tiny_patch16_224", "10"
N_IMAGES, PER_SHARD = 24, 8
SPLITS = (slice(0, 13), slice(13, N_IMAGES))
"""Two files or shards, cut inside a unit, so a unit reads from both."""


def extract(images: str, out: str, **kw) -> object:
    cfg = ExtractConfig(images=images, model=MODEL, out=out, batch_size=8, images_per_shard=PER_SHARD, **kw)
    return run_extract(cfg, progress=False)


def write_parquet(folder: Path, blobs: list[bytes], labels: list[int], names: list[str]) -> None:
    """The hub's layout: `datasets` Image + ClassLabel features, row groups of 5 rows, two files."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    folder.mkdir(parents=True)
    for k, part in enumerate(SPLITS):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in blobs[part]],
                                         "label": labels[part]}, features=features)
        ds.to_parquet(str(folder / f"train-{k:05d}-of-00002.parquet"), batch_size=5)


def write_tars(folder: Path, blobs: list[bytes], labels: list[int], names: list[str]) -> None:
    """WebDataset shards: <key>.png, <key>.cls (the label), <key>.json ({"shape": its name})."""
    import webdataset as wds

    folder.mkdir(parents=True)
    for k, part in enumerate(SPLITS):
        with wds.TarWriter(str(folder / f"shard-{k:04d}.tar")) as w:
            for i in range(N_IMAGES)[part]:
                w.write({"__key__": f"sample{i:05d}", "png": blobs[i], "cls": labels[i],
                         "json": {"shape": names[labels[i]]}})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    generate_dataset(str(root / "folder"), N_IMAGES, seed=5, image_size=64)
    m = build_manifest(str(root / "folder"))
    blobs = read_bytes(m.uris)
    write_parquet(root / "parquet", blobs, m.labels.tolist(), m.class_names)
    write_tars(root / "tar", blobs, m.labels.tolist(), m.class_names)
    (root / "classes.txt").write_text("\n".join(m.class_names) + "\n")
    return root


@pytest.fixture(scope="module")
def folder_store(ray_local, data) -> ActivationStore:
    assert extract(str(data / "folder"), str(data / "folder-store")).complete
    return ActivationStore(str(data / "folder-store"))


def assert_same_store(store: ActivationStore, reference: ActivationStore) -> None:
    """Value for value: activations (bit patterns), the images' labels, sizes and status, the class names."""
    assert torch.equal(store.read(LAYER).view(torch.int16), reference.read(LAYER).view(torch.int16))
    columns = ["label", "width", "height", "status", "reason"]
    assert store.images().select(columns).equals(reference.images().select(columns))
    assert store.attrs["dataset"]["class_names"] == reference.attrs["dataset"]["class_names"]


def test_manifests_list_the_folders_images_in_order(data):
    folder = build_manifest(str(data / "folder"))
    expected = read_bytes(folder.uris)
    for source, kw in [(data / "parquet", {}), (f"{data}/parquet/train-*.parquet", {}), (data / "tar", {}),
                       (f"{data}/tar/shard-{{0000..0001}}.tar", {"label_column": "shape"}),
                       (f"{data}/tar/shard-000[01].tar", {"class_names": str(data / "classes.txt")})]:
        m = build_manifest(str(source), **kw)
        assert read_bytes(m.uris) == expected, source
        assert m.labels.tolist() == folder.labels.tolist(), source
        names = m.class_names
        assert names == ([] if source == data / "tar" else folder.class_names), source
    refs = [ImageRef.parse(u) for u in build_manifest(str(data / "parquet")).uris]
    assert [(Path(r.file).name, r.row) for r in refs[12:14]] == [("train-00000-of-00002.parquet", 12),
                                                                 ("train-00001-of-00002.parquet", 0)]
    tar = [ImageRef.parse(u) for u in build_manifest(str(data / "tar")).uris]
    assert tar[0].member == "sample00000.png" and tar[0].size == len(expected[0])
    with open(data / "tar" / "shard-0000.tar", "rb") as f:  # the range is the member's bytes, by plain reads
        f.seek(tar[1].offset)
        assert f.read(tar[1].size) == expected[1]


def test_class_names_from_the_dataset_card(data, tmp_path):
    """Parquet without `datasets`' metadata: the names come from README.md's dataset_info, two folders up."""
    table = pq.read_table(data / "parquet" / "train-00000-of-00002.parquet").replace_schema_metadata(None)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "repo" / "data" / "train-00000.parquet")
    names = "\n".join(f"          '{k}': {n}" for k, n in enumerate(SHAPES))
    (tmp_path / "repo" / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
        f"      class_label:\n        names:\n{names}\n---\n# shapes\n")
    assert build_manifest(str(tmp_path / "repo" / "data")).class_names == list(SHAPES)


@pytest.mark.parametrize("source, kw, message", [
    ("parquet", {"label_column": "species"}, "no label column 'species'"),
    ("tar", {"label_column": "species"}, "no sample has a 'species' member or .json field"),
    ("parquet", {"image_column": "label"}, "holds int64, not image bytes"),
    ("tar", {"image_column": "png"}, "--image-column is for parquet datasets"),
    ("folder", {"label_column": "label"}, "--label-column is for parquet, tar and list sources"),
    ("tar/shard-{0000..0002}.tar", {}, "shard-0002.tar does not exist"),
])
def test_bad_options_are_refused_in_one_line(data, source, kw, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_manifest(str(data / source), **kw)
    assert "\n" not in str(e.value)


FORMATS = {"parquet": {}, "tar": {"label_column": "shape"}}


@pytest.fixture(scope="module")
def format_stores(ray_local, data) -> dict[str, ActivationStore]:
    stores = {}
    for fmt, kw in FORMATS.items():
        result = extract(str(data / fmt), str(data / f"{fmt}-store"), **kw)
        assert result.complete and result.n_rejected == 0
        stores[fmt] = ActivationStore(str(data / f"{fmt}-store"))
    return stores


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_gives_the_folders_store(folder_store, format_stores, fmt):
    assert_same_store(format_stores[fmt], folder_store)
    assert ImageRef.parse(format_stores[fmt].images().column("uri")[0].as_py()).kind == fmt


def test_the_service_shows_an_image_from_each(data, folder_store, format_stores):
    """/images/{id} over each format's index: the same picture as the folder's, read through its reference."""
    from conftest import _serve
    from sae import checkpoint
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder
    from services.api import create_app
    from services.index import IndexConfig, build_index

    pictures = {}
    for name, store in {"folder": folder_store, **format_stores}.items():
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=store.layer(LAYER).d, d_sae=32, kind="topk", k=4))
        checkpoint.save(sae, str(data / f"{name}-sae"), extra=checkpoint.origin(store, LAYER))
        index = build_index(IndexConfig(store.url, str(data / f"{name}-sae"), str(data / f"{name}-index"), k=4),
                            progress=False)
        for url in _serve(create_app(index)):
            r = requests.get(f"{url}/images/17", params={"size": 64}, timeout=30)
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", name
            pictures[name] = r.content
    assert pictures["parquet"] == pictures["folder"] and pictures["tar"] == pictures["folder"]


def test_a_format_on_s3(data, folder_store, s3, s3_url):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put(str(data / "tar"), s3_url + "/tar", recursive=True)
    result = extract(s3_url + "/tar/shard-{0000..0001}.tar", str(data / "s3-store"), label_column="shape",
                     image_storage_options=s3.storage_options)
    assert result.complete
    store = ActivationStore(str(data / "s3-store"))
    assert_same_store(store, folder_store)
    assert store.images().column("uri")[5].as_py().startswith(s3_url + "/tar/shard-0000.tar#member=sample00005.png")
    fs.put(str(data / "parquet"), s3_url + "/parquet", recursive=True)  # parquet: listed and read by row group
    m = build_manifest(s3_url + "/parquet/train-*.parquet", s3.storage_options)
    local = build_manifest(str(data / "parquet"))
    assert m.class_names == local.class_names and m.labels.tolist() == local.labels.tolist()
    assert read_bytes(m.uris, s3.storage_options) == read_bytes(local.uris)


def test_a_corrupt_row_or_member_is_recorded_and_the_job_goes_on(ray_local, data, tmp_path):
    m = build_manifest(str(data / "folder"))
    blobs = read_bytes(m.uris)
    blobs[3], blobs[17] = b"not an image at all", blobs[17][:len(blobs[17]) // 2]
    write_parquet(tmp_path / "parquet", blobs, m.labels.tolist(), m.class_names)
    write_tars(tmp_path / "tar", blobs, m.labels.tolist(), m.class_names)
    for fmt in ("parquet", "tar"):
        result = extract(str(tmp_path / fmt), str(tmp_path / f"{fmt}-store"))
        assert result.complete and result.n_rejected == 2
        images = ActivationStore(str(tmp_path / f"{fmt}-store")).images()
        reasons = dict(zip(images.column("index").to_pylist(), images.column("reason").to_pylist()))
        assert reasons[3].startswith("not an image") and reasons[17].startswith(("truncated", "corrupt"))
        assert sum(bool(r) for r in reasons.values()) == 2


def test_a_truncated_tar_is_refused_naming_it(data, tmp_path):
    shutil.copytree(data / "tar", tmp_path / "tar")
    shard = tmp_path / "tar" / "shard-0001.tar"
    refs = build_manifest(str(tmp_path / "tar")).uris
    shard.write_bytes(shard.read_bytes()[:7000])
    with pytest.raises(CorruptDataError, match=r"shard-0001.tar: truncated: bytes \d+\.\.\d+ are needed"):
        read_bytes(refs[N_IMAGES - 4:])  # cut after the listing: the unit reading it fails
    with pytest.raises(CorruptDataError, match=r"shard-0001.tar: truncated") as e:
        extract(str(tmp_path / "tar"), str(tmp_path / "store"))
    assert "\n" not in str(e.value) and not (tmp_path / "store").exists()


def test_an_unreadable_parquet_file_fails_its_units_and_a_rerun_redoes_them(data, folder_store, tmp_path):
    shutil.copytree(data / "parquet", tmp_path / "parquet")
    path = tmp_path / "parquet" / "train-00001-of-00002.parquet"
    good = path.read_bytes()
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the image column of rows 5..9 of that file
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    path.write_bytes(good[:start] + b"\xff" * chunk.total_compressed_size + good[start + chunk.total_compressed_size:])
    with pytest.raises(ActstoreError, match=r"train-00001-of-00002.parquet: unreadable parquet") as e:
        extract(str(tmp_path / "parquet"), str(tmp_path / "store"))
    assert "\n" not in str(e.value)
    path.write_bytes(good)
    result = extract(str(tmp_path / "parquet"), str(tmp_path / "store"))
    assert result.complete
    assert_same_store(ActivationStore(str(tmp_path / "store")), folder_store)


def test_a_missing_label_column_is_refused_before_any_work(ray_local, data, tmp_path):
    with pytest.raises(ConfigError, match="no label column 'family'"):
        extract(str(data / "parquet"), str(tmp_path / "store"), label_column="family")
    assert not (tmp_path / "store").exists()


def write_inat(root: Path, n_per_class: int = 2) -> list[dict]:
    """An iNat2021-like split: train/<id>_<kingdom>_..._<genus>_<epithet>/*.jpg and train.json (images listed
    before the categories, as in the real file)."""
    from PIL import Image

    taxa = [("Animalia", "Annelida", "Clitellata", "Haplotaxida", "Lumbricidae", "Lumbricus", "terrestris",
             "Annelids"),
            ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "Insects"),
            ("Plantae", "Tracheophyta", "Magnoliopsida", "Asterales", "Asteraceae", "Bellis", "perennis", "Plants")]
    categories, images = [], []
    for cid, (kingdom, phylum, cls, order, family, genus, epithet, supercategory) in enumerate(taxa):
        folder = f"{cid:05d}_{kingdom}_{phylum}_{cls}_{order}_{family}_{genus}_{epithet}"
        (root / "train" / folder).mkdir(parents=True)
        for j in range(n_per_class):
            Image.new("RGB", (40, 30), (40 * cid, 20 * j, 90)).save(root / "train" / folder / f"{cid}-{j}.jpg")
            images.append({"id": len(images), "file_name": f"train/{folder}/{cid}-{j}.jpg"})
        categories.append({"id": cid, "name": f"{genus} {epithet}", "common_name": "", "supercategory": supercategory,
                           "kingdom": kingdom, "phylum": phylum, "class": cls, "order": order, "family": family,
                           "genus": genus, "specific_epithet": epithet, "image_dir_name": folder})
    (root / "train.json").write_text(json.dumps({"info": {"year": 2021}, "images": images, "categories": categories,
                                                 "annotations": []}))
    return categories


def test_inat_folders_get_species_names_and_taxonomy_columns(tmp_path, monkeypatch):
    categories = write_inat(tmp_path)
    import actstore.extract.sources._inat as inat

    monkeypatch.setattr(inat, "_READ", 64)  # the categories key and array cross many reads
    m = build_manifest(str(tmp_path / "train"))
    assert m.class_names == [c["name"] for c in categories]
    assert list(m.label_columns) == list(TAXONOMY)
    for level, key in [("kingdom", "kingdom"), ("family", "family"), ("species", "name"),
                       ("supercategory", "supercategory")]:
        expected = [categories[label][key] for label in m.labels.tolist()]
        assert m.label_columns[level].values(0, len(m)) == expected, level
    assert m.label_columns["kingdom"].names == ["Animalia", "Plantae"]
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "train", plain)
    assert build_manifest(str(plain)).label_columns == {}  # no JSON beside it: a plain class-folder tree


def test_an_inat_store_carries_the_taxonomy_a_probe_can_use(ray_local, tmp_path, capsys):
    from actstore_cli import main
    from services.probe import ProbeConfig, train_probe

    categories = write_inat(tmp_path, n_per_class=3)
    assert main(["extract", "--images", str(tmp_path / "train"), "--model", MODEL, "--out", str(tmp_path / "store"),
                 "--images-per-shard", str(PER_SHARD), "-q"]) == 0
    assert main(["info", str(tmp_path / "store")]) == 0
    assert "labels     3 class names; label columns supercategory, kingdom, phylum" in capsys.readouterr().out
    store = ActivationStore(str(tmp_path / "store"))
    assert store.label_columns == TAXONOMY
    images = store.images()
    labels = images.column("label").to_pylist()
    assert images.column("family").to_pylist() == [categories[k]["family"] for k in labels]
    assert store.attrs["dataset"]["class_names"] == [c["name"] for c in categories]
    meta = train_probe(ProbeConfig(str(tmp_path / "store"), "cls", str(tmp_path / "probe"), label_column="kingdom",
                                   steps=5), progress=False)
    assert meta["class_names"] == ["Animalia", "Plantae"] and meta["label_column"] == "kingdom"


def test_the_service_reads_only_shards_under_the_dataset_root(data, tmp_path):
    from actstore.errors import AccessDeniedError
    from services.api.reader import read_inside
    from services.index import dataset_root

    refs = build_manifest(str(data / "tar")).uris
    root = dataset_root(refs)
    assert root == str((data / "tar").resolve())
    assert read_inside(refs[2], root, {}) == read_bytes([refs[2]])[0]
    shutil.copy(data / "tar" / "shard-0000.tar", tmp_path / "shard-0000.tar")
    with pytest.raises(AccessDeniedError):
        read_inside(refs[2].replace(str(data / "tar"), str(tmp_path)), root, {})


@pytest.mark.parametrize("fmt", ["GNU_FORMAT", "PAX_FORMAT", "USTAR_FORMAT"])
def test_tar_listing_agrees_with_tarfile(tmp_path, fmt):
    """Member names and byte ranges as Python's tarfile reads them: long names (GNU longname, pax path), non-ASCII,
    directories and links skipped, labels from .cls."""
    import tarfile

    deep = "d" * 60 + "/" + "e" * 60 if fmt != "USTAR_FORMAT" else "short"
    names = [f"{deep}/a{i}" if i % 2 else f"b{i}" for i in range(6)]
    if fmt == "PAX_FORMAT":
        names[2] = "café/ü2"
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=getattr(tarfile, fmt)) as tar:
        tar.addfile(_entry("somedir", tarfile.DIRTYPE))
        for i, name in enumerate(names):
            for ext, data in (("cls", str(i % 3).encode()), ("jpg", bytes([i]) * (700 + 333 * i))):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tar.addfile(_entry("link.jpg", tarfile.SYMTYPE))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    m = build_manifest(str(path))
    refs = [ImageRef.parse(u) for u in m.uris]
    assert [(r.member, r.offset, r.size) for r in refs] == expected
    assert m.labels.tolist() == [i % 3 for i in range(6)]
    assert read_bytes(m.uris) == [bytes([i]) * (700 + 333 * i) for i in range(6)]


def _entry(name: str, kind: bytes):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "b0.jpg"
    return info
