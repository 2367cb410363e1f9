// myllm's chat page: the native API (/api/models, /api/chat with SSE, /api/sessions) and
// nothing else. Every text from a model or a stored message goes into the page through
// textContent, never as HTML, so no markup in it can run. A thinking model's thinking (the
// API's `thinking` events and field) is folded above its answer, as plain text.
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

function addMessage(role, text, thinking) {
  const article = element("article");
  article.dataset.role = role;
  const body = element("div");
  body.className = "body";
  article.append(body);
  render(body, text);
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

// -- models and sessions
async function loadModels() {
  const response = await api("/api/models");
  const { models } = await response.json();
  const select = $("model");
  const chosen = select.value || localStorage.getItem("myllm-model");
  select.replaceChildren(...models.map((m) => element("option", m.name)));
  for (const option of select.options) option.value = option.textContent;
  if (chosen && models.some((m) => m.name === chosen)) select.value = chosen;
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
  $("messages").replaceChildren();
  for (const m of session.messages) if (m.role !== "system") addMessage(m.role, m.content, m.thinking);
  if (session.model) $("model").value = session.model;
  await loadSessions();
}

function newChat() {
  if (controller) controller.abort();
  sessionId = null;
  $("messages").replaceChildren();
  $("status").textContent = "";
  loadSessions();
  $("message").focus();
}

// -- chatting
async function send(event) {
  if (event) event.preventDefault();
  const text = $("message").value;
  if (!text.trim() || controller) return;
  $("message").value = "";
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  const body = {
    model: $("model").value,
    messages: [{ role: "user", content: text }],
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
