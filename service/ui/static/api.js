// The page's only way to the service: the public /v1 API, as any client calls it, and the API's own description.
// Errors come back as the server's {code, message, details}, so the page can show its messages as they are.

const KEY_STORAGE = "graft.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `the service answered ${status}`);
    this.status = status;
    this.code = body.code || "unknown";
    this.details = body.details || {};
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function authHeaders(key = apiKey()) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = { message: `the service answered ${response.status} ${response.statusText}` };
  }
  return new ApiError(response.status, body);
}

/** fetch under /v1 with the key; JSON in and out. Throws ApiError with the server's message. */
export async function call(path, { method = "GET", json, key } = {}) {
  const headers = authHeaders(key);
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`/v1/${path}`, {
    method,
    headers,
    body: json === undefined ? undefined : JSON.stringify(json),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

let schemas = null;

/** The JSON schemas of the service's OpenAPI document (public, like /docs), fetched once. The head kinds, what
 * each takes, the training objectives, class weightings and scalings, and the export formats come from there: the
 * page lists none of its own. */
export async function apiSchemas() {
  if (!schemas) {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw await errorOf(response);
    schemas = (await response.json()).components.schemas;
  }
  return schemas;
}

/** POST multipart (no progress needed): fetch with the key; JSON out. */
export async function postForm(path, form) {
  const response = await fetch(`/v1/${path}`, { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Every item of a paged list (`heads`, `datasets`, ...). */
export async function listAll(collection) {
  const items = [];
  let token = "";
  do {
    const page = await call(`${collection}?page_size=200${token ? `&page_token=${encodeURIComponent(token)}` : ""}`);
    items.push(...page[collection]);
    token = page.next_page_token;
  } while (token);
  return items;
}

/** POST multipart with XMLHttpRequest: fetch cannot report upload progress. onProgress gets 0..1. */
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/${path}`);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      let body = {};
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = { message: `the service answered ${xhr.status} ${xhr.statusText}` };
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, { message: "the upload failed: the service could not be reached" })));
    xhr.send(form);
  });
}

/** Follow a job's server-sent events (`GET /v1/jobs/{id}:watch`) until it is done; onUpdate gets each Job.
 * fetch, not EventSource: EventSource cannot send the Authorization header. */
export async function watchJob(name, onUpdate) {
  const response = await fetch(`/v1/${name}:watch`, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event.type === "error") throw new ApiError(401, JSON.parse(event.data));
      if (event.data) {
        last = JSON.parse(event.data);
        onUpdate(last);
      }
    }
  }
  return last;
}

function parseEvent(text) {
  const event = { type: "message", data: "" };
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) event.type = line.slice(6).trim();
    else if (line.startsWith("data:")) event.data += line.slice(5).trimStart();
  }
  return event;
}

/** Download a head export with the key (a plain link could not send it), under the server's file name. */
export async function download(path) {
  const response = await fetch(`/v1/${path}`, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  const disposition = response.headers.get("Content-Disposition") || "";
  const fileName = (disposition.match(/filename="([^"]+)"/) || [null, "head"])[1];
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: fileName });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** An image the API serves (it needs the key, which an <img src> cannot send) as an object URL to show. */
export async function imageUrl(path) {
  const response = await fetch(`/v1/${path}`, { headers: authHeaders() });
  if (!response.ok) throw await errorOf(response);
  return URL.createObjectURL(await response.blob());
}
