// Steering dashboards: SAE features edited inside the model, its predictions before and after (POST /steer, see
// services/api/routes/steer.py). The URL fragment is the whole state, so a link (or a DOM dump of it) shows the
// steered result without a click (the bearer token is never in it: app.js keeps it in sessionStorage):
//   #steer?view=seg|cls|vlm|gen&image=ID&head=NAME&edit=FEATURE:OP:VALUE[@WHERE]&edit=...
//   seg: &patch=P (the selected patch)   cls: &features=12,40 (the sliders)   vlm: &prompt=TEXT&responses=N&seed=S
//   gen: &steps=N&seed=S&size=PX&guidance=G&prompt=TEXT (size, guidance: absent = the pipeline's own)
// Loaded before app.js, whose onHash calls steerRoute; it uses app.js's helpers ($, el, headers, loadImage...).
// What was drawn is marked: #steer[data-state=loading|done|error|empty|idle][data-edits], canvas.mask[data-mask-drawn]
// [data-labels] (read back from its pixels), [data-changed-patches], .top5 li[data-class][data-prob], li.response,
// img.generated[data-side][data-natural-width] (decoded), .cosine[data-cosine].
"use strict";

const STEER_SIZE = 224;          // px of the image (the mask's grid covers it exactly)
const MASK_ALPHA = 0.45;         // the mask's classes painted over the image at this alpha
const MASK_RGB = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]];   // classes 0-9 (tab10)
const SLIDER_RANGE = 20;         // sliders run -20..20 (wider when the hash asks for more)
const SLIDER_DEBOUNCE_MS = 250;  // a slider requests once it rests this long
const STEER_VIEWS = {
  seg: { title: "Segmentation", kinds: ["seg"] },
  cls: { title: "Classification / zero-shot", kinds: ["class"] },
  vlm: { title: "VLM", kinds: ["vlm"] },
  gen: { title: "Generation", kinds: ["generate"] },
};
const GEN_OPTIONS = { steps: 25, seed: 0, size: "", guidance: "", prompt: "" };   // the API's defaults ("": none)
const EDIT_OPS = ["scale", "add", "set", "clamp"], EDIT_WHERE = ["all", "cls", "patches"];
const EDIT_SYNTAX = "expected FEATURE:OP:VALUE[@WHERE], e.g. 12:set:0@all or 40:add:2.5@3,4";

const steer = {
  info: null, infoToken: undefined, key: null, image: null, grid: [1, 1], loaded: null,
  sent: null, seq: 0, patchKey: null, patchSeq: 0, timers: new Map(),
};

// ---- the hash: edits in the CLI's syntax -------------------------------------------------------

// {feature, op, value, where} of `FEATURE:OP:VALUE[@WHERE]` (sae.edits.parse_edit's rules and messages).
function parseEdit(spec) {
  const at = spec.indexOf("@");
  const body = at < 0 ? spec : spec.slice(0, at), whereText = at < 0 ? "" : spec.slice(at + 1).trim();
  const parts = body.trim().split(":").map((s) => s.trim());
  if (parts.length !== 3) throw new Error(`edit ${JSON.stringify(spec)}: ${EDIT_SYNTAX}`);
  const [feature, op, value] = parts;
  if (!/^\d+$/.test(feature) || value === "" || !Number.isFinite(Number(value))) {
    throw new Error(`edit ${JSON.stringify(spec)}: FEATURE must be an integer >= 0 and VALUE a number`);
  }
  if (!EDIT_OPS.includes(op)) throw new Error(`edit ${JSON.stringify(spec)}: OP must be one of ${EDIT_OPS.join(", ")}`);
  let where = whereText || "all";
  if (!EDIT_WHERE.includes(where)) {
    const patches = where.split(",").map((s) => s.trim());
    if (!patches.every((p) => /^\d+$/.test(p))) {
      throw new Error(`edit ${JSON.stringify(spec)}: WHERE must be all, cls, patches or comma-separated patch indices`);
    }
    where = patches.map(Number);
  }
  return { feature: Number(feature), op, value: Number(value), where };
}

const editText = (e) => `${e.feature}:${e.op}:${e.value}@${Array.isArray(e.where) ? e.where.join(",") : e.where}`;
const isSlider = (e, f) => e.op === "add" && e.where === "all" && (f === undefined || e.feature === f);

