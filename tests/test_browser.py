"""The feature browser (services/static) rendered by headless Chromium against a live API server.

Chromium's command line does all the driving: `--dump-dom` gives the DOM after the page's scripts ran,
`--screenshot` a PNG. The page marks what it drew (body[data-rendered], canvas.heatmap[data-drawn],
[data-max-alpha]) so the DOM says whether the heatmaps were really painted; the screenshot shows it too.
Where a test must type (the bearer token's form), a harness page on the same origin runs the page in a frame,
types, and reports what the page did: its DOM, every URL it was at, every link in it and every URL it fetched.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
HEAT_MAX_ALPHA = 0.8  # app.js paints alpha = HEAT_MAX_ALPHA * value / max_act in HEAT_RGB (255, 40, 0)
TOP_SIZE = 224        # px at which app.js shows the top images (device pixel ratio 1 in headless mode)


# ---- helpers -------------------------------------------------------------------------------------

def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Runs headless Chromium on url with a fresh profile; returns its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not on PATH: `make test` installs Debian's chromium "
                    "(apt-get install chromium); install it to run the browser tests")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args, url]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within 60 s: {' '.join(cmd)}")
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def get(url: str, token: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and (cls is None or cls in (n.attrs.get("class") or "").split())]

    def by_id(self, id_: str) -> Node:
        found = [n for n in self.iter() if n.attrs.get("id") == id_]
        assert found, f"no element #{id_} in the rendered page"
        return found[0]

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class DOM(HTMLParser):
    """A minimal tree of the dumped DOM (stdlib only): tags, attributes, text."""
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(text := Node("#text", {}))
        text.text = data


def render(tmp_path: Path, url: str) -> Node:
    return DOM(chromium(tmp_path, url, "--dump-dom")).root


HARNESS = """<!doctype html><meta charset="utf-8"><title>harness</title><pre id="report"></pre><script>
"use strict";
// ?page=URL in a frame; &stored=T: sessionStorage's token before it loads; &type=T: typed into the token form when
// it shows; &search=WORDS: typed into the search box and submitted once the list shows (the page's script is
// listening then); &click=SELECTOR: clicked once it shows;
// &hover=SELECTOR: the pointer moved onto the point a canvas names in data-selected-x/-y; &done=SELECTOR: what marks
// the end. Reports the frame's DOM, every URL the frame was at, every href and src in its DOM, and every URL it
// fetched.
(async () => {
  const q = new URLSearchParams(location.search), seen = new Set(), frame = document.createElement("iframe");
  if (q.has("stored")) sessionStorage.setItem("actstore-token", q.get("stored"));
  const look = () => { try { seen.add(frame.contentWindow.location.href); } catch (_) { /* not loaded */ } };
  frame.addEventListener("load", () => { look(); frame.contentWindow.addEventListener("hashchange", look); });
  Object.assign(frame, { width: 1400, height: 1000, src: q.get("page") });
  document.body.append(frame);
  const doc = () => frame.contentDocument;
  let typed = false, searched = false, clicked = false, hovered = false, done = false;
  for (let i = 0; i < 400 && !done; i++) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    look();
    const form = doc()?.querySelector("#auth");
    if (q.has("type") && !typed && form && !form.hidden) {
      doc().querySelector("#auth-token").value = q.get("type");
      form.requestSubmit();
      typed = true;
    }
    const box = doc()?.querySelector("#feature-list tbody tr") && doc().querySelector("#search-q");
    if (q.has("search") && !searched && box) {
      box.value = q.get("search");
      doc().querySelector("#search").requestSubmit();
      searched = true;
    }
    const target = q.has("click") && !clicked && doc()?.querySelector(q.get("click"));
    if (target) {
      target.click();
      clicked = true;
    }
    const map = q.has("hover") && !hovered && doc()?.querySelector(q.get("hover"));
    if (map && map.dataset.selectedX) {
      const r = map.getBoundingClientRect();
      map.dispatchEvent(new frame.contentWindow.MouseEvent("mousemove", { bubbles: true,
        clientX: r.left + Number(map.dataset.selectedX), clientY: r.top + Number(map.dataset.selectedY) }));
      hovered = true;
    }
    done = Boolean(doc()?.querySelector(q.get("done")));
  }
  const links = [...doc().querySelectorAll("[href], [src]")]
    .map((n) => n.getAttribute("href") ?? n.getAttribute("src"));
  const fetched = frame.contentWindow.performance.getEntriesByType("resource").map((e) => e.name);
  document.querySelector("#report").textContent = JSON.stringify(
    { done, typed, searched, clicked, hovered, urls: [...seen], links, fetched,
      html: doc().documentElement.outerHTML });
})();
</script>"""


def add_harness(app) -> None:
    """GET /test-harness on `app`: HARNESS (a test's page, on the service's origin, so it shares sessionStorage)."""
    from fastapi.responses import HTMLResponse

    app.add_api_route("/test-harness", lambda: HTMLResponse(HARNESS), include_in_schema=False)


def run_harness(tmp_path: Path, url: str, **params: str) -> dict:
    """HARNESS's report on `url`'s service (params: page, done, and optionally stored, type, search, click, hover)."""
    report = json.loads(render(tmp_path, f"{url}/test-harness?{urlencode(params)}").by_id("report").all_text())
    assert report["done"], f"the page never showed {params['done']}"
    report["page"] = DOM(report["html"]).root
    return report


def assert_token_kept_out_of_urls(report: dict, token: str) -> None:
    """No URL the page was at, links to or fetched holds the token."""
    for kind in ("urls", "links", "fetched"):
        assert report[kind] and not [u for u in report[kind] if token in u], (kind, report[kind])


def heat_pixels(img: Image.Image) -> int:
    """Pixels that look like the heatmap colour (255, 40, 0) at alpha >= 0.8 over any picture."""
    r, g, b = np.asarray(img.convert("RGB"), dtype=np.int32).transpose(2, 0, 1)
    return int(((r >= 200) & (g <= 90) & (b <= 60)).sum())


@pytest.fixture(scope="module")
def feature(api_url):
    """The most frequent feature, in full, as the API returns it."""
    listing = json.loads(get(f"{api_url}/features?sort=-freq&limit=1"))
    fid = listing["features"][0]["id"]
    f = json.loads(get(f"{api_url}/features/{fid}"))
    assert f["top_images"], "the test index's most frequent feature should have top images"
    return f


def stat(page: Node, label: str) -> str:
    dl = page.by_id("stats")
    terms = [n for n in dl.children if n.tag in ("dt", "dd")]
    for dt, dd in zip(terms[::2], terms[1::2]):
        if dt.all_text().strip() == label:
            return dd.all_text().strip()
    raise AssertionError(f"no stat {label!r} on the page")


def assert_feature_rendered(page: Node, f: dict) -> None:
    body = page.find_all("body")[0]
    error = page.by_id("error")
    assert "hidden" in error.attrs, f"the page shows an error: {error.all_text()!r}"
    assert body.attrs.get("data-rendered") == f"feature-{f['id']}"

    figures = page.find_all("figure", "top-image")
    assert [int(fig.attrs["data-image"]) for fig in figures] == [t["image"] for t in f["top_images"]]
    for fig, top in zip(figures, f["top_images"]):
        (canvas,) = fig.find_all("canvas", "heatmap")
        assert canvas.attrs.get("data-drawn") == "1"
        expected = HEAT_MAX_ALPHA * min(1.0, max(top["heatmap"]) / f["max_act"])
        assert 0 < float(canvas.attrs["data-max-alpha"]) == pytest.approx(expected, abs=0.01)
        assert fig.find_all("img"), "each top image figure holds the image"
        caption = fig.find_all("figcaption")[0].all_text()
        assert (top["class_name"] or f"label {top['label']}") in caption


# ---- tests ---------------------------------------------------------------------------------------

def test_feature_page_renders(api_url, feature, tmp_path):
    f = feature
    page = render(tmp_path, f"{api_url}/#feature={f['id']}")
    assert_feature_rendered(page, f)

    assert f"Feature #{f['id']}" in page.by_id("feature").all_text()
    assert float(stat(page, "max activation")) == pytest.approx(f["max_act"], rel=0.01)
    assert float(stat(page, "mean activation (when firing)")) == pytest.approx(f["mean_act"], rel=0.01)
    assert int(stat(page, "patches fired").replace(",", "")) == f["n_patches_fired"]
    assert int(stat(page, "images fired").replace(",", "")) == f["n_images_fired"]
    assert float(stat(page, "firing frequency, images").rstrip("%")) == pytest.approx(
        100 * f["freq_images"], rel=0.01, abs=0.05)

    bands = page.find_all("section", "band")
    assert len(bands) == len(f["bands"])
    for section, band in zip(bands, f["bands"]):
        shown = [int(fig.attrs["data-image"]) for fig in section.find_all("figure", "band-example")]
        assert shown == [ex["image"] for ex in band["examples"]]

    histogram = page.by_id("histogram")
    assert histogram.tag == "canvas" and int(histogram.attrs.get("width", 0)) > 0, "histogram not drawn"

    listing = json.loads(get(f"{api_url}/features?limit=50"))
    rows = page.by_id("feature-list").find_all("tr")[1:]  # minus the header row
    assert [int(r.attrs["data-id"]) for r in rows] == [x["id"] for x in listing["features"]]

    # no atlas and no comparison on this index: the page says how to make an atlas, and has no matches panel
    assert page.find_all("body")[0].attrs.get("data-atlas") == "absent"
    assert "hidden" not in page.by_id("atlas-missing").attrs and "hidden" in page.by_id("atlas-map").attrs
    assert not [n for n in page.iter() if n.attrs.get("id") == "matches"]


def test_feature_page_screenshot(api_url, feature, tmp_path):
    f = feature
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"{api_url}/#feature={f['id']}", f"--screenshot={png}", "--window-size=1400,1000")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(png, ARTIFACTS / "browser-feature.png")

    shot = Image.open(png).convert("RGB")
    assert shot.size == (1400, 1000)
    rgb = np.asarray(shot, dtype=np.int32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 1000, f"the screenshot is nearly blank ({len(colours)} colours)"
    # The heatmaps must add heat-coloured pixels beyond what the pictures themselves have: at least
    # half of one patch cell of the best image, painted at the full alpha.
    h, w = f["grid"]
    own = sum(heat_pixels(Image.open(io.BytesIO(get(f"{api_url}/images/{t['image']}?size={TOP_SIZE}"))))
              for t in f["top_images"])
    cell = (TOP_SIZE / h) * (TOP_SIZE / w)
    assert heat_pixels(shot) > own + cell / 2, "no heatmap visible in the screenshot"


def test_token_is_entered_once_and_kept_out_of_urls(index_dir, feature, tmp_path):
    """A service with a token: the page asks for it in a form, sends it with every request once typed (the feature
    renders) and keeps it in the tab's sessionStorage, never in a URL; a wrong one shows the 401 and asks again;
    a token left in an old link's fragment is taken out of the address and not used."""
    from conftest import SERVICE_TOKEN as TOKEN, _serve
    from services.api import create_app

    app = create_app(index_dir, token=TOKEN)
    add_harness(app)
    for url in _serve(app):
        f = feature
        report = run_harness(tmp_path, url, page=f"/#feature={f['id']}", type=TOKEN, done="body[data-rendered]")
        assert report["typed"], "the page asked for the token"
        assert_feature_rendered(report["page"], f)
        assert "hidden" in report["page"].by_id("auth").attrs
        assert_token_kept_out_of_urls(report, TOKEN)
        assert f"/images/{f['top_images'][0]['image']}?size=224" in " ".join(report["fetched"])

        report = run_harness(tmp_path, url, page=f"/#feature={f['id']}", stored=f"not-{TOKEN}",
                             done="#error:not([hidden])")
        page = report["page"]
        assert "hidden" not in page.by_id("auth").attrs and "refused this token" in page.by_id("auth-hint").all_text()
        error = page.by_id("error")
        assert "hidden" not in error.attrs and "401" in error.all_text()
        assert not page.find_all("figure", "top-image")

        report = run_harness(tmp_path, url, page=f"/#feature={f['id']}&token={TOKEN}", done="#auth:not([hidden])")
        assert report["urls"][-1].endswith(f"/#feature={f['id']}"), report["urls"]
        assert "needs its bearer token" in report["page"].by_id("auth-hint").all_text()


