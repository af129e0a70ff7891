// Unit tests of the browser client under Node's test runner: `node --test tests/js/`.
// A fake WebSocket and fake timers stand in for the browser; no network.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  Backoff,
  ChatClient,
  SessionState,
  TooBig,
  closeAction,
  codePoints,
  frameBytes,
  OfflineQueueFull,
} from "../../services/gateway/static/chat-client.js";

class FakeSocket {
  static all = [];
  constructor(url, protocol) {
    Object.assign(this, { url, protocol, readyState: 0, sent: [] });
    FakeSocket.all.push(this);
  }
  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.readyState = 3;
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

class Clock {
  constructor() {
    this.now = 0;
    this.timers = new Map();
    this.next = 1;
  }
  setTimeout = (fn, ms) => {
    const id = this.next++;
    this.timers.set(id, { fn, at: this.now + ms });
    return id;
  };
  clearTimeout = (id) => this.timers.delete(id);
  advance(ms) {
    const until = this.now + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.now = due[1].at;
      due[1].fn();
    }
    this.now = until;
  }
}

function makeClient(options = {}) {
  FakeSocket.all = [];
  const clock = new Clock();
  const client = new ChatClient("ws://gw.test/ws", {
    WebSocketImpl: FakeSocket,
    random: () => 0.5,
    now: () => clock.now,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    backoff: new Backoff({ initialMs: 100, capMs: 1000 }),
    pingIntervalMs: 1000,
    pingTimeoutMs: 3000,
    ...options,
  });
  const frames = [];
  const states = [];
  client.addEventListener("frame", (e) => frames.push(e.detail));
  client.addEventListener("state", (e) => states.push(e.detail));
  return { client, clock, frames, states };
}

const ready = (session = "s1", paused = false) => ({ type: "ready", session, last_seq: 0, paused });
const chunk = (seq) => ({ type: "chunk", seq, turn: 1, text: `w${seq}` });

test("backoff ceilings grow by factor up to the cap, with full jitter", () => {
  const backoff = new Backoff({ initialMs: 100, capMs: 1000, factor: 2 });
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((n) => backoff.ceiling(n)), [100, 200, 400, 800, 1000, 1000]);
  assert.equal(backoff.ceiling(100000), 1000);
  assert.deepEqual([0.5, 0, 0.999].map((r) => backoff.nextDelay(r)), [50, 0, 399.6]);
});

test("backoff stops after maxAttempts and resets after a healthy connection", () => {
  const backoff = new Backoff({ initialMs: 100, capMs: 1000, maxAttempts: 2, healthyAfterMs: 5000 });
  assert.equal(backoff.nextDelay(1), 100);
  assert.equal(backoff.nextDelay(1), 200);
  assert.equal(backoff.nextDelay(1), null);
  backoff.connectionEnded(100);
  assert.equal(backoff.attempt, 2);
  backoff.connectionEnded(5000);
  assert.equal(backoff.attempt, 0);
  assert.throws(() => new Backoff({ initialMs: 0 }), RangeError);
});

test("close codes: reconnect on network, 1012 and 1013; refresh on 4001; stop on 1008 and 4003", () => {
  for (const code of [null, 1001, 1006, 1011, 1012, 1013]) assert.equal(closeAction(code), "reconnect", String(code));
  assert.equal(closeAction(4001), "refresh_token");
  for (const code of [1000, 1008, 1009, 4003, 4999]) assert.equal(closeAction(code), "stop", String(code));
});

test("frames sent offline go out in order once the next connection is ready", () => {
  const state = new SessionState();
  state.send({ type: "stop" });
  state.send({ type: "ping", t: 1 });
  state.send({ type: "ping", t: 2 });
  assert.deepEqual(state.dataToSend(), []);
  state.receive(JSON.stringify(ready()));
  assert.deepEqual(state.dataToSend().map((d) => JSON.parse(d)), [{ type: "stop" }, { type: "ping", t: 1 }, { type: "ping", t: 2 }]);
});

test("a chat accepted before the connection dropped is reported from ready.last_chat, not resent", () => {
  const state = new SessionState();
  state.receive(JSON.stringify(ready()));
  state.send({ type: "chat", prompt: "hi", id: "a" });
  state.send({ type: "chat", prompt: "and this", id: "b" });
  state.dataToSend();
  state.connectionLost();
  const frames = state.receive(JSON.stringify({ ...ready(), last_seq: 9, last_chat: { id: "a", turn: 3 } }));
  assert.deepEqual(frames.slice(1), [{ type: "accepted", id: "a", turn: 3 }]);
  assert.deepEqual(state.dataToSend().map((d) => JSON.parse(d)), [{ type: "chat", prompt: "and this", id: "b" }]);
});

