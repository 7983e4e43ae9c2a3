// GET /status (host/status-http.ts, host/status-page.ts) through its Hono app: the key as the
// Basic password and nothing of the state without it, the query validated, everything from
// senders and servers escaped, the spool's lists and the edge's; and the hour window of the counts
// (host/recent-counts.ts) as the clock moves.

import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtemp, rm } from "node:fs/promises";
import { LastAnswer } from "../host/last-answer.ts";
import { Metrics } from "../host/metrics.ts";
import { RecentCounts } from "../host/recent-counts.ts";
import { Spool } from "../host/spool.ts";
import { statusApp, type StatusSources } from "../host/status-http.ts";
import { newApiKey } from "../scripts/keygen.ts";
import { startServer } from "../server.ts";
import { spoolDirect } from "./support/spooled.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const KEY = newApiKey();
const basic = (user: string, password: string) => ({ authorization: `Basic ${btoa(`${user}:${password}`)}` });
const SCRIPT = "<script>alert(1)</script>";

let dir: string;
let spool: Spool;
beforeAll(async () => {
  dir = await mkdtemp("/tmp/status-test-");
  spool = new Spool(dir);
  spool.prepare();
  const commit = async (from: string, to: string[], receivedAt = Date.now()) => (await spoolDirect(spool, from, to, receivedAt)).id;
  // Envelopes as they might come from an older host, a hand-edited file, or a sender: shown, never run.
  await commit(`${SCRIPT}@example.org`, [`a"onmouseover="alert(2)'&amp;@example.com`], Date.now() - 3_600_000 * 2);
  await commit("", ["b@example.com"]);
  await spool.moveToFailed(await commit("c@example.org", ["d@example.com"]), `refused: 550 5.1.1 <d@example.com> ${SCRIPT}`);
});
afterAll(() => rm(dir, { recursive: true, force: true }));

function sources(over: Partial<StatusSources> = {}): StatusSources {
  const metrics = new Metrics();
  metrics.inc("delivered", 3);
  metrics.inc("rejected");
  const lastAnswer = new LastAnswer();
  lastAnswer.note([{ address: "x@example.com", code: 451, enhanced: "4.3.0", reply: `451 4.3.0 <x@example.com> ${SCRIPT}` }]);
  return { apiKeys: [KEY], metrics, lastAnswer, target: "127.0.0.1:2525", spool, ...over };
}

describe("the key as the Basic password", () => {
  const app = statusApp(sources());
  test.each([
    ["no credentials", {}],
    ["a wrong password", basic("admin", newApiKey())],
    ["the key as the user name", basic(KEY, "x")],
    ["the key as X-API-Key only", { "x-api-key": KEY }],
    ["the key as a Bearer token", { authorization: `Bearer ${KEY}` }],
  ])("%s: 401 with WWW-Authenticate: Basic, and nothing of the state", async (_what, headers) => {
    const res = await app.request("/status", { headers });
    expect(res.status).toBe(401);
    expect(res.headers.get("www-authenticate")).toStartWith("Basic ");
    expect(res.headers.get("content-type")).toBe("application/json");
    const body = await res.text();
    expect(JSON.parse(body)).toMatchObject({ status: "error", error: "unauthorized" });
    for (const secret of ["127.0.0.1", "example", "delivered", "spool"]) expect(body).not.toContain(secret);
  });

  test("the key as the password, with any user name: the page", async () => {
    for (const user of ["", "admin", "ユーザー"]) {
      const res = await app.request("/status", { headers: { authorization: `Basic ${Buffer.from(`${user}:${KEY}`).toString("base64")}` } });
      expect(res.status).toBe(200);
      expect(res.headers.get("content-type")).toStartWith("text/html");
      expect(res.headers.get("cache-control")).toBe("no-store");
      expect(res.headers.get("content-security-policy")).toStartWith("default-src 'none'");
    }
  });

  test("during a rotation, either key", async () => {
    const other = newApiKey();
    const two = statusApp(sources({ apiKeys: [other, KEY] }));
    expect((await two.request("/status", { headers: basic("x", other) })).status).toBe(200);
    expect((await two.request("/status", { headers: basic("x", KEY) })).status).toBe(200);
  });
});

test("served by the host: 401 with the challenge without the key (the app's error handler passes it on), the page with it", async () => {
  const host = startServer({ apiKeys: [KEY], lmtpHost: "127.0.0.1", lmtpPort: 9, port: 0, host: "127.0.0.1", maxMessageBytes: 1 << 20 }, { log: () => {} });
  try {
    const refused = await fetch(`${host.url}/status`);
    expect(refused.status).toBe(401);
    expect(refused.headers.get("www-authenticate")).toBe('Basic realm="mail-relay"');
    expect(await refused.json()).toMatchObject({ error: "unauthorized" });
    const page = await fetch(`${host.url}/status`, { headers: basic("anyone", KEY) });
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('<code id="target">lmtp://127.0.0.1:9</code>');
  } finally {
    await host.stop();
  }
});

