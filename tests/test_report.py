"""`actstore report`: the HTML pages on a training run, a feature index and a comparison, rendered by headless
Chromium (screenshots under test-artifacts/), every inline image decoded, and the figures' numbers checked against
numpy computations of our own (the SAE's forward pass from its saved weights on every patch of the store, the
index's arrays, the comparison's tables)."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from safetensors.numpy import load_file
from test_browser import ARTIFACTS, DOM, Node, chromium, heat_pixels

from actstore.errors import ConfigError
from actstore.store import ActivationStore, ok_mask
from services.index import open_array
from services.report import ReportConfig, write_report

LAYER = "10"
TILE = 128  # services.report.index.TILE


def report(path, out: Path, **kw) -> Node:
    """Write the report of `path` to `out`; its parsed DOM, every inline image checked to decode."""
    write_report(ReportConfig(str(path), str(out), **kw), progress=False)
    page = DOM(out.read_text()).root
    assert page.find_all("meta")[1].attrs == {"name": "generator", "content": "actstore report"}
    for img in page.find_all("img"):
        image = decoded(img)
        assert image.size == (int(img.attrs["width"]), int(img.attrs["height"])), img.attrs.get("alt")
    return page


def decoded(img: Node) -> Image.Image:
    src = img.attrs["src"]
    assert src.startswith("data:image/png;base64,"), "images are inline PNGs"
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    return image


def plots(page: Node, name: str) -> list[Node]:
    return [f for f in page.find_all("figure", "plot") if f.attrs["data-plot"] == name]


def values(figure: Node) -> dict:
    return json.loads(figure.attrs["data-values"])


def screenshot(tmp_path: Path, html: Path, name: str) -> None:
    """Headless Chromium renders the page from disk: a screenshot kept as a test artifact, not blank."""
    png = tmp_path / "shot.png"
    chromium(tmp_path, html.as_uri(), f"--screenshot={png}", "--window-size=1400,1600")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(png, ARTIFACTS / f"report-{name}.png")
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 500, f"the {name} report renders nearly blank ({len(colours)} colours)"


# ---- a training run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(service_store, tmp_path_factory) -> Path:
    """A two-SAE sweep trained briefly on the service store (in process)."""
    from sae.train import TrainConfig, train

    out = tmp_path_factory.mktemp("report") / "run"
    train(TrainConfig(store=str(service_store / "store"), out=str(out), layer=LAYER, tokens=512 * 12, batch_size=512,
                      log_every=4, checkpoint_every=None, buffer_bytes=1 << 22, lr=1e-3,
                      sae=({"kind": "topk", "k": 8, "d_sae": 256, "name": "topk"},
                           {"kind": "relu", "d_sae": 128, "l1_coeff": 1.0, "name": "relu"})), progress=False)
    return out


def numpy_firing(store: Path, sae_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(per feature: tokens it fires on, per token: features firing) over every patch of the store's ok images,
    from the saved weights and normalization, in numpy."""
    s = ActivationStore(str(store))
    x = s.read(LAYER, 0, s.n_images).float().numpy()[ok_mask(s.images())]
    spec = s.layer(LAYER)
    x = x[:, int(spec.tokens.cls):].reshape(-1, spec.d).astype(np.float64)
    w = {k: v.astype(np.float64) for k, v in load_file(sae_dir / "sae.safetensors").items()}
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    x = (x - w["norm_mean"]) * cfg["normalization"]["scale"]
    pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    if cfg["kind"] == "topk":
        kth = -np.sort(-pre, axis=1)[:, cfg["k"] - 1:cfg["k"]]
        fires = (pre >= kth) & (pre > 0)
    else:
        fires = pre > 0
    return fires.sum(0), fires.sum(1)


def test_training_run_report(run_dir, service_store, tmp_path):
    out = tmp_path / "training.html"
    page = report(run_dir, out, tokens=1_000_000)  # more than the store holds: every patch, once
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (curves,) = plots(page, "curves")
    assert values(curves)["rows"] == {"topk": 3, "relu": 3} == {n: sum(r["sae"] == n for r in rows)
                                                                   for n in ("topk", "relu")}
    n_patches = 48 * 196
    assert f"{n_patches} of the store's {n_patches} tokens" in page.all_text()
    for name in ("topk", "relu"):
        counts, active = numpy_firing(service_store / "store", run_dir / name)
        (life,) = [f for f in plots(page, "lifetime-sparsity") if f.attrs["data-sae"] == name]
        (pop,) = [f for f in plots(page, "population-sparsity") if f.attrs["data-sae"] == name]
        life, pop = values(life), values(pop)
        fired = counts[counts > 0]
        want = np.histogram(np.log10(fired / n_patches), bins=life["edges"])[0]
        assert life["dead"] == int((counts == 0).sum()) and life["n_features"] == counts.size
        assert np.abs(np.asarray(life["counts"]) - want).sum() <= 2, (name, life["counts"], want.tolist())
        assert sum(pop["counts"]) == n_patches
        want = np.histogram(active, bins=pop["edges"])[0]
        assert np.abs(np.asarray(pop["counts"]) - want).sum() <= n_patches // 500, name
    assert len(page.find_all("img")) == 1 + 2 * 2
    screenshot(tmp_path, out, "training")


