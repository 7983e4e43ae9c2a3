// The runbook's JSON body read as it streams (shared/json-message.ts), without HTTP: the message
// comes out byte for byte whatever the escaping and wherever the chunks are cut; the envelope is
// known before the body has ended; every bad body is a Refusal with the status and words the
// contract gives it; the limits hold.

import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { base64Problem } from "../shared/contract.ts";
import { JSON_FIELDS_MAX_BYTES, RAW_FIRST_MAX_BYTES, maxJsonBytes, readJsonMessage, type JsonMessage } from "../shared/json-message.ts";
import { Refusal } from "../shared/refusal.ts";
import { allowSlowTests } from "./support/timeout.ts";

allowSlowTests();

const enc = new TextEncoder();
const LIMITS = { maxMessage: 64 * 1024, maxJson: maxJsonBytes(64 * 1024) };

/** The bytes as a stream cut into pieces of `size` (or at the given offsets). */
function cut(bytes: Uint8Array, size: number | number[]): ReadableStream<Uint8Array> {
  const at = typeof size === "number" ? Array.from({ length: Math.ceil(bytes.length / size) - 1 }, (_, i) => (i + 1) * size) : size;
  const pieces: Uint8Array[] = [];
  let from = 0;
  for (const to of [...at.filter((n) => n > 0 && n < bytes.length).sort((a, b) => a - b), bytes.length]) {
    pieces.push(bytes.slice(from, to));
    from = to;
  }
  return new ReadableStream({
    pull(c) {
      const next = pieces.shift();
      if (next) c.enqueue(next);
      else c.close();
    },
  });
}

async function messageOf(m: JsonMessage): Promise<Uint8Array> {
  return m.body instanceof Uint8Array ? m.body : new Uint8Array(await new Response(m.body).arrayBuffer());
}

/** The message a body carries, read through cut pieces; or the Refusal it is answered with. */
async function read(json: string | Uint8Array, size: number | number[] = 1 << 20, limits = LIMITS): Promise<Uint8Array | Refusal> {
  const bytes = typeof json === "string" ? enc.encode(json) : json;
  try {
    return await messageOf(await readJsonMessage(cut(bytes, size), limits));
  } catch (e) {
    if (e instanceof Refusal) return e;
    throw e;
  }
}

const refusal = (r: Uint8Array | Refusal) => (r instanceof Refusal ? { status: r.status, code: r.code, message: r.message } : { bytes: new TextDecoder().decode(r) });