test("a chat never sent is not taken for ready.last_chat, whatever its id", () => {
  const state = new SessionState({ session: "s1" });
  state.send({ type: "chat", prompt: "continue", id: "c1" }); // before the first ready: never sent
  const frames = state.receive(JSON.stringify({ ...ready(), last_seq: 9, last_chat: { id: "c1", turn: 3 } }));
  assert.deepEqual(frames.slice(1), []);
  assert.deepEqual(state.dataToSend().map((d) => JSON.parse(d)), [{ type: "chat", prompt: "continue", id: "c1" }]);
});

test("the offline queue is bounded", () => {
  const state = new SessionState({ maxQueue: 1 });
  state.send({ type: "stop" });
  assert.throws(() => state.send({ type: "stop" }), OfflineQueueFull);
});

test("replayed frames at or below last seq are dropped; a gap throws", () => {
  const state = new SessionState({ lastSeq: 2 });
  state.receive(JSON.stringify(ready()));
  assert.deepEqual(state.receive(JSON.stringify(chunk(2))), []);
  assert.equal(state.receive(JSON.stringify(chunk(3))).length, 1);
  assert.throws(() => state.receive(JSON.stringify(chunk(5))), /got seq 5 after 3/);
});

test("the client reconnects with session and last_seq, and listeners see each seq once", () => {
  const { client, clock, frames, states } = makeClient();
  client.start();
  let ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready("abc"));
  ws.deliver(chunk(1));
  ws.deliver(chunk(2));
  ws.serverClose(1006);
  assert.deepEqual(states.at(-1), { state: "reconnecting", delayMs: 50, attempt: 1, code: 1006, reason: "closed with 1006" });
  clock.advance(50);
  ws = FakeSocket.last();
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(ws.url, "ws://gw.test/ws?session=abc&last_seq=2");
  assert.equal(ws.protocol, "chat.v1");
  ws.open();
  ws.deliver(ready("abc"));
  ws.deliver(chunk(2)); // replayed duplicate
  ws.deliver(chunk(3));
  assert.deepEqual(frames.filter((f) => f.type === "chunk").map((f) => f.seq), [1, 2, 3]);
});

test("a chat is resent after a reconnect until accepted, with the same id", () => {
  const { client, clock } = makeClient();
  client.start();
  let ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  const id = client.chat("hello");
  assert.deepEqual(ws.sent, [{ type: "chat", prompt: "hello", id }]);
  ws.serverClose(1012);
  clock.advance(1000);
  ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  assert.deepEqual(ws.sent, [{ type: "chat", prompt: "hello", id }]);
  ws.deliver({ type: "accepted", id, turn: 1 });
  ws.serverClose(1012);
  clock.advance(1000);
  ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  assert.deepEqual(ws.sent, []);
});

test("a pause asked while offline is sent only if the session is not already paused", () => {
  const { client, clock } = makeClient();
  client.start();
  let ws = FakeSocket.last();
  ws.serverClose(1006);
  client.pause();
  clock.advance(1000);
  ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready("s1", true));
  assert.deepEqual(ws.sent, []);
});

test("a silent connection is dropped by the heartbeat and replaced", () => {
  const { client, clock, states } = makeClient();
  client.start();
  const ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  clock.advance(1000);
  assert.deepEqual(ws.sent.map((f) => f.type), ["ping"]);
  clock.advance(3000); // no frame for longer than pingTimeoutMs
  assert.equal(ws.readyState, 3);
  assert.equal(states.at(-1).state, "reconnecting");
  clock.advance(1000);
  assert.equal(FakeSocket.all.length, 2);
});

test("policy and forbidden closes stop for good; attempts run out with a reason", () => {
  for (const code of [1008, 4003]) {
    const { client, states } = makeClient();
    client.start();
    FakeSocket.last().open();
    FakeSocket.last().serverClose(code, "no");
    assert.deepEqual(states.at(-1), { state: "closed", code, reason: "no" });
  }
  const { client, clock, states } = makeClient({ backoff: new Backoff({ initialMs: 10, capMs: 10, maxAttempts: 1 }) });
  client.start();
  FakeSocket.last().serverClose(1006);
  clock.advance(10);
  FakeSocket.last().serverClose(1006);
  assert.equal(states.at(-1).state, "closed");
  assert.match(states.at(-1).reason, /gave up after 1 attempts/);
});