def test_an_sae_folder_of_a_run_reports_that_sae(run_dir, tmp_path):
    page = report(run_dir / "relu", tmp_path / "relu.html", tokens=2000)
    assert [f.attrs["data-sae"] for f in page.find_all("figure", "plot") if "data-sae" in f.attrs] == ["relu"] * 2
    assert values(plots(page, "curves")[0])["rows"] == {"relu": 3}
    assert sum(values(plots(page, "population-sparsity")[0])["counts"]) == 2000


# ---- an index ----------------------------------------------------------------------------------------

def test_index_report(index_dir, tmp_path):
    out = tmp_path / "index.html"
    page = report(index_dir, out, features=4, images=3, seed=1)
    meta = json.loads((index_dir / "index.json").read_text())
    (density,) = plots(page, "density")
    assert {k: values(density)[k] for k in ("edges", "counts", "dead")} == {
        k: meta["histogram"][k] for k in ("edges", "counts", "dead")}

    fired = pq.read_table(index_dir / "features.parquet").column("n_images_fired").to_numpy()
    top = open_array(index_dir, "top_images")
    rows = page.find_all("div", "tiles")
    assert len(rows) == 4
    for row in rows:
        fid = int(row.attrs["data-feature"])
        assert fired[fid] > 0, "only live features are shown"
        held = top[fid][top[fid] >= 0][:3].tolist()
        figures = row.find_all("figure", "tile")
        assert [int(f.attrs["data-image"]) for f in figures] == held
        images = [decoded(f.find_all("img")[0]) for f in figures]
        assert all(i.size == (TILE, TILE) for i in images)
        # the strongest patch of the best image is painted at full alpha: at least half a cell of heat colour
        assert heat_pixels(images[0]) >= (TILE / meta["grid"][0]) ** 2 / 2
    screenshot(tmp_path, out, "index")


def test_an_unreadable_image_is_a_tile_saying_why(index_dir, tmp_path):
    import pyarrow as pa

    copy = shutil.copytree(index_dir, tmp_path / "index")
    table = pq.read_table(copy / "images.parquet")
    meta = json.loads((copy / "index.json").read_text())
    uris = [f"{meta['dataset_root']}/moved-away-{i}.png" for i in range(table.num_rows)]
    pq.write_table(table.set_column(table.column_names.index("uri"), "uri", pa.array(uris)), copy / "images.parquet")
    page = report(copy, tmp_path / "index.html", features=2, images=2)
    figures = page.find_all("figure", "tile")
    assert len(figures) == 4 and not any(f.find_all("img") for f in figures)
    assert all("image file unavailable" in f.find_all("div", "missing")[0].all_text() for f in figures)


# ---- a comparison ------------------------------------------------------------------------------------

def test_comparison_report(compare_dir, index_dir, atlas_index_dir, tmp_path):
    out = tmp_path / "comparison.html"
    page = report(compare_dir, out, features=3, images=2)
    summary = json.loads((compare_dir / "summary.json").read_text())
    (hist,) = plots(page, "best-similarity")
    for side, index in (("a", index_dir), ("b", atlas_index_dir)):
        table = pq.read_table(compare_dir / f"matches_{side}.parquet")
        fired = pq.read_table(index / "features.parquet").column("n_images_fired").to_numpy()
        assert sum(values(hist)[side]["counts"]) + values(hist)[side]["undefined"] == table.num_rows \
            == summary[side]["live"] == int((fired > 0).sum())
        sims = table.column("pearson").to_numpy()
        assert values(hist)[side]["counts"] == np.histogram(sims, bins=values(hist)["edges"])[0].tolist()

    pairs = page.find_all("div", "pair")
    assert len(pairs) == min(3, len(summary["top_matches"])) > 0
    tops = {"a": open_array(index_dir, "top_images"), "b": open_array(atlas_index_dir, "top_images")}
    for pair, match in zip(pairs, summary["top_matches"]):
        for side, column in zip("ab", pair.find_all("div", "side")):
            fid, top = match[f"feature_{side}"], tops[side]
            assert column.attrs["data-side"] == side
            assert [int(f.attrs["data-image"]) for f in column.find_all("figure", "tile")] == \
                top[fid][top[fid] >= 0][:2].tolist()
    screenshot(tmp_path, out, "comparison")