/** json.dumps's default: every character outside ASCII as \uXXXX (surrogate pairs for the rest). */
function asciiOnly(json: string): string {
  return json.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

describe("the message comes out byte for byte", () => {
  test("any text, escaped as JSON.stringify or as json.dumps (ASCII only), cut anywhere: the UTF-8 of raw", async () => {
    await fc.assert(
      fc.asyncProperty(fc.string({ unit: "grapheme", minLength: 1, maxLength: 300 }), fc.array(fc.nat(2000), { maxLength: 6 }), fc.boolean(), async (raw, cuts, ascii) => {
        const json = JSON.stringify({ from: "a@example.org", to: "user@example.com", subject: "s", raw, timestamp: "t" });
        const got = await read(ascii ? asciiOnly(json) : json, cuts);
        expect(refusal(got)).toEqual({ bytes: raw });
        expect(Buffer.from(got as Uint8Array).equals(Buffer.from(enc.encode(raw)))).toBe(true);
      }),
      { seed: 2121, numRuns: 300 },
    );
  });

  test("raw_base64 of any bytes, wrapped at any width with \\n or \\r\\n escapes, cut anywhere: those bytes", async () => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 600 }), fc.integer({ min: 4, max: 80 }), fc.boolean(), fc.array(fc.nat(1200), { maxLength: 6 }), async (bytes, width, crlf, cuts) => {
        const b64 = Buffer.from(bytes).toString("base64").match(new RegExp(`.{1,${width}}`, "g"))!.join(crlf ? "\r\n" : "\n");
        const got = await read(JSON.stringify({ from: "", to: ["user@example.com"], raw_base64: b64 }), cuts);
        expect(got).toBeInstanceOf(Uint8Array);
        expect(Buffer.from(got as Uint8Array).equals(Buffer.from(bytes))).toBe(true);
      }),
      { seed: 2122, numRuns: 300 },
    );
  });

  test("one byte at a time: escapes, a surrogate pair and 2-, 3- and 4-byte UTF-8 split in every place", async () => {
    const raw = "Subject: \u00e9\u20ac\ud83d\ude00\r\n\r\n\"quoted\" \\ / \b\f\t\u0000 \u0416\u0436 end\r\n";
    for (const json of [JSON.stringify({ from: "a@example.org", to: "u@example.com", raw }), asciiOnly(JSON.stringify({ from: "a@example.org", to: "u@example.com", raw }))]) {
      expect(refusal(await read(json, 1))).toEqual({ bytes: raw });
    }
  });

  test('"\\u0041"-style escapes of base64 characters are base64 too, as JSON.parse reads them', async () => {
    expect(refusal(await read('{"from":"","to":"u@example.com","raw_base64":"\\u0059\\u0057\\u004a\\u006a"}', 3))).toEqual({ bytes: "abc" });
  });

  test("a UTF-8 byte order mark before the object is skipped (as TextDecoder did); a lone one is not JSON", async () => {
    expect(refusal(await read(new Uint8Array([0xef, 0xbb, 0xbf, ...enc.encode('{"from":"","to":"u@example.com","raw":"x"}')]), 1))).toEqual({ bytes: "x" });
    expect(refusal(await read(new Uint8Array([0xef, 0xbb, 0x41])))).toMatchObject({ status: 400, code: "invalid_utf8" });
  });

  test("other fields of any JSON type, in any order, before and after the message, are taken as JSON.parse takes them", async () => {
    const json = '{ "x": {"nested": [1, "}", {"]": "\\"}"}]}, "from" : "a@example.org", "n": -1.5e3, "to": ["u@example.com"], "raw": "m", "timestamp": "2025", "t": true, "z": null }';
    expect(JSON.parse(json).raw).toBe("m");
    for (const size of [1, 2, 7, 1000]) expect(refusal(await read(json, size))).toEqual({ bytes: "m" });
  });
});

