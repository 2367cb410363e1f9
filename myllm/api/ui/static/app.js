// myllm's chat page: the native API (/api/models, /api/chat with SSE, /api/sessions) and
// nothing else. Every text from a model or a stored message goes into the page through
// textContent, never as HTML, so no markup in it can run. A thinking model's thinking (the
// API's `thinking` events and field) is folded above its answer, as plain text. Images (attached
// by the button, pasted or dropped) go to a vision model as the message's `images`.
"use strict";

const $ = (id) => document.getElementById(id);
let sessionId = null;
let controller = null;

function headers(json) {
  const h = {};
  const key = localStorage.getItem("myllm-key");
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  if (response.status === 401) {
    askForKey(localStorage.getItem("myllm-key") ? "That key was refused." : "");
    throw new Error("unauthorized");
  }
  return response;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

// -- Markdown, as text nodes: fenced code blocks, inline code, bold; links stay text.
function element(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

function inline(parent, text) {
  const parts = text.split(/(`[^`\n]+`|\*\*[^*\n]+\*\*)/);
  for (const part of parts) {
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) parent.append(element("code", part.slice(1, -1)));
    else if (part.startsWith("**") && part.endsWith("**") && part.length > 3) parent.append(element("strong", part.slice(2, -2)));
    else if (part) parent.append(document.createTextNode(part));
  }
}

function render(body, text) {
  body.replaceChildren();
  const blocks = text.split(/^```[^\n]*\n?/m);
  blocks.forEach((block, i) => {
    if (i % 2 === 1) {
      const pre = element("pre");
      pre.append(element("code", block.replace(/\n$/, "")));
      body.append(pre);
    } else {
      for (const para of block.split(/\n{2,}/)) {
        if (!para.trim()) continue;
        const p = element("p");
        inline(p, para);
        body.append(p);
      }
    }
  });
}

function addMessage(role, text, thinking, images = []) {
  const article = element("article");
  article.dataset.role = role;
  const body = element("div");
  body.className = "body";
  article.append(body);
  render(body, text);
  if (images.length) imageRow(article, images.length).forEach((img, i) => { img.src = images[i]; });
  if (thinking) setThinking(article, thinking, false);
  const meta = element("div");
  meta.className = "meta";
  if (role === "assistant") {
    const copy = element("button", "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => navigator.clipboard.writeText(article.dataset.text || ""));
    meta.append(copy);
  }
  article.append(meta);
  article.dataset.text = text;
  $("messages").append(article);
  article.scrollIntoView({ block: "end" });
  return article;
}

function setText(article, text) {
  article.dataset.text = text;
  render(article.querySelector(".body"), text);
}

// The thinking goes in a <details> above the answer, made open while it streams in (`open`)
// and closed for a stored answer; no Markdown: the text as the model wrote it.
function setThinking(article, text, open) {
  let details = article.querySelector("details.thinking");
  if (!details) {
    details = element("details");
    details.className = "thinking";
    details.open = open;
    const shown = element("div");
    shown.className = "text";
    details.append(element("summary", "Thinking"), shown);
    article.prepend(details);
  }
  details.querySelector(".text").textContent = text;
}

// -- images. Each is shown from an object URL (blob:, the one image source the page's CSP adds),
// revoked when its preview is removed or the conversation showing it leaves the page.
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];
let pending = [];  // what the next message sends, in order: { file, url }
let shown = [];  // the object URLs the conversation on the page shows
let view = 0;  // counts conversations shown: a stored image arriving after its conversation left is dropped
let seeing = new Set();  // the models that take images (their `vision`)

function updateAttach() {
  const model = $("model").value;
  $("attach").disabled = !seeing.has(model);
  $("attach").title = seeing.has(model) ? "PNG, JPEG, WebP or GIF; paste or drop them too" : `${model} does not take images`;
}

function addImages(files) {
  const model = $("model").value;
  if (!seeing.has(model)) {
    $("status").textContent = `${model} does not take images.`;
    return;
  }
  const refused = files.filter((f) => !IMAGE_TYPES.includes(f.type));
  for (const file of files) if (!refused.includes(file)) pending.push({ file, url: URL.createObjectURL(file) });
  $("status").textContent = refused.length
    ? "Not a PNG, JPEG, WebP or GIF image: " + refused.map((f) => f.name || "(unnamed)").join(", ") : "";
  showPending();
}

function showPending() {
  $("attachments").replaceChildren(...pending.map((item, i) => {
    const img = element("img");
    img.src = item.url;
    img.alt = item.file.name || `Image ${i + 1}`;
    const remove = element("button", "×");
    remove.type = "button";
    remove.setAttribute("aria-label", "Remove " + img.alt);
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(item.url);
      pending = pending.filter((p) => p !== item);
      showPending();
    });
    const li = element("li");
    li.append(img, remove);
    return li;
  }));
}

// The bytes as the API takes them: base64, without the data: URI's prefix.
function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// A message's images go above its text, as they went before it in the prompt.
function imageRow(article, count) {
  const row = element("div");
  row.className = "images";
  const imgs = Array.from({ length: count }, (_, i) => {
    const img = element("img");
    img.alt = `Image ${i + 1}`;
    return img;
  });
  row.append(...imgs);
  article.querySelector(".body").before(row);
  return imgs;
}

// A stored message names its images by digest; each is fetched with the page's key.
async function showStoredImages(article, id, digests) {
  const current = view;
  const imgs = imageRow(article, digests.length);
  await Promise.all(digests.map(async (digest, i) => {
    try {
      const response = await api(`/api/sessions/${encodeURIComponent(id)}/images/${encodeURIComponent(digest)}`);
      if (!response.ok) throw new Error("the server answered " + response.status);
      const blob = await response.blob();
      if (current !== view) return;
      const url = URL.createObjectURL(blob);
      shown.push(url);
      imgs[i].src = url;
    } catch (error) {
      imgs[i].alt = `Image ${i + 1} (not loaded: ${error.message})`;
    }
  }));
}

