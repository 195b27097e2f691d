// The result grid: tiles as list items, chips of the query, keyboard focus.

import { $ } from "./dom.js";
import { search } from "./search.js";
import { state } from "./state.js";
import { openViewer } from "./viewer.js";

export function chip(label, thumb, onRemove, negative) {
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

export function renderChips() {
  const chips = $("chips");
  chips.replaceChildren();
  if (state.upload) chips.append(chip("picture", state.upload.url, () => { state.upload = null; search(); }));
  if (state.similarTo) chips.append(chip("like", state.similarTo.thumb, () => { state.similarTo = null; search(); }));
  state.modifiers.forEach((m, i) => {
    chips.append(chip(m.weight > 0 ? "more" : "less", m.thumb, () => { state.modifiers.splice(i, 1); search(); }, m.weight < 0));
  });
  // Filters read from the query text: removing one takes its words out.
  for (const u of state.understood) {
    const c = chip(u.label, null, () => {
      const q = $("q").value;
      const at = q.indexOf(u.text);
      $("q").value = (at < 0 ? q : q.slice(0, at) + q.slice(at + u.text.length)).replace(/\s+/g, " ").trim();
      state.text = $("q").value;
      search();
    });
    c.classList.add("filter");
    c.dataset.field = u.field;
    chips.append(c);
  }
}

const MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

// "July 2023" for a date taken, "No date" without one.
function monthOf(hit) {
  const m = /^(\d{4})-(\d{2})/.exec(hit.taken || "");
  return m ? `${MONTHS[Number(m[2]) - 1]} ${m[1]}` : "No date";
}

export function tile(hit, index) {
  const item = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "tile";
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
  if (state.sort !== "relevance") {
    // In date order the date says more than the score.
    score.textContent = hit.taken ? hit.taken.slice(0, 10) : "no date";
    score.title = "date taken";
  } else {
    // SigLIP models give a calibrated match probability; CLIP a cosine.
    score.textContent = hit.probability == null ? hit.similarity.toFixed(3) : `${Math.round(hit.probability * 100)}%`;
    score.title = hit.probability == null
      ? "cosine similarity to the query"
      : "the model's probability that this photo matches the query";
  }
  b.append(score);
  if (hit.keyword_rank) {
    const kw = document.createElement("span");
    kw.className = "kw";
    kw.textContent = "name";
    kw.title = "matched by file name, folder or caption";
    b.append(kw);
  }
  // In date order the less relevant are dimmed where they fall.
  if (hit.relevant === false) b.classList.add("less");
  b.onclick = () => openViewer(index);
  item.append(b);
  return item;
}

export function renderGrid(reset) {
  const grid = $("grid");
  if (reset) grid.replaceChildren();
  appendTiles(state.hits, 0);
}

export function appendTiles(hits, start) {
  const grid = $("grid");
  const frag = document.createDocumentFragment();
  // In date order, a heading where the month changes.
  let month = start > 0 && state.hits[start - 1] ? monthOf(state.hits[start - 1]) : null;
  // In relevance order, a divider where the relevant results end.
  let above = start > 0 && state.hits[start - 1] ? state.hits[start - 1].relevant !== false : true;
  hits.forEach((h, i) => {
    if (state.sort === "relevance" && above && h.relevant === false) {
      above = false;
      const line = document.createElement("li");
      line.className = "divider";
      line.setAttribute("role", "presentation");
      const title = document.createElement("h2");
      title.textContent = "Less relevant";
      line.append(title);
      frag.append(line);
    }
    if (state.sort !== "relevance" && monthOf(h) !== month) {
      month = monthOf(h);
      const head = document.createElement("li");
      head.className = "month";
      head.setAttribute("role", "presentation");
      const title = document.createElement("h2");
      title.textContent = month;
      head.append(title);
      frag.append(head);
    }
    frag.append(tile(h, start + i));
  });
  grid.append(frag);
}

export function columns() {
  const grid = $("grid");
  const first = grid.querySelector(".tile");
  if (!first) return 1;
  return Math.max(1, Math.round(grid.clientWidth / first.getBoundingClientRect().width));
}

export function focusTile(i) {
  const tiles = $("grid").querySelectorAll(".tile");
  if (!tiles.length) return;
  i = Math.max(0, Math.min(tiles.length - 1, i));
  tiles[i].focus();
  tiles[i].scrollIntoView({ block: "nearest" });
}
