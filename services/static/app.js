// Feature browser: plain JS over the services.api JSON endpoints (see services/api/routes/).
// The search box lists the features whose explanations (from `actstore explain`) hold its words, most relevant
// first (GET /features?q=), with the explanation each matched by; without a search the list browses by density.
// The URL fragment carries the state that a link should keep: #feature=ID&atlas=umap|pca; #steer?... is the
// steering page (steer.js, loaded first). The bearer token never goes into a URL (history, shared links): a 401
// opens a small form, and the token entered there is kept in this tab's sessionStorage (TOKEN_KEY).
// What was drawn is marked in the DOM (data-* attributes), so a DOM dump shows what the page painted.
"use strict";

const HEAT_RGB = [255, 40, 0];   // heatmap colour, painted with alpha = HEAT_MAX_ALPHA * value / max_act
const HEAT_MAX_ALPHA = 0.8;
const TOP_SIZE = 224;            // px of the top-image thumbnails (the heatmap grid covers them exactly)
const BAND_SIZE = 96;            // px of the band example thumbnails
const MATCH_SIZE = 112;          // px of the thumbnails in the matches panel
const MATCH_K = 6;               // top images per feature in the matches panel
const ATLAS_DEAD = "#c4c8cf";    // atlas colour of features that never fired
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // low -> high density
const TOKEN_KEY = "actstore-token";   // sessionStorage key of the bearer token (this tab only)
const EXPLAINERS = { vlm: "VLM", vocabulary: "Vocabulary" };   // headings of the explainers' explanations
const NO_EXPLANATIONS = "No explanations for this index: run actstore explain --index DIR and restart the service.";

const $ = (sel) => document.querySelector(sel);
const state = {
  token: null, featureId: null, feature: null, hist: null, offset: 0, limit: 50, total: 0, seq: 0, blobs: [],
  atlas: null, atlasMode: "umap", atlasXY: null, q: "", listSeq: 0,
};

// ---- talking to the API ---------------------------------------------------------------------

function hashParams() {
  const hash = location.hash.slice(1);
  return new URLSearchParams(hash.startsWith("steer") ? hash.slice(hash.indexOf("?") + 1) : hash);
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

// A 401 for the token `sent`: the token form, saying whether a token was refused or none is known yet (a 401 for a
// token replaced meanwhile is old news).
function askToken(sent) {
  if (sent !== state.token) return;
  $("#auth-hint").textContent = state.token ? "The service refused this token; enter the right one."
    : "This service needs its bearer token.";
  $("#auth").hidden = false;
}

// The token from the form: into this tab's sessionStorage, then everything shown is fetched again with it.
function useToken(token) {
  state.token = token || null;
  if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
  else sessionStorage.removeItem(TOKEN_KEY);
  $("#auth").hidden = true;
  showError(null);
  state.featureId = null;
  loadList();
  loadHistogram();
  loadAtlas();
  onHash();
}

// The response, or null for a 404 of an `optional` resource (an atlas or a comparison the service lacks).
async function request(path, optional = false) {
  const sent = state.token, resp = await fetch(path, { headers: headers() });
  if (resp.status === 401) askToken(sent);
  if (optional && resp.status === 404) return null;
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    const err = new Error(`${resp.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)} (${path})`);
    err.stale = sent !== state.token;   // the answer to a token replaced meanwhile: not shown
    throw err;
  }
  return resp;
}

async function getJSON(path, optional = false) {
  const resp = await request(path, optional);
  return resp && resp.json();
}

// Images go through fetch so that the bearer token is sent; the <img> shows a blob URL. `other`: an image
// of the compared SAE's index. data-natural-width records that the picture really decoded.
async function loadImage(img, id, size, other = false) {
  const blob = await (await request(`/images/${id}?size=${size}${other ? "&other=true" : ""}`)).blob();
  const url = URL.createObjectURL(blob);
  state.blobs.push(url);
  img.src = url;
  await img.decode();
  img.dataset.naturalWidth = img.naturalWidth;
}

function showError(err) {
  if (err?.stale) return;
  const box = $("#error");
  box.textContent = err ? String(err.message ?? err) : "";
  box.hidden = !err;
  if (err) console.error(err);
}

