// Documents for retrieval: pick or create a collection, upload files (drag and drop, with progress),
// and look up the passage a citation points at.
import { ApiError, authHeaders, getJSON, request } from "./api.js";

const $ = (id) => document.getElementById(id);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function uploadWithProgress(url, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    for (const [name, value] of Object.entries(authHeaders("POST"))) xhr.setRequestHeader(name, value); // key or session
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) onProgress(e.loaded / e.total);
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // keep null
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve({ status: xhr.status, body });
      else {
        const retry = Number.parseFloat(xhr.getResponseHeader("Retry-After") || "");
        reject(new ApiError(xhr.status, body?.error?.message || `Upload failed (${xhr.status}).`,
          body?.error?.code ?? null, Number.isFinite(retry) ? retry : null));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network error")));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

async function waitForJob(jobId, onProgress) {
  for (;;) {
    const job = await getJSON(`/v1/jobs/${encodeURIComponent(jobId)}`);
    if (typeof job.progress === "number") onProgress(job.progress);
    if (job.state === "succeeded") return job.result;
    if (job.state === "failed") throw new ApiError(job.error?.status || 500, job.error?.message || "Indexing failed.");
    await new Promise((r) => setTimeout(r, 500));
  }
}

export class RagPanel {
  constructor({ onError, onAuthLost }) {
    this.onError = onError;
    this.onAuthLost = onAuthLost;
    this.select = $("collection");
    this.status = $("upload-status");
    this.progress = $("upload-progress");
    this.passages = new Map(); // "collection|query|top_k" -> search results
    $("collection-form").addEventListener("submit", (e) => this.create(e));
    $("file-input").addEventListener("change", (e) => this.uploadFiles(e.target.files));
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      this.uploadFiles(e.dataTransfer.files);
    });
  }

  get collection() {
    return this.select.value;
  }

  async refresh(selected = this.select.value) {
    let collections = [];
    try {
      collections = (await getJSON("/v1/collections")).collections || [];
      $("rag-panel").hidden = false;
    } catch (err) {
      if (err.status === 401) return this.onAuthLost(err);
      $("rag-panel").hidden = err.status === 403; // this key may not use documents
      return;
    }
    this.select.replaceChildren(new Option("No documents (plain chat)", ""));
    for (const c of collections) {
      this.select.append(new Option(`${c.name} (${plural(c.documents ?? 0, "document")})`, c.name));
    }
    if ([...this.select.options].some((o) => o.value === selected)) this.select.value = selected;
  }

  async create(event) {
    event.preventDefault();
    const input = $("new-collection");
    const name = input.value.trim().toLowerCase();
    if (!name) return;
    try {
      await request("/v1/collections", { method: "POST", body: { name } });
      input.value = "";
      await this.refresh(name);
      this.status.textContent = `Collection "${name}" created.`;
    } catch (err) {
      this.report(err);
    }
  }

  async uploadFiles(files) {
    const name = this.collection;
    if (!name) {
      this.status.textContent = "Choose or create a collection first.";
      return;
    }
    for (const file of files) {
      this.progress.hidden = false;
      this.progress.value = 0;
      this.status.textContent = `Uploading ${file.name}…`;
      try {
        const url = `/v1/collections/${encodeURIComponent(name)}/documents`;
        let { status, body } = await uploadWithProgress(url, file, (p) => { this.progress.value = p * 0.5; });
        if (status === 202) {
          this.status.textContent = `Indexing ${file.name}…`;
          body = await waitForJob(body.job_id, (p) => { this.progress.value = 0.5 + p * 0.5; });
        }
        this.progress.value = 1;
        const dup = body?.duplicate ? " (already there)" : "";
        this.status.textContent = `Indexed "${body?.title || file.name}": ${plural(body?.chunks ?? 0, "passage")}${dup}.`;
      } catch (err) {
        this.report(err);
      }
    }
    this.progress.hidden = true;
    await this.refresh(name);
  }

  report(err) {
    if (err.status === 401) this.onAuthLost(err);
    else this.status.textContent = err instanceof ApiError ? err.friendly : String(err);
  }

  /** The text of a cited passage: the same search the gateway ran, matched by chunk id. */
  async passage(collection, query, topK, citation) {
    const cacheKey = `${collection}|${topK}|${query}`;
    try {
      if (!this.passages.has(cacheKey)) {
        const found = await getJSON(`/v1/collections/${encodeURIComponent(collection)}/search`,
          { method: "POST", body: { query, top_k: topK } });
        this.passages.set(cacheKey, found.results || []);
      }
      const hit = this.passages.get(cacheKey).find((r) => r.chunk_id === citation.chunk_id);
      return hit ? hit.text : "This passage is no longer in the collection.";
    } catch (err) {
      return err instanceof ApiError ? err.friendly : String(err);
    }
  }
}
