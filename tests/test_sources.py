"""The image manifest: folders and list files, local and on S3; bulk reads that never raise."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.errors import ConfigError
from actstore.testing.shapes import generate_dataset
from actstore.extract.sources import build_manifest, read_bytes


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_class_folders_give_sorted_rows_and_labels(tmp_path):
    ds = generate_dataset(str(tmp_path / "shapes"), 24, seed=1)
    m = build_manifest(str(tmp_path / "shapes"))
    assert len(m) == 24
    assert m.class_names == ds.class_names
    rels = [u[len(str(tmp_path / "shapes")) + 1:] for u in m.uris]
    assert rels == sorted(rels) == ds.factors.column("path").to_pylist()
    assert m.labels.dtype.name == "int32" and not m.labels.flags.writeable
    assert m.labels.tolist() == ds.factors.column("label").to_pylist()
    assert all(u.startswith(str(tmp_path)) for u in m.uris)  # absolute local paths


def test_fingerprint_is_stable_and_sees_a_new_file(tmp_path):
    generate_dataset(str(tmp_path / "d"), 12)
    first = build_manifest(str(tmp_path / "d"))
    assert build_manifest(str(tmp_path / "d") + "/").fingerprint == first.fingerprint
    assert len(first.fingerprint) == 64
    _touch(tmp_path / "d" / "circle" / "extra.png")
    assert build_manifest(str(tmp_path / "d")).fingerprint != first.fingerprint


def test_class_order_is_by_name_then_path_component_wise(tmp_path):
    # by full string, "a-b/x" < "a/x" ('-' < '/'); rows must still follow class order a, a-b
    for rel in ["a-b/1.jpg", "a/sub/2.JPEG", "a/1.png", "b/.hidden.jpg", "b/._1.jpg", "c/notes.txt"]:
        _touch(tmp_path / rel)
    m = build_manifest(str(tmp_path))
    assert m.class_names == ["a", "a-b"]
    assert [u[len(str(tmp_path)) + 1:] for u in m.uris] == ["a/1.png", "a/sub/2.JPEG", "a-b/1.jpg"]
    assert m.labels.tolist() == [0, 0, 1]


def test_flat_folder_has_no_labels_and_is_recursive(tmp_path):
    for rel in ["b.webp", "a.Tiff", "deeper/c.gif", "readme.md"]:
        _touch(tmp_path / rel)
    m = build_manifest(str(tmp_path))
    assert [u[len(str(tmp_path)) + 1:] for u in m.uris] == ["a.Tiff", "b.webp", "deeper/c.gif"]
    assert m.labels.tolist() == [-1, -1, -1] and m.class_names == []


def test_list_files_keep_their_order_and_resolve_relative_entries(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("# my images\nimgs/2.png\n\n/abs/1.jpg\ns3://bucket/k.jpg\n../up.png\n")
    m = build_manifest(str(lists / "a.txt"))
    assert m.uris == [f"{lists}/imgs/2.png", "/abs/1.jpg", "s3://bucket/k.jpg", f"{tmp_path}/up.png"]
    assert m.labels.tolist() == [-1] * 4

    (lists / "a.csv").write_text("path,label\nz.png,3\ny.png,\nx.png,0\n")  # first column, any header
    m = build_manifest(str(lists / "a.csv"))
    assert m.uris == [f"{lists}/z.png", f"{lists}/y.png", f"{lists}/x.png"]
    assert m.labels.tolist() == [3, -1, 0] and m.class_names == []

    pq.write_table(pa.table({"label": ["dog", "cat", "dog"], "uri": ["file:///p/1.png", "2.png", "3.png"]}),
                   lists / "a.parquet")
    m = build_manifest(str(lists / "a.parquet"))
    assert m.uris == ["/p/1.png", f"{lists}/2.png", f"{lists}/3.png"]
    assert m.class_names == ["cat", "dog"] and m.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("name, content, message", [
    ("missing", None, "no such folder or file"),
    ("empty", "dir", "no image files"),
    ("list.json", b"[]", "not a folder, a list file"),
    ("ids.csv", b"id,label\n1,0\n2,1\n", "no 'uri' column"),
    ("headerless.csv", b"a.jpg,1\nb.jpg,2\n", "not a header"),
    ("empty.txt", b"# nothing yet\n", "no image URIs"),
    ("neg.csv", b"uri,label\na.jpg,-3\n", "labels must lie in"),
    ("nouri.parquet", "parquet", "no 'uri' column"),
])
def test_bad_sources_raise_one_line_config_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
        _touch(path / "notes.txt")
    elif content == "parquet":
        pq.write_table(pa.table({"path": ["a.jpg"]}), path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        build_manifest(str(path))
    assert "\n" not in str(e.value)


def test_read_bytes_keeps_order_and_returns_errors(tmp_path):
    a = _touch(tmp_path / "a.png", b"A")
    glob_like = _touch(tmp_path / "img[1].png", b"B")  # a glob pattern to fsspec's cat()
    _touch(tmp_path / "img1.png", b"wrong")
    got = read_bytes([str(glob_like), str(tmp_path / "missing.png"), str(a), str(a), "nosuchproto://x/y.png"])
    assert got[0] == b"B" and got[2] == got[3] == b"A"
    assert isinstance(got[1], FileNotFoundError)
    assert isinstance(got[4], Exception)
    assert read_bytes([]) == []


def test_s3_folder_and_list(tmp_path, s3, s3_url):
    opts = s3.storage_options
    ds = generate_dataset(f"{s3_url}/shapes", 12, seed=3, storage_options=opts)
    m = build_manifest(f"{s3_url}/shapes", opts)
    local = generate_dataset(str(tmp_path / "shapes"), 12, seed=3)
    assert m.uris[0].startswith(f"{s3_url}/shapes/circle/")
    assert m.class_names == ds.class_names and m.labels.tolist() == local.factors.column("label").to_pylist()
    blobs = read_bytes([m.uris[0], f"{s3_url}/shapes/missing.png"], opts)
    assert blobs[0] == (tmp_path / "shapes" / ds.factors.column("path")[0].as_py()).read_bytes()
    assert isinstance(blobs[1], FileNotFoundError)

    import fsspec
    fs, _ = fsspec.core.url_to_fs(s3_url, **opts)
    fs.pipe_file(f"{s3_url}/lists/l.csv", b"uri\n../shapes/square/000003.png\n")
    listed = build_manifest(f"{s3_url}/lists/l.csv", opts)
    assert listed.uris == [f"{s3_url}/shapes/square/000003.png"]
    assert isinstance(read_bytes(listed.uris, opts)[0], bytes)
