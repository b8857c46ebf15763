"""The service's image table shared by its workers: `serve --workers 2` answers every route that reads it as the
index's own tables say, in each worker, from one memory-mapped file that the process starting them does not hold;
a damaged or foreign table is refused at start-up in one line; a stale one (images.parquet edited since) is not used.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actstore.errors import CorruptDataError
from services.api import IndexReader, create_app
from services.index.layout import IMAGE_TABLE, open_array, read_index_meta, write_image_table

REJECTED, RELABELLED = 5, 7
"""Images the test's copy of the index marks rejected, and gives another label, in its images.parquet."""


@pytest.fixture
def edited(index_dir, tmp_path) -> Path:
    """A copy of the index whose images.parquet rejects image REJECTED and relabels image RELABELLED."""
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    (copy / IMAGE_TABLE).unlink(missing_ok=True)
    table = pq.read_table(copy / "images.parquet")
    status, labels = table.column("status").to_pylist(), table.column("label").to_pylist()
    status[REJECTED], labels[RELABELLED] = "rejected", (labels[RELABELLED] + 1) % 6
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    pq.write_table(table, copy / "images.parquet")
    return copy


def _expected(index: Path) -> dict[str, object]:
    """What the image routes must say, from images.parquet and the index's arrays (not through the service)."""
    table = pq.read_table(index / "images.parquet").to_pydict()
    names = read_index_meta(index)["class_names"]
    label = {i: {"label": v, "class_name": names[v] if 0 <= v < len(names) else None}
             for i, v in enumerate(table["label"])}
    return {"label": label, "ok": [s == "ok" for s in table["status"]], "top": open_array(index, "top_images"),
            "image_features": open_array(index, "image_features")}


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    r = conn.getresponse()
    return r.status, r.read()


def _check_routes(conn: http.client.HTTPConnection, want: dict, jpeg: dict[int, bytes]) -> None:
    """Every route that reads the image table, on one connection (one worker), against `want`."""
    top = want["top"]
    for fid in np.flatnonzero((top >= 0).sum(1) > 0)[:6].tolist():
        status, body = _get(conn, f"/features/{fid}")
        assert status == 200, body
        got = json.loads(body)["top_images"]
        assert [t["image"] for t in got] == top[fid][top[fid] >= 0].tolist()
        assert [{k: t[k] for k in ("label", "class_name")} for t in got] == [want["label"][t["image"]] for t in got]
    for i, ok in enumerate(want["ok"]):
        status, body = _get(conn, f"/images/{i}/features")
        if not ok:
            assert status == 404 and b"rejected at extraction" in body, (i, body)
            assert _get(conn, f"/images/{i}")[0] == 404
            continue
        assert status == 200, body
        got = json.loads(body)
        held = want["image_features"][i]
        assert {k: got[k] for k in ("label", "class_name")} == want["label"][i], i
        assert [f["id"] for f in got["features"]] == held[held >= 0].tolist(), i
    for i, data in jpeg.items():
        assert _get(conn, f"/images/{i}?size=64") == (200, data), i
    assert _get(conn, f"/images/{len(want['ok'])}/features")[0] == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _holder(workers: list[psutil.Process], conn: http.client.HTTPConnection) -> psutil.Process:
    """The worker holding the server side of a keep-alive connection."""
    port = conn.sock.getsockname()[1]
    return next(w for w in workers if any(c.raddr and c.raddr.port == port for c in w.net_connections("tcp")))


def _mapped(process: psutil.Process, index: Path) -> set[str]:
    """The image tables and index files a process has memory-mapped."""
    return {m.path for m in process.memory_maps() if m.path.endswith(IMAGE_TABLE) or m.path.startswith(str(index))}