describe("streams: the envelope is known before the body ends", () => {
  test("from and to before raw: readJsonMessage resolves while the rest of the body has not even been sent; the message follows as it comes", async () => {
    let push!: (s: string | null) => void;
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        push = (s) => (s === null ? c.close() : c.enqueue(enc.encode(s)));
      },
    });
    push('{"from":"a@example.org","to":"u@example.com","raw":"first part, ');
    const m = await readJsonMessage(body, LIMITS);
    expect(m.envelope).toEqual({ from: "a@example.org", to: ["u@example.com"] });
    expect(m.size).toBeNull();
    const reader = (m.body as ReadableStream<Uint8Array>).getReader();
    expect(new TextDecoder().decode((await reader.read()).value)).toBe("first part, ");
    push("second part\\r\\n");
    expect(new TextDecoder().decode((await reader.read()).value)).toBe("second part\r\n");
    push('", "timestamp": "now"}');
    push(null);
    expect((await reader.read()).done).toBe(true);
  });

  test("a message that ends in the chunks read so far goes on as bytes, its size known; a field after it that the schema refuses is refused at once", async () => {
    const m = await readJsonMessage(cut(enc.encode('{"from":"a@example.org","to":"u@example.com","raw":"short", "timestamp": "now"}'), 60), LIMITS);
    expect(m.size).toBe(5);
    expect(m.body).toBeInstanceOf(Uint8Array);
    const e = await readJsonMessage(cut(enc.encode('{"from":"a@example.org","to":"u@example.com","raw":"short", "timestamp": 5}'), 60), LIMITS).catch((err: unknown) => err);
    expect(e).toMatchObject({ status: 400, message: "timestamp: must be a string" });
  });

  test("a field after the message that the schema refuses fails the stream with that Refusal (nothing was whole, nothing is delivered)", async () => {
    const m = await readJsonMessage(cut(enc.encode(`{"from":"a@example.org","to":"u@example.com","raw":"${"the message ".repeat(20)}", "timestamp": 5}`), 80), LIMITS);
    expect(m.body).toBeInstanceOf(ReadableStream);
    const e = await new Response(m.body as ReadableStream).arrayBuffer().catch((err: unknown) => err);
    expect(e).toBeInstanceOf(Refusal);
    expect(e).toMatchObject({ status: 400, code: "invalid_request", message: "timestamp: must be a string" });
  });

  test("the body ending inside the message fails the stream as malformed JSON", async () => {
    const m = await readJsonMessage(cut(enc.encode('{"from":"a@example.org","to":"u@example.com","raw":"cut short'), 40), LIMITS);
    expect(await new Response(m.body as ReadableStream).arrayBuffer().catch((e: unknown) => e)).toMatchObject({ status: 400, code: "malformed_json" });
  });

  test("raw before from and to: held until they come, up to RAW_FIRST_MAX_BYTES; past that a 413 that says how to send it", async () => {
    expect(refusal(await read('{"raw":"small enough","from":"a@example.org","to":"u@example.com"}', 5))).toEqual({ bytes: "small enough" });
    const big = "x".repeat(2 * RAW_FIRST_MAX_BYTES);
    const got = await read(`{"raw":"${big}","from":"a@example.org","to":"u@example.com"}`, 64 * 1024, { maxMessage: 4 * RAW_FIRST_MAX_BYTES, maxJson: maxJsonBytes(4 * RAW_FIRST_MAX_BYTES) });
    expect(refusal(got)).toMatchObject({ status: 413, code: "payload_too_large" });
    expect((got as Refusal).message).toContain("put from and to before raw (as the runbook does), or send the message as message/rfc822");
  });
});

describe("limits", () => {
  test("the message: at the limit it is taken, a byte over is the 413 that names the limit, however it is escaped", async () => {
    const limits = { maxMessage: 1000, maxJson: maxJsonBytes(1000) };
    const at = "\u0416".repeat(500); // 1000 bytes of UTF-8, 6000 bytes as json.dumps writes it
    expect(refusal(await read(asciiOnly(JSON.stringify({ from: "", to: "u@example.com", raw: at })), 333, limits))).toEqual({ bytes: at });
    const over = await read(asciiOnly(JSON.stringify({ from: "", to: "u@example.com", raw: `${at}x` })), 333, limits);
    expect(refusal(over)).toEqual({ status: 413, code: "payload_too_large", message: "the message is larger than 1000 bytes" });
  });

  test("the JSON body: past 6 x the message limit + 2 MiB, a 413 that points to message/rfc822", async () => {
    const limits = { maxMessage: 1000, maxJson: maxJsonBytes(1000) };
    const got = await read(`{"from":"","to":"u@example.com","raw":"x"${" ".repeat(limits.maxJson)}}`, 64 * 1024, limits);
    expect(refusal(got)).toMatchObject({ status: 413, code: "payload_too_large" });
    expect((got as Refusal).message).toContain(`larger than ${limits.maxJson} bytes`);
    expect((got as Refusal).message).toContain("send the message as message/rfc822");
  });

  test("the fields besides the message: past 2 MiB, a 413 (they are held whole)", async () => {
    const got = await read(`{"from":"","to":"u@example.com","subject":"${"s".repeat(JSON_FIELDS_MAX_BYTES)}","raw":"x"}`, 64 * 1024, { maxMessage: 1000, maxJson: 4 * JSON_FIELDS_MAX_BYTES });
    expect(refusal(got)).toMatchObject({ status: 413, code: "payload_too_large" });
    expect((got as Refusal).message).toContain("the fields besides the message");
  });
});

