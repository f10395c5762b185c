// Dashboard panels: the prompt-prefix reuse rate per worker (from the workers' /health, passed on by
// /admin/status), and panels fed by endpoints a gateway may not have yet: models with their load state
// (GET /v1/models), batches (GET /admin/batches) and users (GET /admin/users). A panel whose endpoint answers 404
// hides itself; any other failure is said in the panel.
import { ApiError, getJSON, request } from "./api.js";

const $ = (id) => document.getElementById(id);

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null || text === "" ? "—" : String(text);
  if (className) td.className = className;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

/** The list in a body that is a list, or holds one under `data` or `name`. */
export function listOf(body, name) {
  if (Array.isArray(body)) return body;
  const found = body?.data ?? body?.[name];
  return Array.isArray(found) ? found : [];
}

/** A time given as Unix seconds, milliseconds or an ISO string, in the reader's locale ("" when absent). */
export function when(value) {
  if (value === null || value === undefined || value === "") return "";
  const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

/** "83.4 %" of part ÷ whole, or null when there is no whole. */
export function percent(part, whole) {
  return whole > 0 ? `${((100 * part) / whole).toFixed(1)} %` : null;
}

const count = (n) => (Number.isFinite(n) ? n.toLocaleString("en") : "—");

function tokensOf(value) {
  if (typeof value === "number") return value;
  if (value && typeof value === "object") {
    if (typeof value.total === "number") return value.total;
    if (typeof value.total_tokens === "number") return value.total_tokens;
    return Object.values(value).filter((v) => typeof v === "number").reduce((a, b) => a + b, 0);
  }
  return null;
}

/** Per worker and over all of them: reused ÷ prompt tokens, the workers' own counters since they started. */
export function renderReuse(workers) {
  let prompt = 0;
  let reused = 0;
  const rows = (workers || []).map((w) => {
    const p = w.health?.prompt_tokens;
    const r = w.health?.prompt_tokens_reused;
    const known = Number.isFinite(p) && Number.isFinite(r);
    if (known) {
      prompt += p;
      reused += r;
    }
    const tr = row(cell(w.url), cell(known ? percent(r, p) ?? "no prompts yet" : "not reported"),
      cell(known ? `${count(r)} / ${count(p)}` : ""));
    tr.className = "reuse";
    return tr;
  });
  $("reuse-body").replaceChildren(...rows);
  $("reuse-rate").textContent = percent(reused, prompt) ?? "no prompts yet";
  $("reuse-counts").textContent = `${count(reused)} of ${count(prompt)} prompt tokens reused`;
}

const STATE_CLASS = { loaded: "ok", unloaded: "", loading: "busy", draining: "busy" };

function modelRow(m) {
  const workers = Array.isArray(m.workers) ? m.workers.length : m.workers;
  const memory = Number.isFinite(m.memory_bytes) ? `${(m.memory_bytes / 2 ** 30).toFixed(2)} GiB` : "";
  return row(cell(m.id), cell(m.state, STATE_CLASS[m.state] ?? ""), cell(m.resident), cell(workers), cell(memory),
    cell(m.context_length), cell(m.max_tokens));
}

function batchRow(b) {
  const counts = b.request_counts || {};
  const tr = row(cell(b.id), cell(b.key_name), cell(b.status, b.status === "failed" ? "bad" : ""),
    cell(`${count(counts.completed)} / ${count(counts.total)}`), cell(count(counts.failed)),
    cell(count(tokensOf(b.tokens))), cell(when(b.created_at)));
  tr.dataset.batchId = String(b.id ?? "");
  return tr;
}

const joined = (list) => (Array.isArray(list) ? list.join(", ") : "");

/** A user's row; `onAct("disable" | "enable")` runs when the admin presses its button. */
function userRow(u, onAct) {
  const who = u.name && u.name !== u.subject ? `${u.name} (${u.subject})` : u.subject;
  const tr = row(cell(who), cell(u.email), cell(u.role), cell(joined(u.groups)), cell(joined(u.role_groups)),
    cell(u.disabled ? "disabled" : "active", u.disabled ? "bad" : "ok"), cell(when(u.last_sign_in) || "never"),
    cell(count(u.usage_today_tokens)));
  const action = u.disabled ? "enable" : "disable";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary";
  button.textContent = u.disabled ? "Enable" : "Disable";
  button.setAttribute("aria-label", `${button.textContent} user ${u.subject}`);
  button.addEventListener("click", () => onAct(action));
  const actions = document.createElement("td");
  actions.append(button);
  tr.append(actions);
  tr.dataset.subject = String(u.subject ?? "");
  return tr;
}

/** One panel over one endpoint: shown with its rows when the endpoint answers, hidden when it answers 404. */
export class EndpointPanel {
  constructor({ name, path, render, onAuthLost, note = null }) {
    Object.assign(this, { path, render, onAuthLost, note });
    this.section = $(`${name}-panel`);
    this.body = $(`${name}-body`);
    this.message = $(`${name}-note`);
    this.name = name;
  }

  async refresh() {
    let found;
    try {
      found = await getJSON(this.path);
    } catch (err) {
      if (err.status === 404) {
        this.section.hidden = true; // this gateway has no such endpoint (yet)
        return;
      }
      if (err.status === 401) return this.onAuthLost(err);
      this.section.hidden = false;
      this.message.textContent = err instanceof ApiError ? err.friendly : String(err);
      return;
    }
    const items = listOf(found, this.name);
    this.body.replaceChildren(...items.map(this.render));
    this.message.textContent = this.note ? this.note(items) : (items.length ? "" : `No ${this.name} yet.`);
    this.section.hidden = false;
  }
}

/** The three endpoint panels of the dashboard. */
export function endpointPanels(onAuthLost) {
  const users = new EndpointPanel({ name: "users", path: "/admin/users", onAuthLost,
    render: (u) => userRow(u, (action) => changeUser(users, u, action)) });
  return {
    models: new EndpointPanel({ name: "models", path: "/v1/models", render: modelRow, onAuthLost,
      note: (items) => (items.some((m) => "state" in m) ? "" : "This gateway does not publish model states.") }),
    batches: new EndpointPanel({ name: "batches", path: "/admin/batches", render: batchRow, onAuthLost }),
    users,
  };
}

/** Disable (after a confirmation: their sessions end) or enable a user, then list the users again. */
async function changeUser(panel, user, action) {
  if (action === "disable" &&
      !window.confirm(`Disable ${user.subject}? They are signed out and cannot sign in until enabled.`)) return;
  try {
    await request(`/admin/users/${encodeURIComponent(user.subject)}/${action}`, { method: "POST" });
    await panel.refresh();
    panel.message.textContent = `${user.subject} is ${action}d.`;
  } catch (err) {
    if (err.status === 401) return panel.onAuthLost(err);
    panel.message.textContent = err instanceof ApiError ? err.friendly : String(err);
  }
}

/** Phones show a table row as "heading: value" lines: each body cell carries its column's heading. */
export function labelCellsOnChange(table) {
  const heads = [...table.tHead.rows[0].cells].map((th) => th.textContent.trim());
  const label = () => {
    for (const tr of table.tBodies[0].rows) [...tr.cells].forEach((td, i) => { td.dataset.label = heads[i] ?? ""; });
  };
  new MutationObserver(label).observe(table.tBodies[0], { childList: true });
  label();
}
