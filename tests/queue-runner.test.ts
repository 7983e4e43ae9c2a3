// The background deliverer with a scripted deliver function (no LMTP): backoff, retries, the kick
// after a success, giving up (age, permanent refusal), stop(), and the operator's flush request.

import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import fc from "fast-check";
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, truncateSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import type { RecipientResult } from "../shared/contract.ts";
import { Metrics } from "../host/metrics.ts";
import { QueueRunner, afterAttempt, backoffMs, expired, type SpoolDeliver } from "../host/queue-runner.ts";
import { HEADER_RESERVED, type SpoolHeader, type SpoolState } from "../host/spool-file.ts";
import { Spool } from "../host/spool.ts";
import { allowSlowTests } from "./support/timeout.ts";
import { until } from "./support/wait.ts";

allowSlowTests();

let dir: string;
let spool: Spool;
let runner: QueueRunner | null = null;
let logs: Record<string, unknown>[] = [];

beforeEach(async () => {
  dir = await mkdtemp("/tmp/runner-test-");
  spool = new Spool(dir);
  spool.prepare();
  logs = [];
});

afterEach(async () => {
  await runner?.stop();
  runner = null;
  await rm(dir, { recursive: true, force: true });
});

const enc = new TextEncoder();

async function spoolMessage(text: string, to = ["user@example.test"], receivedAt = Date.now()): Promise<SpoolHeader> {
  const staged = spool.stage();
  await staged.write(enc.encode(text));
  return staged.commit({ from: "sender@example.org", to, received_at: receivedAt, message_id: null });
}

const reply = (address: string, code: number, text: string): RecipientResult => ({
  address,
  code,
  enhanced: text.match(/^\d\.\d+\.\d+/)?.[0] ?? null,
  reply: `${code} ${text}`,
});

interface Call {
  id: string;
  to: string[];
  body: string;
  at: number;
}

/** A deliver function that records each call and answers with `script(call)`. */
function scripted(script: (call: Call, n: number) => Promise<RecipientResult[]> | RecipientResult[]) {
  const calls: Call[] = [];
  const deliver: SpoolDeliver = async (envelope, body, _size, header) => {
    const call = { id: header.id, to: envelope.to, body: await new Response(body).text(), at: Date.now() };
    calls.push(call);
    return script(call, calls.length);
  };
  return { calls, deliver };
}

const queueFiles = () => readdirSync(join(dir, "queue")).sort();
const failedFiles = () => readdirSync(join(dir, "failed")).filter((n) => !n.endsWith(".state"));

describe("afterAttempt and expired: what becomes of a message, without I/O", () => {
  const state = (remaining: string[], refused?: SpoolState["refused"]): SpoolState => ({ attempts: 2, next_at: 0, last_reply: "451 busy", remaining, refused });

  test("every recipient accepted: delivered", () => {
    expect(afterAttempt(state(["a@x.org", "b@x.org"]), ["a@x.org", "b@x.org"], [reply("a@x.org", 250, "ok"), reply("b@x.org", 251, "ok")])).toEqual({ then: "delivered" });
  });

  test("a temporary reply or no reply at all: retried for those only, a refusal beside them remembered", () => {
    const next = afterAttempt(state(["a@x.org", "b@x.org", "c@x.org", "d@x.org"]), ["a@x.org", "b@x.org", "c@x.org", "d@x.org"], [
      reply("a@x.org", 250, "ok"),
      reply("b@x.org", 452, "4.2.2 full"),
      reply("c@x.org", 550, "5.1.1 unknown"),
    ]);
    expect(next).toEqual({
      then: "retry",
      state: { ...state([]), remaining: ["b@x.org", "d@x.org"], refused: [{ address: "c@x.org", reply: "550 5.1.1 unknown" }] },
      reply: "452 4.2.2 full; 451 4.3.0 no reply for this recipient",
      refusedNow: ["550 5.1.1 unknown"],
    });
  });

  test("nothing temporary left, a refusal now or earlier: given up on for the refused ones", () => {
    const earlier = [{ address: "c@x.org", reply: "550 5.1.1 unknown" }];
    expect(afterAttempt(state(["b@x.org"], earlier), ["b@x.org"], [reply("b@x.org", 250, "ok")])).toEqual({
      then: "give up",
      state: { ...state(["c@x.org"], earlier) },
      reason: "refused: 550 5.1.1 unknown",
    });
    expect(afterAttempt(state(["b@x.org"]), ["b@x.org"], [reply("b@x.org", 552, "5.2.2 over quota")])).toMatchObject({ then: "give up", reason: "refused: 552 5.2.2 over quota" });
  });

  test("expired: given up on for those still to do and those refused earlier", () => {
    const next = expired(state(["b@x.org"], [{ address: "c@x.org", reply: "550 5.1.1 unknown" }]), 121 * 3_600_000);
    expect(next).toEqual({
      then: "give up",
      state: state(["b@x.org", "c@x.org"], [{ address: "c@x.org", reply: "550 5.1.1 unknown" }]),
      reason: "expired after 121 h in the spool; last reply: 451 busy; refused earlier: 550 5.1.1 unknown",
    });
  });
});

