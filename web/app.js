// clipdex web page: search box, result grid, viewer, image search, re-index.
// Plain JavaScript, no build step; talks only to the /api endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 36;
const EXAMPLES = ["a dog running on the beach", "sunset over the sea", "a red flower close-up", "snowy mountains", "an old building", "people at a party"];

const state = {
  text: "",
  upload: null,          // { file, url } of a picture to search by
  similarTo: null,       // { id, thumb } for find-similar
  modifiers: [],         // [{ id, weight, thumb }] from "more / less like this"
  hits: [],
  offset: 0,
  more: false,
  loading: false,
  generation: 0,         // bumps on every new search; stale responses are dropped
  current: -1,           // index of the photo open in the viewer
};

// ---------- API ----------

async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  const type = res.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await res.json() : null;
  if (!res.ok) {
    const message = body && body.error ? body.error.message : `request failed (${res.status})`;
    const err = new Error(message);
    err.status = res.status;
    err.code = body && body.error ? body.error.code : "";
    throw err;
  }
  return body;
}

function filters() {
  const f = {};
  const v = (id) => $(id).value.trim();
  if (v("f-folder")) f.folder = v("f-folder");
  if (v("f-from")) f.from = v("f-from");
  if (v("f-to")) f.to = v("f-to");
  if (v("f-type")) f.type = v("f-type");
  if (v("f-camera")) f.camera = v("f-camera");
  return f;
}

// The query language for the text plus "more / less like this" photos. The
// text goes as typed: plain words are one term, and the syntax
// ("a" + 0.5*image:42 - "b") is there for those who want it.
function queryString() {
  const parts = [];
  if (state.text) parts.push(state.text);
  for (const m of state.modifiers) {
    const w = Math.abs(m.weight);
    parts.push((m.weight < 0 ? "- " : (parts.length ? "+ " : "")) + `${w}*image:${m.id}`);
  }
  return parts.join(" ").replace(/^\+ /, "");
}

function hasQuery() {
  return state.upload || state.similarTo || state.text || state.modifiers.some((m) => m.weight > 0);
}

async function fetchPage(offset) {
  const f = filters();
  const exclude = $("f-exclude").value.trim();
  if (state.upload) {
    const form = new FormData();
    form.append("file", state.upload.file);
    const q = queryString();
    if (q) form.append("q", q);
    form.append("k", PAGE);
    form.append("offset", offset);
    for (const [k, v] of Object.entries(f)) form.append(k, v);
    return api("/api/search/image", { method: "POST", body: form });
  }
  if (state.similarTo && !state.text && !state.modifiers.length) {
    const params = new URLSearchParams({ k: PAGE, offset, ...f });
    return api(`/api/photos/${state.similarTo.id}/similar?${params}`);
  }
  let q = queryString();
  if (state.similarTo) q = `image:${state.similarTo.id}` + (q ? " + " + q : "");
  const params = new URLSearchParams({ q, k: PAGE, offset, ...f });
  if (exclude) params.set("exclude", exclude);
  return api(`/api/search?${params}`);
}

// ---------- Search ----------

async function search() {
  const generation = ++state.generation;
  showError(null);
  renderChips();
  if (!hasQuery()) {
    state.hits = [];
    renderGrid(true);
    $("intro").hidden = false;
    $("summary").hidden = true;
    $("empty").hidden = true;
    return;
  }
  $("intro").hidden = true;
  state.loading = true;
  try {
    const page = await fetchPage(0);
    if (generation !== state.generation) return;
    state.hits = page.hits;
    state.offset = page.hits.length;
    state.more = page.more;
    renderGrid(true);
    $("summary").hidden = false;
    $("summary").textContent = page.hits.length
      ? `${page.more ? "Top results" : page.hits.length + " results"} · ${Math.round(page.took_ms)} ms`
      : "";
    $("empty").hidden = page.hits.length > 0;
  } catch (e) {
    if (generation === state.generation) showError(e.message);
  } finally {
    if (generation === state.generation) state.loading = false;
  }
}

