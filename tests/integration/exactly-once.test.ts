// Exactly once when Dovecot saved a message but its answer was lost, with the operator's setting
// (examples/dovecot/: Pigeonhole's duplicate test keyed on the relay's delivery id, which Dovecot
// writes into its Received header) and without it. A TCP proxy between the relay and a real
// Dovecot passes the final dot on and then cuts the relay off before Dovecot's reply reaches it:
// the relay cannot know the outcome, spools the message (202) and delivers it again.
//
// Never at the cost of a distinct message: one that reuses a Message-ID is delivered, spooled or not.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { LmtpPool } from "../../lmtp.ts";
import { startServer, type RunningServer } from "../../server.ts";
import { checkStoredAs, expectStoredAs, startDovecot, type DovecotInstance } from "../support/dovecot.ts";
import { startProxy } from "../support/tcp-proxy.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const API_KEY = `exactlyonce_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const USER = "user@kuma8088.com";
const ALICE = "alice@example.test";
const RUN = Date.now().toString(36);

let once: DovecotInstance;
let plain: DovecotInstance;
const dirs: string[] = [];
const servers: RunningServer[] = [];
const proxies: CuttingProxy[] = [];

beforeAll(async () => {
  [once, plain] = await Promise.all([startDovecot({ exactlyOnce: true }), startDovecot()]);
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop()));
  await Promise.all(proxies.map((p) => p.close()));
  await Promise.all([once?.dispose(), plain?.dispose()]);
  await Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true })));
}, HOOK_TIMEOUT_MS);

beforeEach(async () => {
  await Promise.all([once.start(), plain.start()]);
  await Promise.all([once.clear(), plain.clear()]);
});

/**
 * Forwards LMTP both ways. While `cutsLeft` > 0, a connection whose client sends the final dot
 * (CRLF "." CRLF; dot-stuffing keeps it out of the message) has that dot passed on and is then cut
 * on the client's side at once: Dovecot gets the whole message and answers into the void.
 */
interface CuttingProxy {
  port: number;
  cutsLeft: number;
  cuts: number;
  close(): Promise<void>;
}

async function startCuttingProxy(upstreamPort: number, cuts: number): Promise<CuttingProxy> {
  const proxy = await startProxy(upstreamPort, {
    fromClient: (chunk, seen) => {
      // The dot may arrive split: look at the end of what came before too.
      const before = seen.slice(0, -1).join("").slice(-4);
      if (p.cutsLeft === 0 || !(before + chunk).includes("\r\n.\r\n")) return true;
      p.cutsLeft--;
      p.cuts++;
      return "forward, then cut the client";
    },
  });
  const p: CuttingProxy = { port: proxy.port, cutsLeft: cuts, cuts: 0, close: () => proxy.close() };
  proxies.push(p);
  return p;
}

/** The relay in-process with a spool; EXACTLY_ONCE=true unless told. */
async function relay(lmtpPort: number, exactlyOnce = true): Promise<RunningServer> {
  const spoolDir = await mkdtemp("/tmp/exactly-once-");
  dirs.push(spoolDir);
  const s = startServer(
    { apiKeys: [API_KEY], lmtpHost: "127.0.0.1", lmtpPort, port: 0, host: "127.0.0.1", maxMessageBytes: 1024 * 1024, spoolDir, spoolMaxAgeMs: 3_600_000, exactlyOnce },
    // Retries come quickly, and connections are not kept: each attempt is a new one through the proxy.
    { log: () => {}, queue: { baseBackoffMs: 200 }, lmtp: { maxIdle: 0 } },
  );
  servers.push(s);
  await s.runner!.scanned();
  return s;
}

function message(marker: string, messageId: string, text = `the text of ${marker}`): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(
    `From: sender@example.org\r\nTo: ${USER}\r\nMessage-ID: <${messageId}>\r\nSubject: ${marker}\r\n\r\n${text}\r\n.leading dot\r\n`,
  );
}

function post(s: RunningServer, body: Uint8Array<ArrayBuffer>, to: string[] = [USER]): Promise<Response> {
  return fetch(s.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": API_KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": to.join(",") },
    body,
  });
}

const spoolEmpty = (s: RunningServer) => s.runner!.size === 0;

/** Lines of Dovecot's log in which the relay's Sieve script dropped a delivery of that Message-ID. */
async function discards(dv: DovecotInstance, messageId: string): Promise<string[]> {
  const log = await readFile(`${dv.dir}/dovecot.log`, "utf8");
  return log.split("\n").filter((l) => l.includes(`msgid=<${messageId}>`) && l.includes("discard action"));
}

