// The host's delivery with the durable spool (delivery.ts, through startServer) against the
// scriptable fake LMTP server: what is answered 202 is on disk, complete, and delivered later by
// the background deliverer; what cannot be spooled is answered 503; duplicates; /metrics.

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { INBOUND_PATH } from "../shared/contract.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import type { LmtpPoolOptions } from "../lmtp.ts";
import type { LogLine } from "../shared/log.ts";
import type { QueueRunnerOptions } from "../host/queue-runner.ts";
import { startServer, type RunningServer } from "../server.ts";
import { Spool } from "../host/spool.ts";
import { freePort } from "../scripts/free-port.ts";
import { startScripted } from "./support/scripted-lmtp.ts";
import { jsonOf, stalledUpload, statusOf, type StalledUpload } from "./support/stalled-upload.ts";
import { streamOf } from "./support/streams.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";
import { until } from "./support/wait.ts";
import { fillDisk, mountTmpfs } from "./support/tmpfs.ts";

allowSlowTests();

const KEY = "delivery-test-key-0123456789abcdefghijklmnop";
const USER = "user@example.test";

let fake: FakeLmtpServer;
const servers: RunningServer[] = [];
const dirs: string[] = [];
let logs: LogLine[] = [];

beforeAll(async () => {
  fake = await startFakeLmtp();
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await fake.close();
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  fake.reset();
  logs = [];
});

afterEach(async () => {
  // Let the fake answer again so that nothing waits on a stalled transaction while stopping.
  fake.reset();
  await Promise.all(servers.splice(0).map((s) => s.stop()));
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
});

interface Host {
  server: RunningServer;
  dir: string | null;
  spool: Spool | null;
}

async function host(opts: { spool?: boolean; dir?: string; lmtpPort?: number; lmtp?: LmtpPoolOptions; queue?: QueueRunnerOptions; bodyIdleMs?: number; exactlyOnce?: boolean } = {}): Promise<Host> {
  let dir: string | null = null;
  if (opts.spool !== false) {
    dir = opts.dir ?? (await mkdtemp("/tmp/delivery-test-"));
    if (!opts.dir) dirs.push(dir);
  }
  const server = startServer(
    {
      apiKeys: [KEY],
      lmtpHost: "127.0.0.1",
      lmtpPort: opts.lmtpPort ?? fake.port,
      port: 0,
      host: "127.0.0.1",
      maxMessageBytes: 8 * 1024 * 1024,
      spoolDir: dir ?? undefined,
      bodyIdleMs: opts.bodyIdleMs,
      exactlyOnce: opts.exactlyOnce,
    },
    { log: (l) => logs.push(l), lmtp: opts.lmtp, queue: { baseBackoffMs: 100, maxBackoffMs: 200, ...opts.queue } },
  );
  servers.push(server);
  return { server, dir, spool: dir ? new Spool(dir) : null };
}

const enc = new TextEncoder();

function message(id: string, extra = ""): Uint8Array<ArrayBuffer> {
  return enc.encode(`From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: <${id}@example.org>\r\nSubject: ${id}\r\n\r\nHello ${id}.\r\n${extra}`);
}

/** Bytes with every value, line ends of all kinds and dot lines, in CRLF form as LMTP carries it. */
function bigMessage(id: string, size: number): Uint8Array<ArrayBuffer> {
  const head = message(id);
  const out = new Uint8Array(size);
  out.set(head);
  let x = 7;
  for (let i = head.length; i < size; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const b = x >>> 24;
    // Keep it CRLF-clean (a bare CR or LF would be changed on the LMTP wire): CR and LF only as a pair.
    out[i] = b === 0x0d || b === 0x0a ? 0x41 : b;
    if (i % 997 === 0 && i + 2 < size) {
      out[i] = 0x0d;
      out[++i] = 0x0a;
      out[++i] = 0x2e; // a dot at the start of a line
    }
  }
  // LMTP ends the message with a line end: the message must have one to arrive unchanged.
  out.set([0x0d, 0x0a], size - 2);
  return out;
}

interface Answer {
  status: number;
  headers: Headers;
  body: Record<string, unknown> & { status: string; recipients?: { address: string; code: number; reply: string; queued?: boolean; duplicate?: boolean }[] };
}

async function post(h: Host, body: BodyInit, to = USER, extra: Record<string, string> = {}): Promise<Answer> {
  const r = await fetch(h.server.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": to, ...extra },
    body,
  });
  return { status: r.status, headers: r.headers, body: await r.json() };
}