describe("backoffMs", () => {
  test("grows with each attempt, doubles from the base, stops at the cap", () => {
    const mid = () => 0.5; // no jitter
    expect([1, 2, 3, 4, 5].map((a) => backoffMs(a, 1000, 60_000, mid))).toEqual([1000, 2000, 4000, 8000, 16000]);
    expect(backoffMs(7, 1000, 60_000, mid)).toBe(60_000);
    expect(backoffMs(50, 1000, 60_000, mid)).toBe(60_000);
    expect(backoffMs(5000, 1000, 60_000, mid)).toBe(60_000); // 2 ** 4999 is Infinity: still the cap
    expect(backoffMs(0, 1000, 60_000, mid)).toBe(1000);
  });

  test("jitter stays within +-20 % of the unjittered delay and actually spreads (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 40 }), fc.integer({ min: 1, max: 10_000 }), fc.integer({ min: 1, max: 10_000_000 }), fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), (attempts, base, cap, r) => {
        const exact = Math.min(cap, base * 2 ** (attempts - 1));
        const d = backoffMs(attempts, base, cap, () => r);
        return d >= Math.floor(exact * 0.8) && d <= Math.ceil(exact * 1.2);
      }),
      { seed: 4242, numRuns: 2000 },
    );
    const samples = new Set(Array.from({ length: 50 }, () => backoffMs(3, 1000, 60_000)));
    expect(samples.size).toBeGreaterThan(10);
    for (const s of samples) expect(s >= 3200 && s <= 4800).toBe(true);
  });

  test("monotone in attempts when the jitter is the same (property)", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 60 }), fc.integer({ min: 1, max: 5_000 }), fc.integer({ min: 1, max: 600_000 }), fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true }), (a, base, cap, r) => {
        return backoffMs(a + 1, base, cap, () => r) >= backoffMs(a, base, cap, () => r);
      }),
      { seed: 4243, numRuns: 2000 },
    );
  });
});

