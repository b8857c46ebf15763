"""`actstore taskfit`: planted task stores whose class features are present (every class), partly present (half the
classes) or absent (features firing at random); the 1-D probe against scikit-learn on values read with plain zarr
and encoded in numpy, the k-sparse probes' feature choice, the ranking of the three models (and the dense probe's),
the refusals, the command line, and the report in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from safetensors.numpy import load_file
from sklearn.metrics import average_precision_score, roc_auc_score
from test_browser import ARTIFACTS, DOM, chromium

from actstore.errors import ConfigError
from actstore.store import ActivationStore, LayerSpec, StoreSpec, StoreWriter, TokenLayout
from actstore_cli import main
from sae import Normalization, checkpoint
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from services.index import IndexConfig, build_index
from services.probe import ProbeConfig, split_rows
from services.taskfit import TaskfitConfig, read_table, read_taskfit, run_taskfit
from services.taskfit.measure import auroc, average_precision
from services.taskfit.models import open_model
from services.taskfit.run import Task, plan

N, C, GRID, D, D_SAE = 400, 4, (2, 2), 32, 24
"""Images, classes, patch grid, token width, SAE width."""
NOISE, BIAS = 0.02, -0.2
"""Noise std per channel; every SAE feature's encoder bias (10 noise std: noise never fires a feature)."""
MODELS = ("present", "partly", "absent")
"""In the planted order: every class has its feature; classes 0 and 1 only; no class (its features fire at random)."""
DISTRACTORS = range(C, 2 * C)
"""Features that fire on random images in every model, whatever the class."""


def labels() -> np.ndarray:
    return np.random.default_rng(7).integers(0, C, N)


def write_model(root: Path, kind: str, seed: int, uris: list[str] | None = None, cls: bool = False) -> str:
    """A one-layer store (patch tokens only) of planted atoms plus noise, and a relu SAE whose features are the atoms
    (encoder row = decoder row); returns SAE_DIR@STORE_URL. Feature c (< C) fires at one random patch of the images
    of class c (kind "present"; "partly": classes 0 and 1 only), or of random images (kind "absent"). With `cls`, the
    layer has a CLS token in front, the atoms sit there, the patches hold decoys, and the SAE reads the CLS token."""
    rng = np.random.default_rng(seed)
    y = labels()
    atoms = np.linalg.qr(rng.standard_normal((D, D_SAE)))[0].T.astype(np.float32)  # (D_SAE, D) orthonormal rows
    strength = np.zeros((N, D_SAE), np.float32)
    on_class = y[:, None] == np.arange(C)
    if kind == "partly":
        on_class[:, 2:] = False
    fires = rng.random((N, C)) < 0.25 if kind == "absent" else on_class
    strength[:, :C] = fires * rng.uniform(1, 3, (N, C))
    strength[:, C:2 * C] = (rng.random((N, C)) < 0.3) * rng.uniform(1, 3, (N, C))
    placed = np.zeros((N, GRID[0] * GRID[1], D_SAE), np.float32)
    np.put_along_axis(placed, rng.integers(0, placed.shape[1], (N, 1, D_SAE)), strength[:, None, :], axis=1)
    if cls:  # the patches hold decoys: feature j + 1 where feature j belongs (the next class's feature)
        placed = np.concatenate([strength[:, None, :], np.roll(placed, 1, axis=2)], axis=1)
    acts = placed @ atoms + NOISE * rng.standard_normal((*placed.shape[:2], D)).astype(np.float32)
    store = str(root / f"store-{kind}")
    spec = StoreSpec(n_images=N, layers=(LayerSpec("0", D, TokenLayout(cls=cls, grid=GRID), 0),),
                     backbone={"family": "synthetic", "name": f"planted-{kind}", "n_blocks": 1},
                     dataset={"source": "synthetic", "fingerprint": "task", "class_names": [f"c{k}" for k in range(C)]},
                     images_per_shard=128, dtype="float32")
    writer = StoreWriter.create(store, spec)
    uris = uris or [f"synthetic://task/{i}" for i in range(N)]
    for u in range(spec.n_units):
        a, b = spec.unit_range(u)
        writer.write_unit(u, {"0": acts[a:b]}, images={"uri": uris[a:b], "label": y[a:b].tolist()})
    writer.finalize()
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, kind="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(atoms))
        sae.W_dec.copy_(torch.from_numpy(atoms))
        sae.b_enc.fill_(BIAS)
    tokens = "cls" if cls else "patches"
    checkpoint.save(sae, str(root / f"sae-{kind}"), normalization=Normalization("0", tokens, torch.zeros(D), 1.0),
                    extra=checkpoint.origin(ActivationStore(store), "0", tokens))
    return f"{root / f'sae-{kind}'}@{store}"


