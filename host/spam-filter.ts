// The spam filter as a step of the host's delivery (RSPAMD_URL): after the message is received
// whole and is not a repeat, before LMTP or the spool. It scans the received bytes with rspamd
// (spam-scan.ts), counts the scan, and then either refuses or defers a live message (a Refusal the
// app answers 422 or 429), or hands back the header fields to put on top of the message
// (spam-verdict.ts). Mail that was already accepted is always delivered, with its verdict.
// rspamd down or slow: the message is delivered unscanned, with X-Spam-Status saying so, and the
// failure is logged and counted; mail never waits on the filter (docs/spam-filter.md says why).

import type { Resolver } from "node:dns/promises";
import type { MessageBody } from "../lmtp.ts";
import { Refusal } from "../shared/app.ts";
import type { LogWriter } from "../shared/log.ts";
import type { HeaderInfo } from "./message-headers.ts";
import type { Metrics } from "./metrics.ts";
import { replayThen } from "./replay-stream.ts";
import { confirmedName } from "./sender-name.ts";
import { scanFailed, type RspamdClient } from "./spam-scan.ts";
import { treatment, verdictFields } from "./spam-verdict.ts";

export interface SpamFilter {
  rspamd: RspamdClient;
  /** Finds the sending server's name (its PTR, forward-confirmed), within nameTimeoutMs. */
  resolver: Resolver;
  nameTimeoutMs: number;
  metrics: Metrics;
  log: LogWriter;
}

export interface ScanSubject {
  envelope: { from: string; to: string[] };
  /** Names the message in rspamd's log and in ours (the request id, or the spool id on a retry). */
  queueId: string;
  info: HeaderInfo;
  /** The sender heard 250 before (held at the edge, or retried from the spool): never refused now. */
  alreadyAccepted: boolean;
}

/** Scans the message; throws a Refusal for a live one its verdict refuses or defers; otherwise the fields to prepend. */
export async function filterSpam(f: SpamFilter, subject: ScanSubject, body: MessageBody): Promise<Uint8Array> {
  const started = performance.now();
  const { sender } = subject.info;
  const hostname = sender ? await confirmedName(f.resolver, sender.ip, f.nameTimeoutMs) : null;
  const scan = await f.rspamd.scan({ from: subject.envelope.from, to: subject.envelope.to, queueId: subject.queueId, sender, hostname, body });
  f.metrics.observeScan(scanFailed(scan) ? "failed" : scan.action, (performance.now() - started) / 1000);
  if (scanFailed(scan)) {
    f.log({ event: "spam_unscanned", id: subject.queueId, error: scan.failed, message: "rspamd gave no verdict: delivered unscanned (X-Spam-Status: Unknown)" });
    return verdictFields(scan, subject.info.lineEnd);
  }
  const t = treatment(scan, subject.alreadyAccepted);
  if (t.is === "refuse") throw new Refusal(422, "spam_rejected", t.reply);
  if (t.is === "defer") throw new Refusal(429, "spam_deferred", t.reply);
  return verdictFields(scan, subject.info.lineEnd);
}

/** The fields on top, then the message's bytes as they are (a buffer of at most HELD_BYTES is copied; a stream is not). */
export function prepended(fields: Uint8Array, body: MessageBody): MessageBody {
  return body instanceof Uint8Array ? Buffer.concat([fields, body]) : replayThen([fields], body.getReader());
}
