// The tags view (/tags): every automatic tag photos have, the most common
// first, each with a cover photo and its count; a tag opens the search
// `tag:NAME`. The viewer's tag chips (`tagChips`) search the same way.

import { api } from "./api.js";
import { $, showError } from "./dom.js";

let generation = 0;

export function inTags() {
  return location.pathname === "/tags";
}

// The query that finds the photos with a tag (quoted when it has spaces).
export function tagQuery(name) {
  return /\s/.test(name) ? `tag:"${name}"` : `tag:${name}`;
}

function tagEl(t) {
  const item = document.createElement("li");
  item.className = "tag-tile";
  const link = document.createElement("a");
  link.href = "/?q=" + encodeURIComponent(tagQuery(t.name));
  link.dataset.tag = t.name;
  if (t.cover) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = t.cover.thumbnail;
    img.alt = "";
    link.append(img);
  }
  const name = document.createElement("span");
  name.className = "tag-name";
  name.textContent = t.name;
  const count = document.createElement("span");
  count.className = "tag-count";
  count.textContent = String(t.count);
  link.append(name, count);
  item.append(link);
  return item;
}

// Shows the view; `follow` shows a search when a tag is chosen.
export async function showTags(follow) {
  $("main").hidden = true;
  $("tags").hidden = false;
  const mine = ++generation;
  showError(null);
  try {
    const list = await api("/api/tags");
    if (mine !== generation) return;
    $("t-summary").textContent = !list.enabled
      ? "This index makes no tags (clipdex retag --tags FILE starts them)."
      : list.tags.length
        ? `${list.tags.length} tags in use, of ${list.vocabulary_size} in the vocabulary (${list.vocabulary}, probability ${list.threshold} or more)`
        : "No photo has a tag yet.";
    const frag = document.createDocumentFragment();
    for (const t of list.tags) frag.append(tagEl(t));
    $("t-list").replaceChildren(frag);
    for (const a of $("t-list").querySelectorAll("a")) {
      a.onclick = (e) => {
        e.preventDefault();
        history.pushState(null, "", a.getAttribute("href"));
        follow();
      };
    }
  } catch (e) {
    if (mine === generation) showError(e.message);
  }
}

export function hideTags() {
  $("tags").hidden = true;
}

// The chips of a photo's tags; `choose(name)` runs when one is clicked.
export function tagChips(tags, choose) {
  const frag = document.createDocumentFragment();
  for (const t of tags || []) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip tag-chip";
    b.textContent = t.name;
    b.title = `${Math.round(t.probability * 100)}% · photos with this tag`;
    b.onclick = () => choose(t.name);
    frag.append(b);
  }
  return frag;
}

export function initTags(follow) {
  $("tags-link").onclick = (e) => {
    e.preventDefault();
    if (!inTags()) history.pushState(null, "", "/tags");
    follow();
  };
}
