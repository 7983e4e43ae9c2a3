// The doctor and Cloudflare Access (host/doctor/access.ts, and the service token on the public-url
// and edge checks), played locally: a JWKS server publishing a key made here, the real host
// (startServer, fake LMTP) checking Access's JWT with it, and Access itself in front of the host
// (tests/support/access.ts: a request with the service token goes through with a JWT, any other is
// turned away as Access does: a login redirect, a 401, or its block page). cloudflared's own check
// (a 403 with no body) and a Worker's URL behind Access are played by small servers here. No
// output of the doctor holds either half of the token, nor the start or end of one.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { workerConfig } from "../edge/config.ts";
import { edgeQueueApp } from "../edge/queue-http.ts";
import { access, tokenShapeProblem } from "../host/doctor/access.ts";
import { doctorCommand } from "../host/doctor/cli.ts";
import { edge } from "../host/doctor/edge.ts";
import type { DoctorContext, Finding, ServiceToken } from "../host/doctor/finding.ts";
import { publicUrl } from "../host/doctor/public-url.ts";
import type { ServerConfig } from "../host/config.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import { freePort } from "../scripts/free-port.ts";
import { newApiKey } from "../scripts/keygen.ts";
import { startServer, type RunningServer } from "../server.ts";
import { INBOUND_PATH } from "../shared/contract.ts";
import { signingKey, startAccessApp, startJwksServer, type AccessApp, type JwksServer, type SigningKey } from "./support/access.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

const KEY = newApiKey();
const TEAM = "relay-doctor.cloudflareaccess.com";
const hex = (bytes: number) => Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("hex");
const AUD = hex(32);
const TOKEN: ServiceToken = { id: `${hex(16)}.access`, secret: hex(32) };

let fake: FakeLmtpServer;
let signer: SigningKey;
let jwks: JwksServer;
let host: RunningServer;
let app: AccessApp;
const stops: (() => Promise<unknown> | unknown)[] = [];

beforeAll(async () => {
  [fake, signer] = await Promise.all([startFakeLmtp(), signingKey()]);
  jwks = startJwksServer([signer]);
  host = startServer({ ...hostConfig(), port: 0 }, { log: () => {} });
  app = startAccessApp(host.url, signer, TEAM, AUD, [TOKEN]);
}, HOOK_TIMEOUT_MS);
afterAll(async () => {
  for (const stop of stops) await stop();
  await app?.stop();
  await host?.stop();
  await jwks?.stop();
  await fake?.close();
}, HOOK_TIMEOUT_MS);

function hostConfig(certsUrl = jwks.url): ServerConfig {
  return { apiKeys: [KEY], lmtpHost: fake.host, lmtpPort: fake.port, port: 1, host: "127.0.0.1", maxMessageBytes: 1 << 20, access: { issuer: `https://${TEAM}`, audiences: [AUD], certsUrl } };
}
const ctx = (over: Partial<DoctorContext> = {}): DoctorContext => ({ config: hostConfig(), keys: [["API_KEY", KEY]], domains: [], publicUrl: app.url + INBOUND_PATH, serviceToken: TOKEN, timeoutMs: 2_000, ...over });
const statuses = (fs: Finding[]) => fs.map((f) => f.status);
/** Neither half, nor the first or last 6 characters of one (a Client ID's own: before ".access"), anywhere in `text`. */
function expectNoToken(text: string, token: ServiceToken = TOKEN) {
  for (const half of [token.id, token.secret].map((h) => h.replace(/\.access(\..*)?$/, ""))) for (const piece of [half, half.slice(0, 6), half.slice(-6)]) expect(text).not.toContain(piece);
}
function serve(fetch: (req: Request) => Response | Promise<Response>): Server<undefined> {
  const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch });
  stops.push(() => s.stop(true));
  return s;
}

