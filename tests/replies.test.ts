// The reply-code rule (shared/replies.ts): what a reply code means, the results the relay writes
// itself, which status and answer a set of results gives, and what each status means to the sender.

import { describe, expect, test } from "bun:test";
import {
  acceptedResult,
  alreadyQueuedResult,
  answerForReplies,
  duplicateResult,
  noReplyResult,
  outcomeForStatus,
  queuedResult,
  replyClass,
  statusForReplies,
} from "../shared/replies.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const replies = (...codes: number[]) => codes.map((code) => ({ code }));

describe("outcomeForStatus", () => {
  // Every row of the status table of docs/contract.md.
  test.each([
    [200, "accept"], // delivered
    [202, "accept"], // spooled, delivery later
    [400, "reject"], // malformed request, bad envelope
    [401, "retry"], // a key mix-up must never bounce mail
    [413, "reject"], // too large
    [415, "reject"], // wrong content type
    [422, "reject"], // LMTP permanent failure
    [503, "retry"], // LMTP temporary failure, down, timeout
    [500, "retry"], // anything unexpected
  ] as const)("status %d -> %s", (status, outcome) => {
    expect(outcomeForStatus(status)).toBe(outcome);
  });

  test.each([403, 404, 405, 408, 429, 502, 504, 301, 100])("unknown status %d is retried, never bounced", (status) => {
    expect(outcomeForStatus(status)).toBe("retry");
  });
});

describe("replyClass", () => {
  test.each([200, 220, 221, 250, 251, 252, 299])("%d is accepted", (code) => {
    expect(replyClass(code)).toBe("accepted");
  });

  test.each([500, 550, 552, 553, 554, 599])("%d is permanent", (code) => {
    expect(replyClass(code)).toBe("permanent");
  });

  // 4xx, and anything no step should answer: a retry can be undone (duplicate check), a bounce cannot.
  test.each([421, 450, 451, 452, 100, 199, 300, 334, 354, 399, 600, 999, 0, -250, 250.5, NaN])("%d is temporary", (code) => {
    expect(replyClass(code)).toBe("temporary");
  });
});

describe("statusForReplies", () => {
  test("every recipient 250 -> 200", () => {
    expect(statusForReplies(replies(250))).toBe(200);
    expect(statusForReplies(replies(250, 250, 250))).toBe(200);
  });

  test("251 and 252 are deliveries like 250", () => {
    expect(statusForReplies(replies(251))).toBe(200);
    expect(statusForReplies(replies(250, 251, 252))).toBe(200);
    expect(statusForReplies(replies(252, 550))).toBe(422);
  });

  test("a 3xx or 1xx is never a delivery nor a refusal -> 503", () => {
    expect(statusForReplies(replies(334))).toBe(503);
    expect(statusForReplies(replies(250, 199))).toBe(503);
    expect(statusForReplies(replies(550, 354))).toBe(503);
  });

  test("a code past 5xx is not taken as a refusal -> 503", () => {
    expect(statusForReplies(replies(600))).toBe(503);
  });

  test("only permanent refusals -> 422", () => {
    expect(statusForReplies(replies(550))).toBe(422);
    expect(statusForReplies(replies(552, 550))).toBe(422);
  });

  test("refusals that all say 5.3.4 (too big for the server: an MTA's SIZE) -> 413, the Worker's answer for a message too large", () => {
    const tooBig = { code: 552, enhanced: "5.3.4" };
    expect(statusForReplies([tooBig, tooBig])).toBe(413);
    expect(statusForReplies([{ code: 250 }, tooBig])).toBe(413);
    // 552 alone (no enhanced code, or another one) is a refusal like any: 422.
    expect(statusForReplies([{ code: 552, enhanced: null }])).toBe(422);
    expect(statusForReplies([tooBig, { code: 550, enhanced: "5.1.1" }])).toBe(422);
    // A temporary failure or a queued message still wins.
    expect(statusForReplies([tooBig, { code: 451, enhanced: "4.3.0" }])).toBe(503);
    const answer = answerForReplies([{ address: "a@x.org", code: 552, enhanced: "5.3.4", reply: "552 5.3.4 Message size exceeds fixed limit" }], ["a@x.org"]);
    expect(answer.status).toBe(413);
    expect(answer.body).toMatchObject({ status: "rejected", error: "payload_too_large", message: "552 5.3.4 Message size exceeds fixed limit" });
  });

  test("deliveries mixed with permanent refusals -> 422 (the refused ones bounce)", () => {
    expect(statusForReplies(replies(250, 550))).toBe(422);
    expect(statusForReplies(replies(550, 250, 250))).toBe(422);
  });

  test("any temporary failure -> 503, whatever the others got", () => {
    expect(statusForReplies(replies(450))).toBe(503);
    expect(statusForReplies(replies(250, 452))).toBe(503);
    expect(statusForReplies(replies(550, 451))).toBe(503);
    expect(statusForReplies(replies(250, 550, 421))).toBe(503);
  });

  test("a reply that is neither success nor failure (e.g. 354) is not a delivery -> 503", () => {
    expect(statusForReplies(replies(354))).toBe(503);
  });

  test("no replies at all confirm nothing -> 503, not 200", () => {
    expect(statusForReplies([])).toBe(503);
  });
});

