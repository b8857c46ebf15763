"""The steering dashboards (services/static/steer.js) in headless Chromium against live steering services.

Each view opens from its URL hash alone, edits included; what the page shows is checked against the same request
POSTed to the API here (the edits parsed by the CLI's own parser): the masks as read back from the canvas pixels
(canvas.mask[data-labels]), the changed patches, the legend, the top-5 bars, the sampled answers, the patch's
features. Screenshots go to test-artifacts/steer-<view>.png, and the pixels of the drawn parts are checked.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import _serve
from PIL import Image
from test_browser import ARTIFACTS, DOM, Node, add_harness, assert_token_kept_out_of_urls, chromium, get, run_harness

from sae.edits import parse_edit
from services.api import create_app

WINDOW = "--window-size=1400,1000"  # the DOM dumps and the screenshots lay the page out alike
STEER_SIZE = 224                     # px at which steer.js shows the image (its mask grid covers it exactly)
ACCENT = (47, 95, 179)               # style.css --accent: the top-5 bars
PROMPT = "What is in the picture?"
TOKEN = "steer-s3cret"


# ---- helpers -------------------------------------------------------------------------------------

def post(url: str, body: dict, token: str | None = None) -> dict:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{url}/steer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def request_body(image: int, head: str, edits: list[str], **extra) -> dict:
    """The POST /steer body of the hash's edits, parsed by sae.edits (the CLI's parser), not by the page."""
    parsed = [parse_edit(e) for e in edits]
    return {"image": image, "head": head, **extra,
            "edits": [{"feature": e.feature, "op": e.op, "value": e.value,
                       "where": e.where if isinstance(e.where, str) else list(e.where)} for e in parsed]}


def page_url(base: str, edits: list[str] = (), **params) -> str:
    parts = [f"{k}={quote(str(v), safe=':@,')}" for k, v in params.items()]
    return f"{base}/#steer?" + "&".join(parts + [f"edit={quote(e, safe=':@,')}" for e in edits])


def render(tmp_path: Path, url: str) -> Node:
    return DOM(chromium(tmp_path, url, "--dump-dom", WINDOW)).root


def steered(page: Node, expected: dict) -> Node:
    """The #steer section, asserted finished without an error and showing the expected request's edits."""
    section = page.by_id("steer")
    error = page.by_id("steer-error")
    assert "hidden" in error.attrs, f"the page shows an error: {error.all_text()!r}"
    assert section.attrs.get("data-state") == "done" and "hidden" not in section.attrs
    assert "hidden" in page.by_id("layout").attrs, "the feature browser is hidden on the steering page"
    assert section.attrs["data-edits"] == " ".join(expected["edits"])
    images = section.find_all("img")
    assert images and all(int(img.attrs.get("data-natural-width", 0)) == STEER_SIZE for img in images)
    return section


def top5_shown(section: Node, side: str, classes: list[str]) -> list[list[float]]:
    (ol,) = [n for n in section.find_all("ol", "top5") if n.attrs["data-side"] == side]
    rows = ol.find_all("li")
    for li in rows:
        assert li.find_all("span", "top5-name")[0].all_text() == classes[int(li.attrs["data-class"])]
    return [[int(li.attrs["data-class"]), float(li.attrs["data-prob"])] for li in rows]


def screenshot(tmp_path: Path, url: str, view: str) -> np.ndarray:
    png = tmp_path / "shot.png"
    chromium(tmp_path, url, f"--screenshot={png}", WINDOW)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(png, ARTIFACTS / f"steer-{view}.png")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)


def crop(rgb: np.ndarray, node: Node) -> np.ndarray:
    """The screenshot's pixels of a node the page marked with its page box (data-box="x,y,w,h")."""
    x, y, w, h = map(int, node.attrs["data-box"].split(","))
    assert w > 0 and h > 0 and x + w <= rgb.shape[1] and y + h <= rgb.shape[0], f"box {x, y, w, h} off the shot"
    return rgb[y:y + h, x:x + w]


def flat(mask: list[list[int]]) -> list[int]:
    return [label for row in mask for label in row]


def visible(text: str) -> str:
    """steer.js shows control characters (but newline and tab) as their Control Pictures."""
    return "".join("\u2421" if c == "\x7f" else chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\n\t" else c
                   for c in text)


# ---- the shapes service: segmentation and colour probes, zero-shot (conftest's steer_url) ----------------------

@pytest.fixture(scope="module")
def heads(steer_url) -> dict:
    return json.loads(get(f"{steer_url}/steer/heads"))


