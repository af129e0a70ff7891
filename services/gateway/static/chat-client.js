// chatrelay browser client: protocol v1 over a WebSocket that never loses a chunk.
//
//   import { ChatClient } from "/static/chat-client.js";
//   const client = new ChatClient("ws://127.0.0.1:8000/ws", { session, lastSeq });
//   client.addEventListener("frame", (e) => render(e.detail));      // ready, accepted, chunk, done, …
//   client.addEventListener("state", (e) => show(e.detail));        // connecting, connected, reconnecting, …
//   client.start();
//   client.chat("Tell me about rivers");
//
// It reconnects with exponential backoff and full jitter, resumes from its last
// seq and drops duplicates (listeners see every seq once, in order), sends an
// application ping and replaces a connection that stays silent (half-open),
// queues what is sent while offline, and resends a chat until the server
// acknowledges it (unless `ready.last_chat` shows it was accepted before the
// connection dropped; while its turn generates the server also deduplicates by id). Time, randomness and the
// WebSocket class can be injected, so it runs under Node's test runner.
//
// A frame larger than the server takes is refused before it is sent (TooBig, from `chat()`); a chat the
// server answers by closing the connection (1009, or a connection that keeps dropping right after it is
// sent) is given up with a local `error` frame carrying its id, instead of being resent forever. A
// connection refused before it opened is told apart by the optional `probe` (an HTTP call with the same
// token): 401 or 403 there stops the client with `status`, since no reconnect can succeed without a new token.

export const SUBPROTOCOL = "chat.v1";
/** The gateway's default CHAT_MAX_FRAME_BYTES: the largest client frame it reads (bigger ones close with 1009). */
export const DEFAULT_MAX_FRAME_BYTES = 65536;

/** Exponential backoff with full jitter: delay = random * min(cap, initial * factor ** attempt). */
export class Backoff {
  constructor({ initialMs = 500, capMs = 30000, factor = 2, maxAttempts = null, healthyAfterMs = 5000 } = {}) {
    if (!(initialMs > 0 && initialMs <= capMs) || factor < 1) {
      throw new RangeError(`backoff needs 0 < initialMs <= capMs and factor >= 1, got ${initialMs}, ${capMs}, ${factor}`);
    }
    Object.assign(this, { initialMs, capMs, factor, maxAttempts, healthyAfterMs });
    this.attempt = 0;
  }

  ceiling(attempt) {
    let ceiling = this.initialMs;
    for (let i = 0; i < attempt && ceiling < this.capMs; i += 1) ceiling *= this.factor;
    return Math.min(ceiling, this.capMs);
  }

  /** The next delay in ms, or null when the attempts are used up. */
  nextDelay(random) {
    if (this.maxAttempts !== null && this.attempt >= this.maxAttempts) return null;
    const delay = random * this.ceiling(this.attempt);
    this.attempt += 1;
    return delay;
  }

  connectionEnded(lastedMs) {
    if (lastedMs >= this.healthyAfterMs) this.reset();
  }

  reset() {
    this.attempt = 0;
  }
}

/** What a close code means: "reconnect", "refresh_token" (then reconnect) or "stop". */
export function closeAction(code) {
  if (code === undefined || code === null || [1001, 1005, 1006, 1011, 1012, 1013, 1014].includes(code)) return "reconnect";
  if (code === 4001) return "refresh_token";
  return "stop"; // 1000 normal, 1008 policy, 1009 too big, 4003 forbidden, …
}

export class GapError extends Error {}
export class OfflineQueueFull extends Error {}

/** A frame (or prompt) over the server's limit, refused before sending: `size` and `limit` in `unit`. */
export class TooBig extends RangeError {
  constructor(size, limit, unit = "bytes") {
    super(`the message is too large: ${size} ${unit}, the server takes at most ${limit}`);
    Object.assign(this, { size, limit, unit });
  }
}

const encoder = new TextEncoder();

/** The UTF-8 size of a frame as sent: what the server's CHAT_MAX_FRAME_BYTES is compared with. */
export function frameBytes(frame) {
  return encoder.encode(typeof frame === "string" ? frame : JSON.stringify(frame)).length;
}

/** Characters as the server counts them (code points: a surrogate pair is one). */
export function codePoints(text) {
  let count = text.length;
  for (let i = 0; i < text.length - 1; i += 1) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) {
        count -= 1;
        i += 1;
      }
    }
  }
  return count;
}

