// The search in the address bar: a search can be bookmarked and shared, the
// back and forward buttons step through searches, a reload shows the same
// results, and an open photo is /photo/ID.

import { $ } from "./dom.js";
import { state } from "./state.js";

// URL parameter -> form field.
const FIELDS = { folder: "f-folder", from: "f-from", to: "f-to", type: "f-type", camera: "f-camera", exclude: "f-exclude", sort: "f-sort", cutoff: "f-cutoff" };

// A select's value when the address does not name one.
const DEFAULTS = { sort: "relevance", cutoff: "auto" };

const thumb = (id) => `/api/photos/${id}/thumbnail`;
const ids = (values) => values.filter((v) => /^\d+$/.test(v)).map(Number);

// The query part of the address for the page's search.
export function searchPart() {
  const p = new URLSearchParams();
  if (state.text) p.set("q", state.text);
  if (state.similarTo) p.set("like", state.similarTo.id);
  for (const m of state.modifiers) p.append(m.weight > 0 ? "more" : "less", m.id);
  for (const [name, id] of Object.entries(FIELDS)) {
    const v = $(id).value.trim();
    if (v && v !== DEFAULTS[name]) p.set(name, v);
  }
  const qs = p.toString();
  return qs ? "?" + qs : "";
}

// Puts the page's search (and the open photo, if any) in the address:
// "push" makes a new history entry, "replace" rewrites the present one.
export function remember(how, photoId = null) {
  const url = (photoId == null ? "/" : `/photo/${photoId}`) + searchPart();
  if (url === location.pathname + location.search) return;
  history[how === "replace" ? "replaceState" : "pushState"](null, "", url);
}

// Sets the page's search from the address; gives the id of the photo it
// opens, or null.
export function restore() {
  const p = new URLSearchParams(location.search);
  state.text = (p.get("q") || "").trim();
  $("q").value = state.text;
  for (const [name, id] of Object.entries(FIELDS)) {
    $(id).value = p.get(name) || DEFAULTS[name] || "";
    // A select left with no option (an unknown value in the address) takes its default.
    if ($(id).tagName === "SELECT" && $(id).selectedIndex < 0) $(id).value = DEFAULTS[name];
  }
  const like = ids([p.get("like") || ""]);
  state.similarTo = like.length ? { id: like[0], thumb: thumb(like[0]) } : null;
  state.modifiers = [
    ...ids(p.getAll("more")).map((id) => ({ id, weight: 0.5, thumb: thumb(id) })),
    ...ids(p.getAll("less")).map((id) => ({ id, weight: -0.5, thumb: thumb(id) })),
  ];
  if (state.upload) URL.revokeObjectURL(state.upload.url);
  state.upload = null;
  return photoInAddress();
}

// The id of the photo the address opens (/photo/ID), or null.
export function photoInAddress() {
  const photo = location.pathname.match(/^\/photo\/(\d+)$/);
  return photo ? Number(photo[1]) : null;
}
