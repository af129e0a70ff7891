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

export const SUBPROTOCOL = "chat.v1";

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

function newId() {
  return globalThis.crypto?.randomUUID ? globalThis.crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

/** The client's memory of a session across connections; no I/O. */
export class SessionState {
  constructor({ session = null, lastSeq = 0, maxQueue = 100 } = {}) {
    this.session = session;
    this.lastSeq = lastSeq;
    this.maxQueue = maxQueue;
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

  /** Send now if ready, else keep for the next connection; returns the frame. */
  send(frame) {
    if (frame.type === "chat") {
      frame = { ...frame, id: frame.id ?? newId() };
      this.unacknowledged.set(frame.id, frame);
    } else if (frame.type === "pause") {
      this.wantPaused = true;
    } else if (frame.type === "resume") {
      this.wantPaused = false;
    }
    if (this.ready) {
      this.toSend.push(JSON.stringify(frame));
      if (frame.type === "chat") this.sent.add(frame.id);
    } else if (!["chat", "pause", "resume"].includes(frame.type)) {
      // chats are resent from `unacknowledged`, pause/resume reconciled from `wantPaused`
      if (this.queue.length >= this.maxQueue) {
        throw new OfflineQueueFull(`${this.queue.length} frames are already queued while offline (the limit)`);
      }
      this.queue.push(frame);
    }
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
        if (frame.id !== undefined && frame.id !== null) {
          this.unacknowledged.delete(frame.id);
          this.sent.delete(frame.id);
        }
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
    const answered = [];
    const last = ready.last_chat;
    if (last && this.sent.has(last.id)) {
      // Sent, and accepted before the connection dropped: a resend would start a second turn once
      // this one ended. A chat never sent cannot be it, whatever its id.
      this.unacknowledged.delete(last.id);
      this.sent.delete(last.id);
      answered.push({ type: "accepted", id: last.id, turn: last.turn });
    }
    for (const chat of this.unacknowledged.values()) {
      this.toSend.push(JSON.stringify(chat));
      this.sent.add(chat.id);
    }
    if (this.wantPaused !== null && this.wantPaused !== ready.paused) {
      this.toSend.push(JSON.stringify({ type: this.wantPaused ? "pause" : "resume" }));
    } else {
      this.wantPaused = null;
    }
    while (this.queue.length) this.toSend.push(JSON.stringify(this.queue.shift()));
    return answered;
  }

  connectionLost() {
    this.ready = false;
    this.toSend = [];
  }
}

/**
 * A reconnecting client. Events:
 * - "frame": detail is each server frame (ready, accepted, chunk, done, paused, resumed, pong, error), deduplicated;
 * - "state": detail is {state, attempt, delayMs, reason, code}; state is "connecting", "connected",
 *   "reconnecting" (with delayMs and attempt), "offline" (the browser reports no network) or "closed" (for good).
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
    this.onClose(ws, null, "the browser is offline");
  }

  /** The page saw the network come back (window "online"): retry now instead of waiting. */
  retryNow() {
    if (this.closed || this.ws) return;
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
        this.onClose(ws, null, error.message);
      }
      return;
    }
    for (const frame of frames) {
      if (frame.type === "ready") {
        this.emitState("connected", { session: frame.session, attempt: this.backoff.attempt });
        this.flush();
      }
      if ((frame.type === "ready" || frame.type === "auth_ok") && frame.exp) this.scheduleRenewal(ws, frame.exp);
      this.dispatchEvent(Object.assign(new Event("frame"), { detail: frame }));
    }
  }

  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.stopHeartbeat();
    this.clearTimer(this.renewal);
    this.state.connectionLost();
    if (this.connectedAt) this.backoff.connectionEnded(this.now() - this.connectedAt);
    this.connectedAt = 0;
    if (this.closed) return;
    this.scheduleReconnect(closeAction(code === 1006 ? null : code), code, reason || `closed with ${code}`);
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
        this.onClose(ws, null, "no frame within the heartbeat timeout");
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
