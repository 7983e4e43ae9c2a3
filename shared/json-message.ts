// The runbook's JSON body ({"from","to","subject","raw","timestamp"}, or raw_base64 instead of
// raw) read as it arrives. The fields besides the message are small: they are held, parsed and
// checked with the contract's schema. The message is decoded from its JSON string (escapes,
// UTF-8, base64) as it streams and handed on chunk by chunk, never held whole: a JSON request
// costs memory in proportion to a chunk, not to its message, and a message within the limit fits
// however it is escaped (each byte may take up to 6 in JSON: "\u00XX").
//
// When from and to come before the message (as the runbook writes them, and any JSON encoder
// that keeps the order it was given), the envelope is known when the message begins, and the
// message streams on to delivery. A message that comes before them is held until they come, at
// most RAW_FIRST_MAX_BYTES of it.

import { BASE64_VALUE, InboundJsonBody, describeIssues, loneSurrogateAt, type InboundEnvelope } from "./contract.ts";
import { Refusal, tooLarge } from "./refusal.ts";

const MiB = 1024 * 1024;
/** The fields besides the message (from, to, subject, timestamp, anything else), held whole: at most this many bytes of JSON. */
export const JSON_FIELDS_MAX_BYTES = 2 * MiB;
/** Of a message that comes before from and to, at most this much is held in memory until they come. */
export const RAW_FIRST_MAX_BYTES = 1 * MiB;

/** The largest JSON body taken: room for a message of `maxMessage` bytes written entirely as "\u00XX" escapes, and the other fields. */
export function maxJsonBytes(maxMessage: number): number {
  return 6 * maxMessage + JSON_FIELDS_MAX_BYTES;
}

export function jsonTooLarge(maxJson: number): Refusal {
  return new Refusal(
    413,
    "payload_too_large",
    `the JSON body is larger than ${maxJson} bytes (6 x MAX_MESSAGE_BYTES + 2 MiB: room for any escaping of a message within the limit); send the message as message/rfc822`,
  );
}

export interface JsonMessage {
  envelope: InboundEnvelope;
  /** The message: its bytes when the whole body was in by the time the envelope was known, else a stream that fails (with a Refusal) if the rest of the body is bad. */
  body: Uint8Array | ReadableStream<Uint8Array>;
  size: number | null;
}

/**
 * Reads a JSON request body up to where the envelope is known and the message has begun (or to
 * its end), checks the envelope, and hands the message on. Every problem is a Refusal: 400
 * (malformed_json, invalid_utf8, invalid_request, empty_message) or 413.
 */
