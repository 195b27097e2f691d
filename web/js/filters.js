// The query as the page has it: filters, the query language, whether there is one.

import { $ } from "./dom.js";
import { state } from "./state.js";

export function filters() {
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
export function queryString() {
  const parts = [];
  if (state.text) parts.push(state.text);
  for (const m of state.modifiers) {
    const w = Math.abs(m.weight);
    parts.push((m.weight < 0 ? "- " : (parts.length ? "+ " : "")) + `${w}*image:${m.id}`);
  }
  return parts.join(" ").replace(/^\+ /, "");
}

export function hasQuery() {
  return state.upload || state.similarTo || state.text || state.modifiers.some((m) => m.weight > 0)
    || Object.keys(filters()).length > 0;
}
