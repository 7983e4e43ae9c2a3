// The edge spool in the real Workers runtime: wrangler dev runs worker.ts in local workerd with its
// local R2 (persisted with --persist-to, so a restarted Worker finds what it held), in front of the
// real host (startServer, with its own spool and record of deliveries) and a private real Dovecot.
// The cron is triggered the way Cloudflare's is: GET /cdn-cgi/handler/scheduled. Between the
// Worker and the host sits a small HTTP relay that can hold the host's answer back (a slow tunnel).
// The tests run in order and share the Worker's bucket. Nothing is optional: without Dovecot or
// workerd, beforeAll throws and every test fails.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Server } from "bun";
import type { LogLine } from "../../shared/log.ts";
import { startWranglerDev, type WranglerDev } from "../../scripts/wrangler-dev.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const INBOUND = "/api/v1/inbound-mail";
const KEY = `es_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const OTHER_KEY = `esother_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const USER = "user@kuma8088.com"; // learned from a live delivery
const LISTED = "alice@example.test"; // an exact address in ALLOWED_RECIPIENTS
const GONE = "gone@example.test"; // listed, but Dovecot has no such user (deleted meanwhile)
const NEVER_SEEN = "newcomer@kuma8088.com"; // passes the domain filter, never delivered to
const POSTMASTER = USER;
const ACCEPTED = "Worker successfully processed email";
const HOST_TIMEOUT_MS = 2_000;
/** The relay's delay in slow mode: longer than HOST_TIMEOUT_MS. */
const SLOW_MS = 4_000;

let dv: DovecotInstance;
let host: RunningServer | null = null;
let hostPort = 0;
let hostKeys = [KEY];
const hostLines: LogLine[] = [];
let relay: Server<undefined>;
let slow = false;
/** When set, the relay answers every request with this redirect to `elsewhere` instead (a misconfigured Access application). */
let redirectWith: number | null = null;
/** When set, the relay passes this many more requests on, then answers 502 as cloudflared does with the origin down. */
let passesLeft: number | null = null;
let relayed = 0;
/** Another origin: a redirect's target, which must never see a request. */
let elsewhere: Server<undefined>;
const elsewhereRequests: { key: string | null }[] = [];
let worker: WranglerDev;
/** A second Worker with a maximum age of 10.8 s, for the give-up-on-age test. */
let shortAge: WranglerDev;
const stateDirs: string[] = [];
const tmp = (label: string) => {
  const d = mkdtempSync(join(tmpdir(), `relay-edge-${label}-`));
  stateDirs.push(d);
  return d;
};
const workerState = tmp("state");
const shortAgeState = tmp("short");
const hostSpool = tmp("hostspool");

function startHost(): void {
  host = startServer(
    { apiKeys: hostKeys, lmtpHost: dv.host, lmtpPort: dv.port, port: hostPort, host: "127.0.0.1", maxMessageBytes: 25 * 1024 * 1024, spoolDir: hostSpool, spoolMaxAgeMs: 3_600_000 },
    { log: (l) => void hostLines.push(l) },
  );
  hostPort = host.port;
}
async function stopHost(): Promise<void> {
  await host?.stop();
  host = null;
}

const vars = (extra: Record<string, string> = {}) => ({
  API_KEY: KEY,
  DELL_API_ENDPOINT: `http://127.0.0.1:${relay.port}${INBOUND}`,
  HOST_TIMEOUT_MS: String(HOST_TIMEOUT_MS),
  POSTMASTER,
  // A domain entry is a filter only; the exact entries make their addresses known.
  ALLOWED_RECIPIENTS: `kuma8088.com, ${LISTED}, ${GONE}`,
  ...extra,
});
const startWorker = () => startWranglerDev({ vars: vars(), persistTo: workerState });