describe("retries", () => {
  test("temporary failures are retried with growing delays, then delivered; the state file records each attempt", async () => {
    const h = await spoolMessage("Subject: retry\r\n\r\nbody\r\n");
    const metrics = new Metrics();
    const { calls, deliver } = scripted((c, n) => (n <= 4 ? [reply(c.to[0]!, 451, "4.3.0 Temporary failure")] : [reply(c.to[0]!, 250, "2.0.0 Saved")]));
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 40, maxBackoffMs: 10_000, metrics, log: (l) => logs.push(l) });

    let sawState = false;
    const watchState = setInterval(async () => {
      const e = await spool.read(h.id).catch(() => null);
      if (e && e.state.attempts >= 1 && e.state.last_reply === "451 4.3.0 Temporary failure") sawState = true;
    }, 5);
    await runner.start();
    await until("delivery", () => calls.length === 5 && runner!.size === 0);
    clearInterval(watchState);

    expect(calls.every((c) => c.body === "Subject: retry\r\n\r\nbody\r\n")).toBe(true);
    const gaps = calls.slice(1).map((c, i) => c.at - calls[i]!.at);
    // Attempt n waits backoffMs(n) = 40 * 2^(n-1) +-20 %: 32+, 64+, 128+, 256+ ms.
    expect(gaps[0]!).toBeGreaterThanOrEqual(30);
    expect(gaps[1]!).toBeGreaterThanOrEqual(62);
    expect(gaps[2]!).toBeGreaterThanOrEqual(126);
    expect(gaps[3]!).toBeGreaterThanOrEqual(254);
    expect(gaps[3]!).toBeGreaterThan(gaps[0]!);
    expect(sawState).toBe(true);
    expect(queueFiles()).toEqual([]);
    expect(metrics.get("spool_retried")).toBe(4);
    expect(metrics.get("spool_delivered")).toBe(1);
    const retries = logs.filter((l) => l.event === "spool_retry").map((l) => l.attempts);
    expect(retries).toEqual([1, 2, 3, 4]);
  });

  test("a thrown fault (LMTP down) is a temporary failure too, with its message as the last reply", async () => {
    const h = await spoolMessage("x");
    const { calls, deliver } = scripted(() => {
      throw new Error("LMTP connect to 127.0.0.1:1 failed: ECONNREFUSED");
    });
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000 });
    await runner.start();
    await until("first attempt", () => calls.length === 1);
    await until("state saved", () => existsSync(join(dir, "queue", `${h.id}.state`)));
    const e = await spool.read(h.id);
    expect(e.state.attempts).toBe(1);
    expect(e.state.last_reply).toContain("ECONNREFUSED");
    expect(e.state.next_at).toBeGreaterThan(Date.now() + 40_000);
    expect(runner.size).toBe(1);
  });

  test("only the recipients that failed temporarily are tried again", async () => {
    await spoolMessage("x", ["a@example.test", "b@example.test", "c@example.test"]);
    const { calls, deliver } = scripted((c, n) =>
      n === 1 ? [reply("a@example.test", 250, "2.0.0 ok"), reply("b@example.test", 452, "4.2.2 Mailbox full"), reply("c@example.test", 250, "2.0.0 ok")] : c.to.map((a) => reply(a, 250, "2.0.0 ok")),
    );
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20 });
    await runner.start();
    await until("delivered", () => runner!.size === 0 && calls.length === 2);
    expect(calls.map((c) => c.to)).toEqual([["a@example.test", "b@example.test", "c@example.test"], ["b@example.test"]]);
    expect(queueFiles()).toEqual([]);
  });

  test("a success makes every waiting message due at once (the kick)", async () => {
    for (let i = 0; i < 3; i++) await spoolMessage(`message ${i}`);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { calls, deliver } = scripted(async (c, n) => {
      if (n <= 2) return [reply(c.to[0]!, 451, "4.3.0 later")];
      if (n === 3) await gate;
      return [reply(c.to[0]!, 250, "2.0.0 Saved")];
    });
    // One at a time, and a first retry a minute away: only the kick can bring the two back soon.
    runner = new QueueRunner(spool, deliver, { concurrency: 1, baseBackoffMs: 60_000, maxBackoffMs: 60_000 });
    await runner.start();
    await until("three attempts under way", () => calls.length === 3);
    expect(runner.size).toBe(3);
    release();
    await until("all delivered after the kick", () => runner!.size === 0, 5_000);
    expect(calls.length).toBe(5);
    expect(new Set(calls.slice(3).map((c) => c.id))).toEqual(new Set(calls.slice(0, 2).map((c) => c.id)));
  });

  test("kick() from outside (a direct delivery worked) also makes waiting messages due", async () => {
    await spoolMessage("x");
    let fail = true;
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, fail ? 451 : 250, fail ? "4.3.0 later" : "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000 });
    await runner.start();
    await until("first attempt", () => calls.length === 1);
    await Bun.sleep(50);
    fail = false;
    runner.kick();
    await until("delivered", () => runner!.size === 0, 5_000);
  });

  test("a kick hurries a message once per backoff: failing again when hurried, it waits for an attempt on its own schedule before another kick counts", async () => {
    await spoolMessage("to a full mailbox");
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 452, "4.2.2 Mailbox full")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 2_000, maxBackoffMs: 2_000 });
    await runner.start();
    await until("first attempt", () => calls.length === 1);
    await Bun.sleep(50);
    runner.kick();
    await until("the hurried attempt", () => calls.length === 2);
    await Bun.sleep(50); // its failure noted
    for (let i = 0; i < 10; i++) runner.kick();
    await Bun.sleep(100);
    expect(calls.length).toBe(2); // kicks in vain until its own next attempt
    await until("its own next attempt", () => calls.length === 3, 5_000);
    await Bun.sleep(50);
    runner.kick();
    await until("hurried again after it", () => calls.length === 4, 5_000);
  });

  test("messages added while running wait their first backoff, then go", async () => {
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 100 });
    await runner.start();
    const h = await spoolMessage("added");
    runner.add(h, "451 4.3.0 first try failed");
    expect(runner.size).toBe(1);
    expect(runner.stats().queued).toBe(1);
    await until("delivered", () => runner!.size === 0);
    expect(calls.map((c) => c.id)).toEqual([h.id]);
    expect(queueFiles()).toEqual([]);
  });

  test("a message delivered right after add() leaves no state file behind (slow disk)", async () => {
    const { deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000 });
    await runner.start();
    // The state write of add() is slow; the delivery (after a kick) is quick.
    const save = spool.saveState.bind(spool);
    spool.saveState = async (...args) => {
      await Bun.sleep(200);
      return save(...args);
    };
    const h = await spoolMessage("fast");
    runner.add(h, "451 4.3.0 busy");
    runner.kick();
    await until("delivered", () => runner!.size === 0);
    await Bun.sleep(400);
    expect(queueFiles()).toEqual([]);
  });
});