@pytest.fixture(scope="module")
def seg_case(steer_url, heads):
    """(url, expected result, patch, its features, the suppressed ones): image 3 with the top 3 features of its
    first object patch suppressed on all patches and the 4th raised on that patch and the next, the patch selected;
    the edits must change the mask."""
    image = 3
    clean = post(steer_url, request_body(image, "probe:seg", []))
    labels = flat(clean["before"]["mask"])
    ground = Counter(labels).most_common(1)[0][0]
    patch = next(i for i, label in enumerate(labels) if label != ground)
    found = json.loads(get(f"{steer_url}/images/{image}/patches/{patch}"))["features"]
    f = [x["feature"] for x in found]
    edits = [f"{f[0]}:set:0@all", f"{f[1]}:set:0@all", f"{f[2]}:set:0@all",
             f"{f[3]}:add:2.5@{patch},{(patch + 1) % len(labels)}"]
    expected = post(steer_url, request_body(image, "probe:seg", edits))
    assert expected["before"]["mask"] != expected["after"]["mask"], "the test's edits should change the mask"
    url = page_url(steer_url, edits, view="seg", image=image, head="probe:seg", patch=patch)
    return url, expected, patch, found, f[:3]


def test_segmentation_view(seg_case, heads, steer_url, tmp_path):
    """The masks, legend, top-5 and patch panel are the API's; in the screenshot each patch cell keeps its colour
    where the label is the same before and after and changes it where the label changed, over the picture."""
    url, expected, patch, found, suppressed = seg_case
    page = render(tmp_path, url)
    section = steered(page, expected)
    h, w = heads["grid"]
    before, after = (expected[side]["mask"] for side in ("before", "after"))
    labels = {"before": flat(before), "after": flat(after)}

    canvases = {c.attrs["data-side"]: c for c in section.find_all("canvas", "mask")}
    for side, canvas in canvases.items():
        assert canvas.attrs.get("data-mask-drawn") == "1"
        assert (int(canvas.attrs["width"]), int(canvas.attrs["height"])) == (w, h)
        assert [int(v) for v in canvas.attrs["data-labels"].split(",")] == labels[side], f"the {side} mask"
    changed = sum(a != b for a, b in zip(labels["before"], labels["after"]))
    assert int(canvases["after"].attrs["data-changed-patches"]) == changed > 0

    legend = section.find_all("ul", "legend")[0].find_all("li")
    assert [li.all_text().split()[0] for li in legend] == expected["classes"]
    for li in legend:
        c = int(li.attrs["data-class"])
        assert (int(li.attrs["data-before"]), int(li.attrs["data-after"])) == \
            (labels["before"].count(c), labels["after"].count(c))

    for side in ("before", "after"):
        assert top5_shown(section, side, expected["classes"]) == expected[side]["top5"]

    markers = section.find_all("div", "patch-marker")
    assert len(markers) == 2 and all(int(m.attrs["data-patch"]) == patch and "hidden" not in m.attrs for m in markers)
    rows = section.find_all("ul", "patch-features")[0].find_all("li")
    assert [int(li.attrs["data-feature"]) for li in rows] == [x["feature"] for x in found]
    assert [float(li.attrs["data-value"]) for li in rows] == [x["value"] for x in found]
    checked = [int(box.attrs["data-feature"]) for box in section.find_all("input") if "checked" in box.attrs]
    assert checked == suppressed, "the suppressed features are the checked ones"

    rgb = screenshot(tmp_path, url, "seg")
    overlays = {n.find_all("canvas", "mask")[0].attrs["data-side"]: n
                for n in section.find_all("div", "steer-overlay")}
    shot = {side: crop(rgb, overlays[side]).astype(float) for side in ("before", "after")}
    assert shot["before"].shape == shot["after"].shape == (STEER_SIZE, STEER_SIZE, 3)
    assert shot["before"].std() > 5 and shot["after"].std() > 5, "the mask region is blank"
    bare = Image.open(io.BytesIO(get(f"{steer_url}/images/3?size={STEER_SIZE}"))).convert("RGB")
    bare = np.asarray(bare, dtype=float)
    assert np.abs(shot["after"] - bare).mean() > 10, "no mask painted over the image"
    ch, cw = STEER_SIZE / h, STEER_SIZE / w
    for r in range(h):
        for c in range(w):
            inner = np.s_[int((r + 0.25) * ch):int((r + 0.75) * ch), int((c + 0.25) * cw):int((c + 0.75) * cw)]
            diff = np.abs(shot["before"][inner].mean((0, 1)) - shot["after"][inner].mean((0, 1))).max()
            if before[r][c] == after[r][c]:
                assert diff < 3, f"patch ({r}, {c}) kept its label but changed colour by {diff:.1f}"
            else:
                assert diff > 15, f"patch ({r}, {c}) changed its label but not its colour ({diff:.1f})"


