// What the server is doing: start-up, photos and model, re-index progress.

import { api } from "./api.js";
import { $, showError } from "./dom.js";
import { hasQuery } from "./filters.js";
import { search } from "./search.js";

let lastStatus = null;

function describeProgress(p) {
  if (!p) return "";
  if (p.phase === "tagging") return "Preparing the automatic tags…";
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

export async function refreshStatus() {
  try {
    const s = await api("/api/status");
    showStatus(s);
    if (s.state !== "ready" && s.state !== "failed") setTimeout(refreshStatus, 1500);
  } catch (e) {
    $("status-text").textContent = "Cannot reach the server";
    setTimeout(refreshStatus, 3000);
  }
}

export function listenToJobs() {
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

export async function reindex() {
  $("reindex").disabled = true;
  try {
    await api("/api/reindex", { method: "POST" });
    $("status-text").textContent = "Re-index started…";
  } catch (e) {
    showError(e.message);
    $("reindex").disabled = false;
  }
}
