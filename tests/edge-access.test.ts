// The Worker's side of the closed door, in Bun: the Access service token on every request to the
// host (edge/forward.ts's fetchHost), the HOST binding (Workers VPC) in place of the public
// hostname, and a half-set token as a configuration error that never bounces and never shows the
// value. tests/integration/access.test.ts runs the same in workerd.

import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, spyOn, test, type Mock } from "bun:test";
import type { Server } from "bun";
import { workerConfig, type FetchBinding } from "../edge/config.ts";
import { fetchHost, sendHeld } from "../edge/forward.ts";
import { hostReachable } from "../edge/host-probe.ts";
import { ConfigError } from "../shared/config-env.ts";
import { email, scheduled, type IncomingEmail } from "../worker.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { streamOf } from "./support/streams.ts";

const KEY = `eakey_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
// Service tokens as Cloudflare makes them: an id ending in ".access" and a 64-hex secret.
const CLIENT_ID = `${Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("hex")}.access`;
const CLIENT_SECRET = Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex");
const USER = "user@kuma8088.com";
const UNREACHABLE = "http://mail-relay.internal/api/v1/inbound-mail";

let host: Server<undefined>;
let seen: Headers[] = [];
const lines: string[] = [];
let consoleSpy: Mock<typeof console.log>;

beforeAll(() => {
  host = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      seen.push(req.headers);
      await req.arrayBuffer();
      return Response.json({ status: "success", message: "delivered" });
    },
  });
  consoleSpy = spyOn(console, "log").mockImplementation((...args: unknown[]) => void lines.push(args.map(String).join(" ")));
});

afterAll(async () => {
  consoleSpy.mockRestore();
  await host.stop(true);
});

beforeEach(() => {
  seen = [];
});

afterEach(() => {
  // Whatever a test did, no line carries the secret, nor a prefix of it, nor the client id.
  for (const line of lines) {
    expect(line).not.toContain(CLIENT_SECRET.slice(0, 8));
    expect(line).not.toContain(CLIENT_ID.slice(0, 8));
  }
});

const endpoint = () => `http://127.0.0.1:${host.port}/api/v1/inbound-mail`;
const env = (extra: Record<string, unknown> = {}) => ({ API_KEY: KEY, DELL_API_ENDPOINT: endpoint(), ...extra });
const withToken = (extra: Record<string, unknown> = {}) => env({ CF_ACCESS_CLIENT_ID: CLIENT_ID, CF_ACCESS_CLIENT_SECRET: CLIENT_SECRET, ...extra });

function incoming(subject: string): IncomingEmail & { rejects: string[] } {
  const raw = new TextEncoder().encode(`From: <a@example.org>\r\nTo: <${USER}>\r\nSubject: ${subject}\r\nMessage-ID: <${crypto.randomUUID()}@example.org>\r\n\r\nHello.\r\n`);
  const rejects: string[] = [];
  return { from: "a@example.org", to: USER, headers: new Headers(), raw: streamOf([raw]), rawSize: raw.length, rejects, setReject: (r) => void rejects.push(r) };
}

async function run(msg: IncomingEmail, e: Record<string, unknown>): Promise<Error | null> {
  try {
    await email(msg, e);
    return null;
  } catch (err) {
    return err as Error;
  }
}

/** A binding standing in for Workers VPC: passes the request on to the test's host, and counts. */
function binding(): FetchBinding & { calls: string[] } {
  const b = {
    calls: [] as string[],
    fetch(input: string, init?: RequestInit) {
      b.calls.push(input);
      return fetch(endpoint(), init);
    },
  };
  return b;
}

