// Feature browser: plain JS over the services.api JSON endpoints (see services/api/routes/).
// The URL fragment carries the state that a link should keep: #feature=ID&token=SECRET.
"use strict";

const HEAT_RGB = [255, 40, 0];   // heatmap colour, painted with alpha = HEAT_MAX_ALPHA * value / max_act
const HEAT_MAX_ALPHA = 0.8;
const TOP_SIZE = 224;            // px of the top-image thumbnails (the heatmap grid covers them exactly)
const BAND_SIZE = 96;            // px of the band example thumbnails

const $ = (sel) => document.querySelector(sel);
const state = { token: null, featureId: null, feature: null, hist: null, offset: 0, limit: 50, total: 0, seq: 0, blobs: [] };

// ---- talking to the API ---------------------------------------------------------------------

function hashParams() {
  return new URLSearchParams(location.hash.slice(1));
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function request(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail ?? detail; } catch (_) { /* not JSON */ }
    throw new Error(`${resp.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)} (${path})`);
  }
  return resp;
}

const getJSON = async (path) => (await request(path)).json();

// Images go through fetch so that the bearer token is sent; the <img> shows a blob URL.
async function loadImage(img, id, size) {
  const blob = await (await request(`/images/${id}?size=${size}`)).blob();
  const url = URL.createObjectURL(blob);
  state.blobs.push(url);
  img.src = url;
  await img.decode();
}

function showError(err) {
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

function listQuery() {
  const q = new URLSearchParams({ sort: $("#sort").value, offset: state.offset, limit: state.limit });
  const lo = $("#min-log").value, hi = $("#max-log").value;
  if (lo !== "") q.set("min_freq", Math.min(1, 10 ** Number(lo)));
  if (hi !== "") q.set("max_freq", Math.min(1, 10 ** Number(hi)));
  return q;
}

async function loadList() {
  try {
    const page = await getJSON(`/features?${listQuery()}`);
    state.total = page.total;
    const rows = page.features.map((f) => {
      const row = el("tr", { dataset: { id: f.id } },
        el("td", {}, `#${f.id}`), el("td", {}, log10(f.freq_patches)), el("td", {}, num(f.max_act)));
      row.addEventListener("click", () => openFeature(f.id));
      return row;
    });
    $("#feature-list tbody").replaceChildren(...rows);
    const last = Math.min(page.total, state.offset + page.features.length);
    $("#page-info").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "no features";
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

// ---- density histogram ------------------------------------------------------------------------

function drawHistogram() {
  const canvas = $("#histogram"), hist = state.hist;
  if (!hist) return;
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, W, H);

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

function topImageFigure(f, top) {
  const img = el("img", { alt: `image ${top.image}`, width: TOP_SIZE, height: TOP_SIZE });
  const canvas = el("canvas", { class: "heatmap" });
  drawHeatmap(canvas, top.heatmap, f.grid, f.max_act);
  const caption = el("figcaption", {}, el("b", {}, num(top.value)), " ",
    top.class_name ?? `label ${top.label}`);
  const fig = el("figure", { class: "top-image", dataset: { image: top.image } },
    el("div", { class: "overlay" }, img, canvas), caption);
  return { fig, loaded: loadImage(img, top.image, TOP_SIZE) };
}

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

async function showFeature(id) {
  const seq = ++state.seq;
  state.featureId = id;
  markSelectedRow();
  delete document.body.dataset.rendered;
  try {
    const f = await getJSON(`/features/${id}`);
    if (seq !== state.seq) return;            // another feature was picked meanwhile
    state.blobs.forEach((url) => URL.revokeObjectURL(url));
    state.blobs = [];
    state.feature = f;
    drawHistogram();

    const tops = f.top_images.map((t) => topImageFigure(f, t));
    $("#feature").replaceChildren(
      el("h2", {}, `Feature #${f.id}`),
      statsTable(f),
      el("h3", {}, `Top images (${f.top_images.length})`, el("small", {}, " hover an image to hide its heatmap")),
      tops.length ? el("div", { id: "top-images" }, ...tops.map((t) => t.fig))
        : el("p", { class: "hint" }, "This feature never fired: no images."),
      ...(f.bands.length ? [el("h3", {}, "Activation bands"), ...f.bands.map(bandSection)] : []),
    );
    await Promise.all(tops.map((t) => t.loaded));
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
  const token = params.get("token");
  if (token !== state.token) {
    state.token = token;
    loadList();
    loadHistogram();
  }
  const id = params.get("feature");
  if (id !== null && Number(id) !== state.featureId) showFeature(Number(id));
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
  window.addEventListener("hashchange", onHash);
  window.addEventListener("resize", drawHistogram);
  state.token = hashParams().get("token");
  loadSummary();
  loadList();
  loadHistogram();
  onHash();
}

init();
