// The admin dashboard: workers, throughput and latency charts, cache, GPU, prompt-prefix reuse, models, batches,
// users, keys, collections.
import { ApiError, getJSON, request } from "./api.js";
import { KeysPanel, renderQueue } from "./admin_keys.js";
import { endpointPanels, labelCellsOnChange, renderReuse } from "./admin_panels.js";
import { Series, drawChart } from "./charts.js";
import { parseMetrics, sum } from "./prom.js";
import { setupSignIn } from "./signin.js";

const $ = (id) => document.getElementById(id);
const INTERVAL_MS = Number(new URLSearchParams(location.search).get("interval")) || 2000;
const GENERATION_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses"];
const tokensPerSecond = new Series();
const latencySeconds = new Series();
const BATCHES_EVERY = 5; // ticks between two reads of the batch list (users: on load and on request)
let previous = null;
let timer = null;
let ticks = 0;

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text ?? "—";
  if (className) td.className = className;
  return td;
}

function renderWorkers(status) {
  const workers = status.workers || [];
  $("workers-body").replaceChildren(...workers.map((w) => {
    const tr = document.createElement("tr");
    tr.className = "worker";
    const healthy = w.healthy && w.state !== "draining";
    tr.append(cell(w.url), cell(w.model), cell(w.state, healthy ? "ok" : "bad"),
      cell(`${w.slots_busy_reported ?? "?"} / ${w.slots ?? "?"}`), cell(String(w.inflight ?? 0)),
      cell(String(w.requests ?? 0)), cell(String(w.errors ?? 0)), cell(w.last_error || ""));
    return tr;
  }));
  const health = status.balancer?.health || {};
  $("workers-summary").textContent = `${health.healthy_workers ?? 0} of ${workers.length} healthy · ` +
    `balancer queue ${health.queue_depth ?? 0} · balancer ${status.balancer?.up ? "up" : "DOWN"} · ` +
    `redis ${status.redis ? "up" : "DOWN"}`;
  const rate = status.cache?.hit_rate;
  $("cache-rate").textContent = rate == null ? "no lookups yet" : `${(rate * 100).toFixed(1)} %`;
  $("cache-counts").textContent = `${status.cache?.hits ?? 0} hits · ${status.cache?.misses ?? 0} misses`;
  renderGpu(status.gpu);
  renderReuse(workers);
}

function renderGpu(gpus) {
  if (!Array.isArray(gpus) || !gpus.length) {
    $("gpu").textContent = "No GPU reported (CPU inference, or GPU metrics are in Prometheus/Grafana).";
    return;
  }
  $("gpu").textContent = gpus.map((g) => `${g.name || g.uuid}: ${Math.round((g.utilization ?? 0) * 100)} % busy, ` +
    `${((g.memory_used_bytes ?? 0) / 2 ** 30).toFixed(1)} / ${((g.memory_total_bytes ?? 0) / 2 ** 30).toFixed(1)} GiB`)
    .join("; ");
}

function sample(samples) {
  const latency = { sum: 0, count: 0 };
  for (const route of GENERATION_ROUTES) {
    latency.sum += sum(samples, "appliance_gateway_request_seconds_sum", { route });
    latency.count += sum(samples, "appliance_gateway_request_seconds_count", { route });
  }
  return { at: Date.now(), tokens: sum(samples, "appliance_gateway_tokens_total", { kind: "completion" }), latency };
}

function updateCharts(now) {
  if (previous) {
    const seconds = Math.max(0.001, (now.at - previous.at) / 1000);
    tokensPerSecond.push(Math.max(0, now.tokens - previous.tokens) / seconds, now.at);
    const count = now.latency.count - previous.latency.count;
    if (count > 0) latencySeconds.push((now.latency.sum - previous.latency.sum) / count, now.at);
  }
  previous = now;
  drawChart($("chart-tokens"), tokensPerSecond, "tokens/s");
  drawChart($("chart-latency"), latencySeconds, "s");
}

async function renderCollections() {
  try {
    const found = (await getJSON("/v1/collections")).collections || [];
    $("collections-body").replaceChildren(...found.map((c) => {
      const tr = document.createElement("tr");
      tr.append(cell(c.name), cell(String(c.documents ?? 0)), cell(String(c.chunks ?? 0)));
      return tr;
    }));
  } catch (err) {
    $("collections-note").textContent = err instanceof ApiError ? err.friendly : String(err);
  }
}

async function tick() {
  try {
    const [status, metricsText] = await Promise.all([
      getJSON("/admin/status"), request("/metrics").then((r) => r.text()),
    ]);
    renderWorkers(status);
    updateCharts(sample(parseMetrics(metricsText)));
    renderQueue().catch((err) => { $("queue-summary").textContent = err instanceof ApiError ? err.friendly : String(err); });
    panels.models.refresh();
    if (ticks % BATCHES_EVERY === 0) panels.batches.refresh();
    ticks += 1;
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (err.status === 401 || err.status === 403) return lost(err);
    $("updated").textContent = err instanceof ApiError ? err.friendly : String(err);
  }
  timer = setTimeout(tick, INTERVAL_MS);
}

function lost(err) {
  clearTimeout(timer);
  signin.signOut(err.friendly);
}

const keys = new KeysPanel({ onAuthLost: lost });
const panels = endpointPanels(lost);
for (const table of document.querySelectorAll("table.stack")) labelCellsOnChange(table);
const signin = setupSignIn({
  verify: (key) => getJSON("/admin/status", { key }),
  onReady: () => {
    clearTimeout(timer);
    ticks = 0;
    tick();
    panels.users.refresh();
    keys.refresh().catch((err) => keys.report(err));
    renderCollections();
  },
});
$("refresh-keys").addEventListener("click", () => keys.refresh().catch((err) => keys.report(err)));
$("refresh-batches").addEventListener("click", () => panels.batches.refresh());
$("refresh-users").addEventListener("click", () => panels.users.refresh());