describe("giving up", () => {
  test("past the maximum age: moved to failed/ with the last reply in the reason, counted", async () => {
    const h = await spoolMessage("too old", ["user@example.test"]);
    const metrics = new Metrics();
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 452, "4.2.2 Mailbox full")]);
    runner = new QueueRunner(spool, deliver, { maxAgeMs: 300, baseBackoffMs: 40, maxBackoffMs: 80, metrics, log: (l) => logs.push(l) });
    await runner.start();
    // The file reaches failed/ before the move is done (its queue/ state removed, the runner told).
    await until("failed", () => failedFiles().length === 1 && runner!.size === 0, 5_000);
    expect(calls.length).toBeGreaterThanOrEqual(1);
    const [e] = await spool.list("failed");
    expect(e!.header.id).toBe(h.id);
    expect(e!.state.reason).toContain("expired");
    expect(e!.state.reason).toContain("452 4.2.2 Mailbox full");
    expect(queueFiles()).toEqual([]);
    expect(runner.size).toBe(0);
    expect(metrics.get("spool_failed")).toBe(1);
    expect(runner.stats().failed).toBe(1);
    expect(metrics.render()).toContain("relay_spool_failed_total 1");
    expect(logs.some((l) => l.event === "spool_failed" && String(l.reason).includes("452"))).toBe(true);
    // Kept, bytes and all.
    expect(readFileSync(join(dir, "failed", h.id), "latin1").slice(-7)).toBe("too old");
  });

  test("a message older than the maximum age when the host starts is not attempted at all", async () => {
    await spoolMessage("ancient", ["user@example.test"], Date.now() - 6 * 24 * 3_600_000);
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver);
    await runner.start();
    await until("failed", () => failedFiles().length === 1);
    expect(calls).toEqual([]);
    expect((await spool.list("failed"))[0]!.state.reason).toMatch(/^expired after 144 h/);
  });

  test("a permanent refusal (5xx) of a spooled message: failed/ with the reply as reason, no more attempts", async () => {
    const h = await spoolMessage("refused");
    const metrics = new Metrics();
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 550, "5.1.1 <user@example.test> User doesn't exist")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, metrics });
    await runner.start();
    await until("failed", () => failedFiles().length === 1);
    await Bun.sleep(100);
    expect(calls.length).toBe(1);
    const [e] = await spool.list("failed");
    expect(e!.header.id).toBe(h.id);
    expect(e!.state.reason).toBe("refused: 550 5.1.1 <user@example.test> User doesn't exist");
    expect(metrics.get("spool_failed")).toBe(1);
    expect(metrics.get("spool_delivered")).toBe(0);
  });

  test("one recipient refused for good, another deferred: after the other is delivered, failed/ keeps it for the refused one", async () => {
    const h = await spoolMessage("mixed", ["gone@example.test", "full@example.test", "ok@example.test"]);
    const metrics = new Metrics();
    const { calls, deliver } = scripted((c, n) =>
      n === 1
        ? [reply("gone@example.test", 550, "5.1.1 <gone@example.test> User doesn't exist"), reply("full@example.test", 452, "4.2.2 Mailbox full"), reply("ok@example.test", 250, "2.0.0 ok")]
        : c.to.map((a) => reply(a, 250, "2.0.0 ok")),
    );
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, metrics, log: (l) => logs.push(l) });
    await runner.start();
    await until("settled", () => runner!.size === 0);
    expect(calls.map((c) => c.to)).toEqual([["gone@example.test", "full@example.test", "ok@example.test"], ["full@example.test"]]);
    const [e] = await spool.list("failed");
    expect(e?.header.id).toBe(h.id);
    expect(e!.state.reason).toBe("refused: 550 5.1.1 <gone@example.test> User doesn't exist");
    expect(e!.state.remaining).toEqual(["gone@example.test"]);
    expect(metrics.get("spool_failed")).toBe(1);
    expect(logs.some((l) => l.event === "spool_refused")).toBe(true);

    // The operator fixes the mailbox and retries: only the refused recipient gets it now.
    await spool.retryFailed(h.id);
    spool.requestFlush();
    await until("retried", () => calls.length === 3 && runner!.size === 0);
    expect(calls[2]!.to).toEqual(["gone@example.test"]);
    expect(failedFiles()).toEqual([]);
  });

  test("a refusal among delivered recipients: failed/ names only the refused one", async () => {
    const h = await spoolMessage("mixed", ["gone@example.test", "ok@example.test"]);
    const { deliver } = scripted(() => [reply("gone@example.test", 550, "5.1.1 no such user"), reply("ok@example.test", 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20 });
    await runner.start();
    await until("failed", () => failedFiles().length === 1);
    const [e] = await spool.list("failed");
    expect(e!.header.id).toBe(h.id);
    expect(e!.state.remaining).toEqual(["gone@example.test"]);
  });

  test("an answer without replies is not taken for a delivery", async () => {
    await spoolMessage("x", ["a@example.test", "b@example.test"]);
    const { calls, deliver } = scripted((c, n) => (n === 1 ? [] : n === 2 ? [reply("a@example.test", 250, "2.0.0 ok")] : c.to.map((a) => reply(a, 250, "2.0.0 ok"))));
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20 });
    await runner.start();
    await until("delivered", () => runner!.size === 0);
    expect(calls.map((c) => c.to)).toEqual([["a@example.test", "b@example.test"], ["a@example.test", "b@example.test"], ["b@example.test"]]);
  });

  test("a file damaged after it was loaded is never offered to LMTP nor retried: logged, counted, left in queue/ for the operator", async () => {
    const h = await spoolMessage("x".repeat(1000));
    let fail = true;
    const metrics = new Metrics(() => runner!.stats());
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, fail ? 451 : 250, "4.3.0 later")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 30, maxBackoffMs: 30, metrics, log: (l) => logs.push(l) });
    await runner.start();
    await until("first attempt", () => calls.length >= 1);
    truncateSync(join(dir, "queue", h.id), HEADER_RESERVED + 10);
    fail = false;
    await until("noticed", () => logs.some((l) => l.event === "spool_unreadable"));
    expect(runner.size).toBe(0);
    const line = logs.find((l) => l.event === "spool_unreadable")!;
    expect(line.file).toBe(`queue/${h.id}`);
    expect(line.problem).toBe("truncated: 10 of 1000 bytes");
    expect(line.reason).toContain("451 4.3.0 later");
    expect(runner.stats().unreadable).toBe(1);
    expect(metrics.render()).toContain("relay_spool_unreadable_files 1");
    await Bun.sleep(200);
    expect(calls.length).toBe(1); // the damaged bytes were never offered to LMTP
    expect(queueFiles()).toContain(h.id);
    expect(statSync(join(dir, "queue", h.id)).size).toBe(HEADER_RESERVED + 10);
    expect(failedFiles()).toEqual([]);
    expect(metrics.get("spool_failed")).toBe(0);
  });

  test("unreadable files found at start (junk, a directory, a link, in queue/ and failed/) are logged and counted, left where they are; the readable message is delivered", async () => {
    const h = await spoolMessage("readable");
    writeFileSync(join(dir, "queue", "0000000000junk"), "junk");
    mkdirSync(join(dir, "queue", "0000000000adirectory"));
    symlinkSync("/etc/passwd", join(dir, "queue", "0000000000passwd"));
    writeFileSync(join(dir, "failed", "0000000000oldjunk"), "junk");
    const before = readdirSync(join(dir, "queue")).filter((n) => n !== h.id).sort();
    const metrics = new Metrics(() => runner!.stats());
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { metrics, log: (l) => logs.push(l) });
    await runner.start();
    await runner.drained(10);
    expect(calls.map((c) => c.id)).toEqual([h.id]);
    const reported = logs.filter((l) => l.event === "spool_unreadable").map((l) => `${l.file}: ${l.problem}`).sort();
    expect(reported).toEqual([
      "failed/0000000000oldjunk: not a spool file (no spool header)",
      "queue/0000000000adirectory: a directory, not a spool file",
      "queue/0000000000junk: not a spool file (no spool header)",
      "queue/0000000000passwd: a symbolic link, not a spool file (not followed)",
    ]);
    expect(runner.stats()).toMatchObject({ queued: 0, failed: 1, unreadable: 4 });
    const text = metrics.render();
    expect(text).toContain("relay_spool_unreadable_files 4");
    expect(text).toContain("relay_spool_failed_messages 1");
    expect(readdirSync(join(dir, "queue")).sort()).toEqual(before);
    expect(readdirSync(join(dir, "failed"))).toEqual(["0000000000oldjunk"]);

    // Once the operator removed them, the next look (a flush) says so.
    for (const n of before) rmSync(join(dir, "queue", n), { recursive: true });
    await runner.flush();
    expect(runner.stats().unreadable).toBe(1);
  });

  test("a file that vanished from queue/ is forgotten, not retried in a loop", async () => {
    const h = await spoolMessage("gone");
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 451, "4.3.0 later")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 20, maxAgeMs: 200, log: (l) => logs.push(l) });
    await runner.start();
    await until("first attempt", () => calls.length >= 1);
    rmSync(join(dir, "queue", h.id));
    await until("forgotten", () => runner!.size === 0, 3_000);
    const before = logs.length;
    await Bun.sleep(300);
    expect(logs.length - before).toBeLessThan(5); // no tight loop of errors
    expect(failedFiles()).toEqual([]);
  });
});

