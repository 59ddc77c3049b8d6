// The chat page: keeps the conversation, streams each answer from /v1/chat/completions
// (server-sent events), stops it on "Stop" (closing the request cancels it on the server).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop"), status = $("status");
let messages = [];   // the conversation: {role, content}
let model = null;
let controller = null;  // the answer being streamed

// An API key given as ?key=... is kept for this tab and sent as a header.
const params = new URLSearchParams(location.search);
if (params.has("key")) {
  sessionStorage.setItem("gemmakit-key", params.get("key"));
  params.delete("key");
  history.replaceState(null, "", location.pathname + (params.size ? "?" + params : ""));
}
function headers() {
  const key = sessionStorage.getItem("gemmakit-key");
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function body() {
  const system = $("system").value.trim();
  const b = {
    model,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    stream: true,
    temperature: number("temperature"),
    top_p: number("top-p"),
    max_tokens: number("max-tokens"),
  };
  const seed = number("seed");
  if (seed !== null) b.seed = Math.trunc(seed);
  for (const k of Object.keys(b)) if (b[k] === null) delete b[k];
  return b;
}

async function loadModel() {
  try {
    const r = await fetch("v1/models", { headers: headers() });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    model = data.data[0].id;
    $("model").textContent = model;
  } catch (e) {
    status.textContent = "Cannot reach the server: " + e.message;
  }
}

function busy(on) {
  send.disabled = on;
  stop.disabled = !on;
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant streaming", "");
  let answer = "";
  controller = new AbortController();
  busy(true);
  status.textContent = "…";
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body()), signal: controller.signal,
    });
    if (!r.ok) {
      const data = await r.json().catch(() => ({}));
      throw new Error(data.error ? data.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              answer += c.delta.content;
              out.textContent = answer;
              log.scrollTop = log.scrollHeight;
            }
            if (c.finish_reason) finish = c.finish_reason;
          }
        }
      }
    }
    status.textContent = finish === "length" ? "(stopped at max tokens)" : "";
  } catch (e) {
    if (e.name === "AbortError") {
      const note = document.createElement("span");
      note.className = "stopped";
      note.textContent = " [stopped]";
      out.appendChild(note);
      status.textContent = "";
    } else {
      out.classList.add("error");
      out.textContent = (answer ? answer + "\n" : "") + "Error: " + e.message;
      status.textContent = "";
    }
  } finally {
    out.classList.remove("streaming");
    controller = null;
    busy(false);
  }
  // What was shown is kept, so the next turn sees the stopped answer too.
  messages.push({ role: "assistant", content: answer });
  if (!answer) messages.splice(-2, 2);  // nothing came back: forget the exchange
  input.focus();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || controller || !model) return;
  input.value = "";
  ask(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
stop.addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.replaceChildren();
  status.textContent = "";
  input.focus();
});

loadModel();
