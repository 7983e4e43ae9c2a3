// The access log on its own: one line per request, written when the answer is known, with the
// fields routes added, also when the route failed.

import { describe, expect, spyOn, test } from "bun:test";
import { Hono } from "hono";
import { requestId } from "hono/request-id";
import { jsonLines, type LogLine } from "../../shared/log.ts";
import { accessLog, logFields, type AccessLogEnv } from "../../shared/middleware/access-log.ts";

function appWith(lines: LogLine[]) {
  const app = new Hono<AccessLogEnv>();
  app.use(requestId(), accessLog((l) => lines.push(l)));
  app.post("/deliver", (c) => {
    logFields(c, { from: "a@x", to: ["b@y"] });
    logFields(c, { replies: ["250 2.0.0 Saved"] }); // a second call adds, it does not replace
    return c.json({ ok: true }, 200);
  });
  app.get("/boom", () => {
    throw new Error("boom");
  });
  app.onError((err, c) => {
    logFields(c, { error: err.message });
    return c.json({ error: true }, 500);
  });
  return app;
}

describe("accessLog", () => {
  test("one line per request, with method, path, status, ms, request_id and the route's fields", async () => {
    const lines: LogLine[] = [];
    const app = appWith(lines);
    const r = await app.request("/deliver", { method: "POST" });
    expect(r.status).toBe(200);
    expect(lines).toHaveLength(1);
    const line = lines[0]!;
    expect(line).toMatchObject({ method: "POST", path: "/deliver", status: 200, from: "a@x", to: ["b@y"], replies: ["250 2.0.0 Saved"] });
    expect(typeof line.ms).toBe("number");
    expect(line.request_id).toBe(r.headers.get("x-request-id")!);
    expect(Number.isNaN(Date.parse(String(line.time)))).toBe(false);
  });

  test("the client's X-Request-Id becomes the line's request_id", async () => {
    const lines: LogLine[] = [];
    const r = await appWith(lines).request("/deliver", { method: "POST", headers: { "X-Request-Id": "edge-42" } });
    expect(r.headers.get("x-request-id")).toBe("edge-42");
    expect(lines[0]!.request_id).toBe("edge-42");
  });

  test("a failed request is logged with the status onError chose and its fields", async () => {
    const lines: LogLine[] = [];
    const r = await appWith(lines).request("/boom");
    expect(r.status).toBe(500);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatchObject({ status: 500, error: "boom", path: "/boom" });
  });

  test("requests do not share fields", async () => {
    const lines: LogLine[] = [];
    const app = appWith(lines);
    await app.request("/deliver", { method: "POST" });
    await app.request("/nothing");
    expect(lines).toHaveLength(2);
    expect(lines[1]!.status).toBe(404);
    expect(lines[1]).not.toHaveProperty("from");
  });

  test("request headers (where keys travel) are not logged", async () => {
    const lines: LogLine[] = [];
    const secret = "secret-key-0123456789abcdefghijklmn";
    await appWith(lines).request("/deliver", { method: "POST", headers: { "X-API-Key": secret, Authorization: `Bearer ${secret}` } });
    expect(JSON.stringify(lines)).not.toContain(secret.slice(0, 10));
  });
});

describe("jsonLines", () => {
  test("writes each line as one line of JSON", () => {
    const spy = spyOn(console, "log").mockImplementation(() => {});
    let calls: unknown[][];
    try {
      jsonLines({ a: 1, text: "two\nlines" });
    } finally {
      calls = [...spy.mock.calls];
      spy.mockRestore();
    }
    expect(calls).toHaveLength(1);
    const written = String(calls[0]![0]);
    expect(written).not.toContain("\n");
    expect(JSON.parse(written)).toEqual({ a: 1, text: "two\nlines" });
  });
});
