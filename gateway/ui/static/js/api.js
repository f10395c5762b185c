// HTTP calls to the gateway, signed in either way, and errors a person can read. Two ways to be signed in:
// a session (the gateway's HttpOnly cookie, sent by the browser; state-changing calls carry the session's
// CSRF token in X-CSRF-Token), or a pasted API key (kept in this tab's sessionStorage, sent as a bearer key).
// Every other module calls request()/getJSON()/authHeaders() and never needs to know which.
import { parseQueued, readSSE } from "./sse.js";

const KEY = "appliance.apiKey";
const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);
let csrfToken = ""; // the signed-in session's, from /auth/me; never stored

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/** Remember the session's CSRF token (empty: no session). */
export function setSession(token) {
  csrfToken = token || "";
}

export function hasSession() {
  return Boolean(csrfToken);
}

/** The headers that authenticate a call: the bearer key, or for a session the CSRF token on a change. */
export function authHeaders(method = "GET", key = undefined) {
  const bearer = key !== undefined ? key : getKey();
  if (bearer) return { Authorization: `Bearer ${bearer}` };
  if (csrfToken && !SAFE.has(method.toUpperCase())) return { "X-CSRF-Token": csrfToken };
  return {};
}

/** Who is signed in with a session: {status, body} of GET /auth/me (body has methods and provider on 401). */
export async function whoAmI() {
  try {
    const response = await fetch("/auth/me", { credentials: "same-origin", cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch {
      // an older gateway without /auth: key sign-in only
    }
    return { status: response.status, body };
  } catch (err) {
    return { status: 0, body: null, error: String(err.message || err) };
  }
}

/** End the session on the server (its cookie is then worthless), then forget its token. */
export async function endSession() {
  if (!csrfToken) return;
  try {
    await fetch("/auth/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken } });
  } finally {
    csrfToken = "";
  }
}

/** An OpenAI-shaped error with the HTTP status and the wait the server asked for. */
export class ApiError extends Error {
  constructor(status, message, code = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  /** One sentence for the person at the keyboard. */
  get friendly() {
    const wait = this.retryAfter ? Math.ceil(this.retryAfter) : null;
    if (this.status === 401) {
      return csrfToken ? "Your session has ended. Please sign in again."
        : "Your API key was not accepted (unknown, revoked or expired). Please sign in again.";
    }
    if (this.status === 403) return `Not allowed${csrfToken ? "" : " with this key"}: ${this.message}`;
    if (this.status === 429) return `Rate limited, try again in ${wait ?? 1} s.`;
    if (this.status === 503) return `The server is busy, try again in ${wait ?? 2} s.`;
    if (this.status === 413) return "That is too large for the server.";
    if (this.status === 0) return "Cannot reach the appliance. Check the network and try again.";
    if (this.code === "stream_interrupted" || this.status === -1) return `The answer was cut off: ${this.message}`;
    return this.message || `Request failed (${this.status}).`;
  }
}

async function errorFrom(response) {
  let message = `Request failed (${response.status}).`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the generic sentence
  }
  const retry = Number.parseFloat(response.headers.get("Retry-After") || "");
  return new ApiError(response.status, message, code, Number.isFinite(retry) ? retry : null);
}

/** fetch signed in (key or session); throws ApiError on a non-2xx status or a network failure. */
export async function request(path, { method = "GET", body, headers = {}, signal, key } = {}) {
  const all = { ...authHeaders(method, key), ...headers };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData) && typeof body !== "string") {
    payload = JSON.stringify(body);
    all["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, { method, body: payload, headers: all, signal, credentials: "same-origin" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, String(err.message || err));
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/**
 * Stream a chat completion. Calls onChunk(obj) for each data event; resolves when [DONE] arrives.
 * A stream that ends without [DONE] (or with `event: error`) rejects: a cut answer is never "finished".
 */
export async function streamChat(body, { signal, onChunk }) {
  const response = await request("/v1/chat/completions", { method: "POST", body: { ...body, stream: true }, signal });
  for await (const event of readSSE(response.body)) {
    if (event.event === "queued") { // every worker is busy: where this request stands in the queue
      window.dispatchEvent(new CustomEvent("appliance:queued", { detail: parseQueued(event.data) }));
      continue;
    }
    if (event.event === "error") {
      let message = "The model stream failed.";
      let code = "stream_interrupted";
      try {
        const parsed = JSON.parse(event.data).error || {};
        message = parsed.message || message;
        code = parsed.code || code;
      } catch {
        // keep defaults
      }
      throw new ApiError(-1, message, code);
    }
    if (event.data === "[DONE]") return;
    let chunk;
    try {
      chunk = JSON.parse(event.data);
    } catch {
      continue;
    }
    onChunk(chunk);
  }
  throw new ApiError(-1, "the connection closed before the answer finished.", "stream_interrupted");
}
