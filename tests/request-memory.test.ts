// Memory per request is bounded on both routes: the relay as a process of its own (its memory
// alone is measured: VmHWM, reset at idle through /proc/PID/clear_refs), with a spool, in front of
// the fake LMTP server; 6 messages of 16 MiB at once, as message/rfc822 and as the runbook's JSON
// with every character a "\uXXXX" escape, as json.dumps writes Cyrillic (36 MiB of JSON each).
// Held whole, as the JSON route did, a request took about 5 times its message (these 6: 480 MiB
// above idle); received as it streams, it holds a chunk at a time, and what rises is the garbage
// of the chunks gone through until the collector runs (77 MiB here, rfc822 36 to 58).

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { INBOUND_PATH } from "../shared/contract.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { memStatus, resetHighWaterMark } from "../bench/proc.ts";
import { startRelay, type RelayProcess } from "./support/relay-process.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

const KEY = "request-memory-test-key-0123456789abcdefghij";
const USER = "user@example.test";
const MiB = 1024 * 1024;
const AT_ONCE = 6;
const LINE = "\u0416\u0438\u0432\u0451\u0442 \u0441\u043b\u043e\u043d \u0432 \u0437\u043e\u043e\u043f\u0430\u0440\u043a\u0435.\r\n"; // 52 bytes of UTF-8
const MESSAGE_MIB = 16;
const LINES = Math.floor((MESSAGE_MIB * MiB) / 52);

let fake: FakeLmtpServer;
let relay: RelayProcess;
let dir: string;

beforeAll(async () => {
  fake = await startFakeLmtp();
  dir = await mkdtemp("/tmp/request-memory-");
  relay = await startRelay({ API_KEY: KEY, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(fake.port), SPOOL_DIR: dir, MAX_MESSAGE_BYTES: String(25 * MiB) });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await relay.kill("SIGKILL");
  await fake.close();
  await rm(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

const enc = new TextEncoder();
const escaped = (t: string) => JSON.stringify(t).slice(1, -1).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
/** The lines every message shares, built once (the test holds one copy, not one per message). */
const RAW_LINES = enc.encode(LINE.repeat(LINES));
const JSON_LINES = enc.encode(escaped(LINE).repeat(LINES));

/** A stream of the parts, the large ones in 1 MiB views: nothing is copied on the test's side. */
function streamOf(...parts: Uint8Array[]): ReadableStream<Uint8Array> {
  const pieces = parts.flatMap((p) => Array.from({ length: Math.ceil(p.length / MiB) }, (_, i) => p.subarray(i * MiB, (i + 1) * MiB)));
  return new ReadableStream({
    pull(c) {
      const next = pieces.shift();
      if (next) c.enqueue(next);
      else c.close();
    },
  });
}

/** Message i: its own head (a Message-ID: no two are the same bytes), the shared lines; as message/rfc822 and as the runbook's JSON in ASCII only. */
function message(i: number) {
  const head = `Message-ID: <memory-${i}-${Date.now()}@example.org>\r\nSubject: memory ${i}\r\n\r\n`;
  const rfc822 = enc.encode(head);
  const jsonHead = enc.encode(`{"from": "sender@example.org", "to": "${USER}", "subject": "memory", "raw": "${escaped(head)}`);
  const jsonTail = enc.encode(`", "timestamp": "2025-11-12T10:00:00Z"}`);
  return {
    head: rfc822,
    raw: () => streamOf(rfc822, RAW_LINES),
    json: () => streamOf(jsonHead, JSON_LINES, jsonTail),
    jsonBytes: jsonHead.length + JSON_LINES.length + jsonTail.length,
  };
}

/** Sends the bodies at once; returns the statuses and the relay's peak RSS above its idle level, in MiB. */
async function peakAboveIdle(bodies: { type: string; body: ReadableStream<Uint8Array>; headers?: Record<string, string> }[]): Promise<{ statuses: number[]; mib: number }> {
  await Bun.sleep(500);
  const idle = memStatus(relay.proc.pid).rss;
  expect(resetHighWaterMark(relay.proc.pid)).toBe(true);
  const statuses = await Promise.all(
    bodies.map(async ({ type, body, headers }) => {
      const r = await fetch(relay.url + INBOUND_PATH, { method: "POST", headers: { "Content-Type": type, "X-API-Key": KEY, ...headers }, body });
      await r.arrayBuffer();
      return r.status;
    }),
  );
  return { statuses, mib: (memStatus(relay.proc.pid).hwm - idle) / MiB };
}

const envelope = { "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER };

describe(`${AT_ONCE} messages of ${MESSAGE_MIB} MiB at once`, () => {
  const messages = Array.from({ length: AT_ONCE }, (_, i) => message(i));

  test("warm-up: one of each is delivered", async () => {
    const a = await peakAboveIdle([
      { type: "message/rfc822", body: message(100).raw(), headers: envelope },
      { type: "application/json", body: message(101).json() },
    ]);
    expect(a.statuses).toEqual([200, 200]);
  });

  test("as the runbook's JSON: all delivered byte-exact; the relay's peak above idle is under 2 messages per request (held whole, about 5)", async () => {
    fake.reset();
    const { statuses, mib } = await peakAboveIdle(messages.map((m) => ({ type: "application/json", body: m.json() })));
    console.log(JSON.stringify({ route: "json", messages: AT_ONCE, json_mib: +(messages[0]!.jsonBytes / MiB).toFixed(1), peak_above_idle_mib: +mib.toFixed(1) }));
    expect(statuses).toEqual(messages.map(() => 200));
    expect(fake.received.length).toBe(AT_ONCE);
    for (const r of fake.received) {
      expect(r.data.length).toBe(messages[0]!.head.length + RAW_LINES.length);
      expect(Buffer.from(r.data.subarray(r.data.length - RAW_LINES.length)).equals(Buffer.from(RAW_LINES))).toBe(true);
    }
    expect(mib).toBeLessThan(2 * AT_ONCE * MESSAGE_MIB);
  });

  test("as message/rfc822: the same bound", async () => {
    fake.reset();
    const { statuses, mib } = await peakAboveIdle(messages.map((m) => ({ type: "message/rfc822", body: m.raw(), headers: envelope })));
    console.log(JSON.stringify({ route: "rfc822", messages: AT_ONCE, peak_above_idle_mib: +mib.toFixed(1) }));
    expect(statuses).toEqual(messages.map(() => 200));
    expect(mib).toBeLessThan(2 * AT_ONCE * MESSAGE_MIB);
  });
});
