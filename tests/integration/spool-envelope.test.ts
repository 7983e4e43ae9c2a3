// The spool keeps what it acknowledged whatever the envelope holds: messages whose Message-ID is
// 8-bit, sent as message/rfc822 and through the JSON body, answered 202 while Dovecot is down, come
// out of the spool into a real Dovecot byte for byte: from the running relay, and after the relay
// was killed and started again on the same spool (the start-up scan). A UTF-8 sender is not
// spooled while Dovecot has not been seen to offer SMTPUTF8 (Dovecot 2.3 does not): 503, and the
// sender's retry hears Dovecot's refusal once it is back.

import { describe, expect, test } from "bun:test";
import { readdirSync } from "node:fs";
import { join } from "node:path";
import { INBOUND_PATH } from "../../shared/contract.ts";
import { expectStoredAs } from "../support/dovecot.ts";
import { dovecotPerFile } from "../support/dovecot-per-file.ts";
import { runRelayCommand, startRelay, type RelayProcess } from "../support/relay-process.ts";
import { allowSlowTests } from "../support/timeout.ts";
import { until } from "../support/wait.ts";

allowSlowTests();

const API_KEY = `spoolenv_${Buffer.from(crypto.getRandomValues(new Uint8Array(20))).toString("hex")}`;
const USER = "user@kuma8088.com";
const RUN = Date.now().toString(36);

const { dv, tempDir: spoolDir } = dovecotPerFile("spool-envelope");

const relayEnv = (spool: string) => ({ API_KEY, LMTP_HOST: dv.host, LMTP_PORT: String(dv.port), SPOOL_DIR: spool });

/** A message whose Message-ID holds 8-bit bytes (UTF-8 and bare latin1), with 8-bit lines in its body. */
function eightBitMessage(marker: string): Uint8Array<ArrayBuffer> {
  return new Uint8Array(
    Buffer.concat([
      Buffer.from(`From: =?utf-8?q?J=C3=BCrgen?= <jurgen@example.org>\r\nTo: ${USER}\r\nMessage-ID: <${marker}.`, "latin1"),
      Buffer.from("café-€-😀", "utf8"),
      Buffer.from([0xe9, 0xff, 0x80]),
      Buffer.from(`@example.test>\r\nSubject: ${marker}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n`, "latin1"),
      Buffer.from("Grüße aus Köln, 日本語の本文\r\n", "utf8"),
      Buffer.from([0x00, 0x01, 0xfe, 0x0d, 0x0a]),
      Buffer.from("the end\r\n", "latin1"),
    ]),
  );
}

function postRaw(relay: RelayProcess, body: Uint8Array<ArrayBuffer>): Promise<Response> {
  return fetch(relay.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "message/rfc822", "X-API-Key": API_KEY, "X-Envelope-From": "sender@example.org", "X-Envelope-To": USER },
    body,
  });
}

function postJson(relay: RelayProcess, from: string, body: Uint8Array): Promise<Response> {
  return fetch(relay.url + INBOUND_PATH, {
    method: "POST",
    headers: { "Content-Type": "application/json; charset=utf-8", "X-API-Key": API_KEY },
    body: JSON.stringify({ from, to: USER, raw_base64: Buffer.from(body).toString("base64") }),
  });
}

/** The stored message whose body holds `sent`, checked byte for byte. */
async function expectDelivered(sent: Uint8Array[]): Promise<void> {
  const stored = await dv.messages(USER);
  expect(stored.length).toBe(sent.length);
  for (const s of sent) {
    const matches = stored.filter((m) => {
      try {
        expectStoredAs(m, s);
        return true;
      } catch {
        return false;
      }
    });
    expect(matches.length).toBe(1);
  }
}

describe("non-ASCII envelopes through the spool, real Dovecot", () => {
  for (const restart of [false, true]) {
    test(`8-bit Message-IDs (message/rfc822, and JSON) answered 202 with Dovecot down, then delivered byte-exact${restart ? " after the relay was SIGKILLed and started again" : ""}; a UTF-8 sender answered 503, not spooled`, async () => {
      const dir = await spoolDir();
      await dv.stop();
      let relay = await startRelay(relayEnv(dir));
      try {
        const raw = eightBitMessage(`raw-${restart}-${RUN}`);
        const json = eightBitMessage(`json-${restart}-${RUN}`);
        const a = await postRaw(relay, raw);
        expect(a.status).toBe(202);
        const b = await postJson(relay, "jurgen@example.org", json);
        expect(b.status).toBe(202);
        expect((await b.json()).status).toBe("queued");
        const utf8 = await postJson(relay, "jürgen@exämple.org", eightBitMessage(`utf8-${restart}-${RUN}`));
        expect(utf8.status).toBe(503);
        expect((await utf8.json()).message).toContain("not spooled: the envelope has a non-ASCII address, and the LMTP server has not been seen to offer SMTPUTF8");

        // What the operator sees meanwhile: both queued, with the sender as sent; nothing unreadable.
        const listed = await runRelayCommand({ SPOOL_DIR: dir }, ["queue", "list"]);
        expect(listed.code).toBe(0);
        expect(listed.stdout).toContain("queued: 2\n");
        expect(listed.stdout).toContain(`jurgen@example.org -> ${USER}`);
        expect(listed.stdout).toContain("unreadable: 0\n");

        if (restart) {
          await relay.kill("SIGKILL");
          relay = await startRelay(relayEnv(dir));
          await relay.waitForLine((l) => l.event === "spool_recovered" && l.messages === 2, 10_000);
        }
        await dv.start();
        await runRelayCommand({ SPOOL_DIR: dir }, ["queue", "flush"]);
        await until("the spool drained", async () => (await relay.metrics()).relay_spool_messages === 0, 30_000, 100);

        await expectDelivered([raw, json]);
        const m = await relay.metrics();
        expect(m.relay_spool_delivered_total).toBe(2);
        expect(m.relay_spool_unreadable_files).toBe(0);
        expect(m.relay_spool_failed_messages).toBe(0);
        expect(relay.lines.filter((l) => l.event === "spool_unreadable" || l.event === "spool_failed")).toEqual([]);
        expect(readdirSync(join(dir, "queue"))).toEqual([]);
        expect(readdirSync(join(dir, "failed"))).toEqual([]);
      } finally {
        await relay.kill("SIGKILL");
      }
    });
  }
});
