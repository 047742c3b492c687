// flux-ir explorer: the page's code (no libraries; everything it loads comes from its own server).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  history: [],      // [{kind, path}] visited views, for back (undo) and forward (redo)
  index: -1,
  view: null,       // the sweep or capture shown (the server's JSON)
  picks: [],        // points clicked for a path (indices)
  poll: null,       // timer of a running zoom
  cell: 96,
  sort: { key: "depth", dir: 1 },
  metrics: null,
};

// -- helpers -----------------------------------------------------------------------------------
function fmt(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Number(v.toPrecision(digits)).toString();
}

async function api(url, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const res = await fetch(url, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

function status(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "text") node.textContent = v;
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

// viridis, sampled at 9 stops
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
function colour(t) {
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
  const f = t - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + f * (VIRIDIS[i + 1][k] - a)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// -- navigation and history --------------------------------------------------------------------
function saveHistory() {
  sessionStorage.setItem("flux-ir-history", JSON.stringify({ h: state.history, i: state.index }));
}

function updateNav() {
  $("back").disabled = state.index <= 0;
  $("forward").disabled = state.index >= state.history.length - 1;
  const v = state.view;
  $("up").disabled = !(v && v.kind === "sweep" && v.parent !== null && v.parent !== undefined);
}

async function open(kind, path, push = true) {
  if (push) {
    const cur = state.history[state.index];
    if (!cur || cur.kind !== kind || cur.path !== path) {
      state.history = state.history.slice(0, state.index + 1);
      state.history.push({ kind, path });
      state.index = state.history.length - 1;
    }
  }
  saveHistory();
  state.hash = `#${kind}=${encodeURIComponent(path)}`;
  if (location.hash !== state.hash) location.hash = state.hash;
  try {
    if (kind === "sweep") await showSweep(path);
    else await showCapture(path);
    status("");
  } catch (err) {
    status(err.message, true);
  }
  updateNav();
  markCurrentEntry();
}

function back() {
  if (state.index <= 0) return;
  state.index -= 1;
  const h = state.history[state.index];
  open(h.kind, h.path, false);
}

function forward() {
  if (state.index >= state.history.length - 1) return;
  state.index += 1;
  const h = state.history[state.index];
  open(h.kind, h.path, false);
}

// -- the list of sweeps and runs ---------------------------------------------------------------
async function loadEntries() {
  const data = await api("/api/entries");
  const list = $("entries");
  list.replaceChildren();
  for (const e of data.entries) {
    const sub = e.kind === "sweep"
      ? `${e.grid ? e.grid.join("×") : "?"} · α ${fmt(e.alpha && e.alpha[0])}…${fmt(e.alpha && e.alpha[1])}, β ${fmt(e.beta && e.beta[0])}…${fmt(e.beta && e.beta[1])}`
      : `${e.model || ""} · ${e.steps || "?"} steps`;
    const li = el("li", { dataset: { kind: e.kind, path: e.path } }, [
      el("span", { className: "kind", text: e.kind }),
      el("span", { text: e.path || data.root }),
      el("span", { className: "sub", text: sub }),
    ]);
    if (e.parent !== null && e.parent !== undefined) li.classList.add("nested");
    li.addEventListener("click", () => open(e.kind, e.path));
    list.append(li);
  }
  markCurrentEntry();
  return data.entries;
}

function markCurrentEntry() {
  const v = state.view;
  for (const li of $("entries").children) {
    li.classList.toggle("current", !!v && li.dataset.path === v.path && li.dataset.kind === v.kind);
  }
}

// -- sweeps ------------------------------------------------------------------------------------
function showOnly(which) {
  $("empty").hidden = true;
  $("sweep-view").hidden = which !== "sweep";
  $("capture-view").hidden = which !== "capture";
}

async function showSweep(path) {
  const v = await api(`/api/sweep?path=${encodeURIComponent(path)}`);
  stopPolling();
  state.view = v;
  state.picks = [];
  showOnly("sweep");
  $("where").textContent = `${v.path || "."} — ${v.model}, “${v.prompt}”`;
  const g = v.grid;
  $("zoom-n").value = Math.min(16, Math.max(2, g.n_alpha));
  $("range-a0").value = fmt(g.alpha[0], 6); $("range-a1").value = fmt(g.alpha[1], 6);
  $("range-b0").value = fmt(g.beta[0], 6); $("range-b1").value = fmt(g.beta[1], 6);
  $("sweep-info").textContent = `${g.n_alpha}×${g.n_beta} points, α ${fmt(g.alpha[0])} to ${fmt(g.alpha[1])}, ` +
    `β ${fmt(g.beta[0])} to ${fmt(g.beta[1])}, ${g.normalisation} normalisation, ${v.num_steps} steps; ` +
    `${v.done} of ${v.points.length} images` + (v.parent !== null ? `; zoomed from ${v.parent}` : "");
  const children = $("children");
  children.replaceChildren();
  for (const c of v.children) {
    const li = el("li", { text: `zoom: α ${fmt(c.alpha[0])}…${fmt(c.alpha[1])}, β ${fmt(c.beta[0])}…${fmt(c.beta[1])} (${c.path})` });
    li.addEventListener("click", () => open("sweep", c.path));
    children.append(li);
  }
  fillOverlays(v);
  buildGrid(v);
  $("path-panel").hidden = true;
  $("path-line").replaceChildren();
  if (v.job && !["done", "error"].includes(v.job.state)) startPolling(v.job.id, v.path);
  else $("progress").hidden = true;
}

function fillOverlays(v) {
  const select = $("overlay");
  const previous = state.overlayChoice;  // what the user chose last (undefined: never chose)
  select.replaceChildren(el("option", { value: "", text: "none" }));
  for (const [name, o] of Object.entries(v.overlays)) {
    select.append(el("option", { value: `${name}|field`, text: `Lipschitz field (${o.embedder})` }));
    if (o.phases) {
      select.append(el("option", {
        value: `${name}|phases`, text: `phase map per step (${o.embedder}, ${o.space || "latent"})`,
      }));
    }
  }
  for (const [name, f] of Object.entries(v.fisher || {})) {
    select.append(el("option", { value: `${name}|fisher`, text: `Fisher det g (${f.embedder}, log₁₀)` }));
  }
  const kind = (value) => (value ? value.split("|")[1] : "");
  const same = [...select.options].find((o) => o.value === previous) ||
    [...select.options].find((o) => previous !== undefined && kind(o.value) === kind(previous));
  if (same) select.value = same.value;
  else if (select.options.length > 1) select.value = select.options[1].value;
  const stepped = v.step_images || Object.values(v.overlays).some((o) => o.phases);
  $("step-control").hidden = !stepped;
  $("step-images-control").hidden = !v.step_images;
  $("geodesics-control").hidden = !Object.values(v.fisher || {}).some((f) => f.geodesics.length);
  const step = $("step");
  step.max = Math.max(0, v.num_steps - 1);
  if (Number(step.value) > v.num_steps - 1) step.value = v.num_steps - 1;
  $("step-value").textContent = `${step.value} of ${v.num_steps - 1}`;
}

function overlayValues() {
  const v = state.view;
  const choice = $("overlay").value;
  if (!v || !choice) return null;
  const [name, which] = choice.split("|");
  if (which === "fisher") return v.fisher && v.fisher[name] ? v.fisher[name].field : null;
  const o = v.overlays[name];
  if (!o) return null;
  if (which === "phases") return o.phases ? o.phases[Number($("step").value)] || null : null;
  return o.field;
}

// -- the Fisher metric's geodesics -------------------------------------------------------------
const GEODESIC_COLOURS = ["#e11d48", "#f59e0b", "#06b6d4", "#a855f7", "#22c55e", "#f97316", "#ec4899", "#3b82f6"];

function fisherChoice() {
  // the geometry file of the chosen Fisher overlay, else the first (the server sorts them by name)
  const v = state.view;
  const names = Object.keys((v && v.fisher) || {});
  const [name, which] = $("overlay").value.split("|");
  if (which === "fisher" && names.includes(name)) return name;
  return names.length ? names[0] : null;
}

function toXY(alpha, beta) {
  // (alpha, beta) -> grid pixels: the inverse of toAlphaBeta (cell centres sit on the grid values)
  const v = state.view;
  const c = state.cell;
  const db = axisStep(v.betas, v.grid.beta);
  const da = axisStep(v.alphas, v.grid.alpha);
  return [((beta - v.betas[0]) / db + 0.5) * c, ((v.alphas[v.alphas.length - 1] - alpha) / da + 0.5) * c];
}

function svgPath(points, className, colour, title) {
  const d = points.filter((p) => p && p[0] !== null && p[1] !== null)
    .map((p, k) => { const [x, y] = toXY(p[0], p[1]); return `${k ? "L" : "M"}${x.toFixed(2)},${y.toFixed(2)}`; })
    .join(" ");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", d);
  path.setAttribute("class", className);
  path.setAttribute("stroke", colour);
  const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
  t.textContent = title;
  path.append(t);
  return path;
}

function geodesicText(g) {
  const ab = (p) => (p ? `(α ${fmt(p[0], 3)}, β ${fmt(p[1], 3)})` : "?");
  const ends = g.start ? [g.start, g.end] : [g.points[0], g.points[g.points.length - 1]];
  let text = `${g.index}: ${ab(ends[0])} → ${ab(ends[1])}`;
  if (g.length !== undefined && g.length !== null) text += `; metric length ${fmt(g.length, 3)}`;
  if (g.line_length !== undefined && g.line_length !== null) text += `, straight line ${fmt(g.line_length, 3)}`;
  if (g.deviation !== undefined && g.deviation !== null) text += `; deviation ${fmt(g.deviation, 3)} (box sides = 1)`;
  return text;
}

function drawGeodesics() {
  const svg = $("geodesic-layer");
  const legend = $("geodesic-legend");
  svg.replaceChildren();
  legend.replaceChildren();
  const v = state.view;
  const name = fisherChoice();
  const f = name ? v.fisher[name] : null;
  const on = $("geodesics").checked && !!f && f.geodesics.length > 0;
  $("geodesic-panel").hidden = !on;
  if (!on) return;
  $("geodesic-source").textContent = `(${f.embedder}; solid: geodesic, dashed: straight line)`;
  f.geodesics.forEach((g, k) => {
    const colour = GEODESIC_COLOURS[k % GEODESIC_COLOURS.length];
    const text = geodesicText(g);
    if (g.line) svg.append(svgPath(g.line, "line", colour, `straight line ${text}`));
    svg.append(svgPath(g.curve || g.points, "geodesic", colour, `geodesic ${text}`));
    for (const p of g.points) {
      if (!p || p[0] === null || p[1] === null) continue;
      const [x, y] = toXY(p[0], p[1]);
      const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
      dot.setAttribute("cx", x.toFixed(2)); dot.setAttribute("cy", y.toFixed(2));
      dot.setAttribute("r", 3); dot.setAttribute("fill", colour);
      svg.append(dot);
    }
    const swatch = el("span", { className: "swatch" });
    swatch.style.borderTopColor = colour;
    legend.append(el("li", { title: text, dataset: { index: g.index } }, [swatch, el("span", { text })]));
  });
}

function buildGrid(v) {
  const g = v.grid;
  const grid = $("grid");
  for (const c of [...grid.querySelectorAll(".cell")]) c.remove();
  const cell = Math.max(24, Math.min(128, Math.floor(560 / Math.max(g.n_alpha, g.n_beta))));
  state.cell = cell;
  grid.style.width = `${g.n_beta * cell}px`;
  grid.style.height = `${g.n_alpha * cell}px`;
  for (const p of v.points) {
    const div = el("div", { className: "cell", dataset: { index: p.index, row: p.row, col: p.col } });
    div.style.left = `${p.col * cell}px`;
    div.style.top = `${(g.n_alpha - 1 - p.row) * cell}px`;
    div.style.width = `${cell}px`;
    div.style.height = `${cell}px`;
    div.append(el("div", { className: "heat" }));
    grid.append(div);
    setCellImage(div, p);
    div.addEventListener("mouseenter", () => inspect(p.index));
    div.addEventListener("mouseleave", () => div.classList.remove("hover"));
  }
  const alphaAxis = $("alpha-axis");
  alphaAxis.replaceChildren();
  alphaAxis.style.height = `${g.n_alpha * cell}px`;
  alphaAxis.style.width = "48px";
  const every = Math.ceil(Math.max(g.n_alpha, g.n_beta) / 10);
  v.alphas.forEach((a, r) => {
    if (r % every && r !== v.alphas.length - 1) return;
    const s = el("span", { text: fmt(a, 3) });
    s.style.top = `${(g.n_alpha - 1 - r + 0.5) * cell}px`;
    alphaAxis.append(s);
  });
  const betaAxis = $("beta-axis");
  betaAxis.replaceChildren();
  betaAxis.style.width = `${g.n_beta * cell}px`;
  v.betas.forEach((b, c) => {
    if (c % every && c !== v.betas.length - 1) return;
    const s = el("span", { text: fmt(b, 3) });
    s.style.left = `${(c + 0.5) * cell}px`;
    betaAxis.append(s);
  });
  paintOverlay();
  drawGeodesics();
}

function pointImage(p) {
  if (p.steps && $("step-images").checked) return p.steps[Number($("step").value)];
  return p.image;
}

function setCellImage(div, p) {
  const src = p.done ? pointImage(p) : null;
  let img = div.querySelector("img");
  div.classList.toggle("pending", !p.done);
  div.classList.toggle("done", p.done);
  if (!src) { if (img) img.remove(); return; }
  if (!img) {
    img = el("img", { className: "point", draggable: false, alt: `α ${fmt(p.alpha)}, β ${fmt(p.beta)}` });
    div.prepend(img);
  }
  if (img.getAttribute("src") !== src) img.src = src;
}

function paintOverlay() {
  const values = overlayValues();
  const opacity = $("opacity").value;
  let lo = Infinity; let hi = -Infinity;
  if (values) {
    for (const row of values) for (const x of row) if (x !== null) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
  }
  for (const div of $("grid").querySelectorAll(".cell")) {
    const heat = div.querySelector(".heat");
    const x = values ? values[Number(div.dataset.row)][Number(div.dataset.col)] : null;
    if (x === null || x === undefined || !Number.isFinite(lo)) { heat.style.background = "none"; continue; }
    heat.style.background = colour(hi > lo ? (x - lo) / (hi - lo) : 0.5);
    heat.style.opacity = opacity;
  }
  const legend = $("legend");
  legend.hidden = !values || !Number.isFinite(lo);
  $("legend-label").textContent = $("overlay").value.endsWith("|fisher") ? "log₁₀ det g" : "";
  if (!legend.hidden) {
    $("legend-lo").textContent = fmt(lo, 3);
    $("legend-hi").textContent = fmt(hi, 3);
    $("legend-bar").style.background =
      `linear-gradient(to right, ${[0, 0.25, 0.5, 0.75, 1].map(colour).join(", ")})`;
  }
}

function inspect(index) {
  const v = state.view;
  const p = v.points[index];
  for (const c of $("grid").querySelectorAll(".cell.hover")) c.classList.remove("hover");
  const div = $("grid").querySelector(`.cell[data-index="${index}"]`);
  if (div) div.classList.add("hover");
  const src = p.done ? pointImage(p) : null;
  const img = $("inspect-img");
  img.hidden = !src;
  if (src) img.src = src; else img.removeAttribute("src");
  $("inspect-index").textContent = `${p.index} (row ${p.row}, col ${p.col})${p.done ? "" : " — not generated yet"}`;
  $("inspect-alpha").textContent = fmt(p.alpha, 6);
  $("inspect-beta").textContent = fmt(p.beta, 6);
  $("inspect-norm-before").textContent = fmt(p.norm_before, 6);
  $("inspect-norm-after").textContent = fmt(p.norm_after, 6);
  const values = overlayValues();
  $("inspect-value").textContent = values ? fmt(values[p.row][p.col]) : "";
}

// grid pixels <-> (alpha, beta): cell centres sit on the grid values
function axisStep(values, range) {
  return values.length > 1 ? (values[values.length - 1] - values[0]) / (values.length - 1) : (range[1] - range[0]) || 1;
}

function snap(x, step) {
  const q = Math.abs(step) / 20;
  return Number((Math.round(x / q) * q).toPrecision(10));
}

function toAlphaBeta(x, y) {
  const v = state.view;
  const c = state.cell;
  const db = axisStep(v.betas, v.grid.beta);
  const da = axisStep(v.alphas, v.grid.alpha);
  const beta = v.betas[0] + (x / c - 0.5) * db;
  const alpha = v.alphas[v.alphas.length - 1] - (y / c - 0.5) * da;
  return { alpha: snap(alpha, da), beta: snap(beta, db) };
}

function gridPoint(ev) {
  const r = $("grid").getBoundingClientRect();
  return {
    x: Math.min(Math.max(ev.clientX - r.left, 0), r.width),
    y: Math.min(Math.max(ev.clientY - r.top, 0), r.height),
  };
}

function setupGridMouse() {
  const grid = $("grid");
  const sel = $("selection");
  let start = null;
  grid.addEventListener("dragstart", (ev) => ev.preventDefault());
  grid.addEventListener("mousedown", (ev) => {
    if (ev.button !== 0 || !state.view) return;
    start = gridPoint(ev);
    ev.preventDefault();
  });
  window.addEventListener("mousemove", (ev) => {
    if (!start) return;
    const p = gridPoint(ev);
    sel.hidden = false;
    sel.style.left = `${Math.min(start.x, p.x)}px`;
    sel.style.top = `${Math.min(start.y, p.y)}px`;
    sel.style.width = `${Math.abs(p.x - start.x)}px`;
    sel.style.height = `${Math.abs(p.y - start.y)}px`;
  });
  window.addEventListener("mouseup", (ev) => {
    if (!start) return;
    const p = gridPoint(ev);
    const s = start;
    start = null;
    sel.hidden = true;
    if (Math.abs(p.x - s.x) < 6 && Math.abs(p.y - s.y) < 6) {
      const div = ev.target.closest && ev.target.closest(".cell");
      if (div) pick(Number(div.dataset.index));
      return;
    }
    const a = toAlphaBeta(Math.min(s.x, p.x), Math.max(s.y, p.y));  // lower-left corner
    const b = toAlphaBeta(Math.max(s.x, p.x), Math.min(s.y, p.y));  // upper-right corner
    zoom([a.alpha, b.alpha], [a.beta, b.beta]);
  });
}

async function zoom(alpha, beta) {
  const v = state.view;
  if (!v || v.kind !== "sweep") return;
  const n = Number($("zoom-n").value) || 4;
  if (!(alpha[0] < alpha[1]) || (!v.grid.path && !(beta[0] < beta[1]))) {
    status("the rectangle is too thin: drag over a larger area", true);
    return;
  }
  status(`zooming into α ${fmt(alpha[0])}…${fmt(alpha[1])}, β ${fmt(beta[0])}…${fmt(beta[1])} …`);
  try {
    const job = await api("/api/zoom", { sweep: v.path, alpha, beta, n_alpha: n, n_beta: n });
    await loadEntries();
    await open("sweep", job.sweep);  // shows the pending sweep and follows its job
  } catch (err) {
    status(err.message, true);
  }
}

function stopPolling() {
  if (state.poll) clearTimeout(state.poll);
  state.poll = null;
  state.pollGen = (state.pollGen || 0) + 1;  // a tick in flight of an older loop stops
}

function startPolling(jobId, sweepPath) {
  stopPolling();
  const gen = state.pollGen;
  $("progress").hidden = false;
  let seen = -1;
  const tick = async () => {
    let job;
    try { job = await api(`/api/job?id=${jobId}`); } catch (err) { status(err.message, true); return; }
    const v = state.view;
    if (gen !== state.pollGen || !v || v.path !== sweepPath) return;  // navigated away
    $("progress-bar").max = job.total;
    $("progress-bar").value = job.done;
    $("progress-text").textContent = `${job.state}: ${job.done} of ${job.total} images`;
    if (job.done !== seen || job.state === "done") {
      seen = job.done;
      const fresh = await api(`/api/sweep?path=${encodeURIComponent(sweepPath)}`);
      if (gen === state.pollGen && state.view && state.view.path === sweepPath) {
        state.view = fresh;
        for (const p of fresh.points) {
          const div = $("grid").querySelector(`.cell[data-index="${p.index}"]`);
          if (div) setCellImage(div, p);
        }
      }
    }
    if (job.state === "error") {
      status(`zoom failed: ${job.error}`, true);
      $("progress").hidden = true;
      return;
    }
    if (job.state === "done") {
      const t = job.timings;
      status(`zoom ${job.total} points in ${fmt(t.total_s, 3)} s (model load ${fmt(t.load_s || 0, 2)} s, ` +
        `generation ${fmt(t.generate_s || 0, 3)} s, analysis ${fmt(t.analyse_s || 0, 2)} s)`);
      $("progress").hidden = true;
      await showSweep(sweepPath);  // the analysis is there now: overlays, norms
      loadEntries();
      return;
    }
    if (gen === state.pollGen) state.poll = setTimeout(tick, 400);
  };
  tick();
}

// -- paths between two points ------------------------------------------------------------------
function clearPath() {
  state.picks = [];
  for (const c of $("grid").querySelectorAll(".cell.picked, .cell.on-path")) c.classList.remove("picked", "on-path");
  $("path-panel").hidden = true;
  $("path-line").replaceChildren();
}

function pick(index) {
  if (state.picks.length >= 2) state.picks = [];
  state.picks.push(index);
  for (const c of $("grid").querySelectorAll(".cell.picked, .cell.on-path")) c.classList.remove("picked", "on-path");
  for (const i of state.picks) {
    const div = $("grid").querySelector(`.cell[data-index="${i}"]`);
    if (div) div.classList.add("picked");
  }
  if (state.picks.length === 2) showPath(state.picks[0], state.picks[1]);
  else { $("path-panel").hidden = true; $("path-line").replaceChildren(); }
}

function showPath(i, j) {
  const v = state.view;
  const a = v.points[i]; const b = v.points[j];
  const n = Math.max(Math.abs(b.row - a.row), Math.abs(b.col - a.col));
  const cells = [];
  for (let k = 0; k <= n; k++) {
    const t = n ? k / n : 0;
    const row = Math.round(a.row + t * (b.row - a.row));
    const col = Math.round(a.col + t * (b.col - a.col));
    const p = v.points[row * v.grid.n_beta + col];
    if (!cells.length || cells[cells.length - 1] !== p) cells.push(p);
  }
  const values = overlayValues();
  const strip = $("path-strip");
  strip.replaceChildren();
  for (const p of cells) {
    const div = $("grid").querySelector(`.cell[data-index="${p.index}"]`);
    if (div) div.classList.add("on-path");
    const img = el("img", { alt: `point ${p.index}` });
    if (p.done) img.src = pointImage(p);
    const extra = values ? ` · ${fmt(values[p.row][p.col], 3)}` : "";
    strip.append(el("figure", {}, [img, el("figcaption", { text: `α ${fmt(p.alpha, 3)}, β ${fmt(p.beta, 3)}${extra}` })]));
  }
  $("path-summary").textContent = `from (α ${fmt(a.alpha)}, β ${fmt(a.beta)}) to (α ${fmt(b.alpha)}, β ${fmt(b.beta)}), ${cells.length} points`;
  $("path-panel").hidden = false;
  const c = state.cell;
  const svg = $("path-line");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "line");
  const g = v.grid;
  line.setAttribute("x1", (a.col + 0.5) * c); line.setAttribute("y1", (g.n_alpha - 1 - a.row + 0.5) * c);
  line.setAttribute("x2", (b.col + 0.5) * c); line.setAttribute("y2", (g.n_alpha - 1 - b.row + 0.5) * c);
  svg.replaceChildren(line);
}

// -- captures ----------------------------------------------------------------------------------
async function showCapture(path) {
  const v = await api(`/api/capture?path=${encodeURIComponent(path)}`);
  stopPolling();
  state.view = v;
  showOnly("capture");
  $("where").textContent = `${v.path || "."} — ${v.model}, “${v.prompt}”`;
  if (v.images.length) $("final-image").src = v.images[0]; else $("final-image").removeAttribute("src");
  $("capture-info").textContent = `${v.model}, ${v.size[0]}×${v.size[1]}, seed ${v.seed}, ${v.num_steps} steps ` +
    `(captured ${v.steps.length}), ${v.blocks.length} blocks`;
  $("block").max = Math.max(0, v.blocks.length - 1);
  $("block").value = Math.min(Number($("block").value), v.blocks.length - 1);
  $("cstep").max = Math.max(0, v.steps.length - 1);
  $("cstep").value = Math.min(Number($("cstep").value), v.steps.length - 1);
  const heat = $("heatmaps");
  heat.replaceChildren(...v.heatmaps.map((src) => el("img", { src, alt: "metric heatmap" })));
  updateLens();
  loadMetrics(v);
}

function lensChoice() {
  const v = state.view;
  const block = v.blocks[Number($("block").value)];
  const step = v.steps[Number($("cstep").value)];
  const target = document.querySelector("input[name=target]:checked").value;
  return { block, step, target };
}

function updateLens() {
  const v = state.view;
  if (!v || v.kind !== "capture" || !v.blocks.length) return;
  const { block, step, target } = lensChoice();
  $("block-value").textContent = `${block.name} (${Number($("block").value) + 1} of ${v.blocks.length})`;
  $("cstep-value").textContent = `${step} of ${v.num_steps - 1}`;
  if (!v.lens_available) {
    $("lens-status").textContent = "this capture lacks image tokens: no lens decode";
    return;
  }
  const url = `/api/lens?path=${encodeURIComponent(v.path)}&kind=${block.kind}&index=${block.index}` +
    `&step=${step}&target=${target}`;
  const img = $("lens-img");
  $("lens-status").textContent = `decoding ${block.name}, step ${step} (${target}) …`;
  img.onload = () => { $("lens-status").textContent = `${block.name}, step ${step}, lens ${target}`; };
  img.onerror = async () => {
    try { await api(url); } catch (err) { $("lens-status").textContent = err.message; }
  };
  img.src = url;
  highlightMetricRow();
}

async function loadMetrics(v) {
  $("metrics-status").textContent = "computing the metrics …";
  state.metrics = null;
  renderMetrics();
  try {
    const data = await api(`/api/metrics?path=${encodeURIComponent(v.path)}`);
    if (state.view !== v) return;
    state.metrics = data;
    $("metrics-status").textContent = `${data.rows.length} rows (saved as intermediates/block_metrics.csv)`;
    renderMetrics();
  } catch (err) {
    $("metrics-status").textContent = err.message;
  }
}

const METRIC_COLUMNS = ["name", "step", "stream", "norm", "cosine_to_last", "lens_distance", "clip_to_prompt", "depth"];

function renderMetrics() {
  const table = $("metrics");
  const head = table.tHead;
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!state.metrics) { head.replaceChildren(); return; }
  const cols = METRIC_COLUMNS.filter((c) => state.metrics.columns.includes(c));
  const tr = el("tr");
  for (const c of cols) {
    const th = el("th", { text: c, dataset: { key: c } });
    if (state.sort.key === c) th.classList.add(state.sort.dir > 0 ? "sorted-asc" : "sorted-desc");
    th.addEventListener("click", () => {
      state.sort = { key: c, dir: state.sort.key === c ? -state.sort.dir : 1 };
      renderMetrics();
    });
    tr.append(th);
  }
  head.replaceChildren(tr);
  const stream = $("metrics-stream").value;
  const stepOnly = $("metrics-step-only").checked;
  const step = state.view.steps[Number($("cstep").value)];
  const key = state.sort.key;
  const dir = state.sort.dir;
  const rows = state.metrics.rows
    .filter((r) => (!stream || r.stream === stream) && (!stepOnly || r.step === step))
    .sort((a, b) => {
      const x = a[key]; const y = b[key];
      if (x === y) return a.depth - b.depth || a.step - b.step;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  for (const r of rows) {
    const row = el("tr", { dataset: { kind: r.kind, block: r.block, step: r.step } });
    for (const c of cols) {
      row.append(el("td", { text: fmt(r[c]), className: typeof r[c] === "string" ? "text" : "" }));
    }
    row.addEventListener("click", () => {
      const v = state.view;
      const b = v.blocks.findIndex((x) => x.kind === r.kind && x.index === r.block);
      if (b >= 0) $("block").value = b;
      const s = v.steps.indexOf(r.step);
      if (s >= 0) $("cstep").value = s;
      updateLens();
      renderMetrics();
    });
    body.append(row);
  }
  highlightMetricRow();
}

function highlightMetricRow() {
  const v = state.view;
  if (!v || v.kind !== "capture" || !v.blocks.length) return;
  const { block, step } = lensChoice();
  for (const row of $("metrics").tBodies[0].rows) {
    row.classList.toggle("current", row.dataset.kind === block.kind &&
      Number(row.dataset.block) === block.index && Number(row.dataset.step) === step);
  }
}

// -- wiring ------------------------------------------------------------------------------------
function wire() {
  $("back").addEventListener("click", back);
  $("forward").addEventListener("click", forward);
  $("up").addEventListener("click", () => {
    const v = state.view;
    if (v && v.parent !== null && v.parent !== undefined) open("sweep", v.parent);
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" && ev.target.type !== "range") return;
    const mod = ev.ctrlKey || ev.metaKey;
    if (mod && ev.key.toLowerCase() === "z" && !ev.shiftKey) { ev.preventDefault(); back(); }
    else if (mod && (ev.key.toLowerCase() === "y" || (ev.key.toLowerCase() === "z" && ev.shiftKey))) {
      ev.preventDefault(); forward();
    }
  });
  $("overlay").addEventListener("change", () => {
    state.overlayChoice = $("overlay").value;
    paintOverlay();
    drawGeodesics();
  });
  $("geodesics").addEventListener("change", drawGeodesics);
  $("opacity").addEventListener("input", paintOverlay);
  $("step").addEventListener("input", () => {
    const v = state.view;
    $("step-value").textContent = `${$("step").value} of ${v.num_steps - 1}`;
    paintOverlay();
    if ($("step-images").checked) for (const p of v.points) {
      const div = $("grid").querySelector(`.cell[data-index="${p.index}"]`);
      if (div) setCellImage(div, p);
    }
  });
  $("step-images").addEventListener("change", () => {
    for (const p of state.view.points) {
      const div = $("grid").querySelector(`.cell[data-index="${p.index}"]`);
      if (div) setCellImage(div, p);
    }
  });
  $("analyze").addEventListener("click", async () => {
    const v = state.view;
    status("computing the Lipschitz field …");
    try {
      await api("/api/analyze", { sweep: v.path });
      await showSweep(v.path);
      status("Lipschitz field computed");
    } catch (err) { status(err.message, true); }
  });
  $("range-go").addEventListener("click", () => {
    const a = [Number($("range-a0").value), Number($("range-a1").value)];
    const b = [Number($("range-b0").value), Number($("range-b1").value)];
    zoom(a, b);
  });
  $("zoom-out").addEventListener("click", () => {
    const g = state.view.grid;
    const wider = (r) => { const m = (r[0] + r[1]) / 2; const h = r[1] - r[0]; return [m - h, m + h]; };
    zoom(wider(g.alpha), wider(g.beta));
  });
  $("path-clear").addEventListener("click", clearPath);
  $("block").addEventListener("input", updateLens);
  $("cstep").addEventListener("input", () => { updateLens(); renderMetrics(); });
  for (const r of document.querySelectorAll("input[name=target]")) r.addEventListener("change", updateLens);
  $("metrics-stream").addEventListener("change", renderMetrics);
  $("metrics-step-only").addEventListener("change", renderMetrics);
  setupGridMouse();
}

async function start() {
  wire();
  try {
    const saved = JSON.parse(sessionStorage.getItem("flux-ir-history") || "null");
    if (saved) { state.history = saved.h; state.index = saved.i; }
  } catch (e) { /* a fresh history */ }
  let entries = [];
  try { entries = await loadEntries(); } catch (err) { status(err.message, true); return; }
  const m = location.hash.match(/^#(sweep|capture)=(.*)$/);
  if (m) open(m[1], decodeURIComponent(m[2]));
  else if (entries.length === 1) open(entries[0].kind, entries[0].path);
  updateNav();
  window.addEventListener("hashchange", () => {  // an address typed or the browser's own back
    if (location.hash === state.hash) return;  // set by open() itself
    const h = location.hash.match(/^#(sweep|capture)=(.*)$/);
    if (h) open(h[1], decodeURIComponent(h[2]));
  });
}

document.addEventListener("DOMContentLoaded", start);
