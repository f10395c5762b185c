// A small Markdown renderer for model output. Everything is HTML-escaped FIRST; the only tags in
// the result are the ones added here, so model text can never inject markup or script.

export function escapeHTML(text) {
  return String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

function inline(escaped) {
  const codes = [];
  let text = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
    codes.push(code);
    return `\u0000${codes.length - 1}\u0000`;
  });
  text = text
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>')
    .replace(/\[(\d{1,2})\]/g, '<sup class="cite-ref" data-cite="$1">[$1]</sup>');
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
}

function codeBlock(lang, body) {
  const cls = lang ? ` class="language-${lang}"` : "";
  return '<div class="code-block"><div class="code-head"><span>' + (lang || "code") + "</span>" +
    '<button type="button" class="copy-code" aria-label="Copy code">Copy</button></div>' +
    `<pre><code${cls}>${body}</code></pre></div>`;
}

function list(lines, ordered) {
  const tag = ordered ? "ol" : "ul";
  const items = lines.map((line) => `<li>${inline(line.replace(/^\s*(?:[-*+]|\d+[.)])\s+/, ""))}</li>`);
  return `<${tag}>${items.join("")}</${tag}>`;
}

function blocks(escaped) {
  const out = [];
  const lines = escaped.split("\n");
  let para = [];
  const flush = () => {
    if (para.length) out.push(`<p>${inline(para.join("<br>"))}</p>`);
    para = [];
  };
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 6); // keep model headings below the page's own
      out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
    } else if (/^\s*(?:[-*+]|\d+[.)])\s+/.test(line)) {
      flush();
      const ordered = /^\s*\d/.test(line);
      const items = [];
      while (i < lines.length && /^\s*(?:[-*+]|\d+[.)])\s+/.test(lines[i])) items.push(lines[i++]);
      i -= 1;
      out.push(list(items, ordered));
    } else if (/^&gt;\s?/.test(line)) {
      flush();
      out.push(`<blockquote>${inline(line.replace(/^&gt;\s?/, ""))}</blockquote>`);
    } else if (!line.trim()) {
      flush();
    } else {
      para.push(line);
    }
  }
  flush();
  return out.join("");
}

/** Markdown → safe HTML. An unclosed ``` fence (mid-stream) renders as code up to the end. */
export function renderMarkdown(source) {
  const escaped = escapeHTML(String(source || "").replace(/\u0000/g, "")); // NUL marks inline code below
  const parts = escaped.split(/^```/m);
  let html = "";
  for (let i = 0; i < parts.length; i += 1) {
    if (i % 2 === 0) {
      html += blocks(parts[i]);
    } else {
      const newline = parts[i].indexOf("\n");
      const lang = newline < 0 ? "" : parts[i].slice(0, newline).trim().replace(/[^\w+-]/g, "");
      const body = newline < 0 ? "" : parts[i].slice(newline + 1).replace(/\n$/, "");
      html += codeBlock(lang, body);
    }
  }
  return html;
}
