// The chat page: renders a session's conversation and drives it through ChatClient.
//
// On load it shows the session's finished turns from /history, then connects
// with last_seq = its resume_from (the last finished turn's done), so the turn in progress
// is replayed from its start and nothing is shown twice. The session id lives
// in localStorage, so a reload or a new tab continues the same conversation.
import { ChatClient } from "./chat-client.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const statusEl = $("status");
const statusText = $("status-text");
const promptBox = $("prompt");
const sendButton = $("send");
const pauseButton = $("pause");
const stopButton = $("stop");
const notice = $("notice");

const SESSION_KEY = "chatrelay.session";
const TOKEN_KEY = "chatrelay.token";

// With auth required, the page needs a token: given once as ?token=… (by the
// deployment's sign-in), kept, and renewed through /api/token/refresh.
let token = new URLSearchParams(location.search).get("token") || localStorage.getItem(TOKEN_KEY);
if (token) localStorage.setItem(TOKEN_KEY, token);
const authHeaders = () => (token ? { Authorization: `Bearer ${token}` } : {});
const tokenProvider = token
  ? async () => {
      const response = await fetch("/api/token/refresh", { method: "POST", headers: authHeaders() });
      if (response.ok) {
        token = (await response.json()).token;
        localStorage.setItem(TOKEN_KEY, token);
      }
      return token;
    }
  : null;
const turns = new Map(); // turn number -> {item, answer, text, status}
const waiting = new Map(); // chat id -> entry not yet accepted
let generating = false;
let countdown = null;

function newEntry(promptText) {
  const item = document.createElement("li");
  item.className = "turn";
  const prompt = document.createElement("div");
  prompt.className = "prompt";
  prompt.textContent = promptText; // never parsed as HTML
  const answer = document.createElement("div");
  answer.className = "answer";
  answer.dataset.status = "waiting";
  answer.setAttribute("aria-label", "Answer");
  item.append(prompt, answer);
  conversation.append(item);
  $("empty").hidden = true;
  return { item, answer, text: "", status: "waiting", dirty: false };
}

function entryFor(turn, promptText = "…") {
  let entry = turns.get(turn);
  if (!entry) {
    entry = newEntry(promptText);
    turns.set(turn, entry);
  }
  entry.answer.dataset.turn = String(turn);
  return entry;
}

const dirty = new Set();
function render(entry) {
  dirty.add(entry);
  if (dirty.size === 1) {
    requestAnimationFrame(() => {
      for (const e of dirty) e.answer.innerHTML = renderMarkdown(e.text);
      dirty.clear();
      window.scrollTo({ top: document.body.scrollHeight });
    });
  }
}

function finish(entry, reason, message) {
  entry.status = reason;
  entry.answer.dataset.status = reason;
  render(entry);
  if (reason === "stopped" || reason === "error" || reason === "length") {
    const note = document.createElement("p");
    note.className = "note";
    note.dataset.reason = reason;
    note.textContent = { stopped: "Stopped.", length: "Reached the length limit.", error: `Failed: ${message ?? "unknown error"}` }[reason];
    entry.item.append(note);
  }
}

function setGenerating(value) {
  generating = value;
  sendButton.disabled = value;
  stopButton.disabled = !value;
}

function setPaused(paused) {
  pauseButton.setAttribute("aria-pressed", String(paused));
  pauseButton.textContent = paused ? "Resume" : "Pause";
}

function showNotice(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

function showStatus(state, text) {
  statusEl.dataset.state = state;
  statusText.textContent = text;
}

function startCountdown(state, delayMs, attempt) {
  clearInterval(countdown);
  const until = Date.now() + delayMs;
  const prefix = state === "offline" ? "Offline · retrying" : "Reconnecting";
  const tick = () => {
    const seconds = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    showStatus(state, `${prefix} in ${seconds} s (attempt ${attempt})`);
  };
  tick();
  countdown = setInterval(tick, 1000);
}

// Earlier turns, then the live connection from after them.
let session = localStorage.getItem(SESSION_KEY);
let lastSeq = 0;
if (session) {
  try {
    const response = await fetch(`/api/sessions/${encodeURIComponent(session)}/history`, { headers: authHeaders() });
    if (!response.ok) throw new Error(`history: HTTP ${response.status}`);
    const record = await response.json();
    for (const turn of record.turns) {
      const entry = entryFor(turn.turn, turn.prompt);
      entry.text = turn.answer;
      finish(entry, turn.reason);
    }
    lastSeq = record.resume_from; // after the finished turns: a generating one streams from its start
    if (record.active) {
      entryFor(record.active.turn, record.active.prompt);
      setGenerating(true);
    }
  } catch {
    session = null; // unknown or expired: start a new conversation
    localStorage.removeItem(SESSION_KEY);
  }
}

const url = new URL("/ws", location.href);
url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const client = new ChatClient(url.toString(), { session, lastSeq, tokenProvider });

client.addEventListener("frame", ({ detail: frame }) => {
  switch (frame.type) {
    case "ready":
      localStorage.setItem(SESSION_KEY, frame.session);
      setPaused(frame.paused);
      pauseButton.disabled = false;
      break;
    case "accepted": {
      const entry = waiting.get(frame.id);
      waiting.delete(frame.id);
      if (entry && !turns.has(frame.turn)) turns.set(frame.turn, entry);
      entryFor(frame.turn);
      setGenerating(true);
      break;
    }
    case "chunk": {
      const entry = entryFor(frame.turn);
      entry.text += frame.text;
      entry.status = entry.answer.dataset.status = "streaming";
      setGenerating(true);
      render(entry);
      break;
    }
    case "done":
      finish(entryFor(frame.turn), frame.reason, frame.message);
      setGenerating(false);
      break;
    case "paused":
      setPaused(true);
      showStatus("connected", "Connected · paused");
      break;
    case "resumed":
      setPaused(false);
      showStatus("connected", "Connected");
      break;
    case "error": {
      const entry = waiting.get(frame.id);
      if (entry) {
        waiting.delete(frame.id);
        finish(entry, "error", frame.message);
      }
      showNotice(frame.message);
      break;
    }
    default:
      break;
  }
});

client.addEventListener("state", ({ detail }) => {
  clearInterval(countdown);
  if (detail.state === "connected") {
    showStatus("connected", client.state.paused ? "Connected · paused" : "Connected");
    showNotice("");
  } else if (detail.state === "reconnecting" || detail.state === "offline") {
    startCountdown(detail.state, detail.delayMs, detail.attempt);
  } else if (detail.state === "connecting") {
    showStatus("connecting", "Connecting…");
  } else {
    showStatus("closed", `Disconnected${detail.reason ? `: ${detail.reason}` : ""}`);
  }
});

window.addEventListener("offline", () => client.networkLost());
window.addEventListener("online", () => client.retryNow());
client.start();

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value;
  if (!text.trim() || generating) return;
  showNotice("");
  const entry = newEntry(text);
  const id = client.chat(text); // queued and sent on reconnect when offline
  waiting.set(id, entry);
  setGenerating(true);
  promptBox.value = "";
});

promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

pauseButton.addEventListener("click", () => (client.state.paused ? client.resume() : client.pause()));
stopButton.addEventListener("click", () => client.stop());
$("new-chat").addEventListener("click", () => {
  localStorage.removeItem(SESSION_KEY);
  location.reload();
});