// The hash of `params`, with : @ , left readable.
function steerHash(params) {
  const value = (v) => encodeURIComponent(v).replace(/%(3A|40|2C)/g, decodeURIComponent);
  return `#steer?${[...params].map(([k, v]) => `${k}=${value(v)}`).join("&")}`;
}

// Writes the hash (its listener redraws); `replace`: no new history entry (a slider's moves).
function setSteerHash(change, replace = false) {
  const params = hashParams();
  change(params);
  if (replace) location.replace(steerHash(params));
  else location.hash = steerHash(params);
}

function setEdits(params, edits) {
  params.delete("edit");
  for (const e of edits) params.append("edit", editText(e));
}

// ---- talking to the API -------------------------------------------------------------------------

// The JSON of GET `path`, or of POST `path` with `body`; a 4xx/5xx throws the API's one-line detail, with .status.
async function steerFetch(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: { ...headers(), "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const sent = state.token, resp = await fetch(path, init);
  if (resp.status === 401) askToken(sent);
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    err.status = resp.status;
    err.stale = sent !== state.token;   // the answer to a token replaced meanwhile: not shown
    throw err;
  }
  return resp.json();
}

async function steerInfo() {
  if (steer.infoToken !== state.token) {
    steer.infoToken = state.token;
    steer.info = steerFetch("/steer/heads");
  }
  return steer.info;
}

function steerError(err) {
  if (err?.stale) return;
  const box = $("#steer-error");
  box.textContent = err ? String(err.message ?? err) : "";
  box.dataset.status = err?.status ?? "";
  box.hidden = !err;
  if (err) {
    steer.sent = null;   // the same request again is a retry
    $("#steer").dataset.state = "error";
    $("#steer-results")?.classList.add("stale");
    console.error(err);
  }
}

// ---- pieces -------------------------------------------------------------------------------------

const maskRGB = (label) => MASK_RGB[label] ?? hslRGB((label * 137.508) % 360);

function hslRGB(hue) {   // s 0.7, l 0.5: the colours of classes past the palette
  const f = (n) => { const k = (n + hue / 30) % 12; return 0.5 - 0.35 * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  return [f(0), f(8), f(4)].map((v) => Math.round(255 * v));
}

// Paints the mask (rows of labels) one pixel a patch, and returns the labels read back from the canvas pixels
// (nearest class colour), so the marks report what is really painted.
function drawMask(canvas, mask, nClasses) {
  const h = mask.length, w = mask[0].length;
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  mask.forEach((row, r) => row.forEach((label, c) => {
    ctx.fillStyle = `rgba(${maskRGB(label).join(", ")}, ${MASK_ALPHA})`;
    ctx.fillRect(c, r, 1, 1);
  }));
  const px = ctx.getImageData(0, 0, w, h).data, palette = [...Array(nClasses).keys()].map(maskRGB);
  const labels = [];
  for (let i = 0; i < w * h; i++) {
    const d = palette.map(([r, g, b]) => (px[4 * i] - r) ** 2 + (px[4 * i + 1] - g) ** 2 + (px[4 * i + 2] - b) ** 2);
    labels.push(d.indexOf(Math.min(...d)));
  }
  canvas.dataset.maskDrawn = "1";
  canvas.dataset.labels = labels.join(",");
  return labels;
}

function boxOf(node) {   // its page rectangle in CSS px, "x,y,w,h" (tests crop screenshots with it)
  const r = node.getBoundingClientRect();
  return [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round).join(",");
}

// One figure of the image; `mask`: with a canvas over it (the mask) and the selected patch's frame, clicks select.
function steerFigure(side, caption, mask = false) {
  const img = el("img", { alt: `image ${steer.image}`, width: STEER_SIZE, height: STEER_SIZE });
  const overlay = el("div", { class: "overlay steer-overlay" }, img, ...(mask ? [
    el("canvas", { class: "mask", dataset: { side } }), el("div", { class: "patch-marker", hidden: "" })] : []));
  if (mask) overlay.addEventListener("click", (ev) => selectPatch(ev, overlay));
  const fig = el("figure", { class: "steer-figure", dataset: { side } }, overlay, el("figcaption", {}, caption));
  return { fig, loaded: loadImage(img, steer.image, STEER_SIZE) };
}

// Top-5 as labelled bars; `before` (the same head's top-5 without edits) adds each class's change.
function top5List(top5, classes, side, before = null) {
  const was = new Map((before ?? []).map(([c, p]) => [c, p]));
  return el("ol", { class: "top5", dataset: { side } }, ...top5.map(([c, p]) => {
    const change = (q) => `${p >= q ? "+" : "−"}${Math.abs(p - q).toFixed(3)}`;
    const delta = before === null ? "" : was.has(c) ? change(was.get(c)) : "new";
    return el("li", { dataset: { class: c, prob: String(p) } },
      el("span", { class: "top5-name" }, steerClassName(classes, c)),
      el("span", { class: "top5-bar" }, el("span", { style: `width: ${(100 * p).toFixed(2)}%` })),
      el("span", { class: "top5-prob" }, p.toFixed(3)),
      el("span", { class: "top5-delta" }, delta));
  }));
}

const steerClassName = (classes, c) => classes[c] ?? `class ${c}`;

// Control characters (other than newline and tab) as their Control Pictures (U+2400 + code, DEL U+2421): sampled
// answers can hold any byte, and a raw one would be invisible or garble the page.
const visible = (text) => text.replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g,
  (c) => String.fromCharCode(c === "\u007f" ? 0x2421 : 0x2400 + c.charCodeAt(0)));

