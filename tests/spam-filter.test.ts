// The spam filter as a step of the host's delivery (host/spam-filter.ts through startServer, with
// the spool), against the fake LMTP server and a stand-in rspamd that answers the verdict a test
// sets: what reaches LMTP (the verdict's fields, then the sender's bytes unchanged), what the HTTP
// answer is for each treatment, live and already accepted, the host's own spool retries, rspamd
// down, a repeat, a large message, a sender that leaves during the scan, and /metrics.
// The real rspamd, Dovecot and the Worker are in tests/integration/spam-filter.test.ts.

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import type { Resolver } from "node:dns/promises";
import { mkdtemp, rm } from "node:fs/promises";
import type { Server } from "bun";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { INBOUND_PATH } from "../shared/contract.ts";
import type { LogLine } from "../shared/log.ts";
import { startServer, type RunningServer } from "../server.ts";
import { freePort } from "../scripts/free-port.ts";
import { streamOf } from "./support/streams.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

const KEY = "spam-filter-test-key-0123456789abcdefghijklmnop";
const USER = "user@example.test";
const enc = new TextEncoder();

interface Scanned {
  headers: Headers;
  body: Uint8Array;
}

let fake: FakeLmtpServer;
let rspamd: Server<undefined>;
/** Every request rspamd got. */
let scans: Scanned[] = [];
/** What rspamd answers (a verdict, or a Response); it may wait first. */
let verdict: (s: Scanned) => Promise<unknown> | unknown = () => ({ action: "no action", score: 1, required_score: 15, symbols: {} });
const servers: RunningServer[] = [];
const dirs: string[] = [];
let logs: LogLine[] = [];

beforeAll(async () => {
  fake = await startFakeLmtp();
  rspamd = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const s = { headers: req.headers, body: new Uint8Array(await req.arrayBuffer()) };
      scans.push(s);
      const v = await verdict(s);
      return v instanceof Response ? v : Response.json(v);
    },
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await fake.close();
  await rspamd.stop(true);
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  fake.reset();
  scans = [];
  logs = [];
  verdict = () => ({ action: "no action", score: 1, required_score: 15, symbols: { MIME_GOOD: { score: -0.1, options: ["text/plain"] } } });
});

afterEach(async () => {
  fake.reset();
  await Promise.all(servers.splice(0).map((s) => s.stop()));
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

async function host(opts: { rspamdUrl?: string; timeoutMs?: number; lmtpPort?: number } = {}): Promise<RunningServer> {
  const dir = await mkdtemp("/tmp/spam-filter-test-");
  dirs.push(dir);
  const rspamdConfig = { url: opts.rspamdUrl ?? `http://127.0.0.1:${rspamd.port}`, timeoutMs: opts.timeoutMs ?? 2_000 };
  const config = { apiKeys: [KEY], lmtpHost: "127.0.0.1", lmtpPort: opts.lmtpPort ?? fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 8 * 1024 * 1024, spoolDir: dir, rspamd: rspamdConfig };
  const server = startServer(config, { log: (l) => logs.push(l), resolver: noNames, queue: { baseBackoffMs: 100, maxBackoffMs: 200 } });
  servers.push(server);
  return server;
}

/** A DNS that knows no name (the sending server's name lookup is tests/sender-name.test.ts's). */
const noNames = {
  reverse: async () => {
    throw Object.assign(new Error("ENOTFOUND"), { code: "ENOTFOUND" });
  },
} as unknown as Resolver;

const CF_RECEIVED = "Received: from mail.example.org (203.0.113.5)\r\n        by cloudflare-email.net (cloudflare) id AbC123\r\n        for <user@example.test>; Sat, 01 Mar 2025 12:00:00 +0000\r\n";

function message(id: string, body = `Hello ${id}.\r\n`): Uint8Array<ArrayBuffer> {
  return enc.encode(`${CF_RECEIVED}From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: <${id}@example.org>\r\nSubject: ${id}\r\n\r\n${body}`);
}

interface Answer {
  status: number;
  headers: Headers;
  body: Record<string, unknown> & { status: string; error?: string; message: string };
}

async function post(server: RunningServer, body: BodyInit, extra: Record<string, string> = {}): Promise<Answer> {
  const r = await fetch(server.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER, ...extra },
    body,
  });
  return { status: r.status, headers: r.headers, body: await r.json() };
}