describe("the access part", () => {
  test("nothing of Access set: skipped", async () => {
    const fs = await access.run(ctx({ config: { ...hostConfig(), access: undefined }, serviceToken: undefined }));
    expect(statuses(fs)).toEqual(["skip"]);
  });

  test("the signing keys fetched, an RSA key among them, the token shaped right, and PUBLIC_URL without it turned away: ok, ok, ok", async () => {
    app.refusal = "login";
    const fs = await access.run(ctx());
    expect(statuses(fs)).toEqual(["ok", "ok", "ok"]);
    expect(fs[0]!.found).toBe(`${jwks.url}: 1 RSA signing key(s) (${signer.kid})`);
    expect(fs[1]!.found).toContain("it goes with every request to PUBLIC_URL and EDGE_URL");
    expect(fs[2]!.found).toContain("without the service token is turned away (a redirect (302) to https://relay-doctor.cloudflareaccess.com/cdn-cgi/access/login/");
    expect(fs[2]!.found).not.toContain("meta="); // the login URL's query is left out
    expectNoToken(JSON.stringify(fs));
  });

  test("the certs endpoint down, or publishing no RSA key: fail, saying mail waits with 503", async () => {
    jwks.down = true;
    try {
      const fs = await access.run(ctx({ serviceToken: undefined, publicUrl: undefined }));
      expect(statuses(fs)).toEqual(["fail"]);
      expect(fs[0]!.found).toBe(`Access's signing keys cannot be fetched: ${jwks.url}: HTTP 503: the host then answers every request but /health with 503 (mail waits)`);
      expect(fs[0]!.fix).toContain("ACCESS_TEAM_DOMAIN is the team domain");
    } finally {
      jwks.down = false;
    }
    const ec = startJwksServer([{ ...signer, jwk: { kty: "EC", kid: "ec-1", crv: "P-256", x: "AA", y: "AA" } }]);
    try {
      const fs = await access.run(ctx({ config: hostConfig(ec.url), serviceToken: undefined, publicUrl: undefined }));
      expect(statuses(fs)).toEqual(["fail"]);
      expect(fs[0]!.found).toContain(`${ec.url} publishes no RSA key`);
    } finally {
      await ec.stop();
    }
  });

  test.each([
    ["swapped halves", { id: TOKEN.secret, secret: TOKEN.id }, "fail", "CF_ACCESS_CLIENT_ID and CF_ACCESS_CLIENT_SECRET are swapped"],
    ["the Client ID without .access", { id: hex(16), secret: TOKEN.secret }, "warn", "CF_ACCESS_CLIENT_ID is not shaped as Access makes a Client ID"],
    ["a secret cut short", { id: TOKEN.id, secret: TOKEN.secret.slice(0, 40) }, "warn", "CF_ACCESS_CLIENT_SECRET is not shaped as Access makes a Client Secret"],
    ["both wrong", { id: "my-id", secret: "my-secret-value" }, "warn", "neither half is shaped as Access makes them"],
  ] as const)("%s: the finding names the half, never its value", async (_, token, status, says) => {
    const fs = await access.run(ctx({ serviceToken: token, publicUrl: undefined }));
    expect(statuses(fs)).toEqual(["ok", status]);
    expect(fs[1]!.found).toStartWith(says);
    expectNoToken(JSON.stringify(fs), token);
  });

  test("a Client ID of the older form (.access.<team domain>) is shaped right", () => {
    expect(tokenShapeProblem({ id: `${hex(16)}.access.example.com`, secret: TOKEN.secret })).toBeNull();
  });

  test("the host checks the JWT but no token is set here: warn, PUBLIC_URL cannot be checked past Access", async () => {
    const fs = await access.run(ctx({ serviceToken: undefined }));
    expect(statuses(fs)).toEqual(["ok", "warn"]);
    expect(fs[1]!.found).toContain("no service token is set here");
  });

  test("the token set, the host without ACCESS_TEAM_DOMAIN/ACCESS_AUD, and no Access in front: two warnings, the door is open", async () => {
    const open = startServer({ ...hostConfig(), access: undefined, port: 0 }, { log: () => {} });
    try {
      const fs = await access.run(ctx({ config: { ...hostConfig(), access: undefined }, publicUrl: open.url + INBOUND_PATH }));
      expect(statuses(fs)).toEqual(["warn", "ok", "warn"]);
      expect(fs[0]!.found).toContain("the host does not check Access's JWT");
      expect(fs[2]!.found).toContain("without the service token reaches the relay: no Access application guards the hostname, the door is open");
    } finally {
      await open.stop();
    }
  });
});

