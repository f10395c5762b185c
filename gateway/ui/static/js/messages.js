// Rendering of chat messages: Markdown bodies, per-answer stats, citations, copy buttons.
import { escapeHTML, renderMarkdown } from "./markdown.js";

export function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.completion_tokens != null) parts.push(`${stats.completion_tokens} tokens`);
  if (stats.prompt_tokens != null) parts.push(`${stats.prompt_tokens} prompt`);
  if (stats.ttft_ms != null) parts.push(`first token ${Math.round(stats.ttft_ms)} ms`);
  if (stats.total_ms != null) parts.push(`${(stats.total_ms / 1000).toFixed(1)} s`);
  if (stats.completion_tokens && stats.total_ms) {
    parts.push(`${(stats.completion_tokens / (stats.total_ms / 1000)).toFixed(1)} tok/s`);
  }
  return parts.join(" · ");
}

function citationsHTML(citations) {
  if (!citations?.length) return "";
  const items = citations.map((c) => {
    const where = c.heading_path?.length ? ` — ${escapeHTML(c.heading_path.join(" › "))}` : "";
    const score = typeof c.score === "number" ? ` <span class="score">${c.score.toFixed(2)}</span>` : "";
    return `<li><button type="button" class="citation" data-index="${Number(c.index)}" aria-expanded="false">` +
      `[${Number(c.index)}] ${escapeHTML(c.title || c.document_id || "source")}${where}</button>${score}` +
      `<div class="chunk" hidden></div></li>`;
  });
  return `<div class="citations"><h3>Sources</h3><ol>${items.join("")}</ol></div>`;
}

/** Build (or rebuild) the element of one message. */
export function messageElement(message, index) {
  const el = document.createElement("article");
  el.className = `message ${message.role}`;
  el.dataset.index = String(index);
  el.setAttribute("aria-label", message.role === "user" ? "You said" : "Assistant answered");
  el.innerHTML = `<div class="who">${message.role === "user" ? "You" : "Assistant"}</div>` +
    '<div class="body"></div><div class="meta"></div><div class="cites"></div><div class="error" role="alert"></div>';
  updateMessage(el, message);
  return el;
}

export function updateMessage(el, message) {
  const body = el.querySelector(".body");
  if (message.role === "user") body.textContent = message.content;
  else body.innerHTML = renderMarkdown(message.content);
  const meta = [statsText(message.stats)];
  if (message.stopped) meta.push("stopped");
  el.querySelector(".meta").textContent = meta.filter(Boolean).join(" · ");
  el.querySelector(".cites").innerHTML = citationsHTML(message.citations);
  el.querySelector(".error").textContent = message.error || "";
  el.classList.toggle("has-error", Boolean(message.error));
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

/** One delegated listener for copy buttons and citation toggles inside the message log. */
export function wireMessageLog(log, { showChunk }) {
  log.addEventListener("click", async (event) => {
    const copy = event.target.closest(".copy-code");
    if (copy) {
      const code = copy.closest(".code-block").querySelector("code").textContent;
      copy.textContent = (await copyText(code)) ? "Copied" : "Copy failed";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
      return;
    }
    const ref = event.target.closest(".cite-ref");
    const button = event.target.closest(".citation") ||
      ref?.closest(".message")?.querySelector(`.citation[data-index="${ref.dataset.cite}"]`);
    if (!button) return;
    const panel = button.parentElement.querySelector(".chunk");
    const open = button.getAttribute("aria-expanded") !== "true";
    button.setAttribute("aria-expanded", String(open));
    panel.hidden = !open;
    if (open && !panel.textContent) {
      panel.textContent = "Loading the cited passage…";
      const index = Number(button.closest(".message").dataset.index);
      panel.textContent = await showChunk(index, Number(button.dataset.index));
    }
    if (ref) button.focus();
  });
}