describe("Dovecot saved it, the answer was lost after the final dot", () => {
  test("with the exactly-once setting: answered 202, delivered again from the spool, stored once, byte-exact", async () => {
    const proxy = await startCuttingProxy(once.port, 1);
    const s = await relay(proxy.port);
    const id = `cut-once-${RUN}@example.test`;
    const sent = message(`cut-once-${RUN}`, id);
    const r = await post(s, sent, [USER, ALICE]);
    expect(r.status).toBe(202);
    expect(proxy.cuts).toBe(1);
    expect(s.metrics.get("unknown_outcome")).toBe(1);
    await until("the spool drained", () => spoolEmpty(s), 20_000, 50);
    for (const rcpt of [USER, ALICE]) {
      const stored = await once.messages(rcpt);
      expect(stored.length).toBe(1);
      expectStoredAs(stored[0]!, sent);
    }
    expect(s.metrics.get("spool_delivered")).toBe(1);
    // The first attempt was saved; the retry was dropped by the script, once per recipient.
    expect((await discards(once, id)).length).toBe(2);
  });

  test("without it (Dovecot's defaults): stored twice, and counted as an unknown outcome", async () => {
    const proxy = await startCuttingProxy(plain.port, 1);
    const s = await relay(proxy.port, false);
    const sent = message(`cut-plain-${RUN}`, `cut-plain-${RUN}@example.test`);
    expect((await post(s, sent)).status).toBe(202);
    await until("the spool drained", () => spoolEmpty(s), 20_000, 50);
    const stored = await plain.messages(USER);
    expect(stored.length).toBe(2);
    for (const m of stored) expectStoredAs(m, sent);
    expect(s.metrics.get("unknown_outcome")).toBe(1);
  });

  test("cut twice in a row, the third attempt gets through: still stored once", async () => {
    const proxy = await startCuttingProxy(once.port, 2);
    const s = await relay(proxy.port);
    const sent = message(`cut-twice-${RUN}`, `cut-twice-${RUN}@example.test`);
    expect((await post(s, sent)).status).toBe(202);
    await until("the spool drained", () => spoolEmpty(s), 20_000, 50);
    expect(proxy.cuts).toBe(2);
    expect(s.metrics.get("unknown_outcome")).toBe(2);
    const stored = await once.messages(USER);
    expect(stored.length).toBe(1);
    expectStoredAs(stored[0]!, sent);
    expect((await discards(once, `cut-twice-${RUN}@example.test`)).length).toBe(2);
  });
});

describe("with the exactly-once setting, distinct messages are never dropped", () => {
  test("two different messages with one Message-ID, delivered at once: both stored", async () => {
    const s = await relay(once.port);
    const id = `reused-${RUN}@example.test`;
    // Of different sizes, so that the relay's own repeat check (Message-ID, recipient, size) lets
    // both through: this is about Dovecot's side.
    const first = message(`reused-a-${RUN}`, id, "first text");
    const second = message(`reused-b-${RUN}`, id, "second text");
    expect((await post(s, first)).status).toBe(200);
    expect((await post(s, second)).status).toBe(200);
    const stored = await once.messages(USER);
    expect(stored.length).toBe(2);
    expectStoredAs(stored[0]!, first);
    expectStoredAs(stored[1]!, second);
    expect(await discards(once, id)).toEqual([]);
  });

  test("two different messages with one Message-ID, both spooled while Dovecot is down: both stored", async () => {
    const s = await relay(once.port);
    await once.stop();
    const id = `reused-spooled-${RUN}@example.test`;
    // The same size, the same Message-ID; only the text differs.
    const sent = [message(`reused-spooled-a-${RUN}`, id, "text one"), message(`reused-spooled-b-${RUN}`, id, "text two")];
    for (const m of sent) expect((await post(s, m)).status).toBe(202);
    await once.start();
    s.runner!.kick();
    await until("the spool drained", () => spoolEmpty(s), 20_000, 50);
    const stored = await once.messages(USER);
    expect(stored.length).toBe(2);
    // The spool delivers them side by side, in either order.
    for (const m of sent) expect(stored.filter((st) => checkStoredAs(st, m).ok).length).toBe(1);
    expect(await discards(once, id)).toEqual([]);
  });

  test("a message whose own top Received header imitates the relay's delivery id is still stored", async () => {
    // Dovecot's Received header goes on top of the message's own, so only the relay's name is read.
    const s = await relay(once.port);
    const original = message(`spoofed-a-${RUN}`, `spoofed-a-${RUN}@example.test`);
    expect((await post(s, original)).status).toBe(200);
    const stored = await once.messages(USER);
    const relayName = /^Received: from ([0-9a-z]+)\.mail-relay /m.exec(Buffer.from(stored[0]!).toString("latin1"))?.[1];
    expect(relayName).toBeTruthy();
    const spoof = new TextEncoder().encode(
      `Received: from ${relayName}.mail-relay ([192.0.2.1])\r\n\tby mx.example.org; Tue, 1 Dec 2026 00:00:00 +0000\r\n` +
        Buffer.from(message(`spoofed-b-${RUN}`, `spoofed-b-${RUN}@example.test`)).toString("latin1"),
    );
    expect((await post(s, spoof)).status).toBe(200);
    const after = await once.messages(USER);
    expect(after.length).toBe(2);
    expectStoredAs(after[1]!, spoof);
  });
});

describe("Dovecot's duplicate database under concurrent deliveries", () => {
  test("200 deliveries with ids, 16 at once to one mailbox, then each again: every repeat dropped", async () => {
    // Dovecot rewrites the whole database from what it read before the others' writes: deliveries
    // to one mailbox that save side by side lose ids. The pool's MailboxTurns keep them in turn.
    const pool = new LmtpPool({ kind: "tcp", host: once.host, port: once.port }, { maxConnections: 16, maxIdle: 16, lhloName: "mail-relay" });
    try {
      const body = (i: number) => message(`turns-${RUN}-${i}`, `turns-${RUN}-${i}@example.test`);
      const ids = Array.from({ length: 200 }, (_, i) => `turns${RUN}n${i}`);
      const deliver = (i: number) => pool.deliver({ from: "sender@example.org", to: [USER], deliveryId: ids[i] }, body(i), null);
      let next = 0;
      const all = async () => {
        next = 0;
        await Promise.all(
          Array.from({ length: 16 }, async () => {
            while (next < ids.length) {
              const i = next++;
              expect((await deliver(i)).map((r) => r.code)).toEqual([250]);
            }
          }),
        );
      };
      await all();
      expect((await once.messages(USER)).length).toBe(200);
      await all();
      expect((await once.messages(USER)).length).toBe(200);
    } finally {
      await pool.close();
    }
  });
});