// ---- small helpers ----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

const log10 = (f) => (f > 0 ? Math.log10(f).toFixed(2) : "dead");
const pct = (f) => (f >= 0.01 ? `${(100 * f).toFixed(1)}%` : `${(100 * f).toPrecision(2)}%`);
const num = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));

// ---- feature list -----------------------------------------------------------------------------

// The list's query: the sort and the density filter, and the search's words when there are some (their hits come
// most relevant first: the sort is unused, and disabled meanwhile).
function listQuery() {
  const q = new URLSearchParams({ sort: $("#sort").value, offset: state.offset, limit: state.limit });
  const lo = $("#min-log").value, hi = $("#max-log").value;
  if (lo !== "") q.set("min_freq", Math.min(1, 10 ** Number(lo)));
  if (hi !== "") q.set("max_freq", Math.min(1, 10 ** Number(hi)));
  if (state.q) q.set("q", state.q);
  return q;
}

// A search hit shows the explanation it matched (data-explainer says whose); a listed feature the one it has.
function listRow(f) {
  const text = f.match ? f.match.explanation : f.explanation;
  const row = el("tr", { dataset: { id: f.id, ...(f.match ? { explainer: f.match.explainer } : {}) } },
    el("td", {}, `#${f.id}`), el("td", {}, log10(f.freq_patches)), el("td", {}, num(f.max_act)),
    el("td", { class: "explanation", title: text ?? "" }, text ?? ""));
  row.addEventListener("click", () => openFeature(f.id));
  return row;
}

async function loadList() {
  const seq = ++state.listSeq;
  try {
    const page = await getJSON(`/features?${listQuery()}`, Boolean(state.q));   // a search's 404: no explanations
    if (seq !== state.listSeq) return;          // a later list was asked for meanwhile
    if (!page) {
      $("#feature-list tbody").replaceChildren();
      $("#page-info").textContent = NO_EXPLANATIONS;
      $("#prev").disabled = $("#next").disabled = true;
      return;
    }
    state.total = page.total;
    $("#feature-list tbody").replaceChildren(...page.features.map(listRow));
    const last = Math.min(page.total, state.offset + page.features.length);
    const what = state.q ? `matches for “${state.q}”` : "features";
    $("#page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}${state.q ? ` ${what}` : ""}`
      : `no ${what}`;
    $("#prev").disabled = state.offset === 0;
    $("#next").disabled = last >= page.total;
    markSelectedRow();
  } catch (err) { showError(err); }
}

function markSelectedRow() {
  for (const row of document.querySelectorAll("#feature-list tbody tr")) {
    row.classList.toggle("selected", Number(row.dataset.id) === state.featureId);
  }
}

function resetAndLoadList() {
  state.offset = 0;
  loadList();
}

// The search box's words (none: back to browsing).
function search(words) {
  state.q = words.trim();
  $("#sort").disabled = Boolean(state.q);
  resetAndLoadList();
}

// ---- density histogram ------------------------------------------------------------------------

// A canvas sized to its box in device pixels, cleared, drawn in CSS pixels: {ctx, W, H}.
function sizedCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, W, H);
  return { ctx, W, H };
}

