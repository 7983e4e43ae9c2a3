// rspamd's HTTP protocol (the normal worker, port 11333): one message, one POST /checkv2, one
// verdict. The envelope and what is known of the sending server go in request headers (From, one
// Rcpt per recipient, Queue-Id, IP, Helo, Hostname); the body is the message's bytes as received, from memory
// or streamed from the spool's tmp/ file, never copied into memory again. The reply is JSON: the
// action, the score and the score it is measured against, the symbols that matched, and the
// header fields rspamd's milter_headers module asks to add. Checked against rspamd 3.4's
// src/libserver/protocol.c (rspamd_protocol_handle_headers, rspamd_protocol_write_ucl).
//
// A scan that gets no verdict (refused connection, an error status, no answer within the time
// limit, a reply that is not a verdict) is a ScanFailure: it never throws, and what happens to the
// message then is the caller's choice (spam-filter.ts).

import { z } from "zod";
import { headerValue } from "../shared/contract.ts";
import type { MessageBody } from "../lmtp.ts";
import type { SendingServer } from "./message-headers.ts";

export interface ScanRequest {
  /** The envelope sender; "" is the null sender. */
  from: string;
  to: readonly string[];
  /** Names the message in rspamd's log (the request id, which the Worker's log line shares). */
  queueId: string;
  /** The server that handed the message to Cloudflare, when Email Routing's Received names it. */
  sender: SendingServer | null;
  /** Its name, forward-confirmed (sender-name.ts); null when it has none. */
  hostname: string | null;
  body: MessageBody;
}

export interface SymbolHit {
  name: string;
  score: number;
  options: string[];
}

/** A header field that rspamd asks to add (milter.add_headers), as rspamd wrote it. */
export interface MilterHeader {
  name: string;
  value: string;
}

export interface Verdict {
  /** rspamd's action: "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject", or one of its own. */
  action: string;
  score: number;
  required: number;
  symbols: SymbolHit[];
  addHeaders: MilterHeader[];
  /** rspamd's own words for the SMTP reply (messages.smtp_message), if any. */
  smtpMessage: string | null;
}

export interface ScanFailure {
  failed: string;
}

export type Scan = Verdict | ScanFailure;

export const scanFailed = (scan: Scan): scan is ScanFailure => "failed" in scan;

const HeaderEntry = z.union([z.string().transform((value) => ({ value, order: 0 })), z.object({ value: z.string(), order: z.number().optional().default(0) })]);

/** What of a /checkv2 reply is used; a reply without these is not a verdict. */
const CheckReply = z.object({
  action: z.string().min(1),
  score: z.number(),
  required_score: z.number(),
  symbols: z
    .record(z.string(), z.object({ score: z.number().catch(0), options: z.array(z.string()).catch([]).optional() }))
    .catch({})
    .optional(),
  messages: z.object({ smtp_message: z.string().optional() }).catch({}).optional(),
  // A shape this does not know is left out, not a reason to lose the verdict.
  milter: z
    .object({ add_headers: z.record(z.string(), z.union([HeaderEntry, z.array(HeaderEntry)])).optional() })
    .catch({})
    .optional(),
});

export class RspamdClient {
  private readonly checkUrl: string;

  constructor(
    url: string,
    private readonly timeoutMs: number,
  ) {
    this.checkUrl = `${url.replace(/\/+$/, "")}/checkv2`;
  }

  async scan(req: ScanRequest): Promise<Scan> {
    const headers = new Headers({ "Queue-Id": req.queueId, From: headerValue(req.from === "" ? "<>" : `<${req.from}>`) });
    for (const rcpt of req.to) headers.append("Rcpt", headerValue(`<${rcpt}>`));
    if (req.sender) {
      headers.set("IP", req.sender.ip);
      headers.set("Helo", req.sender.helo);
    }
    if (req.hostname) headers.set("Hostname", req.hostname);
    let res: Response;
    let text: string;
    try {
      const signal = AbortSignal.timeout(this.timeoutMs);
      // @ts-expect-error - Bun needs duplex for a stream body
      res = await fetch(this.checkUrl, { method: "POST", headers, body: req.body, signal, duplex: "half" });
      text = await res.text();
    } catch (e) {
      const err = e as Error;
      if (req.body instanceof ReadableStream && !req.body.locked) await req.body.cancel().catch(() => {});
      return { failed: err.name === "TimeoutError" || err.name === "AbortError" ? `no answer within ${this.timeoutMs} ms` : err.message };
    }
    if (res.status !== 200) return { failed: `HTTP ${res.status}: ${text.slice(0, 200)}` };
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      return { failed: `the reply is not JSON: ${text.slice(0, 200)}` };
    }
    const reply = CheckReply.safeParse(json);
    if (!reply.success) return { failed: `the reply is not a verdict: ${text.slice(0, 200)}` };
    return verdictOf(reply.data);
  }
}

function verdictOf(r: z.output<typeof CheckReply>): Verdict {
  const symbols = Object.entries(r.symbols ?? {}).map(([name, s]) => ({ name, score: s.score, options: s.options ?? [] }));
  symbols.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const added: (MilterHeader & { order: number })[] = [];
  for (const [name, entry] of Object.entries(r.milter?.add_headers ?? {})) {
    for (const e of Array.isArray(entry) ? entry : [entry]) added.push({ name, value: e.value, order: e.order });
  }
  // rspamd's order is a position among the message's fields; all of these go on top, in that order.
  added.sort((a, b) => a.order - b.order);
  return {
    action: r.action,
    score: r.score,
    required: r.required_score,
    symbols,
    addHeaders: added.map(({ name, value }) => ({ name, value })),
    smtpMessage: r.messages?.smtp_message ?? null,
  };
}
