// The chat page: renders a session's conversation and drives it through ChatClient.
//
// On load it shows the session's finished turns from /history, then connects
// with last_seq = its resume_from (the last finished turn's done), so the turn in progress
// is replayed from its start and nothing is shown twice. The session id lives
// in localStorage, so a reload or a new tab continues the same conversation.
// While paused the server sends a new connection nothing, so the page keeps the
// text it has shown of the turn in progress (with its seq) and a reload or a
// second tab shows it and resumes after it.
import { ChatClient, TooBig } from "./chat-client.js";
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
const signin = $("signin");

const SESSION_KEY = "chatrelay.session";
const TOKEN_KEY = "chatrelay.token";
const PARTIAL_KEY = "chatrelay.partial"; // {session, turn, lastSeq, text} of the turn in progress

// With auth required, the page needs a token: given once as ?token=… (by the
// deployment's sign-in), kept, and renewed through /api/token/refresh. Once
// kept it leaves the address bar (history, bookmarks, screenshots, shared links).
const addressToken = new URLSearchParams(location.search).get("token");
let token = addressToken || localStorage.getItem(TOKEN_KEY);
if (token) localStorage.setItem(TOKEN_KEY, token);
if (addressToken !== null) {
  const clean = new URL(location.href);
  clean.searchParams.delete("token");
  history.replaceState(history.state, "", clean.pathname + clean.search + clean.hash);
}
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
let activeTurn = null; // the turn generating, as far as the page knows
let openTurn = null; // the turn of the last chunk, until its done: client.lastSeq is inside it
let closedForGood = false;
let countdown = null;

// A session id of the server's form (22 URL-safe characters), chosen here so the
// first connection and the probe of a refused one name the same session.
function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

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
  return { item, answer, text: "", status: "waiting", dirty: false, promptText };
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
  sendButton.disabled = value || closedForGood;
  stopButton.disabled = !value || closedForGood;
}

// Generating while a turn runs or a chat waits for its answer.
function refreshGenerating() {
  setGenerating(activeTurn !== null || waiting.size > 0);
}

// A chat that failed gives its text back to the box, ahead of anything typed since.
function restorePrompt(text) {
  const typed = promptBox.value;
  if (typed === text) return;
  promptBox.value = typed.trim() ? `${text}\n\n${typed}` : text;
}

function failWaiting(id, message) {
  const entry = waiting.get(id);
  if (!entry) return;
  waiting.delete(id);
  finish(entry, "error", message);
  restorePrompt(entry.promptText);
}

// The text shown of the turn in progress and the seq it reaches, for a reload or
// another tab while paused (the server replays nothing to them until resume).
function savePartial() {
  const entry = openTurn === null ? null : turns.get(openTurn);
  if (!entry || !client.session) return;
  try {
    const partial = { session: client.session, turn: openTurn, lastSeq: client.lastSeq, text: entry.text };
    localStorage.setItem(PARTIAL_KEY, JSON.stringify(partial));
  } catch {
    // storage full or refused: a reload shows less while paused, nothing worse
  }
}

// The turn ended: its kept text is history's now (another tab's kept text stays).
function forgetPartial(sessionId, turn) {
  try {
    const partial = JSON.parse(localStorage.getItem(PARTIAL_KEY) ?? "null");
    if (partial?.session === sessionId && partial.turn === turn) localStorage.removeItem(PARTIAL_KEY);
  } catch {
    localStorage.removeItem(PARTIAL_KEY);
  }
}

function readPartial(sessionId, turn, resumeFrom) {
  try {
    const partial = JSON.parse(localStorage.getItem(PARTIAL_KEY) ?? "null");
    if (
      partial?.session === sessionId &&
      partial.turn === turn &&
      Number.isInteger(partial.lastSeq) &&
      partial.lastSeq >= resumeFrom &&
      typeof partial.text === "string"
    ) {
      return partial;
    }
  } catch {
    // unreadable: ignore
  }
  return null;
}

function setPaused(paused) {
  pauseButton.setAttribute("aria-pressed", String(paused));
  pauseButton.textContent = paused ? "Resume" : "Pause";
}

// A sticky notice (a message that was not sent) stays until the next send; others clear on reconnect.
function showNotice(text, sticky = false) {
  notice.textContent = text;
  notice.hidden = !text;
  notice.dataset.sticky = String(Boolean(text) && sticky);
}

function kib(bytes) {
  return bytes < 1024 ? `${bytes} bytes` : `${Math.round(bytes / 1024)} KB`;
}

