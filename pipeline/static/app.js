// The chat page of `llava-pipeline serve`: plain JavaScript against the same /v1/chat/completions endpoint any
// OpenAI client uses. The conversation lives here and is sent whole with every question; the image belongs to the
// first question, so picking another image starts a new chat (as `llava-pipeline chat` does with /image).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, image: null, messages: [], controller: null, chat: 0 };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error.message}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    $("model-name").textContent = "model: " + state.model;
  } catch (e) {
    $("model-name").textContent = "cannot list models (" + e.message + ")";
  }
}

function addMessage(role, text, image) {
  $("empty-hint").hidden = true;
  const div = document.createElement("div");
  div.className = "message " + role;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "the image of this chat";
    div.appendChild(img);
  }
  div.appendChild(document.createTextNode(text));
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function newChat() {
  state.chat += 1;  // an answer still streaming belongs to the old chat: it must not land in the new one
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").querySelectorAll(".message").forEach((m) => m.remove());
  $("empty-hint").hidden = false;
}

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;  // a data: URL, which the server decodes; it never fetches from the network
    $("preview").src = state.image;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    $("remove-image").hidden = false;
    newChat();
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  state.image = null;
  $("preview").hidden = true;
  $("drop-hint").hidden = false;
  $("remove-image").hidden = true;
  $("image-input").value = "";
  newChat();
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  const body = {
    model: state.model,
    messages: messages.concat(state.messages),
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

// Server-Sent Events: "data: {...}" lines separated by blank lines, ending with "data: [DONE]".
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  if (!state.model) await loadModel();
  const chat = state.chat;
  const first = state.messages.length === 0;
  const content = first && state.image
    ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }]
    : text;
  state.messages.push({ role: "user", content });
  addMessage("user", text, first ? state.image : null);
  $("prompt").value = "";
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  let answer = "";
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseData(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : null;
      if (delta) {
        answer += delta;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
    }
    state.messages.push({ role: "assistant", content: answer });
  } catch (e) {
    if (chat === state.chat) {
      state.messages.pop();  // the question was not answered: it is not part of the conversation
      if (e.name === "AbortError" && answer) {  // stopped: keep what was said so far
        state.messages.push({ role: "user", content }, { role: "assistant", content: answer });
      } else {
        bubble.remove();
        if (e.name !== "AbortError") addMessage("error", e.message);
      }
    }
  } finally {
    bubble.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

function bindSetting(id) {
  const update = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", update);
  update();
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newChat);
$("image-input").addEventListener("change", (e) => setImage(e.target.files[0]));
$("remove-image").addEventListener("click", clearImage);
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("dragging");
  setImage(e.dataTransfer.files[0]);
});
$("api-key").addEventListener("change", loadModel);
bindSetting("temperature");
bindSetting("top-p");
loadModel();