async function metrics(server: RunningServer): Promise<Record<string, number>> {
  const text = await (await fetch(server.url + "/metrics", { headers: { "X-API-Key": KEY } })).text();
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^([a-z_]+(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

/** What LMTP got: the fields on top, and after them exactly `sent`. */
function split(data: Uint8Array, sent: Uint8Array): string {
  const fieldsLength = data.length - sent.length;
  expect(fieldsLength).toBeGreaterThan(0);
  expect(Buffer.from(data.subarray(fieldsLength)).equals(Buffer.from(sent))).toBe(true);
  return Buffer.from(data.subarray(0, fieldsLength)).toString("latin1");
}

describe("live delivery", () => {
  test("no action: delivered with the verdict's fields on top of the sender's bytes, unchanged; rspamd got the envelope and the sending server", async () => {
    const server = await host();
    const sent = message("plain");
    const a = await post(server, sent);
    expect(a.status).toBe(200);
    expect(fake.received).toHaveLength(1);
    const fields = split(fake.received[0]!.data, sent);
    expect(fields).toBe('X-Spam-Status: No, score=1.00 required=15.00 action="no action"\r\nX-Spamd-Result: default: False [1.00 / 15.00];\r\n\tMIME_GOOD(-0.10)[text/plain]\r\n');
    expect(scans).toHaveLength(1);
    expect(Buffer.from(scans[0]!.body).equals(Buffer.from(sent))).toBe(true);
    const h = scans[0]!.headers;
    expect([h.get("from"), h.get("rcpt"), h.get("ip"), h.get("helo"), h.get("queue-id")]).toEqual(["<sender@example.org>", `<${USER}>`, "203.0.113.5", "mail.example.org", a.body.request_id as string]);
  });

  test("add header: delivered with X-Spam: Yes", async () => {
    verdict = () => ({ action: "add header", score: 7, required_score: 15 });
    const server = await host();
    const sent = message("addheader");
    expect((await post(server, sent)).status).toBe(200);
    expect(split(fake.received[0]!.data, sent)).toContain("\r\nX-Spam: Yes\r\n");
  });

  test("reject: 422 spam_rejected with a 5.7.1 reason naming the filter; nothing delivered, nothing spooled", async () => {
    verdict = () => ({ action: "reject", score: 15, required_score: 15, symbols: { GTUBE: { score: 0 } }, messages: { smtp_message: "Gtube pattern" } });
    const server = await host();
    const a = await post(server, message("gtube"));
    expect(a.status).toBe(422);
    expect(a.body).toMatchObject({ status: "error", error: "spam_rejected", message: "550 5.7.1 Message refused as spam by the spam filter (rspamd, score 15.00 of 15.00): Gtube pattern" });
    expect(fake.received).toEqual([]);
    expect(server.runner!.size).toBe(0);
    const m = await metrics(server);
    expect(m.relay_rejected_total).toBe(1);
    expect(m['relay_spam_scans_total{outcome="reject"}']).toBe(1);
  });

  test("soft reject, and greylisted by rspamd: 429 spam_deferred with Retry-After; nothing delivered, nothing spooled", async () => {
    const server = await host();
    for (const v of [
      { action: "soft reject", score: 0, required_score: 15, messages: { smtp_message: "Try again later" } },
      { action: "greylist", score: 5, required_score: 15, symbols: { GREYLIST: { score: 0, options: ["greylisted", "Sat, 01 Mar 2025 12:05:00 UTC", "new record"] } } },
    ]) {
      verdict = () => v;
      const a = await post(server, message(`deferred-${v.action.replace(" ", "-")}`));
      expect(a.status).toBe(429);
      expect(a.headers.get("retry-after")).toBe("30");
      expect(a.body).toMatchObject({ status: "deferred", error: "spam_deferred" });
      expect(a.body.message).toStartWith("451 4.7.1 Try again later: deferred by the spam filter");
    }
    expect(fake.received).toEqual([]);
    expect(server.runner!.size).toBe(0);
    const m = await metrics(server);
    expect(m.relay_deferred_total).toBe(2);
    expect(m['relay_spam_scans_total{outcome="soft reject"}']).toBe(1);
    expect(m['relay_spam_scans_total{outcome="greylist"}']).toBe(1);
  });

  test("greylist as a score band only (rspamd without its greylisting memory): delivered, not deferred forever", async () => {
    verdict = () => ({ action: "greylist", score: 4.9, required_score: 15 });
    const server = await host();
    const sent = message("band");
    expect((await post(server, sent)).status).toBe(200);
    expect(split(fake.received[0]!.data, sent)).toStartWith('X-Spam-Status: No, score=4.90 required=15.00 action="greylist"\r\n');
  });

  test("a repeat of delivered bytes is answered duplicate without a second scan; the record is of the sender's bytes", async () => {
    const server = await host();
    const sent = message("repeat");
    expect((await post(server, sent)).status).toBe(200);
    // The verdict changes meanwhile: the repeat is still a duplicate, not refused.
    verdict = () => ({ action: "reject", score: 20, required_score: 15 });
    const again = await post(server, sent);
    expect(again.status).toBe(200);
    expect(again.body.status).toBe("duplicate");
    expect(scans).toHaveLength(1);
    expect(fake.received).toHaveLength(1);
  });

  test("LF line ends: the fields use LF too", async () => {
    const server = await host();
    const sent = enc.encode("From: sender@example.org\nMessage-ID: <lf@example.org>\n\nbare LF\n");
    expect((await post(server, sent)).status).toBe(200);
    // The LMTP client writes CRLF on the wire; what it was given is seen in rspamd's copy and the log.
    expect(scans[0]!.body).toEqual(sent);
    const data = Buffer.from(fake.received[0]!.data).toString("latin1");
    expect(data).toStartWith("X-Spam-Status: No");
    expect(data).toEndWith("From: sender@example.org\r\nMessage-ID: <lf@example.org>\r\n\r\nbare LF\r\n");
  });

  test("a message past the first MiB is scanned from the spool's tmp/ file and delivered streamed, byte for byte", async () => {
    const server = await host();
    const big = new Uint8Array(3 * 1024 * 1024 + 17);
    const head = message("big", "");
    big.set(head);
    for (let i = head.length; i < big.length; i++) big[i] = 0x41 + (i % 26);
    for (let i = head.length + 76; i < big.length - 2; i += 78) big.set([0x0d, 0x0a], i);
    big.set([0x0d, 0x0a], big.length - 2);
    expect((await post(server, streamOf(big, 65_536))).status).toBe(200);
    expect(Buffer.from(scans[0]!.body).equals(Buffer.from(big))).toBe(true);
    split(fake.received[0]!.data, big);
  });

  test("the sender leaves while rspamd thinks: nothing is delivered", async () => {
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    verdict = async () => {
      await released;
      return { action: "no action", score: 0, required_score: 15 };
    };
    const server = await host();
    const gone = new AbortController();
    const req = fetch(server.url + INBOUND_PATH, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER },
      body: message("gone"),
      signal: gone.signal,
    }).catch(() => null);
    await until("rspamd asked", () => scans.length === 1);
    gone.abort();
    await req;
    await Bun.sleep(100);
    release();
    await until("the host's answer logged", () => logs.some((l) => l.path === INBOUND_PATH));
    expect(logs.find((l) => l.path === INBOUND_PATH)).toMatchObject({ status: 503, error: "client_gone" });
    expect(fake.received).toEqual([]);
  });
});

describe("already accepted", () => {
  test("X-Already-Accepted: true (the edge's drain): rejected as spam, delivered with X-Spam: Yes, 200", async () => {
    verdict = () => ({ action: "reject", score: 15, required_score: 15 });
    const server = await host();
    const sent = message("held-gtube");
    const a = await post(server, sent, { "X-Already-Accepted": "true" });
    expect(a.status).toBe(200);
    const fields = split(fake.received[0]!.data, sent);
    expect(fields).toStartWith('X-Spam-Status: Yes, score=15.00 required=15.00 action="reject"\r\n');
    expect(fields).toContain("\r\nX-Spam: Yes\r\n");
    expect(logs.find((l) => l.path === INBOUND_PATH)).toMatchObject({ already_accepted: true, status: 200 });
  });

  test("deferred as spam, already accepted: delivered", async () => {
    verdict = () => ({ action: "soft reject", score: 0, required_score: 15 });
    const server = await host();
    expect((await post(server, message("held-soft"), { "X-Already-Accepted": "true" })).status).toBe(200);
    expect(fake.received).toHaveLength(1);
  });

  test("any other value of X-Already-Accepted: 400; without the key: 401; nothing scanned either way", async () => {
    const server = await host();
    const a = await post(server, message("bad-marker"), { "X-Already-Accepted": "yes please" });
    expect(a.status).toBe(400);
    expect(a.body.message).toContain("X-Already-Accepted");
    const keyless = await post(server, message("keyless-marker"), { "X-Already-Accepted": "true", "X-API-Key": "not-the-key-0123456789abcdefghijklmnop" });
    expect(keyless.status).toBe(401);
    expect(scans).toEqual([]);
    expect(fake.received).toEqual([]);
  });

  test("the host's own spool retry is already accepted: scanned again and delivered with its verdict, never refused", async () => {
    const server = await host();
    fake.behaviour.rcpt = () => 450;
    const sent = message("spooled");
    expect((await post(server, sent)).status).toBe(202);
    expect(scans).toHaveLength(1);
    // Meanwhile rspamd has learnt to hate it.
    verdict = () => ({ action: "reject", score: 30, required_score: 15 });
    fake.behaviour.rcpt = () => 250;
    await until("delivered from the spool", () => fake.received.length === 1 && server.runner!.size === 0);
    expect(scans).toHaveLength(2);
    // rspamd got the sender's bytes again, not the first verdict's fields.
    expect(Buffer.from(scans[1]!.body).equals(Buffer.from(sent))).toBe(true);
    expect(scans[1]!.headers.get("ip")).toBe("203.0.113.5");
    const fields = split(fake.received[0]!.data, sent);
    expect(fields).toStartWith('X-Spam-Status: Yes, score=30.00 required=15.00 action="reject"\r\n');
    expect((await metrics(server)).relay_spool_delivered_total).toBe(1);
  });
});

describe("rspamd cannot answer", () => {
  test("nothing listens: delivered unscanned, X-Spam-Status: Unknown, logged and counted", async () => {
    const server = await host({ rspamdUrl: `http://127.0.0.1:${await freePort()}` });
    const sent = message("down");
    expect((await post(server, sent)).status).toBe(200);
    expect(split(fake.received[0]!.data, sent)).toStartWith("X-Spam-Status: Unknown, not scanned (rspamd: ");
    expect(logs.some((l) => l.event === "spam_unscanned")).toBe(true);
    expect((await metrics(server))['relay_spam_scans_total{outcome="failed"}']).toBe(1);
  });

  test("too slow: its own time limit, then delivered unscanned", async () => {
    verdict = () => new Promise(() => {});
    const server = await host({ timeoutMs: 300 });
    const sent = message("slow");
    expect((await post(server, sent)).status).toBe(200);
    expect(split(fake.received[0]!.data, sent)).toBe("X-Spam-Status: Unknown, not scanned (rspamd: no answer within 300 ms)\r\n");
  });

  test("an error answer: the same", async () => {
    verdict = () => new Response("oops", { status: 500 });
    const server = await host();
    expect((await post(server, message("error"))).status).toBe(200);
    expect(Buffer.from(fake.received[0]!.data).toString("latin1")).toStartWith("X-Spam-Status: Unknown, not scanned (rspamd: HTTP 500: oops)\r\n");
  });
});

describe("/metrics", () => {
  test("scans counted by outcome, with their time", async () => {
    const server = await host();
    await post(server, message("m1"));
    verdict = () => ({ action: "add header", score: 7, required_score: 15 });
    await post(server, message("m2"));
    const m = await metrics(server);
    expect(m['relay_spam_scans_total{outcome="no action"}']).toBe(1);
    expect(m['relay_spam_scans_total{outcome="add header"}']).toBe(1);
    expect(m['relay_spam_scans_total{outcome="failed"}']).toBe(0);
    expect(m.relay_spam_scan_seconds_count).toBe(2);
    expect(m['relay_spam_scan_seconds_bucket{le="+Inf"}']).toBe(2);
  });

  test("without RSPAMD_URL: no spam lines at all, and nothing prepended", async () => {
    const dir = await mkdtemp("/tmp/spam-filter-test-");
    dirs.push(dir);
    const server = startServer({ apiKeys: [KEY], lmtpHost: "127.0.0.1", lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 1024 * 1024, spoolDir: dir }, { log: () => {}, resolver: noNames });
    servers.push(server);
    const sent = message("off");
    expect((await post(server, sent)).status).toBe(200);
    expect(Buffer.from(fake.received[0]!.data).equals(Buffer.from(sent))).toBe(true);
    const text = await (await fetch(server.url + "/metrics", { headers: { "X-API-Key": KEY } })).text();
    expect(text).not.toContain("spam");
    expect(scans).toEqual([]);
  });
});