function beforeAfter(name, before, after) {
  return el("div", { class: "before-after", dataset: { part: name } },
    el("div", { class: "side", dataset: { side: "before" } }, el("h4", {}, "before"), before),
    el("div", { class: "side", dataset: { side: "after" } }, el("h4", {}, "after"), after));
}

// The edits panel: the hash's edits (showEdits fills the list) and a box to add one in the CLI's syntax.
function editsPanel() {
  const input = el("input", { type: "text", placeholder: "FEATURE:OP:VALUE[@WHERE]", size: 24, "aria-label": "edit" });
  const form = el("form", { class: "add-edit" }, input, el("button", { type: "submit" }, "add edit"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      const e = parseEdit(input.value);
      setSteerHash((p) => p.append("edit", editText(e)));
      input.value = "";
    } catch (err) { steerError(err); }
  });
  return el("div", { id: "steer-edits" }, el("h3", {}, "Edits ", el("small", {}, "applied in order")),
    el("div", { id: "steer-edit-list" }), form);
}

function showEdits(edits) {
  const items = edits.map((e, i) => {
    const remove = el("button", { type: "button", title: "remove this edit" }, "×");
    remove.addEventListener("click", () => setSteerHash((p) => setEdits(p, edits.filter((_, j) => j !== i))));
    return el("li", { dataset: { edit: editText(e) } }, el("code", {}, editText(e)), remove);
  });
  $("#steer-edit-list").replaceChildren(items.length ? el("ul", { class: "edit-list" }, ...items)
    : el("p", { class: "hint" }, "No edits: before = after."));
}

// ---- the page -----------------------------------------------------------------------------------

// app.js's hash listener: true when the hash is the steering page, which it then shows; false shows the browser.
function steerRoute(params) {
  const on = location.hash.startsWith("#steer"), leaving = !on && $("#layout").hidden;
  $("#steer").hidden = !on;
  $("#layout").hidden = on;
  $("#to-browser").toggleAttribute("aria-current", !on);
  $("#to-steer").toggleAttribute("aria-current", on);
  if (leaving) { drawHistogram(); drawAtlas(); }   // drawn while hidden, they had no size
  if (on) showSteer(params);
  return on;
}

