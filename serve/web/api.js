// The page's only contact with the server: GET v1/models and a streamed POST v1/chat/completions, the
// same OpenAI API every other client uses (no private routes). Written by hand because the page has no
// build step and loads nothing from a CDN; OpenAI's server-sent events are a small format.

/** A failed call: the HTTP status (0: the server could not be reached; "stream": an error event after the
 *  answer began) and the fields of OpenAI's error body. */
export class ApiError extends Error {
  constructor(status, message, { type = null, code = null, param = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
    this.retryAfter = retryAfter;
  }
}

/** The folder the page was served from, so the API is found also under a route prefix (`/chat/`). */
export function apiBase(pathname = location.pathname) {
  const path = pathname.replace(/index\.html$/, "");
  return path.endsWith("/") ? path : path + "/";
}

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON (a proxy's page, say): the status line says enough
  }
  const message = (error && error.message) || `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, message, {
    type: error?.type ?? null, code: error?.code ?? null, param: error?.param ?? null,
    retryAfter: response.headers.get("Retry-After"),
  });
}

async function send(path, init) {
  try {
    return await fetch(apiBase() + path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, `the server did not answer (${exc.message})`);
  }
}

/** The models this server runs (OpenAI's model cards; ours carry a `raylens` object with the limits). */
export async function listModels(key) {
  const response = await send("v1/models", { headers: headers(key) });
  if (!response.ok) throw await errorOf(response);
  return (await response.json()).data;
}

/** Splits server-sent events into their `data:` payloads, whatever the network's chunking. */
export class SseParser {
  constructor() {
    this.buffer = "";
  }

  /** Adds received text; returns the payloads of the events it completed. */
  push(text) {
    this.buffer += text;
    const payloads = [];
    for (;;) {
      const match = /\r?\n\r?\n/.exec(this.buffer);
      if (!match) return payloads;
      const block = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) payloads.push(data);
    }
  }
}

/**
 * Streams one answer. `body` is a chat request without `stream`; `onText(piece)` gets the text as it
 * arrives. Resolves to {text, finishReason, usage, model, firstTokenMs, totalMs}; rejects with an
 * ApiError, or with an AbortError when `signal` stops it (the text so far went to onText already).
 */
export async function streamChat(body, { key, signal, onText }) {
  const started = performance.now();
  const response = await send("v1/chat/completions", {
    method: "POST", headers: headers(key), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await errorOf(response);
  const result = { text: "", finishReason: null, usage: null, model: null, firstTokenMs: null, totalMs: null };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SseParser();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (const data of parser.push(value)) {
      if (data === "[DONE]") {
        result.totalMs = performance.now() - started;
        return result;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new ApiError("stream", chunk.error.message || "the answer failed", chunk.error);
      }
      result.model = chunk.model || result.model;
      if (chunk.usage) result.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        if (result.firstTokenMs === null) result.firstTokenMs = performance.now() - started;
        result.text += piece;
        onText(piece);
      }
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
    }
  }
  throw new ApiError("stream", "the connection closed before the answer was complete");
}

/** What a person should read for a failure: a title, the server's own words, and what to do. */
export function describeError(error, limits) {
  if (!(error instanceof ApiError)) {
    return { title: "Something went wrong in the page", detail: String(error && error.message || error), hint: "" };
  }
  const mb = (n) => `${(n / 1048576).toFixed(n < 10485760 ? 1 : 0)} MB`;
  const mp = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 1 : 0)} MP`;
  switch (error.status) {
    case 0:
      return { title: "Cannot reach the server", detail: error.message, hint: "Check that the endpoint is still running, then send again." };
    case 400:
      return { title: "The server could not use this request", detail: error.message, hint: "" };
    case 401:
      return { title: "API key needed", detail: error.message, hint: "Enter the server's API key in the settings above, then send again." };
    case 404:
      return { title: "Not found", detail: error.message, hint: "" };
    case 413: {
      const caps = limits ? ` This server takes images of at most ${mp(limits.max_image_pixels)} and ${mb(limits.max_image_bytes)}, and requests of at most ${mb(limits.max_body_bytes)}.` : "";
      return { title: "Too large", detail: error.message, hint: `Remove that image, or start a new chat if the conversation has grown too big.${caps}` };
    }
    case 429:
    case 503: {
      const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : " Try again in a moment.";
      return { title: "The model is busy", detail: error.message, hint: `The server is at capacity.${wait}` };
    }
    case "stream":
      return { title: "The answer failed", detail: error.message, hint: "Send again to retry." };
    default:
      return { title: `Server error (${error.status})`, detail: error.message, hint: "The server's log has the details." };
  }
}
