// The spam filter with every real part: Debian's rspamd (a private instance with its own dnsmasq,
// tests/support/rspamd.ts, loading the operator's examples/rspamd/local.d/milter_headers.conf), the
// host (startServer, with its spool and RSPAMD_URL), a private Dovecot running the operator's Junk
// filing (examples/dovecot/90-relay-junk.conf, Pigeonhole), and the Worker in local workerd (wrangler
// dev) with its edge spool. rspamd loads the operator's examples/rspamd/local.d/options.inc too. Between the Worker and the host sits a small relay that answers 502 while
// "the tunnel's origin is down", as cloudflared does. The tests run in order and share all of it.
//
// Messages carry Email Routing's trace field on top (wrangler dev adds none): the sending server
// 203.0.113.5, which the local DNS publishes as example.org's only SPF-permitted address, so
// rspamd's R_SPF_ALLOW shows that the address reached it, and only from that field.
// rspamd's actions other than reject are forced by the envelope sender (FORCED_ACTIONS_LUA).
// Nothing is optional: without rspamd, dnsmasq, Dovecot, Pigeonhole or workerd, beforeAll throws.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Resolver } from "node:dns/promises";
import type { Server } from "bun";
import type { LogLine } from "../../shared/log.ts";
import { startWranglerDev, type WranglerDev } from "../../scripts/wrangler-dev.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { dovecotStoredForm, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { startRspamd, type RspamdInstance } from "../support/rspamd.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const INBOUND = "/api/v1/inbound-mail";
const KEY = `sf_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const USER = "user@kuma8088.com";
const POSTMASTER = "alice@example.test";
const ACCEPTED = "Worker successfully processed email";
const REJECTED = "Worker rejected email with the following reason: ";
const GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const SENDING_IP = "203.0.113.5";
const MILTER_HEADERS = new URL("../../examples/rspamd/local.d/milter_headers.conf", import.meta.url);
const OPTIONS = new URL("../../examples/rspamd/local.d/options.inc", import.meta.url);

let rspamd: RspamdInstance;
let dv: DovecotInstance;
let host: RunningServer;
let spoolDir: string;
const hostLines: LogLine[] = [];
let relay: Server<undefined>;
/** The tunnel's origin is down: the relay answers 502, as cloudflared does. */
let originDown = false;
let worker: WranglerDev;

beforeAll(async () => {
  [rspamd, dv] = await Promise.all([
    startRspamd({
      // --host-record publishes the PTR too: the host finds the sending server's name, confirmed.
      dns: [`--txt-record=example.org,v=spf1 ip4:${SENDING_IP} -all`, "--mx-host=example.org,mail.example.org,10", `--host-record=mail.example.org,${SENDING_IP}`],
      files: { "local.d/milter_headers.conf": await readFile(MILTER_HEADERS, "utf8") },
      options: await readFile(OPTIONS, "utf8"),
    }),
    startDovecot({ junk: true }),
  ]);
  spoolDir = await mkdtemp(join(tmpdir(), "spam-filter-spool-"));
  host = startServer(
    { apiKeys: [KEY], lmtpHost: dv.host, lmtpPort: dv.port, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * 1024 * 1024, spoolDir, rspamd: { url: rspamd.url, timeoutMs: 10_000 } },
    { log: (l) => void hostLines.push(l), resolver: resolverOf(rspamd.dns) },
  );
  relay = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 60,
    async fetch(req) {
      const body = new Uint8Array(await req.arrayBuffer());
      if (originDown) return new Response("origin unreachable", { status: 502 });
      const res = await fetch(`${host.url}${new URL(req.url).pathname}`, { method: req.method, headers: req.headers, body: body.length ? body : undefined });
      return new Response(await res.text(), { status: res.status, headers: res.headers });
    },
  });
  worker = await startWranglerDev({
    vars: { API_KEY: KEY, DELL_API_ENDPOINT: `http://127.0.0.1:${relay.port}${INBOUND}`, HOST_TIMEOUT_MS: "20000", POSTMASTER, ALLOWED_RECIPIENTS: `kuma8088.com, ${USER}` },
  });
}, 180_000);

