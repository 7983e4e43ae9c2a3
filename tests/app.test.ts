// The HTTP contract end to end: a real Bun.serve (startServer) in front of the scriptable fake
// LMTP server, one test per row of DESIGN.md's status table and per way a request can go wrong.
// A 500 needs a deliverer that throws, so that one uses createApp directly.

import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { TemporaryFailure, createApp, type Deliverer } from "../app.ts";
import { ServerEnv, fromEnv } from "../config.ts";
import { INBOUND_PATH, MAX_RECIPIENTS, outcomeForStatus, type InboundResponse } from "../contract.ts";
import { startFakeLmtp, type FakeLmtpServer } from "../fake-lmtp.ts";
import type { LogLine } from "../middleware/access-log.ts";
import { startServer, type RunningServer } from "../server.ts";
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

function streamOf(chunks: Uint8Array[]): ReadableStream<Uint8Array> {
  let i = 0;
  return new ReadableStream({
    pull(controller) {
      if (i < chunks.length) controller.enqueue(chunks[i++]!);
      else controller.close();
    },
  });
}

/** The access-log lines for the inbound route. */
const inboundLines = () => logs.filter((l) => l.path === INBOUND_PATH);

/**
 * A hand-written HTTP/1.1 request over TCP, for what fetch will not send (a Content-Length
 * without the body, control characters in a header). Answers the status and the body.
 */
function rawHttp(port: number, head: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    let buf = new Uint8Array(0);
    const done = () => {
      const text = new TextDecoder().decode(buf);
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(text);
      if (!m) return false;
      const end = text.indexOf("\r\n\r\n");
      if (end < 0) return false;
      const length = /\r\ncontent-length: *(\d+)/i.exec(text.slice(0, end));
      const body = text.slice(end + 4);
      if (length && body.length < Number(length[1])) return false;
      resolve({ status: Number(m[1]), body });
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

/** A port on 127.0.0.1 with nothing listening. */
function deadPort(): number {
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  return port;
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
      const s = startFor(deadPort());
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
        for (const secret of ["127.0.0.1", String(fake.port), "PIPELINING", "spooled", "lmtp"]) expect(text).not.toContain(secret);
        expect(fake.commands.some((c) => c.startsWith("LHLO"))).toBe(true); // it did look
        // A wrong key is no key.
        expect(Object.keys(await readyBody(await fetch(s.url + path, { headers: { "X-API-Key": KEY_3 } }))).sort()).toEqual(["status", "timestamp"]);

        for (const headers of [{ "X-API-Key": KEY_1 }, { Authorization: `Bearer ${KEY_2}` }] as Record<string, string>[]) {
          const r = await fetch(s.url + path, { headers });
          expect(r.status).toBe(200);
          const body = await readyBody(r);
          expect(body).toMatchObject({ status: "ready", lmtp: `127.0.0.1:${fake.port}`, spooled: null });
          expect(body.capabilities).toContain("PIPELINING");
        }
      } finally {
        await s.stop();
      }
    });
  }

  test("with LMTP down: /ready and /health?deep=1 -> 503 without the error text; with the key, the error; /health stays 200", async () => {
    const port = deadPort();
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
