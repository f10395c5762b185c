// One streamed answer: send the conversation, grow the assistant message as chunks arrive,
// record tokens, latency and citations; a stop (abort) keeps what was already written.
import { ApiError, streamChat } from "./api.js";

function lastUserText(messages) {
  for (let i = messages.length - 1; i >= 0; i -= 1) if (messages[i].role === "user") return messages[i].content;
  return "";
}

/**
 * Stream into `assistant` (already appended to `conversation.messages`).
 * `onUpdate()` is called (at most once a frame) as text arrives. Returns the ApiError, if any.
 */
export async function streamAnswer({ conversation, assistant, model, collection, maxTokens, signal, onUpdate }) {
  const history = conversation.messages
    .filter((m) => m !== assistant && m.content)
    .map(({ role, content }) => ({ role, content }));
  const body = { model, messages: history, stream_options: { include_usage: true } };
  if (maxTokens) body.max_tokens = maxTokens;
  if (collection) {
    body.rag = { collection, top_k: 4 };
    assistant.rag = { collection, top_k: 4, query: lastUserText(history) };
  }
  const started = performance.now();
  let pending = false;
  let chunks = 0;
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; onUpdate(); });
  };
  const finishStats = () => {
    const stats = assistant.stats || {};
    stats.total_ms = performance.now() - started;
    if (stats.completion_tokens == null && chunks) stats.completion_tokens = chunks; // about one token a chunk
    assistant.stats = stats;
  };
  try {
    await streamChat(body, {
      signal,
      onChunk: (chunk) => {
        const delta = chunk.choices?.[0]?.delta?.content ?? chunk.choices?.[0]?.text;
        if (delta) {
          assistant.stats ??= { ttft_ms: performance.now() - started };
          assistant.content += delta;
          chunks += 1;
          schedule();
        }
        if (chunk.usage) {
          assistant.stats = { ...assistant.stats, prompt_tokens: chunk.usage.prompt_tokens,
            completion_tokens: chunk.usage.completion_tokens };
        }
        if (Array.isArray(chunk.citations)) assistant.citations = chunk.citations;
      },
    });
    return null;
  } catch (err) {
    if (err.name === "AbortError") {
      assistant.stopped = true;
      return null;
    }
    const error = err instanceof ApiError ? err : new ApiError(0, String(err));
    assistant.error = error.friendly;
    return error;
  } finally {
    if (assistant.content || assistant.stopped) finishStats(); // a refused request has no stats to show
  }
}