describe("PUBLIC_URL through Access", () => {
  test("the right token: /health and /ready pass, both requests carrying both headers", async () => {
    app.saw = [];
    const fs = await publicUrl.run(ctx());
    expect(statuses(fs)).toEqual(["ok", "ok"]);
    expect(fs[0]!.found).toContain("healthy (with the service token)");
    expect(fs[1]!.found).toBe(`GET /ready with API_KEY: ready, the host delivers to lmtp://${fake.host}:${fake.port}`);
    expect(app.saw).toEqual([
      { path: "/health", ...TOKEN },
      { path: "/ready", ...TOKEN },
    ]);
  });

  test.each(["login", "401", "403"] as const)("a wrong secret of the right shape, Access refusing with %s: fail, Access cannot say which half, the finding says what to check", async (refusal) => {
    app.refusal = refusal;
    try {
      const wrong = { id: TOKEN.id, secret: hex(32) };
      const fs = await publicUrl.run(ctx({ serviceToken: wrong }));
      expect(statuses(fs)).toEqual(["fail"]);
      expect(fs[0]!.found).toStartWith(`Cloudflare Access did not let the service token through at ${app.url}/health`);
      expect(fs[0]!.found).toContain("both halves are shaped as Access makes them");
      expect(fs[0]!.fix).toContain("Action Service Auth, Include Service Token");
      expectNoToken(JSON.stringify(fs), wrong);
    } finally {
      app.refusal = "login";
    }
  });

  test("a secret that lost characters when pasted: fail, naming CF_ACCESS_CLIENT_SECRET as the wrong half", async () => {
    const cut = { id: TOKEN.id, secret: TOKEN.secret.slice(0, 63) };
    const fs = await publicUrl.run(ctx({ serviceToken: cut }));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain("CF_ACCESS_CLIENT_SECRET is not shaped as Access makes a Client Secret (64 hex characters): that half is wrong");
    expectNoToken(JSON.stringify(fs), cut);
  });

  test("no token set here: fail, Access guards PUBLIC_URL and the doctor needs the Worker's token", async () => {
    const fs = await publicUrl.run(ctx({ serviceToken: undefined }));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain("Cloudflare Access asks for a login: Cloudflare Access guards it, and no service token is set here");
    expect(fs[0]!.fix).toContain("CF_ACCESS_CLIENT_ID and CF_ACCESS_CLIENT_SECRET in the doctor's environment");
  });

  test("Access lets the token through with a JWT for another application: fail with the host's reason (ACCESS_AUD)", async () => {
    app.aud = hex(32);
    try {
      const fs = await publicUrl.run(ctx());
      expect(statuses(fs)).toEqual(["ok", "fail"]);
      expect(fs[1]!.found).toBe('Access let the service token through, but the host refuses the JWT Access added: Cloudflare Access token refused: for another application (its "aud" holds none of ACCESS_AUD)');
      expect(fs[1]!.fix).toContain("ACCESS_AUD is the AUD tag");
    } finally {
      app.aud = AUD;
    }
  });

  test("no Access application, cloudflared requiring its JWT: a 403 with no body, named as cloudflared's", async () => {
    const cloudflared = serve((req) => (req.headers.get("cf-access-jwt-assertion") ? fetch(host.url + new URL(req.url).pathname) : new Response(null, { status: 403 })));
    const fs = await publicUrl.run(ctx({ publicUrl: `http://127.0.0.1:${cloudflared.port}${INBOUND_PATH}` }));
    expect(statuses(fs)).toEqual(["fail"]);
    expect(fs[0]!.found).toContain("answered 403 with no body: cloudflared's Access check (originRequest.access) refused it");
    expect(fs[0]!.found).toContain("no Access application let the service token through");
  });

  test("no Access application and no cloudflared check: /health passes, the host's /ready wants a JWT (401): fail, saying no application covers the hostname", async () => {
    const fs = await publicUrl.run(ctx({ publicUrl: host.url + INBOUND_PATH }));
    expect(statuses(fs)).toEqual(["ok", "fail"]);
    expect(fs[1]!.found).toContain("the request reached it without one: no Access application covers PUBLIC_URL's hostname");
  });

  test("the host cannot fetch Access's keys (and has none): its 503 is named, not taken for Dovecot", async () => {
    const blind = startServer({ ...hostConfig(`http://127.0.0.1:${await freePort()}/cdn-cgi/access/certs`), port: 0 }, { log: () => {} });
    const front = startAccessApp(blind.url, signer, TEAM, AUD, [TOKEN]);
    try {
      const fs = await publicUrl.run(ctx({ publicUrl: front.url + INBOUND_PATH }));
      expect(statuses(fs)).toEqual(["ok", "fail"]);
      expect(fs[1]!.found).toStartWith("the host cannot check Access's JWT: Access signing keys unavailable from");
    } finally {
      await front.stop();
      await blind.stop();
    }
  });
});

