// The relay as a process (`bun run server.ts`, with a spool as deployed) in front of a private real
// Dovecot: a stalled client costs only itself (the body is received before LMTP is tried, and a
// body that stops is answered after BODY_IDLE_SECONDS); only the same bytes again are a duplicate;
// a full disk under the spool and the record of deliveries neither kills the host nor acknowledges
// what it could not keep.

import { describe, expect, test } from "bun:test";
import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { expectStoredAs } from "../support/dovecot.ts";
import { dovecotPerFile } from "../support/dovecot-per-file.ts";
import { startRelay, type RelayProcess } from "../support/relay-process.ts";
import { jsonOf, stalledUpload, statusOf } from "../support/stalled-upload.ts";
import { allowSlowTests } from "../support/timeout.ts";
import { until } from "../support/wait.ts";
import { fillDisk, mountTmpfs } from "../support/tmpfs.ts";

allowSlowTests();

const API_KEY = `receivefirst_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const USER = "user@kuma8088.com";
const RUN = Date.now().toString(36);
const enc = new TextEncoder();

const { dv, tempDir: tempDir } = dovecotPerFile("receive-first");

const env = (spool: string, extra: Record<string, string> = {}) => ({ API_KEY, LMTP_HOST: dv.host, LMTP_PORT: String(dv.port), SPOOL_DIR: spool, ...extra });

function message(marker: string, text = `Hello from ${marker}.`, messageId = `<${marker}@example.test>`): Uint8Array<ArrayBuffer> {
  return enc.encode(`From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: ${messageId}\r\nSubject: ${marker}\r\n\r\n${text}\r\n`);
}

const rfc822Headers = { "Content-Type": "message/rfc822", "X-API-Key": API_KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER };

async function post(relay: RelayProcess, body: BodyInit): Promise<{ status: number; json: Record<string, unknown> }> {
  const r = await fetch(relay.url + INBOUND_PATH, { method: "POST", headers: rfc822Headers, body });
  return { status: r.status, json: (await r.json()) as Record<string, unknown> };
}

async function postJson(relay: RelayProcess, raw: string): Promise<{ status: number; json: Record<string, unknown> }> {
  const r = await fetch(relay.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": API_KEY },
    body: JSON.stringify({ from: "sender@example.org", to: USER, raw }),
  });
  return { status: r.status, json: (await r.json()) as Record<string, unknown> };
}

function chunked(bytes: Uint8Array, size: number): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream({
    pull(c) {
      if (at >= bytes.length) return c.close();
      c.enqueue(bytes.slice(at, at + size));
      at += size;
    },
  });
}

/** Stored messages by Subject. */
async function subjects(): Promise<string[]> {
  return (await dv.messages(USER)).map((m) => /^Subject: (.*)$/m.exec(Buffer.from(m.subarray(0, 4096)).toString("latin1"))?.[1] ?? "?").sort();
}

describe("a stalled client costs only itself", () => {
  test("16 uploads that stop after 500 bytes beside 200 normal deliveries: every normal one 200 and in Dovecot; the stalled ones 503 body_stalled, none delivered or spooled", async () => {
    const dir = await tempDir();
    const relay = await startRelay(env(dir, { BODY_IDLE_SECONDS: "5" }));
    try {
      const stalled = await Promise.all(
        Array.from({ length: 16 }, (_, i) =>
          stalledUpload({
            url: relay.url,
            path: INBOUND_PATH,
            headers: rfc822Headers,
            sent: message(`stalled-${RUN}-${i}`, "x".repeat(1000)).subarray(0, 500),
            length: i % 2 ? "chunked" : 10_000,
          }),
        ),
      );
      await Bun.sleep(200);
      const TOTAL = 200;
      let next = 0;
      const statuses: number[] = [];
      await Promise.all(
        Array.from({ length: 8 }, async () => {
          while (next < TOTAL) {
            const i = next++;
            statuses[i] = (await post(relay, message(`normal-${RUN}-${i}`))).status;
          }
        }),
      );
      expect(statuses.filter((s) => s !== 200)).toEqual([]);
      expect(statuses.length).toBe(TOTAL);

      const answers = await Promise.all(stalled.map((u) => u.answer));
      for (const a of answers) {
        expect(statusOf(a)).toBe(503);
        expect(jsonOf(a).error).toBe("body_stalled");
      }
      for (const u of stalled) u.close();

      const stored = await subjects();
      expect(stored.length).toBe(TOTAL);
      expect(stored.filter((s) => s.startsWith("stalled-"))).toEqual([]);
      expect(readdirSync(join(dir, "queue"))).toEqual([]);
      expect(readdirSync(join(dir, "tmp"))).toEqual([]);
      const m = await relay.metrics();
      expect(m.relay_delivered_total).toBe(TOTAL);
      expect(m.relay_queued_total).toBe(0);
    } finally {
      await relay.kill("SIGKILL");
    }
  });
});

describe("only the same bytes again are a duplicate", () => {
  test("two different messages with one Message-ID, sent as rfc822 with Content-Length, chunked, and as JSON: all stored in Dovecot; the same bytes again: one copy, answered duplicate", async () => {
    const dir = await tempDir();
    const relay = await startRelay(env(dir));
    try {
      const id = `<reused-${RUN}@example.test>`;
      // Same length, other bytes: neither size nor Message-ID tells them apart.
      const a = message("reused-a", "first version of the text", id);
      const b = message("reused-b", "other version of the text", id);
      const c = message("reused-c", "third version of the text", id);
      const d = message("reused-d", "forth version of the text", id);
      expect(new Set([a, b, c, d].map((m) => m.length)).size).toBe(1);

      expect((await post(relay, a)).json.status).toBe("success");
      expect((await post(relay, chunked(b, 9))).json.status).toBe("success");
      expect((await postJson(relay, new TextDecoder().decode(c))).json.status).toBe("success");
      expect((await post(relay, chunked(d, 1000))).json.status).toBe("success");

      // Repeats, however they are sent.
      for (const [label, again] of [
        ["a chunked", () => post(relay, chunked(a, 13))],
        ["b with Content-Length", () => post(relay, b)],
        ["c as rfc822", () => post(relay, c)],
        ["d as JSON", () => postJson(relay, new TextDecoder().decode(d))],
      ] as const) {
        const r = await again();
        expect([label, r.status, r.json.status]).toEqual([label, 200, "duplicate"]);
      }

      expect(await subjects()).toEqual(["reused-a", "reused-b", "reused-c", "reused-d"]);
      const stored = await dv.messages(USER);
      for (const sent of [a, b, c, d]) {
        const marker = /Subject: (\S+)/.exec(new TextDecoder().decode(sent))![1]!;
        expectStoredAs(stored.find((m) => Buffer.from(m).toString("latin1").includes(`Subject: ${marker}\n`))!, sent);
      }
      expect((await relay.metrics()).relay_duplicates_total).toBe(4);
    } finally {
      await relay.kill("SIGKILL");
    }
  });
});

describe("a full disk under the spool", () => {
  test("delivered.sqlite cannot be written: the host keeps running and delivering (200), counts the errors in /metrics; the spool answers 503 while full, 202 once there is room, and delivers that message once", async () => {
    const dir = await tempDir();
    const mnt = join(dir, "spool");
    mkdirSync(mnt);
    mountTmpfs(mnt, "1m");
    let relay: RelayProcess | null = null;
    try {
      relay = await startRelay(env(mnt));
      // The first delivery creates the record's pages while there is room; then the disk fills up.
      expect((await post(relay, message(`before-full-${RUN}`))).status).toBe(200);
      await Bun.sleep(400);
      const filler = fillDisk(mnt);

      for (let i = 0; i < 30; i++) expect((await post(relay, message(`full-${RUN}-${i}`, "y".repeat(3000)))).status).toBe(200);
      await until("a failed write of the record counted", async () => ((await relay!.metrics()).relay_delivered_log_errors_total ?? 0) > 0, 5_000, 50);
      await Bun.sleep(500); // well past the record's flush: a crash would show here
      expect(relay.proc.exitCode).toBeNull();
      expect(relay.lines.some((l) => l.event === "delivered_log_error")).toBe(true);
      for (let i = 30; i < 40; i++) expect((await post(relay, message(`full-${RUN}-${i}`))).status).toBe(200);

      // Dovecot away: the message must be spooled, and the spool cannot take it.
      await dv.stop();
      const waiting = message(`spooled-${RUN}`, "z".repeat(200_000));
      const refused = await post(relay, waiting);
      expect(refused.status).toBe(503);
      expect(readdirSync(join(mnt, "queue"))).toEqual([]);
      expect(readdirSync(join(mnt, "tmp"))).toEqual([]);
      expect((await relay.metrics()).relay_spool_write_errors_total).toBe(1);

      rmSync(filler);
      const accepted = await post(relay, waiting);
      expect(accepted.status).toBe(202);
      await dv.start();
      await until("the spool delivered it", async () => (await relay!.metrics()).relay_spool_messages === 0, 30_000, 50);
      expect(relay.proc.exitCode).toBeNull();
      const stored = await subjects();
      expect(stored.filter((s) => s === `spooled-${RUN}`).length).toBe(1);
      expect(stored.length).toBe(42);
    } finally {
      await relay?.kill("SIGKILL");
      Bun.spawnSync(["umount", "-l", mnt]);
    }
  });
});
