// The chat page's behaviour: the conversation (kept here, sent whole with every question, images
// included, as OpenAI's API expects), the composer (typed text, picked/pasted/dropped images), the
// running answer (streamed, stoppable) and the settings (API key, system prompt, sampling).
import { listModels, streamChat, describeError } from "./api.js";
import { prepareImage } from "./images.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "raylens.apiKey";
// raylens' caption prompt (the batch job's default); the server's model card names it, this is the fallback.
const CAPTION_PROMPT = "Provide a one-sentence caption for the provided image.";
const CONNECT_RETRIES = 40;

const state = {
  model: null,        // the served model's id (v1/models)
  limits: null,       // the server's request limits (the model card's `raylens` object)
  key: sessionStorage.getItem(KEY_STORE) || "",
  history: [],        // OpenAI messages of the turns that were answered
  attachments: [],    // prepared images waiting in the composer
  preparing: 0,       // images still being read or downscaled
  controller: null,   // AbortController of the running answer (New chat drops it: a late answer joins nothing)
};

const el = {
  thread: $("thread"), empty: $("empty"), limits: $("limits"), chat: $("chat"),
  prompt: $("prompt"), composer: $("composer"), tray: $("tray"), fileInput: $("file-input"),
  send: $("send"), stop: $("stop"), newChat: $("new-chat"), notice: $("notice"),
  modelName: $("model-name"), modelDot: $("model-dot"),
  settings: $("settings"), settingsToggle: $("settings-toggle"), keyNotice: $("key-notice"),
  apiKey: $("api-key"), saveKey: $("save-key"), systemPrompt: $("system-prompt"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), dropOverlay: $("drop-overlay"),
};

// ------------------------------------------------------------------------------ the server
async function connect(attempt = 0) {
  setModelStatus("wait", "connecting…");
  try {
    const [card] = await listModels(state.key);
    state.model = card.id;
    state.limits = card.raylens || null;
    setModelStatus("ok", card.id);
    el.keyNotice.hidden = true;
    showLimits();
    return true;
  } catch (error) {
    if (error.status === 401) {
      setModelStatus("down", "API key needed");
      askForKey(state.key ? "The server did not accept this API key." : "This server needs an API key.");
      return false;
    }
    setModelStatus("down", error.status === 0 ? "server unreachable" : `unavailable (${error.status})`);
    if (attempt < CONNECT_RETRIES) setTimeout(() => connect(attempt + 1), 3000);
    return false;
  }
}

function setModelStatus(kind, text) {
  el.modelDot.className = `dot ${kind}`;
  el.modelName.textContent = text;
}

function showLimits() {
  const l = state.limits;
  if (!l) return;
  const mp = (l.max_image_pixels / 1e6).toLocaleString(undefined, { maximumFractionDigits: 1 });
  el.limits.textContent = `Up to ${l.max_images} image${l.max_images === 1 ? "" : "s"} per conversation · ` +
    `images over ${mp} MP are downscaled in your browser · answers up to ${l.max_tokens_limit} tokens`;
  el.maxTokens.max = String(l.max_tokens_limit);
  el.maxTokens.placeholder = String(l.default_max_tokens);
}

function askForKey(message) {
  el.keyNotice.textContent = message;
  el.keyNotice.hidden = false;
  openSettings(true);
  el.apiKey.focus();
}

async function saveKey() {
  state.key = el.apiKey.value.trim();
  if (state.key) sessionStorage.setItem(KEY_STORE, state.key); else sessionStorage.removeItem(KEY_STORE);
  if (await connect()) openSettings(false);
}

function openSettings(open) {
  el.settings.hidden = !open;
  el.settingsToggle.setAttribute("aria-expanded", String(open));
}

// ------------------------------------------------------------------------------ composer
function imagesInConversation() {
  const inHistory = state.history.reduce((n, m) => n + (Array.isArray(m.content) ? m.content.filter((p) => p.type === "image_url").length : 0), 0);
  return inHistory + state.attachments.length + state.preparing;
}

async function addFiles(files) {
  const images = [...files].filter((f) => !f.type || f.type.startsWith("image/"));
  if (images.length < files.length) notify(`Only images can be attached (${files.length - images.length} other file${files.length - images.length === 1 ? "" : "s"} left out).`);
  const max = state.limits ? state.limits.max_images : Infinity;
  const room = max - imagesInConversation();
  if (images.length > room) {
    notify(`This server takes at most ${max} images per conversation, and every image stays in it. ` +
      (room > 0 ? `Only the first ${room} were attached; ` : "") + "start a new chat for more.");
  }
  const accepted = images.slice(0, Math.max(0, room));
  state.preparing += accepted.length;
  renderTray();
  await Promise.all(accepted.map(async (file) => {
    try {
      state.attachments.push(await prepareImage(file, state.limits));
    } catch (error) {
      notify(`Could not read ${file.name || "the image"}: ${error.message}`);
    } finally {
      state.preparing -= 1;
      renderTray();
    }
  }));
}