async function loadMore() {
  if (state.loading || !state.more || !hasQuery()) return;
  const generation = state.generation;
  state.loading = true;
  try {
    const page = await fetchPage(state.offset);
    if (generation !== state.generation) return;
    const seen = new Set(state.hits.map((h) => h.id));
    const fresh = page.hits.filter((h) => !seen.has(h.id));
    state.hits.push(...fresh);
    state.offset += page.hits.length;
    state.more = page.more && page.hits.length > 0;
    appendTiles(fresh, state.hits.length - fresh.length);
  } catch (e) {
    showError(e.message);
  } finally {
    state.loading = false;
  }
}

let typingTimer = null;
function onType() {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => {
    const text = $("q").value.trim();
    if (text !== state.text) {
      state.text = text;
      search();
    }
  }, 250);
}

// ---------- Rendering ----------

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function chip(label, thumb, onRemove, negative) {
  const el = document.createElement("span");
  el.className = "chip" + (negative ? " neg" : "");
  if (thumb) {
    const img = document.createElement("img");
    img.src = thumb;
    img.alt = "";
    el.append(img);
  }
  el.append(document.createTextNode(label));
  const x = document.createElement("button");
  x.type = "button";
  x.textContent = "×";
  x.setAttribute("aria-label", "Remove " + label);
  x.onclick = onRemove;
  el.append(x);
  return el;
}

function renderChips() {
  const chips = $("chips");
  chips.replaceChildren();
  if (state.upload) chips.append(chip("picture", state.upload.url, () => { state.upload = null; search(); }));
  if (state.similarTo) chips.append(chip("like", state.similarTo.thumb, () => { state.similarTo = null; search(); }));
  state.modifiers.forEach((m, i) => {
    chips.append(chip(m.weight > 0 ? "more" : "less", m.thumb, () => { state.modifiers.splice(i, 1); search(); }, m.weight < 0));
  });
}

function tile(hit, index) {
  const b = document.createElement("button");
  b.className = "tile";
  b.setAttribute("role", "listitem");
  b.dataset.index = index;
  b.title = hit.path;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.src = hit.thumbnail;
  img.alt = hit.caption || hit.path;
  b.append(img);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.similarity.toFixed(3);
  b.append(score);
  if (hit.keyword_rank) {
    const kw = document.createElement("span");
    kw.className = "kw";
    kw.textContent = "name";
    kw.title = "matched by file name, folder or caption";
    b.append(kw);
  }
  b.onclick = () => openViewer(index);
  return b;
}

function renderGrid(reset) {
  const grid = $("grid");
  if (reset) grid.replaceChildren();
  appendTiles(state.hits, 0);
}

function appendTiles(hits, start) {
  const grid = $("grid");
  const frag = document.createDocumentFragment();
  hits.forEach((h, i) => frag.append(tile(h, start + i)));
  grid.append(frag);
}

function columns() {
  const grid = $("grid");
  const first = grid.children[0];
  if (!first) return 1;
  return Math.max(1, Math.round(grid.clientWidth / first.getBoundingClientRect().width));
}

function focusTile(i) {
  const tiles = $("grid").children;
  if (!tiles.length) return;
  i = Math.max(0, Math.min(tiles.length - 1, i));
  tiles[i].focus();
  tiles[i].scrollIntoView({ block: "nearest" });
}

// ---------- Viewer ----------

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const u = ["KiB", "MiB", "GiB"];
  let v = n, k = -1;
  do { v /= 1024; k++; } while (v >= 1024 && k < u.length - 1);
  return v.toFixed(1) + " " + u[k];
}