describe("the results the relay writes itself", () => {
  test("accepted, queued and duplicate are 250 2.0.0, marked; no reply is 451 4.3.0", () => {
    expect(acceptedResult("a@x.org", "Email delivered to LMTP")).toEqual({ address: "a@x.org", code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Email delivered to LMTP" });
    expect(queuedResult("a@x.org", "0abc123def", "450 4.2.1 busy")).toEqual({
      address: "a@x.org",
      code: 250,
      enhanced: "2.0.0",
      reply: "250 2.0.0 queued as 0abc123def (LMTP: 450 4.2.1 busy)",
      queued: true,
    });
    expect(duplicateResult("a@x.org", "<m1@x.org>")).toEqual({ address: "a@x.org", code: 250, enhanced: "2.0.0", reply: "250 2.0.0 already delivered (Message-ID <m1@x.org>)", duplicate: true });
    expect(duplicateResult("a@x.org", null).reply).toBe("250 2.0.0 already delivered (the same bytes, no Message-ID)");
    expect(alreadyQueuedResult("a@x.org", "0abc123def")).toEqual({ address: "a@x.org", code: 250, enhanced: "2.0.0", reply: "250 2.0.0 already queued as 0abc123def; not taken again", queued: true });
    expect(statusForReplies([alreadyQueuedResult("a@x.org", "0abc123def")])).toBe(202);
    expect(noReplyResult("a@x.org")).toEqual({ address: "a@x.org", code: 451, enhanced: "4.3.0", reply: "451 4.3.0 no reply for this recipient" });
    expect(replyClass(noReplyResult("a@x.org").code)).toBe("temporary");
  });
});

describe("answerForReplies", () => {
  const saved = (address: string) => ({ address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 <${address}> Saved` });
  const refused = (address: string) => ({ address, code: 550, enhanced: "5.1.1", reply: `550 5.1.1 <${address}> User doesn't exist` });
  const busy = (address: string) => ({ address, code: 451, enhanced: "4.3.0", reply: `451 4.3.0 <${address}> busy` });

  test("delivered: 200 success, with the recipient when there is one", () => {
    const results = [saved("a@x.org")];
    expect(answerForReplies(results, ["a@x.org"])).toEqual({ status: 200, body: { status: "success", message: "Email delivered to LMTP", recipient: "a@x.org", recipients: results } });
    const two = [saved("a@x.org"), saved("b@x.org")];
    expect(answerForReplies(two, ["a@x.org", "b@x.org"]).body).toEqual({ status: "success", message: "Email delivered to LMTP", recipients: two });
  });

  test("every recipient a duplicate: 200 duplicate; one duplicate beside a delivery: success", () => {
    const dup = [duplicateResult("a@x.org", "<m@x.org>")];
    expect(answerForReplies(dup, ["a@x.org"]).body.status).toBe("duplicate");
    expect(answerForReplies(dup, ["a@x.org"]).status).toBe(200);
    expect(answerForReplies([...dup, saved("b@x.org")], ["a@x.org", "b@x.org"]).body.status).toBe("success");
  });

  test("queued: 202 queued", () => {
    const results = [queuedResult("a@x.org", "0abc123def", "451 busy"), refused("b@x.org")];
    expect(answerForReplies(results, ["a@x.org", "b@x.org"])).toEqual({
      status: 202,
      body: { status: "queued", message: "accepted into the durable spool; it will be delivered when Dovecot takes it", recipients: results },
    });
  });

  test("refused: 422 with the refusals as the message", () => {
    const results = [saved("a@x.org"), refused("b@x.org"), refused("c@x.org")];
    expect(answerForReplies(results, ["a@x.org", "b@x.org", "c@x.org"]).status).toBe(422);
    expect(answerForReplies(results, ["a@x.org", "b@x.org", "c@x.org"]).body).toEqual({
      status: "rejected",
      error: "lmtp_rejected",
      message: "550 5.1.1 <b@x.org> User doesn't exist; 550 5.1.1 <c@x.org> User doesn't exist",
      recipients: results,
    });
  });

  test("anything temporary: 503 deferred naming only what was not accepted", () => {
    const results = [saved("a@x.org"), busy("b@x.org"), refused("c@x.org")];
    expect(answerForReplies(results, ["a@x.org", "b@x.org", "c@x.org"])).toEqual({
      status: 503,
      body: {
        status: "deferred",
        error: "lmtp_deferred",
        message: "temporary failure: 451 4.3.0 <b@x.org> busy; 550 5.1.1 <c@x.org> User doesn't exist",
        recipients: results,
      },
    });
    expect(answerForReplies([], ["a@x.org"]).status).toBe(503);
  });
});
