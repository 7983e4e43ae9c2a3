// The closed door in the real Workers runtime: wrangler dev runs worker.ts in local workerd, with
// the edge spool, in front of the real host (startServer) with ACCESS_TEAM_DOMAIN and ACCESS_AUD
// set, and a private real Dovecot. Between them a small server plays Cloudflare Access on the
// tunnel's hostname: it lets a request through only with the service token, and adds the JWT it
// signs with a key published by a local JWKS server (the host's ACCESS_CERTS_URL). A second Worker
// reaches a host through a HOST service binding standing in for Workers VPC (no public hostname,
// no Access on that path). wrangler's output is kept for the whole run: the secret never appears.
// Nothing is optional: without Dovecot or workerd, beforeAll throws and every test fails.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Server } from "bun";
import type { LogLine } from "../../shared/log.ts";
import { startWranglerDev, type WranglerDev } from "../../scripts/wrangler-dev.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { claims, mint, signingKey, startJwksServer, type JwksServer, type SigningKey } from "../support/access.ts";
import { expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const INBOUND = "/api/v1/inbound-mail";
const KEY = `ac_${Buffer.from(crypto.getRandomValues(new Uint8Array(24))).toString("hex")}`;
const CLIENT_ID = `${Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("hex")}.access`;
const CLIENT_SECRET = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex");
const TEAM = "relay-test.cloudflareaccess.com";
const AUD = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex");
const USER = "user@kuma8088.com";
const ACCEPTED = "Worker successfully processed email";

let dv: DovecotInstance;
let jwks: JwksServer;
let signer: SigningKey;
/** The host behind Access (checks the JWT), and the one the VPC path reaches (no Access there). */
let closedHost: RunningServer;
let vpcHost: RunningServer;
const hostLines: LogLine[] = [];
const vpcHostLines: LogLine[] = [];
/** Cloudflare Access in front of the tunnel, as this test plays it. */
let access: Server<undefined>;
/** Every request Access saw: the service token's two headers as they came. */
let accessSaw: { path: string; id: string | null; secret: string | null }[] = [];
/** Set: Access refuses every request (a revoked service token, a policy mix-up). */
let accessRefuses = false;
let worker: WranglerDev;
let vpcWorker: WranglerDev;
const dir = mkdtempSync(join(tmpdir(), "relay-access-"));

beforeAll(async () => {
  [dv, signer] = await Promise.all([startDovecot(), signingKey()]);
  jwks = startJwksServer([signer]);
  const base = { apiKeys: [KEY], lmtpHost: dv.host, lmtpPort: dv.port, port: 0, host: "127.0.0.1", maxMessageBytes: 25 * 1024 * 1024 };
  closedHost = startServer({ ...base, access: { issuer: `https://${TEAM}`, audiences: [AUD], certsUrl: jwks.url } }, { log: (l) => void hostLines.push(l) });
  vpcHost = startServer(base, { log: (l) => void vpcHostLines.push(l) });

  access = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    idleTimeout: 60,
    async fetch(req) {
      const url = new URL(req.url);
      const id = req.headers.get("cf-access-client-id");
      const secret = req.headers.get("cf-access-client-secret");
      accessSaw.push({ path: url.pathname, id, secret });
      if (accessRefuses || id !== CLIENT_ID || secret !== CLIENT_SECRET) return new Response("Forbidden", { status: 403 });
      // Through: the origin gets Access's JWT, not the service token.
      const headers = new Headers(req.headers);
      headers.delete("cf-access-client-id");
      headers.delete("cf-access-client-secret");
      headers.set("cf-access-jwt-assertion", await mint(signer, claims(TEAM, AUD, { common_name: CLIENT_ID })));
      const body = new Uint8Array(await req.arrayBuffer());
      const res = await fetch(`${closedHost.url}${url.pathname}${url.search}`, { method: req.method, headers, body: body.length ? body : undefined });
      return new Response(await res.text(), { status: res.status, headers: res.headers });
    },
  });

  const standIn = join(dir, "vpc-stand-in.toml");
  writeFileSync(
    standIn,
    [
      'name = "vpc-stand-in"',
      `main = ${JSON.stringify(join(import.meta.dir, "..", "support", "vpc-stand-in.ts"))}`,
      'compatibility_date = "2026-04-01"',
      "[vars]",
      `ORIGIN = ${JSON.stringify(vpcHost.url)}`,
    ].join("\n"),
  );
  const vars = { API_KEY: KEY, HOST_TIMEOUT_MS: "5000", POSTMASTER: USER, ALLOWED_RECIPIENTS: `kuma8088.com, ${USER}` };
  [worker, vpcWorker] = await Promise.all([
    startWranglerDev({ vars: { ...vars, DELL_API_ENDPOINT: `http://127.0.0.1:${access.port}${INBOUND}`, CF_ACCESS_CLIENT_ID: CLIENT_ID, CF_ACCESS_CLIENT_SECRET: CLIENT_SECRET } }),
    startWranglerDev({
      // A host name nothing resolves: only the binding can reach the host.
      vars: { ...vars, DELL_API_ENDPOINT: `http://mailserver-api:8080${INBOUND}` },
      edgeSpool: false,
      extraToml: '[[services]]\nbinding = "HOST"\nservice = "vpc-stand-in"',
      alsoRun: [standIn],
    }),
  ]);
}, 120_000);