function drawHistogram() {
  const canvas = $("#histogram"), hist = state.hist;
  if (!hist) return;
  const { ctx, W, H } = sizedCanvas(canvas);

  const pad = { l: 36, r: 10, t: 8, b: 22 };
  const lo = hist.edges[0], hi = hist.edges[hist.edges.length - 1];
  const top = Math.max(1, ...hist.counts);
  const x = (v) => pad.l + ((v - lo) / (hi - lo || 1)) * (W - pad.l - pad.r);
  const y = (c) => H - pad.b - (c / top) * (H - pad.t - pad.b);

  ctx.fillStyle = "#5b7bb2";
  hist.counts.forEach((c, i) => {
    const x0 = x(hist.edges[i]), x1 = x(hist.edges[i + 1]);
    ctx.fillRect(x0 + 0.5, y(c), Math.max(1, x1 - x0 - 1), H - pad.b - y(c));
  });

  ctx.strokeStyle = "#999"; ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  ctx.beginPath(); ctx.moveTo(pad.l, H - pad.b + 0.5); ctx.lineTo(W - pad.r, H - pad.b + 0.5); ctx.stroke();
  ctx.textAlign = "center";
  for (let t = Math.ceil(lo); t <= Math.floor(hi); t++) ctx.fillText(`1e${t}`, x(t), H - 6);
  ctx.textAlign = "right";
  ctx.fillText(String(top), pad.l - 4, pad.t + 9);
  ctx.fillText("0", pad.l - 4, H - pad.b);

  const f = state.feature;
  if (f && f.freq_patches > 0) {
    const v = Math.min(hi, Math.max(lo, Math.log10(f.freq_patches)));
    ctx.strokeStyle = "#111"; ctx.lineWidth = 2; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(x(v), pad.t); ctx.lineTo(x(v), H - pad.b); ctx.stroke();
    ctx.setLineDash([]); ctx.textAlign = "left"; ctx.fillStyle = "#111";
    ctx.fillText(`#${f.id}`, Math.min(x(v) + 4, W - 40), pad.t + 10);
  }
  canvas.onclick = (ev) => {   // clicking a bar filters the list to that bar's density range
    const v = lo + ((ev.offsetX - pad.l) / (W - pad.l - pad.r)) * (hi - lo);
    const i = hist.edges.findIndex((e, j) => j > 0 && v <= e) - 1;
    if (v < lo || i < 0) return;
    $("#min-log").value = hist.edges[i].toFixed(2);
    $("#max-log").value = hist.edges[i + 1].toFixed(2);
    resetAndLoadList();
  };
}

async function loadHistogram() {
  try {
    state.hist = await getJSON("/stats/density-histogram");
    $("#dead-count").textContent = `${state.hist.n_features} features, ${state.hist.dead} dead`;
    drawHistogram();
  } catch (err) { showError(err); }
}

// ---- atlas: the features' decoder directions in 2-D (from `actstore atlas`) -------------------------

// [min, max] of the numbers ([0, 0] for none); a loop, since spreading 100k features into Math.min overflows.
function extent(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return values.length ? [lo, hi] : [0, 0];
}

function densityColour(t) {     // t in [0, 1] along VIRIDIS
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), w = x - i;
  const [r, g, b] = VIRIDIS[i].map((v, j) => Math.round(v + w * (VIRIDIS[i + 1][j] - v)));
  return `rgb(${r}, ${g}, ${b})`;
}

