// The message's header block, read off the front of the body stream without consuming it, for
// its Message-ID (duplicate suppression) and the sending server that Cloudflare's topmost trace
// header names (XFORWARD to an MTA). The body itself is never parsed: one scan for the blank
// line, one for the field, on bytes (latin1: one character per byte, nothing decoded or lost).

import { isIP } from "node:net";

/** Header blocks longer than this are not searched further (the body still passes untouched). */
const MAX_HEAD = 64 * 1024;

export interface HeaderInfo {
  messageId: string | null;
  /**
   * The server that sent the message to Cloudflare Email Routing, from the topmost Received field
   * when Cloudflare wrote it ("Received: from <helo> (<ip>) by cloudflare-email.net ..."); null
   * otherwise. Only that one: lower trace fields were written by whoever sent the message.
   */
  sender: { ip: string; helo: string } | null;
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
  let i = 0;
  const replay = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (i < seen.length) return controller.enqueue(seen[i++]!);
      if (done) return controller.close();
      try {
        const r = await reader.read();
        if (r.done) controller.close();
        else controller.enqueue(r.value);
      } catch (e) {
        controller.error(e);
      }
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
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

/** A Message-ID field at the start of a line, with its folded continuation lines (RFC 5322 2.2.3). */
const MESSAGE_ID = /^message-id[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)/im;
/** The first Received field (the topmost: trace fields are prepended), folded lines included. */
const FIRST_RECEIVED = /^received[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)/im;
/** Cloudflare Email Routing's own trace field: "from <helo> (<ip>) by cloudflare-email.net". */
const CLOUDFLARE_RECEIVED = /^from ([\x21-\x7e]{1,255}) \(([0-9a-f.:]{2,45})\) by cloudflare-email\.net(?: |;|$)/i;

function parseHead(head: Uint8Array): HeaderInfo {
  const text = Buffer.from(head.buffer, head.byteOffset, head.byteLength).toString("latin1");
  const m = MESSAGE_ID.exec(text);
  const id = m?.[1]!.replace(/\r?\n(?=[ \t])/g, "").trim();
  return { messageId: id ? id.slice(0, 998) : null, sender: cloudflareSender(FIRST_RECEIVED.exec(text)?.[1]) };
}

function cloudflareSender(received: string | undefined): HeaderInfo["sender"] {
  const m = received === undefined ? null : CLOUDFLARE_RECEIVED.exec(received.replace(/\r?\n(?=[ \t])/g, "").replace(/[ \t]+/g, " ").trim());
  if (!m || isIP(m[2]!) === 0) return null;
  return { ip: m[2]!, helo: m[1]! };
}
