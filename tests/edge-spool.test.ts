// The edge spool's code in Bun, on an in-memory R2 bucket (tests/support/memory-r2.ts): what
// local workerd cannot show (messages over its 1 MiB local limit, a bucket that fails, days and
// weeks passing) and the drain's rules one by one, with R2 operations counted. email() runs
// against the real host (startServer) in front of the fake LMTP, or a stub host.

import { afterAll, beforeAll, beforeEach, describe, expect, setSystemTime, spyOn, test, type Mock } from "bun:test";
import type { Server } from "bun";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Budget } from "../edge/budget.ts";
import { backoffMs, COST, drain, LOCK_LEASE_MS, MAX_LINKS, type DrainOptions, type DrainTrigger, type SendResult } from "../edge/drain.ts";
import { runDrain } from "../edge/drain-runner.ts";
import PostalMime from "postal-mime";
import { headerBlock, noticeMessage, summarizeHeaders } from "../edge/notice.ts";
import { DAY, EdgeSpool, HOUR, MINUTE, NO_ANSWER_GRACE_MS, type HeldMessage } from "../edge/spool.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { startServer, type RunningServer } from "../server.ts";
import { workerConfig } from "../edge/config.ts";
import worker, { email, scheduled, type IncomingEmail } from "../worker.ts";
import { edgeQueue } from "../scripts/edge-queue.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

const KEY = `ekey_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const MiB = 1024 * 1024;
const USER = "user@kuma8088.com";
const SENDER = "sender@example.org";
const POSTMASTER = "postmaster@kuma8088.com";

let fake: FakeLmtpServer;
let server: RunningServer;
let stub: Server<undefined>;
let stubStatus = 503;
/** When set, what the stub answers instead. */
let stubAnswer: (() => Response) | null = null;
let stubRequests = 0;
let consoleSpy: Mock<typeof console.log>;
const workerLines: Record<string, unknown>[] = [];

beforeAll(async () => {
  fake = await startFakeLmtp();
  server = startServer({ apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * MiB }, { log: () => {} });
  stub = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      stubRequests++;
      await req.arrayBuffer();
      return stubAnswer?.() ?? Response.json({ status: "error", message: `stub says ${stubStatus}` }, { status: stubStatus });
    },
  });
  consoleSpy = spyOn(console, "log").mockImplementation((...args: unknown[]) => {
    for (const a of args) {
      try {
        workerLines.push(JSON.parse(String(a)));
      } catch {}
    }
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  consoleSpy.mockRestore();
  await server.stop();
  await stub.stop(true);
  await fake.close();
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  fake.reset();
  stubStatus = 503;
  stubAnswer = null;
  stubRequests = 0;
});

// --- helpers --------------------------------------------------------------------------------

function rfc822(subject: string, body: Uint8Array | string = "Hello.\r\n", extra: string[] = []): Uint8Array {
  const head = [`From: Sender <${SENDER}>`, `To: <${USER}>`, `Subject: ${subject}`, `Message-ID: <${crypto.randomUUID()}@example.org>`, ...extra].join("\r\n");
  return new Uint8Array(Buffer.concat([Buffer.from(head + "\r\n\r\n", "latin1"), Buffer.from(body as Uint8Array)]));
}

type Msg = IncomingEmail & { rejects: string[] };
function incoming(raw: Uint8Array, to = USER): Msg {
  let at = 0;
  const m: Msg = {
    from: SENDER,
    to,
    headers: new Headers(),
    raw: new ReadableStream<Uint8Array>({
      pull(c) {
        if (at >= raw.length) return c.close();
        c.enqueue(raw.slice(at, at + 64 * 1024));
        at += 64 * 1024;
      },
    }),
    rawSize: raw.length,
    rejects: [],
    setReject: (r) => void m.rejects.push(r),
  };
  return m;
}

/** An env whose host is the real one (up) or the stub (answering stubStatus). */
const env = (bucket: MemoryR2, host: "real" | "stub", extra: Record<string, string> = {}) => ({
  API_KEY: KEY,
  DELL_API_ENDPOINT: host === "real" ? `${server.url}/api/v1/inbound-mail` : `http://127.0.0.1:${stub.port}/api/v1/inbound-mail`,
  POSTMASTER,
  EDGE_SPOOL: bucket,
  ...extra,
});

async function run(msg: Msg, e: Record<string, unknown>): Promise<Error | null> {
  try {
    await email(msg, e);
    return null;
  } catch (err) {
    return err as Error;
  }
}

const heldKeys = (b: MemoryR2) => b.keys("queue/").filter((k) => !k.endsWith(".retry"));

// --- holding and learning, through email() ----------------------------------------------------