const errno = (code: string, syscall: string) => Object.assign(new Error(`${code}: ${syscall} failed`), { code, syscall });

describe("what an attempt decided holds, whatever the disk does after it", () => {
  test("delivered messages whose removal fails (queue/ read-only) are never offered to LMTP again: the removal is retried with growing delays, then they go", async () => {
    const sent = [await spoolMessage("one"), await spoolMessage("two"), await spoolMessage("three")];
    const metrics = new Metrics();
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 Saved")]);
    let readOnly = true;
    const remove = spool.remove.bind(spool);
    const removals: number[] = [];
    spool.remove = async (id) => {
      removals.push(Date.now());
      if (readOnly) throw errno("EROFS", "unlink");
      return remove(id);
    };
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 400, metrics, log: (l) => logs.push(l) });
    await runner.start();
    await until("each delivered once", () => calls.length === 3);
    await Bun.sleep(600);
    expect(calls.map((c) => c.id).sort()).toEqual(sent.map((h) => h.id).sort());
    expect(runner.size).toBe(3);
    expect(metrics.get("spool_delivered")).toBe(3);
    // 20 ms doubling to 400 ms: a handful of tries each in 600 ms, never a busy loop.
    expect(removals.length).toBeLessThan(3 * 8);
    const errors = logs.filter((l) => l.event === "spool_error");
    expect(errors.length).toBe(removals.length);
    expect(String(errors[0]!.error)).toContain("delivered, but not removed from queue/");
    expect(String(errors[0]!.error)).toContain("EROFS");

    // A later success elsewhere (a kick) does not hurry them either.
    runner.kick();
    readOnly = false;
    await until("removed", () => runner!.size === 0, 5_000);
    expect(calls.length).toBe(3);
    expect(queueFiles()).toEqual([]);
    expect(metrics.get("spool_delivered")).toBe(3);
  });

  test("a message given up on whose move to failed/ fails is not offered to LMTP again; the move is retried", async () => {
    const h = await spoolMessage("refused");
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 550, "5.1.1 unknown user")]);
    let readOnly = true;
    const move = spool.moveToFailed.bind(spool);
    spool.moveToFailed = async (...args) => {
      if (readOnly) throw errno("EROFS", "rename");
      return move(...args);
    };
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 50, log: (l) => logs.push(l) });
    await runner.start();
    await until("tried to move it twice", () => logs.filter((l) => l.event === "spool_error").length >= 2);
    readOnly = false;
    await until("in failed/", () => failedFiles().includes(h.id));
    expect(calls.length).toBe(1);
  });

  test("a state file of another shape (refused: {}) is read as not tried yet: delivered once, no loop", async () => {
    const h = await spoolMessage("odd state");
    writeFileSync(join(dir, "queue", `${h.id}.state`), JSON.stringify({ attempts: 2, next_at: 0, last_reply: "451 busy", remaining: ["user@example.test"], refused: {} }));
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 Saved")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 20, log: (l) => logs.push(l) });
    await runner.start();
    await until("delivered", () => runner!.size === 0);
    await Bun.sleep(200);
    expect(calls.length).toBe(1);
    expect(logs.filter((l) => l.event === "spool_error")).toEqual([]);
  });

  test("a record of an earlier delivery (a duplicate answer from the deliverer) does not kick the others", async () => {
    // Oldest first: the waiting one is tried (and deferred) before the known one comes back as a duplicate.
    const waiting = await spoolMessage("waiting");
    await Bun.sleep(2);
    await spoolMessage("known");
    const { calls, deliver } = scripted((c) => (c.id === waiting.id ? [reply(c.to[0]!, 451, "4.3.0 later")] : [{ ...reply(c.to[0]!, 250, "2.0.0 already delivered"), duplicate: true }]));
    runner = new QueueRunner(spool, deliver, { concurrency: 1, baseBackoffMs: 60_000, maxBackoffMs: 60_000 });
    await runner.start();
    await until("the known one settled", () => runner!.size === 1 && calls.length === 2);
    await Bun.sleep(100);
    expect(calls.length).toBe(2); // the waiting one was not made due by a delivery that did not happen now
  });
});

