// The Worker in the real Workers runtime: wrangler dev runs worker.ts in local workerd, its
// email() streams to the real host (startServer), which delivers to a private real Dovecot.
// POST /cdn-cgi/handler/email calls email(); what wrangler 4.86 answers (see scripts/wrangler-dev.ts):
//   accepted  -> 200 "Worker successfully processed email"
//   bounced   -> 400 "Worker rejected email with the following reason: <r>", and the output line
//                Email handler rejected message with the following reason: "<r>"
//   thrown    -> 500 with the exception's message (the sender would retry)
// Nothing here is optional: without Dovecot or wrangler/workerd, beforeAll throws and every test
// fails (locally and in CI alike), never a skip.
// These Workers run without the EDGE_SPOOL bucket: what they show is the Worker as it behaves
// without it (tests/integration/edge-spool.test.ts runs it with the bucket).

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { LogLine } from "../../shared/log.ts";
import { startWranglerDev, type WranglerDev } from "../../scripts/wrangler-dev.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";

allowSlowTests();

const INBOUND = "/api/v1/inbound-mail";
const USER = "user@kuma8088.com";
const KEY = `wd_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const WRONG_KEY = `wdwrong_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
/** The host's limit; below wrangler's own local limit of 1 MiB so that a 413 can be shown. */
const HOST_LIMIT = 256 * 1024;
const ACCEPTED = "Worker successfully processed email";
const REJECTED = "Email handler rejected message with the following reason:";
const repo = join(import.meta.dir, "..", "..");

let dv: DovecotInstance;
let server: RunningServer;
let worker: WranglerDev;
/** The same Worker with a key the host does not know. */
let wrongKeyWorker: WranglerDev;
const hostLines: LogLine[] = [];
/** The reasons of every bounce this file expects, in order (checked against wrangler's output at the end). */
const expectedRejections: string[] = [];

function startHost(port: number): RunningServer {
  return startServer(
    { apiKeys: [KEY], lmtpHost: dv.host, lmtpPort: dv.port, port, host: "127.0.0.1", maxMessageBytes: HOST_LIMIT },
    { log: (l) => void hostLines.push(l) },
  );
}

beforeAll(async () => {
  dv = await startDovecot(); // throws when Dovecot is missing: a failure, never a skip
  server = startHost(0);
  const vars = { DELL_API_ENDPOINT: `${server.url}${INBOUND}`, HOST_TIMEOUT_MS: "5000" };
  // Throws when wrangler or workerd cannot start.
  [worker, wrongKeyWorker] = await Promise.all([
    startWranglerDev({ vars: { ...vars, API_KEY: KEY }, edgeSpool: false }),
    startWranglerDev({ vars: { ...vars, API_KEY: WRONG_KEY }, edgeSpool: false }),
  ]);
}, 90_000);

afterAll(async () => {
  await Promise.all([worker?.stop(), wrongKeyWorker?.stop()]);
  await server?.stop();
  await dv?.dispose();
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  await dv.clear();
}, HOOK_TIMEOUT_MS);

// --- helpers --------------------------------------------------------------------------------

function bytes(...parts: (string | number[])[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p, "latin1") : Buffer.from(p)))));
}

/** A message whose From header matches the envelope sender (wrangler warns otherwise). */
function rfc822(from: string, to: string, subject: string, body: (string | number[])[], extra: string[] = []): Uint8Array {
  const head = [`From: <${from || "mailer-daemon@example.org"}>`, `To: <${to}>`, `Subject: ${subject}`, `Message-ID: <${crypto.randomUUID()}@example.org>`, `Date: Sat, 01 Mar 2025 12:00:00 +0900`, ...extra];
  return bytes(head.join("\r\n"), "\r\n\r\n", ...body);
}

/** A sender address unique to one call, so its log lines can be told apart. */
const uniqueSender = (label: string) => `${label}-${crypto.randomUUID().slice(0, 8)}@example.org`;