describe("the Access service token (CF_ACCESS_CLIENT_ID, CF_ACCESS_CLIENT_SECRET)", () => {
  test("unset: no CF-Access-* header, as before", async () => {
    expect(await run(incoming("no token"), env())).toBeNull();
    expect(seen).toHaveLength(1);
    expect(seen[0]!.has("cf-access-client-id")).toBe(false);
    expect(seen[0]!.has("cf-access-client-secret")).toBe(false);
  });

  test("set: a live delivery carries both, as they are, beside the key", async () => {
    expect(await run(incoming("live"), withToken())).toBeNull();
    expect(seen).toHaveLength(1);
    expect(seen[0]!.get("cf-access-client-id")).toBe(CLIENT_ID);
    expect(seen[0]!.get("cf-access-client-secret")).toBe(CLIENT_SECRET);
    expect(seen[0]!.get("x-api-key")).toBe(KEY);
  });

  test("set: a held message sent by the drain (or a notice, or a flush: the same sender) carries both", async () => {
    const send = sendHeld(workerConfig(withToken()));
    const body = new TextEncoder().encode("Subject: held\r\n\r\nHeld.\r\n");
    const m = { id: "x", from: "a@example.org", to: USER, size: body.length } as Parameters<typeof send>[0];
    expect((await send(m, streamOf([body]), crypto.randomUUID(), 5_000)).outcome).toBe("confirmed");
    expect(seen[0]!.get("cf-access-client-id")).toBe(CLIENT_ID);
    expect(seen[0]!.get("cf-access-client-secret")).toBe(CLIENT_SECRET);
  });

  test("set: the /edge/metrics probe of the host's /health carries both too (Access guards the whole hostname)", async () => {
    await hostReachable(workerConfig(withToken()));
    expect(seen).toHaveLength(1);
    expect(seen[0]!.get("cf-access-client-id")).toBe(CLIENT_ID);
    expect(seen[0]!.get("cf-access-client-secret")).toBe(CLIENT_SECRET);
  });

  for (const [given, missing] of [
    ["CF_ACCESS_CLIENT_ID", "CF_ACCESS_CLIENT_SECRET"],
    ["CF_ACCESS_CLIENT_SECRET", "CF_ACCESS_CLIENT_ID"],
  ] as const) {
    test(`${given} without ${missing}: thrown naming ${missing} (the sender retries), never a bounce, never the value`, async () => {
      const value = given === "CF_ACCESS_CLIENT_ID" ? CLIENT_ID : CLIENT_SECRET;
      const msg = incoming("half");
      const error = await run(msg, env({ [given]: value }));
      expect(error).toBeInstanceOf(ConfigError);
      expect(error!.message).toBe(`worker configuration: ${missing} is not set, but ${given} is (set both, or neither)`);
      expect(error!.message).not.toContain(value.slice(0, 8));
      expect(msg.rejects).toEqual([]);
      expect(seen).toHaveLength(0);
    });
  }
});

describe("the HOST binding (Workers VPC)", () => {
  test("bound: every request goes through it, with the token; the public endpoint is never asked", async () => {
    const vpc = binding();
    const globalFetch = spyOn(globalThis, "fetch");
    try {
      expect(await run(incoming("vpc"), withToken({ DELL_API_ENDPOINT: UNREACHABLE, HOST: vpc }))).toBeNull();
      // The binding's own call to the test host is the only global fetch; none to the endpoint.
      expect(globalFetch.mock.calls.map((c) => String(c[0]))).toEqual([endpoint()]);
    } finally {
      globalFetch.mockRestore();
    }
    expect(vpc.calls).toEqual([UNREACHABLE]);
    expect(seen).toHaveLength(1);
    expect(seen[0]!.get("cf-access-client-id")).toBe(CLIENT_ID);
  });

  test("plain http:// to any host name is accepted only through the binding", () => {
    expect(workerConfig(env({ DELL_API_ENDPOINT: UNREACHABLE, HOST: binding() })).endpoint).toBe(UNREACHABLE);
    expect(() => workerConfig(env({ DELL_API_ENDPOINT: UNREACHABLE }))).toThrow("DELL_API_ENDPOINT must be https://");
  });

  test("HOST as a variable (a string), not a binding: a configuration error naming it", async () => {
    const msg = incoming("string host");
    const error = await run(msg, env({ HOST: "mailserver-api" }));
    expect(error?.message).toBe("worker configuration: HOST must be a binding (vpc_services in wrangler.toml), not a variable");
    expect(msg.rejects).toEqual([]);
  });

  test("fetchHost: the binding's answer is the Worker's answer (a 403 from Access stays a 403: temporary)", async () => {
    const denied: FetchBinding = { fetch: async () => new Response("Forbidden", { status: 403 }) };
    const config = workerConfig(env({ HOST: denied }));
    const res = await fetchHost(config, config.endpoint, { method: "GET" });
    expect(res.status).toBe(403);
    const msg = incoming("denied");
    expect((await run(msg, env({ HOST: denied })))?.message).toContain("temporary failure");
    expect(msg.rejects).toEqual([]);
  });
});