describe("a read that fails for a reason that passes (out of file descriptors)", () => {
  test("EMFILE opening a queued message: retried later and delivered, never reported unreadable nor dropped from the schedule", async () => {
    const h = await spoolMessage("fine on disk");
    const metrics = new Metrics(() => runner!.stats());
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 Saved")]);
    let failures = 3;
    const body = spool.body.bind(spool);
    spool.body = async (id) => {
      if (failures-- > 0) throw errno("EMFILE", "open");
      return body(id);
    };
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 40, metrics, log: (l) => logs.push(l) });
    await runner.start();
    await until("delivered", () => runner!.size === 0);
    expect(calls.map((c) => c.id)).toEqual([h.id]);
    expect(logs.filter((l) => l.event === "spool_unreadable")).toEqual([]);
    expect(logs.filter((l) => l.event === "spool_read_error").length).toBe(3);
    expect(logs.filter((l) => l.event === "spool_retry").map((l) => l.attempts)).toEqual([1, 2, 3]);
    expect(runner.stats().unreadable).toBe(0);
  });

  test("EMFILE while the queue is read at start: the file is looked at again later and delivered", async () => {
    const h = await spoolMessage("read later");
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 Saved")]);
    let failures = 2;
    const read = spool.read.bind(spool);
    spool.read = async (id, area) => {
      if (id === h.id && failures-- > 0) throw errno("EMFILE", "open");
      return read(id, area);
    };
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 20, maxBackoffMs: 40, log: (l) => logs.push(l) });
    await runner.start();
    expect(runner.size).toBe(0);
    await until("delivered", () => calls.length === 1);
    expect(calls[0]!.id).toBe(h.id);
    expect(logs.filter((l) => l.event === "spool_unreadable")).toEqual([]);
    expect(logs.filter((l) => l.event === "spool_read_error").map((l) => l.file)).toEqual([`queue/${h.id}`, `queue/${h.id}`]);
  });
});