def test_comparison_of_several_models_report(index_dir, atlas_index_dir, tmp_path):
    """Three sides (the third a copy of the first): the matrix figure holds the summary's matrix (1.0 between the
    copies), the groups figure the counts of shared.parquet, and each example shows its top images in every model
    that shares it, as the indexes list them."""
    from services.compare import CompareConfig, run_compare

    sides = (str(index_dir), str(atlas_index_dir), str(index_dir))
    summary = run_compare(CompareConfig(out=str(tmp_path / "set"), side=sides, name=("A", "B", "A2"), k=8,
                                        threshold=0.5), progress=False)
    assert summary["matrix"]["mean_best"][0][2] == pytest.approx(1.0, abs=1e-5)
    out = tmp_path / "set.html"
    page = report(tmp_path / "set", out, features=6, images=2)
    (matrix,) = plots(page, "matrix")
    assert values(matrix)["mean best Pearson correlation"] == summary["matrix"]["mean_best"]
    shared = pq.read_table(tmp_path / "set" / "shared.parquet").to_pandas()
    (groups,) = plots(page, "groups")
    counts = shared.groupby(["side", "n_models"]).size()
    assert values(groups)["by_models"] == [[int(counts.get((name, m), 0)) for m in (1, 2, 3)] for name in
                                           ("A", "B", "A2")]
    assert counts.get(("A", 1), 0) == 0  # every live feature of A has its copy in A2
    tops = {0: open_array(index_dir, "top_images"), 1: open_array(atlas_index_dir, "top_images")}
    tops[2] = tops[0]
    examples = page.find_all("div", "pair")
    assert examples
    for pair in examples:
        for column in pair.find_all("div", "side"):
            side = int(column.attrs["data-side"])
            fid = int(column.find_all("figure", "tile")[0].attrs["data-feature"]) if column.find_all(
                "figure", "tile") else None
            if fid is not None:
                assert [int(f.attrs["data-image"]) for f in column.find_all("figure", "tile")] == \
                    tops[side][fid][tops[side][fid] >= 0][:2].tolist()
    screenshot(tmp_path, out, "comparison-set")


def test_a_side_without_index_says_so(compare_dir, tmp_path):
    """B given as SAE_DIR@STORE (summary: "index": null): no images on that side, a note instead."""
    copy = shutil.copytree(compare_dir, tmp_path / "cmp")
    summary = json.loads((copy / "summary.json").read_text())
    summary["b"]["index"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    page = report(copy, tmp_path / "comparison.html", features=2, images=2)
    for pair in page.find_all("div", "pair"):
        a, b = pair.find_all("div", "side")
        assert len(a.find_all("img")) > 0
        assert not b.find_all("img") and "no feature index for this side" in b.all_text()


# ---- what it refuses ---------------------------------------------------------------------------------

def test_out_is_replaced_only_when_ours_and_asked(index_dir, tmp_path):
    out = tmp_path / "page.html"
    out.write_text("<html>someone's notes</html>")
    with pytest.raises(ConfigError, match="not an actstore report"):
        write_report(ReportConfig(str(index_dir), str(out), features=1, images=1), progress=False)
    assert out.read_text() == "<html>someone's notes</html>"
    out.unlink()
    write_report(ReportConfig(str(index_dir), str(out), features=1, images=1), progress=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        write_report(ReportConfig(str(index_dir), str(out), features=1, images=1), progress=False)
    write_report(ReportConfig(str(index_dir), str(out), features=1, images=1, seed=5, overwrite=True), progress=False)
    assert '"seed": 5' in DOM(out.read_text()).root.all_text()
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"], "no temporary file left behind"


def test_cli_names_what_it_expected(tmp_path, capsys):
    from actstore_cli import main

    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "training run (train_config.json)" in err and "index.json" in err and "summary.json" in err
    assert not (tmp_path / "r.html").exists()


def test_help_lists_every_option(capsys):
    from actstore_cli import main
    from actstore_cli.args import field_docs

    with pytest.raises(SystemExit) as e:
        main(["report", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: actstore report") and " path " in text
    for name, doc in field_docs(ReportConfig).items():
        if name != "path":  # positional, its help names the folders it takes
            assert f"--{name.replace('_', '-')} " in text and " ".join(doc.split())[:40] in text, name