afterAll(async () => {
  await worker?.stop();
  await relay?.stop(true);
  await host?.stop();
  await Promise.all([rspamd?.dispose(), dv?.dispose()]);
  if (spoolDir) await rm(spoolDir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  await dv.clear();
}, HOOK_TIMEOUT_MS);

function resolverOf(server: string): Resolver {
  const r = new Resolver();
  r.setServers([server]);
  return r;
}

// --- helpers --------------------------------------------------------------------------------

function bytes(...parts: (string | number[])[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts.map((p) => (typeof p === "string" ? Buffer.from(p, "latin1") : Buffer.from(p)))));
}

/** Email Routing's own trace field, on top of what the sender wrote, as public captures show it. */
const cloudflareReceived = (ip = SENDING_IP, helo = "mail.example.org") =>
  `Received: from ${helo} (${ip})\r\n        by cloudflare-email.net (cloudflare) id Ab12Cd34Ef56\r\n        for <${USER}>; ${new Date().toUTCString().replace("GMT", "+0000")}\r\n`;

function rfc822(from: string, subject: string, body: (string | number[])[], opts: { top?: string; eol?: string } = {}): Uint8Array {
  const eol = opts.eol ?? "\r\n";
  const head = [`From: Sender <${from}>`, `To: <${USER}>`, `Subject: ${subject}`, `Message-ID: <${crypto.randomUUID()}@example.org>`, `Date: ${new Date().toUTCString().replace("GMT", "+0000")}`, "MIME-Version: 1.0", "Content-Type: text/plain; charset=Shift_JIS", "Content-Transfer-Encoding: 8bit"];
  return bytes(opts.top ?? cloudflareReceived(), head.join(eol), eol + eol, ...body);
}

// "日本語のメール本文です。" in Shift_JIS, 0x5C as a second byte: not UTF-8, not 7-bit.
const SJIS = [0x93, 0xfa, 0x96, 0x7b, 0x8c, 0xea, 0x82, 0xcc, 0x83, 0x81, 0x81, 0x5b, 0x83, 0x8b, 0x96, 0x7b, 0x95, 0xb6, 0x82, 0xc5, 0x82, 0xb7, 0x81, 0x42, 0x83, 0x5c];

const uniqueSender = (label: string, domain = "example.org") => `${label}-${crypto.randomUUID().slice(0, 8)}@${domain}`;

/** The Worker's JSON lines since `from` (an offset into its output). */
const lines = (w: WranglerDev, from = 0): LogLine[] => w.logLines(from);

interface Sent {
  status: number;
  text: string;
  log: LogLine;
  host: LogLine[];
}

/** Hands a message to email() through wrangler dev, the way Email Routing would. */
async function send(from: string, raw: Uint8Array): Promise<Sent> {
  const start = worker.output().length;
  const res = await fetch(`${worker.url}/cdn-cgi/handler/email?${new URLSearchParams({ from, to: USER })}`, { method: "POST", body: Buffer.from(raw) });
  const text = await res.text();
  const mine = () => lines(worker, start).filter((l) => l.from === from && l.outcome);
  await until(`the Worker's log line (HTTP ${res.status}: ${text.slice(0, 200)})`, () => mine().length > 0, 20_000, 50);
  const log = mine()[0]!;
  return { status: res.status, text, log, host: hostLines.filter((l) => l.request_id === log.request_id) };
}

async function listing(): Promise<{ held: number; failed: number }> {
  const res = await fetch(`${worker.url}/edge/queue`, { headers: { "X-API-Key": KEY } });
  expect(res.status).toBe(200);
  return (await res.json()) as { held: number; failed: number };
}

/**
 * A stored message: Dovecot's own fields, then the relay's verdict, then exactly `sent` (in
 * Dovecot's stored form: CRLF as LF). Returns the verdict block, unfolded into its fields.
 */
function verdictOf(stored: Uint8Array, sent: Uint8Array): Record<string, string> {
  const tail = dovecotStoredForm(sent);
  expect(stored.length).toBeGreaterThan(tail.length);
  expect(Buffer.from(stored.subarray(stored.length - tail.length)).equals(Buffer.from(tail))).toBe(true);
  const head = Buffer.from(stored.subarray(0, stored.length - tail.length)).toString("latin1");
  const at = head.search(/^X-Spam-Status: /m);
  expect(at).toBeGreaterThan(0);
  expect(head.slice(0, at)).toStartWith("Return-Path: ");
  const fields: Record<string, string> = {};
  for (const f of head.slice(at).split(/\n(?![ \t])/).filter(Boolean)) {
    const [name, ...value] = f.split(":");
    expect(["X-Spam-Status", "X-Spamd-Result", "X-Spam", "Authentication-Results"]).toContain(name!);
    fields[name!] = value.join(":").replace(/\n[ \t]+/g, " ").trim();
  }
  return fields;
}