describe("queuedAs: what the receiving side asks of a repeat", () => {
  test("a queued message is found by its digest and a recipient still to do (ASCII case folded), until it is delivered", async () => {
    const staged = spool.stage();
    await staged.write(enc.encode("queued"));
    const digest = "ab".repeat(32);
    const h = await staged.commit({ from: "", to: ["a@example.test", "b@example.test"], received_at: Date.now(), message_id: null, sha256: digest });
    let answer = 451;
    const { calls, deliver } = scripted((c) => c.to.map((a) => reply(a, a === "a@example.test" ? 250 : answer, "x")));
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000, maxBackoffMs: 60_000 });
    await runner.start();
    expect(runner.queuedAs(digest, "A@example.test")).toBe(h.id);
    expect(runner.queuedAs(digest, "\u212a@example.test")).toBeNull();
    expect(runner.queuedAs("cd".repeat(32), "a@example.test")).toBeNull();
    await until("first attempt", () => calls.length === 1);
    expect(runner.queuedAs(digest, "a@example.test")).toBeNull(); // delivered to a: only b is still to do
    expect(runner.queuedAs(digest, "b@example.test")).toBe(h.id);
    answer = 250;
    runner.kick();
    await until("delivered", () => runner!.size === 0);
    expect(runner.queuedAs(digest, "b@example.test")).toBeNull();
  });
});