describe("EDGE_URL behind Access", () => {
  test("the token goes with /edge/queue and /edge/metrics; without it Access turns the doctor away", async () => {
    const r2 = new MemoryR2();
    const edgeApp = edgeQueueApp(workerConfig({ DELL_API_ENDPOINT: app.url + INBOUND_PATH, API_KEY: KEY, POSTMASTER: "postmaster@example.com", CF_ACCESS_CLIENT_ID: TOKEN.id, CF_ACCESS_CLIENT_SECRET: TOKEN.secret, EDGE_SPOOL: r2 }), async () => ({ trigger: "flush", link: 1, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: true, chained: false, subrequests: 0, r2: { A: 0, B: 0, free: 0 } }), () => {});
    const worker = serve((req) => edgeApp.fetch(req));
    const guarded = startAccessApp(`http://127.0.0.1:${worker.port}`, signer, TEAM, AUD, [TOKEN]);
    stops.push(() => guarded.stop());
    const config = { ...hostConfig(), edgeUrl: guarded.url };
    const fs = await edge.run(ctx({ config }));
    expect(statuses(fs)).toEqual(["ok", "ok"]);
    expect(fs[0]!.found).toBe("0 held (asked with API_KEY)");
    expect(fs[1]!.found).toContain("edge_host_up 1"); // the Worker's own probe passes the host's Access with its token
    expect(guarded.saw).toEqual([
      { path: "/edge/queue", ...TOKEN },
      { path: "/edge/metrics", ...TOKEN },
    ]);
    const without = await edge.run(ctx({ config, serviceToken: undefined }));
    expect(statuses(without)).toEqual(["fail"]);
    expect(without[0]!.found).toContain("a redirect to https://relay-doctor.cloudflareaccess.com/cdn-cgi/access/login/");
  });
});

test("a whole run through Access, text and --json: every check passes, and neither half of the token shows anywhere", async () => {
  const env = {
    API_KEY: KEY,
    LMTP_HOST: fake.host,
    LMTP_PORT: String(fake.port),
    ACCESS_TEAM_DOMAIN: TEAM,
    ACCESS_AUD: AUD,
    ACCESS_CERTS_URL: jwks.url,
    PUBLIC_URL: app.url + INBOUND_PATH,
    CF_ACCESS_CLIENT_ID: TOKEN.id,
    CF_ACCESS_CLIENT_SECRET: TOKEN.secret,
  };
  for (const args of [[], ["--json"]]) {
    let out = "";
    const code = await doctorCommand(args, env, (t) => (out += t));
    if (process.env.SHOW_DOCTOR) console.log(out);
    expect(code).toBe(0);
    expect(out).toContain(args.length ? '"part": "access"' : "✓ access");
    expectNoToken(out);
  }
  // The secret wrong: a failure, still without either half.
  let out = "";
  expect(await doctorCommand([], { ...env, CF_ACCESS_CLIENT_SECRET: hex(32) }, (t) => (out += t))).toBe(1);
  expect(out).toContain("✗ public-url");
  expect(out).toContain("Cloudflare Access did not let the service token through");
  expectNoToken(out);
});
