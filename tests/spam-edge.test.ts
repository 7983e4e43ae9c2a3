// The Worker's side of the spam filter, in Bun on an in-memory R2 bucket (tests/support/memory-r2.ts)
// in front of a stand-in host: a deferral by the host's filter (429 spam_deferred) is thrown back to
// the sender and never held, even for a known recipient, while anyone else's 429 is a temporary
// failure like any other; a refusal (422 spam_rejected) is setReject with its 5.7.1 reason; the drain
// marks what it sends as already accepted (X-Already-Accepted), the live path never does, and a
// deferral answered to the drain is retried, never given up on. The same in workerd, with the real
// host and rspamd: tests/integration/spam-filter.test.ts.

import { afterAll, beforeAll, beforeEach, describe, expect, spyOn, test, type Mock } from "bun:test";
import type { Server } from "bun";
import { workerConfig } from "../edge/config.ts";
import { runDrain } from "../edge/drain-runner.ts";
import { email, type IncomingEmail } from "../worker.ts";
import { MemoryR2 } from "./support/memory-r2.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

const KEY = `skey_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const USER = "user@kuma8088.com";
const SENDER = "sender@example.org";

let host: Server<undefined>;
/** What the stand-in host answers next. */
let answer: () => Response = () => new Response(null, { status: 503 });
/** The X-Already-Accepted header of every request it got ("" when absent). */
let marks: string[] = [];
let consoleSpy: Mock<typeof console.log>;
const lines: Record<string, unknown>[] = [];

const DEFERRED = { status: "deferred", error: "spam_deferred", message: "451 4.7.1 Try again later: deferred by the spam filter (rspamd: soft reject, score 0.00 of 15.00)" };
const REJECTED = { status: "error", error: "spam_rejected", message: "550 5.7.1 Message refused as spam by the spam filter (rspamd, score 15.00 of 15.00): Gtube pattern" };
const delivered = () => Response.json({ status: "success", message: "Email delivered to LMTP", recipient: USER, recipients: [{ address: USER, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 <user@kuma8088.com> Saved" }] });

beforeAll(() => {
  host = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      await req.arrayBuffer();
      marks.push(req.headers.get("x-already-accepted") ?? "");
      return answer();
    },
  });
  consoleSpy = spyOn(console, "log").mockImplementation((...args: unknown[]) => {
    for (const a of args) {
      try {
        lines.push(JSON.parse(String(a)));
      } catch {}
    }
  });
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  consoleSpy.mockRestore();
  await host.stop(true);
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  marks = [];
  lines.length = 0;
});

type Msg = IncomingEmail & { rejects: string[] };
function incoming(subject: string): Msg {
  const raw = new TextEncoder().encode(`From: <${SENDER}>\r\nTo: <${USER}>\r\nSubject: ${subject}\r\nMessage-ID: <${crypto.randomUUID()}@example.org>\r\n\r\nhello\r\n`);
  const m: Msg = {
    from: SENDER,
    to: USER,
    headers: new Headers(),
    raw: new ReadableStream({
      start(c) {
        c.enqueue(raw);
        c.close();
      },
    }),
    rawSize: raw.length,
    rejects: [],
    setReject: (r) => void m.rejects.push(r),
  };
  return m;
}

/** The Worker's env: the stand-in host, the bucket, and the recipient known (an exact ALLOWED_RECIPIENTS entry). */
const env = (bucket: MemoryR2) => ({ API_KEY: KEY, DELL_API_ENDPOINT: `http://127.0.0.1:${host.port}/api/v1/inbound-mail`, POSTMASTER: `postmaster@kuma8088.com`, ALLOWED_RECIPIENTS: USER, EDGE_SPOOL: bucket });

/** email()'s outcome: null when it returned, the error it threw otherwise. */
const run = (msg: Msg, e: Record<string, unknown>) => email(msg, e).then(() => null, (err: Error) => err);

const held = (b: MemoryR2) => b.keys("queue/").filter((k) => !k.endsWith(".retry"));

describe("email() and the host's spam filter", () => {
  test("429 spam_deferred: thrown (the sender retries), nothing held although the recipient is known", async () => {
    const bucket = new MemoryR2();
    answer = () => Response.json(DEFERRED, { status: 429, headers: { "retry-after": "30" } });
    const msg = incoming("greylisted");
    const err = await run(msg, env(bucket));
    expect(err?.message).toContain("451 4.7.1 Try again later");
    expect(msg.rejects).toEqual([]);
    expect(held(bucket)).toEqual([]);
    expect(lines.find((l) => l.from === SENDER)).toMatchObject({ outcome: "retry", status: 429 });
    expect(marks).toEqual([""]);
  });

  test("a 429 that is not the host's own (a rate limit in front of it): a temporary failure like any other, held", async () => {
    const bucket = new MemoryR2();
    answer = () => new Response("Too Many Requests", { status: 429 });
    expect(await run(incoming("rate limited"), env(bucket))).toBeNull();
    expect(held(bucket)).toHaveLength(1);
  });

  test("422 spam_rejected: setReject with the filter's 5.7.1 reason, nothing held", async () => {
    const bucket = new MemoryR2();
    answer = () => Response.json(REJECTED, { status: 422 });
    const msg = incoming("gtube");
    expect(await run(msg, env(bucket))).toBeNull();
    expect(msg.rejects).toEqual([REJECTED.message]);
    expect(held(bucket)).toEqual([]);
  });
});

describe("the drain", () => {
  test("what it sends is marked X-Already-Accepted: true; delivered, it is gone from the bucket", async () => {
    const bucket = new MemoryR2();
    answer = () => new Response(null, { status: 503 });
    expect(await run(incoming("held"), env(bucket))).toBeNull();
    expect(held(bucket)).toHaveLength(1);
    answer = delivered;
    expect(await runDrain(workerConfig(env(bucket)), "flush", { log: () => {} })).toMatchObject({ delivered: 1, failed: 0 });
    expect(marks).toEqual(["", "true"]);
    expect(held(bucket)).toEqual([]);
  });

  test("a deferral answered to the drain (a host without the marker) is tried again later: no failed/, no notice", async () => {
    const bucket = new MemoryR2();
    answer = () => new Response(null, { status: 503 });
    expect(await run(incoming("held, then deferred"), env(bucket))).toBeNull();
    answer = () => Response.json(DEFERRED, { status: 429 });
    expect(await runDrain(workerConfig(env(bucket)), "flush", { log: () => {} })).toMatchObject({ delivered: 0, retried: 1, failed: 0 });
    expect(held(bucket)).toHaveLength(1);
    expect(bucket.keys("failed/")).toEqual([]);
    expect(lines.some((l) => l.event === "edge_notice")).toBe(false);
  });
});
