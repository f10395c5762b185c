// The chat page: sign in, models, conversations, composer (Enter sends, Shift+Enter newline, Esc stops).
import { getJSON } from "./api.js";
import { Conversations, download, toJSON, toMarkdown } from "./conversations.js";
import { Drawer } from "./drawer.js";
import { streamAnswer } from "./generate.js";
import { messageElement, updateMessage, wireMessageLog } from "./messages.js";
import { RagPanel } from "./rag.js";
import { setupSignIn } from "./signin.js";
import { trackViewportHeight } from "./viewport.js";

const $ = (id) => document.getElementById(id);
const store = new Conversations();
const state = { controller: null, models: [] };
const log = $("messages");
const input = $("prompt");
const drawer = new Drawer({ toggle: $("sidebar-toggle"), panel: $("sidebar"), backdrop: $("drawer-backdrop"),
  root: $("app"), inert: [document.querySelector(".chat"), $("model"), document.querySelector(".topbar .links")] });
trackViewportHeight(document.documentElement);

/** After a choice in the sidebar: on a phone the drawer closes (focus back on its button), else the prompt. */
function chosen() {
  if (!drawer.close()) input.focus();
}

function announce(text) {
  $("banner").textContent = text;
  $("banner").hidden = !text;
}

function renderList() {
  const list = $("conversation-list");
  list.replaceChildren(...store.items.map((c) => {
    const li = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open-conversation";
    open.textContent = c.title || "New chat";
    if (c.id === store.currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => { store.select(c.id); renderAll(); chosen(); });
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete-conversation";
    del.textContent = "×";
    del.setAttribute("aria-label", `Delete conversation ${c.title}`);
    del.addEventListener("click", () => { store.remove(c.id); renderAll(); });
    li.append(open, del);
    return li;
  }));
}

function renderMessages() {
  const conversation = store.current;
  const messages = conversation?.messages ?? [];
  log.replaceChildren(...messages.map((m, i) => messageElement(m, i)));
  $("empty-hint").hidden = messages.length > 0;
  const last = messages[messages.length - 1];
  $("regenerate").disabled = Boolean(state.controller) || !last || last.role !== "assistant";
  log.scrollTop = log.scrollHeight;
}

function renderAll() {
  renderList();
  renderMessages();
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("send").hidden = busy;
  $("regenerate").disabled = busy;
  document.body.classList.toggle("busy", busy);
}

async function run(conversation) {
  const assistant = { role: "assistant", content: "" };
  conversation.messages.push(assistant);
  renderAll();
  const el = log.lastElementChild;
  el.setAttribute("aria-busy", "true");
  el.classList.add("streaming");
  state.controller = new AbortController();
  setBusy(true);
  announce("");
  const queued = (e) => {
    if (!assistant.content) el.querySelector(".meta").textContent = `waiting: ${e.detail.ahead} ahead`;
  };
  window.addEventListener("appliance:queued", queued);
  const error = await streamAnswer({
    conversation, assistant, model: $("model").value, collection: rag.collection,
    maxTokens: answerLimit(), signal: state.controller.signal,
    onUpdate: () => {
      // Follow the answer only while the reader is at the end: scrolled up to read, they stay where they are.
      const following = log.scrollHeight - log.scrollTop - log.clientHeight < 48;
      updateMessage(el, assistant);
      if (following) log.scrollTop = log.scrollHeight;
    },
  });
  window.removeEventListener("appliance:queued", queued);
  state.controller = null;
  setBusy(false);
  el.removeAttribute("aria-busy");
  el.classList.remove("streaming");
  updateMessage(el, assistant);
  store.touch(conversation);
  renderList();
  $("regenerate").disabled = false;
  if (error?.status === 401) signin.signOut(error.friendly);
  else if (error) announce(error.friendly);
  input.focus();
}

function send() {
  const text = input.value.trim();
  if (!text || state.controller) return;
  const conversation = store.ensure();
  conversation.messages.push({ role: "user", content: text });
  input.value = "";
  store.touch(conversation);
  run(conversation);
}

function regenerate() {
  const conversation = store.current;
  if (!conversation || state.controller) return;
  while (conversation.messages.at(-1)?.role === "assistant") conversation.messages.pop();
  if (conversation.messages.length) run(conversation);
}

function stop() {
  state.controller?.abort();
}

async function showChunk(messageIndex, citationIndex) {
  const message = store.current?.messages[messageIndex];
  const citation = message?.citations?.find((c) => c.index === citationIndex);
  if (!citation || !message.rag) return "This source is not available.";
  return rag.passage(message.rag.collection, message.rag.query, message.rag.top_k, citation);
}

/** The selected model's longest answer, as its workers publish it on /v1/models (null: not published). */
function modelMaxTokens() {
  const model = state.models.find((m) => m.id === $("model").value);
  return model && Number.isInteger(model.max_tokens) && model.max_tokens > 0 ? model.max_tokens : null;
}

/** The "Longest answer" control follows the selected model's limit: its maximum, and a value within it. */
function applyLimits() {
  const field = $("max-tokens");
  const cap = modelMaxTokens();
  if (cap === null) {
    field.removeAttribute("max");
    return;
  }
  field.max = String(cap);
  if (Number(field.value) > cap) field.value = String(cap);
}

function answerLimit() {
  const asked = Number($("max-tokens").value) || undefined;
  const cap = modelMaxTokens();
  return asked && cap !== null ? Math.min(asked, cap) : asked;
}

async function loadModels() {
  const select = $("model");
  const remembered = localStorage.getItem("appliance.model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (state.models.some((m) => m.id === remembered)) select.value = remembered;
  applyLimits();
}

async function verify(key) {
  const models = await getJSON("/v1/models", { key });
  state.models = models.data || [];
}

const rag = new RagPanel({ onError: announce, onAuthLost: (err) => signin.signOut(err.friendly) });
const signin = setupSignIn({
  verify,
  onReady: (scope) => {
    drawer.close(); // left open when the session ended
    store.useScope(scope); // this person's conversations, not the last one's on this browser
    loadModels();
    rag.refresh();
    renderAll();
    input.focus();
  },
  onSignOut: () => {
    stop();
    store.clear();
    renderAll();
  },
});

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !e.defaultPrevented && state.controller) stop(); });
$("stop").addEventListener("click", stop);
$("regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", () => { store.create(); renderAll(); chosen(); });
$("model").addEventListener("change", (e) => {
  localStorage.setItem("appliance.model", e.target.value);
  applyLimits();
});
$("max-tokens").addEventListener("change", applyLimits);
$("export-md").addEventListener("click", () => {
  const c = store.current;
  if (c) download(`${c.title.replace(/[^\w-]+/g, "_")}.md`, toMarkdown(c), "text/markdown");
});
$("export-json").addEventListener("click", () => {
  const c = store.current;
  if (c) download(`${c.title.replace(/[^\w-]+/g, "_")}.json`, toJSON(c), "application/json");
});
wireMessageLog(log, { showChunk });