// --- the tests ------------------------------------------------------------------------------

describe("live, through the Worker in workerd", () => {
  test("a plain 8-bit message (Shift_JIS, NUL, bare LF, dot lines): in INBOX once, the verdict on top, the rest byte for byte; rspamd had the sending server", async () => {
    const from = uniqueSender("plain");
    const raw = rfc822(from, "=?ISO-2022-JP?B?GyRCRnxLXDhsGyhC?=", [SJIS, "\r\n", [0x00], " NUL above\r\nbare LF\n.dot line\r\n..two dots\r\n"]);
    const r = await send(from, raw);
    expect(r).toMatchObject({ status: 200, text: ACCEPTED });
    const inbox = await dv.messages(USER);
    expect(inbox).toHaveLength(1);
    expect(await dv.messages(USER, "Junk")).toHaveLength(0);
    const v = verdictOf(inbox[0]!, raw);
    expect(v["X-Spam-Status"]).toMatch(/^No, score=-?\d+\.\d\d required=15\.00 action="no action"$/);
    expect(v["X-Spamd-Result"]).toContain("R_SPF_ALLOW(");
    // The host found the sending server's name (PTR, forward-confirmed) and gave it to rspamd.
    expect(v["X-Spamd-Result"]).not.toContain("HFILTER_HOSTNAME_UNKNOWN");
    expect(v["X-Spam"]).toBeUndefined();
    // rspamd's own field (the operator's milter_headers.conf): SPF passed for the address given.
    expect(v["Authentication-Results"]).toContain(`spf=pass`);
    expect(v["Authentication-Results"]).toContain(`smtp.mailfrom=${from}`);
    expect(r.host).toHaveLength(1);
    expect(r.host[0]).toMatchObject({ status: 200 });
  });

  test("GTUBE: refused in the SMTP session (setReject, 5.7.1, naming the filter); nothing stored, nothing held", async () => {
    const from = uniqueSender("gtube");
    const r = await send(from, rfc822(from, "gtube", [GTUBE, "\r\n"]));
    expect(r.status).toBe(400);
    expect(r.text).toStartWith(`${REJECTED}550 5.7.1 Message refused as spam by the spam filter (rspamd, score 15.00 of 15.00): Gtube pattern`);
    expect(r.log).toMatchObject({ outcome: "reject", status: 422 });
    expect(r.host[0]).toMatchObject({ status: 422, error: "spam_rejected" });
    expect(await dv.messages(USER)).toHaveLength(0);
    expect((await listing()).held).toBe(0);
  });

  for (const [label, local] of [
    ["soft reject", "force-soft-reject"],
    ["greylisted", "force-greylisted"],
  ] as const) {
    test(`${label}: the Worker throws (the sender retries) and holds nothing, although the recipient is known`, async () => {
      const from = uniqueSender(local).replace(/^[^@]*/, local);
      const start = worker.output().length;
      const res = await fetch(`${worker.url}/cdn-cgi/handler/email?${new URLSearchParams({ from, to: USER })}`, { method: "POST", body: Buffer.from(rfc822(from, label, ["hello\r\n"])) });
      const text = await res.text();
      expect(res.status).toBe(500);
      expect(text).toContain("451 4.7.1 Try again later");
      expect(text).not.toStartWith(REJECTED);
      await until("the Worker's log line", () => lines(worker, start).some((l) => l.from === from && l.outcome));
      expect(lines(worker, start).find((l) => l.from === from && l.outcome)).toMatchObject({ outcome: "retry", status: 429 });
      expect((await listing()).held).toBe(0);
      expect(await dv.messages(USER)).toHaveLength(0);
    });
  }

  test("greylist as a score band only (no greylisting memory without Redis): delivered, not deferred for ever", async () => {
    const from = uniqueSender("x").replace(/^[^@]*/, "force-greylist-band");
    const raw = rfc822(from, "band", ["hello\r\n"]);
    expect((await send(from, raw)).status).toBe(200);
    const inbox = await dv.messages(USER);
    expect(inbox).toHaveLength(1);
    expect(verdictOf(inbox[0]!, raw)["X-Spam-Status"]).toContain('action="greylist"');
  });

  test("GTUBE held at the edge while the host was away, then drained: delivered once, in Junk, with X-Spam: Yes; no notice", async () => {
    originDown = true;
    const from = uniqueSender("held-gtube");
    const raw = rfc822(from, "held gtube", [GTUBE, "\r\n"]);
    let r: Sent;
    try {
      r = await send(from, raw);
    } finally {
      originDown = false;
    }
    expect(r.status).toBe(200);
    expect(r.log).toMatchObject({ outcome: "held", status: 503 });
    expect((await listing()).held).toBe(1);

    const start = worker.output().length;
    const cron = await fetch(`${worker.url}/cdn-cgi/handler/scheduled`);
    expect(cron.status).toBe(200);
    await until("the drain's summary line", () => lines(worker, start).some((l) => l.event === "edge_drain"), 20_000, 50);
    const run = lines(worker, start);
    expect(run.filter((l) => l.event === "edge_delivered").map((l) => l.from)).toEqual([from]);
    expect(run.filter((l) => l.event === "edge_notice" || l.event === "edge_failed")).toEqual([]);
    expect(await listing()).toMatchObject({ held: 0, failed: 0 });

    expect(await dv.messages(USER)).toHaveLength(0);
    const junk = await dv.messages(USER, "Junk");
    expect(junk).toHaveLength(1);
    const v = verdictOf(junk[0]!, raw);
    expect(v["X-Spam"]).toBe("Yes");
    expect(v["X-Spam-Status"]).toStartWith('Yes, score=15.00 required=15.00 action="reject"');
    expect(v["X-Spamd-Result"]).toContain("GTUBE(");
    // The drain said so, and the host listened.
    const drained = hostLines.filter((l) => l.path === INBOUND && l.from === from);
    expect(drained.map((l) => [l.status, l.already_accepted])).toEqual([[200, true]]);
    // Nobody was told anything: no notice to the postmaster.
    expect(await dv.messages(POSTMASTER)).toHaveLength(0);
  });

  test("rspamd stopped: delivered unscanned (X-Spam-Status: Unknown), nothing lost; rspamd back: scanned again", async () => {
    await rspamd.stop();
    const from = uniqueSender("rspamd-down");
    const raw = rfc822(from, "rspamd down", ["hello\r\n"]);
    try {
      const r = await send(from, raw);
      expect(r.status).toBe(200);
    } finally {
      await rspamd.start();
    }
    const inbox = await dv.messages(USER);
    expect(inbox).toHaveLength(1);
    expect(verdictOf(inbox[0]!, raw)["X-Spam-Status"]).toStartWith("Unknown, not scanned (rspamd: ");
    expect(hostLines.some((l) => l.event === "spam_unscanned")).toBe(true);

    const after = uniqueSender("rspamd-back");
    const again = rfc822(after, "rspamd back", ["hello\r\n"]);
    expect((await send(after, again)).status).toBe(200);
    const both = await dv.messages(USER);
    expect(both).toHaveLength(2);
    expect(verdictOf(both[1]!, again)["X-Spam-Status"]).toStartWith("No, score=");
  });
});