async function metrics(h: Host): Promise<Record<string, number>> {
  const r = await fetch(h.server.url + "/metrics", { headers: { "X-API-Key": KEY } });
  expect(r.status).toBe(200);
  const out: Record<string, number> = {};
  for (const line of (await r.text()).split("\n")) {
    const m = /^([a-z_]+(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

const files = (h: Host, sub: string) => readdirSync(join(h.dir!, sub)).filter((n) => !n.endsWith(".state"));

async function spooledBody(h: Host, id: string): Promise<Uint8Array> {
  return new Uint8Array(await new Response(await h.spool!.body(id)).arrayBuffer());
}

/** Chunk sizes that vary with the offset (`chunk` to `chunk` + 2000 bytes). */
const uneven = (chunk: number) => (at: number) => chunk + (at % 3) * 1000;

const same = (a: Uint8Array, b: Uint8Array) => a.length === b.length && Buffer.from(a).equals(Buffer.from(b));

describe("temporary failure with a spool: 202, then delivered by the background deliverer", () => {
  test("450 at RCPT: 202 queued, the message in queue/; LMTP answers 250 again: delivered byte-exact, spool empty", async () => {
    const h = await host();
    fake.behaviour.rcpt = () => 450;
    const sent = message("rcpt450");
    const a = await post(h, sent);
    expect(a.status).toBe(202);
    expect(a.body.status).toBe("queued");
    expect(a.body.recipients![0]).toMatchObject({ address: USER, code: 250, queued: true });
    expect(a.body.recipients![0]!.reply).toContain("450");
    expect(fake.received).toEqual([]);

    const [entry] = await h.spool!.list();
    expect(entry!.header).toMatchObject({ from: "sender@example.org", to: [USER], size: sent.length, message_id: "<rcpt450@example.org>" });
    expect(same(await spooledBody(h, entry!.header.id), sent)).toBe(true);
    expect(files(h, "tmp")).toEqual([]);
    expect((await metrics(h)).relay_spool_messages).toBe(1);

    fake.behaviour.rcpt = () => 250;
    await until("delivered from the spool", () => fake.received.length === 1 && h.server.runner!.size === 0);
    expect(same(fake.received[0]!.data, sent)).toBe(true);
    expect(fake.received[0]!.to).toEqual([USER]);
    expect(fake.received[0]!.from).toBe("sender@example.org");
    expect(readdirSync(join(h.dir!, "queue"))).toEqual([]);
    const m = await metrics(h);
    expect(m.relay_queued_total).toBe(1);
    expect(m.relay_spool_delivered_total).toBe(1);
    expect(m.relay_spool_messages).toBe(0);
    expect(m.relay_delivered_total).toBe(0);
  });

  test("put off by its own mailbox (452 4.2.2 full): hurried once by the next live delivery, then it waits its backoff; not sent again with every live delivery", async () => {
    const h = await host({ queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    const FULL = "full@example.test";
    fake.behaviour.afterData = (a) => (a === FULL ? 452 : 250);
    expect((await post(h, message("to-full"), FULL)).status).toBe(202);
    for (let i = 0; i < 20; i++) {
      expect((await post(h, message(`live-${i}`))).status).toBe(200);
      await Bun.sleep(20); // a steady trickle of mail, not a burst
    }
    await Bun.sleep(300); // room for attempts that should not happen
    // The first live success may hurry it once (LMTP works again); failing then too, it waits its
    // backoff. Before, each live success made it due at once: 20 more uploads in a second.
    expect(fake.commands.filter((c) => c.startsWith(`RCPT TO:<${FULL}>`)).length).toBeLessThanOrEqual(2);
    expect(fake.received.map((r) => r.to)).toEqual(Array.from({ length: 20 }, () => [USER]));
    expect(h.server.runner!.size).toBe(1);
  });

  test("a UTF-8 sender: spooled (202) and delivered with its envelope intact once the server has been seen to offer SMTPUTF8; never seen: 503, not spooled", async () => {
    const sender = "jürgen@exämple.org";
    const utf8 = (h: Host, sent: Uint8Array<ArrayBuffer>) => post(h, sent, USER, { "X-Envelope-From": Buffer.from(sender, "utf8").toString("latin1") });

    const unseen = await host({ lmtpPort: await freePort() });
    const refused = await utf8(unseen, message("utf8-unseen"));
    expect(refused.status).toBe(503);
    expect(refused.body.message).toContain("not spooled: the envelope has a non-ASCII address");
    expect(await unseen.spool!.list()).toEqual([]);

    const h = await host(); // the fake LMTP offers SMTPUTF8
    fake.behaviour.rcpt = () => 450;
    const sent = message("utf8-seen");
    const a = await utf8(h, sent);
    expect(a.status).toBe(202);
    const [entry] = await h.spool!.list();
    expect(entry!.header.from).toBe(sender);
    fake.behaviour.rcpt = () => 250;
    await until("delivered from the spool", () => fake.received.length === 1 && h.server.runner!.size === 0);
    expect(fake.received[0]!.from).toBe(sender);
    expect(fake.received[0]!.mailParams).toHaveProperty("SMTPUTF8");
    expect(same(fake.received[0]!.data, sent)).toBe(true);
  });

  test("several recipients, one deferred: 202, the delivered one is not spooled, only the deferred one is retried", async () => {
    const h = await host();
    fake.behaviour.rcpt = (a) => (a === "alice@example.test" ? 450 : 250);
    const sent = message("partial");
    const a = await post(h, sent, `${USER}, alice@example.test`);
    expect(a.status).toBe(202);
    expect(a.body.recipients!.map((r) => [r.address, r.code, !!r.queued])).toEqual([
      [USER, 250, false],
      ["alice@example.test", 250, true],
    ]);
    expect(fake.received.map((r) => r.to)).toEqual([[USER]]);
    const [entry] = await h.spool!.list();
    expect(entry!.header.to).toEqual(["alice@example.test"]);

    fake.behaviour.rcpt = () => 250;
    await until("delivered", () => fake.received.length === 2 && h.server.runner!.size === 0);
    expect(fake.received[1]!.to).toEqual(["alice@example.test"]);
    expect(same(fake.received[1]!.data, sent)).toBe(true);
  });

  test("a permanent refusal is not spooled: 422", async () => {
    const h = await host();
    fake.behaviour.rcpt = () => 550;
    const a = await post(h, message("refused"));
    expect(a.status).toBe(422);
    expect(files(h, "queue")).toEqual([]);
    expect(files(h, "tmp")).toEqual([]);
  });

  test("LMTP down: 202 and spooled; LMTP back: delivered", async () => {
    const port = await freePort();
    const h = await host({ lmtpPort: port });
    const sent = bigMessage("down", 300_000);
    const a = await post(h, streamOf(sent, uneven(16_384)));
    expect(a.status).toBe(202);
    const [entry] = await h.spool!.list();
    expect(same(await spooledBody(h, entry!.header.id), sent)).toBe(true);
    expect(entry!.header.size).toBe(sent.length);
  });

  test("Dovecot stalls after the final dot: 202 well before 10 s, unknown_outcome counted once, delivered once afterwards", async () => {
    const h = await host({ lmtp: { timeouts: { dataEnd: 1000 } }, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    fake.behaviour.stall = "afterData";
    const sent = message("stall");
    const started = Date.now();
    const a = await post(h, sent);
    const took = Date.now() - started;
    expect(a.status).toBe(202);
    expect(took).toBeLessThan(10_000);
    expect(a.body.recipients![0]!.reply).toContain("after the final dot; outcome unknown");
    const m = await metrics(h);
    expect(m.relay_unknown_outcome_total).toBe(1);
    expect(m.relay_queued_total).toBe(1);
    const [entry] = await h.spool!.list();
    expect(same(await spooledBody(h, entry!.header.id), sent)).toBe(true);
    expect(entry!.state.last_reply).toContain("outcome unknown");

    fake.behaviour.stall = null;
    h.server.runner!.kick();
    await until("delivered", () => fake.received.length === 1 && h.server.runner!.size === 0);
    expect(same(fake.received[0]!.data, sent)).toBe(true);
  });

  for (const [label, mkBody] of [
    ["streamed, no Content-Length", (b: Uint8Array<ArrayBuffer>) => streamOf(b, uneven(20_000))],
    ["in one piece, with Content-Length", (b: Uint8Array<ArrayBuffer>) => b],
  ] as const) {
    test(`connection dropped mid-DATA (${label}): 202, and the spooled body is complete and byte-exact`, async () => {
      const h = await host({ queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      fake.behaviour.dropMidData = true;
      const sent = bigMessage(`drop-${label.length}`, 3 * 1024 * 1024 + 17);
      const a = await post(h, mkBody(sent));
      expect(a.status).toBe(202);
      expect(fake.received).toEqual([]);
      const [entry] = await h.spool!.list();
      expect(entry!.header.size).toBe(sent.length);
      expect(same(await spooledBody(h, entry!.header.id), sent)).toBe(true);
      expect(files(h, "tmp")).toEqual([]);

      fake.behaviour.dropMidData = false;
      h.server.runner!.kick();
      await until("delivered", () => fake.received.length === 1 && h.server.runner!.size === 0);
      expect(same(fake.received[0]!.data, sent)).toBe(true);
    });
  }
});

/**
 * A minimal LMTP server with fixed answers, for replies the fake cannot give: Dovecot's
 * "421 4.3.2 Shutting down" in place of the replies after the final dot (seen when Dovecot is
 * stopped while it saves; it had saved the message), or at RCPT.
 */
function scriptedLmtp(script: { mail?: string; rcpt: string; afterDot: string }) {
  const ends = (reply: string) => (reply.startsWith("421") ? "end" : undefined);
  return startScripted("220 scripted LMTP ready\r\n", (line) => {
    if (line === ".") return { text: script.afterDot + "\r\n", then: ends(script.afterDot) }; // "saved"
    const verb = line.split(" ")[0]!.toUpperCase();
    if (verb === "LHLO") return "250-scripted\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
    if (verb === "MAIL") return (script.mail ?? "250 2.1.0 OK") + "\r\n";
    if (verb === "RSET" || verb === "NOOP") return "250 2.0.0 OK\r\n";
    if (verb === "RCPT") return { text: script.rcpt + "\r\n", then: ends(script.rcpt) };
    // Every recipient gets the same reply: DATA goes on only if it accepted them.
    if (verb === "DATA") return script.rcpt.startsWith("2") ? "354 go ahead\r\n" : "503 5.5.1 No valid recipients\r\n";
    if (verb === "QUIT") return { text: "221 2.0.0 bye\r\n", then: "end" };
    return "500 5.5.2 what\r\n";
  });
}

describe("outcomes that are not known", () => {
  test("421 after the final dot (Dovecot stopping while it saves): 202, and counted as an unknown outcome", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "250 2.1.5 OK", afterDot: "421 4.3.2 vm Shutting down" });
    try {
      const h = await host({ lmtpPort: lmtp.port, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      const sent = message("421-after-dot");
      const a = await post(h, sent);
      expect(a.status).toBe(202);
      expect(a.body.recipients![0]!.reply).toContain("421 4.3.2");
      expect(a.body.recipients![0]!.reply).toContain("outcome unknown");
      expect(lmtp.messages.length).toBe(1); // the server had it
      const m = await metrics(h);
      expect(m.relay_unknown_outcome_total).toBe(1);
      expect(m.relay_queued_total).toBe(1);
    } finally {
      await lmtp.close();
    }
  });

  test("421 at RCPT (nothing sent yet): 202, and not an unknown outcome", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "421 4.3.2 vm Shutting down", afterDot: "250 2.0.0 Saved" });
    try {
      const h = await host({ lmtpPort: lmtp.port, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      const a = await post(h, message("421-at-rcpt"));
      expect(a.status).toBe(202);
      expect(lmtp.messages.length).toBe(0);
      expect((await metrics(h)).relay_unknown_outcome_total).toBe(0);
    } finally {
      await lmtp.close();
    }
  });

  test("421 after the final dot to a message sent as JSON (in memory, not streamed): counted too", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "250 2.1.5 OK", afterDot: "421 4.3.2 vm Shutting down" });
    try {
      const h = await host({ lmtpPort: lmtp.port, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      const r = await fetch(h.server.url + INBOUND_PATH, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-API-Key": KEY },
        body: JSON.stringify({ from: "sender@example.org", to: USER, raw: "Subject: json\r\n\r\nbody\r\n" }),
      });
      expect(r.status).toBe(202);
      expect((await metrics(h)).relay_unknown_outcome_total).toBe(1);
      const [entry] = await h.spool!.list();
      expect(new TextDecoder().decode(await spooledBody(h, entry!.header.id))).toBe("Subject: json\r\n\r\nbody\r\n");
    } finally {
      await lmtp.close();
    }
  });

  test("421 after the final dot on a retry from the spool is counted as well", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "250 2.1.5 OK", afterDot: "421 4.3.2 vm Shutting down" });
    try {
      const h = await host({ lmtpPort: await freePort(), queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      expect((await post(h, message("421-retry"))).status).toBe(202);
      expect((await metrics(h)).relay_unknown_outcome_total).toBe(0);
      // Point the deliverer at the scripted server by restarting on the same spool.
      await h.server.stop();
      const again = await host({ dir: h.dir!, lmtpPort: lmtp.port, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      await until("the retry reached the server", () => lmtp.messages.length === 1);
      await until("counted", async () => (await metrics(again)).relay_unknown_outcome_total === 1);
      expect(again.server.runner!.size).toBe(1); // still queued: retried later, a duplicate rather than a loss
    } finally {
      await lmtp.close();
    }
  });
});

describe("time limits: the final dot never goes out late, and after it the outcome is never said to be known when it is not", () => {
  /** A message/rfc822 body that trickles in: `pieces` lines, one every `everyMs`. */
  function trickle(id: string, pieces: number, everyMs: number, first = message(id)): { body: ReadableStream<Uint8Array>; sent: Uint8Array } {
    const lines = [first, ...Array.from({ length: pieces }, (_, i) => enc.encode(`slow line ${i}\r\n`))];
    let i = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(c) {
        if (i === lines.length) return c.close();
        if (i > 0) await Bun.sleep(everyMs);
        c.enqueue(lines[i++]!);
      },
    });
    return { body, sent: new Uint8Array(Buffer.concat(lines)) };
  }

  // Without a spool, a message past the first MiB streams on to LMTP as it arrives: there the
  // delivery's limit applies to the body, and the final dot must never go out late.
  test("a body past the first MiB slower than the delivery's limit, no spool: 503 'not delivered', and the server never got the final dot", async () => {
    const h = await host({ spool: false, lmtp: { timeouts: { transaction: 400 } } });
    const big = new Uint8Array(Buffer.concat([message("slow-nospool"), Buffer.from(`${"x".repeat(76)}\r\n`.repeat(15_000))])); // 1.2 MB
    const { body } = trickle("slow-nospool", 15, 60, big);
    const a = await post(h, body);
    expect(a.status).toBe(503);
    expect(a.body.message).toStartWith("temporary failure, not delivered: ");
    expect(a.body.message).toContain("before the final dot");
    await Bun.sleep(200);
    expect(fake.received).toEqual([]); // true to its word: nothing stored
    expect((await metrics(h)).relay_unknown_outcome_total).toBe(0);
  });

  // With a spool the whole body is received before LMTP is tried, so a slow sender costs the
  // delivery nothing: the transaction starts once the last byte is in, and takes its usual time.
  test("a body slower than the delivery's limit, with a spool: received whole first, then delivered at once: 200, one copy", async () => {
    const h = await host({ lmtp: { timeouts: { transaction: 400 } } });
    const { body, sent } = trickle("slow-spool", 15, 60);
    const a = await post(h, body);
    expect(a.status).toBe(200);
    expect(a.body.status).toBe("success");
    expect(fake.received.length).toBe(1);
    expect(same(fake.received[0]!.data, sent)).toBe(true);
    expect(await h.spool!.list()).toEqual([]);
  });

  test("no reply after the final dot, no spool: 503 that says the outcome is unknown, never 'not delivered'", async () => {
    const h = await host({ spool: false, lmtp: { timeouts: { dataEnd: 300 } } });
    fake.behaviour.stall = "afterData";
    const a = await post(h, message("after-dot-nospool"));
    expect(a.status).toBe(503);
    expect(a.headers.get("retry-after")).toBeTruthy();
    expect(a.body.message).not.toContain("not delivered");
    expect(a.body.message).toContain("after the final dot; outcome unknown");
    expect(a.body.recipients!.map((r) => [r.code, r.reply])).toEqual([
      [451, "451 4.4.1 no LMTP reply to DATA-END within 300 ms after the final dot; outcome unknown: the LMTP server may have stored the message"],
    ]);
    expect((await metrics(h)).relay_unknown_outcome_total).toBe(1);
  });
});

describe("2xx replies other than 250", () => {
  test("251 to MAIL and to RCPT: the message is sent, and the answer is 200 success", async () => {
    const lmtp = await scriptedLmtp({ mail: "251 2.1.0 OK", rcpt: "251 2.1.5 User not local; will forward", afterDot: "250 2.0.0 Saved" });
    try {
      const h = await host({ spool: false, lmtpPort: lmtp.port });
      const sent = message("two-fifty-one");
      const a = await post(h, sent);
      expect(a.status).toBe(200);
      expect(a.body.status).toBe("success");
      expect(a.body.recipients!.map((r) => r.reply)).toEqual(["250 2.0.0 Saved"]);
      expect(lmtp.messages).toEqual([new TextDecoder().decode(sent)]);
    } finally {
      await lmtp.close();
    }
  });

  test("252 to RCPT and 252 after the dot: delivered, 200", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "252 2.1.5 Cannot VRFY user, but will attempt", afterDot: "252 2.0.0 will attempt" });
    try {
      const h = await host({ spool: false, lmtpPort: lmtp.port });
      const a = await post(h, message("two-fifty-two"));
      expect(a.status).toBe(200);
      expect(lmtp.messages.length).toBe(1);
    } finally {
      await lmtp.close();
    }
  });

  test("a 3xx to RCPT is never a success: 503 without a spool, queued with one, and nothing sent", async () => {
    const lmtp = await scriptedLmtp({ rcpt: "334 what?", afterDot: "250 2.0.0 Saved" });
    try {
      const bare = await host({ spool: false, lmtpPort: lmtp.port });
      const a = await post(bare, message("three-xx"));
      expect(a.status).toBe(503);
      expect(a.body.message).toContain("334 what?");
      const spooled = await host({ lmtpPort: lmtp.port, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      expect((await post(spooled, message("three-xx-spool"))).status).toBe(202);
      expect(lmtp.messages).toEqual([]);
    } finally {
      await lmtp.close();
    }
  });
});

describe("nothing acknowledged that is not safe", () => {
  test("spool unwritable and LMTP down: 503 with Retry-After, nothing in the spool, the write error counted", async () => {
    const h = await host({ lmtpPort: await freePort() });
    rmSync(join(h.dir!, "tmp"), { recursive: true });
    writeFileSync(join(h.dir!, "tmp"), "a file where the directory should be");
    const a = await post(h, message("unwritable"));
    expect(a.status).toBe(503);
    expect(a.headers.get("retry-after")).toBeTruthy();
    expect(a.body.status).toBe("deferred");
    expect(readdirSync(join(h.dir!, "queue"))).toEqual([]);
    const m = await metrics(h);
    expect(m.relay_spool_write_errors_total).toBe(1);
    expect(m.relay_deferred_total).toBe(1);
    expect(m.relay_queued_total).toBe(0);
  });

  test("spool unwritable but LMTP fine: delivered at once (200); the spool is only needed on failure", async () => {
    const h = await host();
    rmSync(join(h.dir!, "tmp"), { recursive: true });
    writeFileSync(join(h.dir!, "tmp"), "x");
    const a = await post(h, message("unwritable-ok"));
    expect(a.status).toBe(200);
    expect(fake.received.length).toBe(1);
  });

  test("queue/ unwritable at commit and LMTP refusing for now: 503, nothing acknowledged", async () => {
    const h = await host();
    fake.behaviour.rcpt = () => 450;
    rmSync(join(h.dir!, "queue"), { recursive: true });
    writeFileSync(join(h.dir!, "queue"), "x");
    const a = await post(h, message("no-queue"));
    expect(a.status).toBe(503);
    expect(readdirSync(join(h.dir!, "tmp"))).toEqual([]);
    expect((await metrics(h)).relay_spool_write_errors_total).toBe(1);
  });

  test("without a spool, LMTP down: 503 with Retry-After", async () => {
    const h = await host({ spool: false, lmtpPort: await freePort() });
    const a = await post(h, message("nospool"));
    expect(a.status).toBe(503);
    expect(a.headers.get("retry-after")).toBeTruthy();
    expect(h.server.runner).toBeNull();
    const m = await metrics(h);
    expect(m.relay_deferred_total).toBe(1);
    expect(m.relay_spool_messages).toBe(0);
  });

  test("without a spool, 450 at RCPT: 503", async () => {
    const h = await host({ spool: false });
    fake.behaviour.rcpt = () => 450;
    expect((await post(h, message("nospool450"))).status).toBe(503);
  });

  test("too large, streamed without Content-Length, while LMTP is down: 413 and nothing spooled", async () => {
    const h = await host({ lmtpPort: await freePort() });
    const a = await post(h, streamOf(bigMessage("huge", 9 * 1024 * 1024), uneven(65_536)));
    expect(a.status).toBe(413);
    expect(readdirSync(join(h.dir!, "queue"))).toEqual([]);
    expect(readdirSync(join(h.dir!, "tmp"))).toEqual([]);
  });

  test("the client goes away mid-body while LMTP is down: nothing spooled, nothing left in tmp/", async () => {
    const h = await host({ lmtpPort: await freePort() });
    const ac = new AbortController();
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        if (sent >= 200_000) {
          await Bun.sleep(100);
          ac.abort();
          return controller.error(new Error("client gone"));
        }
        controller.enqueue(new Uint8Array(50_000).fill(0x41));
        sent += 50_000;
      },
    });
    await fetch(h.server.url + INBOUND_PATH, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "", "X-Envelope-To": USER },
      body,
      signal: ac.signal,
    }).catch(() => null);
    await until("request settled", () => logs.some((l) => l.path === INBOUND_PATH));
    await Bun.sleep(100);
    expect(readdirSync(join(h.dir!, "queue"))).toEqual([]);
    expect(readdirSync(join(h.dir!, "tmp"))).toEqual([]);
    expect((await metrics(h)).relay_queued_total).toBe(0);
  });
});

