// What the LMTP server says: its bytes parsed into replies (ReplyParser), a reply as one line
// (formatReply), and whether a reply accepts (the contract's reply-code rule, replyClass).

import { replyClass } from "../shared/replies.ts";
import { LmtpFault } from "./faults.ts";

/** One server reply, possibly multi-line. `text` is every line's text (after code and separator) joined by "\n". */
export interface LmtpReply {
  code: number;
  /** RFC 3463 enhanced status code ("5.1.1") when the reply carries one. */
  enhanced: string | null;
  text: string;
}

export interface RecipientReply extends LmtpReply {
  recipient: string;
  /** The reply came after the final dot: whatever it says, the server had the whole message. */
  afterDot?: true;
  /**
   * After the final dot, no answer the server can be held to: no reply in time, the connection
   * lost, "421 closing", or a 3xx. The server may have stored the message. The code is temporary
   * (it is offered again: a duplicate beats a loss) and the text says the outcome is unknown.
   */
  outcomeUnknown?: true;
}

const REPLY_LINE = /^([2-5]\d\d)([ -])(.*)$/s;
const ENHANCED = /^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)/;

/**
 * Turns the byte stream from the server into whole replies. Lines end in CRLF (a bare LF is
 * tolerated); continuation lines are "250-..." and the last line "250 ...". A line that is not a
 * reply line, or a continuation whose code changes, is a protocol error.
 */
export class ReplyParser {
  private pending = "";
  private lines: string[] = [];
  private code = 0;
  private readonly decoder = new TextDecoder("utf-8", { fatal: false });

  /** Feed bytes; returns every reply completed by them. Throws LmtpFault("protocol") on garbage, with no phase: the reader knows which. */
  push(chunk: Uint8Array | string): LmtpReply[] {
    this.pending += typeof chunk === "string" ? chunk : this.decoder.decode(chunk, { stream: true });
    const replies: LmtpReply[] = [];
    let nl: number;
    while ((nl = this.pending.indexOf("\n")) !== -1) {
      let line = this.pending.slice(0, nl);
      this.pending = this.pending.slice(nl + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      const reply = this.line(line);
      if (reply) replies.push(reply);
    }
    // A reply line is short (RFC 5321: 512 octets); a flood without line ends is not a server.
    if (this.pending.length > 4096) throw new LmtpFault("protocol", null, "reply line too long");
    return replies;
  }

  private line(line: string): LmtpReply | null {
    const m = REPLY_LINE.exec(line) ?? (/^[2-5]\d\d$/.test(line) ? [line, line, " ", ""] : null);
    if (!m) throw new LmtpFault("protocol", null, `not an LMTP reply line: ${JSON.stringify(line.slice(0, 80))}`);
    const code = Number(m[1]);
    if (this.lines.length > 0 && code !== this.code) {
      throw new LmtpFault("protocol", null, `reply code changed inside a multi-line reply (${this.code} then ${code})`);
    }
    this.code = code;
    this.lines.push(m[3] ?? "");
    if (m[2] === "-") return null;
    const lines = this.lines;
    this.lines = [];
    return toReply(code, lines);
  }
}

function toReply(code: number, lines: string[]): LmtpReply {
  // The enhanced code is taken from the first line; its class must agree with the basic code.
  const first = lines[0] ?? "";
  const em = ENHANCED.exec(first);
  const enhanced = em && em[1] === String(code)[0] ? `${em[1]}.${Number(em[2])}.${Number(em[3])}` : null;
  const strip = (l: string) => (enhanced ? l.replace(ENHANCED, "").trimStart() : l);
  return { code, enhanced, text: lines.map(strip).join("\n") };
}

/** "550 5.1.1 <x@y> User doesn't exist" - the reply as one line, for logs and bounce texts. */
export function formatReply(r: LmtpReply): string {
  return [String(r.code), r.enhanced, r.text.replace(/\n/g, " ")].filter(Boolean).join(" ");
}

/** Any 2xx accepts (RFC 5321 4.2.2: 251 and 252 as well as 250). */
export const accepted = (r: { code: number }) => replyClass(r.code) === "accepted";
