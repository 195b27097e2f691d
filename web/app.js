// clipdex web page: search box, result grid, viewer, image search, re-index.
// Plain JavaScript modules, no build step; they talk only to the /api endpoints.

import { $ } from "./js/dom.js";
import { hasQuery } from "./js/filters.js";
import { columns, focusTile } from "./js/grid.js";
import { cancelTyping, loadMore, onType, search, searchByImage } from "./js/search.js";
import { EXAMPLES, state } from "./js/state.js";
import { listenToJobs, refreshStatus, reindex } from "./js/status.js";
import { hideDuplicates, inDuplicates, initDuplicates, showDuplicates } from "./js/duplicates.js";
import { hideTags, inTags, initTags, showTags } from "./js/tags.js";
import { photoInAddress, restore } from "./js/url.js";
import { closeViewer, openPhoto, openViewer, viewerAction, viewerClosed } from "./js/viewer.js";

// Shows the search and photo the address names (on load, back, forward).
async function follow() {
  if (inDuplicates() || inTags()) {
    if ($("viewer").open) { state.viewerPushed = false; $("viewer").close(); }
    if (inTags()) { hideDuplicates(); return showTags(follow); }
    hideTags();
    return showDuplicates();
  }
  hideDuplicates();
  hideTags();
  const sameSearch = location.search === state.shown && state.generation > 0;
  const photo = sameSearch ? photoInAddress() : restore();
  if (!sameSearch) await search("none");
  if (photo != null) await openPhoto(photo);
  else if ($("viewer").open) { state.viewerPushed = false; $("viewer").close(); }
}

function init() {
  for (const text of EXAMPLES) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.onclick = () => { $("q").value = text; state.text = text; search(); };
    $("examples").append(b);
  }
  $("search-form").onsubmit = (e) => { e.preventDefault(); cancelTyping(); state.typing = false; state.text = $("q").value.trim(); search(); };
  $("q").addEventListener("input", onType);
  $("image-button").onclick = () => $("file").click();
  $("file").onchange = () => { searchByImage($("file").files[0]); $("file").value = ""; };
  $("filters-button").onclick = () => {
    const open = $("filters").hidden;
    $("filters").hidden = !open;
    $("filters-button").setAttribute("aria-expanded", String(open));
  };
  for (const id of ["f-folder", "f-from", "f-to", "f-type", "f-camera", "f-exclude", "f-sort", "f-cutoff"]) {
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
  $("viewer").addEventListener("close", () => { state.current = Math.max(state.current, 0); viewerClosed(); });
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

  window.addEventListener("popstate", follow);
  refreshStatus();
  listenToJobs();
  initDuplicates(follow);
  initTags(follow);
  $("d-back").onclick = (e) => { e.preventDefault(); history.pushState(null, "", "/" + state.shown); follow(); };
  if (location.search || photoInAddress() != null || inDuplicates() || inTags()) follow();
}

init();
