// The API key check on its own: which headers carry the key, and that every failure is 401 (the
// edge retries on 401; a 400 would bounce the mail).

import { describe, expect, test } from "bun:test";
import { Hono, type Context } from "hono";
import { apiKey } from "../../shared/middleware/api-key.ts";

const KEY_1 = "key1-0123456789abcdefghijklmnopqrstuv";
const KEY_2 = "key2-ZYXWVUTSRQPONMLKJIHGFEDCBA987654";

function appWith(keys: readonly string[]) {
  const refuse = (c: Context, message: string) => c.json({ status: "error", message }, 401);
  const app = new Hono();
  app.post("/in", apiKey(keys, refuse), (c) => c.text("passed"));
  return app;
}

const call = (app: Hono, headers: Record<string, string>) => app.request("/in", { method: "POST", headers });

describe("apiKey", () => {
  const app = appWith([KEY_1]);

  test("X-API-Key with the key passes", async () => {
    const r = await call(app, { "X-API-Key": KEY_1 });
    expect(r.status).toBe(200);
    expect(await r.text()).toBe("passed");
  });

  test("Authorization: Bearer with the key passes, in any case of 'Bearer'", async () => {
    expect((await call(app, { Authorization: `Bearer ${KEY_1}` })).status).toBe(200);
    expect((await call(app, { Authorization: `bearer ${KEY_1}` })).status).toBe(200);
  });

  test("no key -> 401 saying where to put one", async () => {
    const r = await call(app, {});
    expect(r.status).toBe(401);
    expect(((await r.json()) as { message: string }).message).toContain("X-API-Key");
  });

  test("a wrong key -> 401, in either header", async () => {
    expect((await call(app, { "X-API-Key": "invalid-key" })).status).toBe(401);
    expect((await call(app, { Authorization: "Bearer invalid-key" })).status).toBe(401);
    // A prefix or an extension of the right key is still wrong.
    expect((await call(app, { "X-API-Key": KEY_1.slice(0, -1) })).status).toBe(401);
    expect((await call(app, { "X-API-Key": `${KEY_1}x` })).status).toBe(401);
  });

  test.each([
    ["Basic credentials", `Basic ${btoa(`user:${KEY_1}`)}`],
    ["the bare key", KEY_1],
    ["another scheme", `Token ${KEY_1}`],
    ["Bearer without a token", "Bearer"],
    ["Bearer with two tokens", `Bearer ${KEY_1} extra`],
    ["an empty header", ""],
  ])("an Authorization header that is not 'Bearer <key>' (%s) -> 401, never 400", async (_name, value) => {
    const r = await call(app, { Authorization: value });
    expect(r.status).toBe(401);
  });

  test("an empty X-API-Key counts as missing -> 401", async () => {
    expect((await call(app, { "X-API-Key": "" })).status).toBe(401);
  });

  test("the 401 answer never echoes the key that was sent", async () => {
    const sent = "wrong-key-0123456789-do-not-echo";
    const r = await call(app, { "X-API-Key": sent });
    const body = await r.text();
    expect(body).not.toContain(sent.slice(0, 10));
  });

  test("several keys: each one passes, anything else does not", async () => {
    const rotating = appWith([KEY_1, KEY_2]);
    expect((await call(rotating, { "X-API-Key": KEY_1 })).status).toBe(200);
    expect((await call(rotating, { "X-API-Key": KEY_2 })).status).toBe(200);
    expect((await call(rotating, { Authorization: `Bearer ${KEY_2}` })).status).toBe(200);
    expect((await call(rotating, { "X-API-Key": "key3-0123456789abcdefghijklmnopqrstuv" })).status).toBe(401);
  });

  test("no keys configured is a programming error, not an open door", () => {
    expect(() => apiKey([], () => new Response(null, { status: 401 }))).toThrow();
  });
});