@pytest.fixture(scope="module")
def cls_edits(steer_url) -> tuple[list[int], list[str]]:
    """Slider features (the strongest three of a patch of image 5) and the edits of the first two's sliders."""
    found = json.loads(get(f"{steer_url}/images/5/patches/24"))["features"]
    f = [x["feature"] for x in found[:3]]
    return f, [f"{f[0]}:add:-10@all", f"{f[1]}:add:8@all"]


@pytest.mark.parametrize("head", ["probe:color", "zeroshot"])
def test_classification_view(head, cls_edits, steer_url, tmp_path):
    features, edits = cls_edits
    expected = post(steer_url, request_body(5, head, edits))
    assert expected["kind"] == "class" and expected["before"]["top5"] != expected["after"]["top5"]
    url = page_url(steer_url, edits, view="cls", image=5, head=head, features=",".join(map(str, features)))
    page = render(tmp_path, url)
    section = steered(page, expected)

    sliders = section.find_all("div", "slider")
    assert [int(s.attrs["data-feature"]) for s in sliders] == features
    assert [float(s.attrs["data-value"]) for s in sliders] == [-10.0, 8.0, 0.0]
    for s in sliders:
        (rng,) = [n for n in s.find_all("input") if n.attrs.get("type") == "range"]
        assert float(rng.attrs["value"]) == float(s.attrs["data-value"])
        assert (float(rng.attrs["min"]), float(rng.attrs["max"])) == (-20.0, 20.0)
    for side in ("before", "after"):
        assert top5_shown(section, side, expected["classes"]) == expected[side]["top5"]

    results = crop(screenshot(tmp_path, url, "cls" if head == "probe:color" else "cls-zeroshot"),
                   page.by_id("steer-results"))
    bars = np.abs(results - np.array(ACCENT)).max(axis=2) <= 8
    half = results.shape[1] // 2
    assert bars[:, :half].sum() > 100 and bars[:, half:].sum() > 100, "no top-5 bars before and after"


def test_bad_edit_shows_the_apis_error(steer_url, tmp_path):
    body = request_body(3, "probe:seg", ["99999:set:0@all"])
    with pytest.raises(urllib.error.HTTPError) as caught:
        post(steer_url, body)
    assert caught.value.code == 422
    detail = json.loads(caught.value.read())["detail"]
    assert "99999" in detail

    page = render(tmp_path, page_url(steer_url, ["99999:set:0@all"], view="seg", image=3, head="probe:seg"))
    error = page.by_id("steer-error")
    assert "hidden" not in error.attrs and "error" in error.attrs["class"].split()
    assert error.all_text() == detail and error.attrs["data-status"] == "422"
    assert page.by_id("steer").attrs["data-state"] == "error"
    assert not [c for c in page.find_all("canvas", "mask") if "data-mask-drawn" in c.attrs]


def test_vlm_view_without_a_vlm_head_says_so(steer_url, tmp_path):
    page = render(tmp_path, page_url(steer_url, view="vlm", image=3, prompt=PROMPT))
    assert page.by_id("steer").attrs["data-state"] == "empty"
    (empty,) = page.find_all("p", "empty")
    assert "no vlm head" in empty.all_text() and "--steer vlm" in empty.all_text()
    assert "hidden" in page.by_id("steer-error").attrs and not page.find_all("li", "response")


def test_service_without_steering_says_how_to_start_it(steer_setup, tmp_path):
    """The same index served without --steer: the page shows the API's 404 detail, which names the flag."""
    for url in _serve(create_app(steer_setup["index"])):
        with pytest.raises(urllib.error.HTTPError) as caught:
            get(f"{url}/steer/heads")
        assert caught.value.code == 404
        detail = json.loads(caught.value.read())["detail"]
        page = render(tmp_path, page_url(url, view="cls", image=0))
        error = page.by_id("steer-error")
        assert "hidden" not in error.attrs and error.all_text() == detail and "--steer" in detail
        assert error.attrs["data-status"] == "404" and page.by_id("steer").attrs["data-state"] == "error"


