// GET /metrics counts answers where they are decided: the app reports what each answered inbound
// request meant for its message (onAnswer), with no access log at all; the spool's gauge is read
// from what the host passes in.

import { describe, expect, test } from "bun:test";
import { Metrics } from "../host/metrics.ts";
import { TemporaryFailure, createApp, type Deliverer } from "../shared/app.ts";
import { INBOUND_PATH, type RecipientResult } from "../shared/contract.ts";
import { duplicateResult, queuedResult, type AnswerOutcome } from "../shared/replies.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const KEY = "metrics-test-key-0123456789abcdefghijklmnop";
const reply = (address: string, code: number): RecipientResult => ({ address, code, enhanced: null, reply: `${code} for ${address}` });

/** The app with a deliverer that answers `results` (or throws them), and no log. */
function appAnswering(results: RecipientResult[] | Error) {
  const outcomes: AnswerOutcome[] = [];
  const deliver: Deliverer = async ({ body }) => {
    if (body instanceof ReadableStream) await new Response(body).arrayBuffer();
    if (results instanceof Error) throw results;
    return results;
  };
  const app = createApp({ apiKeys: [KEY], deliver, log: () => {}, onAnswer: (o) => outcomes.push(o) });
  return { app, outcomes };
}

function post(app: ReturnType<typeof createApp>, headers: Record<string, string> = {}, body = "Subject: x\r\n\r\nhi\r\n") {
  return app.request(INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY, "X-Envelope-From": "s@example.org", "X-Envelope-To": "a@example.org", ...headers },
    body,
  });
}

describe("onAnswer: one outcome per answered inbound request, without reading the log", () => {
  const cases: [string, AnswerOutcome, () => RecipientResult[] | Error, number][] = [
    ["250", "delivered", () => [reply("a@example.org", 250)], 200],
    ["all duplicates", "duplicate", () => [duplicateResult("a@example.org", "<m@example.org>")], 200],
    ["spooled", "queued", () => [queuedResult("a@example.org", "0abc123def", "451 busy")], 202],
    ["550", "rejected", () => [reply("a@example.org", 550)], 422],
    ["451", "deferred", () => [reply("a@example.org", 451)], 503],
    ["TemporaryFailure", "deferred", () => new TemporaryFailure("LMTP down"), 503],
    ["a bug in the deliverer", "deferred", () => new Error("a bug"), 500],
  ];
  test.each(cases)("%s -> %s", async (_, outcome, results, status) => {
    const { app, outcomes } = appAnswering(results());
    expect((await post(app)).status).toBe(status);
    expect(outcomes).toEqual([outcome]);
  });

  test("refusals before delivery are counted as rejected; a wrong key and other routes are not counted", async () => {
    const { app, outcomes } = appAnswering([reply("a@example.org", 250)]);
    expect((await post(app, { "X-Envelope-To": "not an address" })).status).toBe(400);
    expect((await post(app, { "Content-Type": "text/plain" })).status).toBe(415);
    expect((await post(app, { "X-API-Key": "wrong-key-0123456789abcdefghijklmnopqr" })).status).toBe(401);
    expect((await app.request("/health")).status).toBe(200);
    expect(outcomes).toEqual(["rejected", "rejected"]);
  });
});

describe("Metrics", () => {
  test("countAnswer: every answer is received; each adds to its own counter (queued is counted when spooled)", () => {
    const m = new Metrics();
    for (const o of ["delivered", "delivered", "duplicate", "queued", "rejected", "deferred", "other"] as const) m.countAnswer(o);
    expect([m.get("received"), m.get("delivered"), m.get("duplicates"), m.get("queued"), m.get("rejected"), m.get("deferred")]).toEqual([7, 2, 1, 0, 1, 1]);
    expect(m.render()).toContain("relay_received_total 7\n");
  });

  test("the spool gauge is read from what was passed in, when rendered; none: zeros", () => {
    let queued = 3;
    const m = new Metrics(() => ({ queued, failed: 1, unreadable: 2, oldestAgeSeconds: 4.5 }));
    expect(m.render()).toContain("relay_spool_messages 3\n");
    queued = 5;
    const text = m.render();
    expect(text).toContain("relay_spool_messages 5\n");
    expect(text).toContain("relay_spool_failed_messages 1\n");
    expect(text).toContain("relay_spool_unreadable_files 2\n");
    expect(text).toContain("relay_spool_oldest_age_seconds 4.500\n");
    expect(new Metrics().render()).toContain("relay_spool_messages 0\n");
  });
});
