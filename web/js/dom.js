// Small DOM helpers shared by the modules.

export const $ = (id) => document.getElementById(id);

export function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}
