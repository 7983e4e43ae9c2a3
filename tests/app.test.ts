// The HTTP contract end to end: a real Bun.serve (startServer) in front of the scriptable fake
// LMTP server, one test per row of the status table of docs/contract.md and per way a
// request can go wrong.
// A 500 needs a deliverer that throws, so that one uses createApp directly.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TemporaryFailure, createApp, maxJsonBytes, type Deliverer } from "../shared/app.ts";
import { ServerEnv } from "../host/config.ts";
import { fromEnv } from "../shared/config-env.ts";
import { INBOUND_PATH, MAX_ENVELOPE_TO_BYTES, MAX_RECIPIENTS, type InboundResponse } from "../shared/contract.ts";
import { outcomeForStatus } from "../shared/replies.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import type { LogLine } from "../shared/log.ts";
import { startServer, type RunningServer } from "../server.ts";
import { freePort } from "../scripts/free-port.ts";
import { streamOf } from "./support/streams.ts";
import { allowSlowTests, HOOK_TIMEOUT_MS } from "./support/timeout.ts";

allowSlowTests();

// Keys that differ from their first character on, so "first 10 characters" means one key only.
const KEY_1 = "K1rot-0123456789abcdefghijklmnopqrstuvwxyzABCD";
const KEY_2 = "K2rot-ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyx";
const KEY_3 = "K3not-configured-0123456789abcdefghijklmnopq";
/** Small, so the size tests need only a few kilobytes. */
const LIMIT = 4096;

const MESSAGE = "From: a@example.org\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nHello.\r\n";

let fake: FakeLmtpServer;
let server: RunningServer;
/** Log lines since the current test began. */
let logs: LogLine[] = [];
/** Every log line the server ever wrote, its start-up line included. */
const allLogs: LogLine[] = [];

function startFor(lmtpPort: number, into: LogLine[] = []): RunningServer {
  const config = fromEnv(ServerEnv, {
    API_KEYS: `${KEY_1},${KEY_2}`,
    LMTP_HOST: "127.0.0.1",
    LMTP_PORT: String(lmtpPort),
    MAX_MESSAGE_BYTES: String(LIMIT),
  });
  return startServer({ ...config, port: 0 }, { log: (l) => into.push(l) });
}

beforeAll(async () => {
  fake = await startFakeLmtp();
  server = startServer(
    {
      ...fromEnv(ServerEnv, { API_KEYS: `${KEY_1},${KEY_2}`, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(fake.port), MAX_MESSAGE_BYTES: String(LIMIT) }),
      port: 0,
    },
    {
      log: (l) => {
        logs.push(l);
        allLogs.push(l);
      },
    },
  );
}, HOOK_TIMEOUT_MS);

afterAll(async () => {
  await server.stop();
  await fake.close();
}, HOOK_TIMEOUT_MS);

beforeEach(() => {
  fake.reset();
  logs = [];
});

// ---------------------------------------------------------------------------------------------
// Helpers

interface Answer {
  status: number;
  headers: Headers;
  body: InboundResponse & Record<string, unknown>;
}

async function answerOf(r: Response): Promise<Answer> {
  const text = await r.text();
  return { status: r.status, headers: r.headers, body: JSON.parse(text) };
}

async function post(headers: Record<string, string>, body?: BodyInit, base = server.url): Promise<Answer> {
  return answerOf(await fetch(base + INBOUND_PATH, { method: "POST", headers, body }));
}

/** A message/rfc822 request; an envelope field left undefined sends no header at all. */
function rfc822(envelope: { from?: string; to?: string }, body: BodyInit = MESSAGE, extra: Record<string, string> = {}, base = server.url) {
  const headers: Record<string, string> = { "Content-Type": "message/rfc822", "X-API-Key": KEY_1, ...extra };
  if (envelope.from !== undefined) headers["X-Envelope-From"] = envelope.from;
  if (envelope.to !== undefined) headers["X-Envelope-To"] = envelope.to;
  return post(headers, body, base);
}

/** An application/json request; a string is sent as it is. */
function json(body: unknown, extra: Record<string, string> = {}) {
  return post({ "Content-Type": "application/json", "X-API-Key": KEY_1, ...extra }, typeof body === "string" ? body : JSON.stringify(body));
}

const bytes = (...parts: (string | number[])[]) => {
  const chunks = parts.map((p) => (typeof p === "string" ? new TextEncoder().encode(p) : Uint8Array.from(p)));
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
};

/** What LMTP carries for a message: every bare LF as CRLF. */
function crlf(input: Uint8Array): Uint8Array {
  const out: number[] = [];
  input.forEach((b, i) => {
    if (b === 0x0a && input[i - 1] !== 0x0d) out.push(0x0d);
    out.push(b);
  });
  return Uint8Array.from(out);
}

/** The access-log lines for the inbound route. */
const inboundLines = () => logs.filter((l) => l.path === INBOUND_PATH);

/**
 * A hand-written HTTP/1.1 request over TCP, for what fetch will not send (a Content-Length
 * without the body, control characters in a header). Answers the status and the body.
 */
function rawHttp(port: number, head: string | Uint8Array): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    let buf = new Uint8Array(0);
    const done = () => {
      const text = Buffer.from(buf).toString("latin1"); // one character per byte
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(text);
      if (!m) return false;
      const end = text.indexOf("\r\n\r\n");
      if (end < 0) return false;
      const length = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end));
      if (length && buf.length - (end + 4) < Number(length[1])) return false;
      resolve({ status: Number(m[1]), body: new TextDecoder().decode(buf.subarray(end + 4)) });
      return true;
    };
    Bun.connect({
      hostname: "127.0.0.1",
      port,
      socket: {
        open: (s) => void s.write(head),
        data(s, chunk) {
          buf = bytes([...buf], [...chunk]);
          if (done()) s.end();
        },
        close: () => {
          if (!done()) reject(new Error(`connection closed without a whole answer: ${JSON.stringify(new TextDecoder().decode(buf))}`));
        },
        error: (_s, e) => reject(e),
      },
    }).catch(reject);
  });
}

// ---------------------------------------------------------------------------------------------
// 200