beforeAll(async () => {
  dv = await startDovecot();
  startHost();
  // The tunnel between the Worker and the host: passes requests on; when slow, holds the answer back.
  relay = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 60,
    async fetch(req) {
      const url = new URL(req.url);
      const body = new Uint8Array(await req.arrayBuffer());
      relayed++;
      // The login page's address echoes the key the request carried: the Worker must not write it down.
      if (redirectWith !== null) return new Response(null, { status: redirectWith, headers: { location: `http://127.0.0.1:${elsewhere.port}/cdn-cgi/access/login?echo=${req.headers.get("x-api-key")}` } });
      if (passesLeft !== null && passesLeft-- <= 0) return new Response("origin unreachable", { status: 502 });
      let res: Response;
      try {
        res = await fetch(`http://127.0.0.1:${hostPort}${url.pathname}`, { method: req.method, headers: req.headers, body: body.length ? body : undefined });
      } catch {
        return new Response("origin unreachable", { status: 502 }); // what cloudflared answers
      }
      const text = await res.text();
      if (slow) await Bun.sleep(SLOW_MS);
      return new Response(text, { status: res.status, headers: res.headers });
    },
  });
  elsewhere = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      elsewhereRequests.push({ key: req.headers.get("x-api-key") });
      await req.arrayBuffer();
      return Response.json({ status: "success", message: "a login page" });
    },
  });
  [worker, shortAge] = await Promise.all([startWorker(), startWranglerDev({ vars: vars({ EDGE_SPOOL_MAX_AGE_HOURS: "0.003" }), persistTo: shortAgeState })]);
}, 120_000);

afterAll(async () => {
  await Promise.all([worker?.stop(), shortAge?.stop()]);
  await stopHost();
  await relay?.stop(true);
  await elsewhere?.stop(true);
  await dv?.dispose();
  for (const d of stateDirs) rmSync(d, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

// --- helpers --------------------------------------------------------------------------------

function bytes(...parts: (string | number[])[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p, "latin1") : Buffer.from(p)))));
}

// "日本語のメール本文です。" in Shift_JIS, with 0x5C as a second byte: not UTF-8, not 7-bit.
const SJIS = [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea, 0x82, 0xcc, 0x83, 0x81, 0x81, 0x5b, 0x83, 0x8b, 0x96, 0x7b, 0x95, 0xb6, 0x82, 0xc5, 0x82, 0xb7, 0x81, 0x42, 0x83, 0x5c];

function rfc822(from: string, to: string, subject: string, id = `<${crypto.randomUUID()}@example.org>`): Uint8Array {
  const head = [`From: Sender <${from}>`, `To: <${to}>`, `Subject: ${subject}`, `Message-ID: ${id}`, "Date: Sat, 01 Mar 2025 12:00:00 +0900", "MIME-Version: 1.0", "Content-Type: text/plain; charset=Shift_JIS", "Content-Transfer-Encoding: 8bit"];
  return bytes(head.join("\r\n"), "\r\n\r\n", SJIS, "\r\n.dot line\r\n", "Subject: not a header (the body)\r\n");
}

const uniqueSender = (label: string) => `${label}-${crypto.randomUUID().slice(0, 8)}@example.org`;

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(50);
  }
}

/** The Worker's JSON lines since `from` (an offset into its output). */
const lines = (w: WranglerDev, from = 0) => w.logLines(from);

interface Sent {
  status: number;
  text: string;
  log: LogLine;
}

async function send(w: WranglerDev, from: string, to: string, raw: Uint8Array): Promise<Sent> {
  const start = w.output().length;
  const res = await fetch(`${w.url}/cdn-cgi/handler/email?${new URLSearchParams({ from, to })}`, { method: "POST", body: Buffer.from(raw) });
  const text = await res.text();
  const mine = () => lines(w, start).filter((l) => l.from === from && l.outcome);
  await waitFor(`the Worker's log line (HTTP ${res.status}: ${text.slice(0, 200)})`, () => mine().length > 0);
  return { status: res.status, text, log: mine()[0]! };
}

/**
 * One cron run, as Cloudflare triggers it; its log lines. A run that found something to do ends
 * with an edge_drain line (waited for: the output arrives through wrangler); an idle one is silent.
 */