describe("email() with EDGE_SPOOL", () => {
  test("a 25 MiB 8-bit message for a known recipient is held byte for byte while the host is down, and the drain delivers it byte for byte", async () => {
    const bucket = new MemoryR2();
    const body = new Uint8Array(78 * 336_000); // 8-bit lines of 78 bytes with their CR LF: just under 25 MiB
    for (let i = 0; i < body.length; i++) body[i] = i % 78 === 76 ? 0x0d : i % 78 === 77 ? 0x0a : 0x80 + (i % 128);
    const raw = rfc822("big", body, ["Content-Transfer-Encoding: 8bit"]);
    const err = await run(incoming(raw), env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }));
    expect(err).toBeNull();
    const [key] = heldKeys(bucket);
    expect(Buffer.from(bucket.bytesOf(key!)!).equals(Buffer.from(raw))).toBe(true);

    const summary = await runDrain(workerConfig(env(bucket, "real")), "cron", { log: () => {} });
    expect(summary).toMatchObject({ delivered: 1, remaining: 0 });
    expect(fake.received).toHaveLength(1);
    const got = Buffer.from(fake.received[0]!.data);
    expect(got.length).toBe(raw.length);
    const firstDiff = got.findIndex((b, i) => b !== raw[i]);
    expect(firstDiff).toBe(-1);
    expect(heldKeys(bucket)).toEqual([]);
  });

  test("the healthy path: no R2 write but the first for a new recipient; one HEAD per message (is anything held?)", async () => {
    const bucket = new MemoryR2();
    const e = env(bucket, "real");
    for (let i = 0; i < 5; i++) expect(await run(incoming(rfc822(`healthy ${i}`)), e)).toBeNull();
    expect(fake.received).toHaveLength(5);
    expect(bucket.calls.filter((c) => c.startsWith("put "))).toEqual([`put known/${USER}`]);
    // known: one HEAD and one PUT; held: one HEAD, then none for a while (nothing was held).
    expect(bucket.ops).toEqual({ A: 1, B: 2, free: 0 });
    expect(bucket.keys()).toEqual([`known/${USER}`]);
  });

  test("a live success delivers what the edge holds right after it", async () => {
    const bucket = new MemoryR2();
    const held = rfc822("held, then follows a live one");
    expect(await run(incoming(held), env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }))).toBeNull();
    expect(heldKeys(bucket)).toHaveLength(1);
    const live = rfc822("live");
    expect(await run(incoming(live), env(bucket, "real"))).toBeNull();
    expect(fake.received.map((r) => Buffer.from(r.data).toString("latin1"))).toEqual([live, held].map((b) => Buffer.from(b).toString("latin1")));
    expect(heldKeys(bucket)).toEqual([]);
    expect(workerLines.some((l) => l.event === "edge_delivered" && l.trigger === "live")).toBe(true);
  });

  test("host down: an unknown recipient is thrown back (nothing written); once learned, the same recipient is held", async () => {
    const bucket = new MemoryR2();
    const err = await run(incoming(rfc822("unknown")), env(bucket, "stub"));
    expect(err?.message).toContain("temporary failure");
    expect(bucket.ops.A).toBe(0);
    expect(bucket.keys()).toEqual([]);

    expect(await run(incoming(rfc822("learn")), env(bucket, "real"))).toBeNull();
    const msg = incoming(rfc822("now known"));
    expect(await run(msg, env(bucket, "stub"))).toBeNull();
    expect(msg.rejects).toEqual([]);
    expect(heldKeys(bucket)).toHaveLength(1);
    expect(workerLines.at(-1)).toMatchObject({ outcome: "held", status: 503 });
  });

  test("RECIPIENT_DELIMITER: user+tag@ is held when user@ is known, and only then; unset, user+tag@ is a stranger", async () => {
    const bucket = new MemoryR2();
    const [local, domain] = USER.split("@");
    const tagged = `${local}+news@${domain}`;
    expect(await run(incoming(rfc822("learn")), env(bucket, "real"))).toBeNull(); // USER is known now
    // Unset: the tag makes another address, not known.
    expect((await run(incoming(rfc822("tagged, no delimiter"), tagged), env(bucket, "stub")))?.message).toContain("temporary failure");
    expect(heldKeys(bucket)).toEqual([]);
    const msg = incoming(rfc822("tagged"), tagged);
    expect(await run(msg, env(bucket, "stub", { RECIPIENT_DELIMITER: "+-" }))).toBeNull();
    expect(msg.rejects).toEqual([]);
    expect(heldKeys(bucket)).toHaveLength(1);
    // Another user's tag is no better known than that user.
    expect((await run(incoming(rfc822("stranger"), `stranger+news@${domain}`), env(bucket, "stub", { RECIPIENT_DELIMITER: "+" })))?.message).toContain("temporary failure");
    expect(heldKeys(bucket)).toHaveLength(1);
  });

  test("RECIPIENT_DELIMITER: a delivery to user+tag@ teaches user@, once: in the next outage user@ and any other tag are held", async () => {
    const bucket = new MemoryR2();
    const [local, domain] = USER.split("@");
    const e = (host: "real" | "stub") => env(bucket, host, { RECIPIENT_DELIMITER: "+" });
    expect(await run(incoming(rfc822("tagged"), `${local}+news@${domain}`), e("real"))).toBeNull();
    expect(await run(incoming(rfc822("another tag"), `${local}+shop@${domain}`), e("real"))).toBeNull();
    expect(bucket.keys("known/")).toEqual([`known/${USER}`]);
    expect(bucket.calls.filter((c) => c.startsWith("put known/"))).toHaveLength(1);
    for (const to of [USER, `${local}+other@${domain}`]) {
      const msg = incoming(rfc822(`held for ${to}`), to);
      expect({ to, err: (await run(msg, e("stub")))?.message ?? null }).toEqual({ to, err: null });
      expect(workerLines.at(-1)).toMatchObject({ outcome: "held", to });
    }
  });

  test("a 202 (queued on the host while Dovecot is down) teaches nothing: a random address stays unknown and is thrown back in the next outage", async () => {
    // The real host with its spool, in front of an LMTP server that answers 450 for now: it
    // cannot know who exists, queues the message for anyone and answers 202.
    const spoolDir = mkdtempSync(join(tmpdir(), "relay-edge-learn-"));
    const queuing = startServer({ apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: MiB, spoolDir, spoolMaxAgeMs: HOUR }, { log: () => {} });
    try {
      fake.behaviour.rcpt = () => 450;
      const bucket = new MemoryR2();
      const random = "catchall-7f3a9c@kuma8088.com";
      const e = { ...env(bucket, "real"), DELL_API_ENDPOINT: `${queuing.url}/api/v1/inbound-mail` };
      expect(await run(incoming(rfc822("to a random address"), random), e)).toBeNull(); // accepted: 202
      expect(workerLines.filter((l) => l.outcome && l.to === random).at(-1)).toMatchObject({ outcome: "accept", status: 202 });
      expect(bucket.keys("known/")).toEqual([]);
      expect(workerLines.some((l) => l.event === "edge_known" && l.to === random)).toBe(false);

      // The next outage: not known, so not held and not accepted; the sender retries.
      const msg = incoming(rfc822("catch-all spam, host down"), random);
      const err = await run(msg, env(bucket, "stub"));
      expect(err?.message).toContain("temporary failure");
      expect(heldKeys(bucket)).toEqual([]);

      // A delivery confirmed for that recipient (its LMTP 250) does teach.
      fake.reset();
      expect(await run(incoming(rfc822("delivered"), USER), env(bucket, "real"))).toBeNull();
      expect(bucket.keys("known/")).toEqual([`known/${USER}`]);
    } finally {
      await queuing.stop();
      rmSync(spoolDir, { recursive: true, force: true });
    }
  });

  test("an envelope too long for R2's metadata is not held: thrown back (the sender retries), nothing written", async () => {
    const bucket = new MemoryR2();
    const msg = incoming(rfc822("very long sender"));
    (msg as { from: string }).from = `${"送信者".repeat(21)}@${"例え".repeat(90)}.jp`; // 243 characters outside ASCII
    const err = await run(msg, env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }));
    expect(err?.message).toContain("temporary failure");
    expect(msg.rejects).toEqual([]);
    expect(workerLines.at(-1)).toMatchObject({ outcome: "retry", held: false });
    expect(String(workerLines.at(-1)!.why_not_held)).toContain("more than the 1200 the edge spool keeps for it");
    expect(bucket.keys()).toEqual([]);
  });

  test("a held message answered 202 by the host (queued there while Dovecot is down) is confirmed: gone from the edge, the host delivers it later", async () => {
    const bucket = new MemoryR2();
    expect(await run(incoming(rfc822("held, then queued on the host")), env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }))).toBeNull();
    const spoolDir = mkdtempSync(join(tmpdir(), "relay-edge-queued-"));
    const queuing = startServer({ apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 0, host: "127.0.0.1", maxMessageBytes: MiB, spoolDir, spoolMaxAgeMs: HOUR }, { log: () => {} });
    try {
      fake.behaviour.rcpt = () => 450;
      const e = { ...env(bucket, "real"), DELL_API_ENDPOINT: `${queuing.url}/api/v1/inbound-mail` };
      const lines: Record<string, unknown>[] = [];
      expect(await runDrain(workerConfig(e), "cron", { log: (l) => void lines.push(l) })).toMatchObject({ delivered: 1, remaining: 0 });
      expect(heldKeys(bucket)).toEqual([]);
      expect(String(lines.find((l) => l.event === "edge_delivered")?.reply)).toContain("queued as");
      expect(bucket.keys("known/")).toEqual([]); // a drain learns nothing either
    } finally {
      await queuing.stop();
      rmSync(spoolDir, { recursive: true, force: true });
    }
  });

  test("a domain entry in ALLOWED_RECIPIENTS is a filter only: it does not make its addresses known", async () => {
    const bucket = new MemoryR2();
    const err = await run(incoming(rfc822("domain")), env(bucket, "stub", { ALLOWED_RECIPIENTS: "kuma8088.com" }));
    expect(err?.message).toContain("temporary failure");
    expect(heldKeys(bucket)).toEqual([]);
  });

  test("a recipient is known for 60 days after the host last accepted mail for it, then no longer", async () => {
    const bucket = new MemoryR2();
    const spool = new EdgeSpool(bucket);
    const t0 = Date.now();
    bucket.now = () => t0;
    expect(await spool.learn("Someone@Example.test", t0)).toBe(true);
    expect(await spool.learn("someone@example.test", t0 + HOUR)).toBe(false); // no second write the same day
    expect(await spool.isKnown("someone@example.test", t0 + 59 * DAY)).toBe(true);
    expect(await spool.isKnown("someone@example.test", t0 + 61 * DAY)).toBe(false);
    expect(bucket.calls.filter((c) => c.startsWith("put"))).toHaveLength(1);
  });

  test("R2 failing while holding: a temporary failure (thrown), never an acceptance", async () => {
    const bucket = new MemoryR2();
    await run(incoming(rfc822("learn")), env(bucket, "real"));
    bucket.failPuts = "queue/";
    const msg = incoming(rfc822("bucket down"));
    const err = await run(msg, env(bucket, "stub"));
    expect(err?.message).toContain("temporary failure");
    expect(msg.rejects).toEqual([]);
    expect(workerLines.at(-1)).toMatchObject({ outcome: "retry", held: false });
    expect(String(workerLines.at(-1)!.why_not_held)).toContain("internal error");
  });

  test("R2 failing on the marker after the message was written: thrown, and the written copy removed (the sender sends it again; no second copy later)", async () => {
    const bucket = new MemoryR2();
    await bucket.put("held", crypto.randomUUID(), { customMetadata: { empty: "1" } }); // a drain emptied the queue before
    bucket.failPuts = "held";
    const msg = incoming(rfc822("marker down"));
    const err = await run(msg, env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }));
    expect(err?.message).toContain("temporary failure");
    expect(msg.rejects).toEqual([]);
    expect(workerLines.at(-1)).toMatchObject({ outcome: "retry", held: false });
    // Left there, it would wait unseen behind a marker that says "empty", and go to the host
    // after the next hold, beside the copy the sender's retry delivered.
    expect(heldKeys(bucket)).toEqual([]);
  });

  test("a host refusal (422) is still a bounce in the session with the spool bound: nothing held", async () => {
    const bucket = new MemoryR2();
    await run(incoming(rfc822("learn")), env(bucket, "real"));
    fake.behaviour.rcpt = () => 550;
    const msg = incoming(rfc822("refused"));
    expect(await run(msg, env(bucket, "real"))).toBeNull();
    expect(msg.rejects[0]).toMatch(/^550 5\.1\.1 /);
    expect(heldKeys(bucket)).toEqual([]);
  });

  for (const [name, extra, pattern] of [
    ["EDGE_SPOOL_MAX_AGE_HOURS not a number", { EDGE_SPOOL_MAX_AGE_HOURS: "five days" }, /EDGE_SPOOL_MAX_AGE_HOURS must be a number/],
    ["EDGE_SPOOL_MAX_AGE_HOURS zero", { EDGE_SPOOL_MAX_AGE_HOURS: "0" }, /EDGE_SPOOL_MAX_AGE_HOURS must be more than 0/],
    ["POSTMASTER not an address", { POSTMASTER: "postmaster" }, /POSTMASTER must be an address/],
    ["EDGE_SPOOL_SUBREQUESTS not a number", { EDGE_SPOOL_SUBREQUESTS: "fifty" }, /EDGE_SPOOL_SUBREQUESTS must be a number/],
    ["EDGE_SPOOL_SUBREQUESTS below what a run needs", { EDGE_SPOOL_SUBREQUESTS: "10" }, /EDGE_SPOOL_SUBREQUESTS must be at least 20/],
    ["EDGE_SPOOL_SUBREQUESTS above the paid plan's", { EDGE_SPOOL_SUBREQUESTS: "50000" }, /EDGE_SPOOL_SUBREQUESTS must be at most 10000/],
  ] as const) {
    test(`${name}: a configuration error naming it`, async () => {
      const msg = incoming(rfc822(name));
      expect((await run(msg, env(new MemoryR2(), "real", extra)))?.message).toMatch(pattern);
      expect(msg.rejects).toEqual([]);
    });
  }

  test("EDGE_SPOOL bound without POSTMASTER: a configuration error naming it (thrown, never a bounce)", async () => {
    const bucket = new MemoryR2();
    const e: Record<string, unknown> = env(bucket, "real");
    delete e.POSTMASTER;
    const msg = incoming(rfc822("no postmaster"));
    expect((await run(msg, e))?.message).toContain("POSTMASTER is not set");
    expect(msg.rejects).toEqual([]);
  });
});

