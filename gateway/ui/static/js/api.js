// HTTP calls to the gateway with the signed-in key, and errors a person can read.
import { parseQueued, readSSE } from "./sse.js";

const KEY = "appliance.apiKey";

export function getKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
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
    if (this.status === 401) return "Your API key was not accepted (unknown, revoked or expired). Please sign in again.";
    if (this.status === 403) return `Not allowed with this key: ${this.message}`;
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

/** fetch with the bearer key; throws ApiError on a non-2xx status or a network failure. */
export async function request(path, { method = "GET", body, headers = {}, signal, key } = {}) {
  const all = { Authorization: `Bearer ${key ?? getKey()}`, ...headers };
  let payload = body;
  if (body !== undefined && !(body instanceof FormData) && typeof body !== "string") {
    payload = JSON.stringify(body);
    all["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, { method, body: payload, headers: all, signal });
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
