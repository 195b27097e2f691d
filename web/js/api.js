// The HTTP API: JSON in and out, errors as exceptions with the server's message and code.

export async function api(path, options = {}) {
  const res = await fetch(path, { credentials: "same-origin", ...options });
  const type = res.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await res.json() : null;
  if (!res.ok) {
    const message = body && body.error ? body.error.message : `request failed (${res.status})`;
    const err = new Error(message);
    err.status = res.status;
    err.code = body && body.error ? body.error.code : "";
    throw err;
  }
  return body;
}
