// Property-based tests (fast-check, fixed seeds): the LMTP reply parser and dot-stuffer on
// arbitrary bytes and chunkings, the envelope/request validation on arbitrary strings, and the
// app's answers to fuzzed requests. Each property states what must hold for every input.

import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { createApp, type Deliverer, type InboundMessage } from "../shared/app.ts";
import { INBOUND_PATH, InboundEnvelope, InboundJsonBody, MAX_ENVELOPE_TO_BYTES, MAX_RECIPIENTS, addressProblem, headerText, headerValue } from "../shared/contract.ts";
import { DotStuffer, LmtpFault, ReplyParser, type LmtpReply } from "../lmtp.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const SEED = 20_250_417;
const latin1 = (b: Uint8Array) => Buffer.from(b).toString("latin1");
const enc = new TextEncoder();

/** Splits bytes at the given cut points (any values; taken modulo the length, sorted). */
function chunked(bytes: Uint8Array, cuts: number[]): Uint8Array[] {
  if (bytes.length === 0) return [bytes];
  const at = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const c of [...at, bytes.length]) {
    out.push(bytes.subarray(prev, c)); // empty chunks included on purpose
    prev = c;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// ReplyParser

/** A reply as a server would send it, and what the parser must return for it. */
const replyArb = fc
  .record({
    code: fc.integer({ min: 200, max: 599 }),
    enhanced: fc.option(fc.tuple(fc.integer({ min: 0, max: 999 }), fc.integer({ min: 0, max: 999 })), { nil: null }),
    // Text: anything but line ends, not starting with a blank or a digit (which could read as an
    // enhanced code); UTF-8 included, so a split inside a character is exercised.
    lines: fc.array(
      fc.option(
        fc
          .string({ unit: fc.oneof(fc.constantFrom("a", "Z", " ", "-", ".", "<", ">", "@", ":", "\t", "0", "9"), fc.string({ unit: "grapheme", minLength: 1, maxLength: 1 })), maxLength: 60 })
          .map((s) => s.replace(/[\r\n]/g, "_"))
          .filter((s) => !/^[\s\d]/.test(s)),
        { nil: "" },
      ),
      { minLength: 1, maxLength: 5 },
    ),
    bareLf: fc.boolean(),
  })
  .map(({ code, enhanced, lines, bareLf }) => {
    const cls = String(code)[0]!;
    // RFC 3463 has classes 2, 4 and 5 only: a 3xx reply carries no enhanced code.
    const enh = enhanced && cls !== "3" ? `${cls}.${enhanced[0]}.${enhanced[1]}` : null;
    const eol = bareLf ? "\n" : "\r\n";
    const wire = lines
      .map((text, i) => {
        const sep = i === lines.length - 1 ? " " : "-";
        const body = enh ? (text ? `${enh} ${text}` : enh) : text;
        // The bare code form ("250") is allowed for a line with nothing after the code.
        return body === "" && sep === " " && i % 2 === 0 ? `${code}${eol}` : `${code}${sep}${body}${eol}`;
      })
      .join("");
    const expected: LmtpReply = { code, enhanced: enh, text: lines.join("\n") };
    return { wire, expected };
  });

function parseAll(chunks: Uint8Array[]): LmtpReply[] {
  const p = new ReplyParser();
  return chunks.flatMap((c) => p.push(c));
}

describe("ReplyParser (property)", () => {
  test("arbitrary bytes in arbitrary chunks: it returns replies or throws LmtpFault, never anything else", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.array(fc.nat(), { maxLength: 12 }), (bytes, cuts) => {
        try {
          const replies = parseAll(chunked(bytes, cuts));
          for (const r of replies) {
            if (!(r.code >= 200 && r.code <= 599)) return false;
            if (r.enhanced !== null && !/^[245]\.\d{1,3}\.\d{1,3}$/.test(r.enhanced)) return false;
          }
          return true;
        } catch (e) {
          return e instanceof LmtpFault && e.kind === "protocol";
        }
      }),
      { seed: SEED, numRuns: 3000 },
    );
  });

  test("reply-shaped noise (codes, dashes, line ends, long lines) also only ever throws LmtpFault", () => {
    const token = fc.constantFrom("250", "250-", "250 ", "4", "55", "550 5.1.1 x", "\r\n", "\n", "\r", "-", " ", "2.0.0", "\u00e9", "x".repeat(700), "\x00");
    fc.assert(
      fc.property(fc.array(token, { maxLength: 40 }), fc.array(fc.nat(), { maxLength: 8 }), (tokens, cuts) => {
        try {
          parseAll(chunked(enc.encode(tokens.join("")), cuts));
          return true;
        } catch (e) {
          return e instanceof LmtpFault;
        }
      }),
      { seed: SEED + 1, numRuns: 2000 },
    );
  });

  test("valid (multi-line) replies come back exactly, whatever the chunk boundaries", () => {
    fc.assert(
      fc.property(fc.array(replyArb, { minLength: 1, maxLength: 4 }), fc.array(fc.nat(), { maxLength: 20 }), (replies, cuts) => {
        const bytes = enc.encode(replies.map((r) => r.wire).join(""));
        const got = parseAll(chunked(bytes, cuts));
        expect(got).toEqual(replies.map((r) => r.expected));
      }),
      { seed: SEED + 2, numRuns: 2000 },
    );
  });

  test("fed one byte at a time gives the same as fed whole", () => {
    fc.assert(
      fc.property(fc.array(replyArb, { minLength: 1, maxLength: 3 }), (replies) => {
        const bytes = enc.encode(replies.map((r) => r.wire).join(""));
        const whole = parseAll([bytes]);
        const bytewise = parseAll(Array.from(bytes, (b) => Uint8Array.of(b)));
        expect(bytewise).toEqual(whole);
      }),
      { seed: SEED + 3, numRuns: 500 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// DotStuffer

/** A reference decoder, as an LMTP server reads DATA: CRLF lines up to ".", leading dot removed. */
function unstuff(wire: Uint8Array): { message: string; terminated: boolean; trailing: string } {
  const text = latin1(wire);
  const lines: string[] = [];
  let at = 0;
  for (;;) {
    const nl = text.indexOf("\r\n", at);
    if (nl === -1) return { message: lines.join(""), terminated: false, trailing: text.slice(at) };
    const line = text.slice(at, nl);
    at = nl + 2;
    if (line === ".") return { message: lines.join(""), terminated: true, trailing: text.slice(at) };
    lines.push((line.startsWith(".") ? line.slice(1) : line) + "\r\n");
  }
}

function stuff(chunks: Uint8Array[]): Uint8Array {
  const s = new DotStuffer();
  const parts = chunks.map((c) => s.push(c));
  parts.push(s.end());
  return Buffer.concat(parts);
}

/** Every LF not preceded by CR becomes CRLF (what DotStuffer promises for bare LF). */
const crlfNormalise = (s: string) => s.replace(/(^|[^\r])\n/g, "$1\r\n").replace(/(^|[^\r])\n/g, "$1\r\n");

const messageBytes = fc.oneof(
  fc.uint8Array({ maxLength: 400 }),
  // Line-structure-heavy bytes: dots, CR, LF at every position.
  fc.array(fc.constantFrom(0x2e, 0x0d, 0x0a, 0x41, 0x00, 0xff, 0x20), { maxLength: 200 }).map((a) => Uint8Array.from(a)),
);

describe("DotStuffer (property)", () => {
  test("decode(encode(m)) is m for CRLF-normalised input (a final CRLF added if missing), any chunking", () => {
    fc.assert(
      fc.property(messageBytes, fc.array(fc.nat(), { maxLength: 15 }), (raw, cuts) => {
        const m = crlfNormalise(latin1(raw));
        const input = Buffer.from(m, "latin1");
        const wire = stuff(chunked(input, cuts));
        const { message, terminated, trailing } = unstuff(wire);
        expect(terminated).toBe(true);
        expect(trailing).toBe(""); // the terminator comes last, and only once
        expect(message).toBe(m === "" || m.endsWith("\r\n") ? m : m + "\r\n");
      }),
      { seed: SEED + 4, numRuns: 3000 },
    );
  });

  test("arbitrary bytes: no bare LF on the wire, the same wire for any chunking, and bare LF decoded as CRLF", () => {
    fc.assert(
      fc.property(messageBytes, fc.array(fc.nat(), { maxLength: 15 }), (raw, cuts) => {
        const whole = stuff([raw]);
        const split = stuff(chunked(raw, cuts));
        expect(latin1(split)).toBe(latin1(whole));
        expect(/(^|[^\r])\n/.test(latin1(whole))).toBe(false);
        const m = crlfNormalise(latin1(raw));
        expect(unstuff(whole).message).toBe(m === "" || m.endsWith("\r\n") ? m : m + "\r\n");
      }),
      { seed: SEED + 5, numRuns: 2000 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// Envelope and request validation

const FORBIDDEN = /[\r\n\0<>, ]/;

/** Strings built to look like addresses, with forbidden characters and extreme lengths mixed in. */
const addressish = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: "binary", maxLength: 40 }),
  fc.tuple(fc.stringMatching(/^[a-z0-9.+_-]{0,70}$/), fc.stringMatching(/^[a-z0-9.-]{0,30}$/)).map(([l, d]) => `${l}@${d}`),
  fc
    .tuple(
      fc.stringMatching(/^[a-z0-9.]{1,20}$/),
      fc.stringMatching(/^[a-z0-9.]{1,20}$/),
      fc.constantFrom("\r", "\n", "\r\n", "\0", "<", ">", ",", " ", "\t", "\x7f", "\x01", "@", "<>", "é", "\u2028"),
      fc.nat(45),
    )
    .map(([l, d, bad, at]) => {
      const s = `${l}@${d}.example`;
      const i = at % (s.length + 1);
      return s.slice(0, i) + bad + s.slice(i);
    }),
  fc.tuple(fc.integer({ min: 1, max: 300 }), fc.integer({ min: 1, max: 300 })).map(([l, d]) => `${"a".repeat(l)}@${"d".repeat(d)}.test`),
  fc.constantFrom("", "<>", " <a@b.test> ", "<a@b.test", "a@b.test>", "@b", "a@", "a@b", "<<a@b.test>>", "\ta@b.test\t"),
);

/** Valid addresses, sometimes bracketed or padded with blanks (both allowed). */
const validAddress = fc
  .tuple(fc.stringMatching(/^[a-z0-9][a-z0-9.+_-]{0,20}$/), fc.stringMatching(/^[a-z0-9][a-z0-9.-]{0,20}$/), fc.constantFrom("", "<>", " ", "\t"))
  .map(([l, d, wrap]) => (wrap === "<>" ? `<${l}@${d}>` : `${wrap}${l}@${d}${wrap}`));

const trimBlanks = (s: string) => s.replace(/^[ \t]+|[ \t]+$/g, "");
const unbracket = (s: string) => {
  const t = trimBlanks(s);
  return t.startsWith("<") && t.endsWith(">") ? t.slice(1, -1) : t;
};

/** Whether a string has a UTF-8 form (no lone surrogate): encodeURIComponent throws on one. */
function wellFormed(s: string): boolean {
  try {
    encodeURIComponent(s);
    return true;
  } catch {
    return false;
  }
}

/** The rules of the contract, restated: what an address that may go into MAIL FROM/RCPT TO is. */
function refAddressOk(a: string): boolean {
  if (a.length < 1 || a.length > 254) return false;
  if (/[\x00-\x20\x7f<>,]/.test(a)) return false;
  if (!wellFormed(a)) return false;
  const at = a.lastIndexOf("@");
  return at > 0 && at < a.length - 1 && at <= 64;
}

/** The envelope a valid request stands for, or null when it must be refused. */
function refEnvelope(from: unknown, to: unknown): { from: string; to: string[] } | null {
  if (typeof from !== "string") return null;
  const f = unbracket(from);
  if (f !== "" && !refAddressOk(f)) return null;
  let list: string[];
  if (typeof to === "string") list = to.split(",");
  else if (Array.isArray(to) && to.every((x) => typeof x === "string")) list = to as string[];
  else return null;
  const kept = list.map(trimBlanks).filter((s, _i, all) => s !== "" || all.length === 1);
  if (kept.length < 1 || kept.length > MAX_RECIPIENTS) return null;
  const out = kept.map(unbracket);
  if (!out.every(refAddressOk)) return null;
  // One per mailbox as Dovecot's %Lu sees it (ASCII letters folded), the first spelling kept.
  const mailboxes = new Map<string, string>();
  for (const a of out) {
    const key = a.replace(/[A-Z]/g, (c) => c.toLowerCase());
    if (!mailboxes.has(key)) mailboxes.set(key, a);
  }
  const unique = [...mailboxes.values()];
  if (enc.encode(unique.join(", ")).length > MAX_ENVELOPE_TO_BYTES) return null;
  return { from: f, to: unique };
}

/** What must hold for anything the validation accepts, whatever it was given. */
function safeAddress(a: string): boolean {
  return !FORBIDDEN.test(a) && a.length <= 254 && a.length > 0 && addressProblem(a) === null;
}

const recipientsArb = fc.oneof(
  addressish,
  validAddress,
  fc.array(validAddress, { minLength: 1, maxLength: 4 }).map((a) => a.join(",")),
  fc.array(validAddress, { minLength: 1, maxLength: 4 }),
  fc.array(addressish, { maxLength: 5 }),
  fc.array(addressish, { maxLength: 5 }).map((a) => a.join(",")),
  fc.integer({ min: 95, max: 105 }).map((n) => Array.from({ length: n }, (_, i) => `u${i}@example.test`).join(",")),
);

describe("validation (property)", () => {
  test("addressProblem never throws; anything with CR, LF, NUL, <, >, space, comma, or too long is refused", () => {
    fc.assert(
      fc.property(addressish, (a) => {
        const p = addressProblem(a);
        if (FORBIDDEN.test(a) || a.length > 254 || a.length === 0) expect(p).not.toBeNull();
        expect(p === null).toBe(refAddressOk(a));
      }),
      { seed: SEED + 6, numRuns: 3000 },
    );
  });

  test("InboundEnvelope never throws, accepts exactly the valid envelopes, and what it accepts is safe", () => {
    fc.assert(
      fc.property(fc.oneof(addressish, fc.anything()), fc.oneof(recipientsArb, fc.anything()), (from, to) => {
        const r = InboundEnvelope.safeParse({ from, to });
        const ref = refEnvelope(from, to);
        expect(r.success).toBe(ref !== null);
        if (r.success) {
          expect(r.data).toEqual(ref!);
          expect(r.data.from === "" || safeAddress(r.data.from)).toBe(true);
          expect(r.data.to.length).toBeGreaterThanOrEqual(1);
          expect(r.data.to.length).toBeLessThanOrEqual(MAX_RECIPIENTS);
          for (const a of r.data.to) expect(safeAddress(a)).toBe(true);
        }
        // A control character in the raw input can never be trimmed or unbracketed away.
        if (typeof from === "string" && /[\r\n\0]/.test(from)) expect(r.success).toBe(false);
        if (typeof to === "string" && /[\r\n\0]/.test(to)) expect(r.success).toBe(false);
      }),
      { seed: SEED + 7, numRuns: 3000 },
    );
  });

  test("InboundJsonBody never throws on arbitrary JSON, and accepts only safe envelopes with exactly one of raw/raw_base64", () => {
    const bodyArb = fc.oneof(
      fc.jsonValue(),
      fc.record(
        {
          from: fc.oneof(addressish, fc.jsonValue()),
          to: fc.oneof(recipientsArb, fc.jsonValue()),
          raw: fc.oneof(fc.string({ maxLength: 30 }), fc.jsonValue()),
          raw_base64: fc.oneof(fc.base64String({ maxLength: 40 }), fc.string({ maxLength: 10 })),
          subject: fc.oneof(fc.string({ maxLength: 10 }), fc.jsonValue()),
        },
        { requiredKeys: [] },
      ),
    );
    fc.assert(
      fc.property(bodyArb, (body) => {
        const r = InboundJsonBody.safeParse(body);
        if (!r.success) return;
        const b = body as Record<string, unknown>;
        expect(refEnvelope(b.from, b.to)).not.toBeNull();
        expect(r.data.from === "" || safeAddress(r.data.from)).toBe(true);
        for (const a of r.data.to) expect(safeAddress(a)).toBe(true);
        expect((r.data.raw === undefined) !== (r.data.raw_base64 === undefined)).toBe(true);
      }),
      { seed: SEED + 8, numRuns: 3000 },
    );
  });
});

// ---------------------------------------------------------------------------------------------
// The app, fuzzed

const KEY = "property-test-key-0123456789abcdefghijklmnop";
const MAX = 4096;

function stubApp() {
  const calls: InboundMessage[] = [];
  const deliver: Deliverer = async (m) => {
    // Counted once the whole message is in, as a real delivery sends its final dot only then: a
    // body that fails on the way (a JSON body refused after its message began) delivers nothing.
    if (!(m.body instanceof Uint8Array)) await new Response(m.body).arrayBuffer();
    calls.push(m);
    return m.envelope.to.map((address) => ({ address, code: 250, enhanced: "2.0.0", reply: "250 2.0.0 Saved" }));
  };
  const app = createApp({ apiKeys: [KEY], deliver, maxMessageBytes: MAX, log: () => {} });
  return { app, calls };
}

/** A header value as the app will see it, or null if fetch cannot send it at all. */
/**
 * A header value as the app receives it, or null if Headers refuse it (CR, LF, NUL): `v` sent as
 * UTF-8 (the contract's wire form), or, for `asBytes`, its characters taken as bytes as they
 * are (0x80-0xFF alone is not UTF-8).
 */
function received(v: string, asBytes: boolean): string | null {
  try {
    return new Headers({ x: asBytes ? v : headerValue(v) }).get("x");
  } catch {
    return null;
  }
}

describe("the app, fuzzed (property)", () => {
  test("message/rfc822 with fuzzed envelope headers: 2xx exactly for valid envelopes (delivered as validated), else 400, never 5xx", async () => {
    const { app, calls } = stubApp();
    await fc.assert(
      fc.asyncProperty(fc.option(fc.oneof(addressish, validAddress), { nil: undefined }), fc.option(fc.oneof(addressish, recipientsArb.filter((x): x is string => typeof x === "string")), { nil: undefined }), fc.boolean(), async (from, to, asBytes) => {
        const headers: Record<string, string> = { "Content-Type": "message/rfc822", "X-API-Key": KEY };
        let seenFrom: string | null | undefined;
        let seenTo: string | null | undefined;
        // Bytes as they are only where each character is one byte; else as UTF-8.
        const bytes = asBytes && [from ?? "", to ?? ""].every((v) => /^[\x00-\xff]*$/.test(v));
        if (from !== undefined) {
          const v = received(from, bytes);
          fc.pre(v !== null);
          headers["X-Envelope-From"] = bytes ? from : headerValue(from);
          seenFrom = headerText(v!);
        }
        if (to !== undefined) {
          const v = received(to, bytes);
          fc.pre(v !== null);
          headers["X-Envelope-To"] = bytes ? to : headerValue(to);
          seenTo = headerText(v!);
        }
        const before = calls.length;
        const res = await app.request(INBOUND_PATH, { method: "POST", headers, body: "Subject: x\r\n\r\nbody\r\n" });
        // Text that is not UTF-8 (null) is refused like any bad envelope.
        const ref = seenFrom == null || seenTo == null ? null : refEnvelope(seenFrom, seenTo);
        expect(res.status).toBeLessThan(500);
        if (ref) {
          expect(res.status).toBe(200);
          expect(calls.length).toBe(before + 1);
          expect(calls[calls.length - 1]!.envelope).toEqual(ref);
        } else {
          expect(res.status).toBe(400);
          expect(calls.length).toBe(before);
          expect((await res.json()).error).toBe("invalid_envelope");
        }
      }),
      { seed: SEED + 9, numRuns: 400 },
    );
  });

  test("application/json with fuzzed fields: 2xx only for a valid envelope and message, otherwise 400/413, never 5xx", async () => {
    const { app, calls } = stubApp();
    const fieldArb = fc.record(
      {
        from: fc.oneof({ arbitrary: validAddress, weight: 4 }, addressish, fc.constant(""), fc.jsonValue()),
        to: fc.oneof({ arbitrary: recipientsArb, weight: 4 }, fc.jsonValue()),
        raw: fc.oneof({ arbitrary: fc.string({ minLength: 1, maxLength: 40 }), weight: 4 }, fc.string({ maxLength: 40 }), fc.constant("x".repeat(MAX + 1)), fc.jsonValue()),
        subject: fc.string({ maxLength: 10 }),
      },
      { requiredKeys: ["from", "to", "subject"] },
    );
    await fc.assert(
      fc.asyncProperty(fieldArb, async (fields) => {
        const before = calls.length;
        const res = await app.request(INBOUND_PATH, { method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": KEY }, body: JSON.stringify(fields) });
        expect(res.status).toBeLessThan(500);
        const ref = refEnvelope(fields.from, fields.to);
        const rawOk = typeof fields.raw === "string" && fields.raw.length > 0 && wellFormed(fields.raw) && enc.encode(fields.raw).length <= MAX;
        if (ref && rawOk) {
          expect(res.status).toBe(200);
          expect(calls[calls.length - 1]!.envelope).toEqual(ref);
        } else {
          expect([400, 413]).toContain(res.status);
          expect(calls.length).toBe(before);
        }
      }),
      { seed: SEED + 10, numRuns: 400 },
    );
  });

  test("junk: arbitrary bodies, content types and keys are answered 4xx, never 2xx or 5xx", async () => {
    const { app, calls } = stubApp();
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.string({ maxLength: 200 }), fc.jsonValue().map((v) => JSON.stringify(v)), fc.uint8Array({ maxLength: 200 })),
        fc.constantFrom("application/json", "application/json; charset=utf-8", "text/plain", "", "message/rfc822", "multipart/form-data", "APPLICATION/JSON"),
        fc.constantFrom(KEY, "", "wrong", `Bearer ${KEY}`),
        async (body, type, key) => {
          const headers: Record<string, string> = {};
          if (type) headers["Content-Type"] = type;
          if (key.startsWith("Bearer ")) headers.Authorization = key;
          else if (key) headers["X-API-Key"] = key;
          const before = calls.length;
          const res = await app.request(INBOUND_PATH, { method: "POST", headers, body });
          expect(res.status).toBeGreaterThanOrEqual(400);
          expect(res.status).toBeLessThan(500);
          expect(calls.length).toBe(before);
          expect((await res.json()).status).toBe("error");
        },
      ),
      { seed: SEED + 11, numRuns: 400 },
    );
  });
});
