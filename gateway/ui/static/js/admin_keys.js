// Admin: API keys (create with limits, revoke) and today's usage per key.
import { ApiError, getJSON, request } from "./api.js";

const $ = (id) => document.getElementById(id);

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function limitsText(limits) {
  return ["rpm", "tpm", "tpd", "max_concurrent"]
    .map((k) => `${k} ${limits?.[k] ? limits[k] : "∞"}`).join(", ");
}

export class KeysPanel {
  constructor({ onAuthLost }) {
    this.onAuthLost = onAuthLost;
    $("key-form").addEventListener("submit", (e) => this.create(e));
  }

  async refresh() {
    const [keys, usage] = await Promise.all([getJSON("/admin/keys"), getJSON("/admin/usage?days=1")]);
    const byKey = new Map((usage.data || []).map((row) => [row.key_id, row]));
    $("keys-body").replaceChildren(...(keys.data || []).map((key) => this.row(key, byKey.get(key.id))));
  }

  row(key, use) {
    const tr = document.createElement("tr");
    tr.dataset.keyId = key.id;
    const state = key.revoked ? "revoked" : "active";
    tr.append(cell(key.name), cell(key.id), cell((key.scopes || []).join(", ")), cell(limitsText(key.limits)),
      cell(String(use?.requests ?? 0)), cell(String((use?.prompt_tokens ?? 0) + (use?.completion_tokens ?? 0))),
      cell(state, key.revoked ? "bad" : "ok"));
    const actions = document.createElement("td");
    if (!key.revoked) {
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "secondary revoke";
      revoke.textContent = "Revoke";
      revoke.setAttribute("aria-label", `Revoke key ${key.name}`);
      revoke.addEventListener("click", () => this.revoke(key));
      actions.append(revoke);
    }
    tr.append(actions);
    return tr;
  }

  async create(event) {
    event.preventDefault();
    const form = event.target;
    const data = new FormData(form);
    const limits = {};
    for (const name of ["rpm", "tpm", "tpd", "max_concurrent"]) {
      const value = String(data.get(name) || "").trim();
      if (value) limits[name] = Number(value);
    }
    const body = { name: String(data.get("name") || "").trim(), scopes: data.getAll("scopes"), limits };
    try {
      const created = await getJSON("/admin/keys", { method: "POST", body });
      $("new-secret").hidden = false;
      $("new-secret-value").textContent = created.key;
      $("key-message").textContent = `Key "${created.name}" created. Copy the secret now: it is shown only once.`;
      form.reset();
      await this.refresh();
    } catch (err) {
      this.report(err);
    }
  }

  async revoke(key) {
    if (!window.confirm(`Revoke the key "${key.name}"? Programs using it stop working at once.`)) return;
    try {
      await request(`/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      $("key-message").textContent = `Key "${key.name}" revoked.`;
      await this.refresh();
    } catch (err) {
      this.report(err);
    }
  }

  report(err) {
    if (err.status === 401) this.onAuthLost(err);
    else $("key-message").textContent = err instanceof ApiError ? err.friendly : String(err);
  }
}
