// The host's Cloudflare Access check (host/middleware/access-jwt.ts, host/access-certs.ts) in the
// app: keys and tokens made here, a local JWKS server in Access's shape. Every way a token can be
// refused, the keys' cache and its refetch, the certs endpoint down, and what stays open (/health).

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { AccessCerts, accessCertsReachable } from "../../host/access-certs.ts";
import { ServerEnv, type AccessSettings } from "../../host/config.ts";
import { accessJwt, CLOCK_SKEW_S } from "../../host/middleware/access-jwt.ts";
import { createApp, type InboundMessage } from "../../shared/app.ts";
import { fromEnv } from "../../shared/config-env.ts";
import { INBOUND_PATH } from "../../shared/contract.ts";
import type { LogLine } from "../../shared/log.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../../fake-lmtp.ts";
import { startServer } from "../../server.ts";
import { claims, hs256WithPublicKey, mint, signingKey, startJwksServer, unsigned, type JwksServer, type SigningKey } from "../support/access.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const TEAM = "relay-test.cloudflareaccess.com";
const AUD = "a".repeat(64);
const AUD_NEXT = "b".repeat(64);
const KEY = "access-test-key-0123456789abcdefghijklmnop";
const MESSAGE = "From: a@example.org\r\nTo: user@example.com\r\nSubject: door\r\n\r\nHello.\r\n";

let current: SigningKey;
let other: SigningKey;
let jwks: JwksServer;
const settings = (): AccessSettings => ({ issuer: `https://${TEAM}`, audiences: [AUD, AUD_NEXT], certsUrl: jwks.url });

beforeAll(async () => {
  [current, other] = await Promise.all([signingKey(), signingKey()]);
  jwks = startJwksServer([current]);
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await jwks.stop();
});

beforeEach(() => {
  jwks.keys = [current];
  jwks.down = false;
});