def test_token_is_sent_with_steering_requests(steer_setup, seg_case, tmp_path):
    """A service with a bearer token: typed once into the page's form, the token goes with GET /steer/heads, POST
    /steer and the patch's features, and never into a URL (the page's address, its links to the views, the browser
    and the patch's features, what it fetches); a wrong one shows the 401 and the form."""
    _, expected, patch, found, _ = seg_case
    edits = [e for e in expected["edits"] if e.endswith("@all")]
    app = create_app(steer_setup["index"], token=TOKEN, steer_heads=(f"probe:{steer_setup['seg']}",))
    add_harness(app)
    for url in _serve(app):
        mine = post(url, request_body(3, "probe:seg", edits), TOKEN)
        page = page_url("", edits, view="seg", image=3, patch=patch)
        report = run_harness(tmp_path, url, page=page, type=TOKEN, done="#steer[data-state=done] ul.patch-features")
        section = steered(report["page"], mine)
        after = next(c for c in section.find_all("canvas", "mask") if c.attrs["data-side"] == "after")
        assert [int(v) for v in after.attrs["data-labels"].split(",")] == flat(mine["after"]["mask"])
        rows = section.find_all("ul", "patch-features")[0].find_all("li")
        assert [int(li.attrs["data-feature"]) for li in rows] == [x["feature"] for x in found]
        assert_token_kept_out_of_urls(report, TOKEN)
        links = set(report["links"])
        assert {"#", "#steer", f"#feature={found[0]['feature']}"} <= links
        assert any(link.startswith("#steer?view=cls&image=3") for link in links)
        assert any("/steer" in u for u in report["fetched"]) and any("/patches/" in u for u in report["fetched"])

        report = run_harness(tmp_path, url, page=page, stored=f"not-{TOKEN}", done="#steer[data-state=error]")
        error = report["page"].by_id("steer-error")
        assert "hidden" not in error.attrs and error.attrs["data-status"] == "401"
        assert "bearer token" in error.all_text() and "hidden" not in report["page"].by_id("auth").attrs


# ---- a VLM: a tiny random LLaVA's vision tower, an SAE on the layer its language model reads --------------------

@pytest.fixture(scope="module")
def vlm_steer_url(ray_local, tmp_path_factory):
    """8 shapes through a tiny random LLaVA (actstore.testing.tiny_vlm) at the tower layer its language model reads
    (-2), a random TopK SAE (d_sae 64, k 4) behind the store's normalization, its index, served with head "vlm"."""
    from actstore.extract import ExtractConfig, run_extract
    from actstore.loader import Normalization
    from actstore.store import ActivationStore
    from actstore.testing.shapes import generate_dataset
    from actstore.testing.tiny_vlm import write_tiny_llava
    from sae import checkpoint
    from sae.config import SAEConfig
    from sae.model import SparseAutoencoder
    from services.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("vlm-steer")
    folder = write_tiny_llava(str(root / "llava"))
    generate_dataset(str(root / "images"), 8, seed=1, image_size=32)
    run_extract(ExtractConfig(images=str(root / "images"), model=f"hf:{folder}", out=str(root / "store"),
                              layers=(-2,), batch_size=8, images_per_shard=8), progress=False)
    store = ActivationStore(str(root / "store"))
    layer = store.layers[0].name
    norm = Normalization.from_stats(store.stats(layer, "patches"), layer, "patches")
    sae = SparseAutoencoder(SAEConfig(d_in=store.layer(layer).d, d_sae=64, kind="topk", k=4))
    checkpoint.save(sae, str(root / "sae"), normalization=norm, extra=checkpoint.origin(store, layer))
    index = build_index(IndexConfig(str(root / "store"), str(root / "sae"), str(root / "index"), k=4), progress=False)
    yield from _serve(create_app(index, steer_heads=("vlm",)))


def test_vlm_view(vlm_steer_url, tmp_path):
    found = json.loads(get(f"{vlm_steer_url}/images/2/patches/5"))["features"]
    edits = [f"{found[0]['feature']}:add:20@all", f"{found[1]['feature']}:set:0@5,6"]
    # the page's request adds its defaults (5 answers, temperature 0.7, seed 0); these are the API's own
    expected = post(vlm_steer_url, request_body(2, "vlm", edits, prompt=PROMPT))
    answers = expected["before"]["responses"]
    assert len(answers) == 5 and answers != expected["after"]["responses"], "the edits should change the answers"
    url = page_url(vlm_steer_url, edits, view="vlm", image=2, prompt=PROMPT)
    page = render(tmp_path, url)
    section = steered(page, expected)

    (prompt,) = section.find_all("textarea")
    assert prompt.all_text() == PROMPT
    for side in ("before", "after"):
        (ol,) = [n for n in section.find_all("ol", "responses") if n.attrs["data-side"] == side]
        assert [li.all_text() for li in ol.find_all("li", "response")] == \
            [visible(r) for r in expected[side]["responses"]], f"the answers {side}"

    results = crop(screenshot(tmp_path, url, "vlm"), page.by_id("steer-results"))
    ink = results.sum(axis=2) < 300
    half = results.shape[1] // 2
    assert ink[:, :half].sum() > 200 and ink[:, half:].sum() > 200, "no answers drawn before and after"

