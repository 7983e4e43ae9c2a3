// The notice to POSTMASTER when the edge gives up on a message it had accepted (the sender was
// told 250, so someone must hear of it). A short text message: the envelope, the failed message's
// Message-ID and its decoded From, Subject and Date, the host's reply, and how to retry. Only the
// header block is read (postal-mime parses it alone); the body is never looked at.

import PostalMime from "postal-mime";
import type { FailedMessage } from "./spool.ts";

export interface HeaderSummary {
  messageId: string;
  from: string;
  subject: string;
  date: string;
}

/** The header block of a message's first bytes: up to the first empty line. */
export function headerBlock(start: Uint8Array): Uint8Array {
  for (let i = 0; i + 1 < start.length; i++) {
    if (start[i] !== 0x0a) continue;
    if (start[i + 1] === 0x0a) return start.subarray(0, i + 1);
    if (start[i + 1] === 0x0d && start[i + 2] === 0x0a) return start.subarray(0, i + 1);
  }
  // No empty line within what was read (an enormous header, or no body): up to the last line end.
  const lastLf = start.lastIndexOf(0x0a);
  return lastLf >= 0 ? start.subarray(0, lastLf + 1) : start;
}

/** One line of text for a header or the notice: no control characters (a decoded CR LF ends nothing). */
const oneLine = (s: string | undefined, max = 300) => (s ?? "").replace(/[\x00-\x1f\x7f]+/g, " ").trim().slice(0, max);

export async function summarizeHeaders(start: Uint8Array): Promise<HeaderSummary> {
  const head = headerBlock(start);
  const block = new Uint8Array(head.length + 2);
  block.set(head);
  block.set([0x0d, 0x0a], head.length); // the empty line: nothing after it is parsed
  try {
    const mail = await PostalMime.parse(block);
    const from = mail.from;
    const fromText = !from ? "" : from.address ? (from.name ? `${from.name} <${from.address}>` : from.address) : from.name;
    return { messageId: oneLine(mail.messageId), from: oneLine(fromText), subject: oneLine(mail.subject), date: oneLine(mail.date) };
  } catch {
    return { messageId: "", from: "", subject: "", date: "" };
  }
}

/**
 * RFC 2047 for a header value that is not plain ASCII: encoded words of at most 39 bytes of UTF-8
 * each (64 characters, within the RFC's 75), split between characters, one per folded line, so
 * that "Subject: " and the first one stay within 78.
 */
function encodedWords(text: string): string {
  if (/^[\x20-\x7e]*$/.test(text)) return text;
  const utf8 = new TextEncoder();
  const words: string[] = [];
  let chunk: number[] = [];
  const flush = () => {
    if (chunk.length) words.push(`=?UTF-8?B?${btoa(String.fromCharCode(...chunk))}?=`);
    chunk = [];
  };
  for (const c of text) {
    const bytes = utf8.encode(c);
    if (chunk.length + bytes.length > 39) flush();
    chunk.push(...bytes);
  }
  flush();
  return words.join("\r\n ");
}

export function noticeMessage(m: FailedMessage, h: HeaderSummary, postmaster: string, now = Date.now()): string {
  const domain = postmaster.slice(postmaster.lastIndexOf("@") + 1);
  const because = m.why === "refused" ? "the host refused it for good" : `it could not be delivered within the maximum age (held since ${new Date(m.since).toISOString()})`;
  const subject = `Undelivered mail held at the edge: ${h.subject || "(no subject)"}`.slice(0, 200);
  const lines = [
    `From: Mail relay edge <mailer-daemon@${domain}>`,
    `To: <${postmaster}>`,
    `Subject: ${encodedWords(subject)}`,
    `Date: ${new Date(now).toUTCString().replace("GMT", "+0000")}`,
    `Message-ID: <edge-notice-${m.id}@${domain}>`,
    "Auto-Submitted: auto-generated",
    "MIME-Version: 1.0",
    "Content-Type: text/plain; charset=utf-8",
    "Content-Transfer-Encoding: 8bit",
    "",
    "The Worker accepted this message for the home host while the host could not take it,",
    `and has now given up on it: ${because}.`,
    "The sender was told it was accepted and has not been told otherwise.",
    "",
    `  id:          ${m.id}`,
    `  envelope:    from <${m.from}> to <${m.to}>`,
    `  size:        ${m.size} bytes`,
    `  received:    ${new Date(m.received).toISOString()}`,
    `  attempts:    ${m.attempts}`,
    `  host reply:  ${oneLine(m.lastReply, 400) || "(none)"}`,
    "",
    `  Message-ID:  ${h.messageId || "(none)"}`,
    `  From:        ${h.from || "(none)"}`,
    `  Subject:     ${h.subject || "(none)"}`,
    `  Date:        ${h.date || "(none)"}`,
    "",
    "The message is kept, byte for byte, in the edge spool's failed/ for 30 days.",
    "To deliver it again once the cause is fixed, from a checkout of the relay:",
    "",
    `  bun run edge-queue retry ${m.id}`,
    "",
    `or: curl -X POST -H "X-API-Key: $API_KEY" https://<the Worker>/edge/retry/${m.id}`,
    "",
  ];
  return lines.join("\r\n");
}