async function cron(w: WranglerDev, expected: "ran" | "idle" = "ran"): Promise<LogLine[]> {
  const start = w.output().length;
  const res = await fetch(`${w.url}/cdn-cgi/handler/scheduled`);
  expect(res.status).toBe(200);
  if (expected === "ran") await waitFor("the drain's summary line", () => lines(w, start).some((l) => l.event === "edge_drain"));
  else await Bun.sleep(500);
  const out = lines(w, start);
  expect(out.filter((l) => l.event === "edge_drain").length).toBe(expected === "ran" ? 1 : 0);
  return out;
}

interface Listing {
  held: number;
  oldest_held_age_seconds: number | null;
  failed: number;
  messages: { id: string; kind: string; from: string; to: string; size: number; age_seconds: number; attempts: number; last_reply: string }[];
  failed_messages: { id: string; kind: string; to: string; why: string; last_reply: string }[];
}

async function listing(w: WranglerDev): Promise<Listing> {
  const res = await fetch(`${w.url}/edge/queue`, { headers: { "X-API-Key": KEY } });
  expect(res.status).toBe(200);
  return (await res.json()) as Listing;
}

const requestsFor = (to: string) => hostLines.filter((l) => l.path === INBOUND && Array.isArray(l.to) && (l.to as string[]).includes(to));

// --- the tests ------------------------------------------------------------------------------