describe("the page", () => {
  const page = async (query = "", over: Partial<StatusSources> = {}) => {
    const res = await statusApp(sources(over)).request(`/status${query}`, { headers: basic("x", KEY) });
    expect(res.status).toBe(200);
    return res.text();
  };

  test("escapes what senders and servers wrote: no tag, no attribute of theirs survives", async () => {
    const html = await page();
    expect(html).not.toContain("<script");
    expect(html).not.toContain('"onmouseover=');
    expect(html).toContain("&lt;script&gt;alert(1)&lt;/script&gt;@example.org");
    expect(html).toContain("a&quot;onmouseover=&quot;alert(2)&#39;&amp;amp;@example.com");
    expect(html).toContain("550 5.1.1 &lt;d@example.com&gt; &lt;script&gt;");
    expect(html).toContain("451 4.3.0 &lt;x@example.com&gt;");
  });

  test("control characters in an envelope are shown as \\uXXXX, not passed on", async () => {
    const answer = new LastAnswer();
    answer.note(new Error("451 line\r\nInjected: header\u001b[31m"));
    const html = await page("", { lastAnswer: answer });
    expect(html).toContain("451 line\\u000d\\u000aInjected: header\\u001b[31m");
  });

  test("the counts, the target and its last answer, every spooled and failed message, the null sender as <>", async () => {
    const html = await page();
    expect(html).toContain('data-metric="relay_delivered_total">3<');
    expect(html).toContain('data-last-hour="delivered">3<');
    expect(html).toContain('data-metric="relay_rejected_total">1<');
    expect(html).toContain('<code id="target">127.0.0.1:2525</code>');
    expect(html).toContain('<span id="spool-queued">2</span>');
    expect(html).toContain('<span id="spool-failed">1</span>');
    expect(html).toContain("&lt;&gt; → b@example.com");
    expect(html).toContain("mail waits in the spool for over an hour");
  });

  test("?limit=1 lists one row of each and says how many more", async () => {
    const html = await page("?limit=1");
    expect(html).toContain("and 1 more");
  });

  test.each(["?limit=0", "?limit=abc", "?limit=5001", "?limit=1.5"])("%s: 400 with the contract's JSON error", async (query) => {
    const res = await statusApp(sources()).request(`/status${query}`, { headers: basic("x", KEY) });
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({ status: "error", error: "invalid_request", message: expect.stringContaining("limit") });
  });

  test("no spool: says so; an edge that refuses the host's key: says the keys differ", async () => {
    const edge = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => Response.json({ status: "error", error: "unauthorized" }, { status: 401 }) });
    try {
      const html = await page("", { spool: null, edgeUrl: `http://127.0.0.1:${edge.port}` });
      expect(html).toContain("no spool (SPOOL_DIR is not set)");
      expect(html).toContain("its API_KEY secret is not one of the host's keys");
    } finally {
      await edge.stop(true);
    }
  });

  test("the edge's listing, escaped", async () => {
    const listing = {
      held: 1,
      oldest_held_age_seconds: 7200,
      failed: 0,
      complete: true,
      messages: [{ id: "20250101T000000000Z-0a1b2c3d", kind: "mail", from: `${SCRIPT}@x.example`, to: "u@example.com", size: 10, age_seconds: 7200, attempts: 3, next_attempt: null, last_reply: "host unreachable" }],
      failed_messages: [],
    };
    const edge = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: (req) => (req.headers.get("x-api-key") === KEY ? Response.json(listing) : new Response(null, { status: 401 })) });
    try {
      const html = await page("", { edgeUrl: `http://127.0.0.1:${edge.port}` });
      expect(html).toContain('<span id="edge-held">1</span> held, oldest 2.0h');
      expect(html).toContain("&lt;script&gt;alert(1)&lt;/script&gt;@x.example → u@example.com");
      expect(html).toContain("the edge holds mail for over an hour");
    } finally {
      await edge.stop(true);
    }
  });
});

describe("the last hour", () => {
  const MIN = 60_000;
  test("counts of the last sixty minutes, by the minute, as the clock moves on", () => {
    const r = new RecentCounts<"a" | "b">();
    const t0 = 1_000 * 60 * MIN; // a minute boundary
    r.add("a", 1, t0);
    r.add("a", 2, t0 + 30 * MIN);
    r.add("b", 5, t0 + 30 * MIN);
    expect(r.sum("a", t0 + 30 * MIN)).toBe(3);
    expect(r.sum("a", t0 + 59 * MIN + 59_000)).toBe(3);
    expect(r.sum("a", t0 + 60 * MIN)).toBe(2); // the first minute is now an hour back
    expect(r.sum("b", t0 + 89 * MIN)).toBe(5);
    expect(r.sum("b", t0 + 90 * MIN)).toBe(0);
    // The slot of minute 0 is reused by minute 120: nothing of minute 0 (or 60) is counted again.
    r.add("a", 7, t0 + 120 * MIN);
    expect(r.sum("a", t0 + 120 * MIN)).toBe(7);
    expect(r.sum("b", t0 + 120 * MIN)).toBe(0);
    // A clock that went back does not count the future.
    expect(r.sum("a", t0 + 119 * MIN)).toBe(0);
  });

  test("Metrics: lastHour beside the counts since start", () => {
    const m = new Metrics();
    m.inc("queued", 2);
    m.countAnswer("delivered");
    expect(m.lastHour("queued")).toBe(2);
    expect(m.lastHour("delivered")).toBe(1);
    expect(m.lastHour("delivered", Date.now() + 61 * MIN)).toBe(0);
    expect(m.get("delivered")).toBe(1);
  });
});