function clearConversation() {
  view += 1;
  for (const url of shown) URL.revokeObjectURL(url);
  shown = [];
  $("messages").replaceChildren();
}

const carriesFiles = (event) => Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types).includes("Files");

// Files dragged over the page: dropped on the composer they are attached; anywhere else the drop
// is refused, which also keeps the browser from replacing the page with the file.
function onDrag(event) {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  const onComposer = event.target instanceof Element && event.target.closest("#composer") !== null;
  $("composer").classList.toggle("dropping", event.type === "dragover" && onComposer);
  if (event.type === "dragover") event.dataTransfer.dropEffect = onComposer ? "copy" : "none";
  else if (onComposer) addImages(Array.from(event.dataTransfer.files));
}

// A pasted image is attached; pasted text stays text.
function onPaste(event) {
  const files = event.clipboardData ? Array.from(event.clipboardData.files) : [];
  if (!files.length) return;
  event.preventDefault();
  addImages(files);
}

// -- models and sessions
async function loadModels() {
  const response = await api("/api/models");
  const { models } = await response.json();
  const select = $("model");
  const chosen = select.value || localStorage.getItem("myllm-model");
  select.replaceChildren(...models.map((m) => element("option", m.name)));
  for (const option of select.options) option.value = option.textContent;
  if (chosen && models.some((m) => m.name === chosen)) select.value = chosen;
  seeing = new Set(models.filter((m) => m.vision).map((m) => m.name));
  updateAttach();
}

async function loadSessions() {
  const response = await api("/api/sessions");
  const { sessions } = await response.json();
  const list = $("sessions");
  list.replaceChildren();
  for (const s of sessions.filter((s) => s.kind === "chat")) {
    const item = element("li");
    const button = element("button", (s.preview || "(empty)").slice(0, 60));
    button.type = "button";
    button.dataset.session = s.id;
    if (s.id === sessionId) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => openSession(s.id));
    item.append(button);
    list.append(item);
  }
}

async function openSession(id) {
  const response = await api("/api/sessions/" + encodeURIComponent(id));
  const session = await response.json();
  sessionId = id;
  clearConversation();
  for (const m of session.messages) {
    if (m.role === "system") continue;
    const article = addMessage(m.role, m.content, m.thinking);
    if (m.images && m.images.length) showStoredImages(article, id, m.images);
  }
  if (session.model) $("model").value = session.model;
  updateAttach();
  await loadSessions();
}

function newChat() {
  if (controller) controller.abort();
  sessionId = null;
  clearConversation();
  $("status").textContent = "";
  loadSessions();
  $("message").focus();
}

// -- chatting
async function send(event) {
  if (event) event.preventDefault();
  const text = $("message").value;
  if ((!text.trim() && !pending.length) || controller) return;
  const images = pending;
  pending = [];
  showPending();
  $("message").value = "";
  shown.push(...images.map((item) => item.url));  // the previews' URLs now show the sent message
  addMessage("user", text, undefined, images.map((item) => item.url));
  const answer = addMessage("assistant", "");
  const message = { role: "user", content: text };
  const body = {
    model: $("model").value,
    messages: [message],
    stream: true,
    options: { temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) },
  };
  if ($("think").value) body.think = $("think").value === "on";
  if (sessionId) body.session_id = sessionId;
  localStorage.setItem("myllm-model", body.model);
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  $("status").textContent = "Answering…";
  const started = performance.now();
  let received = "";
  let thought = "";
  try {
    if (images.length) message.images = await Promise.all(images.map((item) => base64(item.file)));
    const response = await api("/api/chat", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.detail || "the server answered " + response.status);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const item = JSON.parse(data);
        if (item.error) throw new Error(item.error);
        if (!item.done) {
          if (item.thinking) {
            thought += item.thinking;
            setThinking(answer, thought, true);
            $("status").textContent = "Thinking…";
          }
          if (item.token) {
            if (!received && thought) {
              answer.querySelector("details.thinking").open = false;  // the answer starts: fold the thinking
              $("status").textContent = "Answering…";
            }
            received += item.token;
            setText(answer, received);
          }
        } else {
          sessionId = item.session_id || sessionId;
          const seconds = (performance.now() - started) / 1000;
          const tokens = item.usage ? item.usage.completion_tokens : 0;
          const stats = element("span", `${tokens} tokens · ${(tokens / seconds).toFixed(1)} tokens/s`);
          stats.className = "stats";
          answer.querySelector(".meta").append(stats);
        }
      }
    }
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "Stopped." : "Error: " + error.message;
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
    loadSessions().catch(() => {});
  }
}

function stop() {
  if (controller) controller.abort();
}

async function start() {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", updateAttach);
  $("attach").addEventListener("click", () => $("image-file").click());
  $("image-file").addEventListener("change", () => {
    addImages(Array.from($("image-file").files));
    $("image-file").value = "";  // choosing the same file again is a change too
  });
  $("composer").addEventListener("paste", onPaste);
  for (const type of ["dragover", "drop"]) window.addEventListener(type, onDrag);
  window.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) $("composer").classList.remove("dropping");
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("save-key").addEventListener("click", async () => {
    localStorage.setItem("myllm-key", $("key").value.trim());
    $("key-form").hidden = true;
    await boot();
  });
  await boot();
}

async function boot() {
  try {
    await loadModels();
    await loadSessions();
    $("key-form").hidden = true;
  } catch (error) {
    if (error.message !== "unauthorized") $("status").textContent = "Error: " + error.message;
  }
}

start();
