// The duplicates view (/duplicates): groups of photos that are the same
// picture or near-identical shots, side by side, the likely original
// first. Nothing is deleted or moved; each photo opens its file.

import { api } from "./api.js";
import { $, showError } from "./dom.js";

const GROUPS = 50;
const view = { offset: 0, more: false, loading: false, generation: 0 };

export function inDuplicates() {
  return location.pathname === "/duplicates";
}

function size(bytes) {
  if (bytes >= 1 << 20) return (bytes / (1 << 20)).toFixed(1) + " MB";
  if (bytes >= 1 << 10) return Math.round(bytes / 1024) + " KB";
  return bytes + " B";
}

function photoEl(p) {
  const item = document.createElement("li");
  item.className = "dup" + (p.likely_original ? " original" : "");
  const link = document.createElement("a");
  link.href = p.original;
  link.target = "_blank";
  link.rel = "noopener";
  link.title = p.path;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.src = p.thumbnail;
  img.alt = p.path;
  link.append(img);
  const caption = document.createElement("div");
  caption.className = "dup-meta";
  const path = document.createElement("div");
  path.className = "dup-path";
  path.textContent = p.path;
  const facts = document.createElement("div");
  facts.textContent = `${p.width}×${p.height} · ${size(p.size)} · ${p.taken ? p.taken.slice(0, 10) : "no date"}`;
  caption.append(path, facts);
  if (p.likely_original) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "likely original";
    badge.title = "the most pixels, then the largest file, then the oldest";
    caption.prepend(badge);
  }
  item.append(link, caption);
  return item;
}

function groupEl(g, n) {
  const section = document.createElement("li");
  section.className = "dup-group";
  const head = document.createElement("h2");
  head.textContent = `${n}. ${g.photos.length} photos · similarity ${g.similarity.toFixed(3)} or more`;
  const row = document.createElement("ul");
  row.className = "dup-photos";
  for (const p of g.photos) row.append(photoEl(p));
  section.append(head, row);
  return section;
}

async function load(reset) {
  if (view.loading && !reset) return;
  const generation = reset ? ++view.generation : view.generation;
  if (reset) { view.offset = 0; view.more = false; }
  view.loading = true;
  showError(null);
  const params = new URLSearchParams({ k: GROUPS, offset: view.offset });
  const t = $("d-threshold").value.trim();
  if (t) params.set("threshold", t);
  try {
    const page = await api(`/api/duplicates?${params}`);
    if (generation !== view.generation) return;
    if (reset) {
      $("d-groups").replaceChildren();
      $("d-threshold").value = page.threshold;
      $("d-summary").textContent = page.total_groups
        ? `${page.total_groups} group${page.total_groups === 1 ? "" : "s"}, ${page.total_photos} photos · ${Math.round(page.took_ms)} ms`
          + (page.pending ? ` · ${page.pending} photos are not grouped yet (the next re-index lists them)` : "")
        : "No duplicates at this threshold.";
    }
    const frag = document.createDocumentFragment();
    page.groups.forEach((g, i) => frag.append(groupEl(g, view.offset + i + 1)));
    $("d-groups").append(frag);
    view.offset += page.groups.length;
    view.more = page.more;
    $("d-more").hidden = !view.more;
  } catch (e) {
    if (generation === view.generation) showError(e.message);
  } finally {
    if (generation === view.generation) view.loading = false;
  }
}

// Shows the view for the address (/duplicates?threshold=0.95).
export function showDuplicates() {
  $("main").hidden = true;
  $("dups").hidden = false;
  $("d-threshold").value = new URLSearchParams(location.search).get("threshold") || "";
  return load(true);
}

export function hideDuplicates() {
  $("dups").hidden = true;
  $("main").hidden = false;
}

export function initDuplicates(follow) {
  $("dup-link").onclick = (e) => {
    e.preventDefault();
    if (!inDuplicates()) history.pushState(null, "", "/duplicates");
    follow();
  };
  $("d-form").onsubmit = (e) => {
    e.preventDefault();
    const t = $("d-threshold").value.trim();
    history.replaceState(null, "", "/duplicates" + (t ? "?threshold=" + encodeURIComponent(t) : ""));
    load(true);
  };
  $("d-more").onclick = () => load(false);
}