describe("duplicates", () => {
  test("the same bytes, Message-ID and recipient twice: the second is a duplicate, delivered once", async () => {
    const h = await host();
    const sent = message("dup");
    const first = await post(h, sent);
    expect(first.status).toBe(200);
    expect(first.body.status).toBe("success");
    const second = await post(h, sent);
    expect(second.status).toBe(200);
    expect(second.body.status).toBe("duplicate");
    expect(second.body.recipients![0]!.duplicate).toBe(true);
    expect(fake.received.length).toBe(1);
    const m = await metrics(h);
    expect(m.relay_duplicates_total).toBe(1);
    expect(m.relay_delivered_total).toBe(1);
  });

  test("same Message-ID with a different size is delivered again; so is another recipient", async () => {
    const h = await host();
    expect((await post(h, message("resent"))).status).toBe(200);
    const changed = await post(h, message("resent", "P.S. one more line\r\n"));
    expect(changed.status).toBe(200);
    expect(changed.body.status).toBe("success");
    const other = await post(h, message("resent"), "alice@example.test");
    expect(other.body.status).toBe("success");
    expect(fake.received.length).toBe(3);
  });

  for (const [label, mkBody] of [
    ["streamed, no Content-Length", (b: Uint8Array<ArrayBuffer>) => streamOf(b, uneven(7))],
    ["with Content-Length", (b: Uint8Array<ArrayBuffer>) => b],
  ] as const) {
    test(`two different messages with the same Message-ID and the same size (${label}): both delivered, neither is a duplicate`, async () => {
      const h = await host();
      const first = message("reused-id", "first text\r\n");
      const second = message("reused-id", "other text\r\n");
      expect(second.length).toBe(first.length);
      expect((await post(h, mkBody(first))).body.status).toBe("success");
      const again = await post(h, mkBody(second));
      expect(again.status).toBe(200);
      expect(again.body.status).toBe("success");
      expect(fake.received.map((r) => Buffer.from(r.data).toString("latin1"))).toEqual([first, second].map((m) => Buffer.from(m).toString("latin1")));
      // The same bytes again, either way they are sent: a duplicate.
      expect((await post(h, mkBody(second))).body.status).toBe("duplicate");
      expect((await post(h, streamOf(first, uneven(100)))).body.status).toBe("duplicate");
      expect(fake.received.length).toBe(2);
    });
  }

  test("a spooled message carries the SHA-256 of its bytes; once delivered from the spool, another message with its Message-ID is still delivered", async () => {
    const h = await host();
    fake.behaviour.rcpt = () => 450;
    const sent = message("spooled-digest");
    expect((await post(h, streamOf(sent, uneven(10)))).status).toBe(202);
    const [entry] = await h.spool!.list();
    expect(entry!.header.sha256).toBe(new Bun.CryptoHasher("sha256").update(sent).digest("hex"));
    fake.behaviour.rcpt = () => 250;
    await until("delivered from the spool", () => fake.received.length === 1 && h.server.runner!.size === 0);
    expect((await post(h, sent)).body.status).toBe("duplicate");
    expect((await post(h, message("spooled-digest", "changed\r\n"))).body.status).toBe("success");
    expect(fake.received.length).toBe(2);
  });

  test("a message without Message-ID delivered before is delivered again (the runbook's test posted twice); no digest of it is taken for one with a Message-ID", async () => {
    const h = await host();
    const sent = enc.encode("Subject: no id\r\n\r\nbody\r\n");
    expect((await post(h, sent)).body.status).toBe("success");
    expect((await post(h, sent)).body.status).toBe("success");
    expect(fake.received.length).toBe(2);
  });

  test("the runbook's test posted twice, the second while Dovecot is down: that one is queued (202) and delivered from the spool, not taken for the first", async () => {
    const h = await host();
    const sent = enc.encode("Subject: no id, twice\r\n\r\nbody\r\n");
    expect((await post(h, sent)).body.status).toBe("success");
    fake.behaviour.rcpt = () => 450;
    expect((await post(h, sent)).status).toBe(202);
    fake.behaviour.rcpt = () => 250;
    await until("the spool is empty", () => h.server.runner!.size === 0);
    // Acknowledged 202, so delivered: the spool must not answer it from the first one's record.
    expect(fake.received.map((r) => Buffer.from(r.data).toString("latin1"))).toEqual([sent, sent].map((m) => Buffer.from(m).toString("latin1")));
  });

  test("some recipients had it: only the others are sent it; the answer says which was which", async () => {
    const h = await host();
    const sent = message("half-known");
    expect((await post(h, sent, USER)).status).toBe(200);
    const both = await post(h, sent, `alice@example.test, ${USER}`);
    expect(both.status).toBe(200);
    expect(both.body.status).toBe("success");
    expect(both.body.recipients!.map((r) => [r.address, !!r.duplicate])).toEqual([
      ["alice@example.test", false],
      [USER, true],
    ]);
    expect(fake.received.map((r) => r.to)).toEqual([[USER], ["alice@example.test"]]);
  });

  test("a spooled message delivered later is remembered too, and across a restart", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const h = await host({ dir });
    fake.behaviour.rcpt = () => 450;
    const sent = message("later-dup");
    expect((await post(h, sent)).status).toBe(202);
    fake.behaviour.rcpt = () => 250;
    await until("delivered", () => fake.received.length === 1 && h.server.runner!.size === 0);
    expect((await post(h, sent)).body.status).toBe("duplicate");

    await h.server.stop();
    const again = await host({ dir });
    expect((await post(again, sent)).body.status).toBe("duplicate");
    expect(fake.received.length).toBe(1);
  });

  test("a duplicate is not suppressed when only some recipients had it", async () => {
    const h = await host();
    const sent = message("some");
    await post(h, sent, USER);
    const both = await post(h, sent, `${USER}, alice@example.test`);
    expect(both.status).toBe(200);
    expect(both.body.status).toBe("success");
  });
});