async function openViewer(index) {
  const hit = state.hits[index];
  if (!hit) return;
  state.current = index;
  const v = $("viewer");
  $("v-img").src = hit.thumbnail;
  $("v-img").alt = hit.caption || hit.path;
  $("v-title").textContent = hit.path;
  $("v-meta").replaceChildren();
  $("v-original").href = `/api/photos/${hit.id}/original`;
  $("v-prev").disabled = index === 0;
  $("v-next").disabled = index >= state.hits.length - 1;
  if (!v.open) v.showModal();
  const full = new Image();
  full.onload = () => { if (state.current === index) $("v-img").src = full.src; };
  full.src = `/api/photos/${hit.id}/original`;
  try {
    const p = await api(`/api/photos/${hit.id}`);
    if (state.current !== index) return;
    const rows = [
      ["Caption", p.caption],
      ["Taken", p.taken ? p.taken.replace("T", " ") : null],
      ["Camera", [p.camera_make, p.camera_model].filter(Boolean).join(" ") || null],
      ["Size", `${p.width} × ${p.height} · ${p.format.toUpperCase()} · ${fmtBytes(p.size)}`],
      ["Similarity", hit.similarity.toFixed(4)],
      ["Id", String(p.id)],
    ];
    const dl = $("v-meta");
    for (const [k, val] of rows) {
      if (!val) continue;
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = val;
      dl.append(dt, dd);
    }
  } catch (e) {
    showError(e.message);
  }
}

function closeViewer() {
  const v = $("viewer");
  if (v.open) v.close();
  focusTile(state.current);
}

function viewerAction(kind) {
  const hit = state.hits[state.current];
  if (!hit) return;
  $("viewer").close();
  if (kind === "similar") {
    state.similarTo = { id: hit.id, thumb: hit.thumbnail };
    state.modifiers = [];
    state.upload = null;
    state.text = "";
    $("q").value = "";
  } else {
    state.modifiers = state.modifiers.filter((m) => m.id !== hit.id);
    state.modifiers.push({ id: hit.id, weight: kind === "more" ? 0.5 : -0.5, thumb: hit.thumbnail });
  }
  window.scrollTo({ top: 0 });
  search();
}

// ---------- Image search (button, drop, paste) ----------

function searchByImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image.");
    return;
  }
  if (state.upload) URL.revokeObjectURL(state.upload.url);
  state.upload = { file, url: URL.createObjectURL(file) };
  state.similarTo = null;
  search();
}

// ---------- Status and re-index ----------

let lastStatus = null;

function describeProgress(p) {
  if (!p) return "";
  if (p.phase === "scanning") return "Scanning the library…";
  if (p.phase === "finishing") return "Saving the index…";
  const rate = p.elapsed_seconds > 0 ? p.processed / p.elapsed_seconds : 0;
  const left = rate > 0 ? Math.round((p.to_process - p.processed) / rate) : null;
  const eta = left === null ? "" : left > 90 ? ` · about ${Math.round(left / 60)} min left` : ` · ${left} s left`;
  return `Indexing ${p.processed.toLocaleString()} / ${p.to_process.toLocaleString()} · ${rate.toFixed(1)} files/s${eta}`;
}

function showProgress(p) {
  const running = !!p && p.phase !== "done";
  $("progress").hidden = !running || p.phase !== "indexing";
  if (running && p.to_process > 0) $("progress-bar").style.width = `${(100 * p.processed) / p.to_process}%`;
  $("reindex").disabled = running;
  if (running) $("status-text").textContent = describeProgress(p);
}

function showStatus(s) {
  lastStatus = s;
  const ready = s.state === "ready";
  $("reindex").hidden = !ready;
  if (s.state === "failed") {
    $("status-text").textContent = "Not available";
    showError(s.message || "The server could not start.");
    return;
  }
  if (!ready) {
    $("status-text").textContent = s.message ? s.message.charAt(0).toUpperCase() + s.message.slice(1) + "…" : "Starting…";
    return;
  }
  if (s.reindex.running && s.reindex.progress) {
    showProgress(s.reindex.progress);
  } else {
    $("progress").hidden = true;
    $("reindex").disabled = false;
    $("status-text").textContent = `${s.photos.toLocaleString()} photos · ${s.model}`;
  }
}

async function refreshStatus() {
  try {
    const s = await api("/api/status");
    showStatus(s);
    if (s.state !== "ready" && s.state !== "failed") setTimeout(refreshStatus, 1500);
  } catch (e) {
    $("status-text").textContent = "Cannot reach the server";
    setTimeout(refreshStatus, 3000);
  }
}