describe("stop and flush", () => {
  test("stop() waits for the delivery under way and starts no new one", async () => {
    await spoolMessage("a");
    await spoolMessage("b");
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { calls, deliver } = scripted(async (c) => {
      await gate;
      return [reply(c.to[0]!, 250, "2.0.0 ok")];
    });
    runner = new QueueRunner(spool, deliver, { concurrency: 1 });
    await runner.start();
    await until("first attempt", () => calls.length === 1);

    let stopped = false;
    const stopping = runner.stop().then(() => (stopped = true));
    await Bun.sleep(150);
    expect(stopped).toBe(false);
    release();
    await stopping;
    expect(stopped).toBe(true);
    // The one under way finished (and left the spool); the other was not started.
    expect(calls.length).toBe(1);
    expect(queueFiles().filter((n) => !n.endsWith(".state")).length).toBe(1);
    await Bun.sleep(100);
    expect(calls.length).toBe(1);
  });

  test("a flush request picks up a message put back by retryFailed and delivers it at once", async () => {
    const h = await spoolMessage("from failed");
    await spool.moveToFailed(h.id, "refused: 550 5.1.1 no such user (fixed since)");
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, 250, "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000, log: (l) => logs.push(l) });
    await runner.start();
    await Bun.sleep(50);
    expect(calls).toEqual([]);
    expect(runner.stats().failed).toBe(1);

    await spool.retryFailed(h.id);
    spool.requestFlush(); // what `queue retry ID` does; the runner only watches the directory
    await until("delivered after the flush request", () => calls.length === 1 && runner!.size === 0, 5_000);
    expect(calls[0]!.id).toBe(h.id);
    expect(calls[0]!.body).toBe("from failed");
    expect(failedFiles()).toEqual([]);
    await until("flush file removed", () => !existsSync(join(dir, "flush-requested")));
    expect(runner.stats().failed).toBe(0);
  });

  test("a flush request makes messages waiting on their backoff due at once", async () => {
    await spoolMessage("waiting");
    let fail = true;
    const { calls, deliver } = scripted((c) => [reply(c.to[0]!, fail ? 451 : 250, fail ? "4.3.0 later" : "2.0.0 ok")]);
    runner = new QueueRunner(spool, deliver, { baseBackoffMs: 60_000 });
    await runner.start();
    await until("first attempt", () => calls.length === 1);
    fail = false;
    spool.requestFlush();
    await until("delivered after flush", () => runner!.size === 0, 5_000);
    expect(calls.length).toBe(2);
  });

  test("start() loads what a previous process left, due at once, and stats() reports its age", async () => {
    await spoolMessage("left over", ["user@example.test"], Date.now() - 60_000);
    await spool.saveState((await spool.list())[0]!.header.id, { attempts: 9, next_at: Date.now() + 3_600_000, last_reply: "451", remaining: ["user@example.test"] });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { calls, deliver } = scripted(async (c) => {
      await gate;
      return [reply(c.to[0]!, 250, "2.0.0 ok")];
    });
    runner = new QueueRunner(spool, deliver, { log: (l) => logs.push(l) });
    await runner.start();
    await until("attempted at once despite the saved next_at", () => calls.length === 1);
    const s = runner.stats();
    expect(s.queued).toBe(1);
    expect(s.oldestAgeSeconds).toBeGreaterThanOrEqual(59);
    expect(logs.some((l) => l.event === "spool_recovered" && l.messages === 1)).toBe(true);
    release();
    await runner.drained(10);
    expect(runner.stats()).toEqual({ queued: 0, failed: 0, unreadable: 0, oldestAgeSeconds: 0 });
  });
});

describe("a spool that cannot be listed", () => {
  test("start() and a flush request log the error instead of throwing (an unhandled rejection would stop the host)", async () => {
    const { deliver, calls } = scripted(() => []);
    rmSync(join(dir, "queue"), { recursive: true });
    runner = new QueueRunner(spool, deliver, { log: (l) => logs.push(l) });
    await runner.start();
    await runner.flush();
    const errors = logs.filter((l) => l.event === "spool_error");
    expect(errors.length).toBe(2);
    expect(String(errors[0]!.error)).toContain("cannot list the spool");
    expect(String(errors[0]!.error)).toContain("ENOENT");
    expect(calls).toEqual([]);
  });
});