function newId() {
  return globalThis.crypto?.randomUUID ? globalThis.crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

/** The client's memory of a session across connections; no I/O. */
export class SessionState {
  constructor({ session = null, lastSeq = 0, maxQueue = 100, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES, maxPromptChars = null } = {}) {
    this.session = session;
    this.lastSeq = lastSeq;
    this.maxQueue = maxQueue;
    this.maxFrameBytes = maxFrameBytes; // null: no check
    this.maxPromptChars = maxPromptChars; // null: the server's `too_big` answers
    this.onConnection = new Set(); // ids of chats written to the current connection, unanswered
    this.ready = false;
    this.paused = false;
    this.queue = [];
    this.unacknowledged = new Map(); // chat id -> chat frame
    this.sent = new Set(); // ids of unacknowledged chats written to some connection
    this.wantPaused = null;
    this.toSend = [];
  }

  url(base, token = null) {
    const url = new URL(base);
    if (this.session !== null) url.searchParams.set("session", this.session);
    url.searchParams.set("last_seq", String(this.lastSeq));
    if (token) url.searchParams.set("token", token);
    return url.toString();
  }

  /** Throw TooBig if the server would refuse the frame for its size (it closes the connection on it). */
  checkSize(frame) {
    if (frame.type === "chat" && this.maxPromptChars !== null && typeof frame.prompt === "string") {
      const chars = codePoints(frame.prompt);
      if (chars > this.maxPromptChars) throw new TooBig(chars, this.maxPromptChars, "characters");
    }
    if (this.maxFrameBytes !== null) {
      const bytes = frameBytes(frame);
      if (bytes > this.maxFrameBytes) throw new TooBig(bytes, this.maxFrameBytes, "bytes");
    }
  }

  /** Send now if ready, else keep for the next connection; returns the frame. Throws TooBig. */
  send(frame) {
    if (frame.type === "chat") {
      frame = { ...frame, id: frame.id ?? newId() };
      this.checkSize(frame);
      this.unacknowledged.set(frame.id, frame);
    } else if (frame.type === "pause") {
      this.wantPaused = true;
    } else if (frame.type === "resume") {
      this.wantPaused = false;
    }
    if (this.ready) {
      this.toSend.push(JSON.stringify(frame));
      if (frame.type === "chat") this.markSent(frame.id);
    } else if (!["chat", "pause", "resume"].includes(frame.type)) {
      // chats are resent from `unacknowledged`, pause/resume reconciled from `wantPaused`
      if (this.queue.length >= this.maxQueue) {
        throw new OfflineQueueFull(`${this.queue.length} frames are already queued while offline (the limit)`);
      }
      this.queue.push(frame);
    }
    return frame;
  }

  markSent(id) {
    this.sent.add(id);
    this.onConnection.add(id);
  }

  /** Give up a chat: never resent; returns the frame, or undefined if it was not waiting. */
  forget(id) {
    const frame = this.unacknowledged.get(id);
    this.unacknowledged.delete(id);
    this.sent.delete(id);
    this.onConnection.delete(id);
    return frame;
  }

  dataToSend() {
    const out = this.toSend;
    this.toSend = [];
    return out;
  }

  /** Take one server frame; returns [frame] or [] for a duplicate. Throws GapError on a skipped seq. */
  receive(text) {
    const frame = JSON.parse(text);
    switch (frame.type) {
      case "ready":
        return [frame, ...this.onReady(frame)];
      case "chunk":
      case "done":
        if (frame.seq <= this.lastSeq) return [];
        if (frame.seq !== this.lastSeq + 1) throw new GapError(`got seq ${frame.seq} after ${this.lastSeq}`);
        this.lastSeq = frame.seq;
        break;
      case "accepted":
      case "error":
        if (frame.id !== undefined && frame.id !== null) this.forget(frame.id);
        break;
      case "paused":
        this.paused = true;
        if (this.wantPaused === true) this.wantPaused = null;
        break;
      case "resumed":
        this.paused = false;
        if (this.wantPaused === false) this.wantPaused = null;
        break;
      default:
        break;
    }
    return [frame];
  }

  /** Reconcile with the server's session; returns frames to report after ready. */
  onReady(ready) {
    this.session = ready.session;
    this.paused = ready.paused;
    this.ready = true;
    // The server may tell its limits (else the documented defaults stand).
    if (Number.isInteger(ready.max_frame_bytes) && ready.max_frame_bytes > 0) this.maxFrameBytes = ready.max_frame_bytes;
    if (Number.isInteger(ready.max_prompt_chars) && ready.max_prompt_chars > 0) this.maxPromptChars = ready.max_prompt_chars;
    const answered = [];
    const last = ready.last_chat;
    if (last && this.sent.has(last.id)) {
      // Sent, and accepted before the connection dropped: a resend would start a second turn once
      // this one ended. A chat never sent cannot be it, whatever its id.
      this.forget(last.id);
      answered.push({ type: "accepted", id: last.id, turn: last.turn });
    }
    for (const chat of this.unacknowledged.values()) {
      this.toSend.push(JSON.stringify(chat));
      this.markSent(chat.id);
    }
    if (this.wantPaused !== null && this.wantPaused !== ready.paused) {
      this.toSend.push(JSON.stringify({ type: this.wantPaused ? "pause" : "resume" }));
    } else {
      this.wantPaused = null;
    }
    while (this.queue.length) this.toSend.push(JSON.stringify(this.queue.shift()));
    return answered;
  }

  /** The connection is gone; returns the ids of the chats written to it that got no answer. */
  connectionLost() {
    this.ready = false;
    this.toSend = [];
    const unanswered = [...this.onConnection].filter((id) => this.unacknowledged.has(id));
    this.onConnection.clear();
    return unanswered;
  }
}

/**
 * A reconnecting client. Events:
 * - "frame": detail is each server frame (ready, accepted, chunk, done, paused, resumed, pong, error), deduplicated;
 * - "state": detail is {state, attempt, delayMs, reason, code}; state is "connecting", "connected",
 *   "reconnecting" (with delayMs and attempt), "offline" (the browser reports no network) or "closed" (for good;
 *   with `status` 401 or 403 when the probe found the handshake refused for the token or the origin/owner).
 *   A chat given up after the server closed the connection on it is reported as a "frame":
 *   {type: "error", code, message, id, local: true}.
 *
 * Options beyond SessionState's: `probe` (async ({session, token}) => ({status, message}) | null), called
 * when a connection closes before it opened (a browser cannot see the handshake's HTTP status); `maxChatAttempts`
 * (3): connections that may drop with a chat sent and unanswered before that chat is given up.
 */
export class ChatClient extends EventTarget {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.state = new SessionState(options);
    this.tokenProvider = options.tokenProvider ?? null;
    this.backoff = options.backoff ?? new Backoff();
    this.pingIntervalMs = options.pingIntervalMs ?? 5000;
    this.pingTimeoutMs = options.pingTimeoutMs ?? 15000;
    this.WebSocketImpl = options.WebSocketImpl ?? globalThis.WebSocket;
    this.random = options.random ?? Math.random;
    this.now = options.now ?? (() => Date.now());
    this.setTimer = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this.clearTimer = options.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    this.ws = null;
    this.closed = false;
    this.connectedAt = 0;
    this.heardAt = 0;
    this.heartbeat = null;
    this.retry = null;
    this.renewal = null;
    this.renewedExp = 0;
    this.token = null;
    this.needToken = this.tokenProvider !== null;
    this.tokenFresh = false; // the token came from the provider since the last ready
    this.probe = options.probe ?? null;
    this.probing = false;
    this.maxChatAttempts = options.maxChatAttempts ?? 3;
    this.chatDrops = new Map(); // chat id -> connections that dropped with it unanswered
  }

  get session() {
    return this.state.session;
  }

  get lastSeq() {
    return this.state.lastSeq;
  }

  start() {
    this.closed = false;
    this.connect();
    return this;
  }

  close() {
    this.closed = true;
    this.clearTimer(this.retry);
    this.stopHeartbeat();
    if (this.ws) this.ws.close(1000);
    this.emitState("closed", { reason: "closed by the page" });
  }

  chat(prompt, id = undefined) {
    return this.sendFrame({ type: "chat", prompt, ...(id === undefined ? {} : { id }) }).id;
  }

  pause() {
    this.sendFrame({ type: "pause" });
  }

  resume() {
    this.sendFrame({ type: "resume" });
  }

  stop() {
    this.sendFrame({ type: "stop" });
  }

  sendFrame(frame) {
    const sent = this.state.send(frame);
    this.flush();
    return sent;
  }

  /** The browser reports the network gone (window "offline"): drop the socket now, not after the heartbeat. */
  networkLost() {
    if (this.closed || !this.ws) return;
    const ws = this.ws;
    ws.close(4000, "offline");
    this.onClose(ws, null, "the browser is offline", true);
  }

  /** The page saw the network come back (window "online"): retry now instead of waiting. */
  retryNow() {
    if (this.closed || this.ws || this.probing) return;
    this.clearTimer(this.retry);
    this.connect();
  }

  flush() {
    if (!this.ws || this.ws.readyState !== 1) return;
    for (const data of this.state.dataToSend()) this.ws.send(data);
  }

  emitState(state, extra = {}) {
    this.dispatchEvent(Object.assign(new Event("state"), { detail: { state, ...extra } }));
  }

  async connect() {
    if (this.closed) return;
    if (this.needToken) {
      try {
        this.token = await this.tokenProvider();
      } catch (error) {
        this.scheduleReconnect("reconnect", null, `token provider failed: ${error}`);
        return;
      }
      this.needToken = false;
      this.tokenFresh = true;
    }
    this.emitState("connecting", { attempt: this.backoff.attempt });
    let ws;
    try {
      ws = new this.WebSocketImpl(this.state.url(this.url, this.token), SUBPROTOCOL);
    } catch (error) {
      this.scheduleReconnect("stop", null, `cannot connect: ${error}`);
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      this.connectedAt = this.now();
      this.heardAt = this.connectedAt;
      this.startHeartbeat(ws);
    };
    ws.onmessage = (event) => this.onMessage(ws, event.data);
    ws.onclose = (event) => this.onClose(ws, event.code, event.reason);
    ws.onerror = () => {}; // a close event always follows
  }

  onMessage(ws, data) {
    if (ws !== this.ws) return;
    this.heardAt = this.now();
    let frames;
    try {
      frames = this.state.receive(data);
    } catch (error) {
      if (error instanceof GapError) {
        ws.close(4000, "gap"); // resume from lastSeq on a new connection
        this.onClose(ws, null, error.message, true);
      }
      return;
    }
    for (const frame of frames) {
      if ((frame.type === "accepted" || frame.type === "error") && frame.id != null) this.chatDrops.delete(frame.id);
      if (frame.type === "ready") {
        this.tokenFresh = false;
        this.emitState("connected", { session: frame.session, attempt: this.backoff.attempt });
        this.flush();
      }
      if ((frame.type === "ready" || frame.type === "auth_ok") && frame.exp) this.scheduleRenewal(ws, frame.exp);
      this.dispatchEvent(Object.assign(new Event("frame"), { detail: frame }));
    }
  }

  /** `local`: this client ended the connection (offline, heartbeat, gap), not the server or the network. */
  onClose(ws, code, reason, local = false) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.stopHeartbeat();
    this.clearTimer(this.renewal);
    const unanswered = this.state.connectionLost();
    const opened = this.connectedAt !== 0;
    if (opened) this.backoff.connectionEnded(this.now() - this.connectedAt);
    this.connectedAt = 0;
    if (this.closed) return;
    reason = reason || `closed with ${code}`;
    let action = closeAction(code === 1006 ? null : code);
    if (!local && this.blameChats(unanswered, code) && code === 1009) action = "reconnect"; // the culprit is gone
    if (!opened && !local && this.probe) {
      this.probeThenReconnect(code, reason);
      return;
    }
    this.scheduleReconnect(action, code, reason);
  }

  /**
   * A connection the server or the network ended with chats sent and unanswered: the chat may be why.
   * 1009 names the largest of them too big at once; other drops count, and a chat on `maxChatAttempts`
   * dropped connections is given up. A server going away (1001, 1012) or shedding a slow reader (1013)
   * blames no chat. Returns true if a chat was given up.
   */
  blameChats(unanswered, code) {
    if (!unanswered.length || [1001, 1012, 1013].includes(code)) return false;
    const bytes = (id) => frameBytes(this.state.unacknowledged.get(id));
    if (code === 1009) {
      const id = unanswered.reduce((a, b) => (bytes(b) > bytes(a) ? b : a));
      this.giveUpChat(id, "too_big", `the server closed the connection: this message is too large for it (${bytes(id)} bytes as sent)`);
      return true;
    }
    let gaveUp = false;
    for (const id of unanswered) {
      const drops = (this.chatDrops.get(id) ?? 0) + 1;
      if (drops < this.maxChatAttempts) {
        this.chatDrops.set(id, drops);
        continue;
      }
      this.giveUpChat(
        id,
        "unavailable",
        `the connection closed each time this message was sent (${drops} times), so it was not sent again; it may be too large for the server (${bytes(id)} bytes as sent)`,
      );
      gaveUp = true;
    }
    return gaveUp;
  }

  giveUpChat(id, code, message) {
    this.chatDrops.delete(id);
    if (!this.state.forget(id)) return;
    this.dispatchEvent(Object.assign(new Event("frame"), { detail: { type: "error", code, message, id, local: true } }));
  }

  /** A connection refused before it opened: ask over HTTP why, with the same token; 401/403 stop. */
  async probeThenReconnect(code, reason) {
    this.probing = true;
    let result = null;
    try {
      result = await this.probe({ session: this.state.session, token: this.token });
    } catch {
      result = null; // the server is unreachable: an ordinary failure
    }
    this.probing = false;
    if (this.closed || this.ws) return;
    const status = result?.status;
    if (status === 401 && this.tokenProvider !== null && !this.tokenFresh) {
      this.scheduleReconnect("refresh_token", code, result.message || reason); // a new token may do
    } else if (status === 401 || status === 403) {
      this.closed = true;
      this.emitState("closed", { code, status, reason: result.message || `HTTP ${status}` });
    } else {
      this.scheduleReconnect("reconnect", code, reason);
    }
  }

  scheduleReconnect(action, code, reason) {
    if (action === "stop") {
      this.closed = true;
      this.emitState("closed", { code, reason });
      return;
    }
    if (action === "refresh_token") this.needToken = this.tokenProvider !== null;
    const delayMs = this.backoff.nextDelay(this.random());
    if (delayMs === null) {
      this.closed = true;
      this.emitState("closed", { code, reason: `gave up after ${this.backoff.attempt} attempts: ${reason}` });
      return;
    }
    const offline = globalThis.navigator?.onLine === false;
    this.emitState(offline ? "offline" : "reconnecting", { delayMs, attempt: this.backoff.attempt, code, reason });
    this.retry = this.setTimer(() => this.connect(), delayMs);
  }

  /** Renew the token on this connection before it expires (the auth frame), at 75% of its remaining life. */
  scheduleRenewal(ws, exp) {
    if (!this.tokenProvider) return;
    this.clearTimer(this.renewal);
    // A renewal that did not move the expiry (whole seconds) waits a second, instead of spinning.
    const floorMs = exp <= this.renewedExp ? 1000 : 0;
    this.renewedExp = exp;
    const remainingMs = exp * 1000 - this.now();
    const leadMs = Math.min(60000, remainingMs / 4);
    this.renewal = this.setTimer(async () => {
      if (ws !== this.ws) return;
      try {
        this.token = await this.tokenProvider();
      } catch {
        this.scheduleRenewal(ws, exp); // try again; the server closes with 4001 if it is too late
        return;
      }
      if (ws === this.ws && ws.readyState === 1) ws.send(JSON.stringify({ type: "auth", token: this.token }));
    }, Math.max(floorMs, remainingMs - leadMs));
  }

  startHeartbeat(ws) {
    this.stopHeartbeat();
    const beat = () => {
      if (ws !== this.ws) return;
      if (this.now() - this.heardAt > this.pingTimeoutMs) {
        // Silent for too long: a half-open connection never closes by itself.
        ws.close(4000, "heartbeat timeout");
        this.onClose(ws, null, "no frame within the heartbeat timeout", true);
        return;
      }
      if (ws.readyState === 1) ws.send(JSON.stringify({ type: "ping", t: this.now() }));
      this.heartbeat = this.setTimer(beat, this.pingIntervalMs);
    };
    this.heartbeat = this.setTimer(beat, this.pingIntervalMs);
  }

  stopHeartbeat() {
    if (this.heartbeat !== null) this.clearTimer(this.heartbeat);
    this.heartbeat = null;
  }
}
