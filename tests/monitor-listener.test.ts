// MONITOR_PORT (host/monitor-listener.ts): with Cloudflare Access on, PORT answers nothing but
// /health without Access's JWT, so monitoring from the host's own network needs a door of its own:
// the monitoring listener serves GET /health, /ready, /metrics and /status with the key and
// without the JWT, and never the inbound route, whatever the request carries.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { ServerEnv } from "../host/config.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { freePort } from "../scripts/free-port.ts";
import { startServer, type RunningServer } from "../server.ts";
import { ConfigError, fromEnv } from "../shared/config-env.ts";
import { INBOUND_PATH } from "../shared/contract.ts";
import type { LogLine } from "../shared/log.ts";
import { claims, mint, signingKey, startJwksServer, type JwksServer, type SigningKey } from "./support/access.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

const TEAM = "relay-monitor.cloudflareaccess.com";
const AUD = "c".repeat(64);
const KEY = "monitor-test-key-0123456789abcdefghijklmnop";
const MESSAGE = "From: a@example.org\r\nTo: user@example.com\r\nSubject: monitor\r\n\r\nHello.\r\n";

let fake: FakeLmtpServer;
let jwks: JwksServer;
let signer: SigningKey;
let host: RunningServer;
let monitorUrl: string;
const lines: LogLine[] = [];

beforeAll(async () => {
  fake = await startFakeLmtp();
  signer = await signingKey();
  jwks = startJwksServer([signer]);
  const monitorPort = await freePort();
  const env = { API_KEY: KEY, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port), ACCESS_TEAM_DOMAIN: TEAM, ACCESS_AUD: AUD, ACCESS_CERTS_URL: jwks.url, MONITOR_PORT: String(monitorPort) };
  host = startServer({ ...fromEnv(ServerEnv, env), port: 0 }, { log: (l) => void lines.push(l) });
  monitorUrl = `http://127.0.0.1:${monitorPort}`;
  await until("the keys fetched at start", () => lines.some((l) => l.event === "access_certs"));
}, HOOK_TIMEOUT_MS);
afterAll(async () => {
  await host?.stop();
  await jwks?.stop();
  await fake?.close();
}, HOOK_TIMEOUT_MS);

const send = (base: string, headers: Record<string, string> = {}) =>
  fetch(`${base}${INBOUND_PATH}`, { method: "POST", headers: { "content-type": "message/rfc822", "x-envelope-from": "a@example.org", "x-envelope-to": "user@example.com", "x-api-key": KEY, ...headers }, body: MESSAGE });
const basic = (password: string) => `Basic ${Buffer.from(`ops:${password}`).toString("base64")}`;