async function waitFor(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

interface Sent {
  status: number;
  text: string;
  /** The Worker's own JSON log line for this message. */
  log: LogLine;
  /** wrangler's output from the request until the Worker's log line (and the reject line, if any). */
  output: string;
  /** The host's access log lines for this message (matched by request id). */
  host: LogLine[];
}

/** Hands a message to email() through wrangler dev, the way Email Routing would. */
async function send(w: WranglerDev, from: string, to: string, raw: Uint8Array): Promise<Sent> {
  const start = w.output().length;
  const res = await fetch(`${w.url}/cdn-cgi/handler/email?${new URLSearchParams({ from: from || "<>", to })}`, { method: "POST", body: Buffer.from(raw) });
  const text = await res.text();
  const since = () => w.output().slice(start);
  const mine = () =>
    since()
      .split("\n")
      .filter((l) => l.startsWith("{") && l.includes(`"from":${JSON.stringify(from || "<>")}`))
      .map((l) => JSON.parse(l) as LogLine);
  await waitFor(`the Worker's log line (HTTP ${res.status}: ${text.slice(0, 200)})`, () => mine().length > 0);
  if (res.status === 400) await waitFor("wrangler's rejection line", () => since().includes(REJECTED));
  if (res.status === 500) await waitFor("wrangler's error line", () => since().includes("temporary failure"));
  const log = mine()[0]!;
  return { status: res.status, text, log, output: since(), host: hostLines.filter((l) => l.request_id === log.request_id) };
}

async function storedAnywhere(): Promise<number> {
  let n = 0;
  for (const u of dv.users) n += (await dv.messages(u)).length;
  return n;
}

// --- the tests ------------------------------------------------------------------------------

describe("email() in workerd -> host -> Dovecot", () => {
  test("a Shift_JIS message (8bit) is stored byte for byte, streamed with its Content-Length", async () => {
    // "日本語のメール本文です。" and "半角ｶﾀｶﾅ" in Shift_JIS: bytes that are not UTF-8, including 0x5C
    // (backslash) as a second byte, and lines that start with a dot.
    const sjis1 = [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea, 0x82, 0xcc, 0x83, 0x81, 0x81, 0x5b, 0x83, 0x8b, 0x96, 0x7b, 0x95, 0xb6, 0x82, 0xc5, 0x82, 0xb7, 0x81, 0x42];
    const sjis2 = [0x94, 0xbc, 0x8a, 0x70, 0xb6, 0xc0, 0xb6, 0xc5, 0x83, 0x5c];
    const from = uniqueSender("sjis");
    const raw = rfc822(from, USER, "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=", [sjis1, "\r\n", sjis2, "\r\n.dot line\r\n..two dots\r\n"], [
      "MIME-Version: 1.0",
      "Content-Type: text/plain; charset=Shift_JIS",
      "Content-Transfer-Encoding: 8bit",
    ]);
    const r = await send(worker, from, USER, raw);
    expect(r.status).toBe(200);
    expect(r.text).toBe(ACCEPTED);
    expect(r.log).toMatchObject({ outcome: "accept", status: 200, to: USER, size: raw.length });

    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    const prepended = expectStoredAs(stored[0]!, raw);
    expect(prepended.find((f) => f.name === "Return-Path")?.value).toBe(`<${from}>`);

    // One request id from the edge to the host's log; the body arrived with its length known
    // (FixedLengthStream), so the host could check the size before reading it.
    expect(r.host).toHaveLength(1);
    expect(r.host[0]).toMatchObject({ status: 200, size: raw.length, body: "message/rfc822", from, to: [USER] });
  });

  test("a bounce (null sender) is stored with Return-Path: <>", async () => {
    const raw = rfc822("", USER, "Delivery Status Notification", ["bounce body\r\n"]);
    const r = await send(worker, "", USER, raw);
    expect(r.status).toBe(200);
    expect(r.host[0]).toMatchObject({ status: 200, from: "" });
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expect(expectStoredAs(stored[0]!, raw).find((f) => f.name === "Return-Path")?.value).toBe("<>");
  });

  test("a UTF-8 envelope sender reaches the host as sent: workerd's fetch writes the header as UTF-8", async () => {
    const from = `jürgen-${crypto.randomUUID().slice(0, 8)}@example.org`;
    const r = await send(worker, from, USER, rfc822(from, USER, "utf-8 sender", ["hello\r\n"]));
    expect(r.host).toHaveLength(1);
    // Not "jÃ¼rgen" (Latin-1) and not refused as an envelope the host cannot read.
    expect(r.host[0]!.from).toBe(from);
    expect(r.host[0]!.error).not.toBe("invalid_envelope");
    // What Dovecot makes of a UTF-8 sender is the LMTP client's business (SMTPUTF8); whether it
    // bounced, the reason is counted with the others.
    if (r.status === 400) expectedRejections.push(r.text.slice("Worker rejected email with the following reason: ".length));
  });

  test("an unknown user is bounced with Dovecot's own 550 5.1.1 reason; nothing is stored", async () => {
    const from = uniqueSender("unknown");
    const to = "nosuchuser@kuma8088.com";
    const r = await send(worker, from, to, rfc822(from, to, "unknown user", ["hello\r\n"]));
    expect(r.status).toBe(400); // not 500: email() did not throw
    expect(r.text).toStartWith("Worker rejected email with the following reason: 550 5.1.1 ");
    const reason = r.text.slice("Worker rejected email with the following reason: ".length);
    expect(reason).toContain(`<${to}>`);
    expect(reason).toContain("User doesn't exist"); // Dovecot's words, passed through
    expect(r.output).toContain(`${REJECTED} "${reason}"`);
    expect(r.output).not.toContain("Uncaught");
    expect(r.host[0]).toMatchObject({ status: 422 });
    expect(r.log).toMatchObject({ outcome: "reject", status: 422 });
    expect(await storedAnywhere()).toBe(0);
    expectedRejections.push(reason);
  });

  test("a message over the host's size limit bounces 552 (the host refuses it on Content-Length)", async () => {
    const from = uniqueSender("big");
    const raw = rfc822(from, USER, "too big", ["z".repeat(76) + "\r\n"].flatMap((l) => Array(Math.ceil(HOST_LIMIT / 78) + 100).fill(l)));
    expect(raw.length).toBeGreaterThan(HOST_LIMIT);
    const r = await send(worker, from, USER, raw);
    expect(r.status).toBe(400);
    expect(r.text).toMatch(/reason: 552 5\.3\.4 .*larger than 262144 bytes/);
    expect(r.host[0]).toMatchObject({ status: 413 });
    expect(await storedAnywhere()).toBe(0);
    expectedRejections.push(r.text.slice(r.text.indexOf("552 5.3.4")));
  });

  test("Dovecot stopped: email() throws (HTTP 500, no rejection); after dovecot.start() mail flows again", async () => {
    await dv.stop();
    try {
      const from = uniqueSender("lmtpdown");
      const r = await send(worker, from, USER, rfc822(from, USER, "dovecot down", ["hello\r\n"]));
      expect(r.status).toBe(500);
      expect(r.text).toContain("temporary failure");
      expect(r.text).not.toStartWith("Worker rejected");
      expect(r.output).not.toContain(REJECTED);
      expect(r.log).toMatchObject({ outcome: "retry", status: 503 });
      expect(r.host[0]).toMatchObject({ status: 503, error: "lmtp_unavailable" });
    } finally {
      await dv.start();
    }
    const from = uniqueSender("lmtpback");
    const raw = rfc822(from, USER, "dovecot back", ["hello again\r\n"]);
    expect((await send(worker, from, USER, raw)).status).toBe(200);
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
  });

  test("the host stopped: email() throws (HTTP 500, no rejection); a host on the same port takes over", async () => {
    const port = server.port;
    await server.stop();
    try {
      const from = uniqueSender("hostdown");
      const r = await send(worker, from, USER, rfc822(from, USER, "host down", ["hello\r\n"]));
      expect(r.status).toBe(500);
      expect(r.text).toContain("host unreachable");
      expect(r.output).not.toContain(REJECTED);
      expect(r.log).toMatchObject({ outcome: "retry", status: 503 });
      expect(r.host).toHaveLength(0);
    } finally {
      server = startHost(port);
    }
    expect(server.port).toBe(port);
    const from = uniqueSender("hostback");
    expect((await send(worker, from, USER, rfc822(from, USER, "host back", ["hello\r\n"]))).status).toBe(200);
    expect(await dv.messages(USER)).toHaveLength(1);
  });

  test("a Worker with the wrong key: email() throws (HTTP 500, no rejection), nothing stored", async () => {
    const from = uniqueSender("wrongkey");
    const r = await send(wrongKeyWorker, from, USER, rfc822(from, USER, "wrong key", ["hello\r\n"]));
    expect(r.status).toBe(500);
    expect(r.text).toContain("host answered 401");
    expect(r.output).not.toContain(REJECTED);
    expect(r.host[0]).toMatchObject({ status: 401 });
    expect(await storedAnywhere()).toBe(0);
  });

  test("over the whole run wrangler printed exactly the expected rejections, and never a key", () => {
    const all = worker.output() + wrongKeyWorker.output();
    const printed = [...all.matchAll(/Email handler rejected message with the following reason: "(.*)"$/gm)].map((m) => m[1]);
    expect(printed).toEqual(expectedRejections);
    expect(expectedRejections.length).toBeGreaterThanOrEqual(2);
    for (const secret of [KEY, WRONG_KEY]) {
      expect(all).not.toContain(secret.slice(0, 12));
      expect(JSON.stringify(hostLines)).not.toContain(secret.slice(0, 12));
    }
  });
});

test("wrangler deploy --dry-run bundles the Worker with nothing Bun- or Node-only in it", async () => {
  const out = mkdtempSync(join(tmpdir(), "relay-bundle-"));
  try {
    const proc = Bun.spawn([process.execPath, "x", "wrangler", "deploy", "--dry-run", "--outdir", out], {
      cwd: repo,
      env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "true", NO_COLOR: "1" },
      stdout: "pipe",
      stderr: "pipe",
    });
    const [code, stdout, stderr] = await Promise.all([proc.exited, new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    expect({ code, output: code === 0 ? "" : stdout + stderr }).toEqual({ code: 0, output: "" });
    expect(stdout).toContain("--dry-run: exiting now.");

    const bundle = join(out, "worker.js");
    const js = readFileSync(bundle, "utf8");
    expect(readdirSync(out)).toContain("worker.js");
    expect(js).not.toContain("Bun.");
    // Module specifiers, quoted ("node:fs"): postal-mime has an object key "node:" that is none.
    expect(js).not.toMatch(/["'`](node|bun|cloudflare):/);
    // The key is a secret, never bundled; the endpoint is a var from wrangler.toml.
    expect(js).not.toContain("API_KEY=");
    const size = statSync(bundle).size;
    const gzip = Bun.gzipSync(readFileSync(bundle)).length;
    // Workers' limit is 3 MiB compressed on the free plan; this is the number to watch.
    console.log(`worker bundle: ${bundle.split("/").pop()} ${(size / 1024).toFixed(1)} KiB, ${(gzip / 1024).toFixed(1)} KiB gzip (${stdout.match(/Total Upload: .*/)?.[0] ?? "?"})`);
    expect(gzip).toBeLessThan(3 * 1024 * 1024);
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}, 60_000);
