// The edge spool's HTTP face (edge/queue-http.ts) in Bun on an in-memory R2: POST /edge/retry/:id
// validates its id through @hono/zod-validator (a malformed one is 400 and touches nothing; a
// well-formed unknown one 404), and /edge/metrics says whether the Worker reaches the host.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Server } from "bun";
import { workerConfig } from "../edge/config.ts";
import { hostReachable } from "../edge/host-probe.ts";
import { edgeQueueApp } from "../edge/queue-http.ts";
import { EdgeSpool } from "../edge/spool.ts";
import { newApiKey } from "../scripts/keygen.ts";
import { freePort } from "../scripts/free-port.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const KEY = newApiKey();
let answer: () => Response = () => Response.json({ status: "healthy" });
let host: Server<undefined>;
beforeAll(() => {
  host = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => answer() });
});
afterAll(() => host?.stop(true));

function edgeApp(r2: MemoryR2, endpoint = `http://127.0.0.1:${host.port}/api/v1/inbound-mail`) {
  const config = workerConfig({ DELL_API_ENDPOINT: endpoint, API_KEY: KEY, POSTMASTER: "postmaster@example.com", EDGE_SPOOL: r2 });
  return edgeQueueApp(config, async () => ({ trigger: "flush", link: 1, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: true, chained: false, subrequests: 0, r2: { A: 0, B: 0, free: 0 } }), () => {});
}
const post = (app: ReturnType<typeof edgeApp>, path: string) => app.request(path, { method: "POST", headers: { "x-api-key": KEY } });

describe("POST /edge/retry/:id", () => {
  test.each(["not-an-id", "20250101T000000000Z-0A1B2C3D", "20250101T000000000Z-0a1b2c3d.retry", "..%2Fqueue%2Fx", "x".repeat(500)])("%s: 400 invalid_request, nothing read or written", async (id) => {
    const r2 = new MemoryR2();
    const res = await post(edgeApp(r2), `/edge/retry/${id}`);
    expect(res.status).toBe(400);
    const body = (await res.json()) as { error: string; message: string };
    expect(body).toMatchObject({ status: "error", error: "invalid_request" });
    expect(body.message).toStartWith("id: is not an edge spool id");
    expect(body.message.length).toBeLessThan(120);
    expect(r2.calls).toEqual([]);
  });

  test("a well-formed id that is not in failed/: 404", async () => {
    const res = await post(edgeApp(new MemoryR2()), "/edge/retry/20250101T000000000Z-0a1b2c3d");
    expect(res.status).toBe(404);
    expect(await res.json()).toMatchObject({ error: "not_found" });
  });

  test("a failed message's id: back in the queue", async () => {
    const r2 = new MemoryR2();
    const spool = new EdgeSpool(r2);
    await spool.hold("Subject: x\r\n\r\nhi\r\n", { from: "a@example.org", to: "b@example.com", size: 18, reason: "host unreachable", noAnswer: false });
    const m = (await spool.held()).messages[0]!;
    await spool.copyToFailed(m, "refused", "550 5.1.1 no such user");
    await spool.delivered(m.id);
    const res = await post(edgeApp(r2), `/edge/retry/${m.id}`);
    expect(res.status).toBe(200);
    expect((await spool.held()).messages.map((x) => x.id)).toEqual([m.id]);
  });

  test("without the key: 401 before any validation", async () => {
    const res = await edgeApp(new MemoryR2()).request("/edge/retry/not-an-id", { method: "POST" });
    expect(res.status).toBe(401);
  });
});

describe("edge_host_up", () => {
  const up = async (app: ReturnType<typeof edgeApp>) => /^edge_host_up (\d)$/m.exec(await (await app.request("/edge/metrics", { headers: { "x-api-key": KEY } })).text())?.[1];

  test("1 while the host's /health answers healthy; 0 when it answers anything else, or nothing", async () => {
    const app = edgeApp(new MemoryR2());
    answer = () => Response.json({ status: "healthy" });
    expect(await up(app)).toBe("1");
    answer = () => new Response("<html>tunnel error</html>", { status: 530 });
    expect(await up(app)).toBe("0");
    answer = () => new Response("<html>a page</html>", { status: 200 });
    expect(await up(app)).toBe("0");
    answer = () => new Response(null, { status: 302, headers: { location: "https://team.cloudflareaccess.com/cdn-cgi/access/login" } });
    expect(await up(app)).toBe("0");
    expect(await up(edgeApp(new MemoryR2(), `http://127.0.0.1:${await freePort()}/api/v1/inbound-mail`))).toBe("0");
    answer = () => Response.json({ status: "healthy" });
  });

  test("it asks /health at the endpoint's origin, never following a redirect", async () => {
    const seen: string[] = [];
    const other = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => (seen.push(new URL(req.url).pathname), Response.json({ status: "healthy" })) });
    const redirecting = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => (seen.push(`redirect ${new URL(req.url).pathname}`), Response.redirect(`http://127.0.0.1:${other.port}/health`, 302)) });
    try {
      expect(await hostReachable({ endpoint: `http://127.0.0.1:${redirecting.port}/api/v1/inbound-mail`, access: null, host: null })).toBe(false);
      expect(seen).toEqual(["redirect /health"]);
    } finally {
      await other.stop(true);
      await redirecting.stop(true);
    }
  });
});

describe("POST /edge/known and /edge/drain: bodies through the validator", () => {
  const postJson = (app: ReturnType<typeof edgeApp>, path: string, body: string) => app.request(path, { method: "POST", headers: { "x-api-key": KEY, "content-type": "application/json" }, body });

  test("malformed JSON, a bad address, a chained run without its lock: 400 in the contract's JSON, nothing recorded", async () => {
    const r2 = new MemoryR2();
    const app = edgeApp(r2);
    for (const [path, body, says] of [
      ["/edge/known", "{not json", "Malformed JSON"],
      ["/edge/known", JSON.stringify({ addresses: ["no-at-sign"] }), "addresses.0"],
      ["/edge/known", JSON.stringify({ addresses: [] }), "at least one address"],
      ["/edge/drain", JSON.stringify({ link: 1 }), "lock"],
      ["/edge/drain", "", "Malformed JSON"],
    ] as const) {
      const res = await postJson(app, path, body);
      expect({ path, body, status: res.status, type: res.headers.get("content-type") }).toEqual({ path, body, status: 400, type: "application/json" });
      const answer = (await res.json()) as { error: string; message: string };
      expect(answer.error).toBe("invalid_request");
      expect(answer.message).toContain(says);
    }
    expect(r2.keys()).toEqual([]);
  });

  test("good addresses are recorded, lowercased and once each", async () => {
    const r2 = new MemoryR2();
    const res = await postJson(edgeApp(r2), "/edge/known", JSON.stringify({ addresses: ["Alice@Example.org", "alice@example.org", "bob@example.org"] }));
    expect(res.status).toBe(200);
    expect(r2.keys("known/").sort()).toEqual(["known/alice@example.org", "known/bob@example.org"]);
  });
});
