// The message's header block, read off the front of the body stream without consuming it, for
// its Message-ID (duplicate suppression), the sending server that Cloudflare Email Routing saw
// (the spam filter's IP and HELO) and the line end the message uses (what the relay prepends
// matches it). The body itself is never parsed: one scan for the blank line, one per field, on
// bytes (latin1: one character per byte, nothing decoded or lost).

import { isIP } from "node:net";
import { replayThen } from "./replay-stream.ts";

/** Header blocks longer than this are not searched further (the body still passes untouched). */
const MAX_HEAD = 64 * 1024;

export interface HeaderInfo {
  messageId: string | null;
  /** The server that handed the message to Cloudflare, from Email Routing's own trace field; null without one. */
  sender: SendingServer | null;
  /** The message's line end (that of its first line): what is prepended to it uses the same. */
  lineEnd: "\r\n" | "\n";
}

/** The SMTP client Email Routing received the message from: its address and what it said in HELO/EHLO. */
export interface SendingServer {
  ip: string;
  helo: string;
}

export interface Peeked {
  info: HeaderInfo;
  /** The same bytes as the input, from the first one. */
  body: ReadableStream<Uint8Array> | Uint8Array;
}

export async function peekHeaders(body: ReadableStream<Uint8Array> | Uint8Array): Promise<Peeked> {
  if (body instanceof Uint8Array) return { info: parseHead(body.subarray(0, headEnd(body) ?? MAX_HEAD)), body };

  const reader = body.getReader();
  const seen: Uint8Array[] = [];
  let total = 0;
  let end: number | null = null;
  let done = false;
  let carry: Uint8Array = new Uint8Array(0);
  while (end === null && total < MAX_HEAD) {
    const r = await reader.read();
    if (r.done) {
      done = true;
      break;
    }
    seen.push(r.value);
    total += r.value.byteLength;
    // Header blocks are small and usually arrive in one chunk; when they come in many small ones,
    // only the newest chunk and the three bytes before it can hold a blank line not yet seen.
    const window = concat([carry, r.value]);
    const found = headEnd(window);
    if (found !== null) end = total - window.byteLength + found;
    carry = window.subarray(Math.max(0, window.byteLength - 3));
  }
  const head = concat(seen);
  const info = parseHead(head.subarray(0, end ?? Math.min(head.byteLength, MAX_HEAD)));

  // Replay what was read, then hand on the rest of the stream as it comes.
  const replay = replayThen(seen, done ? null : reader);
  return { info, body: replay };
}

/** Index just past the blank line that ends the header block, or null. */
function headEnd(b: Uint8Array): number | null {
  for (let i = b.indexOf(0x0a); i !== -1; i = b.indexOf(0x0a, i + 1)) {
    if (b[i + 1] === 0x0a) return i + 2;
    if (b[i + 1] === 0x0d && b[i + 2] === 0x0a) return i + 3;
  }
  return null;
}

/** Header blocks are small: usually one chunk, so usually no copy. */
function concat(parts: Uint8Array[]): Uint8Array {
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** A field at the start of a line, with its folded continuation lines (RFC 5322 2.2.3): the first one. */
const field = (name: string) => new RegExp(`^${name}[ \\t]*:((?:[^\\r\\n]|\\r?\\n[ \\t])*)`, "im");
const MESSAGE_ID = field("message-id");
const RECEIVED = field("received");

const unfold = (value: string) => value.replace(/\r?\n(?=[ \t])/g, "");

function parseHead(head: Uint8Array): HeaderInfo {
  const text = Buffer.from(head.buffer, head.byteOffset, head.byteLength).toString("latin1");
  const idField = MESSAGE_ID.exec(text)?.[1];
  const id = idField === undefined ? "" : unfold(idField).trim();
  const received = RECEIVED.exec(text)?.[1];
  const lf = text.indexOf("\n");
  return {
    messageId: id ? id.slice(0, 998) : null,
    sender: received === undefined ? null : cloudflareSender(unfold(received)),
    lineEnd: lf === -1 || text[lf - 1] === "\r" ? "\r\n" : "\n",
  };
}

/**
 * Email Routing's trace field, as public captures of it read (folded after the IP and the id):
 *   Received: from mail-sor-f41.google.com (209.85.220.41)
 *           by cloudflare-email.net (cloudflare) id AuYfoj6x77E4
 *           for <u@example.com>; Fri, 25 Sep 2026 05:07:50 +0000
 * "from" names what the client said in HELO (a name that is not the address's PTR shows that),
 * the parentheses hold its address, IPv4 or IPv6, bare (brackets and an "IPv6:" tag are taken
 * too). Only the topmost Received is read, and only when it is this one: Email Routing prepends it
 * above everything the sender wrote, and anything lower, whatever it says, the sender could have
 * written. Anything else (another server's field, another shape, an address that is not one) is
 * null: the message is scanned without them.
 */
const CLOUDFLARE_RECEIVED = /^[ \t]*from[ \t]+([\x21-\x27\x2a-\x7e]{1,255})[ \t]+\(\[?(?:IPv6:)?([0-9A-Fa-f.:]{2,45})\]?\)[ \t]+by[ \t]+cloudflare-email\.net(?=[ \t;(]|$)/i;

export function cloudflareSender(received: string): SendingServer | null {
  const m = CLOUDFLARE_RECEIVED.exec(received);
  if (!m || !isIP(m[2]!)) return null;
  return { ip: m[2]!.toLowerCase(), helo: m[1]! };
}
