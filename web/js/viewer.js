// The large view of one photo: its metadata, find similar, more / less like this.

import { api } from "./api.js";
import { $, showError } from "./dom.js";
import { focusTile } from "./grid.js";
import { search } from "./search.js";
import { state } from "./state.js";

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  const u = ["KiB", "MiB", "GiB"];
  let v = n, k = -1;
  do { v /= 1024; k++; } while (v >= 1024 && k < u.length - 1);
  return v.toFixed(1) + " " + u[k];
}

export async function openViewer(index) {
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
      ["Match", hit.probability == null ? null : `${(hit.probability * 100).toFixed(1)}%`],
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

export function closeViewer() {
  const v = $("viewer");
  if (v.open) v.close();
  focusTile(state.current);
}

export function viewerAction(kind) {
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