afterAll(async () => {
  await Promise.all([worker?.stop(), vpcWorker?.stop()]);
  await Promise.all([closedHost?.stop(), vpcHost?.stop()]);
  await access?.stop(true);
  await jwks?.stop();
  await dv?.dispose();
  rmSync(dir, { recursive: true, force: true });
}, HOOK_TIMEOUT_MS);

// --- helpers --------------------------------------------------------------------------------

function rfc822(from: string, subject: string): Uint8Array {
  const head = [`From: <${from}>`, `To: <${USER}>`, `Subject: ${subject}`, `Message-ID: <${crypto.randomUUID()}@example.org>`, "Date: Sat, 01 Mar 2025 12:00:00 +0900"];
  return new Uint8Array(Buffer.concat([Buffer.from(`${head.join("\r\n")}\r\n\r\n`), Buffer.from([0x93, 0xfa, 0x96, 0x7b]), Buffer.from("\r\n.dot line\r\n")]));
}

const uniqueSender = (label: string) => `${label}-${crypto.randomUUID().slice(0, 8)}@example.org`;

/** The Worker's JSON lines since `from` (an offset into its output). */
const lines = (w: WranglerDev, from = 0) => w.logLines(from);

async function send(w: WranglerDev, from: string, raw: Uint8Array): Promise<{ status: number; text: string; log: LogLine }> {
  const start = w.output().length;
  const res = await fetch(`${w.url}/cdn-cgi/handler/email?${new URLSearchParams({ from, to: USER })}`, { method: "POST", body: Buffer.from(raw) });
  const text = await res.text();
  const mine = () => lines(w, start).filter((l) => l.from === from && l.outcome);
  await until(`the Worker's log line (HTTP ${res.status}: ${text.slice(0, 200)})`, () => mine().length > 0, 15_000, 50);
  return { status: res.status, text, log: mine()[0]! };
}

// --- the tests ------------------------------------------------------------------------------