// --- the drain's rules ------------------------------------------------------------------------

/** A spool with held messages and a scriptable host; time moves only when the test says so. */
function harness(count: number, opts: { noAnswer?: boolean; kind?: "mail" | "notice"; to?: string; from?: string } = {}) {
  const bucket = new MemoryR2();
  let t = Date.UTC(2026, 0, 1);
  bucket.now = () => t;
  const sent: { id: string; to: string; bytes: Uint8Array; timeoutMs: number }[] = [];
  let answer: (m: HeldMessage) => SendResult = () => ({ outcome: "temporary", reply: "host answered 502: origin unreachable" });
  const logs: Record<string, unknown>[] = [];
  const ids: string[] = [];
  const ready = (async () => {
    for (let i = 0; i < count; i++) {
      t += 1000;
      const raw = rfc822(`held ${i}`);
      ids.push((await new EdgeSpool(bucket).hold(new TextDecoder("latin1").decode(raw), { from: opts.from ?? SENDER, to: opts.to ?? USER, size: raw.length, reason: "host down", noAnswer: opts.noAnswer ?? false, kind: opts.kind }, t))!);
    }
  })();
  /** Subrequests each run may make; the fetches to the host are counted here beside the bucket's calls. */
  let fetches = 0;
  const options = (trigger: DrainTrigger, extra: Partial<DrainOptions>): DrainOptions => ({
    trigger,
    maxAgeMs: 120 * HOUR,
    postmaster: POSTMASTER,
    now: () => t,
    log: (l) => void logs.push(l),
    send: async (m, body, _requestId, timeoutMs) => {
      fetches++;
      sent.push({ id: m.id, to: m.to, bytes: new Uint8Array(await new Response(body).arrayBuffer()), timeoutMs });
      return answer(m);
    },
    ...extra,
  });
  const run = (trigger: DrainTrigger = "cron", extra: Partial<DrainOptions> = {}, budget = new Budget(50)) => drain(new EdgeSpool(bucket, budget), budget, options(trigger, extra));
  return {
    bucket,
    sent,
    logs,
    ids,
    ready,
    fetches: () => fetches,
    advance: (ms: number) => void (t += ms),
    now: () => t,
    answer: (f: (m: HeldMessage) => SendResult) => void (answer = f),
    drain: run,
    held: async () => (await new EdgeSpool(bucket).held()).messages,
    marker: () => new EdgeSpool(bucket).marker(),
  };
}

const CONFIRMED: SendResult = { outcome: "confirmed", reply: "250 2.0.0 ok" };

