// Running searches: a first page, more pages, typing, searching by a picture.

import { api } from "./api.js";
import { $, showError } from "./dom.js";
import { filters, hasQuery, queryString } from "./filters.js";
import { appendTiles, renderChips, renderGrid } from "./grid.js";
import { PAGE, state } from "./state.js";
import { hideDuplicates } from "./duplicates.js";
import { remember, searchPart } from "./url.js";

export async function fetchPage(offset) {
  const f = filters();
  const sort = $("f-sort").value;
  if (sort !== "relevance") f.sort = sort;
  // "only": the automatic boundary, and the page stops at it.
  if ($("f-cutoff").value === "none") f.cutoff = "none";
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

// Runs the page's search. `history`: "push" a new entry in the address bar
// (a search the user made), "replace" the present one (typing on), or
// "none" (the address is where the search came from: load, back, forward).
export async function search(history = "push") {
  const generation = ++state.generation;
  showError(null);
  hideDuplicates();
  if (history !== "none" && !state.upload) remember(history);
  state.shown = searchPart();
  state.understood = [];
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
  // The old results stay on screen, marked stale, until the new ones arrive.
  $("grid").setAttribute("aria-busy", "true");
  try {
    const page = onlyRelevant(await fetchPage(0));
    if (generation !== state.generation) return;
    state.hits = page.hits;
    state.offset = page.fetched;
    state.more = page.more;
    state.sort = page.sort;
    state.understood = page.understood || [];
    renderChips();
    renderGrid(true);
    $("summary").hidden = false;
    // Where the first page holds the boundary, how many are above it.
    const relevant = page.hits.filter((h) => h.relevant !== false).length;
    const count = relevant < page.hits.length
      ? `${relevant} relevant`
      : page.more ? "Top results" : page.hits.length + " results";
    $("summary").textContent = page.hits.length ? `${count} · ${Math.round(page.took_ms)} ms` : "";
    $("empty").hidden = page.hits.length > 0;
  } catch (e) {
    if (generation === state.generation) showError(e.message);
  } finally {
    if (generation === state.generation) {
      state.loading = false;
      $("grid").setAttribute("aria-busy", "false");
    }
  }
}

export async function loadMore() {
  if (state.loading || !state.more || !hasQuery()) return;
  const generation = state.generation;
  state.loading = true;
  try {
    const page = onlyRelevant(await fetchPage(state.offset));
    if (generation !== state.generation) return;
    const seen = new Set(state.hits.map((h) => h.id));
    const fresh = page.hits.filter((h) => !seen.has(h.id));
    state.hits.push(...fresh);
    state.offset += page.fetched;
    state.more = page.more && page.fetched > 0;
    appendTiles(fresh, state.hits.length - fresh.length);
  } catch (e) {
    showError(e.message);
  } finally {
    state.loading = false;
  }
}

// With "only relevant results", a page ends at the boundary (in date order,
// the less relevant are left out wherever they fall).
function onlyRelevant(page) {
  const fetched = page.hits.length;
  if ($("f-cutoff").value !== "only") return { ...page, fetched };
  const kept = page.hits.filter((h) => h.relevant !== false);
  const cut = page.sort === "relevance" && kept.length < fetched;
  return { ...page, hits: kept, more: page.more && !cut, fetched };
}

let typingTimer = null;

// Stops a pending search-as-you-type.
export function cancelTyping() {
  clearTimeout(typingTimer);
}

export function onType() {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => {
    const text = $("q").value.trim();
    if (text !== state.text) {
      state.text = text;
      // One history entry for a run of typing, not one per pause.
      search(state.typing ? "replace" : "push");
      state.typing = true;
    }
  }, 250);
}

export function searchByImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image.");
    return;
  }
  if (state.upload) URL.revokeObjectURL(state.upload.url);
  state.upload = { file, url: URL.createObjectURL(file) };
  state.similarTo = null;
  search();
}