// The server wants a token the page lacks (or refused the one it has): stop and say how to get in.
function signInNeeded(message) {
  closedForGood = true;
  clearInterval(countdown);
  try {
    localStorage.removeItem(TOKEN_KEY); // refused: not offered again
  } catch {
    // ignore
  }
  token = null;
  showStatus("closed", "Sign-in needed");
  $("signin-detail").textContent = message ? `The server said: ${message}.` : "";
  for (const origin of signin.querySelectorAll(".origin")) origin.textContent = location.origin;
  signin.hidden = false;
  for (const id of [...waiting.keys()]) failWaiting(id, "not sent: sign-in needed");
  refreshGenerating();
  pauseButton.disabled = true;
  $("signin-token").focus();
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
    if (response.status === 401) throw Object.assign(new Error("history: HTTP 401"), { keep: true });
    if (!response.ok) throw new Error(`history: HTTP ${response.status}`);
    const record = await response.json();
    for (const turn of record.turns) {
      const entry = entryFor(turn.turn, turn.prompt);
      entry.text = turn.answer;
      finish(entry, turn.reason);
    }
    lastSeq = record.resume_from; // after the finished turns: a generating one streams from its start
    if (record.active) {
      const entry = entryFor(record.active.turn, record.active.prompt);
      activeTurn = record.active.turn;
      // What this browser already showed of it (kept at pause or when the page went away):
      // shown again, and the connection resumes after it.
      const partial = readPartial(session, record.active.turn, record.resume_from);
      if (partial) {
        entry.text = partial.text;
        entry.status = entry.answer.dataset.status = "streaming";
        render(entry);
        lastSeq = partial.lastSeq;
        openTurn = record.active.turn;
      }
      refreshGenerating();
    }
  } catch (error) {
    // 401: the token is missing or refused; the connection's probe says so. Otherwise
    // the session is unknown, expired or another user's: start a new conversation.
    if (!error.keep) {
      session = null;
      localStorage.removeItem(SESSION_KEY);
    }
  }
}
session ??= newSessionId();

// A browser cannot see why a WebSocket handshake was refused: ask over HTTP, with the same token.
async function probe({ session: probed, token: sent }) {
  const response = await fetch(`/api/sessions/${encodeURIComponent(probed ?? session)}/history`, {
    headers: sent ? { Authorization: `Bearer ${sent}` } : {},
  });
  let message = "";
  try {
    message = (await response.json()).message ?? "";
  } catch {
    // not JSON
  }
  return { status: response.status, message };
}

const url = new URL("/ws", location.href);
url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
const client = new ChatClient(url.toString(), { session, lastSeq, tokenProvider, probe });

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
      if (!turns.get(frame.turn).status.match(/^(stop|stopped|length|error)$/)) activeTurn = frame.turn;
      refreshGenerating();
      break;
    }
    case "chunk": {
      const entry = entryFor(frame.turn);
      entry.text += frame.text;
      entry.status = entry.answer.dataset.status = "streaming";
      activeTurn = openTurn = frame.turn;
      refreshGenerating();
      render(entry);
      break;
    }
    case "done":
      finish(entryFor(frame.turn), frame.reason, frame.message);
      if (activeTurn === frame.turn) activeTurn = null;
      if (openTurn === frame.turn) openTurn = null;
      forgetPartial(client.session, frame.turn);
      refreshGenerating();
      break;
    case "paused":
      setPaused(true);
      showStatus("connected", "Connected · paused");
      savePartial(); // nothing more arrives until resume: what a reload or another tab should show
      break;
    case "resumed":
      setPaused(false);
      showStatus("connected", "Connected");
      break;
    case "error": {
      // An error answering a chat (or a chat the client gave up): the chat is over, its text back in the box.
      const answersChat = waiting.has(frame.id);
      failWaiting(frame.id, frame.message);
      showNotice(answersChat ? `Not sent: ${frame.message}. Your text is back in the box.` : frame.message, answersChat);
      refreshGenerating();
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
    if (notice.dataset.sticky !== "true") showNotice("");
  } else if (detail.state === "closed" && (detail.status === 401 || detail.status === 403)) {
    if (detail.status === 401) {
      signInNeeded(detail.reason);
    } else {
      closedForGood = true;
      showStatus("closed", "Not allowed");
      showNotice(`The server refused this page: ${detail.reason}. Start a new chat, or sign in as the conversation's owner.`, true);
      for (const id of [...waiting.keys()]) failWaiting(id, "not sent: not allowed");
      refreshGenerating();
    }
  } else if (detail.state === "reconnecting" || detail.state === "offline") {
    startCountdown(detail.state, detail.delayMs, detail.attempt);
  } else if (detail.state === "connecting") {
    showStatus("connecting", "Connecting…");
  } else {
    closedForGood = true;
    showStatus("closed", `Disconnected${detail.reason ? `: ${detail.reason}` : ""}`);
    for (const id of [...waiting.keys()]) failWaiting(id, "not sent: disconnected");
    refreshGenerating();
  }
});

// Leaving (reload, tab closed): keep what is shown of the turn in progress.
window.addEventListener("pagehide", savePartial);

window.addEventListener("offline", () => client.networkLost());
window.addEventListener("online", () => client.retryNow());
client.start();

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value;
  if (!text.trim() || generating || closedForGood) return;
  let id;
  try {
    id = client.chat(text); // queued and sent on reconnect when offline
  } catch (error) {
    if (!(error instanceof TooBig)) throw error;
    // The server would close the connection on it: refused here, the text stays in the box.
    const size = error.unit === "bytes" ? `${kib(error.size)} as sent; the server takes at most ${kib(error.limit)}` : `${error.size} characters; the server takes at most ${error.limit}`;
    showNotice(`This message is too large to send (${size}). Shorten it and send again.`, true);
    return;
  }
  showNotice("");
  waiting.set(id, newEntry(text));
  refreshGenerating();
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
  localStorage.removeItem(PARTIAL_KEY);
  location.reload();
});

// A pasted token: kept like one from ?token=, then the page starts over with it.
$("signin-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const pasted = $("signin-token").value.trim();
  if (!pasted) return;
  localStorage.setItem(TOKEN_KEY, pasted);
  location.reload();
});