// Draws every feature as a point of the current projection, dead ones grey under the rest, the others by
// log10 density (denser on top), the open feature ringed; records the points' pixels for clicks.
function drawAtlas() {
  const canvas = $("#atlas-map"), a = state.atlas;
  if (!a) return;
  for (const b of document.querySelectorAll("#atlas-modes button")) {
    b.setAttribute("aria-pressed", String(b.dataset.mode === state.atlasMode));
  }
  const { ctx, W, H } = sizedCanvas(canvas);

  const xs = a[`${state.atlasMode}_x`], ys = a[`${state.atlasMode}_y`], dens = a.log10_density;
  const n = xs.length, pad = 14, legendH = 22;
  const [[x0, x1], [y0, y1]] = [extent(xs), extent(ys)];
  const scale = Math.min((W - 2 * pad) / (x1 - x0 || 1), (H - 2 * pad - legendH) / (y1 - y0 || 1));
  const ox = (W - scale * (x1 - x0)) / 2, oy = (H - legendH - scale * (y1 - y0)) / 2;
  const [lo, hi] = extent(dens.filter((d) => d !== null));
  const radius = n > 20000 ? 1.2 : n > 2000 ? 2 : 3.5;
  const order = [...xs.keys()].sort((i, j) => (dens[i] ?? -Infinity) - (dens[j] ?? -Infinity));

  state.atlasXY = new Float32Array(2 * n);
  let drawn = 0, dead = 0;
  for (const i of order) {
    const px = ox + scale * (xs[i] - x0), py = H - legendH - oy - scale * (ys[i] - y0);
    state.atlasXY[2 * i] = px; state.atlasXY[2 * i + 1] = py;
    ctx.fillStyle = a.dead[i] ? ATLAS_DEAD : densityColour((dens[i] - lo) / (hi - lo || 1));
    ctx.beginPath(); ctx.arc(px, py, radius, 0, 2 * Math.PI); ctx.fill();
    drawn += 1; dead += a.dead[i] ? 1 : 0;
  }
  const sel = state.featureId, ringed = sel !== null && sel >= 0 && sel < n;
  if (ringed) {
    ctx.strokeStyle = "#111"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(state.atlasXY[2 * sel], state.atlasXY[2 * sel + 1], radius + 4, 0, 2 * Math.PI); ctx.stroke();
  }
  // legend: the density scale, and grey for dead
  const lx = pad, ly = H - 14, lw = Math.min(180, W / 3);
  for (let k = 0; k < lw; k++) { ctx.fillStyle = densityColour(k / (lw - 1)); ctx.fillRect(lx + k, ly - 8, 1, 8); }
  ctx.fillStyle = "#555"; ctx.font = "11px sans-serif"; ctx.textAlign = "left";
  ctx.fillText(`log10 freq ${lo.toFixed(1)}`, lx, ly + 11);
  ctx.textAlign = "right"; ctx.fillText(hi.toFixed(1), lx + lw, ly + 11);
  ctx.textAlign = "left"; ctx.fillStyle = ATLAS_DEAD; ctx.fillRect(lx + lw + 16, ly - 8, 8, 8);
  ctx.fillStyle = "#555"; ctx.fillText(`dead (${dead})`, lx + lw + 28, ly);

  const what = state.atlasMode === "umap" ? `UMAP, cosine, ${a.n_neighbors} neighbours`
    : `PCA, ${(100 * a.pca_explained[0]).toFixed(1)}% + ${(100 * a.pca_explained[1]).toFixed(1)}% of variance`;
  $("#atlas-info").textContent = `${n.toLocaleString()} decoder directions · ${what}`;
  Object.assign(canvas.dataset, { points: drawn, dead, mode: state.atlasMode, selected: sel ?? "",   // its pixel too
    selectedX: ringed ? state.atlasXY[2 * sel] : "", selectedY: ringed ? state.atlasXY[2 * sel + 1] : "" });
}

// The tooltip over the atlas: the feature under the pointer (x, y in the canvas's CSS pixels), its density and
// explanation; hidden when no point is near.
function atlasTip(id, x, y) {
  const tip = $("#atlas-tip"), map = $("#atlas-map");
  tip.hidden = id === null;
  map.title = id === null ? "click a point to open its feature" : "";
  if (id === null) return;
  const d = state.atlas.log10_density[id], text = state.atlas.explanation?.[id];
  tip.replaceChildren(el("b", {}, `#${id}`), ` · ${d === null ? "dead" : `log10 freq ${d.toFixed(2)}`}`,
    ...(text ? [el("br"), text] : []));
  tip.dataset.feature = id;
  tip.style.left = `${map.offsetLeft + x + 12}px`;
  tip.style.top = `${map.offsetTop + y + 12}px`;
}

// The feature whose point is nearest to (x, y) in CSS pixels, within a few pixels; null otherwise.
function atlasPointAt(x, y) {
  const xy = state.atlasXY;
  if (!xy) return null;
  let best = null, bestD = 64;   // (8 px)^2
  for (let i = 0; i < xy.length / 2; i++) {
    const d = (xy[2 * i] - x) ** 2 + (xy[2 * i + 1] - y) ** 2;
    if (d < bestD) { best = i; bestD = d; }
  }
  return best;
}

async function loadAtlas() {
  try {
    state.atlas = await getJSON("/atlas", true);
    $("#atlas-map").hidden = !state.atlas;
    $("#atlas-missing").hidden = Boolean(state.atlas);
    document.body.dataset.atlas = state.atlas ? "drawn" : "absent";
    drawAtlas();
  } catch (err) { showError(err); }
}

function setAtlasMode(mode) {
  const params = hashParams();
  params.set("atlas", mode);
  location.hash = params.toString();   // the hashchange listener redraws
}

// ---- one feature ------------------------------------------------------------------------------