function describeImage(image) {
  if (!image.decoded) return "sent as it is (the browser cannot show it)";
  const size = `${image.width}×${image.height}`;
  return image.downscaled ? `${image.original.width}×${image.original.height} → ${size}, downscaled to the server's limit` : size;
}

function thumbnail(image) {
  if (image.decoded) {
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.name;
    return img;
  }
  const box = document.createElement("div");
  box.className = "file-box";
  box.textContent = image.name;
  return box;
}

function renderTray() {
  el.tray.replaceChildren();
  state.attachments.forEach((image, index) => {
    const chip = document.createElement("div");
    chip.className = "chip" + (image.downscaled ? " downscaled" : "");
    chip.title = `${image.name}: ${describeImage(image)}`;
    chip.append(thumbnail(image));
    const info = document.createElement("span");
    info.className = "chip-info";
    info.textContent = image.downscaled ? `${image.width}×${image.height} (downscaled)` : image.width ? `${image.width}×${image.height}` : "as is";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.textContent = "×";
    remove.addEventListener("click", () => {
      state.attachments.splice(index, 1);
      renderTray();
    });
    chip.append(info, remove);
    el.tray.append(chip);
  });
  for (let i = 0; i < state.preparing; i++) {
    const chip = document.createElement("div");
    chip.className = "chip loading";
    chip.textContent = "reading…";
    el.tray.append(chip);
  }
  el.tray.hidden = el.tray.childElementCount === 0;
  scrollDown();  // the composer grew or shrank: keep the newest message in view
}

let noticeTimer = null;
function notify(message) {
  el.notice.textContent = message;
  el.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.notice.hidden = true; }, 8000);
}

function autosize() {
  el.prompt.style.height = "auto";
  el.prompt.style.height = `${Math.min(el.prompt.scrollHeight, 200)}px`;
  scrollDown();
}

// ------------------------------------------------------------------------------ the thread
// The thread follows the newest text unless the reader scrolled up to read something older; it stays
// pinned also when the composer grows (attachments) and the thread's window shrinks.
let pinned = true;

function scrollDown(force = false) {
  if (force) pinned = true;
  if (pinned) el.chat.scrollTop = el.chat.scrollHeight;
}