describe("the Access service token, from workerd through Access to a host that checks the JWT", () => {
  test("a live delivery carries both headers; Access lets it through; the host checks the JWT and delivers", async () => {
    await dv.clear();
    accessSaw = [];
    const from = uniqueSender("live");
    const raw = rfc822(from, "live through Access");
    const r = await send(worker, from, raw);
    expect(r).toMatchObject({ status: 200, text: ACCEPTED });
    expect(r.log).toMatchObject({ outcome: "accept", status: 200 });
    expect(accessSaw.filter((s) => s.path === INBOUND)).toEqual([{ path: INBOUND, id: CLIENT_ID, secret: CLIENT_SECRET }]);
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
    // The host saw it pass the door (a valid JWT), not merely the key.
    expect(hostLines.filter((l) => l.path === INBOUND && l.status === 200 && (l.from as string) === from)).toHaveLength(1);
  });

  test("Access refuses (403): held at the edge, never bounced; the drain carries both headers and delivers it once Access lets it through", async () => {
    await dv.clear();
    accessRefuses = true;
    const from = uniqueSender("held");
    const raw = rfc822(from, "held while Access refused");
    const r = await send(worker, from, raw);
    expect(r.status).toBe(200); // accepted for the sender: held, not thrown, not bounced
    expect(r.log).toMatchObject({ outcome: "held", status: 503 });
    expect(String(r.log.reason)).toContain("host answered 403");
    expect(await dv.messages(USER)).toHaveLength(0);

    accessRefuses = false;
    accessSaw = [];
    const start = worker.output().length;
    const cron = await fetch(`${worker.url}/cdn-cgi/handler/scheduled`);
    expect(cron.status).toBe(200);
    await until("the drain's summary", () => lines(worker, start).some((l) => l.event === "edge_drain"), 15_000, 50);
    expect(lines(worker, start).filter((l) => l.event === "edge_delivered").map((l) => l.from)).toEqual([from]);
    expect(accessSaw.filter((s) => s.path === INBOUND)).toEqual([{ path: INBOUND, id: CLIENT_ID, secret: CLIENT_SECRET }]);
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
  });

  test("a request that skips Access (straight to the host's port, with the key): refused by the host, 401", async () => {
    const res = await fetch(`${closedHost.url}${INBOUND}`, {
      method: "POST",
      headers: { "content-type": "message/rfc822", "x-api-key": KEY, "x-envelope-from": "a@example.org", "x-envelope-to": USER },
      body: "Subject: around the door\r\n\r\nx\r\n",
    });
    expect(res.status).toBe(401);
    expect(((await res.json()) as { error: string }).error).toBe("access_token_missing");
  });
});

describe("Workers VPC: the HOST binding instead of the public hostname", () => {
  test("delivered through the binding although DELL_API_ENDPOINT's host name resolves nowhere", async () => {
    await dv.clear();
    const from = uniqueSender("vpc");
    const raw = rfc822(from, "through the binding");
    const [closedBefore, vpcBefore] = [hostLines.length, vpcHostLines.length];
    const r = await send(vpcWorker, from, raw);
    expect(r).toMatchObject({ status: 200, text: ACCEPTED });
    const stored = await dv.messages(USER);
    expect(stored).toHaveLength(1);
    expectStoredAs(stored[0]!, raw);
    // The host the stand-in reaches took it; the one behind Access saw nothing of it.
    expect(vpcHostLines.slice(vpcBefore).filter((l) => l.path === INBOUND).map((l) => [l.status, l.from])).toEqual([[200, from]]);
    expect(hostLines.length).toBe(closedBefore);
  });
});

describe("the secret in no log line", () => {
  test("over the whole run, wrangler's and the Worker's output holds neither the secret, nor a prefix of it, nor the client id, nor the key", () => {
    // Runs last: everything above has been printed by now.
    const out = worker.output() + vpcWorker.output();
    expect(out.length).toBeGreaterThan(0);
    expect(out).not.toContain(CLIENT_SECRET.slice(0, 8));
    expect(out).not.toContain(CLIENT_ID.slice(0, 8));
    expect(out).not.toContain(KEY.slice(0, 8));
    for (const l of [...hostLines, ...vpcHostLines]) expect(JSON.stringify(l)).not.toContain(CLIENT_SECRET.slice(0, 8));
  });
});
