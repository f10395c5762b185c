// Admin: API keys (create with limits, priority and weight; change priority/weight; revoke), today's usage
// per key, and who is waiting for a worker right now (the balancer's fair queue).
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

function schedulingControls(key, onSave) {
  const wrap = document.createElement("span");
  wrap.className = "scheduling";
  const priority = document.createElement("select");
  priority.setAttribute("aria-label", `Priority of key ${key.name}`);
  priority.append(new Option("interactive", "interactive"), new Option("batch", "batch"));
  priority.value = key.priority || "interactive";
  const weight = document.createElement("input");
  weight.type = "number";
  weight.min = "0.001";
  weight.step = "any";
  weight.value = String(key.weight ?? 1);
  weight.setAttribute("aria-label", `Weight of key ${key.name}`);
  const save = document.createElement("button");
  save.type = "button";
  save.className = "secondary save-scheduling";
  save.textContent = "Save";
  save.setAttribute("aria-label", `Save priority and weight of key ${key.name}`);
  save.addEventListener("click", () => onSave({ priority: priority.value, weight: Number(weight.value) }));
  wrap.append(priority, weight, save);
  return wrap;
}

/** Who waits for a worker, per model and key (GET /admin/queue, from the balancer). */
export async function renderQueue() {
  const queue = await getJSON("/admin/queue");
  const rows = [];
  for (const model of queue.models || []) {
    for (const k of model.keys || []) {
      const tr = document.createElement("tr");
      tr.append(cell(model.model), cell(k.name || k.key_id || "(no key)"), cell(k.priority ?? "—"),
        cell(String(k.weight ?? "—")), cell(String(k.waiting)), cell(String(k.running)),
        cell(`${Number(k.oldest_wait_s || 0).toFixed(1)} s`));
      rows.push(tr);
    }
  }
  $("queue-body").replaceChildren(...rows);
  $("queue-summary").textContent = `${queue.queue_depth ?? 0} waiting · scheduling ${queue.scheduling ?? "?"} · ` +
    `routing ${queue.routing ?? "?"}`;
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
    const limits = cell(limitsText(key.limits));
    if (!key.revoked) limits.append(schedulingControls(key, (change) => this.update(key, change)));
    tr.append(cell(key.name), cell(key.id), cell((key.scopes || []).join(", ")), limits,
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
    const body = { name: String(data.get("name") || "").trim(), scopes: data.getAll("scopes"), limits,
      priority: String(data.get("priority") || "interactive") };
    const weight = String(data.get("weight") || "").trim();
    if (weight) body.weight = Number(weight);
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

  async update(key, change) {
    try {
      await getJSON(`/admin/keys/${encodeURIComponent(key.id)}`, { method: "PATCH", body: change });
      $("key-message").textContent = `Key "${key.name}" is now ${change.priority}, weight ${change.weight}.`;
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