@pytest.mark.parametrize("own", [True, False], ids=["index's images.arrow", "derived at start-up"])
def test_two_workers_serve_the_image_table_of_one_file(edited, own):
    """Each of 2 workers answers the image routes as images.parquet and the arrays say (a rejected image is 404, a
    relabelled one has its new label), and the JPEGs a single in-process app makes; both map the same image table
    (the index's own, else one the runner wrote elsewhere and removes at exit), the process starting them none."""
    if own:
        write_image_table(edited)
    want = _expected(edited)
    from fastapi.testclient import TestClient

    with TestClient(create_app(edited)) as client:  # one process, the table read from images.parquet
        jpeg = {i: client.get(f"/images/{i}?size=64").content for i in (0, 3)}
    files = sorted(edited.rglob("*"))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "actstore_cli", "serve", "--index", str(edited), "--port",
                               str(port), "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    conns: dict[int, http.client.HTTPConnection] = {}
    try:
        parent = psutil.Process(server.pid)
        deadline = time.monotonic() + 120
        while len(conns) < 2:  # new connections until each worker holds one (the kernel picks the worker)
            assert time.monotonic() < deadline and server.poll() is None, "both workers never answered"
            workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                if len(workers) == 2 and _get(conn, "/healthz")[0] == 200:
                    conns.setdefault(_holder(workers, conn).pid, conn)
                    continue
            except OSError:
                pass
            time.sleep(0.05)
        tables = []
        for pid, conn in conns.items():
            _check_routes(conn, want, jpeg)
            tables.append(_mapped(psutil.Process(pid), edited) - {str(p) for p in (edited / "arrays").rglob("*")})
        assert tables[0] == tables[1] and len(tables[0]) == 1, tables
        table = Path(tables[0].pop())
        assert (table == edited / IMAGE_TABLE) if own else not table.is_relative_to(edited)
        assert _mapped(parent, edited) == set(), "the process starting the workers holds none of the index"
    finally:
        for conn in conns.values():
            conn.close()
        server.terminate()
        out = server.communicate(timeout=30)[0].decode()
    assert "Traceback" not in out, out
    assert sorted(edited.rglob("*")) == files, "serve wrote into the index"
    assert not table.exists() or own, "the runner's image table outlived the service"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _bad_utf8(path: Path) -> None:
    """A URI's bytes overwritten with bytes that are not UTF-8, the file's size and footer intact."""
    data = bytearray(path.read_bytes())
    at = data.find(b".png")
    data[at:at + 4] = b"\xff\xfe\xff\xfe"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _bad_utf8], ids=["truncated", "not utf-8"])
def test_a_damaged_image_table_is_refused_at_start_up(edited, damage):
    table = write_image_table(edited)
    damage(table)
    r = subprocess.run([sys.executable, "-m", "actstore_cli", "serve", "--index", str(edited), "--workers", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert IMAGE_TABLE in r.stderr and "unreadable image table" in r.stderr, r.stderr
    with pytest.raises(CorruptDataError, match=IMAGE_TABLE):
        create_app(edited)


def test_a_table_of_another_images_parquet_is_refused_or_passed_over(index_dir, edited, tmp_path):
    """A table handed to the service (as the runner hands its own to the workers) must be this index's: another
    index's is refused in one line naming it. The index's own images.arrow made before images.parquet was edited is
    stale: the service reads images.parquet instead."""
    foreign = write_image_table(index_dir, tmp_path / "foreign.arrow")
    with pytest.raises(CorruptDataError, match="made from another images.parquet") as e:
        IndexReader(edited, image_table=foreign)
    assert str(foreign) in str(e.value) and "\n" not in str(e.value)
    few = tmp_path / "few"
    shutil.copytree(index_dir, few)
    pq.write_table(pq.read_table(few / "images.parquet").slice(0, 10), few / "images.parquet")
    with pytest.raises(CorruptDataError, match="10 rows, index.json says n_images=48"):
        IndexReader(edited, image_table=write_image_table(few, tmp_path / "few.arrow"))

    shutil.copy(foreign, edited / IMAGE_TABLE)  # the unedited images.parquet's table, in the edited index
    reader = IndexReader(edited)
    assert reader.image_table is None
    assert not reader.images["ok"][REJECTED] and reader.image_info([RELABELLED]) == [_expected(edited)["label"][RELABELLED]]
    write_image_table(edited)
    assert IndexReader(edited).image_table == edited / IMAGE_TABLE