describe("drain", () => {
  test("backoff like Postfix's: 5 min after the first failed attempt, doubling, at most an hour", () => {
    expect([1, 2, 3, 4, 5, 6, 20].map((n) => backoffMs(n) / MINUTE)).toEqual([5, 10, 20, 40, 60, 60, 60]);
  });

  test("a held message removed between the listing and its attempt: no delivery logged, and the next one is the probe, whose timeout is not its own failure", async () => {
    const h = harness(2);
    await h.ready;
    const [gone, next] = h.ids as [string, string];
    const get = h.bucket.get.bind(h.bucket);
    h.bucket.get = async (key, options) => (key === `queue/${gone}` ? null : get(key, options));
    h.answer(() => ({ outcome: "temporary", reply: "host unreachable: no answer within 25000 ms", noAnswer: true }));
    h.advance(MINUTE);
    expect(await h.drain()).toMatchObject({ delivered: 0, retried: 1, stopped: "host" });
    expect(h.sent.map((s) => s.id)).toEqual([next]);
    expect(h.logs.filter((l) => l.event === "edge_delivered")).toEqual([]);
    // The host never answered in this run: the timeout waits for the cron's probe, not a backoff of its own.
    expect((await h.held()).map((m) => ({ id: m.id, specific: m.specific, attempts: m.attempts }))).toEqual([{ id: next, specific: false, attempts: 1 }]);
  });

  test("host down: one attempt per run (the probe), the others untouched; the host back: everything in one run, oldest first; then an idle run is one HEAD", async () => {
    const h = harness(3);
    await h.ready;
    for (let run = 0; run < 3; run++) {
      h.advance(MINUTE);
      expect(await h.drain()).toMatchObject({ state: "ran", retried: 1, delivered: 0, remaining: 3, stopped: "host" });
    }
    expect(h.sent).toHaveLength(3);
    // Each probe took the message due soonest: the backoff rotates them.
    expect(new Set(h.sent.map((s) => s.id)).size).toBe(3);
    expect(await h.marker()).toMatchObject({ empty: false, probe: true });
    h.sent.length = 0;
    h.answer(() => CONFIRMED);
    h.advance(MINUTE);
    expect(await h.drain()).toMatchObject({ delivered: 3, remaining: 0, stopped: "done" });
    // The probe first, then the others in the order they arrived.
    expect(h.sent.slice(1).map((s) => s.id)).toEqual(h.ids.filter((id) => id !== h.sent[0]!.id));
    expect(await h.held()).toEqual([]);
    expect(h.bucket.keys("queue/")).toEqual([]);
    expect(await h.marker()).toMatchObject({ empty: true });
    h.bucket.resetCounts();
    expect(await h.drain()).toMatchObject({ state: "idle" });
    expect(h.bucket.calls).toEqual(["head held"]);
  });

  test("nothing confirmed: a message whose backoff has not run out is not tried besides the probe", async () => {
    const h = harness(2);
    await h.ready;
    await h.drain(); // the probe fails: the first message waits 5 min
    h.advance(2 * MINUTE);
    await h.drain(); // probe: the second (next = 0), fails
    h.advance(MINUTE);
    h.sent.length = 0;
    await h.drain(); // both in backoff: only one probe again
    expect(h.sent).toHaveLength(1);
  });

  test("a message held without the host's answer is not offered again within the grace period (its first copy may be arriving)", async () => {
    const h = harness(1, { noAnswer: true });
    await h.ready;
    h.answer(() => ({ outcome: "confirmed", reply: "250 2.0.0 already delivered" }));
    await h.drain();
    expect(h.sent).toHaveLength(0);
    expect(await h.held()).toHaveLength(1);
    h.advance(NO_ANSWER_GRACE_MS);
    await h.drain();
    expect(h.sent).toHaveLength(1);
    expect(await h.held()).toHaveLength(0);
  });

  test("a permanent refusal: failed/, one notice (itself queued for the host), no retry of the message after", async () => {
    const h = harness(1);
    await h.ready;
    h.answer((m) => (m.kind === "notice" ? CONFIRMED : { outcome: "permanent", reply: "422 550 5.1.1 <user@kuma8088.com> User unknown" }));
    expect(await h.drain()).toMatchObject({ failed: 1 });
    expect(h.bucket.keys("failed/")).toEqual([`failed/${h.ids[0]}`]);
    const held = await h.held();
    expect(held.map((m) => [m.kind, m.to, m.from, m.noticeFor])).toEqual([["notice", POSTMASTER, "", h.ids[0]]]);
    for (let i = 0; i < 3; i++) {
      h.advance(HOUR);
      await h.drain();
    }
    expect(h.sent.map((s) => s.to)).toEqual([USER, POSTMASTER]);
    const notice = new TextDecoder().decode(h.sent[1]!.bytes);
    expect(notice).toContain(`id:          ${h.ids[0]}`);
    expect(notice).toContain("host reply:  422 550 5.1.1");
    expect(notice).toContain("Subject:     held 0");
    expect(notice).toContain(`From:        Sender <${SENDER}>`);
    // The failed copy is the message, byte for byte, with its story.
    expect(h.bucket.bytesOf(`failed/${h.ids[0]}`)).toEqual(h.sent[0]!.bytes);
  });

  test("a give-up cut off before the message left queue/ is finished by the next run without a second notice", async () => {
    const h = harness(1);
    await h.ready;
    h.answer((m) => (m.kind === "notice" ? CONFIRMED : { outcome: "permanent", reply: "422 550 5.1.1 User unknown" }));
    // Cut off after the notice, before the message left queue/.
    const realDelete = h.bucket.delete.bind(h.bucket);
    h.bucket.delete = async () => {
      throw new Error("cut off");
    };
    await h.drain();
    expect(h.bucket.keys("queue/").filter((k) => !k.endsWith(".retry"))).toHaveLength(2); // the message and its notice
    h.bucket.delete = realDelete;
    for (let i = 0; i < 2; i++) {
      h.advance(HOUR);
      await h.drain();
    }
    expect(h.bucket.keys("failed/")).toEqual([`failed/${h.ids[0]}`]);
    expect(await h.held()).toEqual([]);
    expect(h.sent.filter((s) => s.to === POSTMASTER)).toHaveLength(1);
    expect(h.logs.filter((l) => l.event === "edge_notice")).toHaveLength(1);
  });

  test("never a notice about a notice: a refused notice goes to failed/ and nothing is queued", async () => {
    const h = harness(1, { kind: "notice", to: POSTMASTER });
    await h.ready;
    h.answer(() => ({ outcome: "permanent", reply: "422 550 5.1.1 no such postmaster" }));
    expect(await h.drain()).toMatchObject({ failed: 1, remaining: 0 });
    expect(await h.held()).toEqual([]);
    expect(h.bucket.keys("failed/")).toHaveLength(1);
  });

  test("past the maximum age, the host back: delivered, never given up without an attempt", async () => {
    const h = harness(3);
    await h.ready;
    h.advance(120 * HOUR);
    h.answer(() => CONFIRMED);
    expect(await h.drain()).toMatchObject({ delivered: 3, failed: 0 });
    expect(h.sent.map((s) => s.id)).toEqual(h.ids);
    expect(h.bucket.keys("failed/")).toEqual([]);
    expect(await h.held()).toEqual([]);
  });

  test("past the maximum age, the host still away: the probe fails, then failed/ and one notice each", async () => {
    const h = harness(3);
    await h.ready;
    h.advance(120 * HOUR);
    expect(await h.drain()).toMatchObject({ failed: 3, retried: 0, stopped: "host" });
    expect(h.sent).toHaveLength(1); // the probe: the host did not answer
    const failed = await new EdgeSpool(h.bucket).failed();
    expect(failed.map((f) => [f.id, f.why])).toEqual(h.ids.map((id) => [id, "expired"]));
    expect((await h.held()).map((m) => [m.kind, m.noticeFor])).toEqual(h.ids.map((id) => ["notice", id]));
  });

  test("past the maximum age, the host answering for the message (a full mailbox): given up after that attempt, the others delivered", async () => {
    const h = harness(2);
    await h.ready;
    const [full] = h.ids;
    h.advance(120 * HOUR);
    h.answer((m) => (m.id === full ? { outcome: "temporary", reply: "host answered 503: 452 4.2.2 Mailbox full", hostAnswered: true } : CONFIRMED));
    expect(await h.drain("live")).toMatchObject({ delivered: 1, failed: 1 });
    expect(h.sent.map((s) => s.id)).toEqual(h.ids);
    const [failed] = await new EdgeSpool(h.bucket).failed();
    expect(failed).toMatchObject({ id: full, why: "expired", lastReply: "host answered 503: 452 4.2.2 Mailbox full" });
  });

  test("a long non-ASCII envelope and a long reply fit R2's metadata: refused once, one notice, failed/ keeps it, the next runs add nothing", async () => {
    const from = `${"送信者".repeat(21)}@${"例え".repeat(30)}.jp`; // 123 characters outside ASCII: 738 bytes as \uXXXX
    const h = harness(1, { from });
    await h.ready;
    const reply = `422 550 5.1.1 ${"ユーザーが見つかりません。".repeat(60)}`; // 780 characters outside ASCII
    h.answer((m) => (m.kind === "notice" ? CONFIRMED : { outcome: "permanent", reply }));
    expect(await h.drain()).toMatchObject({ failed: 1, stopped: "done" });
    const [failed] = await new EdgeSpool(h.bucket).failed();
    expect(failed).toMatchObject({ from, to: USER, why: "refused" });
    expect(failed!.lastReply.startsWith("422 550 5.1.1 ユーザー")).toBe(true);
    for (let i = 0; i < 3; i++) {
      h.advance(HOUR);
      await h.drain();
    }
    expect(h.sent.map((s) => s.to)).toEqual([USER, POSTMASTER]);
    expect(h.logs.filter((l) => l.event === "edge_spool_error")).toEqual([]);
    expect(await h.held()).toEqual([]);
    // A temporary failure's long reply too (the .retry record).
    const g = harness(1, { from });
    await g.ready;
    g.answer(() => ({ outcome: "temporary", reply: `451 ${"一時的な失敗".repeat(400)}` }));
    expect(await g.drain()).toMatchObject({ retried: 1 });
    expect((await g.held())[0]).toMatchObject({ from, attempts: 1 });
  });

  test("two drains at once: one runs, the other says busy; a dead drain's lock is taken over after its lease, under a minute", async () => {
    const h = harness(2);
    await h.ready;
    h.answer((m) => (m.kind === "notice" ? CONFIRMED : { outcome: "permanent", reply: "422 refused" }));
    const [a, b] = await Promise.all([h.drain(), h.drain()]);
    expect([a.state, b.state].sort()).toEqual(["busy", "ran"]);
    expect((await h.held()).filter((m) => m.kind === "notice")).toHaveLength(2); // one per message, not per drain

    expect(await new EdgeSpool(h.bucket).lock(LOCK_LEASE_MS, h.now())).not.toBeNull(); // a drain that then dies
    expect((await h.drain()).state).toBe("busy");
    expect(LOCK_LEASE_MS).toBeLessThan(MINUTE);
    h.advance(LOCK_LEASE_MS + 1);
    expect((await h.drain()).state).toBe("ran");
  });

  test("a drain cut off at any of its calls delays nothing by more than two cron runs after its lease; none is lost, none sent more than twice", async () => {
    // The run that is cut off makes these calls: marker, lock (2), list, then per message a get, a
    // fetch and a delete, then the marker's write and the unlock.
    for (let cut = 0; cut < 14; cut++) {
      const h = harness(3);
      await h.ready;
      h.answer(() => CONFIRMED);
      h.bucket.resetCounts();
      let calls = 0;
      h.bucket.freezeWhen = () => calls++ === cut;
      void h.drain(); // never answers again once frozen: no finally runs, as when the Worker is killed
      for (let i = 0; i < 20; i++) await Bun.sleep(0);
      h.bucket.thaw();
      h.advance(LOCK_LEASE_MS);
      for (let run = 0; run < 2 && (await h.held()).length; run++) {
        h.advance(MINUTE);
        await h.drain();
      }
      expect({ cut, held: await h.held() }).toEqual({ cut, held: [] });
      const sends = new Map<string, number>();
      for (const s of h.sent) sends.set(s.id, (sends.get(s.id) ?? 0) + 1);
      expect({ cut, delivered: [...sends.keys()].sort() }).toEqual({ cut, delivered: [...h.ids].sort() });
      expect(Math.max(...sends.values())).toBeLessThanOrEqual(2); // a second copy only after a cut between the host's answer and the delete
    }
  });

  test("a message the host itself defers (a full mailbox) waits its backoff: cron runs before it is due are one HEAD; others still go", async () => {
    const h = harness(2);
    await h.ready;
    const [full] = h.ids;
    h.answer((m) => (m.id === full ? { outcome: "temporary", reply: "host answered 503: 452 4.2.2 Mailbox full", hostAnswered: true } : CONFIRMED));
    expect(await h.drain()).toMatchObject({ delivered: 1, retried: 1, remaining: 1 });
    expect(await h.marker()).toMatchObject({ probe: false, due: h.now() + 5 * MINUTE });
    h.bucket.resetCounts();
    for (let i = 0; i < 4; i++) {
      h.advance(MINUTE);
      expect(await h.drain()).toMatchObject({ state: "idle" });
    }
    expect(h.bucket.calls).toEqual(Array(4).fill("head held"));
    expect(h.sent.filter((s) => s.id === full)).toHaveLength(1);
    h.advance(MINUTE);
    await h.drain("live"); // due: offered again
    expect(h.sent.filter((s) => s.id === full)).toHaveLength(2);
  });

  test("messages waiting out a backoff of their own at the head of the queue (a full mailbox) hide nothing behind them: the rest are delivered, then idle runs are one HEAD", async () => {
    // 60 held for a full mailbox: with their .retry records, more than a page of the listing.
    const h = harness(60, { to: "full@kuma8088.com" });
    await h.ready;
    h.answer((m) => (m.to === "full@kuma8088.com" ? { outcome: "temporary", reply: "host answered 503: 452 4.2.2 Mailbox full", hostAnswered: true } : CONFIRMED));
    // Each was offered while the host was up and answered for it: each waits its backoff.
    for (const m of (await new EdgeSpool(h.bucket).held(10)).messages) await new EdgeSpool(h.bucket).retryLater(m, "452 4.2.2 Mailbox full", h.now() + 5 * MINUTE, true, h.now());
    const others: string[] = [];
    for (let i = 0; i < 5; i++) {
      h.advance(1000);
      const text = `Subject: behind ${i}\r\n\r\nx\r\n`;
      others.push((await new EdgeSpool(h.bucket).hold(text, { from: SENDER, to: USER, size: text.length, reason: "host down", noAnswer: false }, h.now()))!);
    }
    h.sent.length = 0;
    h.advance(MINUTE);
    const run = await h.drain();
    expect(run).toMatchObject({ delivered: 5, retried: 0, complete: true });
    expect(h.sent.map((s) => s.id)).toEqual(others);
    // Nothing is due before the first backoff ends: the cron runs until then are one HEAD each.
    h.bucket.resetCounts();
    h.advance(MINUTE);
    expect(await h.drain()).toMatchObject({ state: "idle" });
    expect(h.bucket.calls).toEqual(["head held"]);
  });

  test("a listing cut at a page's end leaves out the message whose .retry record may be on the next page: its backoff is never lost", async () => {
    const h = harness(100);
    await h.ready;
    // The 100th message was tried: the first page (100 keys) ends with it, its record starts the next.
    const last = (await new EdgeSpool(h.bucket).held(2)).messages[99]!;
    await new EdgeSpool(h.bucket).retryLater(last, "452 4.2.2 Mailbox full", h.now() + HOUR, true, h.now());
    const one = await new EdgeSpool(h.bucket).held(1);
    expect(one.complete).toBe(false);
    expect(one.messages.map((m) => m.id)).toEqual(h.ids.slice(0, 99));
    const two = await new EdgeSpool(h.bucket).held(2);
    expect(two.complete).toBe(true);
    expect(two.messages[99]).toMatchObject({ id: last.id, attempts: 1, specific: true });
  });

  test("a run that knows the host is up stops at a failure without the host's answer; a tunnel error leaves the message no backoff of its own, a timeout does", async () => {
    const h = harness(3);
    await h.ready;
    const [first, second] = h.ids;
    h.answer((m) => (m.id === first ? { outcome: "temporary", reply: "host answered 502: HTTP 502" } : CONFIRMED));
    expect(await h.drain("live")).toMatchObject({ retried: 1, delivered: 0, stopped: "host" });
    expect((await h.held()).find((m) => m.id === first)).toMatchObject({ attempts: 1, specific: false });
    // The next run offers it again at once (the host is back: no wait of its own).
    h.answer((m) => (m.id === first ? CONFIRMED : { outcome: "temporary", reply: "host unreachable: no answer within 20000 ms", noAnswer: true }));
    h.advance(MINUTE);
    expect(await h.drain("live")).toMatchObject({ delivered: 1, retried: 1, stopped: "host" });
    expect((await h.held()).find((m) => m.id === second)).toMatchObject({ attempts: 1, specific: true });
    // Too slow while the host confirmed others: it waits its backoff; the third goes.
    h.answer(() => CONFIRMED);
    h.advance(MINUTE);
    expect(await h.drain("live")).toMatchObject({ delivered: 1, remaining: 1 });
    expect(await h.marker()).toMatchObject({ probe: false, due: h.now() - MINUTE + 5 * MINUTE });
  });

  test("each step costs what it is budgeted at (COST), counted where the calls are made", async () => {
    const h = harness(3);
    await h.ready;
    const budget = new Budget(1000);
    h.answer((m) => (m.id === h.ids[0] ? CONFIRMED : m.id === h.ids[1] ? { outcome: "permanent", reply: "422 refused" } : { outcome: "temporary", reply: "451 later", hostAnswered: true }));
    h.bucket.resetCounts();
    await h.drain("live", {}, budget);
    const calls = h.bucket.calls;
    // start: the marker's HEAD, the lock's HEAD and put; one page; then per message.
    expect(calls.slice(0, 4)).toEqual(["head held", "head drain.lock", "put drain.lock", "list queue/"]);
    const fetches = h.fetches();
    expect(budget.used).toBe(calls.length + fetches);
    expect(calls.length + fetches).toBe(COST.start + COST.page + COST.delivery /* delivered */ + (2 + COST.giveUp) /* refused */ + COST.delivery /* retried */ + COST.end);
  });

  test("bounded: one run stays within its budget of subrequests; without a next run, the rest wait with the marker set", async () => {
    const h = harness(30);
    await h.ready;
    h.answer(() => CONFIRMED);
    h.bucket.resetCounts();
    const budget = new Budget(50);
    const first = await h.drain("cron", {}, budget);
    expect(h.bucket.calls.length + h.fetches()).toBe(budget.used);
    expect(budget.used).toBeLessThanOrEqual(50);
    expect(first.delivered).toBeGreaterThan(10);
    expect(first).toMatchObject({ remaining: 30 - first.delivered, stopped: "budget", chained: false });
    expect(await h.marker()).toMatchObject({ empty: false, due: 0 });
    let runs = 1;
    while ((await h.held()).length && runs < 10) {
      h.advance(MINUTE);
      await h.drain();
      runs++;
    }
    expect(runs).toBe(3);
    expect(h.sent).toHaveLength(30);
    expect(new Set(h.sent.map((s) => s.id)).size).toBe(30);
  });

  test("with a next run: a drain cut short by its budget hands its lock on, each run within its own budget, until all is delivered", async () => {
    const h = harness(100);
    await h.ready;
    h.answer(() => CONFIRMED);
    const runs: { link: number; used: number }[] = [];
    const next = async (lock: string, link: number): Promise<boolean> => {
      const budget = new Budget(50);
      void h.drain("chain", { lock, link, next }, budget).then((s) => runs.push({ link: s.link, used: budget.used }));
      return true;
    };
    const budget = new Budget(50);
    const first = await h.drain("cron", { next }, budget);
    expect(first).toMatchObject({ chained: true, stopped: "budget" });
    for (let i = 0; i < 200 && (await h.held()).length; i++) await Bun.sleep(1);
    expect(await h.held()).toEqual([]);
    expect(h.sent).toHaveLength(100);
    expect(new Set(h.sent.map((s) => s.id)).size).toBe(100);
    expect(runs.length).toBeGreaterThanOrEqual(6);
    expect(Math.max(budget.used, ...runs.map((r) => r.used))).toBeLessThanOrEqual(50);
    expect(await h.marker()).toMatchObject({ empty: true });
    expect(h.bucket.keys()).toEqual(["held"]); // the lock released by the last run
  });

  test("the next run cannot be started (SELF answers 500, or throws): the run stays within its budget, leaves the lock to its lease, and the cron after it goes on", async () => {
    for (const self of ["500", "throws"] as const) {
      const h = harness(10);
      await h.ready;
      // Two confirmed, then refusals: the run ends on the budget with a give-up just before it.
      let confirmations = 0;
      h.answer((m) => (m.kind === "notice" || ++confirmations <= 2 ? CONFIRMED : { outcome: "permanent", reply: "422 550 5.1.1 User unknown" }));
      let calls = 0;
      const next = async (): Promise<boolean> => {
        calls++;
        if (self === "throws") throw new Error("internal error; reference = 0123");
        return false;
      };
      h.bucket.resetCounts();
      const budget = new Budget(21);
      expect(await h.drain("live", { next }, budget)).toMatchObject({ delivered: 2, failed: 1, stopped: "budget", chained: false });
      expect(calls).toBe(1);
      expect({ self, used: h.bucket.calls.length + h.fetches() + calls }).toEqual({ self, used: budget.used });
      expect({ self, used: budget.used }).toEqual({ self, used: 21 });
      // The callee may hold the lock now (an error says nothing of it): never deleted under it.
      expect(h.bucket.calls.filter((c) => c.startsWith("delete drain.lock"))).toEqual([]);
      const marker = await h.marker();
      expect(marker).toMatchObject({ empty: false });
      expect(marker!.due).toBeLessThanOrEqual(h.now());
      expect((await h.drain()).state).toBe("busy");
      h.advance(LOCK_LEASE_MS);
      h.answer(() => CONFIRMED);
      while ((await h.drain()).remaining > 0) h.advance(MINUTE);
      expect(await h.held()).toEqual([]);
    }
  });

  test("a chain stops when the host stops confirming: the rest wait for the cron's probe", async () => {
    const h = harness(60);
    await h.ready;
    let confirmations = 0;
    h.answer(() => (++confirmations <= 20 ? CONFIRMED : { outcome: "temporary", reply: "host answered 502: origin unreachable" }));
    let chained = 0;
    const next = async (lock: string, link: number): Promise<boolean> => {
      chained++;
      void h.drain("chain", { lock, link, next });
      return true;
    };
    await h.drain("cron", { next });
    for (let i = 0; i < 100; i++) await Bun.sleep(1);
    expect(h.sent).toHaveLength(21);
    expect(chained).toBe(1);
    expect((await h.held()).length).toBe(40);
    // The next cron run probes with one message.
    h.advance(MINUTE);
    expect(await h.drain("cron", { next })).toMatchObject({ retried: 1, delivered: 0, stopped: "host" });
    expect(h.sent).toHaveLength(22);
  });

  test("an idle run costs one HEAD (class B) and nothing else", async () => {
    const h = harness(0);
    await h.ready;
    h.bucket.resetCounts();
    expect(await h.drain()).toMatchObject({ state: "idle" });
    expect(h.bucket.calls).toEqual(["head held"]);
  });

  test("a message held while a drain runs keeps the marker: the drain's write is conditional, and the next run delivers it", async () => {
    const h = harness(1);
    await h.ready;
    h.answer(() => CONFIRMED);
    // The hold lands between the drain's listing and its end.
    const realList = h.bucket.list.bind(h.bucket);
    h.bucket.list = async (o) => {
      const res = await realList(o);
      await new EdgeSpool(h.bucket).hold("Subject: late\r\n\r\nx\r\n", { from: SENDER, to: USER, size: 20, reason: "late", noAnswer: false }, h.now());
      h.bucket.list = realList;
      return res;
    };
    expect(await h.drain()).toMatchObject({ delivered: 1, remaining: 0 });
    expect(await h.marker()).toMatchObject({ empty: false });
    expect(await h.drain()).toMatchObject({ delivered: 1 });
    expect(await h.marker()).toMatchObject({ empty: true });
  });

  test("failed/ keeps a message 30 days", async () => {
    const h = harness(1);
    await h.ready;
    h.answer(() => ({ outcome: "permanent", reply: "422 refused" }));
    await h.drain();
    const spool = new EdgeSpool(h.bucket);
    expect(await spool.sweepFailed(Date.UTC(2026, 0, 1) + 29 * DAY)).toBe(0);
    expect(await spool.sweepFailed(Date.UTC(2026, 0, 1) + 31 * DAY)).toBe(1);
    expect(h.bucket.keys("failed/")).toEqual([]);
  });
});