describe("with Access on", () => {
  test("PORT: /metrics, /ready and /status need Access's JWT, even with the key", async () => {
    for (const path of ["/metrics", "/ready", "/status"]) {
      const res = await fetch(`${host.url}${path}`, { headers: { "x-api-key": KEY, authorization: basic(KEY) } });
      expect({ path, status: res.status }).toEqual({ path, status: 401 });
    }
  });

  test("MONITOR_PORT: /metrics, /ready and /status with the key, no JWT; without the key, nothing of the state", async () => {
    const metrics = await fetch(`${monitorUrl}/metrics`, { headers: { "x-api-key": KEY } });
    expect(metrics.status).toBe(200);
    expect(await metrics.text()).toContain("relay_received_total");
    expect((await fetch(`${monitorUrl}/metrics`)).status).toBe(401);

    const ready = await fetch(`${monitorUrl}/ready`, { headers: { "x-api-key": KEY } });
    expect(ready.status).toBe(200);
    expect(await ready.json()).toMatchObject({ status: "ready", target: `lmtp://${fake.host}:${fake.port}` });
    expect(Object.keys((await (await fetch(`${monitorUrl}/ready`)).json()) as object).sort()).toEqual(["status", "timestamp"]);

    const status = await fetch(`${monitorUrl}/status`, { headers: { authorization: basic(KEY) } });
    expect(status.status).toBe(200);
    expect(status.headers.get("content-type")).toStartWith("text/html");
    expect((await fetch(`${monitorUrl}/status`)).status).toBe(401);
    expect((await fetch(`${monitorUrl}/health`)).status).toBe(200);
  });

  test("MONITOR_PORT never takes mail: the inbound route is 404 with the key and a valid JWT, and nothing reaches LMTP", async () => {
    const before = fake.received.length;
    const token = await mint(signer, claims(TEAM, AUD));
    const res = await send(monitorUrl, { "cf-access-jwt-assertion": token });
    expect(res.status).toBe(404);
    expect(((await res.json()) as { message: string }).message).toContain("mail goes to PORT");
    // Other methods and paths too: only GET (and HEAD) of the four monitoring paths.
    expect((await fetch(`${monitorUrl}/metrics`, { method: "POST", headers: { "x-api-key": KEY } })).status).toBe(404);
    expect((await fetch(`${monitorUrl}/admin`, { headers: { "x-api-key": KEY } })).status).toBe(404);
    expect(fake.received.length).toBe(before);
    // PORT still takes mail, with the JWT.
    expect((await send(host.url, { "cf-access-jwt-assertion": token })).status).toBe(200);
    expect(fake.received.length).toBe(before + 1);
  });

  test("the listening line names the monitoring listener", () => {
    expect(lines.find((l) => l.event === "listening")).toMatchObject({ monitor: `http://127.0.0.1:${host.monitorPort}` });
  });
});

describe("MONITOR_PORT's setting", () => {
  const env = { API_KEY: KEY, PORT: "8080" };
  test("unset: no second listener", () => {
    expect(fromEnv(ServerEnv, env).monitorPort).toBeUndefined();
  });
  test("the same as PORT, or not a port: one line naming it", () => {
    expect(() => fromEnv(ServerEnv, { ...env, MONITOR_PORT: "8080" })).toThrow(ConfigError);
    expect(() => fromEnv(ServerEnv, { ...env, MONITOR_PORT: "8080" })).toThrow(/MONITOR_PORT/);
    expect(() => fromEnv(ServerEnv, { ...env, MONITOR_PORT: "http" })).toThrow(/MONITOR_PORT/);
    expect(fromEnv(ServerEnv, { ...env, MONITOR_PORT: "9101" }).monitorPort).toBe(9101);
  });
  test("on an IPv6 HOST, the listening line's monitor URL has the address in brackets, as its url has", async () => {
    const seen: LogLine[] = [];
    const monitorPort = await freePort();
    const v6 = startServer({ ...fromEnv(ServerEnv, { API_KEY: KEY, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port), HOST: "::1", MONITOR_PORT: String(monitorPort) }), port: 0 }, { log: (l) => void seen.push(l) });
    try {
      expect(v6.url).toStartWith("http://[::1]:");
      expect(seen.find((l) => l.event === "listening")).toMatchObject({ url: v6.url, monitor: `http://[::1]:${monitorPort}` });
      expect((await fetch(`http://[::1]:${monitorPort}/health`)).status).toBe(200);
    } finally {
      await v6.stop();
    }
  });
  test("a port that cannot be listened on stops start-up naming MONITOR_PORT, and PORT is let go", async () => {
    const taken = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("x") });
    try {
      const port = await freePort();
      expect(() => startServer({ ...fromEnv(ServerEnv, { API_KEY: KEY, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port), PORT: String(port), MONITOR_PORT: String(taken.port) }) }, { log: () => {} })).toThrow(/MONITOR_PORT/);
      // PORT was released: a server can listen there again.
      const again = Bun.serve({ hostname: "127.0.0.1", port, fetch: () => new Response("y") });
      again.stop(true);
    } finally {
      taken.stop(true);
    }
  });
});