describe("a host that echoes the secrets it was sent (in a redirect's Location, in its reply)", () => {
  const secrets = { KEY, CLIENT_ID, CLIENT_SECRET };
  /** Nothing of any secret: neither whole, nor its first eight characters. */
  const expectClean = (where: string, text: string) => {
    for (const [name, secret] of Object.entries(secrets)) expect({ where, name, found: text.includes(secret.slice(0, 8)) }).toEqual({ where, name, found: false });
  };
  let echo: Server<undefined>;
  let answer: () => Response;
  beforeAll(() => {
    echo = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: async (req) => (await req.arrayBuffer(), answer()) });
  });
  afterAll(() => echo.stop(true));
  // What each request carried, said back in pieces: whole, a prefix, beside other text.
  const echoed = `key=${KEY} id=${CLIENT_ID.slice(0, 12)}... secret "${CLIENT_SECRET}"`;

  test("live and drained: the secrets reach no log line, no bounce, no R2 metadata and no notice", async () => {
    const bucket = new MemoryR2();
    const e = withToken({ DELL_API_ENDPOINT: `http://127.0.0.1:${echo.port}/api/v1/inbound-mail`, EDGE_SPOOL: bucket, POSTMASTER: `postmaster@kuma8088.com`, ALLOWED_RECIPIENTS: USER });
    const from = lines.length;
    // A redirect: held (never followed), its Location named.
    answer = () => new Response(null, { status: 302, headers: { location: `https://login.example/?${echoed.replace(/ /g, "&")}` } });
    expect(await run(incoming("redirect"), e)).toBeNull();
    expect(lines.at(-1)).toContain("a redirect to https://login.example/?key=[redacted]");
    // A temporary failure whose text echoes them: held.
    answer = () => Response.json({ status: "deferred", error: "lmtp_deferred", message: `temporary failure: ${echoed}` }, { status: 503 });
    expect(await run(incoming("deferred"), e)).toBeNull();
    // A refusal: the bounce carries the host's reason.
    answer = () => Response.json({ status: "rejected", error: "lmtp_rejected", message: `550 5.1.1 ${echoed}`, recipients: [{ address: USER, code: 550, enhanced: "5.1.1", reply: `550 5.1.1 ${echoed}` }] }, { status: 422 });
    const refused = incoming("refused");
    expect(await run(refused, e)).toBeNull();
    expect(refused.rejects).toHaveLength(1);
    expect(refused.rejects[0]).toContain("550 5.1.1 key=[redacted]");
    // The drain: both held messages refused the same way: failed/ and a notice each.
    await scheduled({ scheduledTime: Date.UTC(2026, 0, 1, 12, 1) }, e);
    expect(bucket.keys("failed/")).toHaveLength(2);
    const notices = bucket.keys("queue/").filter((k) => !k.endsWith(".retry"));
    expect(notices).toHaveLength(2);

    for (const r of refused.rejects) expectClean("bounce", r);
    for (const l of lines.slice(from)) expectClean("log", l);
    for (const key of bucket.keys()) {
      expectClean(`metadata of ${key}`, JSON.stringify(bucket.objects.get(key)!.meta.customMetadata ?? {}));
      expectClean(`bytes of ${key}`, new TextDecoder().decode(bucket.bytesOf(key)));
    }
    expect(new TextDecoder().decode(bucket.bytesOf(notices[0]!))).toContain("host reply:  550 5.1.1 key=[redacted] id=[redacted]... secret \"[redacted]\"");
  });
});