test("a drain gives a message the time its run has left, not HOST_TIMEOUT_MS: a message too slow for the SMTP session still arrives", async () => {
  const slowHost = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      await req.arrayBuffer();
      await Bun.sleep(1_500);
      return Response.json({ status: "success", message: "delivered, slowly", recipients: [{ address: USER, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Saved" }] });
    },
  });
  try {
    const bucket = new MemoryR2();
    const e = { ...env(bucket, "real", { HOST_TIMEOUT_MS: "1000", ALLOWED_RECIPIENTS: USER }), DELL_API_ENDPOINT: `http://127.0.0.1:${slowHost.port}/api/v1/inbound-mail` };
    const raw = rfc822("slow");
    expect(await run(incoming(raw), e)).toBeNull();
    expect(workerLines.at(-1)).toMatchObject({ outcome: "held" });
    expect(String(workerLines.at(-1)!.reason)).toContain("no answer within 1000 ms");
    // Past the grace for a message held without an answer (as if 30 s had gone by).
    const [key] = heldKeys(bucket);
    const meta = JSON.parse(bucket.objects.get(key!)!.meta.customMetadata!.m!);
    bucket.objects.get(key!)!.meta.customMetadata = { m: JSON.stringify({ ...meta, received: meta.received - NO_ANSWER_GRACE_MS }) };
    await new EdgeSpool(bucket).markHeld(0);

    expect(await runDrain(workerConfig(e), "cron", { log: () => {} })).toMatchObject({ delivered: 1, remaining: 0 });
    expect(heldKeys(bucket)).toEqual([]);
  } finally {
    await slowHost.stop(true);
  }
});

// --- the Worker's drain as Cloudflare runs it: email() and scheduled() --------------------------

describe("the drain through email() and scheduled()", () => {
  const minute = (n: number) => Date.UTC(2026, 0, 1, 12, n, 7);
  const holdVia = async (bucket: MemoryR2, n: number, to = USER) => {
    for (let i = 0; i < n; i++) expect(await run(incoming(rfc822(`held ${i}`), to), env(bucket, "stub", { ALLOWED_RECIPIENTS: `${USER}, ${to}` }))).toBeNull();
  };
  const subjects = () => fake.received.map((r) => /Subject: ([^\r]*)/.exec(Buffer.from(r.data).toString("latin1"))![1]);

  test("a cron run cut off while it sends strands nothing: the cron runs after it deliver every message, once", async () => {
    const bucket = new MemoryR2();
    await holdVia(bucket, 3);
    try {
      setSystemTime(minute(1));
      // Killed as it reads the first message to send it: nothing after that runs, no finally.
      bucket.freezeWhen = (call) => call.startsWith("get queue/");
      void scheduled({ scheduledTime: minute(1) }, env(bucket, "real"));
      await until("the cron run to list queue/", () => bucket.calls.some((c) => c.startsWith("list queue/")));
      await Bun.sleep(20);
      bucket.thaw();
      for (let m = 2; m <= 3; m++) {
        setSystemTime(minute(m));
        await scheduled({ scheduledTime: minute(m) }, env(bucket, "real"));
      }
      expect(heldKeys(bucket)).toEqual([]);
      expect(subjects().sort()).toEqual(["held 0", "held 1", "held 2"]);
    } finally {
      setSystemTime();
    }
  });

  test("one held message the host keeps deferring (a full mailbox): 20 healthy messages write nothing to R2 and never resend it", async () => {
    const bucket = new MemoryR2();
    const FULL = "full@kuma8088.com";
    fake.behaviour.rcpt = (a) => (a === FULL ? 450 : 250);
    const e = env(bucket, "real", { ALLOWED_RECIPIENTS: `${USER}, ${FULL}` });
    expect(await run(incoming(rfc822("for a full mailbox"), FULL), e)).toBeNull();
    expect(workerLines.at(-1)).toMatchObject({ outcome: "held", status: 503 });
    expect(await run(incoming(rfc822("the first healthy one")), e)).toBeNull(); // its drain offers the held one: 450 again
    const offered = () => workerLines.filter((l) => l.event === "edge_retry" && l.to === FULL).length;
    expect(offered()).toBe(1);
    bucket.resetCounts();
    for (let i = 0; i < 20; i++) expect(await run(incoming(rfc822(`healthy ${i}`)), e)).toBeNull();
    expect(fake.received.filter((r) => r.to.includes(USER))).toHaveLength(21);
    expect(offered()).toBe(1);
    expect(bucket.ops.A).toBe(0);
    expect(bucket.ops.B).toBeLessThanOrEqual(2);
  });

  test("a long non-ASCII sender and a long refusal: failed/ and one notice, nothing thrown, nothing repeated", async () => {
    const bucket = new MemoryR2();
    const from = `${"送信者".repeat(21)}@${"例え".repeat(30)}.jp`; // 123 characters outside ASCII
    const msg = incoming(rfc822("long sender"));
    (msg as { from: string }).from = from;
    expect(await run(msg, env(bucket, "stub", { ALLOWED_RECIPIENTS: USER }))).toBeNull();
    stubAnswer = () => Response.json({ status: "rejected", error: "lmtp_rejected", message: `550 5.1.1 ${"このユーザーは存在しません。".repeat(40)}` }, { status: 422 });
    await scheduled({ scheduledTime: minute(1) }, env(bucket, "stub"));
    expect(bucket.keys("failed/")).toHaveLength(1);
    expect(workerLines.filter((l) => l.event === "edge_spool_error")).toEqual([]);
    // The notice goes through the host, once.
    for (let m = 2; m <= 4; m++) await scheduled({ scheduledTime: minute(m) }, env(bucket, "real"));
    expect(fake.received.map((r) => r.to)).toEqual([[POSTMASTER]]);
    expect(bucket.keys("queue/")).toEqual([]);
    expect(stubRequests).toBe(2); // the live attempt and the refusal
  });

  test("a cron run at the full hour with expired messages, 40 refusals and a long failed/ listing stays within 50 subrequests", async () => {
    const bucket = new MemoryR2();
    const spool = new EdgeSpool(bucket);
    const old = Date.UTC(2025, 0, 1);
    for (let i = 0; i < 1000; i++) {
      const meta = { from: SENDER, to: USER, size: 10, received: old, since: old, reason: "x", kind: "mail", noAnswer: false, attempts: 1, next: 0, lastReply: "422", failed: old, why: "refused" };
      await bucket.put(`failed/20250101T000000000Z-${i.toString(16).padStart(8, "0")}`, "0123456789", { customMetadata: { m: JSON.stringify(meta) } });
    }
    for (let i = 0; i < 43; i++) {
      const text = `Subject: ${i}\r\n\r\nx\r\n`;
      // The first three are past the maximum age (5 days): given up without an attempt.
      await spool.hold(text, { from: SENDER, to: USER, size: text.length, reason: "host down", noAnswer: false }, i < 3 ? Date.now() - 6 * DAY : Date.now());
    }
    stubAnswer = () => Response.json({ status: "rejected", error: "lmtp_rejected", message: "550 5.1.1 User unknown" }, { status: 422 });
    bucket.resetCounts();
    await scheduled({ scheduledTime: Date.UTC(2026, 0, 1, 12, 0) }, env(bucket, "stub"));
    expect(bucket.calls.length + stubRequests).toBeLessThanOrEqual(50);
    expect(stubRequests).toBeGreaterThan(0);
  });

  /** The Worker's binding to itself, as wrangler.toml declares it (SELF): its own fetch(). */
  const withSelf = (e: Record<string, unknown>) => {
    e.SELF = { fetch: (input: string, init?: RequestInit) => worker.fetch(new Request(input, init), e) };
    return e;
  };

  test("200 held, one cron run: every message delivered once, each run within 50 subrequests, chained through SELF", async () => {
    const bucket = new MemoryR2();
    await holdVia(bucket, 200);
    const from = workerLines.length;
    await scheduled({ scheduledTime: minute(1) }, withSelf(env(bucket, "real")));
    expect(heldKeys(bucket)).toEqual([]);
    expect(new Set(subjects()).size).toBe(200);
    expect(fake.received).toHaveLength(200);
    const runs = workerLines.slice(from).filter((l) => l.event === "edge_drain");
    expect(runs.length).toBeGreaterThan(10);
    expect(runs.length).toBeLessThanOrEqual(MAX_LINKS + 1);
    expect(Math.max(...runs.map((r) => r.subrequests as number))).toBeLessThanOrEqual(50);
    expect(new Set(runs.map((r) => r.link)).size).toBe(runs.length);
  });

  test("200 held, one live success: every message delivered once", async () => {
    const bucket = new MemoryR2();
    await holdVia(bucket, 200);
    expect(await run(incoming(rfc822("live")), withSelf(env(bucket, "real")))).toBeNull();
    expect(heldKeys(bucket)).toEqual([]);
    expect(new Set(subjects()).size).toBe(201);
    expect(fake.received).toHaveLength(201);
  });

  test("the host going away in the middle stops the chain; the rest wait for the cron's probe", async () => {
    const bucket = new MemoryR2();
    await holdVia(bucket, 60);
    // A tunnel that passes 20 requests to the host, then answers as cloudflared does with the origin down.
    let passed = 0;
    const tunnel = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      async fetch(req) {
        const body = await req.arrayBuffer();
        if (++passed > 20) return new Response("origin unreachable", { status: 502 });
        return fetch(`${server.url}/api/v1/inbound-mail`, { method: "POST", headers: req.headers, body });
      },
    });
    try {
      const e = withSelf({ ...env(bucket, "real"), DELL_API_ENDPOINT: `http://127.0.0.1:${tunnel.port}/api/v1/inbound-mail` });
      await scheduled({ scheduledTime: minute(1) }, e);
      expect(fake.received).toHaveLength(20);
      expect(passed).toBe(21);
      expect(heldKeys(bucket)).toHaveLength(40);
      await scheduled({ scheduledTime: minute(2) }, e);
      expect(passed).toBe(22); // one probe
    } finally {
      await tunnel.stop(true);
    }
  });

  test("two triggers at once make one drain", async () => {
    const bucket = new MemoryR2();
    await holdVia(bucket, 30);
    const from = workerLines.length;
    const e = withSelf(env(bucket, "real"));
    await Promise.all([scheduled({ scheduledTime: minute(1) }, e), scheduled({ scheduledTime: minute(1) }, e), run(incoming(rfc822("live")), e)]);
    expect(heldKeys(bucket)).toEqual([]);
    expect(fake.received).toHaveLength(31);
    expect(new Set(subjects()).size).toBe(31);
    const starts = workerLines.slice(from).filter((l) => l.event === "edge_drain" && l.link === 0);
    expect(starts.filter((l) => l.state === "ran")).toHaveLength(1);
  });
});