/** An app behind the door, with a clock the test moves; what was delivered and logged. */
function appWith(opts: { minRefetchMs?: number; maxAgeMs?: number } = {}) {
  let now = Date.now();
  const delivered: InboundMessage[] = [];
  const log: LogLine[] = [];
  const certs = new AccessCerts(jwks.url, { now: () => now, log: (l) => void log.push(l), ...opts });
  const app = createApp({
    apiKeys: [KEY],
    door: accessJwt(settings(), certs),
    deliver: async (m) => {
      delivered.push(m);
      return m.envelope.to.map((address) => ({ address, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Saved" }));
    },
    ready: async () => ({ lmtp: "fake" }),
    metrics: () => "relay_up 1\n",
    log: (l) => void log.push(l),
  });
  return { app, certs, delivered, log, advance: (ms: number) => void (now += ms) };
}

const post = (app: ReturnType<typeof createApp>, token: string | null, key: string | null = KEY) =>
  app.request(INBOUND_PATH, {
    method: "POST",
    headers: {
      "content-type": "message/rfc822",
      "x-envelope-from": "a@example.org",
      "x-envelope-to": "user@example.com",
      ...(key ? { "x-api-key": key } : {}),
      ...(token !== null ? { "cf-access-jwt-assertion": token } : {}),
    },
    body: MESSAGE,
  });

async function refused(res: Response, status: number, error: string): Promise<string> {
  expect(res.status).toBe(status);
  const body = (await res.json()) as { error: string; message: string };
  expect(body.error).toBe(error);
  return body.message;
}

describe("a valid token and the key: delivered", () => {
  test("a service token's JWT for the application, signed by the published key", async () => {
    const { app, delivered } = appWith();
    const res = await post(app, await mint(current, claims(TEAM, AUD)));
    expect(res.status).toBe(200);
    expect(delivered).toHaveLength(1);
  });

  test("aud holding the second of ACCESS_AUD (a migration), among others", async () => {
    const { app, delivered } = appWith();
    expect((await post(app, await mint(current, claims(TEAM, ["c".repeat(64), AUD_NEXT])))).status).toBe(200);
    expect(delivered).toHaveLength(1);
  });

  test("exp and nbf within the clock skew still pass", async () => {
    const { app, delivered } = appWith();
    const now = Math.floor(Date.now() / 1000);
    expect((await post(app, await mint(current, claims(TEAM, AUD, { exp: now - CLOCK_SKEW_S + 15 })))).status).toBe(200);
    expect((await post(app, await mint(current, claims(TEAM, AUD, { nbf: now + CLOCK_SKEW_S - 15 })))).status).toBe(200);
    expect(delivered).toHaveLength(2);
  });

  test("the token does not replace the key: a valid token without the key is 401 from the key check", async () => {
    const { app, delivered } = appWith();
    const message = await refused(await post(app, await mint(current, claims(TEAM, AUD)), null), 401, "unauthorized");
    expect(message).toContain("API key");
    expect(delivered).toHaveLength(0);
  });
});

describe("refused: 401 without a token, 403 with the reason for a bad one; nothing delivered", () => {
  test("no Cf-Access-Jwt-Assertion: 401 access_token_missing (before the key is looked at)", async () => {
    const { app, delivered, log } = appWith();
    expect(await refused(await post(app, null), 401, "access_token_missing")).toContain("Cf-Access-Jwt-Assertion");
    expect(await refused(await post(app, "", null), 401, "access_token_missing")).toContain("Access");
    expect(delivered).toHaveLength(0);
    expect(log.find((l) => l.path === INBOUND_PATH)).toMatchObject({ status: 401, error: "access_token_missing" });
  });

  test("the token as 'Bearer <jwt>' in Authorization is not read as the Access token", async () => {
    const { app, delivered } = appWith();
    const res = await app.request(INBOUND_PATH, { method: "POST", headers: { authorization: `Bearer ${await mint(current, claims(TEAM, AUD))}`, "x-api-key": KEY } });
    await refused(res, 401, "access_token_missing");
    expect(delivered).toHaveLength(0);
  });

  const bad: [string, () => Promise<string>, RegExp][] = [
    ["another application's audience", () => mint(current, claims(TEAM, "d".repeat(64))), /another application/],
    ["another team (issuer)", () => mint(current, claims("someone-else.cloudflareaccess.com", AUD)), /another team/],
    ["the issuer without https://", () => mint(current, claims(TEAM, AUD, { iss: TEAM })), /another team/],
    ["expired beyond the skew", () => mint(current, claims(TEAM, AUD, { exp: Math.floor(Date.now() / 1000) - CLOCK_SKEW_S - 5 })), /expired/],
    ["not yet valid beyond the skew", () => mint(current, claims(TEAM, AUD, { nbf: Math.floor(Date.now() / 1000) + CLOCK_SKEW_S + 30 })), /not yet valid/],
    ["no exp at all", () => mint(current, claims(TEAM, AUD, { exp: undefined })), /"exp"/],
    ["a forged signature under the published kid (another key signed it)", () => mint(other, claims(TEAM, AUD), current.kid), /signature does not verify/],
    ["alg none", async () => unsigned(claims(TEAM, AUD), current.kid), /RS256/],
    ["HS256 keyed with the published public key", () => hs256WithPublicKey(current, claims(TEAM, AUD)), /RS256/],
    ["not a JWT", async () => "not.a.jwt", /./],
    ["a valid token with its payload altered", async () => {
      const [h, , s] = (await mint(current, claims(TEAM, AUD))).split(".");
      return `${h}.${Buffer.from(JSON.stringify(claims(TEAM, AUD, { common_name: "intruder" }))).toString("base64url")}.${s}`;
    }, /signature does not verify/],
  ];
  for (const [name, token, why] of bad) {
    test(name, async () => {
      const { app, delivered } = appWith();
      const message = await refused(await post(app, await token()), 403, "access_token_invalid");
      expect(message).toMatch(/^Cloudflare Access token refused: /);
      expect(message).toMatch(why);
      expect(delivered).toHaveLength(0);
    });
  }

  test("a token signed by a key Access does not publish: 403 after one refetch", async () => {
    const { app, delivered } = appWith();
    await post(app, await mint(current, claims(TEAM, AUD))); // the keys are fetched
    const before = jwks.fetches;
    expect(await refused(await post(app, await mint(other, claims(TEAM, AUD))), 403, "access_token_invalid")).toContain("unknown kid");
    expect(jwks.fetches).toBe(before); // within the refetch limit of the first fetch
    expect(delivered).toHaveLength(1);
  });
});

describe("the keys: cached, refetched for an unknown kid at most once per few seconds, kept when the endpoint is down", () => {
  test("fetched once for many requests", async () => {
    const { app } = appWith();
    const before = jwks.fetches;
    const token = await mint(current, claims(TEAM, AUD));
    for (let i = 0; i < 5; i++) expect((await post(app, token)).status).toBe(200);
    expect(jwks.fetches - before).toBe(1);
  });

  test("a key published after start: its first token refetches and passes; made-up kids refetch at most once per 5 s", async () => {
    const { app, advance, delivered } = appWith({ minRefetchMs: 5_000 });
    expect((await post(app, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
    const afterStart = jwks.fetches;
    // Access rotates: the new key is published next to the old one.
    jwks.keys = [other, current];
    advance(5_001);
    expect((await post(app, await mint(other, claims(TEAM, AUD)))).status).toBe(200);
    expect(jwks.fetches).toBe(afterStart + 1);
    // A flood of made-up key ids: one fetch at most per 5 s, each refused 403.
    const stranger = await signingKey();
    for (let i = 0; i < 4; i++) await refused(await post(app, await mint(stranger, claims(TEAM, AUD), `made-up-${i}`)), 403, "access_token_invalid");
    expect(jwks.fetches).toBe(afterStart + 1);
    advance(5_001);
    await refused(await post(app, await mint(stranger, claims(TEAM, AUD), "made-up-later")), 403, "access_token_invalid");
    expect(jwks.fetches).toBe(afterStart + 2);
    expect(delivered).toHaveLength(2);
  });

  test("the certs endpoint down with no key fetched yet: 503 access_certs_unavailable + Retry-After, never a refusal", async () => {
    jwks.down = true;
    const { app, delivered, log } = appWith();
    const res = await post(app, await mint(current, claims(TEAM, AUD)));
    expect(await refused(res.clone(), 503, "access_certs_unavailable")).toContain("HTTP 503");
    expect(res.headers.get("retry-after")).toBe("30");
    expect(delivered).toHaveLength(0);
    expect(log.find((l) => l.event === "access_certs_error")).toMatchObject({ error: "HTTP 503", cached: false });
  });

  test("the certs endpoint down, a new kid: 503 (it may be a rotation), not 403", async () => {
    const { app, advance } = appWith();
    expect((await post(app, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
    jwks.down = true;
    advance(10_000);
    await refused(await post(app, await mint(other, claims(TEAM, AUD))), 503, "access_certs_unavailable");
  });

  test("the certs endpoint down, a cached key fits: delivered, even once the keys are old (a refresh failed in the background)", async () => {
    const { app, advance, delivered, log } = appWith({ maxAgeMs: 60_000 });
    expect((await post(app, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
    jwks.down = true;
    advance(120_000);
    const before = jwks.fetches;
    expect((await post(app, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
    await Bun.sleep(50);
    expect(jwks.fetches).toBe(before + 1); // the refresh was tried
    expect(log.some((l) => l.event === "access_certs_error" && l.cached === true)).toBe(true);
    expect(delivered).toHaveLength(2);
  });

  test("the endpoint back after being down: the next request past the limit fetches and passes", async () => {
    jwks.down = true;
    const { app, advance } = appWith();
    await refused(await post(app, await mint(current, claims(TEAM, AUD))), 503, "access_certs_unavailable");
    jwks.down = false;
    // Within the limit: no second fetch, still 503.
    await refused(await post(app, await mint(current, claims(TEAM, AUD))), 503, "access_certs_unavailable");
    advance(5_001);
    expect((await post(app, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
  });

  test("accessCertsReachable (for a check of the set-up): the key ids, or why not", async () => {
    expect(await accessCertsReachable(jwks.url)).toEqual({ ok: true, kids: [current.kid] });
    jwks.down = true;
    expect(await accessCertsReachable(jwks.url)).toEqual({ ok: false, error: `${jwks.url}: HTTP 503` });
    const r = await accessCertsReachable("http://127.0.0.1:1/cdn-cgi/access/certs", 1_000);
    expect(r.ok).toBe(false);
  });
});

describe("which routes the door covers", () => {
  test("/health stays open (the container's check); /ready and /metrics need the token too", async () => {
    const { app } = appWith();
    const health = await app.request("/health");
    expect(health.status).toBe(200);
    expect(((await health.json()) as { status: string }).status).toBe("healthy");
    // /health?deep=1 is open too, and says only up or down without the key.
    expect(await (await app.request("/health?deep=1")).json()).toEqual({ status: "ready", timestamp: expect.any(String) });
    await refused(await app.request("/ready", { headers: { "x-api-key": KEY } }), 401, "access_token_missing");
    await refused(await app.request("/metrics", { headers: { "x-api-key": KEY } }), 401, "access_token_missing");
    const token = await mint(current, claims(TEAM, AUD));
    const ready = await app.request("/ready", { headers: { "x-api-key": KEY, "cf-access-jwt-assertion": token } });
    expect(await ready.json()).toMatchObject({ status: "ready", lmtp: "fake" });
    expect(await (await app.request("/metrics", { headers: { "x-api-key": KEY, "cf-access-jwt-assertion": token } })).text()).toBe("relay_up 1\n");
    // An unknown path answers 401 at the door too, not 404: nothing about the routes leaks past it.
    await refused(await app.request("/admin"), 401, "access_token_missing");
  });
});

describe("the host with ACCESS_TEAM_DOMAIN and ACCESS_AUD (startServer)", () => {
  let fake: FakeLmtpServer;
  beforeAll(async () => {
    fake = await startFakeLmtp();
  });
  afterAll(async () => {
    await fake.close();
  });

  test("unset: no token needed, as before; set: delivered only with a valid token", async () => {
    const env = { API_KEY: KEY, LMTP_HOST: fake.host, LMTP_PORT: String(fake.port) };
    const config = (extra: Record<string, string> = {}) => ({ ...fromEnv(ServerEnv, { ...env, ...extra }), port: 0 });
    const send = (url: string, token?: string) =>
      fetch(`${url}${INBOUND_PATH}`, {
        method: "POST",
        headers: { "content-type": "message/rfc822", "x-envelope-from": "a@example.org", "x-envelope-to": "user@example.com", "x-api-key": KEY, ...(token ? { "cf-access-jwt-assertion": token } : {}) },
        body: MESSAGE,
      });

    const open = startServer(config(), { log: () => {} });
    try {
      expect((await send(open.url)).status).toBe(200);
    } finally {
      await open.stop();
    }

    const lines: LogLine[] = [];
    const closed = startServer(config({ ACCESS_TEAM_DOMAIN: TEAM, ACCESS_AUD: AUD, ACCESS_CERTS_URL: jwks.url }), { log: (l) => void lines.push(l) });
    try {
      // The keys are fetched at start, before any message asks for them.
      await until("the keys fetched at start", () => lines.some((l) => l.event === "access_certs"));
      expect(lines.some((l) => l.path)).toBe(false);
      expect((await send(closed.url)).status).toBe(401);
      expect((await send(closed.url, await mint(current, claims(TEAM, ["e".repeat(64)])))).status).toBe(403);
      expect((await send(closed.url, await mint(current, claims(TEAM, AUD)))).status).toBe(200);
      expect((await fetch(`${closed.url}/health`)).status).toBe(200);
      expect(lines.find((l) => l.event === "listening")).toMatchObject({ access: `https://${TEAM}` });
    } finally {
      await closed.stop();
    }
    expect(fake.received).toHaveLength(2);
  });
});
