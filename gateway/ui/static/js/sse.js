// Server-sent events from a fetch body: yields {event, data} per blank-line-separated block
// (and {event: "queued", data} for the balancer's ": queued ..." comments while a request waits).

export async function* readSSE(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = parseBlock(block);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** A ": queued position=N eta_s=X" comment (the balancer, while the request waits) as {ahead, etaS}. */
export function parseQueued(text) {
  const ahead = Number(/position=(\d+)/.exec(text)?.[1]);
  const etaS = Number(/eta_s=([\d.]+)/.exec(text)?.[1]);
  return { ahead: Number.isFinite(ahead) ? ahead : 0, etaS: Number.isFinite(etaS) ? etaS : null };
}

function parseBlock(block) {
  let event = "message";
  const data = [];
  let comment = null;
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) {
      comment = line.slice(1).trim();
      continue;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (data.length) return { event, data: data.join("\n") };
  return comment?.startsWith("queued ") ? { event: "queued", data: comment.slice(7) } : null;
}
