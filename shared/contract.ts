// The inbound contract, shared by the host (server.ts) and the edge (worker.ts): the envelope and
// request schemas and the JSON answer. What reply codes and statuses mean is in replies.ts.
// Runtime-neutral: zod only.

import { z } from "zod";

export const INBOUND_PATH = "/api/v1/inbound-mail";
/** The request header that marks mail whose sender was already told 250 (the edge spool's drain). */
export const ALREADY_ACCEPTED = "X-Already-Accepted";
/** Cloudflare Email Routing's own message size limit. */
export const DEFAULT_MAX_MESSAGE_BYTES = 25 * 1024 * 1024;
/** RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients; more is not a real message. */
export const MAX_RECIPIENTS = 100;
/**
 * The recipient list as X-Envelope-To carries it ("a@x, b@y"), in UTF-8 bytes. Bun refuses a
 * header block of 16 KiB or more (431) before the app sees it, and the key, X-Envelope-From and
 * the tunnel's own headers need room beside it: 100 addresses of 254 characters (25.6 KB) cannot
 * be sent in a header at all, so the contract says how many bytes of them can.
 */
export const MAX_ENVELOPE_TO_BYTES = 8 * 1024;

// ---------------------------------------------------------------------------------------------
// Envelope

/**
 * Why an envelope address cannot be used, or null if it can. The address goes verbatim into
 * "MAIL FROM:<...>" / "RCPT TO:<...>", so anything that could end or split that command line (CR,
 * LF, NUL, other controls, space, angle brackets) is refused, and so is the list separator ",".
 * Lengths follow RFC 5321 4.5.3.1: local part 64, domain 255, whole path 256 with its brackets.
 */
export function addressProblem(address: string): string | null {
  if (address.length === 0) return "is empty";
  if (address.length > 254) return `is ${address.length} characters long (at most 254)`;
  const bad = /[\x00-\x20\x7f<>,]/.exec(address);
  if (bad) return `contains a forbidden character (${JSON.stringify(bad[0])})`;
  const lone = loneSurrogateAt(address);
  if (lone >= 0) return `contains a lone surrogate (${JSON.stringify(address[lone])}), which has no UTF-8 form`;
  const at = address.lastIndexOf("@");
  if (at <= 0 || at === address.length - 1) return "is not of the form local@domain";
  if (at > 64) return `has a local part of ${at} characters (at most 64)`;
  return null;
}

/**
 * Strips blanks (space, tab) at both ends. Not String.trim(): that also eats CR, LF and other
 * line ends, so "a@b\r\n" would pass as "a@b"; a control character anywhere is refused instead.
 * A loop, not /[ \t]+$/: that pattern retries from every blank of a long run that does not end
 * the string, which is quadratic (a megabyte of blanks in "to" held the event loop for hours).
 */
function trimBlanks(s: string): string {
  const blank = (i: number) => s.charCodeAt(i) === 0x20 || s.charCodeAt(i) === 0x09;
  let start = 0;
  let end = s.length;
  while (start < end && blank(start)) start++;
  while (end > start && blank(end - 1)) end--;
  return s.slice(start, end);
}

/**
 * Where the first UTF-16 surrogate without its other half is (JSON's "\ud800" makes one), or -1.
 * Such a string has no UTF-8 form: TextEncoder would quietly write U+FFFD in its place.
 */
export function loneSurrogateAt(s: string): number {
  if ((s as { isWellFormed?: () => boolean }).isWellFormed?.()) return -1;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0xd800 || c > 0xdfff) continue;
    const next = s.charCodeAt(i + 1); // NaN past the end
    if (c <= 0xdbff && next >= 0xdc00 && next <= 0xdfff) i++;
    else return i;
  }
  return -1;
}

/**
 * The key under which Dovecot finds a recipient's mailbox: its default auth_username_format %Lu
 * lowercases the whole address (C's tolower: ASCII letters only) before the userdb lookup, so
 * "User@Example.Test" and "user@example.test" are one mailbox and must get one copy.
 */
export function mailboxKey(address: string): string {
  return address.replace(/[A-Z]+/g, (letters) => letters.toLowerCase());
}

const utf8Length = (s: string) => new TextEncoder().encode(s).length;

/** Removes one pair of surrounding angle brackets: "<a@b>" and "a@b" mean the same. */
function unbracket(s: string): string {
  const t = trimBlanks(s);
  return t.startsWith("<") && t.endsWith(">") ? t.slice(1, -1) : t;
}