async function showSteer(params) {
  const view = STEER_VIEWS[params.get("view")] ? params.get("view") : "seg";
  const image = Number(params.get("image") ?? 0);
  const section = $("#steer");
  for (const a of document.querySelectorAll("#steer-views a")) {
    a.href = steerHash(new URLSearchParams({ view: a.dataset.view, image: params.get("image") ?? 0 }));
    a.toggleAttribute("aria-current", a.dataset.view === view);
  }
  try {
    if (!Number.isInteger(image) || image < 0) {
      throw new Error(`image must be an integer >= 0, got ${params.get("image")}`);
    }
    const edits = params.getAll("edit").map(parseEdit);
    const info = await steerInfo();
    $("#steer-views a[data-view=gen]").hidden = !info.heads.some((h) => h.kind === "generate");
    const heads = info.heads.filter((h) => STEER_VIEWS[view].kinds.includes(h.kind));
    const wanted = params.get("head");
    const head = wanted === null ? heads[0] : heads.find((h) => h.name === wanted);
    if (wanted !== null && !head) {
      throw new Error(`head ${JSON.stringify(wanted)} is not a ${STEER_VIEWS[view].title} head here; ` +
        `heads: ${heads.map((h) => h.name).join(", ") || "none"}`);
    }
    const key = [view, image, head?.name, state.token].join("|");
    if (key !== steer.key) {
      Object.assign(steer, { key, image, grid: info.grid, sent: null, patchKey: null });
      buildSteerView(view, info, heads, head);
    }
    if (!head) {
      steerError(null);
      section.dataset.state = "empty";
      return;
    }
    showEdits(edits);
    const body = { image, head: head.name,
      edits: edits.map(({ feature, op, value, where }) => ({ feature, op, value, where })) };
    if (view === "cls") showSliders(params, edits);
    if (view === "vlm") {
      const prompt = params.get("prompt") ?? "";
      const box = $("#steer-prompt");
      if (box !== document.activeElement) box.value = box.defaultValue = prompt;
      if (!prompt.trim()) {
        steerError(null);
        section.dataset.state = "idle";
        return;
      }
      Object.assign(body, { prompt, responses: Number(params.get("responses") ?? 5),
        temperature: Number(params.get("temperature") ?? 0.7), seed: Number(params.get("seed") ?? 0) });
    }
    if (view === "gen") Object.assign(body, genOptions(params));
    await Promise.all([runSteer(body), ...(view === "seg" ? [showPatch(params.get("patch"), edits)] : [])]);
  } catch (err) { steerError(err); }
}

// The controls and empty panels of one (view, image, head); runSteer fills #steer-results (and the masks).
function buildSteerView(view, info, heads, head) {
  const select = el("select", { id: "steer-head", "aria-label": "head" },
    ...heads.map((h) => el("option", { value: h.name },
      `${h.name} (${h.kind}${h.classes.length ? `, ${h.classes.length} classes` : ""})`)));
  if (head) select.value = head.name;
  select.addEventListener("change", () => setSteerHash((p) => p.set("head", select.value)));
  const imageInput = el("input", { id: "steer-image", type: "number", min: 0, step: 1, value: steer.image });
  imageInput.addEventListener("change", () => setSteerHash((p) => {
    p.set("image", imageInput.value);
    p.delete("patch");
  }));
  const controls = el("div", { class: "steer-controls" },
    el("label", {}, "image ", imageInput), ...(heads.length ? [el("label", {}, "head ", select)] : []),
    el("span", { class: "hint" }, `layer ${info.layer} (${info.tokens}), ${info.d_sae.toLocaleString()} features, ` +
      `${info.grid[0]}×${info.grid[1]} patches${info.cls ? " + CLS" : ""}, at most ${info.max_edits} edits`));
  const parts = [el("h2", {}, `Steer: ${STEER_VIEWS[view].title}`), controls];
  steer.loaded = Promise.resolve();
  if (!head) {
    const hint = { seg: "probe:DIR with a segmentation probe", cls: "model, zeroshot or probe:DIR", vlm: "vlm",
      gen: "generate[:PIPELINE[@ADAPTER]]" }[view];
    parts.push(el("p", { class: "hint empty" },
      `This service has no ${STEER_VIEWS[view].kinds.join(" or ")} head: start it with --steer ${hint}.`));
  } else if (view === "seg") {
    const before = steerFigure("before", "before", true), after = steerFigure("after", "after", true);
    steer.loaded = Promise.all([before.loaded, after.loaded]);
    parts.push(el("div", { class: "steer-row" }, before.fig, after.fig, el("div", { id: "steer-legend" })),
      el("div", { id: "steer-results" }), el("div", { id: "steer-patch" }), editsPanel());
  } else if (view === "cls") {
    const figure = steerFigure("image", `image ${steer.image}`);
    steer.loaded = figure.loaded;
    const fid = el("input", { type: "number", min: 0, max: info.d_sae - 1, step: 1, placeholder: "feature",
      "aria-label": "feature" });
    const add = el("form", { class: "add-slider" }, fid, el("button", { type: "submit" }, "add slider"));
    add.addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (fid.value === "") return;
      setSteerHash((p) => p.set("features", [...sliderFeatures(p, []), Number(fid.value)].join(",")));
    });
    parts.push(el("div", { class: "steer-row" }, figure.fig,
      el("div", { id: "steer-sliders-panel" },
        el("h3", {}, "Features ", el("small", {}, "slider v: add v on all patches")), el("div", { id: "steer-sliders" }),
        add)),
    el("div", { id: "steer-results" }), editsPanel());
  } else if (view === "gen") {
    const figure = steerFigure("image", `image ${steer.image}`);
    steer.loaded = figure.loaded;
    parts.push(el("div", { class: "steer-row" }, figure.fig, genForm()), el("div", { id: "steer-results" }),
      editsPanel());
  } else {
    const figure = steerFigure("image", `image ${steer.image}`);
    steer.loaded = figure.loaded;
    const prompt = el("textarea", { id: "steer-prompt", rows: 3, cols: 40, placeholder: "a question about the image" });
    const ask = el("form", { class: "ask" }, el("label", {}, "prompt", prompt),
      el("button", { type: "submit" }, "ask"));
    ask.addEventListener("submit", (ev) => { ev.preventDefault(); setSteerHash((p) => p.set("prompt", prompt.value)); });
    parts.push(el("div", { class: "steer-row" }, figure.fig, ask),
      el("div", { id: "steer-results" }), editsPanel());
  }
  $("#steer-view").replaceChildren(...parts);
}