export async function readJsonMessage(body: ReadableStream<Uint8Array> | null, limits: { maxMessage: number; maxJson: number }): Promise<JsonMessage> {
  const reader = new JsonMessageReader(limits);
  const source = body?.getReader() ?? null;
  try {
    // On until the message is under way with the envelope known (it streams on from there), or
    // the body has ended (a message already whole goes on as bytes).
    while (!reader.done && !(reader.inMessage && reader.envelopeSeen)) {
      const r = source ? await source.read() : { done: true as const, value: undefined };
      if (r.done) reader.end();
      else reader.push(r.value);
      if (!reader.done && !reader.envelopeSeen && reader.heldBytes > RAW_FIRST_MAX_BYTES) throw rawFirst(reader.messageField ?? "raw");
    }
    const envelope = reader.check();
    if (reader.done) {
      const bytes = reader.take() ?? new Uint8Array(0);
      if (bytes.byteLength === 0) throw emptyMessage(reader.messageField ?? "raw");
      return { envelope, body: bytes, size: bytes.byteLength };
    }
  } catch (e) {
    source?.cancel(e).catch(() => {});
    throw e;
  }
  const stream = new ReadableStream<Uint8Array>(
    {
      async pull(c) {
        try {
          for (;;) {
            const out = reader.take();
            if (out) return c.enqueue(out);
            if (reader.done) {
              reader.check();
              if (reader.messageBytes === 0) throw emptyMessage(reader.messageField ?? "raw");
              return c.close();
            }
            const r = await source!.read();
            if (r.done) reader.end();
            else reader.push(r.value);
          }
        } catch (e) {
          source!.cancel(e).catch(() => {});
          c.error(e);
        }
      },
      cancel(reason) {
        return source!.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
  return { envelope: reader.check(), body: stream, size: null };
}

// ---------------------------------------------------------------------------------------------

type MessageField = "raw" | "raw_base64";
const isMessageField = (key: string): key is MessageField => key === "raw" || key === "raw_base64";

type State = "start" | "bom" | "first-key" | "key" | "key-text" | "colon" | "value" | "small" | "message" | "after-value" | "after-object" | "not-object";

/** Fatal: bytes that are not UTF-8 are refused, never replaced with U+FFFD. */
const UTF8 = new TextDecoder("utf-8", { fatal: true });
const ENCODER = new TextEncoder();
/** A message string up to this long, whole in one chunk, is decoded natively (JsonString.whole). */
const WHOLE_MAX_BYTES = 1024 * 1024;

/** Field names and most small values: ASCII, a few dozen bytes, made a string without a decoder. */
function isShortAscii(bytes: Uint8Array): boolean {
  if (bytes.byteLength > 1024) return false;
  for (let i = 0; i < bytes.byteLength; i++) if (bytes[i]! >= 0x80) return false;
  return true;
}

const isBlank = (b: number) => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;

/**
 * The top level of a JSON object, byte by byte: field names, the values of small fields (their
 * bytes collected and parsed by JSON.parse once they end), and the message field's string, which
 * a JsonString decodes as it goes.
 */
class JsonMessageReader {
  /** The fields read so far, the message field left out. */
  private readonly fields = new Map<string, unknown>();
  /** Every field name read so far, the message field's too. */
  private readonly names = new Set<string>();
  messageField: MessageField | null = null;
  /** The body has ended, and was one well-formed JSON value. */
  done = false;
  messageBytes = 0;
  private state: State = "start";
  private key = "";
  /** The bytes of the field name or small value being read. */
  private collected: Uint8Array[] = [];
  private fieldBytes = 0;
  private depth = 0;
  private inString = false;
  private escaped = false;
  private position = 0;
  private message: JsonString | null = null;
  private held: Uint8Array[] = [];
  heldBytes = 0;

  constructor(private readonly limits: { maxMessage: number; maxJson: number }) {}

  /** The message's string has begun and not ended yet. */
  get inMessage(): boolean {
    return this.state === "message";
  }

  get envelopeSeen(): boolean {
    return this.fields.has("from") && this.fields.has("to");
  }

  /** What of the message has been decoded and not taken yet, in one piece. */
  take(): Uint8Array | null {
    if (this.heldBytes === 0) return null;
    const out = concat(this.held, this.heldBytes);
    this.held = [];
    this.heldBytes = 0;
    return out;
  }

  /** The fields checked with the contract's schema (the message field as "": its content is checked as it streams); the envelope. */
  check(): InboundEnvelope {
    const object: Record<string, unknown> = Object.fromEntries(this.fields);
    if (this.messageField) object[this.messageField] = "";
    const parsed = InboundJsonBody.safeParse(this.state === "not-object" ? this.fields.get("") : object);
    if (!parsed.success) throw new Refusal(400, "invalid_request", describeIssues(parsed.error));
    return { from: parsed.data.from, to: parsed.data.to };
  }

  push(chunk: Uint8Array): void {
    const start = this.position;
    this.position += chunk.byteLength;
    if (this.position > this.limits.maxJson) throw jsonTooLarge(this.limits.maxJson);
    const n = chunk.byteLength;
    // Where the bytes being collected (a field name, a small value) start in this chunk.
    let from = this.state === "key-text" || this.state === "small" || this.state === "not-object" ? 0 : -1;
    let i = 0;
    while (i < n) {
      const b = chunk[i]!;
      switch (this.state) {
        case "start":
          if (b === 0xef && start + i === 0) {
            this.state = "bom"; // TextDecoder took a UTF-8 byte order mark before JSON.parse: so does this
            i++;
          } else if (isBlank(b)) i++;
          else if (b === 0x7b) {
            this.state = "first-key";
            i++;
          } else {
            this.state = "not-object";
            from = i;
            i = n;
          }
          break;
        case "bom":
          if (b !== (start + i === 1 ? 0xbb : 0xbf)) throw notUtf8();
          if (start + i === 2) this.state = "start";
          i++;
          break;
        case "first-key":
        case "key":
          if (isBlank(b)) i++;
          else if (b === 0x22) {
            this.state = "key-text";
            this.inString = true;
            from = i++;
          } else if (b === 0x7d && this.state === "first-key") {
            this.state = "after-object";
            i++;
          } else throw malformed(`expected a field name at byte ${start + i}`);
          break;
        case "key-text":
        case "small":
          i = this.collect(chunk, i);
          if (i < 0) {
            i = n;
            break;
          }
          this.keep(chunk.subarray(from, i));
          from = -1;
          if (this.state === "key-text") {
            const key = this.parseCollected();
            if (typeof key !== "string") throw malformed("a field name that is not a string");
            if (this.names.has(key)) throw givenTwice(key);
            this.names.add(key);
            this.key = key;
            this.state = "colon";
          } else {
            this.fields.set(this.key, this.parseCollected());
            this.state = "after-value";
          }
          break;
        case "colon":
          this.step(b, { 0x3a: "value" }, '":"', start + i++);
          break;
        case "value":
          if (isBlank(b)) i++;
          else if (b === 0x22 && isMessageField(this.key)) {
            if (this.messageField) throw new Refusal(400, "invalid_request", "raw: exactly one of raw and raw_base64 is required");
            this.messageField = this.key;
            this.fields.delete(this.key);
            this.message = new JsonString(this.key, (bytes) => this.decoded(bytes));
            this.state = "message";
            i++;
          } else {
            this.state = "small";
            this.depth = 0;
            this.inString = false;
            this.escaped = false;
            from = i;
          }
          break;
        case "message":
          i = this.message!.push(chunk, i);
          if (this.message!.closed) this.state = "after-value";
          break;
        case "after-value":
          this.step(b, { 0x2c: "key", 0x7d: "after-object" }, '"," or "}"', start + i++);
          break;
        case "after-object":
          this.step(b, {}, "nothing after the JSON object", start + i++);
          break;
        case "not-object":
          from = i;
          i = n;
          break;
      }
    }
    if (from >= 0) this.keep(chunk.subarray(from, n));
  }

  /** A blank is skipped; a byte of `next` goes on to its state; anything else is not JSON. */
  private step(b: number, next: Partial<Record<number, State>>, expected: string, at: number): void {
    if (isBlank(b)) return;
    const state = next[b];
    if (!state) throw malformed(`expected ${expected} at byte ${at}`);
    this.state = state;
  }

  /** The body has ended. */
  end(): void {
    if (this.state === "not-object") {
      // Not an object: parsed whole (it is small, or refused as such), for the schema's answer.
      this.fields.set("", this.parseCollected());
    } else if (this.state !== "after-object") throw malformed("the body ends before the JSON object does");
    this.done = true;
  }

  /**
   * Scans a field name or a small value from chunk[i] to where it ends: just past the closing
   * quote of a name, or at the "," or "}" after a value (not taken). -1: it goes on past the chunk.
   */
  private collect(chunk: Uint8Array, i: number): number {
    const n = chunk.byteLength;
    const name = this.state === "key-text";
    for (; i < n; i++) {
      const b = chunk[i]!;
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (b === 0x5c) this.escaped = true;
        else if (b === 0x22) {
          this.inString = false;
          if (name) return i + 1;
        }
      } else if (b === 0x22) this.inString = true;
      else if (b === 0x7b || b === 0x5b) this.depth++;
      else if ((b === 0x7d || b === 0x5d) && this.depth > 0) this.depth--;
      else if ((b === 0x2c || b === 0x7d) && this.depth === 0) return i;
    }
    return -1;
  }

  private keep(bytes: Uint8Array): void {
    if (bytes.byteLength === 0) return;
    this.fieldBytes += bytes.byteLength;
    if (this.fieldBytes > JSON_FIELDS_MAX_BYTES) {
      if (this.state === "not-object") throw new Refusal(400, "invalid_request", "the request body must be a JSON object with from, to and raw");
      throw new Refusal(413, "payload_too_large", `the fields besides the message take more than ${JSON_FIELDS_MAX_BYTES} bytes of JSON`);
    }
    this.collected.push(bytes);
  }

  private parseCollected(): unknown {
    const bytes = concat(this.collected, this.collected.reduce((s, c) => s + c.byteLength, 0));
    this.collected = [];
    let text: string;
    try {
      text = isShortAscii(bytes) ? String.fromCharCode(...bytes) : UTF8.decode(bytes);
    } catch {
      throw notUtf8();
    }
    try {
      return JSON.parse(text);
    } catch (e) {
      throw malformed((e as Error).message);
    }
  }

  private decoded(bytes: Uint8Array): void {
    this.messageBytes += bytes.byteLength;
    if (this.messageBytes > this.limits.maxMessage) throw tooLarge(this.limits.maxMessage);
    this.held.push(bytes);
    this.heldBytes += bytes.byteLength;
  }
}

// ---------------------------------------------------------------------------------------------

const SIMPLE_ESCAPES: Record<number, number> = { 0x22: 0x22, 0x5c: 0x5c, 0x2f: 0x2f, 0x62: 0x08, 0x66: 0x0c, 0x6e: 0x0a, 0x72: 0x0d, 0x74: 0x09 };

/** The value of the 4 hex digits at chunk[i], or -1. */
function hex4(chunk: Uint8Array, i: number): number {
  const a = hexValue(chunk[i]!);
  const b = hexValue(chunk[i + 1]!);
  const c = hexValue(chunk[i + 2]!);
  const d = hexValue(chunk[i + 3]!);
  return a < 0 || b < 0 || c < 0 || d < 0 ? -1 : (a << 12) | (b << 8) | (c << 4) | d;
}

function hexValue(b: number): number {
  if (b >= 0x30 && b <= 0x39) return b - 0x30;
  if (b >= 0x61 && b <= 0x66) return b - 0x57;
  if (b >= 0x41 && b <= 0x46) return b - 0x37;
  return -1;
}

/**
 * The content of the message field's JSON string, from just past its opening quote, as the
 * bytes it stands for: escapes decoded, UTF-8 checked (as TextDecoder's fatal mode does), a lone
 * surrogate refused (it has no UTF-8 form). raw gives those bytes; raw_base64 takes only ASCII
 * and decodes it as base64 (strictly, as base64Problem in contract.ts does). Positions in errors
 * count UTF-16 code units, as JavaScript's string positions do.
 */
class JsonString {
  closed = false;
  /** UTF-16 code units so far. */
  private units = 0;
  /** 0: none; 1: after "\"; 2-5: reading the hex digits of "\u". */
  private escape = 0;
  private hex = 0;
  /** A high surrogate whose low half must come next; -1: none. */
  private high = -1;
  /** UTF-8 continuation bytes still to come, and the range the next must be in (the WHATWG decoder's). */
  private need = 0;
  private lower = 0x80;
  private upper = 0xbf;
  private readonly base64: Base64Decoder | null;

  constructor(
    private readonly field: MessageField,
    private readonly sink: (bytes: Uint8Array) => void,
  ) {
    this.base64 = field === "raw_base64" ? new Base64Decoder(sink) : null;
  }

  /** Decodes from chunk[i]; returns where it stopped: just past the closing quote, or the chunk's end. */
  push(chunk: Uint8Array, i: number): number {
    const whole = this.units === 0 && !this.escape && !this.need && i > 0 ? this.whole(chunk, i) : -1;
    if (whole >= 0) return whole;
    const n = chunk.byteLength;
    // Nothing decodes longer than its JSON, but a "\u" escape or a surrogate pair may end in this
    // chunk with its start in the one before: up to 4 bytes more.
    const out = new Uint8Array(n - i + 4);
    let o = 0;
    while (i < n) {
      const b = chunk[i]!;
      if (this.need) {
        if (b < this.lower || b > this.upper) throw notUtf8();
        this.lower = 0x80;
        this.upper = 0xbf;
        this.need--;
        out[o++] = b;
        i++;
      } else if (this.escape) {
        o = this.escaped(b, out, o);
        i++;
      } else if (this.high >= 0 && b !== 0x5c) {
        throw this.lone(this.high);
      } else if (b === 0x22) {
        this.closed = true;
        i++;
        break;
      } else if (b === 0x5c) {
        // "\uXXXX" whole in this chunk (json.dumps writes every non-ASCII character so): at once.
        const unit = i + 5 < n && chunk[i + 1] === 0x75 ? hex4(chunk, i + 2) : -1;
        if (unit >= 0) {
          o = this.unit(unit, out, o);
          i += 6;
        } else {
          this.escape = 1;
          i++;
        }
      } else if (b < 0x20) {
        throw malformed(`a control character (0x${b.toString(16).padStart(2, "0")}) inside the string ${this.field}; JSON writes it as an escape`);
      } else if (b < 0x80) {
        // A run of plain ASCII: a long one copied at once, a short one (a line between "\r\n"
        // escapes) byte by byte, which costs less than the view that set() needs.
        let j = i + 1;
        while (j < n) {
          const c = chunk[j]!;
          if (c === 0x22 || c === 0x5c || c < 0x20 || c >= 0x80) break;
          j++;
        }
        if (j - i > 256) {
          out.set(chunk.subarray(i, j), o);
          o += j - i;
        } else for (let k = i; k < j; k++) out[o++] = chunk[k]!;
        this.units += j - i;
        i = j;
      } else {
        if (this.base64) throw this.base64.notBase64("a non-ASCII character", this.units);
        if (b >= 0xc2 && b <= 0xdf) this.need = 1;
        else if (b >= 0xe0 && b <= 0xef) {
          if (b === 0xe0) this.lower = 0xa0;
          if (b === 0xed) this.upper = 0x9f;
          this.need = 2;
        } else if (b >= 0xf0 && b <= 0xf4) {
          if (b === 0xf0) this.lower = 0x90;
          if (b === 0xf4) this.upper = 0x8f;
          this.need = 3;
        } else throw notUtf8();
        this.units += this.need === 3 ? 2 : 1;
        out[o++] = b;
        i++;
      }
    }
    if (o) {
      if (this.base64) this.base64.push(out.subarray(0, o));
      else this.sink(out.subarray(0, o));
    }
    if (this.closed) this.base64?.finish();
    return i;
  }

  /**
   * A string that begins and ends in this chunk (most messages: the whole body comes in one),
   * decoded at once by the runtime's own JSON.parse, as it was before the body streamed; where it
   * ends, or -1 to go byte by byte (also for any string it refuses, so that the refusal says
   * exactly what is wrong and where).
   */
  private whole(chunk: Uint8Array, i: number): number {
    let q = chunk.indexOf(0x22, i);
    for (; q !== -1; q = chunk.indexOf(0x22, q + 1)) {
      let k = q - 1;
      while (k >= i && chunk[k] === 0x5c) k--;
      if ((q - 1 - k) % 2 === 0) break; // not escaped
    }
    if (q === -1 || q - i > WHOLE_MAX_BYTES) return -1;
    let text: string;
    try {
      text = JSON.parse(UTF8.decode(chunk.subarray(i - 1, q + 1)));
    } catch {
      return -1;
    }
    if (loneSurrogateAt(text) >= 0 || (this.base64 && !/^[\x00-\x7f]*$/.test(text))) return -1;
    const bytes = ENCODER.encode(text);
    if (this.base64) {
      this.base64.push(bytes);
      this.base64.finish();
    } else if (bytes.byteLength) this.sink(bytes);
    this.units = text.length;
    this.closed = true;
    return q + 1;
  }

  /** One byte of an escape; returns where the output goes on. */
  private escaped(b: number, out: Uint8Array, o: number): number {
    if (this.escape === 1) {
      if (b === 0x75) {
        this.escape = 2;
        this.hex = 0;
        return o;
      }
      if (this.high >= 0) throw this.lone(this.high);
      const v = SIMPLE_ESCAPES[b];
      if (v === undefined) throw malformed(`a bad escape "\\${String.fromCharCode(b)}" in ${this.field}`);
      this.escape = 0;
      this.units++;
      out[o++] = v;
      return o;
    }
    const d = hexValue(b);
    if (d < 0) throw malformed(`a bad "\\u" escape in ${this.field}`);
    this.hex = this.hex * 16 + d;
    if (++this.escape < 6) return o;
    this.escape = 0;
    return this.unit(this.hex, out, o);
  }

  /** The UTF-16 code unit of a "\u" escape; returns where the output goes on. */
  private unit(u: number, out: Uint8Array, o: number): number {
    if (this.base64 && u >= 0x80) throw this.base64.notBase64("a non-ASCII character", this.units);
    if (this.high >= 0) {
      if (u < 0xdc00 || u > 0xdfff) throw this.lone(this.high);
      const cp = 0x10000 + ((this.high - 0xd800) << 10) + (u - 0xdc00);
      this.high = -1;
      this.units += 2;
      out[o++] = 0xf0 | (cp >> 18);
      out[o++] = 0x80 | ((cp >> 12) & 0x3f);
      out[o++] = 0x80 | ((cp >> 6) & 0x3f);
      out[o++] = 0x80 | (cp & 0x3f);
      return o;
    }
    if (u >= 0xd800 && u <= 0xdbff) {
      this.high = u; // counted once its low half has come
      return o;
    }
    if (u >= 0xdc00 && u <= 0xdfff) throw this.lone(u);
    this.units++;
    if (u < 0x80) out[o++] = u;
    else if (u < 0x800) {
      out[o++] = 0xc0 | (u >> 6);
      out[o++] = 0x80 | (u & 0x3f);
    } else {
      out[o++] = 0xe0 | (u >> 12);
      out[o++] = 0x80 | ((u >> 6) & 0x3f);
      out[o++] = 0x80 | (u & 0x3f);
    }
    return o;
  }

  private lone(unit: number): Refusal {
    return new Refusal(
      400,
      "invalid_request",
      `${this.field}: contains a lone surrogate (${JSON.stringify(String.fromCharCode(unit))}) at character ${this.units}, which has no UTF-8 form: send the bytes as raw_base64`,
    );
  }
}

/**
 * raw_base64 decoded as it streams, by the rule of base64Problem (contract.ts): the RFC 4648
 * alphabet, "=" padding to a multiple of 4 and nothing after it, no stray bits, blanks and line
 * breaks anywhere.
 */
class Base64Decoder {
  /** Characters of the string so far, for positions in errors. */
  private at = 0;
  /** Alphabet characters and "=" so far, the "=" alone, and the value of the last alphabet character. */
  private symbols = 0;
  private padding = 0;
  private last = 0;
  /** Bits decoded that do not make a byte yet (at most 6), and how many there are. */
  private acc = 0;
  private bits = 0;

  constructor(private readonly sink: (bytes: Uint8Array) => void) {}

  push(ascii: Uint8Array): void {
    const out = new Uint8Array(Math.ceil((ascii.byteLength * 3) / 4) + 1);
    let o = 0;
    for (let i = 0; i < ascii.byteLength; i++, this.at++) {
      const c = ascii[i]!;
      if (isBlank(c)) continue;
      if (c === 0x3d) {
        if (++this.padding > 2) throw this.notBase64Because(`more than two "=" at character ${this.at}`);
        this.symbols++;
        continue;
      }
      const v = BASE64_VALUE[c]!;
      if (v < 0) throw this.notBase64(JSON.stringify(String.fromCharCode(c)), this.at);
      if (this.padding) throw this.notBase64Because(`data after the "=" padding, at character ${this.at}`);
      this.last = v;
      this.symbols++;
      this.acc = ((this.acc << 6) | v) & 0xffffff;
      this.bits += 6;
      if (this.bits >= 8) {
        this.bits -= 8;
        out[o++] = (this.acc >> this.bits) & 0xff;
      }
    }
    if (o) this.sink(out.subarray(0, o));
  }

  finish(): void {
    if (this.symbols % 4 !== 0) throw this.notBase64Because(`${this.symbols} base64 characters, not a multiple of 4 (the "=" padding is required)`);
    if ((this.padding === 1 && this.last & 0x03) || (this.padding === 2 && this.last & 0x0f)) throw this.notBase64Because("stray bits after the last byte (not the canonical encoding)");
  }

  notBase64(what: string, at: number): Refusal {
    return this.notBase64Because(`${what} at character ${at} is not a base64 character`);
  }

  private notBase64Because(problem: string): Refusal {
    return new Refusal(400, "invalid_request", `raw_base64: is not base64: ${problem}`);
  }
}

// ---------------------------------------------------------------------------------------------

function malformed(detail: string): Refusal {
  return new Refusal(400, "malformed_json", `the request body is not valid JSON: ${detail}`);
}

/**
 * RFC 8259 4: names within an object SHOULD be unique, and where they are not, readers differ.
 * JSON.parse takes the last; a message that began streaming to delivery with the first "to" can
 * only have that one. Refused, so that the envelope never depends on where the packets were cut.
 */
function givenTwice(name: string): Refusal {
  return new Refusal(400, "invalid_request", `${JSON.stringify(name.slice(0, 100))} is given twice: each field may appear once (which one would count is not defined by JSON)`);
}

function notUtf8(): Refusal {
  // Not replaced with U+FFFD: that would change the message without a word.
  return new Refusal(400, "invalid_utf8", "the request body is not valid UTF-8 (JSON must be, RFC 8259): send a message that is not UTF-8 as raw_base64");
}

function emptyMessage(field: MessageField): Refusal {
  return new Refusal(400, "empty_message", `the message (${field}) is empty`);
}

function rawFirst(field: MessageField): Refusal {
  return new Refusal(
    413,
    "payload_too_large",
    `${field} comes before from and to, so the host holds it in memory until they come, and it is larger than ${RAW_FIRST_MAX_BYTES} bytes: put from and to before ${field} (as the runbook does), or send the message as message/rfc822`,
  );
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  const out = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.byteLength;
  }
  return out;
}