describe("POST /edge/known and `bun run edge-queue learn`: the host's mailboxes known at cutover", () => {
  const serve = (e: Record<string, unknown>) => Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => worker.fetch(req, e) });
  const learn = async (url: string, args: string[], stdin = "") => {
    const out: string[] = [];
    const err = spyOn(console, "error").mockImplementation(() => {});
    try {
      const code = await edgeQueue(["learn", ...args], { EDGE_URL: url, API_KEY: KEY }, (l) => void out.push(l), async () => stdin);
      return { code, out: out.join("\n"), err: err.mock.calls.map((c) => c.join(" ")).join("\n") };
    } finally {
      err.mockRestore();
    }
  };

  test("from stdin (doveadm user '*'), in batches the Worker's budget allows; then mail for them is held while the host is away", async () => {
    const bucket = new MemoryR2();
    const e = env(bucket, "stub", { EDGE_SPOOL_SUBREQUESTS: "20" }); // at most 18 per request
    const worker = serve(e);
    try {
      const mailboxes = Array.from({ length: 30 }, (_, i) => `box${i}@kuma8088.com`);
      const r = await learn(`http://127.0.0.1:${worker.port}`, ["-"], `${mailboxes.slice(0, 10).join("\n")}\n\n${mailboxes.slice(10).join("  ")}\nBOX0@KUMA8088.COM\n`);
      expect(r).toMatchObject({ code: 0 });
      expect(r.out).toContain("30 addresses are known at the edge");
      expect(bucket.keys("known/")).toEqual(mailboxes.map((m) => `known/${m}`).sort());
      expect(workerLines.filter((l) => l.event === "edge_known_recorded").map((l) => l.count)).toEqual([18, 12]);

      const msg = incoming(rfc822("for a mailbox learned at cutover"), "box7@kuma8088.com");
      expect(await run(msg, e)).toBeNull();
      expect(workerLines.at(-1)).toMatchObject({ outcome: "held", to: "box7@kuma8088.com" });
    } finally {
      await worker.stop(true);
    }
  });

  test("one bad address: nothing is recorded, and the answer names it; the route refuses a request without the key, a bad body and too many at once", async () => {
    const bucket = new MemoryR2();
    const e = env(bucket, "stub");
    const worker = serve(e);
    const url = `http://127.0.0.1:${worker.port}`;
    try {
      const r = await learn(url, ["good@kuma8088.com", "dovecot-user-without-domain"]);
      expect(r.code).toBe(1);
      expect(r.err).toContain('"dovecot-user-without-domain" is not of the form local@domain');
      expect(r.err).toContain("nothing was recorded");
      expect(bucket.keys("known/")).toEqual([]);
      expect((await learn(url, [])).code).toBe(2);

      const post = (body: unknown, key = KEY) => fetch(`${url}/edge/known`, { method: "POST", headers: { "x-api-key": key, "content-type": "application/json" }, body: JSON.stringify(body) });
      expect((await post({ addresses: ["a@kuma8088.com"] }, "not-the-key")).status).toBe(401);
      const bad = await post({ addresses: ["a@kuma8088.com", "b@x\r\nRCPT TO:<c@y>"] });
      expect(bad.status).toBe(400);
      expect(((await bad.json()) as { message: string }).message).toContain("forbidden character");
      expect((await post({ addresses: [] })).status).toBe(400);
      expect((await post({ list: ["a@kuma8088.com"] })).status).toBe(400);
      const many = await post({ addresses: Array.from({ length: 49 }, (_, i) => `m${i}@kuma8088.com`) });
      expect(many.status).toBe(413);
      expect(await many.json()).toMatchObject({ max_per_request: 48 });
      expect(bucket.keys("known/")).toEqual([]);
    } finally {
      await worker.stop(true);
    }
  });
});

