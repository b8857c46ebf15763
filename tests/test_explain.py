"""`actstore explain` end to end on planted features, against a real chat-completions server.

The shapes store of tests/planted_shapes.py has three known features (red shapes, striped shapes, a random one);
actstore.testing.chat's server names the dominant colour (or texture) of the highlighted regions it is shown and
judges images by it. So the red feature must be explained "red" and detected near perfectly, the random one near
chance; the detection numbers are recomputed here from the server's own verdicts on the held-out images, which are
rebuilt from the store by numpy. Also: resuming an interrupted run, the key never written, refusals in one line.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from planted_shapes import write_planted_shapes
from sklearn.metrics import roc_auc_score

import sae
from actstore.store import ActivationStore
from actstore.testing.chat import ChatServer, judge_image
from actstore_cli import main
from sae.checkpoint import origin, save
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from services.api.reader import IndexReader
from services.explain import EXPLANATIONS, read_explanations
from services.explain.examples import examples

KEY = "sk-test-5b1f0c-never-written"
KEY_ENV = "ACTSTORE_TEST_VLM_KEY"
HELD_OUT = 8


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_shapes(str(tmp_path_factory.mktemp("planted") / "shapes"))


def _index_copy(planted, root: Path) -> Path:
    shutil.copytree(planted.index, root / "index")
    return root / "index"


def _explain(index: Path, url: str, *extra: str) -> int:
    return main(["explain", "--index", str(index), "--explainer", "openai:shapes-vlm", "--endpoint", url,
                 "--api-key-env", KEY_ENV, "--n-held-out", str(HELD_OUT), "--n-pool", "1000", "-q", *extra])


@pytest.fixture(scope="module")
def explained(planted, tmp_path_factory):
    """Features red, stripes and random explained and judged through the server, with the key in the environment."""
    root = tmp_path_factory.mktemp("explained")
    index = _index_copy(planted, root)
    os.environ[KEY_ENV] = KEY
    try:
        with ChatServer(api_key=KEY) as server:
            features = ",".join(str(planted.features[n]) for n in ("red", "stripes", "random"))
            assert _explain(index, server.url, "--features", features) == 0
            requests = list(server.requests)
    finally:
        del os.environ[KEY_ENV]
    rows = {r["feature"]: r for r in read_explanations(index).to_pylist()}
    return index, rows, requests


def test_planted_features_are_explained_and_scored(planted, explained):
    _, rows, _ = explained
    red, stripes, rand = (rows[planted.features[n]] for n in ("red", "stripes", "random"))
    assert red["explainer"] == "vlm" and red["explanation"] == "red"
    assert red["detection_accuracy"] >= 0.9 and red["detection_auroc"] >= 0.9
    assert stripes["explanation"] == "stripes" and stripes["detection_accuracy"] >= 0.8
    assert abs(rand["detection_accuracy"] - 0.5) <= 0.25
    for r in (red, stripes, rand):
        assert r["detection_n"] == 2 * HELD_OUT and r["embedding_auroc"] is None  # no text tower on this store
        assert r["model"].startswith("openai:shapes-vlm@127.0.0.1") and r["judge"] == r["model"]


def test_detection_equals_a_hand_computation(planted, explained):
    """The held-out images rebuilt from the store (numpy: the SAE's relu on every patch), the server's verdict on each
    recomputed from the image, then balanced accuracy by hand and AUROC by scikit-learn."""
    index, rows, _ = explained
    reader = IndexReader(index)
    x = ActivationStore(planted.store).read("0").float().numpy()
    model, _ = sae.load(planted.sae)
    w, b = model.W_enc.detach().numpy(), model.b_enc.detach().numpy()
    image_max = np.maximum(np.einsum("npd,fd->npf", x, w) + b, 0).max(1)  # (images, features)
    arrays = {n: reader.array(n) for n in ("top_images", "heatmaps", "band_images")}
    for f, row in rows.items():
        silent = np.flatnonzero(image_max[:, f] <= 0)
        ex = examples(arrays, f, silent, 6, 2, HELD_OUT, 0)
        assert row["shown"] == ex.shown and not set(ex.shown) & set(ex.activating + ex.silent)
        assert (image_max[ex.activating, f] > 0).all() and len(ex.silent) == len(ex.activating) == HELD_OUT
        verdicts = [judge_image(np.asarray(Image.open(io.BytesIO(reader.thumbnail(i, 224))).convert("RGB")),
                                row["explanation"]) for i in ex.activating + ex.silent]
        said = np.array([v[0] for v in verdicts])
        p_yes = [v[1] if v[0] else 1 - v[1] for v in verdicts]
        truth = np.array([True] * HELD_OUT + [False] * HELD_OUT)
        assert row["detection_accuracy"] == pytest.approx((said[truth].mean() + (~said[~truth]).mean()) / 2)
        assert row["detection_auroc"] == pytest.approx(roc_auc_score(truth, p_yes))


def test_the_key_reaches_the_server_and_nothing_else(planted, explained, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)  # urllib3's and ours, at every level
    index, _, requests = explained
    assert requests and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in requests)
    for path in Path(index).rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes(), path
    # a server that refuses the key: one line, without it
    os.environ[KEY_ENV] = KEY
    try:
        with ChatServer(api_key="another-key") as server:
            assert _explain(_index_copy(planted, tmp_path), server.url, "--features", "0") == 1
    finally:
        del os.environ[KEY_ENV]
    out = capsys.readouterr()
    assert out.err.startswith("error: ") and out.err.count("\n") == 1 and "401" in out.err
    assert KEY not in out.err + out.out and KEY not in caplog.text


def test_an_interrupted_run_resumes_where_it_stopped(planted, tmp_path, capsys):
    index = _index_copy(planted, tmp_path)
    per_feature = 1 + 2 * HELD_OUT  # one explain call, then one judge call per held-out image
    with ChatServer(fail_from=per_feature + 3) as server:  # feature 0 completes, feature 1 fails midway
        assert _explain(index, server.url, "--features", "0,1,2", "--batch", "1") == 1
    assert "400" in capsys.readouterr().err
    assert [r["feature"] for r in read_explanations(index).to_pylist()] == [0]
    with ChatServer() as server:
        assert _explain(index, server.url, "--features", "0,1,2", "--batch", "1") == 0
        explains = [r for r in server.requests if "Answer Yes or No." not in str(r.body)]
    assert len(explains) == 2  # features 1 and 2 only
    assert [r["feature"] for r in read_explanations(index).to_pylist()] == [0, 1, 2]
    # --overwrite starts over; a file of someone else's is refused whatever the flags
    with ChatServer() as server:
        assert _explain(index, server.url, "--features", "2", "--overwrite") == 0
    assert [r["feature"] for r in read_explanations(index).to_pylist()] == [2]
    (index / EXPLANATIONS).write_bytes(b"my own notes")
    assert _explain(index, "http://127.0.0.1:9/v1", "--features", "2", "--overwrite") == 1
    err = capsys.readouterr().err
    assert "not an explanations table written by actstore explain" in err and err.count("\n") == 1
    assert (index / EXPLANATIONS).read_bytes() == b"my own notes"


def test_refusals_are_one_line(planted, tmp_path, capsys):
    index = _index_copy(planted, tmp_path)
    cases = [
        (["explain", "--index", str(index), "-q"], "nothing to explain with"),  # no text tower, no VLM
        (["explain", "--index", str(index), "--explainer", "gpt-4o", "-q"], "openai:"),
        (["explain", "--index", str(index), "--explainer", "openai:m", "--features", "densest:x", "-q"],
         "--features 'densest:x'"),
        (["explain", "--index", str(index), "--explainer", "openai:m", "--features", "99", "-q"], "no feature 99"),
        (["explain", "--index", str(tmp_path / "nope"), "-q"], "not a feature index"),
    ]
    # the SAE the index names replaced by one of another width: refused before anything is computed
    other = tmp_path / "other-index"
    shutil.copytree(index, other)
    wider = SparseAutoencoder(SAEConfig(d_in=16, d_sae=32, kind="relu"))
    with torch.no_grad():
        wider.b_enc.fill_(-10.0)
    save(wider, str(tmp_path / "wider"), extra=origin(ActivationStore(planted.store), "0"))
    meta = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps({**meta, "sae": str(tmp_path / "wider")}))
    cases.append((["explain", "--index", str(other), "--explainer", "openai:m", "-q"], "now has 32: index it again"))
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert not (index / EXPLANATIONS).exists()


def test_a_local_transformers_vlm_explains_and_judges(planted, tmp_path):
    """The hf: path end to end: a tiny random LLaVA (random bytes for words, real processor, chat template,
    generate and a forward for P(yes)) explains and judges a planted feature."""
    from actstore.testing.tiny_vlm import write_tiny_llava

    vlm = write_tiny_llava(str(tmp_path / "vlm"))
    index = _index_copy(planted, tmp_path)
    assert main(["explain", "--index", str(index), "--explainer", f"hf:{vlm}", "--features", "0", "--n-held-out", "3",
                 "--image-size", "64", "-q"]) == 0
    (row,) = read_explanations(index).to_pylist()
    assert row["explainer"] == "vlm" and row["model"] == row["judge"] == f"hf:{vlm}"
    assert isinstance(row["explanation"], str) and len(row["explanation"].split()) <= 12
    assert row["detection_n"] == 6 and 0 <= row["detection_accuracy"] <= 1 and 0 <= row["detection_auroc"] <= 1


def test_the_service_finds_the_planted_feature_by_its_word(planted, explained):
    """GET /features?q= over the explained index: the red feature first for "red", the striped one for "stripes"."""
    import requests
    from conftest import _serve

    from services.api import create_app

    index, rows, _ = explained
    for url in _serve(create_app(index)):
        for word, name in (("red", "red"), ("stripes", "stripes")):
            hits = requests.get(f"{url}/features", params={"q": word}, timeout=30).json()["features"]
            assert hits and hits[0]["id"] == planted.features[name] and hits[0]["explanation"] == word
        feature = requests.get(f"{url}/features/{planted.features['red']}", timeout=30).json()
        (shown,) = feature["explanations"]
        assert shown["detection_accuracy"] == pytest.approx(rows[planted.features["red"]]["detection_accuracy"])