describe("straight to the host", () => {
  async function post(raw: Uint8Array | string, contentType = "message/rfc822", from = uniqueSender("direct")) {
    const res = await fetch(`${host.url}${INBOUND}`, {
      method: "POST",
      headers: { "Content-Type": contentType, "X-API-Key": KEY, "X-Envelope-From": from, "X-Envelope-To": USER },
      body: typeof raw === "string" ? raw : Buffer.from(raw),
    });
    return { status: res.status, body: (await res.json()) as Record<string, unknown> };
  }

  test("only Cloudflare's topmost Received counts: a copy of it lower down, written by the sender, gives rspamd nothing, and neither does another server's on top (ignore_received)", async () => {
    const forgedLower = `Received: from mx.other.example (mx.other.example [198.51.100.7]) by mx.example.net (Postfix)\r\n${cloudflareReceived()}`;
    const raw = rfc822("someone@example.org", "forged", ["hello\r\n"], { top: forgedLower });
    expect((await post(raw, "message/rfc822", "someone@example.org")).status).toBe(200);
    const v = verdictOf((await dv.messages(USER))[0]!, raw);
    // No address reached rspamd: no SPF verdict, neither for the forged copy's address nor for the
    // top field's (without ignore_received rspamd reads that one itself: R_SPF_FAIL for 198.51.100.7).
    expect(v["X-Spamd-Result"]).not.toMatch(/R_SPF_(ALLOW|FAIL|SOFTFAIL)/);
    expect(v["X-Spamd-Result"]).not.toContain(SENDING_IP);
    expect(v["X-Spamd-Result"]).toContain("HFILTER_HOSTNAME_UNKNOWN");
  });

  test("the runbook's JSON route is scanned too: GTUBE refused 422, a plain message delivered with its verdict", async () => {
    const gtube = await post(JSON.stringify({ from: "json@example.org", to: USER, subject: "gtube", raw: `Subject: gtube\r\n\r\n${GTUBE}\r\n` }), "application/json");
    expect(gtube.status).toBe(422);
    expect(gtube.body.error).toBe("spam_rejected");
    const raw = rfc822("json@example.org", "json", ["hello\r\n"]);
    const ok = await post(JSON.stringify({ from: "json@example.org", to: USER, raw_base64: Buffer.from(raw).toString("base64") }), "application/json");
    expect(ok.status).toBe(200);
    const inbox = await dv.messages(USER);
    expect(inbox).toHaveLength(1);
    expect(verdictOf(inbox[0]!, raw)["X-Spamd-Result"]).toContain("R_SPF_ALLOW(");
  });

  test("a message with bare LF line ends gets LF fields: Dovecot stores it as one, the rest unchanged", async () => {
    const raw = rfc822("lf@example.org", "bare LF", ["one\n", ".two\n"], { top: cloudflareReceived().replaceAll("\r\n", "\n"), eol: "\n" });
    expect((await post(raw, "message/rfc822", "lf@example.org")).status).toBe(200);
    const stored = (await dv.messages(USER))[0]!;
    expect(Buffer.from(stored).includes(Buffer.from("\r"))).toBe(false);
    expect(verdictOf(stored, raw)["X-Spam-Status"]).toStartWith("No, score=");
  });

  test("/metrics counts the scans by outcome", async () => {
    const text = await (await fetch(`${host.url}/metrics`, { headers: { "X-API-Key": KEY } })).text();
    expect(text).toMatch(/^relay_spam_scans_total\{outcome="reject"\} [1-9]/m);
    expect(text).toMatch(/^relay_spam_scans_total\{outcome="failed"\} [1-9]/m);
    expect(text).toMatch(/^relay_spam_scan_seconds_count [1-9]/m);
  });
});