function listenToJobs() {
  const es = new EventSource("/api/reindex/events");
  es.addEventListener("progress", (e) => showProgress(JSON.parse(e.data).progress));
  es.addEventListener("done", () => {
    refreshStatus();
    if (hasQuery()) search();
  });
  es.addEventListener("failed", (e) => {
    showError("Re-index failed: " + JSON.parse(e.data).message);
    refreshStatus();
  });
}

async function reindex() {
  $("reindex").disabled = true;
  try {
    await api("/api/reindex", { method: "POST" });
    $("status-text").textContent = "Re-index started…";
  } catch (e) {
    showError(e.message);
    $("reindex").disabled = false;
  }
}

// ---------- Wiring ----------

function init() {
  for (const text of EXAMPLES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.onclick = () => { $("q").value = text; state.text = text; search(); };
    $("examples").append(b);
  }
  $("search-form").onsubmit = (e) => { e.preventDefault(); clearTimeout(typingTimer); state.text = $("q").value.trim(); search(); };
  $("q").addEventListener("input", onType);
  $("image-button").onclick = () => $("file").click();
  $("file").onchange = () => { searchByImage($("file").files[0]); $("file").value = ""; };
  $("filters-button").onclick = () => {
    const open = $("filters").hidden;
    $("filters").hidden = !open;
    $("filters-button").setAttribute("aria-expanded", String(open));
  };
  for (const id of ["f-folder", "f-from", "f-to", "f-type", "f-camera", "f-exclude"]) {
    $(id).addEventListener("change", () => { if (hasQuery()) search(); });
  }
  $("f-clear").onclick = () => {
    for (const id of ["f-folder", "f-from", "f-to", "f-type", "f-camera", "f-exclude"]) $(id).value = "";
    if (hasQuery()) search();
  };
  $("reindex").onclick = reindex;
  $("v-close").onclick = closeViewer;
  $("v-similar").onclick = () => viewerAction("similar");
  $("v-more").onclick = () => viewerAction("more");
  $("v-less").onclick = () => viewerAction("less");
  $("v-prev").onclick = () => openViewer(state.current - 1);
  $("v-next").onclick = () => openViewer(state.current + 1);
  $("viewer").addEventListener("close", () => { state.current = Math.max(state.current, 0); });
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });

  document.addEventListener("keydown", (e) => {
    const viewerOpen = $("viewer").open;
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (viewerOpen) {
      if (e.key === "ArrowRight") { e.preventDefault(); openViewer(Math.min(state.current + 1, state.hits.length - 1)); }
      if (e.key === "ArrowLeft") { e.preventDefault(); openViewer(Math.max(state.current - 1, 0)); }
      return; // Escape closes the dialog natively
    }
    if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); $("q").select(); return; }
    const active = document.activeElement;
    const inGrid = active && active.classList.contains("tile");
    if (e.key === "ArrowDown" && active === $("q")) { e.preventDefault(); focusTile(0); return; }
    if (!inGrid) return;
    const i = Number(active.dataset.index);
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns(), ArrowUp: -columns() };
    if (e.key in moves) {
      e.preventDefault();
      const next = i + moves[e.key];
      if (next < 0) { $("q").focus(); return; }
      focusTile(next);
      if (next >= state.hits.length - columns() * 2) loadMore();
    }
  });

  // Drop and paste anywhere.
  let depth = 0;
  document.addEventListener("dragenter", (e) => { if ([...e.dataTransfer.types].includes("Files")) { depth++; $("drop").hidden = false; } });
  document.addEventListener("dragleave", () => { depth = Math.max(0, depth - 1); if (!depth) $("drop").hidden = true; });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    if (e.dataTransfer.files.length) searchByImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); searchByImage(item.getAsFile()); }
  });

  new IntersectionObserver((entries) => { if (entries.some((x) => x.isIntersecting)) loadMore(); }, { rootMargin: "600px" })
    .observe($("sentinel"));

  refreshStatus();
  listenToJobs();
}

init();