describe("a repeat of a message the host already queued", () => {
  for (const [label, sent] of [
    ["with a Message-ID", message("queued-twice")],
    ["without a Message-ID", enc.encode("Subject: queued twice, no id\r\n\r\nbody\r\n")],
  ] as const) {
    for (const exactlyOnce of [false, true]) {
      test(`${label}${exactlyOnce ? ", EXACTLY_ONCE" : ""}: answered 202 with the spool id it has, not queued again; delivered once`, async () => {
        const h = await host({ exactlyOnce, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
        fake.behaviour.rcpt = () => 450;
        const first = await post(h, sent);
        expect(first.status).toBe(202);
        const [entry] = await h.spool!.list();
        const again = await post(h, streamOf(sent, uneven(7)));
        expect(again.status).toBe(202);
        expect(again.body.status).toBe("queued");
        expect(again.body.recipients![0]).toMatchObject({ address: USER, code: 250, queued: true, reply: `250 2.0.0 already queued as ${entry!.header.id}; not taken again` });
        expect((await h.spool!.list()).map((e) => e.header.id)).toEqual([entry!.header.id]);
        expect(files(h, "tmp")).toEqual([]);
        const m = await metrics(h);
        expect(m.relay_queued_total).toBe(1);
        expect(m.relay_queued_repeats_total).toBe(1);

        fake.behaviour.rcpt = () => 250;
        h.server.runner!.kick();
        await until("delivered from the spool", () => h.server.runner!.size === 0);
        expect(fake.received.length).toBe(1);
        // Once delivered, a repeat is a duplicate; without a Message-ID it is delivered again.
        const named = label === "with a Message-ID";
        expect((await post(h, sent)).body.status).toBe(named ? "duplicate" : "success");
        expect(fake.received.length).toBe(named ? 1 : 2);
      });
    }
  }

  test("left in queue/ by a host that was killed before its 202: a restarted host answers the sender's retry with that spool id", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const h = await host({ dir, lmtpPort: await freePort() });
    const sent = message("killed-before-202");
    expect((await post(h, sent)).status).toBe(202);
    const [entry] = await h.spool!.list();
    await h.server.stop();
    const again = await host({ dir, lmtpPort: await freePort() });
    const retry = await post(again, sent);
    expect(retry.status).toBe(202);
    expect(retry.body.recipients![0]!.reply).toContain(`already queued as ${entry!.header.id}`);
    expect((await again.spool!.list()).length).toBe(1);
  });

  test("only the recipients it is queued for are answered from the spool; another recipient of the same bytes is delivered", async () => {
    const h = await host({ queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    fake.behaviour.rcpt = (a) => (a === USER ? 450 : 250);
    const sent = message("queued-for-one");
    expect((await post(h, sent, USER)).status).toBe(202);
    const both = await post(h, sent, `${USER}, alice@example.test`);
    expect(both.status).toBe(202);
    expect(both.body.recipients!.map((r) => [r.address, !!r.queued])).toEqual([
      [USER, true],
      ["alice@example.test", false],
    ]);
    expect(fake.received.map((r) => r.to)).toEqual([["alice@example.test"]]);
    expect((await h.spool!.list()).length).toBe(1);
  });
});

describe("recipients on record are not sent a spooled message again", () => {
  for (const [label, sent] of [
    ["", message("state-lost")],
    [" (no Message-ID: the spool's own record)", enc.encode("Subject: state lost, no id\r\n\r\nbody\r\n")],
  ] as const) {
    test(`a partial delivery from the spool whose state file was then lost: after a restart only the recipient still to do is sent it${label}`, async () => {
      const dir = await mkdtemp("/tmp/delivery-test-");
      dirs.push(dir);
      const h = await host({ dir, lmtpPort: await freePort() });
      expect((await post(h, sent, `${USER}, alice@example.test`)).status).toBe(202);
      await h.server.stop();
      // Spooled for both; then one attempt delivers to USER and not to alice.
      fake.behaviour.rcpt = (a) => (a === "alice@example.test" ? 450 : 250);
      const partial = await host({ dir, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      await until("USER delivered", () => fake.received.length === 1);
      const [entry] = await partial.spool!.list();
      await until("the state says so", async () => (await partial.spool!.read(entry!.header.id)).state.remaining.length === 1);
      await partial.server.stop();
      expect(entry!.header.to).toEqual([USER, "alice@example.test"]);
      rmSync(join(dir, "queue", `${entry!.header.id}.state`));

      fake.behaviour.rcpt = () => 250;
      const again = await host({ dir });
      await again.server.runner!.scanned();
      await until("delivered", () => again.server.runner!.size === 0);
      expect(fake.received.map((r) => r.to)).toEqual([[USER], ["alice@example.test"]]);
    });
  }

  test("a spooled message whose every recipient is on record (delivered, the file not removed before a restart) is removed without LMTP", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const h = await host({ dir, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    fake.behaviour.rcpt = () => 450;
    const sent = message("on-record");
    expect((await post(h, sent)).status).toBe(202);
    const [entry] = await h.spool!.list();
    // The file is copied aside while queued, and put back after the delivery removed it: as if
    // its removal had not reached the disk before a crash.
    const copy = await Bun.file(join(dir, "queue", entry!.header.id)).arrayBuffer();
    fake.behaviour.rcpt = () => 250;
    h.server.runner!.kick();
    await until("delivered", () => h.server.runner!.size === 0);
    await h.server.stop();
    writeFileSync(join(dir, "queue", entry!.header.id), new Uint8Array(copy));

    const commands = fake.commands.length;
    const again = await host({ dir });
    await again.server.runner!.scanned();
    await until("removed again", () => again.server.runner!.size === 0 && files({ dir } as Host, "queue").length === 0);
    expect(fake.received.length).toBe(1);
    expect(fake.commands.slice(commands).filter((c) => c.startsWith("MAIL"))).toEqual([]);
  });
});

describe("a client that leaves gets nothing delivered after it left", () => {
  /** An LMTP server that answers DATA after `dataMs` (Dovecot slow), and records every message that reached its final dot. */
  function slowData(dataMs: number) {
    return startScripted("220 slow LMTP\r\n", (line) => {
      if (line === ".") return "250 2.0.0 Saved\r\n";
      const verb = line.split(" ")[0]!.toUpperCase();
      if (verb === "LHLO") return "250-slow\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n";
      if (verb === "DATA") return { text: "354 go ahead\r\n", afterMs: dataMs };
      if (verb === "QUIT") return { text: "221 2.0.0 bye\r\n", then: "end" };
      return "250 2.0.0 OK\r\n";
    });
  }

  /** Posts and gives up after `ms` (the client's connection closed); resolves once the host has logged its answer. */
  async function postAndLeave(h: Host, body: Uint8Array<ArrayBuffer>, ms: number): Promise<void> {
    const before = logs.filter((l) => l.path === INBOUND_PATH).length;
    await fetch(h.server.url + INBOUND_PATH, { method: "POST", headers: sendHeaders, body, signal: AbortSignal.timeout(ms) }).catch(() => null);
    await until("the host answered nobody", () => logs.filter((l) => l.path === INBOUND_PATH).length > before, 10_000);
  }

  for (const spool of [true, false]) {
    test(`gone while Dovecot is slow, before the final dot (${spool ? "with" : "without"} a spool): no dot, not spooled; the retry is delivered once`, async () => {
      const lmtp = await slowData(800);
      try {
        const h = await host({ spool, lmtpPort: lmtp.port });
        const sent = enc.encode("Subject: left early, no id\r\n\r\nbody\r\n");
        await postAndLeave(h, sent, 200);
        await Bun.sleep(900);
        expect(lmtp.messages).toEqual([]);
        expect(lmtp.lines).toContain("DATA");
        if (h.dir) expect(files(h, "queue")).toEqual([]);
        expect(logs.find((l) => l.path === INBOUND_PATH)).toMatchObject({ status: 503, error: "client_gone" });

        const retry = await post(h, sent);
        expect(retry.status).toBe(200);
        expect(retry.body.status).toBe("success");
        expect(lmtp.messages).toEqual(["Subject: left early, no id\r\n\r\nbody\r\n"]);
      } finally {
        await lmtp.close();
      }
    });
  }

  test("gone while LMTP fails, before the spool commit: not spooled (no 202 to nobody); the retry is delivered once", async () => {
    const h = await host({ lmtp: { timeouts: { command: 600 } }, queue: { baseBackoffMs: 100, maxBackoffMs: 100 } });
    fake.behaviour.stall = "rcpt";
    const sent = message("left-before-spooling");
    await postAndLeave(h, sent, 200);
    expect(files(h, "queue")).toEqual([]);
    expect(files(h, "tmp")).toEqual([]);
    expect((await metrics(h)).relay_queued_total).toBe(0);
    fake.behaviour.stall = null;
    expect((await post(h, sent)).status).toBe(200);
    await Bun.sleep(300);
    expect(fake.received.length).toBe(1);
  });

  test("a repeat that arrives while the first is still being delivered waits for it, and is answered duplicate: one copy", async () => {
    const lmtp = await slowData(400);
    try {
      const h = await host({ lmtpPort: lmtp.port });
      const sent = enc.encode("Subject: twice at once, no id\r\n\r\nbody\r\n");
      const [a, b] = await Promise.all([post(h, sent), Bun.sleep(100).then(() => post(h, sent))]);
      expect([a.status, b.status]).toEqual([200, 200]);
      expect([a.body.status, b.body.status]).toEqual(["success", "duplicate"]);
      expect(lmtp.messages.length).toBe(1);
    } finally {
      await lmtp.close();
    }
  });
});

describe("the runbook's JSON body streams into delivery", () => {
  /** json.dumps's default: every character outside ASCII as \uXXXX (3 times the UTF-8 of Cyrillic). */
  const asciiOnly = (json: string) => json.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
  const postJson = (h: Host, body: BodyInit) => fetch(h.server.url + INBOUND_PATH, { method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": KEY }, body });

  for (const spool of [true, false]) {
    test(`7.5 MiB of Cyrillic as json.dumps writes it (22.5 MiB of JSON, under the 8 MiB message limit) ${spool ? "with" : "without"} a spool: delivered byte-exact`, async () => {
      const h = await host({ spool });
      const head = `Message-ID: <cyrillic-${spool}@example.org>\r\nSubject: big\r\n\r\n`;
      const line = "\u0416\u0438\u0432\u0451\u0442 \u0441\u043b\u043e\u043d.\r\n";
      const raw = enc.encode(head + line.repeat(350_000));
      expect(raw.length).toBeLessThan(8 * 1024 * 1024);
      // Escaped line by line (one regular expression over 7.5 MiB takes JavaScriptCore seconds).
      const escaped = (t: string) => asciiOnly(JSON.stringify(t)).slice(1, -1);
      const json = `{"from": "sender@example.org", "to": "${USER}", "subject": "big", "raw": "${escaped(head)}${escaped(line).repeat(350_000)}", "timestamp": "2025-11-12T10:00:00Z"}`;
      expect(json.length).toBeGreaterThan(2 * 8 * 1024 * 1024 + 1024 * 1024); // past the old JSON limit (Bun's bare 413)
      const r = await postJson(h, json);
      expect(r.status).toBe(200);
      expect(((await r.json()) as { status: string }).status).toBe("success");
      expect(fake.received.length).toBe(1);
      expect(same(fake.received[0]!.data, raw)).toBe(true);
      if (h.dir) expect(readdirSync(join(h.dir, "tmp"))).toEqual([]);
    });
  }

  test("a field after a 2 MiB message that the schema refuses, without a spool (the message already streaming into LMTP): 400 naming it, nothing delivered", async () => {
    const h = await host({ spool: false });
    const json = `{"from":"sender@example.org","to":"${USER}","raw":"Subject: x\\r\\n\\r\\n${"y".repeat(2 * 1024 * 1024)}\\r\\n","timestamp":5}`;
    const r = await postJson(h, json);
    expect(r.status).toBe(400);
    expect(await r.json()).toMatchObject({ error: "invalid_request", message: "timestamp: must be a string" });
    await Bun.sleep(100);
    expect(fake.received).toEqual([]);
  });

  test("such a refusal is the sender's fault, not the target's: /status does not show it as the delivery target's last answer", async () => {
    const h = await host({ spool: false });
    const json = `{"from":"sender@example.org","to":"${USER}","raw":"Subject: x\\r\\n\\r\\n${"y".repeat(2 * 1024 * 1024)}\\r\\n","timestamp":5}`;
    expect((await postJson(h, json)).status).toBe(400);
    const page = await (await fetch(`${h.server.url}/status`, { headers: { authorization: `Basic ${btoa(`ops:${KEY}`)}` } })).text();
    expect(page).not.toContain("message stream failed");
    expect(page).not.toContain("the delivery target's last answer was not a delivery");
    // A delivery afterwards is the last answer, as ever.
    expect((await post(h, message("after-refusal"))).status).toBe(200);
    const after = await (await fetch(`${h.server.url}/status`, { headers: { authorization: `Basic ${btoa(`ops:${KEY}`)}` } })).text();
    expect(after).toMatch(/id="last-answer">last answer, [^<]*<span class="ok reply">250 /);
  });

  test("a message over the limit, escaped to 3 times its size in JSON: the host's own 413 naming the limit, with a body (never Bun's bare 413 and a cut connection)", async () => {
    const h = await host();
    const r = await postJson(h, `{"from": "sender@example.org", "to": "${USER}", "raw": "${"\\u0416".repeat(4 * 1024 * 1024 + 1)}"}`);
    expect(r.status).toBe(413);
    expect(await r.json()).toMatchObject({ error: "payload_too_large", message: `the message is larger than ${8 * 1024 * 1024} bytes` });
    expect(files(h, "queue")).toEqual([]);
    expect(files(h, "tmp")).toEqual([]);
  });
});

describe("restart", () => {
  test("what a stopped host left in queue/ is delivered by the next one at start-up; leftovers in tmp/ are discarded and counted", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const h = await host({ dir, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    fake.behaviour.rcpt = () => 450;
    const sent = [message("r1"), message("r2"), message("r3")];
    for (const m of sent) expect((await post(h, m)).status).toBe(202);
    await h.server.stop();
    writeFileSync(join(dir, "tmp", "0000000000halfwritten"), "partial");

    fake.behaviour.rcpt = () => 250;
    const again = await host({ dir });
    await until("all delivered", () => fake.received.length === 3 && again.server.runner!.size === 0);
    const got = fake.received.map((r) => Buffer.from(r.data).toString("latin1")).sort();
    expect(got).toEqual(sent.map((m) => Buffer.from(m).toString("latin1")).sort());
    const m = await metrics(again);
    expect(m.relay_spool_incomplete_discarded_total).toBe(1);
    expect(m.relay_spool_delivered_total).toBe(3);
    expect(logs.some((l) => l.event === "spool_incomplete_discarded" && l.file === "0000000000halfwritten")).toBe(true);
    expect(readdirSync(join(dir, "tmp"))).toEqual([]);
  });
});

describe("/metrics", () => {
  test("right after start-up, the spool gauges already count what was left on disk (never a false 0)", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const h = await host({ dir, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    fake.behaviour.rcpt = () => 450;
    for (const id of ["g1", "g2"]) expect((await post(h, message(id))).status).toBe(202);
    await h.server.stop();
    // Still refused: the messages stay queued, so the gauge must say 2 from the first scrape on.
    const again = await host({ dir, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
    const m = await metrics(again);
    expect(m.relay_spool_messages).toBe(2);
    expect(m.relay_spool_oldest_age_seconds).toBeGreaterThan(0);
  });

  test("counters match what happened", async () => {
    const h = await host();
    // 2 delivered, 1 duplicate, 1 refused at RCPT (422), 1 bad envelope (400), 1 queued (450), 1 wrong key (not counted).
    expect((await post(h, message("m1"))).status).toBe(200);
    expect((await post(h, message("m2"))).status).toBe(200);
    expect((await post(h, message("m1"))).body.status).toBe("duplicate");
    fake.behaviour.rcpt = () => 550;
    expect((await post(h, message("m3"))).status).toBe(422);
    expect((await post(h, message("m4"), "not an address")).status).toBe(400);
    fake.behaviour.rcpt = () => 450;
    expect((await post(h, message("m5"))).status).toBe(202);
    const wrong = await fetch(h.server.url + INBOUND_PATH, { method: "POST", headers: { "X-API-Key": "wrong" }, body: "x" });
    expect(wrong.status).toBe(401);

    const m = await metrics(h);
    expect(m.relay_received_total).toBe(6);
    expect(m.relay_delivered_total).toBe(2);
    expect(m.relay_duplicates_total).toBe(1);
    expect(m.relay_rejected_total).toBe(2);
    expect(m.relay_queued_total).toBe(1);
    expect(m.relay_deferred_total).toBe(0);
    expect(m.relay_unknown_outcome_total).toBe(0);
    expect(m.relay_spool_messages).toBe(1);
    expect(m.relay_spool_oldest_age_seconds).toBeGreaterThanOrEqual(0);
    // One LMTP transaction per delivery attempt that reached LMTP (not the duplicate, not the 400).
    expect(m.relay_delivery_seconds_count).toBe(4);
    expect(m['relay_delivery_seconds_bucket{le="+Inf"}']).toBe(4);

    fake.behaviour.rcpt = () => 250;
    await until("spool empty", async () => (await metrics(h)).relay_spool_messages === 0);
    expect((await metrics(h)).relay_spool_delivered_total).toBe(1);
  });

  test("/metrics needs the key", async () => {
    const h = await host();
    expect((await fetch(h.server.url + "/metrics")).status).toBe(401);
  });
});

const sendHeaders = { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER };

/** `n` uploads that send their headers and 500 bytes of a 10 KB message, then stop (half of them chunked). */
function stallUploads(h: Host, n: number): Promise<StalledUpload[]> {
  return Promise.all(
    Array.from({ length: n }, (_, i) =>
      stalledUpload({ url: h.server.url, path: INBOUND_PATH, headers: sendHeaders, sent: message(`stalled-${i}`, "x".repeat(500)).subarray(0, 500), length: i % 2 ? "chunked" : 10_000 }),
    ),
  );
}

describe("a slow or stalled client costs only itself", () => {
  test("a body that stops sending is answered 503 body_stalled with Retry-After once the idle limit has passed; nothing delivered, nothing spooled", async () => {
    const h = await host({ bodyIdleMs: 500 });
    const [chunked, declared] = await Promise.all([0, 1].map((i) =>
      stalledUpload({ url: h.server.url, path: INBOUND_PATH, headers: sendHeaders, sent: message(`idle-${i}`).subarray(0, 40), length: i ? 10_000 : "chunked" }),
    ));
    for (const u of [chunked!, declared!]) {
      const answer = await u.answer;
      expect(statusOf(answer)).toBe(503);
      expect(answer).toMatch(/\r\nretry-after: \d+\r\n/i);
      expect(jsonOf(answer)).toMatchObject({ status: "deferred", error: "body_stalled" });
      expect(String(jsonOf(answer).message)).toContain("no bytes for 0.5 s");
      u.close();
    }
    expect(fake.received).toEqual([]);
    expect(fake.commands.filter((c) => c.startsWith("MAIL"))).toEqual([]); // LMTP was never even started
    expect(files(h, "queue")).toEqual([]);
    expect(files(h, "tmp")).toEqual([]);
  });

  test("a JSON body that stops sending: 503 body_stalled as well", async () => {
    const h = await host({ spool: false, bodyIdleMs: 500 });
    const u = await stalledUpload({ url: h.server.url, path: INBOUND_PATH, headers: { "Content-Type": "application/json", "X-API-Key": KEY }, sent: enc.encode('{"from": "a@b.c", "to'), length: 5_000 });
    const answer = await u.answer;
    u.close();
    expect(statusOf(answer)).toBe(503);
    expect(jsonOf(answer).error).toBe("body_stalled");
  });

  for (const spool of [true, false]) {
    test(`16 stalled uploads (the pool's every connection) ${spool ? "with" : "without"} a spool: messages sent meanwhile are delivered at once, 200 each`, async () => {
      const h = await host({ spool, bodyIdleMs: 30_000, lmtp: { timeouts: { transaction: 3_000 } } });
      const stalled = await stallUploads(h, 16);
      await Bun.sleep(200); // the relay has them all by now
      const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => post(h, message(`beside-stalls-${i}`))));
      expect(answers.map((a) => a.status)).toEqual(answers.map(() => 200));
      expect(fake.received.length).toBe(20);
      expect(stalled.map((u) => u.received())).toEqual(stalled.map(() => "")); // still waiting, unanswered
      for (const u of stalled) u.close();
    });
  }

  test("with a spool, a message past the MiB held in memory is received into tmp/ and delivered from there, byte-exact; nothing is left", async () => {
    const h = await host();
    const sent = bigMessage("big-from-tmp", 3 * 1024 * 1024 + 5);
    const a = await post(h, streamOf(sent, uneven(50_000)));
    expect(a.status).toBe(200);
    expect(same(fake.received[0]!.data, sent)).toBe(true);
    expect(readdirSync(join(h.dir!, "tmp"))).toEqual([]);
    expect(files(h, "queue")).toEqual([]);
  });

  test("with a spool whose tmp/ cannot be written, a message past the MiB held in memory cannot be received: 503, nothing delivered", async () => {
    const h = await host();
    rmSync(join(h.dir!, "tmp"), { recursive: true });
    writeFileSync(join(h.dir!, "tmp"), "x");
    const a = await post(h, streamOf(bigMessage("big-no-tmp", 2 * 1024 * 1024), uneven(50_000)));
    expect(a.status).toBe(503);
    expect(a.headers.get("retry-after")).toBeTruthy();
    expect(String(a.body.message)).toContain("spool");
    expect(fake.received).toEqual([]);
    expect((await metrics(h)).relay_spool_write_errors_total).toBe(1);
  });
});

describe("a spool that turns read-only", () => {
  test("queue/ read-only (errors=remount-ro) when Dovecot comes back: each queued message is delivered once, never again in a loop; once writable the spool empties", async () => {
    const h = await host({ queue: { baseBackoffMs: 50, maxBackoffMs: 400 } });
    fake.behaviour.rcpt = () => 450;
    for (const id of ["ro-1", "ro-2", "ro-3"]) expect((await post(h, message(id))).status).toBe(202);
    await until("first retries done", () => logs.filter((l) => l.event === "spool_retry").length >= 3);
    // queue/ made read-only under the running host: a read-only bind mount of itself.
    const queue = join(h.dir!, "queue");
    expect(Bun.spawnSync(["mount", "--bind", queue, queue]).exitCode).toBe(0);
    try {
      expect(Bun.spawnSync(["mount", "-o", "remount,bind,ro", queue]).exitCode).toBe(0);
      fake.behaviour.rcpt = () => 250;
      h.server.runner!.kick();
      await until("each delivered", () => fake.received.length >= 3);
      await Bun.sleep(1_500);
      expect(fake.received.map((r) => Buffer.from(r.data).toString("latin1").match(/Subject: (\S+)/)![1]).sort()).toEqual(["ro-1", "ro-2", "ro-3"]);
      const errors = logs.filter((l) => l.event === "spool_error");
      expect(errors.length).toBeGreaterThan(0);
      expect(errors.length).toBeLessThan(3 * 12); // backed off, not thousands
      expect(String(errors[0]!.error)).toContain("delivered, but not removed from queue/");
      expect(String(errors[0]!.error)).toContain("EROFS");
      const m = await metrics(h);
      expect(m.relay_spool_delivered_total).toBe(3);
      expect(m.relay_spool_messages).toBe(3);
    } finally {
      Bun.spawnSync(["umount", "-l", queue]);
    }
    await until("removed once writable", () => h.server.runner!.size === 0, 10_000);
    expect(files(h, "queue")).toEqual([]);
    expect(fake.received.length).toBe(3);
  });
});

describe("a full spool disk (a real tmpfs)", () => {
  test("a message that does not fit: 503, nothing in queue/ or tmp/; after space is freed the same message is spooled whole", async () => {
    const dir = await mkdtemp("/tmp/delivery-test-");
    dirs.push(dir);
    const mnt = join(dir, "spool");
    mkdirSync(mnt);
    mountTmpfs(mnt, "512k");
    try {
      const h = await host({ dir: mnt, queue: { baseBackoffMs: 60_000, maxBackoffMs: 60_000 } });
      fake.behaviour.rcpt = () => 450;
      // Fill the disk but for about 100 KiB.
      const filler = fillDisk(mnt);
      truncateSync(filler, statSync(filler).size - 100 * 1024);

      const sent = bigMessage("disk-full", 300_000);
      const a = await post(h, sent);
      expect(a.status).toBe(503);
      expect(a.headers.get("retry-after")).toBeTruthy();
      expect(readdirSync(join(mnt, "queue"))).toEqual([]);
      expect(readdirSync(join(mnt, "tmp"))).toEqual([]);
      expect((await metrics(h)).relay_spool_write_errors_total).toBe(1);

      rmSync(filler);
      const b = await post(h, sent);
      expect(b.status).toBe(202);
      const [entry] = await h.spool!.list();
      expect(entry!.header.size).toBe(sent.length);
      expect(same(await spooledBody(h, entry!.header.id), sent)).toBe(true);
      await h.server.stop();
    } finally {
      Bun.spawnSync(["umount", "-l", mnt]);
    }
  });
});