describe("bad bodies: the status, code and words of the contract", () => {
  const envelope = '"from":"a@example.org","to":"u@example.com"';

  test.each([
    ["a lone high surrogate", "\\ud800"],
    ["a lone low surrogate", "\\udc00"],
    ["a pair in the wrong order", "\\udc00\\ud800"],
    ["a high surrogate at the very end", "\\ud83d"],
    ["a high surrogate before a simple escape", "\\ud83d\\n"],
  ])("raw with %s -> invalid_request naming the character and where it is, cut anywhere", async (_name, escaped) => {
    for (const size of [1, 3, 1000]) {
      const got = await read(`{${envelope},"raw":"Subject: x\\r\\n\\r\\nab${escaped}"}`, size);
      expect(refusal(got)).toMatchObject({ status: 400, code: "invalid_request" });
      expect((got as Refusal).message).toMatch(/^raw: contains a lone surrogate \("\\ud[89a-f][0-9a-f]{2}"\) at character 16, which has no UTF-8 form: send the bytes as raw_base64$/);
    }
  });

  test("positions count UTF-16 code units, as JavaScript does: an emoji before a lone surrogate counts 2", async () => {
    const got = await read(`{${envelope},"raw":"\u00e9\ud83d\ude00\\ud800"}`, 1);
    expect((got as Refusal).message).toContain("at character 3,");
  });

  test.each([
    ["Latin-1 in raw", [0x7b, ...enc.encode(`${envelope},"raw":"`), 0xe9, 0x74, 0xe9, 0x22, 0x7d]],
    ["an overlong form", [0x7b, ...enc.encode(`${envelope},"raw":"`), 0xc0, 0xaf, 0x22, 0x7d]],
    ["an encoded surrogate", [0x7b, ...enc.encode(`${envelope},"raw":"`), 0xed, 0xa0, 0x80, 0x22, 0x7d]],
    ["a truncated sequence before the quote", [0x7b, ...enc.encode(`${envelope},"raw":"`), 0xe2, 0x82, 0x22, 0x7d]],
    ["Latin-1 in a field", [0x7b, ...enc.encode(`${envelope},"subject":"`), 0xe9, ...enc.encode('","raw":"x"}')]],
  ])("%s -> invalid_utf8, never U+FFFD", async (_name, bytes) => {
    for (const size of [1, 1000]) expect(refusal(await read(new Uint8Array(bytes), size))).toMatchObject({ status: 400, code: "invalid_utf8" });
  });

  test.each([
    ["truncated", `{${envelope}, "raw": "x"`],
    ["a trailing comma", `{${envelope}, "raw": "x",}`],
    ["data after the object", `{${envelope}, "raw": "x"} {}`],
    ["a control character in raw", `{${envelope}, "raw": "a\tb"}`],
    ["a bad escape", `{${envelope}, "raw": "a\\qb"}`],
    ["a bad \\u escape", `{${envelope}, "raw": "a\\u12g4"}`],
    ["a bad field value", `{${envelope}, "subject": tru, "raw": "x"}`],
    ["a missing colon", `{"from" "a@example.org"}`],
    ["an empty body", ""],
    ["blanks only", "  \n "],
    ["not JSON at all", "from=a"],
  ])("%s -> malformed_json", async (_name, json) => {
    for (const size of [1, 1000]) expect(refusal(await read(json, size))).toMatchObject({ status: 400, code: "malformed_json" });
  });

  test("not an object, or fields the schema refuses -> invalid_request with the schema's words", async () => {
    for (const json of ["null", "[]", '"text"', "42"]) expect(refusal(await read(json))).toMatchObject({ status: 400, code: "invalid_request", message: "the request body must be a JSON object with from, to and raw" });
    expect(refusal(await read("{}"))).toMatchObject({ status: 400, code: "invalid_request" });
    expect((await read("{}")) as Refusal).toHaveProperty("message", expect.stringContaining("raw: exactly one of raw and raw_base64 is required"));
    expect(refusal(await read(`{${envelope},"raw":"x","raw_base64":"eA=="}`))).toMatchObject({ status: 400, message: "raw: exactly one of raw and raw_base64 is required" });
    expect(refusal(await read(`{${envelope},"raw":5}`))).toMatchObject({ status: 400, message: expect.stringContaining("raw: must be a string") });
    expect(refusal(await read(`{"from":"a@example.org","to":"u@example.com\\r\\nRCPT TO:<evil@x>","raw":"x"}`))).toMatchObject({ status: 400, code: "invalid_request" });
  });

  test("a field given twice -> invalid_request naming it, wherever the chunks are cut: the envelope never depends on where the packets were split", async () => {
    // JSON.parse takes the last "to"; a stream that began delivery with the first one cannot.
    // Before, read whole this went to other@ and cut after the message to good@.
    const twice = [
      `{"from":"a@example.org","to":"good@example.com","raw":"Subject: x\\r\\n\\r\\nbody","to":"other@example.com"}`,
      `{"from":"a@example.org","to":"good@example.com","to":"other@example.com","raw":"x"}`,
      `{"from":"a@example.org","from":"b@example.org","to":"u@example.com","raw":"x"}`,
      `{"raw":null,${envelope},"raw":"x"}`,
      `{${envelope},"subject":"a","raw":"x","subject":"b"}`,
      `{${envelope},"t\\u006f":"other@example.com","raw":"x"}`,
    ];
    for (const json of twice) {
      for (const size of [1, 7, 60, 1000]) {
        const got = await read(json, size);
        expect(refusal(got)).toMatchObject({ status: 400, code: "invalid_request" });
        expect((got as Refusal).message).toMatch(/^"(to|from|raw|subject)" is given twice: /);
      }
    }
  });

  test("raw_base64 that is not base64: the words of base64Problem, at the right character", async () => {
    const b64 = (s: string) => read(`{${envelope},"raw_base64":${JSON.stringify(s)}}`, 3);
    expect(refusal(await b64(" ".repeat(100) + "!"))).toMatchObject({ message: 'raw_base64: is not base64: "!" at character 100 is not a base64 character' });
    expect(refusal(await b64("abcde"))).toMatchObject({ message: 'raw_base64: is not base64: 5 base64 characters, not a multiple of 4 (the "=" padding is required)' });
    expect(refusal(await b64("ab=c"))).toMatchObject({ message: 'raw_base64: is not base64: data after the "=" padding, at character 3' });
    expect(refusal(await b64("a==="))).toMatchObject({ message: 'raw_base64: is not base64: more than two "=" at character 3' });
    expect(refusal(await b64("aQ=="))).toEqual({ bytes: "i" });
    expect(refusal(await b64("ab"))).toMatchObject({ code: "invalid_request" });
    expect(refusal(await b64("ab9="))).toMatchObject({ message: "raw_base64: is not base64: stray bits after the last byte (not the canonical encoding)" });
    expect(refusal(await b64("é==="))).toMatchObject({ message: "raw_base64: is not base64: a non-ASCII character at character 0 is not a base64 character" });
  });

  test("property: raw_base64 is taken exactly when base64Problem (the rule it had) takes it, and decodes as atob does", async () => {
    const symbol = fc.constantFrom(..."ABCDabcd0189+/= \n\t\r!-_".split(""));
    await fc.assert(
      fc.asyncProperty(fc.array(symbol, { minLength: 1, maxLength: 24 }).map((a) => a.join("")), fc.array(fc.nat(40), { maxLength: 3 }), async (b64, cuts) => {
        const got = await read(JSON.stringify({ from: "", to: "u@example.com", raw_base64: b64 }), cuts);
        const problem = base64Problem(b64);
        if (problem) expect(refusal(got)).toMatchObject({ status: 400, message: `raw_base64: is not base64: ${problem}` });
        else if (atob(b64).length === 0) expect(refusal(got)).toMatchObject({ code: "empty_message" });
        else expect(Buffer.from(got as Uint8Array).toString("latin1")).toBe(atob(b64));
      }),
      { seed: 2123, numRuns: 2000 },
    );
  });

  test("an empty message -> empty_message", async () => {
    expect(refusal(await read(`{${envelope},"raw":""}`))).toMatchObject({ status: 400, code: "empty_message" });
    expect(refusal(await read(`{${envelope},"raw_base64":"  "}`))).toMatchObject({ status: 400, code: "empty_message" });
  });
});