describe("the notice reads the header block only", () => {
  test("decoded From, Subject, Date and the Message-ID from the header; nothing from the body", async () => {
    const raw = new TextEncoder().encode(
      "From: =?UTF-8?B?5bGx55Sw?= <yamada@example.jp>\r\nSubject: =?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=\r\nDate: Sat, 01 Mar 2025 12:00:00 +0900\r\nMessage-ID: <abc@example.jp>\r\n\r\nFrom: body@evil.example\r\nSubject: from the body\r\n",
    );
    expect(new TextDecoder().decode(headerBlock(raw))).not.toContain("body@evil");
    expect(await summarizeHeaders(raw)).toEqual({ messageId: "<abc@example.jp>", from: "山田 <yamada@example.jp>", subject: "日本語", date: "2025-03-01T03:00:00.000Z" });
  });

  test("a long non-ASCII Subject and RFC 2047 garbage: the notice's header lines stay within 78 characters, its encoded words within 75 (RFC 2047), and it reads back as written", async () => {
    const subject = "日本語の件名".repeat(40);
    const raw = new TextEncoder().encode(
      `Subject: =?UTF-8?B?!!!?= =?x-unknown?Q?odd?= =?UTF-8?B?${Buffer.from(subject).toString("base64")}?=\r\nMessage-ID: <${"m".repeat(2000)}@example.jp>\r\nFrom: =?UTF-8?Q?a=0D=0Ab?= <x@example.jp>\r\n\r\nbody\r\n`,
    );
    const h = await summarizeHeaders(raw);
    const failed = { id: "20260101T000000000Z-0a1b2c3d", from: SENDER, to: USER, size: raw.length, received: 0, since: 0, reason: "", kind: "mail", noAnswer: false, attempts: 1, next: 0, specific: false, lastReply: "422", failed: 0, why: "refused" } as const;
    const text = noticeMessage(failed, h, POSTMASTER, Date.UTC(2026, 0, 1));
    const head = text.slice(0, text.indexOf("\r\n\r\n"));
    for (const line of head.split("\r\n")) expect({ line, length: line.length <= 78 }).toEqual({ line, length: true });
    for (const word of head.match(/=\?[^?]*\?[BQ]\?[^?]*\?=/g) ?? []) expect(word.length).toBeLessThanOrEqual(75);
    const parsed = await PostalMime.parse(text);
    expect(parsed.subject).toBe(`Undelivered mail held at the edge: ${h.subject}`.slice(0, 200));
    expect(parsed.subject!.length).toBe(200);
  });

  test("a decoded CR LF cannot add a line to the notice", async () => {
    const raw = new TextEncoder().encode(`Subject: =?UTF-8?B?${btoa("a\r\nBcc: x@evil.example")}?=\r\n\r\nbody\r\n`);
    const h = await summarizeHeaders(raw);
    expect(h.subject).not.toMatch(/[\r\n]/);
  });
});

test("scheduled() without the bucket does nothing; with it, one cron run drains", async () => {
  await scheduled({ scheduledTime: Date.now() }, { API_KEY: KEY, DELL_API_ENDPOINT: `${server.url}/api/v1/inbound-mail` });
  const bucket = new MemoryR2();
  await run(incoming(rfc822("learn")), env(bucket, "real"));
  const raw = rfc822("held then drained by the cron");
  expect(await run(incoming(raw), env(bucket, "stub"))).toBeNull();
  fake.reset();
  await scheduled({ scheduledTime: Date.UTC(2026, 0, 1, 12, 1) }, env(bucket, "real"));
  expect(fake.received.map((r) => Buffer.from(r.data).equals(Buffer.from(raw)))).toEqual([true]);
});