test("4001 asks the token provider again before reconnecting", async () => {
  let calls = 0;
  const { client, clock } = makeClient({ tokenProvider: async () => `t${++calls}` });
  client.start();
  await Promise.resolve();
  assert.match(FakeSocket.last().url, /token=t1/);
  FakeSocket.last().open();
  FakeSocket.last().serverClose(4001);
  clock.advance(1000);
  await Promise.resolve();
  assert.equal(calls, 2);
  assert.match(FakeSocket.last().url, /token=t2/);
});

test("networkLost drops the socket at once and schedules a reconnect; retryNow connects", () => {
  const { client, states } = makeClient();
  client.start();
  const ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  client.networkLost();
  assert.equal(ws.readyState, 3);
  assert.equal(states.at(-1).state, "reconnecting");
  client.retryNow();
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(states.at(-1).state, "connecting");
});

test("the token is renewed on the live connection before it expires", async () => {
  let calls = 0;
  const { client, clock } = makeClient({ tokenProvider: async () => `t${++calls}`, pingTimeoutMs: 1e9 });
  client.start();
  await Promise.resolve();
  const ws = FakeSocket.last();
  ws.open();
  ws.deliver({ ...ready(), exp: 100 }); // expires at t = 100 s; the clock is at 0
  clock.advance(74000);
  assert.equal(calls, 1);
  clock.advance(2000); // 75% of the remaining life
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(calls, 2);
  assert.deepEqual(ws.sent.filter((f) => f.type === "auth"), [{ type: "auth", token: "t2" }]);
  assert.equal(FakeSocket.all.length, 1); // no reconnect
});

test("a chat over the frame limit (UTF-8 bytes of the frame) is refused before it is sent or kept", () => {
  const { client } = makeClient();
  client.start();
  const ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  const overhead = frameBytes({ type: "chat", prompt: "", id: "x" });
  assert.equal(frameBytes({ type: "chat", prompt: "€", id: "x" }), overhead + 3);
  const fits = "a".repeat(65536 - overhead);
  client.chat(fits, "x");
  assert.equal(ws.sent.length, 1);
  const error = (() => {
    try {
      client.chat("€".repeat(22000), "y"); // 22000 characters, 66000 bytes
    } catch (e) {
      return e;
    }
    return null;
  })();
  assert.ok(error instanceof TooBig);
  assert.equal(error.unit, "bytes");
  assert.equal(error.limit, 65536);
  assert.equal(error.size, overhead + 66000);
  assert.equal(ws.sent.length, 1);
  assert.equal(client.state.unacknowledged.has("y"), false);
});

test("limits told in ready replace the defaults; prompt characters count code points", () => {
  assert.equal(codePoints("a😀b"), 3);
  assert.equal(codePoints("\ud83d"), 1);
  const state = new SessionState();
  state.receive(JSON.stringify({ ...ready(), max_frame_bytes: 100, max_prompt_chars: 5 }));
  assert.throws(() => state.send({ type: "chat", prompt: "😀😀😀😀😀😀", id: "a" }), (e) => e instanceof TooBig && e.unit === "characters" && e.size === 6);
  state.send({ type: "chat", prompt: "😀😀😀😀😀", id: "b" });
  assert.throws(() => state.send({ type: "chat", prompt: "x", id: "c".repeat(100) }), (e) => e instanceof TooBig && e.unit === "bytes");
});

test("1009 right after a chat: that chat is given up with a local error, and the client reconnects", () => {
  const { client, clock, frames, states } = makeClient({ maxFrameBytes: null });
  client.start();
  let ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  const small = client.chat("small");
  ws.deliver({ type: "accepted", id: small, turn: 1 });
  const big = client.chat("b".repeat(5000));
  ws.serverClose(1009, "frame exceeds limit");
  assert.deepEqual(frames.at(-1), { type: "error", code: "too_big", id: big, local: true, message: frames.at(-1).message });
  assert.match(frames.at(-1).message, /too large/);
  assert.equal(states.at(-1).state, "reconnecting");
  clock.advance(1000);
  ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  assert.deepEqual(ws.sent, []); // not resent
});