// POSTs the request (unless it is the one already shown) and draws its before and after.
async function runSteer(body) {
  const section = $("#steer"), sent = JSON.stringify(body);
  if (sent === steer.sent) return;
  steer.sent = sent;
  const seq = ++steer.seq;
  section.dataset.state = "loading";
  try {
    const r = await steerFetch("/steer", body);
    if (seq !== steer.seq) return;
    await Promise.all([drawSteerResult(r), steer.loaded]);
    if (seq !== steer.seq) return;
    steerError(null);
    section.dataset.edits = r.edits.join(" ");
    for (const node of document.querySelectorAll("#steer-results, #steer .steer-overlay, #steer img.generated")) {
      node.dataset.box = boxOf(node);
    }
    section.dataset.state = "done";
  } catch (err) {
    if (seq === steer.seq) steerError(err);
  }
}

// Draws the result; resolves once its pictures (if any) are decoded.
function drawSteerResult(r) {
  const parts = [], pictures = [];
  if (r.kind === "seg") drawMasks(r);
  if (r.before.top5) {
    parts.push(el("h3", {}, r.kind === "seg" ? "Top 5 (mean over patches)" : "Top 5"),
      beforeAfter("top5", top5List(r.before.top5, r.classes, "before"),
        top5List(r.after.top5, r.classes, "after", r.before.top5)));
  }
  if (r.before.responses) {
    const list = (side, answers) => el("ol", { class: "responses", dataset: { side } },
      ...answers.map((text) => el("li", { class: "response" }, visible(text))));
    parts.push(el("h3", {}, `Responses to “${hashParams().get("prompt")}”`),
      beforeAfter("responses", list("before", r.before.responses), list("after", r.after.responses)));
  }
  if (r.kind === "generate") {
    const picture = (side) => {
      const img = el("img", { class: "generated", alt: `generated ${side}`, dataset: { side } });
      img.src = `data:image/png;base64,${r[side].image}`;
      pictures.push(img.decode().then(() => { img.dataset.naturalWidth = img.naturalWidth; }));
      return img;
    };
    parts.push(el("h3", {}, "Generated ", el("small", {}, "same seed before and after; image embedding cosine ",
      el("span", { class: "cosine", dataset: { cosine: String(r.cosine) } }, r.cosine.toFixed(6)))),
    beforeAfter("generated", picture("before"), picture("after")));
  }
  const results = $("#steer-results");
  results.classList.remove("stale");
  results.replaceChildren(...parts);
  return Promise.all(pictures);
}

// ---- segmentation: masks, the selected patch and its features -----------------------------------

// The masks before and after over the two figures, and the legend with each class's patches before -> after.
function drawMasks(r) {
  const [before, after] = document.querySelectorAll("#steer canvas.mask");
  const a = drawMask(before, r.before.mask, r.classes.length), b = drawMask(after, r.after.mask, r.classes.length);
  const changed = a.filter((label, i) => label !== b[i]).length;
  after.dataset.changedPatches = changed;
  const count = (labels, c) => labels.filter((l) => l === c).length;
  $("#steer-legend").replaceChildren(el("h4", {}, "classes ", el("small", {}, "patches before → after")),
    el("ul", { class: "legend" }, ...r.classes.map((name, c) => el("li",
      { dataset: { class: c, before: count(a, c), after: count(b, c) } },
      el("span", { class: "swatch", style: `background: rgb(${maskRGB(c).join(", ")})` }),
      `${name} `, el("small", {}, `${count(a, c)} → ${count(b, c)}`)))),
    el("p", { class: "changed", dataset: { changedPatches: changed } },
      `${changed} of ${a.length} patches changed label`));
  markPatch(hashParams().get("patch"));
}

