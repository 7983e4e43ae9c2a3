// Issue 4, end to end: the relay as a child process (`bun run server.ts`) in front of a private
// real Dovecot, with the faults an operator meets: Dovecot down, the relay killed (SIGKILL) or
// stopped (SIGTERM) mid-delivery, Dovecot restarted under load, a stalled LMTP server, an
// unwritable spool. What was acknowledged (200/202) must end up in the mailbox exactly once;
// duplicates only where the outcome was unknown (and then counted).

import { describe, expect, test } from "bun:test";
import { readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { startFakeLmtp } from "../../fake-lmtp.ts";
import { expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { dovecotPerFile } from "../support/dovecot-per-file.ts";
import { freePort } from "../../scripts/free-port.ts";
import { runRelayCommand, startRelay, type RelayProcess } from "../support/relay-process.ts";
import { allowSlowTests } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const API_KEY = `spoolfaults_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const USER = "user@kuma8088.com";
const MiB = 1024 * 1024;
const RUN = Date.now().toString(36);

const { dv, tempDir: spoolDir } = dovecotPerFile("spool-faults");

function relayEnv(spool: string | null, lmtpPort = dv.port): Record<string, string> {
  const env: Record<string, string> = { API_KEY, LMTP_HOST: dv.host, LMTP_PORT: String(lmtpPort) };
  if (spool) env.SPOOL_DIR = spool;
  return env;
}

/** A ~2 KB message whose Message-ID is its marker. */
function smallMessage(marker: string): Uint8Array<ArrayBuffer> {
  const filler = Array.from({ length: 24 }, (_, i) => `line ${i} of ${marker}: ${"x".repeat(50)}`).join("\r\n");
  return new TextEncoder().encode(
    `From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: <${marker}@example.test>\r\nSubject: ${marker}\r\n\r\n${filler}\r\n`,
  );
}

function post(relay: RelayProcess, body: BodyInit, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(relay.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": API_KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER, ...headers },
    body,
  });
}

/** How many stored messages carry each marker (Message-ID). */
async function markersInMailbox(mailbox = dv): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  for (const m of await mailbox.messages(USER)) {
    const head = Buffer.from(m.subarray(0, 4096)).toString("latin1");
    const id = /^Message-ID: <([^>]+)@example\.test>$/im.exec(head)?.[1];
    if (id) counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

const spoolEmpty = async (relay: RelayProcess) => (await relay.metrics()).relay_spool_messages === 0;
const queueFiles = (dir: string) => readdirSync(join(dir, "queue"));

describe("the spool keeps what it acknowledged", () => {
  test("Dovecot stopped: 50 messages answered 202; relay SIGKILLed, restarted on the same spool, Dovecot started: all 50 delivered exactly once", async () => {
    const dir = await spoolDir();
    await dv.stop();
    let relay = await startRelay(relayEnv(dir));
    const markers = Array.from({ length: 50 }, (_, i) => `kill9-${RUN}-${i}`);
    const statuses = await Promise.all(markers.map(async (m) => (await post(relay, smallMessage(m))).status));
    expect(statuses).toEqual(markers.map(() => 202));
    expect((await relay.metrics()).relay_spool_messages).toBe(50);

    expect(await relay.kill("SIGKILL")).toBeNull();
    expect(queueFiles(dir).filter((n) => !n.endsWith(".state")).length).toBe(50);

    relay = await startRelay(relayEnv(dir));
    try {
      await relay.waitForLine((l) => l.event === "spool_recovered" && l.messages === 50, 10_000);
      await dv.start();
      await until("the spool drained", () => spoolEmpty(relay), 60_000, 100);
      const counts = await markersInMailbox();
      expect(markers.filter((m) => counts.get(m) !== 1)).toEqual([]);
      expect(counts.size).toBe(50);
      expect(queueFiles(dir)).toEqual([]);
      const m = await relay.metrics();
      expect(m.relay_spool_delivered_total).toBe(50);
      expect(m.relay_spool_failed_messages).toBe(0);
    } finally {
      await relay.kill("SIGKILL");
    }
  });

  // Dovecot answers "421 Shutting down" after the final dot when it stops while it saves, and the
  // message may be saved already: an unknown outcome, retried from the spool. With the documented
  // Dovecot setting (examples/dovecot/) that retry is recognised and dropped: none doubled.
  for (const exactlyOnce of [false, true]) {
    const expected = exactlyOnce ? "with the exactly-once setting: none missing, none doubled" : "none missing, doubles only where the outcome was unknown";
    test(`1,500 messages at concurrency 16 while Dovecot is restarted twice: ${expected}`, async () => {
      const target = exactlyOnce ? await startDovecot({ exactlyOnce: true }) : dv;
      try {
        await restartsUnderLoad(target, exactlyOnce);
      } finally {
        if (target !== dv) await target.dispose();
      }
    });
  }

  async function restartsUnderLoad(target: DovecotInstance, exactlyOnce: boolean): Promise<void> {
    const dir = await spoolDir();
    const relay = await startRelay({ ...relayEnv(dir, target.port), EXACTLY_ONCE: String(exactlyOnce) });
    const TOTAL = 1500;
    const CONCURRENCY = 16;
    const markers = Array.from({ length: TOTAL }, (_, i) => `load-${RUN}-${i}`);
    let next = 0;
    let done = 0;
    let senderRetries = 0;
    const finalStatus = new Map<number, number>();
    const errors: string[] = [];

    // A sending MTA: a 503 (or 5xx other than a refusal) means "try again later", a few times.
    async function sendOne(i: number): Promise<void> {
      const body = smallMessage(markers[i]!);
      for (let attempt = 1; attempt <= 40; attempt++) {
        let status: number;
        try {
          const rr = await post(relay, body);
          status = rr.status;
          await rr.arrayBuffer();
        } catch (e) {
          // The relay never drops a connection; if it did, the test must say so, not retry it away.
          errors.push(`${markers[i]}: ${(e as Error).message}`);
          return;
        }
        if (status === 503 || status === 500) {
          senderRetries++;
          await Bun.sleep(100 + Math.random() * 200);
          continue;
        }
        finalStatus.set(i, status);
        return;
      }
      errors.push(`${markers[i]}: still deferred after 40 attempts`);
    }

    const started = Date.now();
    const senders = Array.from({ length: CONCURRENCY }, async () => {
      while (next < TOTAL) {
        const i = next++;
        await sendOne(i);
        done++;
      }
    });

    // Dovecot goes away twice while the messages flow, for about a second each time.
    let returnedAt = 0;
    let emptyAt = 0;
    const chaos = (async () => {
      for (const at of [300, 900]) {
        await until(`${at} messages sent`, () => done >= at || next >= TOTAL, 90_000, 5);
        await target.stop();
        await Bun.sleep(1_000);
        await target.start();
        returnedAt = Date.now();
      }
      await until("spool empty after Dovecot's return", () => spoolEmpty(relay), 90_000, 50);
      emptyAt = Date.now();
    })();

    await Promise.all(senders);
    const sentMs = Date.now() - started;
    await chaos;
    await until("spool empty at the end", () => spoolEmpty(relay), 60_000, 100);

    const m = await relay.metrics();
    const counts = await markersInMailbox(target);
    const missing = markers.filter((mk) => !counts.has(mk));
    const doubled = [...counts.values()].reduce((n, c) => n + (c - 1), 0);
    const statusCounts: Record<string, number> = {};
    for (const s of finalStatus.values()) statusCounts[s] = (statusCounts[s] ?? 0) + 1;
    console.log(
      JSON.stringify({
        exactly_once: exactlyOnce,
        messages: TOTAL,
        concurrency: CONCURRENCY,
        answered: statusCounts,
        sender_retries: senderRetries,
        missing: missing.length,
        doubled,
        unknown_outcome: m.relay_unknown_outcome_total,
        queued_202: m.relay_queued_total,
        spool_delivered: m.relay_spool_delivered_total,
        spool_retried: m.relay_spool_retried_total,
        send_ms: sentMs,
        dovecot_return_to_empty_spool_ms: emptyAt - returnedAt,
      }),
    );

    await relay.kill("SIGTERM");
    expect(errors).toEqual([]);
    expect(finalStatus.size).toBe(TOTAL);
    for (const s of finalStatus.values()) expect([200, 202]).toContain(s);
    expect(missing).toEqual([]);
    expect(doubled).toBeLessThanOrEqual(m.relay_unknown_outcome_total!);
    if (exactlyOnce) expect(doubled).toBe(0);
    // Every acknowledged message reached Dovecot through one path or the other.
    expect(m.relay_delivered_total! + m.relay_queued_total!).toBe(TOTAL);
    expect(m.relay_spool_delivered_total).toBe(m.relay_queued_total);
    expect(m.relay_spool_failed_messages).toBe(0);
    // The restarts did cost something: some messages went through the spool.
    expect(m.relay_queued_total).toBeGreaterThan(0);
    expect(queueFiles(dir)).toEqual([]);
    expect(readdirSync(join(dir, "tmp"))).toEqual([]);
  }
});

describe("graceful stop", () => {
  // 20 MiB of 8-bit lines, streamed in 64 KiB chunks over about 3 s, SIGTERM after about 1 s.
  function bigMessage(marker: string): Uint8Array<ArrayBuffer> {
    const head = new TextEncoder().encode(`From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: <${marker}@example.test>\r\nSubject: ${marker}\r\n\r\n`);
    const out = new Uint8Array(20 * MiB);
    out.set(head);
    let x = 12345;
    let col = 0;
    for (let i = head.length; i < out.length - 2; i++) {
      if (col === 998) {
        out[i++] = 0x0d;
        out[i] = 0x0a;
        col = 0;
        continue;
      }
      x = (x * 1103515245 + 12345) >>> 0;
      let b = x >>> 24;
      if (b === 0x0d || b === 0x0a) b = 0x2e; // dots at line starts too
      out[i] = b;
      col++;
    }
    out.set([0x0d, 0x0a], out.length - 2);
    return out;
  }

  for (const dovecotUp of [true, false]) {
    test(`SIGTERM during a 20 MiB delivery (Dovecot ${dovecotUp ? "up" : "down"}): answered ${dovecotUp ? "200" : "202"}, and after restart the message is in Dovecot once, byte-exact`, async () => {
      const dir = await spoolDir();
      if (!dovecotUp) await dv.stop();
      let relay = await startRelay(relayEnv(dir));
      const marker = `sigterm-${dovecotUp ? "up" : "down"}-${RUN}`;
      const sent = bigMessage(marker);
      const CHUNK = 64 * 1024;
      let at = 0;
      let signalled = false;
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (at >= sent.length) return controller.close();
          if (at >= 5 * MiB && !signalled) {
            signalled = true;
            relay.proc.kill("SIGTERM"); // lands mid-request: a quarter of the body is sent
          }
          await Bun.sleep(8);
          controller.enqueue(sent.slice(at, at + CHUNK));
          at += CHUNK;
        },
      });
      const res = await post(relay, body);
      expect(signalled).toBe(true);
      const answer = await res.json();
      expect([200, 202]).toContain(res.status);
      expect(res.status).toBe(dovecotUp ? 200 : 202);
      expect(answer.status).toBe(dovecotUp ? "success" : "queued");
      expect(await relay.exited).toBe(0);
      expect(relay.lines.some((l) => l.event === "shutdown" && l.signal === "SIGTERM")).toBe(true);
      expect(relay.lines.some((l) => l.event === "stopped")).toBe(true);

      if (!dovecotUp) await dv.start();
      relay = await startRelay(relayEnv(dir));
      try {
        await until("the spool drained", () => spoolEmpty(relay), 60_000, 100);
        const stored = await dv.messages(USER);
        expect(stored.length).toBe(1);
        expectStoredAs(stored[0]!, sent);
        expect(queueFiles(dir)).toEqual([]);
      } finally {
        await relay.kill("SIGKILL");
      }
    });
  }
});

describe("answers within the edge's deadline", () => {
  test("an LMTP server that stalls after DATA, default timeouts: 202 with a spool, 503 without, both well inside 25 s", async () => {
    const fake = await startFakeLmtp();
    fake.behaviour.stall = "afterData";
    const dir = await spoolDir();
    const withSpool = await startRelay(relayEnv(dir, fake.port));
    const without = await startRelay(relayEnv(null, fake.port));
    try {
      const timed = async (relay: RelayProcess, marker: string) => {
        const t0 = Date.now();
        const r = await post(relay, smallMessage(marker));
        return { status: r.status, ms: Date.now() - t0, retryAfter: r.headers.get("retry-after") };
      };
      const [a, b] = await Promise.all([timed(withSpool, `stall-spool-${RUN}`), timed(without, `stall-nospool-${RUN}`)]);
      expect(a.status).toBe(202);
      expect(a.ms).toBeLessThan(25_000);
      expect(b.status).toBe(503);
      expect(b.retryAfter).toBeTruthy();
      expect(b.ms).toBeLessThan(25_000);
      expect((await withSpool.metrics()).relay_unknown_outcome_total).toBe(1);
      expect((await without.metrics()).relay_unknown_outcome_total).toBe(1);
      expect(queueFiles(dir).filter((n) => !n.endsWith(".state")).length).toBe(1);
    } finally {
      await withSpool.kill("SIGKILL");
      await without.kill("SIGKILL");
      await fake.close();
    }
  }, 60_000);
});

describe("an unwritable spool", () => {
  test("spool unwritable and Dovecot down: 503, nothing acknowledged, nothing spooled", async () => {
    const dir = await spoolDir();
    await dv.stop();
    const relay = await startRelay(relayEnv(dir));
    try {
      rmSync(join(dir, "tmp"), { recursive: true });
      writeFileSync(join(dir, "tmp"), "a file where the spool's tmp/ directory should be");
      const r = await post(relay, smallMessage(`unwritable-${RUN}`));
      expect(r.status).toBe(503);
      expect(r.headers.get("retry-after")).toBeTruthy();
      expect((await r.json()).status).toBe("deferred");
      expect(queueFiles(dir)).toEqual([]);
      const m = await relay.metrics();
      expect(m.relay_spool_write_errors_total).toBe(1);
      expect(m.relay_queued_total).toBe(0);
      expect(m.relay_deferred_total).toBe(1);
      expect(relay.lines.some((l) => l.event === "spool_unwritable")).toBe(true);
      // Still alive and still honest: the next one is refused the same way.
      expect((await post(relay, smallMessage(`unwritable2-${RUN}`))).status).toBe(503);
    } finally {
      await relay.kill("SIGKILL");
    }
    await dv.start();
    expect(await dv.messages(USER)).toEqual([]);
  });

  test("a SPOOL_DIR that cannot be used stops start-up with one line naming it", async () => {
    const dir = await spoolDir();
    const file = join(dir, "not-a-directory");
    writeFileSync(file, "x");
    const r = await runRelayCommand({ ...relayEnv(file), HOST: "127.0.0.1", PORT: String(await freePort()) }, []);
    expect(r.code).toBe(2);
    const lines = r.stderr.trim().split("\n");
    expect(lines.length).toBe(1);
    expect(lines[0]).toContain("SPOOL_DIR");
    expect(lines[0]).toContain(file);
  });
});

describe("the queue CLI against a real spool", () => {
  test("list shows what waits, with its last reply; flush makes the running relay deliver it", async () => {
    const dir = await spoolDir();
    await dv.stop();
    const relay = await startRelay(relayEnv(dir));
    try {
      expect((await post(relay, smallMessage(`cli-${RUN}`))).status).toBe(202);
      const listed = await runRelayCommand({ SPOOL_DIR: dir }, ["queue", "list"]);
      expect(listed.code).toBe(0);
      expect(listed.stdout).toContain("queued: 1");
      expect(listed.stdout).toContain(USER);
      expect(listed.stdout).toContain("failed: 0");
      // Wait for the deliverer's first retry to fail: the next one is 3.2-4.8 s away.
      await until("a failed retry", async () => (await relay.metrics()).relay_spool_retried_total! >= 1, 10_000, 50);
      await dv.start();
      const t0 = Date.now();
      const flushed = await runRelayCommand({ SPOOL_DIR: dir }, ["queue", "flush"]);
      expect(flushed.code).toBe(0);
      expect(flushed.stdout).toContain("flush requested");
      // Only the flush can bring it this soon.
      await until("delivered after the flush", async () => (await dv.messages(USER)).length === 1, 3_000, 20);
      expect(Date.now() - t0).toBeLessThan(3_000);
      await until("spool empty", () => spoolEmpty(relay), 10_000, 100);
      const after = await runRelayCommand({ SPOOL_DIR: dir }, ["queue", "list"]);
      expect(after.stdout).toContain("queued: 0");
    } finally {
      await relay.kill("SIGKILL");
    }
  });
});