describe("the edge spool in workerd, with the real host and Dovecot", () => {
  test("host up: delivered live, byte for byte; an unknown user is still rejected in the session; nothing held", async () => {
    await dv.clear();
    const start = worker.output().length;
    const from = uniqueSender("live");
    const raw = rfc822(from, USER, "live");
    const r = await send(worker, from, USER, raw);
    expect(r).toMatchObject({ status: 200, text: ACCEPTED });
    expect(r.log).toMatchObject({ outcome: "accept", status: 200 });
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
    // The host's 2xx taught the edge that this address exists (one write, logged once).
    await waitFor("the recipient to be learned", () => lines(worker, start).some((l) => l.event === "edge_known" && l.to === USER));

    const unknownFrom = uniqueSender("unknown");
    const unknown = await send(worker, unknownFrom, "nosuchuser@kuma8088.com", rfc822(unknownFrom, "nosuchuser@kuma8088.com", "unknown"));
    expect(unknown.status).toBe(400);
    expect(unknown.text).toMatch(/reason: 550 5\.1\.1 .*User doesn't exist/);
    expect(unknown.log).toMatchObject({ outcome: "reject", status: 422 });
    expect((await listing(worker)).held).toBe(0);
  });

  const heldRaw: Record<string, Uint8Array> = {};

  test("host down: a learned recipient is held, a listed address is held, a never-seen address gets a temporary failure", async () => {
    await dv.clear();
    await stopHost();
    const fromA = uniqueSender("learned");
    heldRaw[USER] = rfc822(fromA, USER, "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?= held while the host is down");
    const a = await send(worker, fromA, USER, heldRaw[USER]);
    expect(a.status).toBe(200);
    expect(a.log).toMatchObject({ outcome: "held", status: 503 });
    expect(String(a.log.reason)).toContain("host answered 502"); // the tunnel's answer: the origin is down

    const fromB = uniqueSender("listed");
    heldRaw[LISTED] = rfc822(fromB, LISTED, "listed, held");
    const b = await send(worker, fromB, LISTED, heldRaw[LISTED]);
    expect(b.status).toBe(200);
    expect(b.log).toMatchObject({ outcome: "held" });

    const fromC = uniqueSender("never");
    const c = await send(worker, fromC, NEVER_SEEN, rfc822(fromC, NEVER_SEEN, "never seen"));
    expect(c.status).toBe(500); // thrown: the sender retries; not a bounce
    expect(c.text).toContain("temporary failure");
    expect(c.log).toMatchObject({ outcome: "retry", held: false, why_not_held: "recipient not known at the edge" });

    const l = await listing(worker);
    expect(l.held).toBe(2);
    expect(l.messages.map((m) => [m.from, m.to, m.size, m.attempts])).toEqual([
      [fromA, USER, heldRaw[USER].length, 0],
      [fromB, LISTED, heldRaw[LISTED].length, 0],
    ]);
    expect(l.oldest_held_age_seconds).toBeGreaterThanOrEqual(0);
    // While the host is down the cron tries one message (the probe), and that is all.
    const before = hostLines.length;
    const run = await cron(worker);
    expect(run.filter((x) => x.event === "edge_retry")).toHaveLength(1);
    expect(hostLines.length).toBe(before);
    expect((await listing(worker)).held).toBe(2);
  });

  test("the Worker restarts on the same R2 while it holds mail; the host returns; one cron run delivers each exactly once, byte for byte; a second adds nothing", async () => {
    await worker.stop();
    worker = await startWorker();
    expect((await listing(worker)).held).toBe(2);
    startHost();

    const run = await cron(worker);
    expect(run.filter((l) => l.event === "edge_delivered").map((l) => l.to).sort()).toEqual([LISTED, USER].sort());
    for (const to of [USER, LISTED]) {
      const stored = await dv.messages(to);
      expect(stored).toHaveLength(1);
      expectStoredAs(stored[0]!, heldRaw[to]!);
    }
    expect((await listing(worker)).held).toBe(0);

    const requests = hostLines.length;
    const again = await cron(worker, "idle");
    expect(again.filter((l) => l.event === "edge_delivered")).toHaveLength(0);
    expect(hostLines.length).toBe(requests);
    expect(await dv.messages(USER)).toHaveLength(1);
    expect(await dv.messages(LISTED)).toHaveLength(1);
  });

  test("a key mix-up on the host: held, never bounced; delivered once the keys agree", async () => {
    await dv.clear();
    await stopHost();
    hostKeys = [OTHER_KEY];
    startHost();
    try {
      const from = uniqueSender("keymixup");
      const raw = rfc822(from, USER, "key mix-up");
      const r = await send(worker, from, USER, raw);
      expect(r.status).toBe(200);
      expect(r.text).not.toContain("rejected");
      expect(r.log).toMatchObject({ outcome: "held" });
      expect(String(r.log.reason)).toContain("host answered 401");

      const run = await cron(worker);
      expect(run.find((l) => l.event === "edge_retry")).toMatchObject({ to: USER, attempts: 1 });
      expect(String(run.find((l) => l.event === "edge_retry")!.reply)).toContain("401");
      expect(await dv.messages(USER)).toHaveLength(0);
      const l = await listing(worker);
      expect(l.messages).toHaveLength(1);
      expect(l.messages[0]!.last_reply).toContain("401");

      // The fix: the host accepts the Worker's key (rotation: both keys). The next live delivery
      // succeeds, and the held message follows it at once (no cron needed).
      await stopHost();
      hostKeys = [OTHER_KEY, KEY];
      startHost();
      const start = worker.output().length;
      const nextFrom = uniqueSender("afterfix");
      const nextRaw = rfc822(nextFrom, USER, "after the fix");
      expect((await send(worker, nextFrom, USER, nextRaw)).log).toMatchObject({ outcome: "accept" });
      await waitFor("the held message to follow the live one", () => lines(worker, start).some((l) => l.event === "edge_delivered" && l.trigger === "live" && l.from === from));
      const stored = await dv.messages(USER);
      expect(stored).toHaveLength(2);
      for (const sent of [raw, nextRaw]) expect(stored.filter((m) => { try { expectStoredAs(m, sent); return true; } catch { return false; } })).toHaveLength(1);
      expect((await listing(worker)).held).toBe(0);
    } finally {
      hostKeys = [KEY];
      await stopHost();
      startHost();
    }
  });

  test("a host slower than HOST_TIMEOUT_MS: one copy in Dovecot in the end, never zero, never two", async () => {
    await dv.clear();
    slow = true;
    const from = uniqueSender("slow");
    const raw = rfc822(from, USER, "slow host");
    let r: Sent;
    try {
      r = await send(worker, from, USER, raw);
    } finally {
      slow = false;
    }
    // The Worker gave up waiting: it holds its copy (the host may have one already).
    expect(r.status).toBe(200);
    expect(r.log).toMatchObject({ outcome: "held" });
    expect(String(r.log.reason)).toContain(`no answer within ${HOST_TIMEOUT_MS} ms`);
    await waitFor("the host's own delivery", () => requestsFor(USER).some((l) => l.request_id === r.log.request_id && l.status === 200));
    expect(await dv.messages(USER)).toHaveLength(1);

    // At once: not offered again while the host's first attempt may still be under way.
    const early = await cron(worker);
    expect(early.filter((l) => l.event === "edge_delivered")).toHaveLength(0);
    expect((await listing(worker)).held).toBe(1);

    // After the grace period: offered again, answered "duplicate", and deleted.
    await Bun.sleep(30_500 - (Date.now() - Date.parse(String(r.log.time))));
    const late = await cron(worker);
    const done = late.find((l) => l.event === "edge_delivered");
    expect(done).toMatchObject({ to: USER });
    expect(String(done!.reply)).toContain("already delivered");
    expect((await listing(worker)).held).toBe(0);
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
  }, 90_000);

  let refusedId = "";

  test("a permanent refusal on drain: failed/, exactly one notice to POSTMASTER, no retries after", async () => {
    await dv.clear();
    await stopHost();
    const from = uniqueSender("gone");
    const messageId = `<${crypto.randomUUID()}@example.org>`;
    const r = await send(worker, from, GONE, rfc822(from, GONE, "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?= for a deleted user", messageId));
    expect(r.log).toMatchObject({ outcome: "held" });
    startHost();

    const run = await cron(worker);
    const failed = run.find((l) => l.event === "edge_failed");
    expect(failed).toMatchObject({ to: GONE, why: "refused" });
    expect(String(failed!.reply)).toContain("5.1.1");
    refusedId = String(failed!.id);
    expect(requestsFor(GONE)).toHaveLength(1);

    // The notice is mail like any other: delivered through the host by the next run.
    const next = await cron(worker);
    expect(next.filter((l) => l.event === "edge_delivered" && l.to === POSTMASTER)).toHaveLength(1);
    for (let i = 0; i < 2; i++) await cron(worker, "idle");
    const notices = await dv.messages(POSTMASTER);
    expect(notices).toHaveLength(1);
    const text = new TextDecoder().decode(notices[0]!);
    expect(text).toContain("Subject: =?UTF-8?B?");
    expect(text).toContain(`envelope:    from <${from}> to <${GONE}>`);
    expect(text).toContain(`Message-ID:  ${messageId}`);
    expect(text).toContain(`From:        Sender <${from}>`);
    expect(text).toContain("Subject:     日本語 for a deleted user"); // decoded from ISO-2022-JP
    expect(text).toContain("Date:        2025-03-01T03:00:00.000Z");
    expect(text).toMatch(/host reply:  .*5\.1\.1/);
    expect(text).toContain(`bun run edge-queue retry ${refusedId}`);
    expect(text).not.toContain("not a header"); // the body is never read
    // No retries after: the host saw one request for it, and it waits in failed/.
    expect(requestsFor(GONE)).toHaveLength(1);
    const l = await listing(worker);
    expect(l.held).toBe(0);
    expect(l.failed_messages.map((f) => [f.id, f.to, f.why])).toEqual([[refusedId, GONE, "refused"]]);
  });

  test("past EDGE_SPOOL_MAX_AGE_HOURS and the host still away: failed/ with a notice", async () => {
    await dv.clear();
    await stopHost();
    const from = uniqueSender("old");
    const r = await send(shortAge, from, LISTED, rfc822(from, LISTED, "too old"));
    expect(r.log).toMatchObject({ outcome: "held" });
    await Bun.sleep(11_000); // 0.003 h
    // The host still away: the cron's probe fails, and only then is the message given up.
    const run = await cron(shortAge);
    expect(run.filter((l) => l.event === "edge_retry")).toHaveLength(0);
    expect(run.find((l) => l.event === "edge_failed")).toMatchObject({ to: LISTED, why: "expired" });
    expect(run.filter((l) => l.event === "edge_delivered" && l.to === LISTED)).toHaveLength(0);
    startHost();
    await cron(shortAge);
    expect(await dv.messages(LISTED)).toHaveLength(0);
    const notices = await dv.messages(POSTMASTER);
    expect(notices).toHaveLength(1);
    expect(new TextDecoder().decode(notices[0]!)).toContain("within the maximum age");
    const l = await listing(shortAge);
    expect(l.held).toBe(0);
    expect(l.failed_messages.map((f) => [f.to, f.why])).toEqual([[LISTED, "expired"]]);
  }, 60_000);

  test("the listing, flush and retry endpoints refuse without the key and work with it", async () => {
    const routes: [string, string][] = [
      ["GET", "/edge/queue"],
      ["GET", "/edge/metrics"],
      ["POST", "/edge/flush"],
      ["POST", `/edge/retry/${refusedId}`],
    ];
    for (const [method, path] of routes) {
      for (const headers of [{}, { "X-API-Key": OTHER_KEY }] as Record<string, string>[]) {
        const res = await fetch(`${shortAge.url}${path}`, { method, headers });
        expect({ path, status: res.status }).toEqual({ path, status: 401 });
      }
    }
    await dv.clear();
    const failedId = (await listing(shortAge)).failed_messages[0]!.id;
    // The operator's script: the same listing, from the shell.
    // Not spawnSync: the host and the relay run in this process and must keep answering.
    const cli = async (args: string[], key = KEY) => {
      const p = Bun.spawn([process.execPath, "run", "edge-queue", ...args], { cwd: join(import.meta.dir, "..", ".."), env: { ...process.env, EDGE_URL: shortAge.url, API_KEY: key }, stdout: "pipe", stderr: "pipe" });
      const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
      return { code, out, err };
    };
    const listed = await cli(["list"]);
    expect(listed.code).toBe(0);
    expect(listed.out).toContain("held: 0");
    expect(listed.out).toContain("failed: 1");
    expect(listed.out).toContain(`${failedId} `);
    expect(listed.out).toContain(`-> ${LISTED}`);
    expect((await cli(["retry"])).code).toBe(2);
    const refused = await cli(["list"], OTHER_KEY);
    expect(refused.code).toBe(1);
    expect(refused.err).toContain("HTTP 401");
    const metrics = await (await fetch(`${shortAge.url}/edge/metrics`, { headers: { "X-API-Key": KEY } })).text();
    expect(metrics).toContain("edge_spool_failed_messages 1");
    expect(metrics).toContain("edge_spool_messages 0");

    const missing = await fetch(`${shortAge.url}/edge/retry/20250101T000000000Z-00000000`, { method: "POST", headers: { "X-API-Key": KEY } });
    expect(missing.status).toBe(404);
    const retry = await cli(["retry", failedId]);
    expect(retry).toMatchObject({ code: 0 });
    expect(retry.out).toContain(`${failedId} is back in the edge queue`);
    expect((await listing(shortAge)).messages.map((m) => m.id)).toEqual([failedId]);

    const flush = await cli(["flush"]);
    expect(flush).toMatchObject({ code: 0 });
    expect(flush.out).toContain("delivered 1, retried 0, failed 0, still held 0");
    const again = await fetch(`${shortAge.url}/edge/flush`, { method: "POST", headers: { "X-API-Key": KEY } });
    expect(await again.json()).toMatchObject({ status: "ok", state: "ran", delivered: 0, remaining: 0 });
    expect(await dv.messages(LISTED)).toHaveLength(1);
    const l = await listing(shortAge);
    expect([l.held, l.failed]).toEqual([0, 0]);
  });
});

describe("the drain in workerd: a redirect, a Worker killed mid-drain, a backlog", () => {
  const subjectsOf = async (to: string) => (await dv.messages(to)).map((m) => /^Subject: (.*)$/m.exec(new TextDecoder("latin1").decode(m))?.[1]?.trim() ?? "").sort();

  /** `n` messages for USER held while the host is down (a few at a time); their subjects. */
  async function holdMany(w: WranglerDev, n: number, label: string): Promise<string[]> {
    // Known to the edge (as `bun run edge-queue learn` makes it), whichever test ran before.
    const known = await fetch(`${w.url}/edge/known`, { method: "POST", headers: { "X-API-Key": KEY, "content-type": "application/json" }, body: JSON.stringify({ addresses: [USER] }) });
    expect(await known.json()).toMatchObject({ status: "ok", recorded: 1 });
    const subjects = Array.from({ length: n }, (_, i) => `${label} ${String(i).padStart(3, "0")}`);
    for (let i = 0; i < n; i += 8) {
      await Promise.all(
        subjects.slice(i, i + 8).map(async (subject) => {
          const from = uniqueSender(label);
          const r = await send(w, from, USER, rfc822(from, USER, subject));
          expect(r.log).toMatchObject({ outcome: "held" });
        }),
      );
    }
    return subjects.sort();
  }

  /** An empty mailbox, then `n` messages held while the host is down; the host back up. */
  async function heldWhileHostDown(n: number, label: string): Promise<string[]> {
    await dv.clear();
    await stopHost();
    const subjects = await holdMany(worker, n, label);
    startHost();
    return subjects;
  }

  const triggerCron = async (w: WranglerDev) => expect((await fetch(`${w.url}/cdn-cgi/handler/scheduled`)).status).toBe(200);
  const drains = (w: WranglerDev, from: number) => lines(w, from).filter((l) => l.event === "edge_drain");

  test("a redirect from the endpoint (301, 302, 303, 307, 308) is never followed: the other origin sees no request, the key stays home (not even in the log when the Location echoes it), the mail waits", async () => {
    for (const status of [301, 302, 303, 307, 308]) {
      redirectWith = status;
      try {
        const from = uniqueSender(`redirect${status}`);
        const r = await send(worker, from, NEVER_SEEN, rfc822(from, NEVER_SEEN, `redirect ${status}`));
        expect(r.status).toBe(500); // thrown: the sender retries
        expect(r.log).toMatchObject({ outcome: "retry" });
        expect(String(r.log.message)).toContain(`host answered ${status}: a redirect to http://127.0.0.1:${elsewhere.port}/cdn-cgi/access/login?echo=[redacted], not followed`);
      } finally {
        redirectWith = null;
      }
    }
    expect(elsewhereRequests).toEqual([]);
    expect(worker.output()).not.toContain(KEY.slice(0, 8));
  });

  test("the Worker killed while a cron run delivers, restarted on the same R2: every held message arrives once, without a new hold, within a couple of minutes", async () => {
    const subjects = await heldWhileHostDown(3, "killed");
    slow = true; // the relay holds each answer back: the Worker dies while waiting for the first
    const before = hostLines.length;
    void fetch(`${worker.url}/cdn-cgi/handler/scheduled`).catch(() => {});
    await waitFor("the host to deliver the first held message", () => hostLines.slice(before).some((l) => l.path === INBOUND && l.status === 200));
    process.kill(-worker.pid, "SIGKILL");
    await worker.stop();
    slow = false;
    worker = await startWorker();
    // The cron every 5 s here (every minute in production), until everything has arrived.
    const restarted = Date.now();
    const start = worker.output().length;
    while ((await listing(worker)).held > 0) {
      if (Date.now() - restarted > 2 * 60_000) throw new Error(`still held 2 minutes after the restart: ${JSON.stringify(await listing(worker))}`);
      await triggerCron(worker);
      await Bun.sleep(5_000);
    }
    // The run cut off left its lock to expire (45 s); the first run after that delivered the rest.
    expect(drains(worker, start).filter((l) => l.state === "ran").length).toBeGreaterThanOrEqual(1);
    expect(await subjectsOf(USER)).toEqual(subjects);
    const repeated = lines(worker, start).filter((l) => l.event === "edge_delivered" && String(l.reply).includes("already delivered"));
    expect(repeated.length).toBeLessThanOrEqual(1); // the one the host had delivered when the Worker died
  }, 240_000);

  test("200 held, the host back, one cron run: all delivered within a minute, each once, by chained runs within 50 subrequests each", async () => {
    const subjects = await heldWhileHostDown(200, "backlog");
    const start = worker.output().length;
    const triggered = Date.now();
    await triggerCron(worker);
    await waitFor("all 200 in Dovecot", async () => (await dv.messages(USER)).length >= 200, 120_000);
    await waitFor("the last run's summary", () => drains(worker, start).some((l) => l.stopped === "done"));
    const delivered = lines(worker, start).filter((l) => l.event === "edge_delivered");
    expect(delivered).toHaveLength(200);
    expect(Math.max(...delivered.map((l) => Date.parse(String(l.time)))) - triggered).toBeLessThan(60_000);
    expect(await subjectsOf(USER)).toEqual(subjects);
    const runs = drains(worker, start);
    expect(runs[0]).toMatchObject({ trigger: "cron", link: 0, chained: true });
    expect(runs.slice(1).every((r) => r.trigger === "chain")).toBe(true);
    expect(runs.map((r) => r.link).sort((a, b) => Number(a) - Number(b))).toEqual(runs.map((_, i) => i));
    expect(Math.max(...runs.map((r) => Number(r.subrequests)))).toBeLessThanOrEqual(50);
    expect((await listing(worker)).held).toBe(0);
  }, 240_000);

  test("200 held, the host back, one live delivery: all follow it, each once", async () => {
    const subjects = await heldWhileHostDown(200, "afterlive");
    const from = uniqueSender("live");
    expect((await send(worker, from, USER, rfc822(from, USER, "afterlive live"))).log).toMatchObject({ outcome: "accept" });
    await waitFor("all 201 in Dovecot", async () => (await dv.messages(USER)).length >= 201, 120_000);
    expect(await subjectsOf(USER)).toEqual([...subjects, "afterlive live"].sort());
    expect((await listing(worker)).held).toBe(0);
  }, 240_000);

  test("the host going away in the middle stops the chain; the rest wait for the cron's probe, then follow", async () => {
    await heldWhileHostDown(40, "away");
    relayed = 0;
    passesLeft = 20;
    try {
      const start = worker.output().length;
      await triggerCron(worker);
      await waitFor("the run that met the 502", () => drains(worker, start).some((l) => l.stopped === "host"));
      await Bun.sleep(1_000);
      expect(relayed).toBe(21);
      expect(await dv.messages(USER)).toHaveLength(20);
      expect((await listing(worker)).held).toBe(20);
      // The next cron run offers one message (the probe), and that is all.
      const probeStart = worker.output().length;
      await triggerCron(worker);
      await waitFor("the probe's run", () => drains(worker, probeStart).length > 0);
      expect(relayed).toBe(22);
      // The host back: the next cron run delivers the rest.
      passesLeft = null;
      await triggerCron(worker);
      await waitFor("the other 20 in Dovecot", async () => (await dv.messages(USER)).length >= 40, 60_000);
      expect((await listing(worker)).held).toBe(0);
      expect(new Set(await subjectsOf(USER)).size).toBe(40);
    } finally {
      passesLeft = null;
    }
  }, 180_000);

  test("two cron runs and a live delivery at once make one drain; each message arrives once", async () => {
    const subjects = await heldWhileHostDown(30, "twice");
    const start = worker.output().length;
    const from = uniqueSender("twicelive");
    await Promise.all([triggerCron(worker), triggerCron(worker), send(worker, from, USER, rfc822(from, USER, "twice live"))]);
    await waitFor("all 31 in Dovecot", async () => (await dv.messages(USER)).length >= 31, 60_000);
    await Bun.sleep(1_000);
    expect(await subjectsOf(USER)).toEqual([...subjects, "twice live"].sort());
    const firstRuns = drains(worker, start).filter((l) => l.link === 0);
    expect(firstRuns.filter((l) => l.state === "ran")).toHaveLength(1);
    expect((await listing(worker)).held).toBe(0);
  }, 120_000);
});