# ---- the atlas and the matches panel (a service over the second SAE's index, with its comparison) ----

@pytest.fixture(scope="module")
def matched(compare_url):
    """(feature, its matches) of the served SAE: the most frequent one whose matches have top images."""
    listing = json.loads(get(f"{compare_url}/features?sort=-freq&limit=1000"))["features"]
    for summary in listing:
        m = json.loads(get(f"{compare_url}/features/{summary['id']}/matches?k=6"))
        if m["matches"] and all(x["top_images"] for x in m["matches"]):
            return json.loads(get(f"{compare_url}/features/{summary['id']}")), m
    pytest.fail("no feature of the test comparison has matches with top images")


def test_atlas_and_matches_render(compare_url, matched, tmp_path):
    f, m = matched
    atlas = json.loads(get(f"{compare_url}/atlas"))
    page = render(tmp_path, f"{compare_url}/#feature={f['id']}&atlas=pca")  # the state a click on the atlas sets
    assert_feature_rendered(page, f)

    assert page.find_all("body")[0].attrs.get("data-atlas") == "drawn"
    canvas = page.by_id("atlas-map")
    assert "hidden" not in canvas.attrs and "hidden" in page.by_id("atlas-missing").attrs
    assert int(canvas.attrs["data-points"]) == atlas["n_features"]
    assert int(canvas.attrs["data-dead"]) == atlas["n_dead"]
    assert canvas.attrs["data-mode"] == "pca" and int(canvas.attrs["data-selected"]) == f["id"]

    panel = page.by_id("matches")
    assert panel.attrs.get("data-rendered") == "1" and panel.attrs["data-other"] == m["other"]["side"]
    columns = panel.find_all("div", "match-column")
    assert [(c.attrs["data-side"], int(c.attrs["data-feature"])) for c in columns] == \
        [("this", f["id"])] + [("other", x["feature"]) for x in m["matches"]]
    shown = [[t["image"] for t in f["top_images"][:6]]] + [[t["image"] for t in x["top_images"]] for x in m["matches"]]
    for column, images in zip(columns, shown):
        figures = column.find_all("figure", "match-image")
        assert [int(fig.attrs["data-image"]) for fig in figures] == images
        for fig in figures:
            (heat,) = fig.find_all("canvas", "heatmap")
            assert heat.attrs.get("data-drawn") == "1"
    images = page.by_id("top-images").find_all("img") + panel.find_all("img")
    assert len(images) == len(f["top_images"]) + sum(map(len, shown))
    assert all(int(img.attrs.get("data-natural-width", 0)) > 0 for img in images), "an image did not load"