SECRET = "s3cr3t-5ab1e"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """The three models and one taskfit run over them (default k: 16 and 64 use all 24 features), with a credential
    in the storage options."""
    root = tmp_path_factory.mktemp("taskfit")
    models = [write_model(root, kind, seed) for seed, kind in enumerate(MODELS)]
    summary = run_taskfit(TaskfitConfig(model=tuple(models), out=str(root / "out"),
                                        storage_options={"secret": SECRET}), progress=False)
    return root, models, summary


def numpy_values(spec: str, tokens: slice = slice(None)) -> np.ndarray:
    """(images, features) each image's largest SAE code over its `tokens`: the store read with plain zarr, the SAE's
    saved weights applied in numpy (relu((x - b_dec) W_enc^T + b_enc); its normalization is the identity)."""
    sae_dir, store = spec.rsplit("@", 1)
    x = zarr.open_group(store, mode="r")["layers/0/acts"][:, tokens].astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in load_file(f"{sae_dir}/sae.safetensors").items()}
    codes = np.maximum((x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"], 0)
    return codes.max(1)


def test_auroc_and_ap_equal_scikit_learn_with_ties():
    rng = np.random.default_rng(3)
    for n, levels in ((50, 3), (200, 1000), (7, 2)):
        scores = rng.integers(0, levels, n).astype(np.float64)
        positive = rng.random(n) < 0.3
        positive[:2] = [True, False]
        assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
        want = average_precision_score(positive, scores)
        assert average_precision(scores, positive) == pytest.approx(want, abs=1e-12)
    assert np.isnan(auroc(np.ones(4), np.zeros(4, bool))) and np.isnan(average_precision(np.ones(4), np.zeros(4, bool)))


def test_the_1d_probe_equals_numpy_and_scikit_learn(planted):
    """Each class's best feature is the largest standardized difference on the training images (numpy), and its
    held-out AUROC / AP are scikit-learn's on values read and encoded without the project's code."""
    root, models, summary = planted
    y = labels()
    train, test = (m[:, 0] for m in split_rows(y[:, None], ProbeConfig(store="unused", task="cls", out="unused")))
    classes = read_table(root / "out", "classes.parquet").to_pylist()
    for i, spec in enumerate(models):
        v = numpy_values(spec)
        m = summary["models"][i]
        assert (m["n_train"], m["n_test"]) == (train.sum(), test.sum()) == (320, 80)
        assert m["dense"]["n_test"] == test.sum()
        aurocs = []
        for c in range(C):
            inside, rest = v[train & (y == c)], v[train & (y != c)]
            with np.errstate(invalid="ignore", divide="ignore"):
                d = (inside.mean(0) - rest.mean(0)) / np.sqrt((inside.var(0) + rest.var(0)) / 2)
            d[inside.mean(0) == rest.mean(0)] = 0
            row = next(r for r in classes if r["model"] == i and r["class"] == c)
            assert row["feature"] == int(np.argmax(d)), (MODELS[i], c)
            held, positive = v[test, row["feature"]], y[test] == c
            assert row["auroc"] == pytest.approx(roc_auc_score(positive, held), abs=1e-9)
            assert row["ap"] == pytest.approx(average_precision_score(positive, held), abs=1e-9)
            assert row["n_test"] == positive.sum()
            aurocs.append(row["auroc"])
        assert m["one_d"]["mean_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)


def test_k_sparse_probes_pick_the_planted_features(planted):
    root, _, summary = planted
    rows = read_table(root / "out", "classes.parquet").to_pylist()
    for c in range(C):
        present = next(r for r in rows if r["model"] == 0 and r["class"] == c)
        assert present["features"][0] == c and present["feature"] == c
    for c in (0, 1):  # partly: the classes that have their feature
        assert next(r for r in rows if r["model"] == 1 and r["class"] == c)["features"][0] == c
    ks = read_table(root / "out", "ksparse.parquet").to_pylist()
    assert {(r["model"], r["k"]) for r in ks} == {(i, k) for i in range(3) for k in (1, 4, 16, 64)}
    assert all(r["features"] == min(r["k"], D_SAE) for r in ks)
    assert summary["models"][0]["ksparse"]["1"]["accuracy"] == 1.0


def test_models_rank_in_the_planted_order_with_n_and_the_caveat(planted):
    _, _, summary = planted
    m = summary["models"]
    assert [x["name"] for x in m] == [f"planted-{k}/0" for k in MODELS]
    for score in (lambda x: x["one_d"]["mean_auroc"], lambda x: x["ksparse"]["16"]["accuracy"],
                  lambda x: x["dense"]["accuracy"]):
        got = [score(x) for x in m]
        assert got[0] > got[1] > got[2], got
    assert m[0]["one_d"]["mean_auroc"] == 1.0 and m[0]["dense"]["accuracy"] > 0.95
    assert 0.6 < m[1]["ksparse"]["16"]["accuracy"] < 0.9 and m[2]["ksparse"]["16"]["accuracy"] < 0.45
    assert [c["score"] for c in summary["correlations"]] == ["mean best 1-D AUROC", "k-sparse accuracy at k=16"]
    for c in summary["correlations"]:
        assert c["rho"] == 1.0 and c["n"] == 3 and "weak test" in c["note"] and "n = 3" in c["note"]


def test_credentials_stay_out_of_every_file(planted):
    root, _, summary = planted
    assert summary["config"]["storage_options"] == {"secret": "<redacted>"}
    files = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"taskfit.json", "classes.parquet", "ksparse.parquet", "report.html",
                                       "probe.json", "probe.safetensors"}
    assert all(SECRET.encode() not in p.read_bytes() for p in files)


def test_a_small_budget_tiles_the_classes_and_changes_no_1d_number(planted, tmp_path):
    """A budget that holds two classes' kept values: two column passes, the same features and 1-D numbers."""
    root, models, summary = planted
    cfg = TaskfitConfig(model=(models[1],), out=str(tmp_path / "small"), k=(1, 4), score_k=4)
    model = open_model(models[1], 1, torch.device("cpu"), {})
    y = labels()
    train, test = (m[:, 0] for m in split_rows(y[:, None], ProbeConfig(store="unused", task="cls", out="unused")))
    task = Task([f"c{k}" for k in range(C)], y, train, test)
    gb = next(g for g in np.arange(1e-4, 1e-3, 2e-6)
              if plan(replace(cfg, memory_gb=g), model, task, 4).column_tile == 2)
    small = run_taskfit(replace(cfg, memory_gb=float(gb)), progress=False)["models"][0]
    assert small["plan"]["column_tile"] == 2 and small["plan"]["passes"] == 3
    assert small["one_d"] == summary["models"][1]["one_d"]
    rows = {r["class"]: r for r in read_table(tmp_path / "small", "classes.parquet").to_pylist()}
    full = {r["class"]: r for r in read_table(root / "out", "classes.parquet").to_pylist() if r["model"] == 1}
    assert all(rows[c]["features"] == full[c]["features"][:4] and rows[c]["auroc"] == full[c]["auroc"]
               for c in range(C))
    for k in ("1", "4"):  # the probes of a tile are fit together: the same optimum, reached by another path
        assert abs(small["ksparse"][k]["accuracy"] - summary["models"][1]["ksparse"][k]["accuracy"]) <= 2 / 80


def test_refusals_are_one_line_and_touch_nothing(planted, tmp_path, capsys):
    root, models, _ = planted
    other = write_model(tmp_path, "present", 0, uris=[f"synthetic://other/{i}" for i in range(N)])
    with pytest.raises(ConfigError, match=r"model 1 and model 2 are not over the same images: image 0 is "
                                          r"'synthetic://task/0' in model 1 and 'synthetic://other/0' in model 2"):
        run_taskfit(TaskfitConfig(model=(models[0], other), out=str(tmp_path / "x")), progress=False)
    with pytest.raises(ConfigError, match="neither an index folder"):
        run_taskfit(TaskfitConfig(model=(str(tmp_path),), out=str(tmp_path / "x")), progress=False)
    with pytest.raises(ConfigError, match="score_k 8 is not one of k"):
        TaskfitConfig(model=(models[0],), out=str(tmp_path / "x"), score_k=8)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    capsys.readouterr()
    for argv, says in ((["--out", str(tmp_path / "y"), "--label-column", "family"], "no label column 'family'"),
                       (["--out", str(mine)], "exists and is not a taskfit folder; refusing to replace it")):
        assert main(["taskfit", "--model", models[0], "--model", models[1], *argv, "-q"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert [p.name for p in mine.iterdir()] == ["todo.txt"] and (mine / "todo.txt").read_text() == "keep me"
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".*.tmp*"))


def test_the_command_line_prints_the_table_and_replaces_only_its_own_output(planted, tmp_path, capsys):
    root, models, summary = planted
    out, index = tmp_path / "cli", tmp_path / "index-present"
    sae_dir, store = models[0].rsplit("@", 1)
    build_index(IndexConfig(store, sae_dir, str(index), k=4), progress=False)  # model 1 as an index folder
    argv = ["taskfit", "--model", str(index), "--model", models[1], "--out", str(out), "--k", "1", "--k", "4",
            "--score-k", "4", "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "layer", "features", "train", "held-out", "1-D", "AUROC", "1-D", "AP", "k=1",
                              "k=4", "dense", "chance"]
    got = read_taskfit(out)
    for m, want in zip(got["models"], summary["models"]):
        row = next(line for line in lines if line.startswith(m["name"] + " ")).split()
        assert row[5:7] == [f"{want['one_d']['mean_auroc']:.3f}", f"{want['one_d']['mean_ap']:.3f}"]
        assert row[9] == f"{m['dense']['accuracy']:.3f}" and float(row[9]) == pytest.approx(want["dense"]["accuracy"])
    assert "vs dense probe accuracy: not computed, n = 2" in printed
    assert "no rank correlation can be computed (it needs at least 3)" in printed
    assert main(argv) == 1 and "already there; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and read_taskfit(out)["k"] == [1, 4]


def test_the_report_renders_in_chromium(planted, tmp_path):
    root, _, summary = planted
    html = root / "out" / "report.html"
    log = tmp_path / "chromium.log"
    page = DOM(chromium(tmp_path, html.as_uri(), "--dump-dom", "--enable-logging", f"--log-file={log}", "--v=0")).root
    assert "CONSOLE" not in log.read_text(), log.read_text()
    (table,) = [t for t in page.find_all("table") if t.attrs.get("data-table") == "scores"]
    rows = table.find_all("tr")
    assert len(rows) == 1 + len(MODELS)
    assert [r.find_all("td")[0].all_text() for r in rows[1:]] == [m["name"] for m in summary["models"]]
    (figure,) = [f for f in page.find_all("figure", "plot") if f.attrs["data-plot"] == "taskfit"]
    values = json.loads(figure.attrs["data-values"])
    assert values["dense"] == {m["name"]: m["dense"]["accuracy"] for m in summary["models"]}
    assert values["ksparse"]["planted-present/0"] == [summary["models"][0]["ksparse"][k]["accuracy"]
                                                      for k in ("1", "4", "16", "64")]
    (img,) = figure.find_all("img")
    png = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
    assert png.size == (int(img.attrs["width"]), int(img.attrs["height"]))
    assert "n = 3" in page.all_text() and "weak test" in page.all_text()
    shot = tmp_path / "shot.png"
    chromium(tmp_path, html.as_uri(), f"--screenshot={shot}", "--window-size=1400,1600")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-taskfit.png")
    # `actstore report` on the folder draws the same page
    assert main(["report", str(root / "out"), "--out", str(tmp_path / "again.html"), "-q"]) == 0
    again = DOM((tmp_path / "again.html").read_text()).root
    (table,) = [t for t in again.find_all("table") if t.attrs.get("data-table") == "scores"]
    assert [r.find_all("td")[0].all_text() for r in table.find_all("tr")[1:]] == [m["name"] for m in summary["models"]]


def test_an_sae_on_the_cls_token_reads_that_token_and_one_model_has_no_correlation(tmp_path):
    """An SAE trained on the CLS token: an image's value is its code there, not the max over the patches (which hold
    the next class's feature); with one model no rank correlation is computed."""
    spec = write_model(tmp_path, "present", 5, cls=True)
    summary = run_taskfit(TaskfitConfig(model=(spec,), out=str(tmp_path / "out"), k=(1, 2), score_k=2, steps=30),
                          progress=False)
    m = summary["models"][0]
    assert m["tokens"] == "cls" and m["dense"]["pool"] == "cls"
    v, y = numpy_values(spec, slice(0, 1)), labels()
    test = split_rows(y[:, None], ProbeConfig(store="unused", task="cls", out="unused"))[1][:, 0]
    for r in read_table(tmp_path / "out", "classes.parquet").to_pylist():
        assert r["feature"] == r["class"]
        assert r["auroc"] == pytest.approx(roc_auc_score(y[test] == r["class"], v[test, r["class"]]), abs=1e-9)
    assert m["one_d"]["mean_auroc"] == 1.0 and m["ksparse"]["1"]["accuracy"] == 1.0
    patches = numpy_values(spec, slice(1, None))  # what the max over the patches would have given: the decoys
    assert roc_auc_score(y[test] == 0, patches[test, 0]) < 0.9
    assert all(c["rho"] is None and c["n"] == 1 and "no rank correlation can be computed" in c["note"]
               for c in summary["correlations"])