const required = (what: string) => ({
  error: (iss: { input: unknown }) => (iss.input === undefined ? "is required" : `must be ${what}`),
});

const recipient = z
  .string(required("a string"))
  .transform(unbracket)
  .superRefine((a, ctx) => {
    const p = addressProblem(a);
    if (p) ctx.addIssue({ code: "custom", message: `${JSON.stringify(a.slice(0, 80))} ${p}` });
  });

/** The envelope sender: "" or "<>" is the null sender of bounces and is allowed. */
const sender = z
  .string(required("a string"))
  .transform(unbracket)
  .superRefine((a, ctx) => {
    const p = a === "" ? null : addressProblem(a);
    if (p) ctx.addIssue({ code: "custom", message: `${JSON.stringify(a.slice(0, 80))} ${p}` });
  });

/**
 * "a@x, b@y" or ["a@x", "b@y"] -> ["a@x", "b@y"]; spellings of one mailbox (mailboxKey) dropped
 * after the first, which is the one the envelope keeps. Written as X-Envelope-To, the list must
 * fit in MAX_ENVELOPE_TO_BYTES, whichever way it came: what the host accepts, the edge can send.
 */
const recipientList = z
  .union([z.string(), z.array(z.string())], required("an address or a list of addresses"))
  .transform((v) => (Array.isArray(v) ? v : v.split(",")).map(trimBlanks).filter((s, i, all) => s !== "" || all.length === 1))
  .pipe(z.array(recipient).min(1, "needs at least one recipient").max(MAX_RECIPIENTS, `has more than ${MAX_RECIPIENTS} recipients`))
  .transform((list) => {
    const seen = new Set<string>();
    return list.filter((a) => {
      const key = mailboxKey(a);
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
  })
  .superRefine((list, ctx) => {
    const bytes = utf8Length(list.join(", "));
    if (bytes > MAX_ENVELOPE_TO_BYTES) {
      ctx.addIssue({
        code: "custom",
        message: `${list.length} recipients take ${bytes} bytes as "a, b" (X-Envelope-To), more than ${MAX_ENVELOPE_TO_BYTES}: send the message in several requests`,
      });
    }
  });

export const InboundEnvelope = z.object({ from: sender, to: recipientList });
export type InboundEnvelope = z.output<typeof InboundEnvelope>;

/**
 * X-Envelope-From and X-Envelope-To carry UTF-8 on the wire. Runtimes hand header values over in
 * one of two ways: Bun, like Fetch's ByteString, gives the bytes, one character per byte, and its
 * fetch() sends each character as one byte; workerd decodes what it receives as UTF-8 and encodes
 * what it sends the same way. Which one this runtime is shows in whether Headers takes a character
 * above U+00FF.
 */
const HEADERS_HOLD_TEXT = (() => {
  try {
    new Headers({ probe: "\u0100" });
    return true;
  } catch {
    return false;
  }
})();
const ASCII = /^[\x00-\x7f]*$/;

/** A received header value as text; null if its bytes are not UTF-8 (never U+FFFD instead). */
export function headerText(value: string): string | null {
  if (HEADERS_HOLD_TEXT || ASCII.test(value)) return value;
  const bytes = new Uint8Array(value.length);
  for (let i = 0; i < value.length; i++) bytes[i] = value.charCodeAt(i);
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return null;
  }
}

/** What to give Headers so that `text` goes out as UTF-8 (the inverse of headerText). */
export function headerValue(text: string): string {
  if (HEADERS_HOLD_TEXT || ASCII.test(text)) return text;
  let bytes = "";
  for (const b of new TextEncoder().encode(text)) bytes += String.fromCharCode(b);
  return bytes;
}

/** The envelope of a message/rfc822 request, from its headers (as text: see headerText). */
export const EnvelopeHeaders = z.object({
  "x-envelope-from": sender,
  "x-envelope-to": recipientList,
});

// ---------------------------------------------------------------------------------------------
// The JSON body (the original runbook's format)

export const InboundJsonBody = z
  .object({
    from: sender,
    to: recipientList,
    subject: z.string(required("a string")).optional(),
    raw: z
      .string(required("a string"))
      .superRefine((raw, ctx) => {
        const at = loneSurrogateAt(raw);
        if (at >= 0) {
          ctx.addIssue({ code: "custom", message: `contains a lone surrogate (${JSON.stringify(raw[at])}) at character ${at}, which has no UTF-8 form: send the bytes as raw_base64` });
        }
      })
      .optional(),
    raw_base64: z
      .string(required("a base64 string"))
      .superRefine((b64, ctx) => {
        const problem = base64Problem(b64);
        if (problem) ctx.addIssue({ code: "custom", message: `is not base64: ${problem}` });
      })
      .optional(),
    timestamp: z.string(required("a string")).optional(),
  }, { error: "the request body must be a JSON object with from, to and raw" })
  .superRefine(
    (b, ctx) => {
      if ((b.raw === undefined) === (b.raw_base64 === undefined)) {
        ctx.addIssue({ code: "custom", path: ["raw"], message: "exactly one of raw and raw_base64 is required" });
      }
    },
    // zod skips object refinements once a field failed; run this one too, so that a request
    // missing from, to and raw hears about all three at once.
    { when: (p) => typeof p.value === "object" && p.value !== null && !Array.isArray(p.value) },
  );
export type InboundJsonBody = z.output<typeof InboundJsonBody>;

/** Each character's value in the base64 alphabet (RFC 4648 section 4), or -1. */
export const BASE64_VALUE = (() => {
  const table = new Int8Array(128).fill(-1);
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (let i = 0; i < alphabet.length; i++) table[alphabet.charCodeAt(i)] = i;
  return table;
})();

/**
 * Why a string is not strict base64, or null: the RFC 4648 alphabet, padded with "=" to a multiple
 * of 4, nothing after the padding, and no stray bits in the last character (so that one message
 * has one encoding). Blanks and line breaks may stand anywhere (MIME wraps base64 at 76
 * characters). One pass over the characters: the regular expression this replaces backtracked
 * over long runs of blanks and took time quadratic in the length.
 */
export function base64Problem(s: string): string | null {
  let symbols = 0; // alphabet characters and padding
  let padding = 0;
  let last = 0; // the value of the last alphabet character
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) continue;
    if (c === 0x3d) {
      if (++padding > 2) return `more than two "=" at character ${i}`;
    } else {
      const value = c < 128 ? BASE64_VALUE[c]! : -1;
      if (value < 0) return `${JSON.stringify(s[i])} at character ${i} is not a base64 character`;
      if (padding) return `data after the "=" padding, at character ${i}`;
      last = value;
    }
    symbols++;
  }
  if (symbols % 4 !== 0) return `${symbols} base64 characters, not a multiple of 4 (the "=" padding is required)`;
  if ((padding === 1 && last & 0x03) || (padding === 2 && last & 0x0f)) return "stray bits after the last byte (not the canonical encoding)";
  return null;
}