// Paints the patch grid (row-major, h x w) on the canvas and returns the largest alpha painted,
// read back from the canvas pixels rather than computed, so it reports what is really there.
function drawHeatmap(canvas, heatmap, [h, w], maxAct) {
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  const [r, g, b] = HEAT_RGB;
  heatmap.forEach((v, i) => {
    const a = maxAct > 0 ? HEAT_MAX_ALPHA * Math.min(1, Math.max(0, v / maxAct)) : 0;
    if (a <= 0) return;
    ctx.fillStyle = `rgba(${r}, ${g}, ${b}, ${a})`;
    ctx.fillRect(i % w, Math.floor(i / w), 1, 1);
  });
  const px = ctx.getImageData(0, 0, w, h).data;
  let maxAlpha = 0;
  for (let i = 3; i < px.length; i += 4) maxAlpha = Math.max(maxAlpha, px[i]);
  canvas.dataset.drawn = "1";
  canvas.dataset.maxAlpha = (maxAlpha / 255).toFixed(3);
}

// Each explainer's explanation of the feature with its scores: the VLM's words, or the vocabulary's best words
// with their similarity; the detection judge's balanced accuracy and AUROC, the embedding AUROC (when scored).
function explanationsSection(f) {
  const fixed = (x) => x.toFixed(2);
  const items = f.explanations.map((x) => {
    const scores = [
      ...(x.detection_accuracy !== null ? [`detection accuracy ${fixed(x.detection_accuracy)} (${x.detection_n} images)`] : []),
      ...(x.detection_auroc !== null ? [`detection AUROC ${fixed(x.detection_auroc)}`] : []),
      ...(x.embedding_auroc !== null ? [`embedding AUROC ${fixed(x.embedding_auroc)}`] : []),
    ];
    const words = x.words.map((w, i) => el("li", {}, w,
      ...(x.word_scores[i] != null ? [el("small", {}, ` ${fixed(x.word_scores[i])}`)] : [])));
    return el("div", { class: "explanation", dataset: { explainer: x.explainer } },
      el("h4", {}, EXPLAINERS[x.explainer] ?? x.explainer,
        el("small", {}, ` ${x.model ?? ""}${x.judge ? ` · judged by ${x.judge}` : ""}`)),
      words.length ? el("ul", { class: "words" }, ...words) : el("p", { class: "explanation-text" }, x.explanation ?? ""),
      el("p", { class: "scores" }, scores.length ? scores.join(" · ") : "not scored"));
  });
  return items.length ? [el("section", { id: "explanations" }, el("h3", {}, "Explanations"), ...items)] : [];
}