describe("200 delivered", () => {
  test("message/rfc822: success, the recipient, and the LMTP reply per recipient", async () => {
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" });
    expect(a.status).toBe(200);
    expect(a.body).toMatchObject({
      status: "success",
      message: "Email delivered to LMTP",
      recipient: "user@example.com",
      recipients: [{ address: "user@example.com", code: 250, enhanced: "2.0.0", reply: "250 2.0.0 <user@example.com> Saved" }],
    });
    expect(outcomeForStatus(a.status)).toBe("accept");
    expect(fake.received).toHaveLength(1);
    expect(fake.received[0]!.from).toBe("a@example.org");
    expect(fake.received[0]!.to).toEqual(["user@example.com"]);
    expect(new TextDecoder().decode(fake.received[0]!.data)).toBe(MESSAGE);
  });

  test("message/rfc822 carries 8-bit bytes exactly (streamed, never decoded)", async () => {
    const message = bytes("Subject: sjis\nContent-Type: text/plain; charset=Shift_JIS\n\n", [0x82, 0xa0, 0x93, 0xfa, 0xff, 0x80], "\n.dot line\n");
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" }, message);
    expect(a.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(crlf(message));
  });

  test("the runbook's section 4.1 curl body, exactly", async () => {
    const body =
      '{"from": "test@example.com","to": "user@kuma8088.com","subject": "Test Email","raw": "From: test@example.com\\r\\nTo: user@kuma8088.com\\r\\nSubject: Test Email\\r\\n\\r\\nThis is a test message.","timestamp": "2025-11-12T10:00:00Z"}';
    const a = await json(body);
    expect(a.status).toBe(200);
    expect(a.body).toMatchObject({ status: "success", message: "Email delivered to LMTP", recipient: "user@kuma8088.com" });
    expect(a.body.recipients![0]!.reply).toBe("250 2.0.0 <user@kuma8088.com> Saved");
    expect(fake.received[0]!.from).toBe("test@example.com");
    // The message had no final line end; LMTP needs one.
    expect(new TextDecoder().decode(fake.received[0]!.data)).toBe(
      "From: test@example.com\r\nTo: user@kuma8088.com\r\nSubject: Test Email\r\n\r\nThis is a test message.\r\n",
    );
  });

  test("JSON raw_base64 delivers non-UTF-8 bytes exactly", async () => {
    const message = bytes("From: a@example.org\nSubject: =?Shift_JIS?B?gqCT+g==?=\n\n", [0x82, 0xa0, 0x93, 0xfa], "\n", [0xe9, 0x00 + 0x41], "\n");
    const a = await json({ from: "a@example.org", to: "user@example.com", raw_base64: Buffer.from(message).toString("base64") });
    expect(a.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(crlf(message));
  });

  test("JSON raw is sent as UTF-8", async () => {
    const a = await json({ from: "a@example.org", to: "user@example.com", raw: "Subject: é\r\n\r\n日本語\r\n" });
    expect(a.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(new TextEncoder().encode("Subject: é\r\n\r\n日本語\r\n"));
  });

  test("Authorization: Bearer works as well as X-API-Key", async () => {
    const a = await post(
      { "Content-Type": "message/rfc822", Authorization: `Bearer ${KEY_1}`, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" },
      MESSAGE,
    );
    expect(a.status).toBe(200);
  });

  test.each([[""], ["<>"]])("null sender %p -> MAIL FROM:<>", async (from) => {
    const a = await rfc822({ from, to: "user@example.com" });
    expect(a.status).toBe(200);
    expect(fake.commands.some((c) => c.startsWith("MAIL FROM:<> ") || c === "MAIL FROM:<>")).toBe(true);
    expect(fake.received[0]!.from).toBe("");
  });

  test('multiple recipients "a@x, b@y" -> two RCPTs, one reply each, no single "recipient"', async () => {
    const a = await rfc822({ from: "<s@example.org>", to: "a@example.com, <b@example.net>" });
    expect(a.status).toBe(200);
    expect(fake.commands.filter((c) => c.startsWith("RCPT TO:"))).toEqual(["RCPT TO:<a@example.com>", "RCPT TO:<b@example.net>"]);
    expect(a.body.recipients!.map((r) => r.address)).toEqual(["a@example.com", "b@example.net"]);
    expect(a.body.recipient).toBeUndefined();
    expect(fake.received[0]!.to).toEqual(["a@example.com", "b@example.net"]);
  });

  test("media type parameters and case do not matter", async () => {
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" }, MESSAGE, { "Content-Type": "Message/RFC822; charset=binary" });
    expect(a.status).toBe(200);
  });
});

// ---------------------------------------------------------------------------------------------
// 400

describe("400 malformed request", () => {
  test("malformed JSON -> malformed_json", async () => {
    const a = await json('{"from": "a@x", "to": ');
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("malformed_json");
    expect(outcomeForStatus(a.status)).toBe("reject");
    expect(fake.commands).toEqual([]);
  });

  test("a missing field is named", async () => {
    const a = await json({ from: "a@example.org", raw: MESSAGE });
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("invalid_request");
    expect(a.body.message).toBe("to: is required");
  });

  test("an empty object names from, to and raw", async () => {
    const a = await json({});
    expect(a.status).toBe(400);
    for (const part of ["from: is required", "to: is required", "raw: exactly one of raw and raw_base64 is required"]) {
      expect(a.body.message).toContain(part);
    }
  });

  test.each([
    ["both raw and raw_base64", { raw: MESSAGE, raw_base64: btoa(MESSAGE) }],
    ["neither raw nor raw_base64", {}],
  ])("%s -> 400 naming raw", async (_name, fields) => {
    const a = await json({ from: "a@example.org", to: "user@example.com", ...fields });
    expect(a.status).toBe(400);
    expect(a.body.message).toBe("raw: exactly one of raw and raw_base64 is required");
    expect(fake.commands).toEqual([]);
  });

  test("raw_base64 that is not base64 -> 400, not 500", async () => {
    for (const raw_base64 of ["abcde", "ab=c", "not base64!"]) {
      const a = await json({ from: "a@example.org", to: "user@example.com", raw_base64 });
      expect(a.status).toBe(400);
      expect(a.body.message).toContain("raw_base64");
    }
    expect(fake.commands).toEqual([]);
  });

  test("a JSON body that is not an object -> 400", async () => {
    for (const body of ["null", "[]", '"text"']) {
      const a = await json(body);
      expect(a.status).toBe(400);
    }
  });

  test("an empty message -> 400", async () => {
    expect((await rfc822({ from: "a@example.org", to: "user@example.com" }, "")).status).toBe(400);
    expect((await json({ from: "a@example.org", to: "user@example.com", raw: "" })).status).toBe(400);
    expect(fake.commands).toEqual([]);
  });
});

describe("400 bad envelope: refused before any LMTP command", () => {
  const longLocal = `${"a".repeat(65)}@example.com`;
  const longAddress = `a@${"b".repeat(253)}`; // 255 characters
  const many = Array.from({ length: MAX_RECIPIENTS + 1 }, (_, i) => `u${i}@example.com`);

  // The JSON body carries any string, so the control characters that no HTTP client puts in a
  // header go through it.
  test.each([
    ["to", "CR", "user@example.com\rRCPT TO:<evil@x>"],
    ["to", "LF", "user@example.com\nRCPT TO:<evil@x>"],
    ["to", "CRLF + RCPT", "user@example.com\r\nRCPT TO:<evil@x>"],
    ["to", "a trailing CRLF", "user@example.com\r\n"],
    ["to", "NUL", "user\0@example.com"],
    ["to", "<", "us<er@example.com"],
    ["to", ">", "user@example.com>"],
    ["to", "space", "us er@example.com"],
    ["to", "comma inside an address", ["a,b@example.com"]],
    ["to", "a 65-character local part", longLocal],
    ["to", "a 255-character address", longAddress],
    ["to", "an empty address", ""],
    ["to", "an empty list", []],
    ["to", `${MAX_RECIPIENTS + 1} recipients`, many],
    ["from", "CRLF + RCPT", "s@example.org>\r\nRCPT TO:<evil@x"],
    ["from", "LF", "s@example.org\n"],
    ["from", "NUL", "s\0@example.org"],
    ["from", "<", "s<@example.org"],
    ["from", "space", "s @example.org"],
    ["from", "comma", "a,b@example.org"],
    ["from", "a 65-character local part", longLocal],
    ["from", "a 255-character address", longAddress],
  ])("JSON %s with %s -> 400 naming the field", async (field, _what, value) => {
    const envelope = { from: "s@example.org", to: "user@example.com", [field]: value };
    const a = await json({ ...envelope, raw: MESSAGE });
    expect(a.status).toBe(400);
    expect(a.body.status).toBe("error");
    expect(a.body.message).toMatch(new RegExp(`^${field}(\\.\\d+)?: \\S`));
    expect(fake.commands).toEqual([]);
  });

  test.each([
    ["X-Envelope-To", "space", "us er@example.com"],
    ["X-Envelope-To", "<", "us<er@example.com"],
    ["X-Envelope-To", ">", "user@example.com>"],
    ["X-Envelope-To", "comma inside an address", '"a,b"@example.com'],
    ["X-Envelope-To", "a 65-character local part", longLocal],
    ["X-Envelope-To", "a 255-character address", longAddress],
    ["X-Envelope-To", "an empty value", ""],
    ["X-Envelope-To", "only separators", " , "],
    ["X-Envelope-To", `${MAX_RECIPIENTS + 1} recipients`, many.join(", ")],
    ["X-Envelope-From", "space", "s @example.org"],
    ["X-Envelope-From", ">", "s@example.org>"],
    ["X-Envelope-From", "a 65-character local part", longLocal],
  ])("header %s with %s -> 400 naming the header", async (header, _what, value) => {
    const envelope = { from: "s@example.org", to: "user@example.com", [header === "X-Envelope-To" ? "to" : "from"]: value };
    const a = await rfc822(envelope);
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("invalid_envelope");
    expect(a.body.message).toMatch(new RegExp(`^${header.toLowerCase()}(\\.\\d+)?: \\S`));
    expect(fake.commands).toEqual([]);
  });

  test.each([
    ["X-Envelope-To", { from: "s@example.org" }],
    ["X-Envelope-From", { to: "user@example.com" }],
  ])("a missing %s header -> 400 saying it is required", async (header, envelope) => {
    const a = await rfc822(envelope);
    expect(a.status).toBe(400);
    expect(a.body.message).toBe(`${header.toLowerCase()}: is required`);
    expect(fake.commands).toEqual([]);
  });

  // fetch refuses these header values, so they go on the wire by hand: whoever answers (Bun's
  // HTTP parser or the app), it must be a 400 and nothing may reach LMTP.
  test.each([
    ["CR", "user@example.com\rRCPT TO:<evil@x>"],
    ["NUL", "user\0@example.com"],
    ["a folded line", "user@example.com\r\n RCPT TO:<evil@x>"],
  ])("X-Envelope-To with %s on the wire -> 400, no LMTP command", async (_what, value) => {
    const head =
      `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nX-API-Key: ${KEY_1}\r\n` +
      `Content-Type: message/rfc822\r\nX-Envelope-From: s@example.org\r\nX-Envelope-To: ${value}\r\n` +
      `Content-Length: ${MESSAGE.length}\r\n\r\n${MESSAGE}`;
    const a = await rawHttp(server.port, head);
    expect(a.status).toBe(400);
    expect(fake.commands).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// 401

describe("401 bad or missing key", () => {
  const envelopeHeaders = { "Content-Type": "message/rfc822", "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" };

  test.each([
    ["no key at all", {}],
    ["a wrong X-API-Key", { "X-API-Key": "invalid-key" }],
    ["a wrong Bearer token", { Authorization: "Bearer invalid-key" }],
    ["the right key as Basic credentials", { Authorization: `Basic ${btoa(`relay:${KEY_1}`)}` }],
    ["the right key without a scheme", { Authorization: KEY_1 }],
    ["Bearer without a token", { Authorization: "Bearer" }],
    ["a Bearer header with two tokens", { Authorization: `Bearer ${KEY_1} ${KEY_2}` }],
  ])("%s -> 401, never 400; nothing reaches LMTP", async (_name, auth) => {
    const a = await post({ ...envelopeHeaders, ...auth }, MESSAGE);
    expect(a.status).toBe(401);
    expect(a.body.error).toBe("unauthorized");
    expect(outcomeForStatus(a.status)).toBe("retry");
    expect(fake.commands).toEqual([]);
  });

  test("runbook 4.3.1: X-API-Key: invalid-key with the body '{...}' -> 401 (the key is checked first)", async () => {
    const a = await post({ "Content-Type": "application/json", "X-API-Key": "invalid-key" }, "{...}");
    expect(a.status).toBe(401);
  });

  test("the key is checked before the content type", async () => {
    const a = await post({ "Content-Type": "text/plain" }, "hello");
    expect(a.status).toBe(401);
  });
});

describe("key rotation", () => {
  test("both configured keys are accepted, a third is refused, and no key reaches any log line", async () => {
    const envelope = { "Content-Type": "message/rfc822", "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" };
    const withKey = (key: string) => post({ ...envelope, "X-API-Key": key }, MESSAGE);
    const withBearer = (key: string) => post({ ...envelope, Authorization: `Bearer ${key}` }, MESSAGE);

    expect((await withKey(KEY_1)).status).toBe(200);
    expect((await withKey(KEY_2)).status).toBe(200);
    expect((await withBearer(KEY_1)).status).toBe(200);
    expect((await withBearer(KEY_2)).status).toBe(200);
    expect((await withKey(KEY_3)).status).toBe(401);
    expect((await withBearer(KEY_3)).status).toBe(401);
    expect(fake.received).toHaveLength(4);

    expect(inboundLines().map((l) => l.status)).toEqual([200, 200, 200, 200, 401, 401]);
    // Every line so far, the start-up line included (it counts the keys, never shows them).
    const everything = allLogs.map((l) => JSON.stringify(l)).join("\n");
    expect(allLogs.find((l) => l.event === "listening")).toMatchObject({ keys: 2 });
    for (const key of [KEY_1, KEY_2, KEY_3]) {
      expect(everything).not.toContain(key);
      expect(everything).not.toContain(key.slice(0, 10));
    }
  });
});

// ---------------------------------------------------------------------------------------------
// 413

describe("413 too large", () => {
  const envelope = { from: "a@example.org", to: "user@example.com" };

  test("a Content-Length over the limit is answered without the body being read", async () => {
    // Only the head is sent: an answer can only come from the declared length.
    const head =
      `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nX-API-Key: ${KEY_1}\r\n` +
      `Content-Type: message/rfc822\r\nX-Envelope-From: a@example.org\r\nX-Envelope-To: user@example.com\r\n` +
      `Content-Length: ${LIMIT * 100}\r\n\r\n`;
    const a = await rawHttp(server.port, head);
    expect(a.status).toBe(413);
    expect(JSON.parse(a.body)).toMatchObject({ status: "error", error: "payload_too_large" });
    expect(fake.commands).toEqual([]);
  });

  test("a Content-Length far over the limit is refused too", async () => {
    const head =
      `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nX-API-Key: ${KEY_1}\r\n` +
      `Content-Type: message/rfc822\r\nX-Envelope-From: a@example.org\r\nX-Envelope-To: user@example.com\r\n` +
      `Content-Length: 1000000000\r\n\r\n`;
    expect((await rawHttp(server.port, head)).status).toBe(413);
    expect(fake.commands).toEqual([]);
  });

  test("exactly the limit is delivered, one byte more is 413", async () => {
    const at = new Uint8Array(LIMIT).fill(0x61);
    at.set(new TextEncoder().encode("Subject: big\r\n\r\n"));
    const ok = await rfc822(envelope, at);
    expect(ok.status).toBe(200);
    fake.reset();
    const over = await rfc822(envelope, bytes([...at], "x"));
    expect(over.status).toBe(413);
    expect(over.body.error).toBe("payload_too_large");
    expect(outcomeForStatus(over.status)).toBe("reject");
    expect(fake.commands).toEqual([]);
  });

  test("a chunked body without Content-Length that goes over the limit -> 413, nothing delivered", async () => {
    const chunk = new Uint8Array(1000).fill(0x62);
    const body = streamOf([new TextEncoder().encode("Subject: chunked\r\n\r\n"), ...Array(6).fill(chunk)]);
    const r = await fetch(server.url + INBOUND_PATH, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY_1, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" },
      body,
      duplex: "half",
    } as RequestInit);
    const a = await answerOf(r);
    expect(a.status).toBe(413);
    expect(a.body.error).toBe("payload_too_large");
    // The transaction was abandoned before its final dot: the fake stored nothing.
    expect(fake.received).toEqual([]);
    expect(inboundLines()[0]).toMatchObject({ status: 413, size: null });
  });

  test("a chunked body under the limit is delivered exactly", async () => {
    const parts = [new TextEncoder().encode("Subject: chunked\r\n\r\n"), new Uint8Array(1000).fill(0x63), bytes([0x82, 0xa0], "\r\n")];
    const r = await fetch(server.url + INBOUND_PATH, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY_1, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" },
      body: streamOf(parts),
      duplex: "half",
    } as RequestInit);
    expect(r.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(bytes(...parts.map((p) => [...p])));
  });

  test("a JSON message over the limit -> 413", async () => {
    const a = await json({ from: "a@example.org", to: "user@example.com", raw: "x".repeat(LIMIT + 1) });
    expect(a.status).toBe(413);
    expect(fake.commands).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// 415

describe("415 wrong or missing content type", () => {
  test.each([
    ["text/plain", "text/plain"],
    ["form data", "application/x-www-form-urlencoded"],
    ["multipart", "multipart/form-data; boundary=x"],
  ])("%s -> 415", async (_name, type) => {
    const a = await post({ "Content-Type": type, "X-API-Key": KEY_1, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" }, MESSAGE);
    expect(a.status).toBe(415);
    expect(a.body.error).toBe("unsupported_media_type");
    expect(outcomeForStatus(a.status)).toBe("reject");
    expect(fake.commands).toEqual([]);
  });

  test("no Content-Type at all -> 415 saying it is missing", async () => {
    // fetch adds no Content-Type for bytes.
    const a = await post({ "X-API-Key": KEY_1, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" }, new TextEncoder().encode(MESSAGE));
    expect(a.status).toBe(415);
    expect(a.body.message).toContain("missing");
    expect(fake.commands).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// 422

describe("422 LMTP permanent failure, with Dovecot's text", () => {
  test("550 at RCPT", async () => {
    fake.behaviour.rcpt = () => 550;
    const a = await rfc822({ from: "a@example.org", to: "nobody@example.com" });
    expect(a.status).toBe(422);
    expect(a.body).toMatchObject({
      status: "rejected",
      error: "lmtp_rejected",
      message: "550 5.1.1 <nobody@example.com> User unknown",
      recipient: "nobody@example.com",
      recipients: [{ address: "nobody@example.com", code: 550, enhanced: "5.1.1" }],
    });
    expect(outcomeForStatus(a.status)).toBe("reject");
    expect(fake.received).toEqual([]);
  });

  test("552 after the data", async () => {
    fake.behaviour.afterData = () => 552;
    const a = await rfc822({ from: "a@example.org", to: "full@example.com" });
    expect(a.status).toBe(422);
    expect(a.body.message).toBe("552 5.2.2 Mailbox full");
    expect(a.body.recipients![0]).toMatchObject({ code: 552, enhanced: "5.2.2", reply: "552 5.2.2 Mailbox full" });
  });

  test("one delivered, one unknown: 422 whose text is the refusal only", async () => {
    fake.behaviour.rcpt = (addr) => (addr.startsWith("nobody") ? 550 : 250);
    const a = await rfc822({ from: "a@example.org", to: "user@example.com, nobody@example.com" });
    expect(a.status).toBe(422);
    expect(a.body.message).toBe("550 5.1.1 <nobody@example.com> User unknown");
    expect(a.body.recipients!.map((r) => r.code)).toEqual([250, 550]);
    expect(fake.received[0]!.to).toEqual(["user@example.com"]);
  });
});

// ---------------------------------------------------------------------------------------------
// 503

function expectRetryAfter(a: Answer) {
  expect(a.status).toBe(503);
  expect(a.headers.get("retry-after")).toMatch(/^[1-9]\d*$/);
  expect(a.body.status).toBe("deferred");
  expect(outcomeForStatus(a.status)).toBe("retry");
}

describe("503 temporary failure, with Retry-After", () => {
  test("450 at RCPT", async () => {
    fake.behaviour.rcpt = () => 450;
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" });
    expectRetryAfter(a);
    expect(a.body.error).toBe("lmtp_deferred");
    expect(a.body.message).toContain("450 4.2.0 Mailbox temporarily unavailable");
    expect(fake.received).toEqual([]);
  });

  test("452 after the data", async () => {
    fake.behaviour.afterData = () => 452;
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" });
    expectRetryAfter(a);
    expect(a.body.message).toContain("452 4.2.2 Mailbox full");
  });

  test("a temporary failure next to a permanent one is still retried, not bounced", async () => {
    fake.behaviour.rcpt = (addr) => (addr.startsWith("busy") ? 450 : 550);
    const a = await rfc822({ from: "a@example.org", to: "busy@example.com, nobody@example.com" });
    expectRetryAfter(a);
  });

  describe("LMTP down", () => {
    test("the fake LMTP server closed (after a connection was pooled)", async () => {
      const lines: LogLine[] = [];
      const gone = await startFakeLmtp();
      const s = startFor(gone.port, lines);
      try {
        expect((await rfc822({ from: "a@example.org", to: "user@example.com" }, MESSAGE, {}, s.url)).status).toBe(200);
        await gone.close();
        const a = await rfc822({ from: "a@example.org", to: "user@example.com" }, MESSAGE, {}, s.url);
        expectRetryAfter(a);
        expect(a.body.error).toBe("lmtp_unavailable");
      } finally {
        await s.stop();
      }
    });

    test("a port with nothing listening", async () => {
      const s = startFor(await freePort());
      try {
        const a = await rfc822({ from: "a@example.org", to: "user@example.com" }, MESSAGE, {}, s.url);
        expectRetryAfter(a);
        expect(a.body.error).toBe("lmtp_unavailable");
        const j = await post(
          { "Content-Type": "application/json", "X-API-Key": KEY_2 },
          JSON.stringify({ from: "a@example.org", to: "user@example.com", raw: MESSAGE }),
          s.url,
        );
        expectRetryAfter(j);
      } finally {
        await s.stop();
      }
    });
  });
});

// ---------------------------------------------------------------------------------------------
// 500

describe("500 anything unexpected", () => {
  const SECRET = "db-password=hunter2 at /srv/internal/path";
  const request = () =>
    new Request(`http://relay${INBOUND_PATH}`, {
      method: "POST",
      headers: { "Content-Type": "message/rfc822", "X-API-Key": KEY_1, "X-Envelope-From": "a@example.org", "X-Envelope-To": "user@example.com" },
      body: MESSAGE,
    });

  /** What atob throws for bad input: Bun gives that DOMException a stack without its message. */
  const nativeError = () => {
    try {
      atob("abcde");
    } catch (e) {
      return e as Error;
    }
    throw new Error("atob accepted bad base64");
  };

  test.each([
    ["a plain Error", () => new Error(SECRET)],
    ["a TypeError", () => new TypeError(SECRET)],
    ["a native DOMException", nativeError],
    ["a thrown string", () => SECRET],
  ])("a deliverer that throws %s -> 500 without the error text; the log has it", async (_name, make) => {
    const thrown: unknown = make();
    const what = typeof thrown === "string" ? thrown : (thrown as Error).message;
    const lines: LogLine[] = [];
    const deliver: Deliverer = async () => {
      throw thrown;
    };
    const app = createApp({ apiKeys: [KEY_1], deliver, log: (l) => lines.push(l) });
    const r = await app.request(request());
    expect(r.status).toBe(500);
    const text = await r.text();
    expect(JSON.parse(text)).toMatchObject({ status: "error", error: "internal_error" });
    expect(text).not.toContain(what);
    expect(r.headers.get("retry-after")).toBeNull();
    expect(outcomeForStatus(r.status)).toBe("retry");
    expect(lines).toHaveLength(1);
    expect(lines[0]!.status).toBe(500);
    expect(String(lines[0]!.detail)).toContain(what);
  });

  test("a deliverer's TemporaryFailure -> 503, not 500", async () => {
    const app = createApp({
      apiKeys: [KEY_1],
      deliver: async () => {
        throw new TemporaryFailure("LMTP connect refused");
      },
      log: () => {},
    });
    const r = await app.request(request());
    expect(r.status).toBe(503);
    expect(r.headers.get("retry-after")).toBe("30");
  });
});

// ---------------------------------------------------------------------------------------------
// Health and readiness

describe("health and readiness", () => {
  test("/health -> 200 {status: healthy, timestamp}, no key needed", async () => {
    const r = await fetch(`${server.url}/health`);
    expect(r.status).toBe(200);
    const body = (await r.json()) as { status: string; timestamp: string };
    expect(body.status).toBe("healthy");
    expect(Number.isNaN(Date.parse(body.timestamp))).toBe(false);
    expect(fake.commands).toEqual([]); // the shallow check does not touch LMTP
  });

  const readyBody = async (r: Response) => (await r.json()) as Record<string, unknown>;

  for (const path of ["/ready", "/health?deep=1"]) {
    test(`${path} without a key -> 200 with its status and timestamp only; with the key (X-API-Key or Bearer) -> the LMTP target, capabilities, spool`, async () => {
      const s = startFor(fake.port);
      try {
        const bare = await fetch(s.url + path);
        expect(bare.status).toBe(200);
        const text = await bare.text();
        expect(Object.keys(JSON.parse(text)).sort()).toEqual(["status", "timestamp"]);
        expect(JSON.parse(text).status).toBe("ready");
        for (const secret of ["127.0.0.1", String(fake.port), "PIPELINING", "spooled", "lmtp", "target"]) expect(text).not.toContain(secret);
        expect(fake.commands.some((c) => c.startsWith("LHLO"))).toBe(true); // it did look
        // A wrong key is no key.
        expect(Object.keys(await readyBody(await fetch(s.url + path, { headers: { "X-API-Key": KEY_3 } }))).sort()).toEqual(["status", "timestamp"]);

        for (const headers of [{ "X-API-Key": KEY_1 }, { Authorization: `Bearer ${KEY_2}` }] as Record<string, string>[]) {
          const r = await fetch(s.url + path, { headers });
          expect(r.status).toBe(200);
          const body = await readyBody(r);
          expect(body).toMatchObject({ status: "ready", target: `lmtp://127.0.0.1:${fake.port}`, lmtp: `127.0.0.1:${fake.port}`, spooled: null });
          expect(body.capabilities).toContain("PIPELINING");
        }
      } finally {
        await s.stop();
      }
    });
  }

  test("with LMTP down: /ready and /health?deep=1 -> 503 without the error text; with the key, the error; /health stays 200", async () => {
    const port = await freePort();
    const s = startFor(port);
    try {
      for (const path of ["/ready", "/health?deep=1"]) {
        const r = await fetch(s.url + path);
        expect(r.status).toBe(503);
        expect(r.headers.get("retry-after")).toMatch(/^\d+$/);
        const text = await r.text();
        expect(JSON.parse(text)).toEqual({ status: "unavailable", timestamp: expect.any(String) });
        expect(text).not.toContain(String(port));

        const keyed = await fetch(s.url + path, { headers: { "X-API-Key": KEY_1 } });
        expect(keyed.status).toBe(503);
        const body = await readyBody(keyed);
        expect(body.status).toBe("unavailable");
        expect(String(body.error)).toContain(`127.0.0.1:${port}`);
      }
      expect((await fetch(`${s.url}/health`)).status).toBe(200);
    } finally {
      await s.stop();
    }
  });

  test("1000 concurrent /ready calls while messages are delivered: every delivery 200, and LMTP sees only a few probe connections", async () => {
    const s = startFor(fake.port);
    try {
      const probes = Array.from({ length: 1000 }, () => fetch(s.url + "/ready").then(async (r) => (await r.arrayBuffer(), r.status)));
      const deliveries = Array.from({ length: 40 }, (_, i) =>
        rfc822({ from: "a@example.org", to: "user@example.com" }, `Message-ID: <ready-${i}@x>\r\n\r\nbody ${i}\r\n`, {}, s.url).then((a) => a.status),
      );
      const [probed, delivered] = await Promise.all([Promise.all(probes), Promise.all(deliveries)]);
      expect(probed.filter((st) => st !== 200)).toEqual([]);
      expect(delivered).toEqual(deliveries.map(() => 200));
      expect(fake.received.length).toBe(40);
      // A probe is the one connection that sends NOOP: they share one check, reused for a second.
      const noops = fake.commands.filter((c) => c.toUpperCase() === "NOOP").length;
      expect(noops).toBeGreaterThanOrEqual(1);
      expect(noops).toBeLessThanOrEqual(5);
    } finally {
      await s.stop();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Logging

describe("access log", () => {
  test("one JSON line per request with request_id, from, to, size, status, replies, ms; the client's X-Request-Id is used and echoed", async () => {
    const r = await fetch(server.url + INBOUND_PATH, {
      method: "POST",
      headers: {
        "Content-Type": "message/rfc822",
        "X-API-Key": KEY_1,
        "X-Envelope-From": "a@example.org",
        "X-Envelope-To": "user@example.com",
        "X-Request-Id": "edge-7f3a-0001",
      },
      body: MESSAGE,
    });
    const a = await answerOf(r);
    expect(a.status).toBe(200);
    expect(a.headers.get("x-request-id")).toBe("edge-7f3a-0001");
    expect(a.body.request_id).toBe("edge-7f3a-0001");

    expect(logs).toHaveLength(1);
    const line = logs[0]!;
    expect(line).toMatchObject({
      request_id: "edge-7f3a-0001",
      from: "a@example.org",
      to: ["user@example.com"],
      size: MESSAGE.length,
      status: 200,
      replies: ["250 2.0.0 <user@example.com> Saved"],
    });
    expect(typeof line.ms).toBe("number");
    // One line of JSON, whatever it holds.
    expect(JSON.stringify(line)).not.toContain("\n");
    // The message itself is never logged.
    expect(JSON.stringify(line)).not.toContain("Hello.");
  });

  test("a request id with characters unfit for a log is replaced, not echoed", async () => {
    const a = await rfc822({ from: "a@example.org", to: "user@example.com" }, MESSAGE, { "X-Request-Id": "bad id\" injected" });
    expect(a.status).toBe(200);
    expect(a.body.request_id).not.toContain("injected");
    expect(logs[0]!.request_id).toBe(a.body.request_id!);
  });

  test("refused requests are logged too, with their status and reason", async () => {
    fake.behaviour.rcpt = () => 550;
    await rfc822({ from: "a@example.org", to: "nobody@example.com" });
    await json("{oops");
    expect(inboundLines().map((l) => [l.status, l.error])).toEqual([
      [422, undefined],
      [400, "malformed_json"],
    ]);
    expect(inboundLines()[0]!.replies).toEqual(["550 5.1.1 <nobody@example.com> User unknown"]);
  });
});

// ---------------------------------------------------------------------------------------------
// Validation in time linear in the input

describe("validation takes time linear in the input", () => {
  // The patterns these checks replaced backtracked over runs of blanks: each request below held
  // the event loop (and /health with it) for hours. A linear check answers it at once. Each is
  // about the size of the JSON limit here (1 MiB + 8 KiB).
  const MiB = 1024 * 1024;

  test("raw_base64: a megabyte of blanks, then a bad character -> 400 naming it", async () => {
    const a = await json({ from: "a@example.org", to: "user@example.com", raw_base64: " ".repeat(MiB) + "!" });
    expect(a.status).toBe(400);
    expect(a.body.message).toBe(`raw_base64: is not base64: "!" at character ${MiB} is not a base64 character`);
    expect(fake.commands).toEqual([]);
  });

  test("raw_base64 among a megabyte of blanks and line breaks is accepted, and its bytes arrive exactly", async () => {
    const message = bytes("Subject: base64\r\n\r\n", [0x82, 0xa0, 0xff, 0x00], "\r\n");
    const lines = Buffer.from(message).toString("base64").match(/.{1,8}/g)!.join("\n");
    const raw_base64 = " ".repeat(MiB) + lines + " \t\r\n";
    expect(JSON.stringify({ raw_base64 }).length).toBeLessThan(maxJsonBytes(LIMIT));
    const a = await json({ from: "a@example.org", to: "user@example.com", raw_base64 });
    expect(a.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(message);
  });

  test("to: a megabyte of blanks inside an address -> 400 naming its length", async () => {
    const to = `x${" ".repeat(MiB)}y@example.com`;
    const a = await json({ from: "a@example.org", to, raw: MESSAGE });
    expect(a.status).toBe(400);
    expect(a.body.message).toEndWith(`is ${to.length} characters long (at most 254)`);
    expect(fake.commands).toEqual([]);
  });

  test("/health answers while such a request is being checked", async () => {
    const slow = json({ from: "a@example.org", to: `x${" ".repeat(MiB / 2)}y@example.com`, raw_base64: " ".repeat(MiB / 2) + "!" });
    const health = await fetch(`${server.url}/health`);
    expect(health.status).toBe(200);
    expect((await slow).status).toBe(400);
  });
});

// ---------------------------------------------------------------------------------------------
// Bad input is refused with its reason, never changed

describe("400: bad input is refused, never changed", () => {
  const jsonBytes = (body: Uint8Array) => post({ "Content-Type": "application/json", "X-API-Key": KEY_1 }, body as BodyInit);

  test("a JSON body that is not UTF-8 -> 400 invalid_utf8, nothing delivered (not U+FFFD)", async () => {
    // "été" in Latin-1 inside raw.
    const body = bytes('{"from":"a@example.org","to":"user@example.com","raw":"Subject: x\\r\\n\\r\\n', [0xe9, 0x74, 0xe9], '\\r\\n"}');
    const a = await jsonBytes(body);
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("invalid_utf8");
    expect(a.body.message).toContain("not valid UTF-8");
    expect(outcomeForStatus(a.status)).toBe("reject");
    expect(fake.commands).toEqual([]);
  });

  test.each([
    ["a lone high surrogate", "\\ud800"],
    ["a lone low surrogate", "\\udc00"],
    ["a pair in the wrong order", "\\udc00\\ud800"],
    ["a high surrogate at the very end", "\\ud83d"],
  ])("raw with %s -> 400 naming raw, nothing delivered", async (_name, escaped) => {
    const prefix = "Subject: x\\r\\n\\r\\nab";
    const a = await json(`{"from":"a@example.org","to":"user@example.com","raw":"${prefix}${escaped}"}`);
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("invalid_request");
    expect(a.body.message).toMatch(/^raw: contains a lone surrogate \("\\ud[89a-f][0-9a-f]{2}"\) at character 16, which has no UTF-8 form/);
    expect(fake.commands).toEqual([]);
  });

  test("a surrogate pair (an emoji) in raw is delivered as its four UTF-8 bytes", async () => {
    const a = await json('{"from":"a@example.org","to":"user@example.com","raw":"Subject: \\ud83d\\ude00\\r\\n\\r\\nx\\r\\n"}');
    expect(a.status).toBe(200);
    expect(fake.received[0]!.data).toEqual(bytes("Subject: ", [0xf0, 0x9f, 0x98, 0x80], "\r\n\r\nx\r\n"));
  });

  test.each(["from", "to"])("%s with a lone surrogate -> 400 naming the field", async (field) => {
    const envelope = { from: '"a@example.org"', to: '"user@example.com"', [field]: '"us\\udfffer@example.com"' };
    const a = await json(`{"from":${envelope.from},"to":${envelope.to},"raw":"x"}`);
    expect(a.status).toBe(400);
    expect(a.body.message).toMatch(new RegExp(`^${field}(\\.0)?: "us\\\\udfffer@example.com" contains a lone surrogate`));
    expect(fake.commands).toEqual([]);
  });

  /** A message/rfc822 request by hand, its envelope headers as the given bytes. */
  const withEnvelopeBytes = (from: Uint8Array, to: Uint8Array) =>
    rawHttp(
      server.port,
      bytes(
        `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\nX-API-Key: ${KEY_1}\r\nContent-Type: message/rfc822\r\n`,
        "X-Envelope-From: ", [...from], "\r\nX-Envelope-To: ", [...to], "\r\n",
        `Content-Length: ${MESSAGE.length}\r\n\r\n${MESSAGE}`,
      ),
    );
  const utf8 = (s: string) => new TextEncoder().encode(s);

  test("X-Envelope-From and X-Envelope-To are UTF-8 on the wire: jürgen stays jürgen", async () => {
    const a = await withEnvelopeBytes(utf8("jürgen@example.org"), utf8("user@example.com, 用户@example.com"));
    expect(a.status).toBe(200);
    expect(fake.received[0]!.from).toBe("jürgen@example.org");
    expect(fake.received[0]!.to).toEqual(["user@example.com", "用户@example.com"]);
    expect(inboundLines()[0]).toMatchObject({ from: "jürgen@example.org", to: ["user@example.com", "用户@example.com"] });
  });

  test.each([
    ["X-Envelope-From", "a Latin-1 byte", [0x6a, 0xfc, ...utf8("rgen@example.org")]],
    ["X-Envelope-To", "a cut UTF-8 sequence", [...utf8("user@example.com, j"), 0xc3]],
    ["X-Envelope-To", "an overlong encoding of \"@\"", [...utf8("user"), 0xc1, 0x80, ...utf8("example.com")]],
  ])("%s with %s -> 400 naming the header, nothing delivered", async (header, _what, value) => {
    const good = utf8(header === "X-Envelope-From" ? "user@example.com" : "a@example.org");
    const a = header === "X-Envelope-From" ? await withEnvelopeBytes(Uint8Array.from(value), good) : await withEnvelopeBytes(good, Uint8Array.from(value));
    expect(a.status).toBe(400);
    expect(JSON.parse(a.body)).toMatchObject({ error: "invalid_envelope", message: `${header.toLowerCase()}: is not valid UTF-8` });
    expect(fake.commands).toEqual([]);
  });
});

describe("415 a Content-Encoding other than identity", () => {
  const envelope = { from: "a@example.org", to: "user@example.com" };

  test.each(["gzip", "deflate", "br", "x-gzip", "GZIP", "gzip, identity"])("message/rfc822 with Content-Encoding: %s -> 415, nothing delivered", async (coding) => {
    const a = await rfc822(envelope, Bun.gzipSync(new TextEncoder().encode(MESSAGE)), { "Content-Encoding": coding });
    expect(a.status).toBe(415);
    expect(a.body.error).toBe("unsupported_content_encoding");
    expect(a.body.message).toContain(JSON.stringify(coding.toLowerCase()));
    expect(outcomeForStatus(a.status)).toBe("reject");
    expect(fake.commands).toEqual([]);
  });

  test("JSON with Content-Encoding: gzip -> 415, nothing delivered", async () => {
    const body = Bun.gzipSync(new TextEncoder().encode(JSON.stringify({ ...envelope, raw: MESSAGE })));
    const a = await post({ "Content-Type": "application/json", "Content-Encoding": "gzip", "X-API-Key": KEY_1 }, body);
    expect(a.status).toBe(415);
    expect(a.body.error).toBe("unsupported_content_encoding");
    expect(fake.commands).toEqual([]);
  });

  test("Content-Encoding: identity is the message as it is: delivered", async () => {
    const a = await rfc822(envelope, MESSAGE, { "Content-Encoding": "identity" });
    expect(a.status).toBe(200);
    expect(new TextDecoder().decode(fake.received[0]!.data)).toBe(MESSAGE);
  });
});

describe("recipients: one copy per mailbox, as Dovecot resolves them", () => {
  test("the same address in another case is one recipient: one RCPT, the first spelling kept", async () => {
    const a = await rfc822({ from: "a@example.org", to: "User@Example.com, user@example.com, <USER@EXAMPLE.COM>, b@example.com" });
    expect(a.status).toBe(200);
    expect(fake.commands.filter((c) => c.startsWith("RCPT TO:"))).toEqual(["RCPT TO:<User@Example.com>", "RCPT TO:<b@example.com>"]);
    expect(a.body.recipients!.map((r) => r.address)).toEqual(["User@Example.com", "b@example.com"]);
    expect(fake.received).toHaveLength(1);
  });

  test("JSON: a list in several cases is delivered once, to the single recipient named", async () => {
    const a = await json({ from: "a@example.org", to: ["user@example.com", "USER@example.COM"], raw: MESSAGE });
    expect(a.status).toBe(200);
    expect(a.body.recipient).toBe("user@example.com");
    expect(fake.received.map((m) => m.to)).toEqual([["user@example.com"]]);
  });
});

// ---------------------------------------------------------------------------------------------
// The envelope fits in the host's header limit

/** `count` distinct addresses that take exactly `total` bytes as "a, b" (X-Envelope-To). */
function recipientsOfBytes(total: number, count: number): string[] {
  const each = Math.floor((total - 2 * (count - 1)) / count);
  const out = Array.from({ length: count }, (_, i) => {
    const local = `r${i}`.padEnd(40, "x");
    return `${local}@${"d".repeat(each - 45)}.com`;
  });
  const short = total - out.join(", ").length;
  out[0] = `${out[0]!.slice(0, 41)}${"d".repeat(each - 45 + short)}.com`;
  if (out.join(", ").length !== total || out.some((a) => a.length > 254)) throw new Error("recipientsOfBytes: bad arithmetic");
  return out;
}

describe(`X-Envelope-To fits in a header: at most ${MAX_ENVELOPE_TO_BYTES} bytes of recipients`, () => {
  test("exactly the limit is delivered to every recipient; one byte more -> 400 naming the limit, nothing sent", async () => {
    const at = recipientsOfBytes(MAX_ENVELOPE_TO_BYTES, 34);
    const ok = await rfc822({ from: "a@example.org", to: at.join(", ") });
    expect(ok.status).toBe(200);
    expect(fake.received[0]!.to).toEqual(at);
    fake.reset();

    const over = recipientsOfBytes(MAX_ENVELOPE_TO_BYTES + 1, 34);
    const a = await rfc822({ from: "a@example.org", to: over.join(", ") });
    expect(a.status).toBe(400);
    expect(a.body.error).toBe("invalid_envelope");
    expect(a.body.message).toBe(`x-envelope-to: 34 recipients take ${MAX_ENVELOPE_TO_BYTES + 1} bytes as "a, b" (X-Envelope-To), more than ${MAX_ENVELOPE_TO_BYTES}: send the message in several requests`);
    expect(fake.commands).toEqual([]);
  });

  test("the limit counts UTF-8 bytes, not characters", async () => {
    // 5000 characters, over 9000 bytes: "é" takes two.
    const to = recipientsOfBytes(5000, 20).map((a) => a.replace(/d/g, "é"));
    expect(to.join(", ").length).toBeLessThan(MAX_ENVELOPE_TO_BYTES);
    const a = await json({ from: "a@example.org", to, raw: MESSAGE });
    expect(a.status).toBe(400);
    expect(a.body.message).toContain(`take ${new TextEncoder().encode(to.join(", ")).length} bytes`);
  });

  test(`${MAX_RECIPIENTS} recipients of 254 characters (25.6 KB as a header) -> 400 with the reason, in JSON as well`, async () => {
    const to = Array.from({ length: MAX_RECIPIENTS }, (_, i) => `${`r${i}`.padEnd(64, "x")}@${"d".repeat(185)}.com`);
    expect(to.every((a) => a.length === 254)).toBe(true);
    const a = await json({ from: "a@example.org", to, raw: MESSAGE });
    expect(a.status).toBe(400);
    expect(a.body.message).toStartWith(`to: ${MAX_RECIPIENTS} recipients take 25598 bytes`);
    expect(fake.commands).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// What Bun answers before the app runs (the last rows of the contract table (docs/contract.md))

describe("answers from Bun's HTTP parser, before the app runs", () => {
  const start = `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nX-API-Key: ${KEY_1}\r\nContent-Type: message/rfc822\r\nX-Envelope-From: a@example.org\r\nX-Envelope-To: user@example.com\r\n`;
  const chunked = `${MESSAGE.length.toString(16)}\r\n${MESSAGE}\r\n0\r\n\r\n`;

  test.each([
    ["Transfer-Encoding with Content-Length", `Transfer-Encoding: chunked\r\nContent-Length: ${MESSAGE.length}\r\n\r\n${chunked}`],
    ["Transfer-Encoding: gzip, chunked (a coding other than chunked)", `Transfer-Encoding: gzip, chunked\r\n\r\n${chunked}`],
    ["an obs-folded header line", `X-Note: one\r\n two\r\nContent-Length: ${MESSAGE.length}\r\n\r\n${MESSAGE}`],
  ])("%s -> Bun's own 400 without a body; nothing delivered", async (_what, rest) => {
    const a = await rawHttp(server.port, start + rest);
    expect(a).toEqual({ status: 400, body: "" });
    expect(fake.commands).toEqual([]);
    expect(inboundLines()).toEqual([]);
  });

  test("a body declared larger than any limit is the app's own 413 with its reason, never Bun's bare one, on either route", async () => {
    for (const [type, declared] of [
      ["message/rfc822", 10 * 1024 ** 4],
      ["application/json", maxJsonBytes(LIMIT) + 1],
      ["application/json", 10 * 1024 ** 4],
    ] as const) {
      const a = await rawHttp(server.port, `${start.replace("message/rfc822", type)}Content-Length: ${declared}\r\nConnection: close\r\n\r\n`);
      expect(a.status).toBe(413);
      expect(JSON.parse(a.body)).toMatchObject({ error: "payload_too_large" });
    }
    expect(fake.commands).toEqual([]);
  });

  test("a header block of 16 KiB -> Bun's own 431 without a body, nothing delivered; the Worker retries it", async () => {
    const a = await rawHttp(server.port, `${start}X-Padding: ${"p".repeat(16 * 1024)}\r\nContent-Length: ${MESSAGE.length}\r\n\r\n${MESSAGE}`);
    expect(a).toEqual({ status: 431, body: "" });
    expect(outcomeForStatus(431)).toBe("retry");
    expect(fake.commands).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------
// Pipelining: a second request sent before the first is answered

/** Writes `parts` on one connection (waiting for each `before` condition first); answers every byte received until it closes. */
function rawExchange(port: number, parts: { data: string | Uint8Array; before?: () => boolean }[]): Promise<string> {
  return new Promise((resolve, reject) => {
    let received = "";
    Bun.connect({
      hostname: "127.0.0.1",
      port,
      socket: {
        async open(s) {
          for (const p of parts) {
            while (p.before && !p.before()) await Bun.sleep(5);
            s.write(p.data);
          }
        },
        data: (_s, chunk) => void (received += Buffer.from(chunk).toString("latin1")),
        close: () => resolve(received),
        error: (_s, e) => reject(e),
      },
    }).catch(reject);
  });
}

const answersIn = (received: string) => received.match(/^HTTP\/1\.1 \d{3}/gm) ?? [];

describe("pipelined requests: every request answered, or nothing delivered", () => {
  // Bun 1.4.5 closes a connection on which a request arrives before the one ahead of it is
  // answered; the answer is lost. A message its sender never hears about must not be delivered.
  const request = (body: string, to = "user@example.com", type = "message/rfc822") =>
    `POST ${INBOUND_PATH} HTTP/1.1\r\nHost: relay\r\nX-API-Key: ${KEY_1}\r\nContent-Type: ${type}\r\n` +
    `X-Envelope-From: a@example.org\r\nX-Envelope-To: ${to}\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
  const health = "GET /health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n";

  async function settled(requests: number) {
    // The access log writes one line per request the app handled, answered or not.
    while (inboundLines().length < requests) await Bun.sleep(5);
  }

  test("two POSTs in one write", async () => {
    const received = await rawExchange(server.port, [{ data: request(MESSAGE) + request(MESSAGE.replace("hello", "second")) }]);
    await settled(1);
    const answers = answersIn(received).length;
    expect(fake.received.length).toBeLessThanOrEqual(answers);
    if (answers === 0) expect(inboundLines()[0]).toMatchObject({ status: 503, error: "client_gone" });
  });

  test("two JSON POSTs in one write", async () => {
    const body = JSON.stringify({ from: "a@example.org", to: "user@example.com", raw: MESSAGE });
    const received = await rawExchange(server.port, [{ data: request(body, "user@example.com", "application/json").repeat(2) }]);
    await settled(1);
    expect(fake.received.length).toBeLessThanOrEqual(answersIn(received).length);
  });

  test("with a spool: nothing delivered and nothing queued behind the client's back", async () => {
    const dir = mkdtempSync(join(tmpdir(), "relay-pipelining-"));
    const lines: LogLine[] = [];
    const config = fromEnv(ServerEnv, { API_KEYS: KEY_1, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(fake.port), MAX_MESSAGE_BYTES: String(LIMIT), SPOOL_DIR: dir });
    const s = startServer({ ...config, port: 0 }, { log: (l) => lines.push(l) });
    try {
      fake.behaviour.rcpt = () => 450; // Dovecot busy: the spool would take it
      const received = await rawExchange(s.port, [{ data: request(MESSAGE) + health }]);
      while (!lines.some((l) => l.path === INBOUND_PATH)) await Bun.sleep(5);
      expect(answersIn(received)).toEqual([]);
      expect(lines.find((l) => l.path === INBOUND_PATH)).toMatchObject({ status: 503, error: "client_gone" });
      expect(fake.received).toEqual([]);
      expect(readdirSync(join(dir, "queue"))).toEqual([]);
    } finally {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // Without a spool, a body past its first MiB streams into an LMTP transaction while it arrives.
  test("a second request that arrives while LMTP already reads the first one's body (a body past its first MiB, no spool)", async () => {
    const lines: LogLine[] = [];
    const config = fromEnv(ServerEnv, { API_KEYS: KEY_1, LMTP_HOST: "127.0.0.1", LMTP_PORT: String(fake.port), MAX_MESSAGE_BYTES: String(4 * 1024 * 1024) });
    const s = startServer({ ...config, port: 0 }, { log: (l) => lines.push(l) });
    try {
      const message = `Subject: slow\r\n\r\n${`${"x".repeat(76)}\r\n`.repeat(15_000)}`;
      const whole = request(message);
      const cut = whole.length - 20;
      const received = await rawExchange(s.port, [
        { data: whole.slice(0, cut) },
        // The transaction is under way: LMTP waits for the rest of the body.
        { data: whole.slice(cut) + health, before: () => fake.commands.includes("DATA") },
      ]);
      while (!lines.some((l) => l.path === INBOUND_PATH)) await Bun.sleep(5);
      expect(fake.received.length).toBeLessThanOrEqual(answersIn(received).length);
    } finally {
      await s.stop();
    }
  });
});