function selectPatch(ev, overlay) {
  const box = overlay.getBoundingClientRect(), [h, w] = steer.grid;
  const col = Math.min(w - 1, Math.floor(((ev.clientX - box.left) / box.width) * w));
  const row = Math.min(h - 1, Math.floor(((ev.clientY - box.top) / box.height) * h));
  setSteerHash((p) => p.set("patch", row * w + col));
}

function markPatch(p) {
  const [h, w] = steer.grid;
  for (const marker of document.querySelectorAll("#steer .patch-marker")) {
    marker.hidden = p === null;
    if (p === null) continue;
    const i = Number(p);
    Object.assign(marker.style, { left: `${(100 * (i % w)) / w}%`, top: `${(100 * Math.floor(i / w)) / h}%`,
      width: `${100 / w}%`, height: `${100 / h}%` });
    marker.dataset.patch = i;
  }
}

const isSuppress = (e) => e.op === "set" && e.value === 0 && e.where === "all";

// The patch panel: patch `p`'s active features, checked where the edits suppress them on all patches;
// "suppress" makes the edits set exactly the checked ones of them to 0 on all patches.
async function showPatch(p, edits) {
  markPatch(p);
  const panel = $("#steer-patch"), suppressed = new Set(edits.filter(isSuppress).map((e) => e.feature));
  const check = () => {
    for (const box of panel.querySelectorAll("input[type=checkbox]")) {
      box.checked = box.defaultChecked = suppressed.has(Number(box.dataset.feature));   // the attribute too
    }
  };
  const key = `${steer.image}|${p}`;
  if (key === steer.patchKey) return check();
  steer.patchKey = key;
  if (p === null) {
    panel.replaceChildren(el("p", { class: "hint" }, "Click a patch to list its features."));
    return;
  }
  const seq = ++steer.patchSeq;
  const found = await steerFetch(`/images/${steer.image}/patches/${Number(p)}`);
  if (seq !== steer.patchSeq) return;
  const [h, w] = steer.grid;
  const rows = found.features.map((f) => el("li", { dataset: { feature: f.feature, value: String(f.value) } },
    el("label", {}, el("input", { type: "checkbox", dataset: { feature: f.feature } }), " ",
      el("a", { href: `#feature=${f.feature}`, title: "open in the feature browser" }, `#${f.feature}`), " ",
      el("span", { class: "hint" }, num(f.value)))));
  const button = el("button", { type: "button" }, "suppress checked on all patches");
  button.addEventListener("click", () => {
    const listed = new Set(found.features.map((f) => f.feature));
    const checked = [...panel.querySelectorAll("input[type=checkbox]")].filter((b) => b.checked)
      .map((b) => Number(b.dataset.feature));
    const kept = edits.filter((e) => !(listed.has(e.feature) && isSuppress(e)));
    const suppress = checked.map((f) => ({ feature: f, op: "set", value: 0, where: "all" }));
    setSteerHash((q) => setEdits(q, [...kept, ...suppress]));
  });
  panel.replaceChildren(el("h3", {}, `Patch ${p} `, el("small", {}, `row ${Math.floor(p / w)}, column ${p % w} of ` +
    `${h}×${w}; ${found.features.length} active features, strongest first`)),
  found.features.length ? el("ul", { class: "patch-features", dataset: { patch: p } }, ...rows)
    : el("p", { class: "hint" }, "No feature is active on this patch."),
  ...(found.features.length ? [button] : []));
  check();
}

// ---- classification: one slider a feature, v = add v on all patches -----------------------------------

// The sliders' features: the hash's `features`, then those of its add-on-all edits, each once.
function sliderFeatures(params, edits) {
  const listed = (params.get("features") ?? "").split(",").filter((s) => /^\d+$/.test(s.trim())).map(Number);
  return [...new Set([...listed, ...edits.filter((e) => isSlider(e)).map((e) => e.feature)])];
}