function statsTable(f) {
  const rows = [
    ["firing frequency, patches", `${pct(f.freq_patches)} (log10 ${log10(f.freq_patches)})`],
    ["firing frequency, images", pct(f.freq_images)],
    ["patches fired", f.n_patches_fired.toLocaleString()],
    ["images fired", f.n_images_fired.toLocaleString()],
    ["mean activation (when firing)", num(f.mean_act)],
    ["max activation", num(f.max_act)],
  ];
  return el("dl", { id: "stats" }, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// Where the feature sits in the label hierarchy of `actstore abstraction` (services.abstraction.level_line's words);
// nothing when the index has no abstraction profile.
function levelLine(f) {
  const l = f.level;
  if (!l) return [];
  const text = l.node === null
    ? (l.n ? `none (no node holds ${l.min_share} of its ${l.n} labelled top images)` : "none (no labelled top images)")
    : `${l.node} (depth ${l.depth}${l.depth_name ? ` ${l.depth_name}` : ""}, share ${l.share.toFixed(2)} of ${l.n} top images)`;
  return [el("p", { id: "level", dataset: { node: l.node ?? "", depth: l.depth ?? "" } }, el("b", {}, "level: "), text)];
}

// A top image with its heatmap over it: `grid` and `maxAct` are those of the feature (and index) it belongs to.
function imageFigure(top, { grid, maxAct, size = TOP_SIZE, cls = "top-image", other = false }) {
  const img = el("img", { alt: `image ${top.image}`, width: size, height: size });
  const canvas = el("canvas", { class: "heatmap" });
  drawHeatmap(canvas, top.heatmap, grid, maxAct);
  const caption = el("figcaption", {}, el("b", {}, num(top.value)), " ",
    top.class_name ?? `label ${top.label}`);
  const fig = el("figure", { class: cls, dataset: { image: top.image } },
    el("div", { class: "overlay" }, img, canvas), caption);
  return { fig, loaded: loadImage(img, top.image, size, other) };
}

const topImageFigure = (f, top) => imageFigure(top, { grid: f.grid, maxAct: f.max_act });

function bandSection(band) {
  const figs = band.examples.map((ex) => {
    const img = el("img", { alt: `image ${ex.image}`, width: BAND_SIZE, height: BAND_SIZE });
    loadImage(img, ex.image, BAND_SIZE).catch(showError);
    return el("figure", { class: "band-example", dataset: { image: ex.image } },
      img, el("figcaption", {}, num(ex.value)));
  });
  return el("section", { class: "band" },
    el("h4", {}, `activation ${num(band.lo)} – ${num(band.hi)}`, el("small", {}, ` ${band.count.toLocaleString()} images`)),
    el("div", { class: "band-examples" }, ...figs));
}

async function openFeature(id) {
  const params = hashParams();
  params.set("feature", id);
  location.hash = params.toString();   // the hashchange listener does the loading
}

// ---- matches in the other SAE (a service started with --compare) ---------------------------------

// One column of the matches panel: a feature, a line about it, and its first top images with heatmaps.
function matchColumn(title, line, tops, opts, dataset) {
  const figs = tops.map((t) => imageFigure(t, { ...opts, size: MATCH_SIZE, cls: "match-image" }));
  const column = el("div", { class: "match-column", dataset },
    el("h4", {}, title), el("p", { class: "match-line" }, line),
    el("div", { class: "match-images" }, ...figs.map((x) => x.fig)));
  return { column, loaded: figs.map((x) => x.loaded) };
}

// This feature and its matches in the other SAE, side by side; `loaded` settles when every image decoded.
function matchesPanel(f, m) {
  const o = m.other, b = o.backbone ?? {};
  const columns = [matchColumn(`This SAE: #${f.id}`, `log10 freq ${log10(f.freq_patches)}`,
    f.top_images.slice(0, MATCH_K), { grid: f.grid, maxAct: f.max_act }, { side: "this", feature: f.id })];
  for (const x of m.matches) {
    const role = x.best ? (x.assigned ? "best match, also assigned" : "best match") : "assigned partner";
    const facts = [`similarity ${x.similarity.toFixed(3)}`, ...(x.mutual ? ["mutual"] : []),
      ...(x.jaccard_topk !== null ? [`top-k overlap ${x.jaccard_topk.toFixed(2)}`] : []),
      ...(x.freq_patches !== null ? [`log10 freq ${log10(x.freq_patches)}`] : [])];
    columns.push(matchColumn(`Other SAE: #${x.feature} (${role})`, facts.join(" · "), x.top_images,
      { grid: x.grid, maxAct: x.max_act, other: true },
      { side: "other", feature: x.feature, best: x.best ? "1" : "0", assigned: x.assigned ? "1" : "0" }));
  }
  const notes = [];
  if (!m.matches.length) notes.push("No match: the comparison has no row for this feature (it never fired there).");
  if (o.index === null) notes.push("The other SAE has no index in this comparison: its features come without images.");
  const section = el("section", { id: "matches", dataset: { other: o.side, count: m.matches.length } },
    el("h3", {}, "Matches in the other SAE",
      el("small", {}, ` side ${o.side}: ${b.family ?? "?"}:${b.name ?? "?"} layer ${o.layer}, ${o.d_sae} features; ` +
        `${m.by} similarity (${m.level} level)`)),
    ...notes.map((text) => el("p", { class: "hint match-note" }, text)),
    ...(m.matches.length ? [el("div", { class: "match-columns" }, ...columns.map((c) => c.column))] : []));
  const loaded = Promise.all(columns.flatMap((c) => c.loaded)).then(() => { section.dataset.rendered = "1"; });
  return { section, loaded };
}

async function showFeature(id) {
  const seq = ++state.seq;
  state.featureId = id;
  markSelectedRow();
  drawAtlas();
  delete document.body.dataset.rendered;
  try {
    const [f, m] = await Promise.all([getJSON(`/features/${id}`), getJSON(`/features/${id}/matches?k=${MATCH_K}`, true)]);
    if (seq !== state.seq) return;            // another feature was picked meanwhile
    state.blobs.forEach((url) => URL.revokeObjectURL(url));
    state.blobs = [];
    state.feature = f;
    drawHistogram();

    const tops = f.top_images.map((t) => topImageFigure(f, t));
    const matches = m && matchesPanel(f, m);
    $("#feature").replaceChildren(
      el("h2", {}, `Feature #${f.id}`),
      statsTable(f),
      ...levelLine(f),
      ...explanationsSection(f),
      el("h3", {}, `Top images (${f.top_images.length})`, el("small", {}, " hover an image to hide its heatmap")),
      tops.length ? el("div", { id: "top-images" }, ...tops.map((t) => t.fig))
        : el("p", { class: "hint" }, "This feature never fired: no images."),
      ...(matches ? [matches.section] : []),
      ...(f.bands.length ? [el("h3", {}, "Activation bands"), ...f.bands.map(bandSection)] : []),
    );
    await Promise.all([...tops.map((t) => t.loaded), ...(matches ? [matches.loaded] : [])]);
    if (seq !== state.seq) return;
    showError(null);
    document.body.dataset.rendered = `feature-${f.id}`;
  } catch (err) {
    if (seq === state.seq) showError(err);
  }
}

// ---- wiring -----------------------------------------------------------------------------------

function onHash() {
  const params = hashParams();
  if (steerRoute(params)) return;
  const mode = params.get("atlas") === "pca" ? "pca" : "umap";
  if (mode !== state.atlasMode) {
    state.atlasMode = mode;
    drawAtlas();
  }
  const id = params.get("feature");
  if (id !== null && Number(id) !== state.featureId) showFeature(Number(id));
}

// Links of older versions carried the token in the fragment: it is taken out of the address (and not used).
function dropTokenFromURL() {
  const hash = location.hash.slice(1), steer = hash.startsWith("steer");
  const params = new URLSearchParams(steer ? hash.slice(hash.indexOf("?") + 1) : hash);
  if (!params.has("token")) return;
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", `${location.pathname}${location.search}#${steer ? `steer?${rest}` : rest}`);
}

async function loadSummary() {
  try {
    const h = await getJSON("/healthz");
    $("#summary").textContent =
      `${h.n_features.toLocaleString()} features · ${h.n_images.toLocaleString()} images · top ${h.k} · ${h.grid[0]}×${h.grid[1]} patches`;
  } catch (_) { /* the summary is decoration */ }
}

function init() {
  $("#sort").addEventListener("change", resetAndLoadList);
  $("#min-log").addEventListener("change", resetAndLoadList);
  $("#max-log").addEventListener("change", resetAndLoadList);
  $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); resetAndLoadList(); });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); loadList(); });
  $("#next").addEventListener("click", () => { state.offset += state.limit; loadList(); });
  for (const b of document.querySelectorAll("#atlas-modes button")) {
    b.addEventListener("click", () => setAtlasMode(b.dataset.mode));
  }
  const map = $("#atlas-map");
  map.addEventListener("click", (ev) => {
    const id = atlasPointAt(ev.offsetX, ev.offsetY);
    if (id !== null) openFeature(id);
  });
  map.addEventListener("mousemove", (ev) => atlasTip(atlasPointAt(ev.offsetX, ev.offsetY), ev.offsetX, ev.offsetY));
  map.addEventListener("mouseleave", () => atlasTip(null));
  $("#search").addEventListener("submit", (ev) => { ev.preventDefault(); search($("#search-q").value); });
  $("#search-q").addEventListener("input", (ev) => { if (!ev.target.value.trim() && state.q) search(""); });
  $("#auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("#auth-token");
    useToken(input.value.trim());
    input.value = "";
  });
  window.addEventListener("hashchange", onHash);
  window.addEventListener("resize", () => { drawHistogram(); drawAtlas(); });
  dropTokenFromURL();
  state.token = sessionStorage.getItem(TOKEN_KEY);
  state.atlasMode = hashParams().get("atlas") === "pca" ? "pca" : "umap";
  loadSummary();
  loadList();
  loadHistogram();
  loadAtlas();
  onHash();
}

init();