/** "to: is required; from: ... contains a forbidden character" - zod's issues in one line. */
export function describeIssues(error: z.core.$ZodError): string {
  return error.issues.map((i) => (i.path.length ? `${i.path.map(String).join(".")}: ` : "") + i.message).join("; ");
}

// ---------------------------------------------------------------------------------------------
// The answer

/** One recipient's outcome, as the LMTP server gave it. */
export const RecipientResult = z.object({
  address: z.string(),
  code: z.number().int(),
  enhanced: z.string().nullable(),
  /** The whole reply on one line, e.g. "550 5.1.1 <x@y> User doesn't exist". */
  reply: z.string(),
  /** Not delivered yet, but safe in the host's durable spool: it will be (202). */
  queued: z.boolean().optional(),
  /** Already delivered earlier (the same bytes to the same recipient): not delivered again. */
  duplicate: z.boolean().optional(),
});
export type RecipientResult = z.output<typeof RecipientResult>;

export const InboundStatus = z.enum(["success", "queued", "duplicate", "rejected", "deferred", "error"]);
export type InboundStatus = z.output<typeof InboundStatus>;

export const InboundResponse = z.object({
  status: InboundStatus,
  message: z.string(),
  request_id: z.string().optional(),
  /** The runbook's field: the recipient, when there is exactly one. */
  recipient: z.string().optional(),
  recipients: z.array(RecipientResult).optional(),
  /** A short machine-readable reason for errors ("invalid_envelope", "payload_too_large", ...). */
  error: z.string().optional(),
});
export type InboundResponse = z.output<typeof InboundResponse>;
