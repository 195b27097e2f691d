// The large view of one photo: its metadata, find similar, more / less like this.

import { api } from "./api.js";
import { $, showError } from "./dom.js";
import { focusTile } from "./grid.js";
import { search } from "./search.js";
import { state } from "./state.js";
import { tagChips, tagQuery } from "./tags.js";
import { remember } from "./url.js";

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const u = ["KiB", "MiB", "GiB"];
  let v = n, k = -1;
  do { v /= 1024; k++; } while (v >= 1024 && k < u.length - 1);
  return v.toFixed(1) + " " + u[k];
}

// Opens result `index`; `history` as for search(): the photo's address
// (/photo/ID) is pushed when the viewer opens, replaced while it moves.
export function openViewer(index, history = "push") {
  const hit = state.hits[index];
  if (!hit) return;
  show(hit, index, history);
}

// Opens the photo an address names: among the results, or alone.
export async function openPhoto(id) {
  const index = state.hits.findIndex((h) => h.id === id);
  if (index >= 0) return openViewer(index, "none");
  try {
    const p = await api(`/api/photos/${id}`);
    show({ id: p.id, path: p.path, thumbnail: p.thumbnail, caption: p.caption, similarity: null, probability: null }, -1, "none");
  } catch (e) {
    showError(e.message);
  }
}

async function show(hit, index, history) {
  state.current = index;
  state.single = index < 0 ? hit : null;
  const v = $("viewer");
  if (history !== "none") {
    remember(v.open ? "replace" : history, hit.id);
    if (!v.open) state.viewerPushed = history === "push";
  }
  $("v-img").src = hit.thumbnail;
  $("v-img").alt = hit.caption || hit.path;
  $("v-title").textContent = hit.path;
  $("v-meta").replaceChildren();
  $("v-tags").replaceChildren();
  $("v-original").href = `/api/photos/${hit.id}/original`;
  $("v-prev").disabled = index <= 0;
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
      ["Match", hit.probability == null ? null : `${(hit.probability * 100).toFixed(1)}%`],
      ["Similarity", hit.similarity == null || state.sort !== "relevance" ? null : hit.similarity.toFixed(4)],
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
    $("v-tags").replaceChildren(tagChips(p.tags, searchTag));
  } catch (e) {
    showError(e.message);
  }
}

// A tag chip: the photos with that tag.
function searchTag(name) {
  $("viewer").close();
  state.similarTo = null;
  state.modifiers = [];
  state.upload = null;
  state.text = tagQuery(name);
  $("q").value = state.text;
  window.scrollTo({ top: 0 });
  search();
}

export function closeViewer() {
  const v = $("viewer");
  if (v.open) v.close();
  focusTile(state.current);
}

// When the viewer closes (button, Escape, a click beside it), the address
// goes back to the search: the entry the viewer pushed is left, or, for a
// photo opened from its address, rewritten.
export function viewerClosed() {
  if (!location.pathname.startsWith("/photo/")) return;
  if (state.viewerPushed) history.back();
  else remember("replace");
  state.viewerPushed = false;
}

export function viewerAction(kind) {
  const hit = state.current >= 0 ? state.hits[state.current] : state.single;
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
