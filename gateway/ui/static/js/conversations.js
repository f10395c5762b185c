// Conversations kept in this browser's localStorage (never on the server), and their export.
// Each person's under their own storage key (appliance.conversations:<scope>, the scope from signin.js:
// user:<subject> or key:<digest of the key>), so on a shared browser the next person signed in does not see
// them. Conversations stored before scopes existed go to the first person who signs in.

const STORE = "appliance.conversations";

function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`;
}

export class Conversations {
  constructor(storage = localStorage) {
    this.storage = storage;
    this.key = null; // no one signed in: nothing is read or kept
    this.items = [];
    this.currentId = null;
  }

  /** Show and keep the conversations of `scope` (a signed-in person); the previous person's leave the page. */
  useScope(scope) {
    this.key = `${STORE}:${scope}`;
    try {
      const legacy = this.storage.getItem(STORE);
      if (legacy !== null) {
        if (this.storage.getItem(this.key) === null) this.storage.setItem(this.key, legacy);
        this.storage.removeItem(STORE);
      }
    } catch {
      // storage disabled: conversations live in the page only
    }
    this.items = this.load();
    this.currentId = this.items[0]?.id ?? null;
  }

  /** Signed out: the page forgets them (they stay stored under their person's key). */
  clear() {
    this.key = null;
    this.items = [];
    this.currentId = null;
  }

  load() {
    if (!this.key) return [];
    try {
      const parsed = JSON.parse(this.storage.getItem(this.key) || "[]");
      return Array.isArray(parsed) ? parsed.filter((c) => c && Array.isArray(c.messages)) : [];
    } catch {
      return [];
    }
  }

  save() {
    if (!this.key) return;
    try {
      this.storage.setItem(this.key, JSON.stringify(this.items));
    } catch {
      // storage full or disabled: the conversation still lives in the page
    }
  }

  get current() {
    return this.items.find((c) => c.id === this.currentId) ?? null;
  }

  create() {
    const conversation = { id: newId(), title: "New chat", messages: [], updated: Date.now() };
    this.items.unshift(conversation);
    this.currentId = conversation.id;
    this.save();
    return conversation;
  }

  ensure() {
    return this.current ?? this.create();
  }

  select(id) {
    if (this.items.some((c) => c.id === id)) this.currentId = id;
  }

  remove(id) {
    this.items = this.items.filter((c) => c.id !== id);
    if (this.currentId === id) this.currentId = this.items[0]?.id ?? null;
    this.save();
  }

  touch(conversation) {
    conversation.updated = Date.now();
    const firstUser = conversation.messages.find((m) => m.role === "user");
    if (firstUser && conversation.title === "New chat") conversation.title = firstUser.content.slice(0, 60);
    this.save();
  }
}

export function toMarkdown(conversation) {
  const lines = [`# ${conversation.title}`, ""];
  for (const message of conversation.messages) {
    lines.push(`## ${message.role === "user" ? "You" : "Assistant"}`, "", message.content, "");
    for (const c of message.citations || []) lines.push(`- [${c.index}] ${c.title || c.document_id}`);
    if (message.citations?.length) lines.push("");
  }
  return lines.join("\n");
}

export function toJSON(conversation) {
  return JSON.stringify(conversation, null, 2);
}

/** Offer text as a file download (no server round trip). */
export function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