test("1009 with no chat waiting still stops for good", () => {
  const { client, states } = makeClient();
  client.start();
  FakeSocket.last().open();
  FakeSocket.last().deliver(ready());
  FakeSocket.last().serverClose(1009, "too big");
  assert.deepEqual(states.at(-1), { state: "closed", code: 1009, reason: "too big" });
});

test("a chat whose sending keeps dropping the connection is given up after maxChatAttempts, not resent forever", () => {
  const { client, clock, frames } = makeClient({ maxFrameBytes: null });
  client.start();
  let ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  const id = client.chat("c".repeat(200000));
  let sends = 0;
  for (let i = 0; i < 10 && client.state.unacknowledged.has(id); i += 1) {
    sends += ws.sent.filter((f) => f.type === "chat").length;
    ws.serverClose(1006);
    clock.advance(1000);
    ws = FakeSocket.last();
    ws.open();
    ws.deliver(ready());
  }
  assert.equal(sends, 3);
  assert.equal(frames.filter((f) => f.type === "error").length, 1);
  assert.deepEqual(frames.at(-2), { type: "error", code: "unavailable", id, local: true, message: frames.at(-2).message });
  assert.deepEqual(ws.sent, []);
});

test("drops the server announces (1012 restart, 1013 slow reader) and the client's own never blame a chat", () => {
  const { client, clock, frames } = makeClient();
  client.start();
  let ws = FakeSocket.last();
  ws.open();
  ws.deliver(ready());
  const id = client.chat("hello");
  for (let i = 0; i < 5; i += 1) {
    if (i % 2) ws.serverClose(1012);
    else client.networkLost();
    clock.advance(1000);
    ws = FakeSocket.last();
    ws.open();
    ws.deliver(ready());
  }
  assert.deepEqual(ws.sent, [{ type: "chat", prompt: "hello", id }]);
  assert.equal(frames.filter((f) => f.type === "error").length, 0);
});

const settle = async () => {
  for (let i = 0; i < 10; i += 1) await Promise.resolve();
};

test("a handshake refused before opening is probed; 401 stops with the reason instead of retrying", async () => {
  const probes = [];
  const { client, clock, states } = makeClient({
    probe: async (args) => {
      probes.push(args);
      return { status: 401, message: "a token is required" };
    },
  });
  client.start();
  FakeSocket.last().serverClose(1006);
  await settle();
  assert.deepEqual(probes, [{ session: null, token: null }]);
  assert.deepEqual(states.at(-1), { state: "closed", code: 1006, status: 401, reason: "a token is required" });
  clock.advance(60000);
  assert.equal(FakeSocket.all.length, 1);
});

test("probe: other answers (or none) keep the backoff; 403 stops", async () => {
  let answer = { status: 200, message: "" };
  const { client, clock, states } = makeClient({ probe: async () => (answer === null ? Promise.reject(new Error("down")) : answer) });
  client.start();
  FakeSocket.last().serverClose(1006);
  await settle();
  assert.equal(states.at(-1).state, "reconnecting");
  clock.advance(1000);
  answer = null;
  FakeSocket.last().serverClose(1006);
  await settle();
  assert.equal(states.at(-1).state, "reconnecting");
  clock.advance(1000);
  answer = { status: 403, message: "this origin is not allowed" };
  FakeSocket.last().serverClose(1006);
  await settle();
  assert.deepEqual(states.at(-1), { state: "closed", code: 1006, status: 403, reason: "this origin is not allowed" });
});

test("probe 401 with a token the provider gave long ago: one new token, then stop if it is refused too", async () => {
  let calls = 0;
  const { client, clock, states } = makeClient({
    tokenProvider: async () => `t${++calls}`,
    probe: async () => ({ status: 401, message: "token expired" }),
  });
  client.start();
  await settle();
  FakeSocket.last().open();
  FakeSocket.last().deliver(ready());
  FakeSocket.last().serverClose(1006); // a drop: the token expires while disconnected
  clock.advance(1000);
  FakeSocket.last().serverClose(1006); // refused before opening
  await settle();
  assert.equal(states.at(-1).state, "reconnecting");
  clock.advance(1000);
  await settle();
  assert.equal(calls, 2);
  assert.match(FakeSocket.last().url, /token=t2/);
  FakeSocket.last().serverClose(1006);
  await settle();
  assert.deepEqual(states.at(-1), { state: "closed", code: 1006, status: 401, reason: "token expired" });
});