describe("Dovecot's learning scripts (IMAPSieve, examples/dovecot/91-relay-learn.conf)", () => {
  test("compile with the plugins that configuration loads, and not without them", async () => {
    const dir = await mkdtemp(join(tmpdir(), "relay-learn-"));
    try {
      const conf = (plugins: string) =>
        `base_dir = ${dir}/run\nstate_dir = ${dir}/state\nlog_path = ${dir}/log\nprotocols =\nssl = no\nplugin {\n  sieve_plugins = ${plugins}\n  sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment\n  sieve_pipe_bin_dir = ${dir}\n}\n`;
      const learn = await readFile(new URL("../../examples/dovecot/91-relay-learn.conf", import.meta.url), "utf8");
      // The test's configuration is the example's plugin lines.
      expect(learn).toContain("sieve_plugins = sieve_imapsieve sieve_extprograms");
      expect(learn).toContain("sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment");
      await writeFile(join(dir, "with.conf"), conf("sieve_imapsieve sieve_extprograms"));
      await writeFile(join(dir, "without.conf"), conf(""));
      for (const name of ["report-spam.sieve", "report-ham.sieve"]) {
        const script = join(dir, name);
        await writeFile(script, await readFile(new URL(`../../examples/dovecot/${name}`, import.meta.url)));
        const ok = Bun.spawnSync(["sievec", "-c", join(dir, "with.conf"), script], { stdout: "pipe", stderr: "pipe" });
        expect({ name, code: ok.exitCode, err: ok.stderr.toString() }).toEqual({ name, code: 0, err: "" });
        const bad = Bun.spawnSync(["sievec", "-c", join(dir, "without.conf"), script], { stdout: "pipe", stderr: "pipe" });
        expect(bad.exitCode).not.toBe(0);
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