def test_atlas_and_matches_screenshot(compare_url, matched, tmp_path):
    f, _ = matched
    png = tmp_path / "shot.png"
    chromium(tmp_path, f"{compare_url}/#feature={f['id']}", f"--screenshot={png}", "--window-size=1400,1800")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(png, ARTIFACTS / "browser-atlas-matches.png")

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 1000, f"the screenshot is nearly blank ({len(colours)} colours)"
    # the atlas's points: pixels near the ends of its colour scale (viridis' dark violet and yellow)
    for end in ((68, 1, 84), (253, 231, 37)):
        assert (np.abs(rgb - np.array(end)).max(axis=2) <= 12).sum() > 10, f"no atlas point of colour {end}"


# ---- explanations: the search box, the feature's explanations, the atlas's tooltip --------------------------

def test_search_explanations_and_the_atlas_tooltip(atlas_index_dir, tmp_path):
    """An explained copy of the atlas's index (test_explain_service's rows: feature 17's VLM explanation holds
    "zebrafish", 42's "zebrafishes"): a word typed in the search box lists the hits in the API's order, a click on
    the first shows its explanations with their scores; the pointer on its atlas point shows its explanation."""
    from conftest import _serve
    from services.api import create_app
    from test_explain_service import PLANTED, explained_copy, explanation_rows

    app = create_app(explained_copy(atlas_index_dir, tmp_path / "index", explanation_rows(64)))
    add_harness(app)
    for url in _serve(app):
        hits = json.loads(get(f"{url}/features?q=zebrafish"))["features"]
        assert [h["id"] for h in hits] == [17, 42]
        report = run_harness(tmp_path, url, page="/", search="zebrafish", done='body[data-rendered="feature-17"]',
                             click='#feature-list tr[data-id="17"][data-explainer]')
        page = report["page"]
        rows = page.by_id("feature-list").find_all("tr")[1:]
        assert [(int(r.attrs["data-id"]), r.attrs["data-explainer"]) for r in rows] == [(17, "vlm"), (42, "vlm")]
        shown = [r.find_all("td", "explanation")[0].all_text() for r in rows]
        assert shown == [h["match"]["explanation"] for h in hits]
        assert "of 2 matches for “zebrafish”" in page.by_id("page-info").all_text()
        assert "disabled" in page.by_id("sort").attrs  # hits come by relevance

        f = json.loads(get(f"{url}/features/17"))
        blocks = page.by_id("explanations").find_all("div", "explanation")
        assert [b.attrs["data-explainer"] for b in blocks] == [x["explainer"] for x in f["explanations"]]
        vlm, vocabulary = f["explanations"]
        assert blocks[0].find_all("p", "explanation-text")[0].all_text() == PLANTED[17]
        assert f"detection accuracy {vlm['detection_accuracy']:.2f} ({vlm['detection_n']} images)" in \
            blocks[0].find_all("p", "scores")[0].all_text()
        assert [li.all_text() for li in blocks[1].find_all("li")] == \
            [f"{w} {s:.2f}" for w, s in zip(vocabulary["words"], vocabulary["word_scores"])]

        report = run_harness(tmp_path, url, page="/#feature=17", hover="#atlas-map", done="#atlas-tip:not([hidden])")
        tip = report["page"].by_id("atlas-tip")
        assert report["hovered"] and tip.attrs["data-feature"] == "17"
        assert tip.all_text().startswith("#17 · ") and tip.all_text().endswith(PLANTED[17])