function renderUser(text, images) {
  el.empty.hidden = true;
  const msg = document.createElement("article");
  msg.className = "msg user";
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  if (images.length) {
    const strip = document.createElement("div");
    strip.className = "images";
    for (const image of images) {
      const t = thumbnail(image);
      t.title = `${image.name}: ${describeImage(image)}`;
      strip.append(t);
    }
    bubble.append(strip);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  bubble.append(body);
  msg.append(bubble);
  el.thread.append(msg);
  scrollDown(true);
  return msg;
}

/** The assistant's message while it streams, and what it becomes: finished, stopped or failed. */
function renderAnswer() {
  const msg = document.createElement("article");
  msg.className = "msg assistant streaming";
  const avatar = document.createElement("img");
  avatar.className = "avatar";
  avatar.src = "web/icon.svg";
  avatar.alt = "";
  const body = document.createElement("div");
  body.className = "body";
  const text = document.createElement("div");
  text.className = "text";
  const typing = document.createElement("span");
  typing.className = "typing";
  typing.innerHTML = "<i></i><i></i><i></i>";
  text.append(typing);
  const meta = document.createElement("div");
  meta.className = "meta";
  body.append(text, meta);
  msg.append(avatar, body);
  el.thread.append(msg);
  scrollDown(true);
  let content = "";
  const node = document.createTextNode("");
  return {
    append(piece) {
      if (!content) text.replaceChildren(node);
      content += piece;
      node.data = content;
      scrollDown();
    },
    get text() { return content; },
    finished(result, seconds) {
      msg.classList.remove("streaming");
      const tokens = result.usage ? result.usage.completion_tokens : null;
      const parts = [result.model || state.model, tokens === null ? null : `${tokens} token${tokens === 1 ? "" : "s"}`, `${seconds.toFixed(2)} s`];
      if (result.finishReason === "length") parts.push("cut at max tokens");
      meta.textContent = parts.filter(Boolean).join(" · ");
      if (result.usage && result.firstTokenMs !== null) {
        meta.title = `prompt ${result.usage.prompt_tokens} tokens · first text after ${(result.firstTokenMs / 1000).toFixed(2)} s`;
      }
      if (!content) text.replaceChildren(emptyNote("(no text)"));
    },
    stopped(seconds) {
      msg.classList.remove("streaming");
      msg.classList.add("stopped");
      if (!content) text.replaceChildren(emptyNote("Stopped before the answer began."));
      meta.textContent = `stopped after ${seconds.toFixed(2)} s`;
    },
    failed(description) {
      msg.classList.remove("streaming");
      msg.classList.add("failed");
      if (!content) text.remove();
      const card = document.createElement("div");
      card.className = "error-card";
      card.setAttribute("role", "alert");
      const title = document.createElement("strong");
      title.textContent = description.title;
      const detail = document.createElement("p");
      detail.className = "detail";
      detail.textContent = description.detail;
      card.append(title, detail);
      if (description.hint) {
        const hint = document.createElement("p");
        hint.className = "hint";
        hint.textContent = description.hint;
        card.append(hint);
      }
      body.insertBefore(card, meta);
      scrollDown(true);
    },
  };
}

function emptyNote(text) {
  const span = document.createElement("span");
  span.className = "empty-note";
  span.textContent = text;
  return span;
}

// ------------------------------------------------------------------------------ asking
function requestOptions() {
  const options = { temperature: Number(el.temperature.value || 0) };
  const maxTokens = parseInt(el.maxTokens.value, 10);
  if (Number.isFinite(maxTokens)) options.max_tokens = maxTokens;
  if (state.model) options.model = state.model;
  return options;
}

function systemMessages() {
  const system = el.systemPrompt.value.trim();
  return system ? [{ role: "system", content: system }] : [];
}

async function ask() {
  if (state.controller) return;
  if (state.preparing) {
    notify("Still reading the images; send again in a moment.");
    return;
  }
  const typed = el.prompt.value.trim();
  const images = state.attachments;
  if (!typed && !images.length) return;
  const text = typed || (state.limits && state.limits.caption_prompt) || CAPTION_PROMPT;
  const userMessage = {
    role: "user",
    content: [...images.map((image) => ({ type: "image_url", image_url: { url: image.url } })), { type: "text", text }],
  };
  const userEl = renderUser(text, images);
  el.prompt.value = "";
  state.attachments = [];
  renderTray();
  autosize();

  const answer = renderAnswer();
  const controller = new AbortController();
  state.controller = controller;
  // Still this conversation's answer: neither New chat nor a later question has replaced it.
  const current = () => state.controller === controller;
  setBusy(true);
  const started = performance.now();
  const seconds = () => (performance.now() - started) / 1000;
  try {
    const result = await streamChat({ ...requestOptions(), messages: [...systemMessages(), ...state.history, userMessage] },
      { key: state.key, signal: controller.signal, onText: (piece) => answer.append(piece) });
    answer.finished(result, seconds());
    if (current()) state.history.push(userMessage, { role: "assistant", content: result.text });
  } catch (error) {
    if (!current()) {
      // New chat stopped it: that conversation is gone, nothing of it is kept
    } else if (error.name === "AbortError") {
      answer.stopped(seconds());
      if (answer.text) state.history.push(userMessage, { role: "assistant", content: answer.text });
      else userEl.classList.add("dropped");
    } else {
      answer.failed(describeError(error, state.limits));
      userEl.classList.add("dropped");
      userEl.title = "not part of the conversation: it was not answered";
      // The question goes back into the composer: fix what was wrong (a key, an image) and press Enter.
      if (!el.prompt.value) el.prompt.value = typed;
      state.attachments = [...images, ...state.attachments];
      renderTray();
      autosize();
      if (error.status === 401) askForKey("This server needs an API key.");
    }
  } finally {
    if (current()) {
      state.controller = null;
      setBusy(false);
    }
    if (document.activeElement !== el.apiKey) el.prompt.focus();
  }
}

function setBusy(busy) {
  el.send.hidden = busy;
  el.stop.hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  setBusy(false);
  state.history = [];
  state.attachments = [];
  renderTray();
  el.thread.replaceChildren(el.empty);
  el.empty.hidden = false;
  el.prompt.value = "";
  autosize();
  el.prompt.focus();
}

// ------------------------------------------------------------------------------ wiring
function imageFilesOf(dataTransfer) {
  return dataTransfer ? [...dataTransfer.files] : [];
}

function wire() {
  el.chat.addEventListener("scroll", () => {
    pinned = el.chat.scrollHeight - el.chat.scrollTop - el.chat.clientHeight < 40;
  });
  new ResizeObserver(() => scrollDown()).observe(el.chat);
  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    ask();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ask();
    }
  });
  el.prompt.addEventListener("input", autosize);
  el.stop.addEventListener("click", () => state.controller && state.controller.abort());
  el.newChat.addEventListener("click", newChat);
  el.fileInput.addEventListener("change", () => {
    addFiles(el.fileInput.files);
    el.fileInput.value = "";
  });
  document.addEventListener("paste", (event) => {
    const files = imageFilesOf(event.clipboardData).filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  let dragDepth = 0;
  const dragsFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!dragsFiles(event)) return;
    dragDepth += 1;
    el.dropOverlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.dropOverlay.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (dragsFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    if (!dragsFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.dropOverlay.hidden = true;
    addFiles(imageFilesOf(event.dataTransfer));
  });
  el.settingsToggle.addEventListener("click", () => openSettings(el.settings.hidden));
  el.saveKey.addEventListener("click", saveKey);
  el.apiKey.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      event.preventDefault();
      saveKey();
    }
  });
  el.apiKey.value = state.key;
}

wire();
connect();
el.prompt.focus();