function showSliders(params, edits) {
  const box = $("#steer-sliders"), features = sliderFeatures(params, edits);
  const valueOf = (f) => edits.filter((e) => isSlider(e, f)).reduce((v, e) => v + e.value, 0);
  if (box.dataset.features !== features.join(",")) {
    box.dataset.features = features.join(",");
    box.replaceChildren(...features.map((f) => sliderRow(f, valueOf(f))));
    if (!features.length) box.append(el("p", { class: "hint" }, "Add a feature to get a slider."));
    return;
  }
  for (const row of box.querySelectorAll(".slider")) {
    const f = Number(row.dataset.feature), input = row.querySelector("input");
    if (input === document.activeElement || steer.timers.has(f)) continue;   // the user is moving it
    setSlider(row, valueOf(f));
  }
}

function setSlider(row, v) {
  const input = row.querySelector("input"), range = Math.max(SLIDER_RANGE, Math.ceil(Math.abs(v)));
  input.min = -range; input.max = range;
  input.value = input.defaultValue = v;   // the attribute too
  row.querySelector("output").textContent = String(v);
  row.dataset.value = String(v);
}

function sliderRow(f, v) {
  const input = el("input", { type: "range", step: 0.1, "aria-label": `add to feature ${f}` });
  const remove = el("button", { type: "button", title: "remove this slider" }, "×");
  const row = el("div", { class: "slider", dataset: { feature: f } },
    el("span", {}, `#${f}`), input, el("output", {}), remove);
  setSlider(row, v);
  input.addEventListener("input", () => {
    const value = Math.round(Number(input.value) * 10) / 10;
    row.querySelector("output").textContent = String(value);
    clearTimeout(steer.timers.get(f));
    steer.timers.set(f, setTimeout(() => { steer.timers.delete(f); commitSlider(f, value); }, SLIDER_DEBOUNCE_MS));
  });
  remove.addEventListener("click", () => setSteerHash((p) => {
    p.set("features", sliderFeatures(p, []).filter((g) => g !== f).join(","));
    setEdits(p, p.getAll("edit").map(parseEdit).filter((e) => !isSlider(e, f)));
  }));
  return row;
}

// The slider's value into the hash: its feature's add-on-all edit replaced in place (or appended; none for 0).
function commitSlider(f, value) {
  setSteerHash((p) => {
    const edits = p.getAll("edit").map(parseEdit), at = edits.findIndex((e) => isSlider(e, f));
    const kept = edits.filter((e) => !isSlider(e, f)), edit = { feature: f, op: "add", value, where: "all" };
    if (value !== 0) kept.splice(at < 0 ? kept.length : at, 0, edit);
    p.set("features", [...new Set([...sliderFeatures(p, []), f])].join(","));
    setEdits(p, kept);
  }, true);
}

// ---- generation: a picture from the image's embedding, before and after --------------------------------------

// The options form; "generate" writes its values into the hash (an empty box: the option's default).
function genForm() {
  const input = (name, attrs) => el("label", {}, `${name} `, el("input", { id: `gen-${name}`, name, ...attrs }));
  const form = el("form", { class: "gen-options" },
    input("steps", { type: "number", min: 1, max: 200, step: 1 }),
    input("seed", { type: "number", min: 0, step: 1 }),
    input("size", { type: "number", min: 8, max: 2048, step: 8, placeholder: "pipeline's" }),
    input("guidance", { type: "number", min: 0, max: 100, step: "any", placeholder: "pipeline's" }),
    input("prompt", { type: "text", size: 32, maxlength: 1000, placeholder: "a text prompt, if the pipeline reads one" }),
    el("button", { type: "submit" }, "generate"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setSteerHash((p) => {
      for (const box of form.querySelectorAll("input")) {
        if (box.value.trim() === "") p.delete(box.name);
        else p.set(box.name, box.value);
      }
    });
  });
  return el("div", { id: "steer-gen-panel" },
    el("h3", {}, "Generation ", el("small", {}, "denoising steps, seed, size (px), guidance, prompt")), form);
}

// The request's generation options from the hash (shown in the form); absent ones are left to the API.
function genOptions(params) {
  const body = {};
  for (const [name, fallback] of Object.entries(GEN_OPTIONS)) {
    const value = params.get(name) ?? String(fallback), box = $(`#gen-${name}`);
    if (box !== document.activeElement) box.value = box.defaultValue = value;   // the attribute too
    if (value.trim() !== "") body[name] = name === "prompt" ? value : Number(value);
  }
  return body;
}
