// The reply-code rule, in one place, for both runtimes: what an SMTP/LMTP reply code means
// (replyClass), the results the relay writes itself (accepted, queued, duplicate, no reply), what
// a set of per-recipient results means as an HTTP answer, and what an HTTP status means to the
// sender. Pure: nothing here does I/O.

import type { InboundResponse, RecipientResult } from "./contract.ts";

export type ReplyClass = "accepted" | "temporary" | "permanent";

/**
 * What an SMTP/LMTP reply code means, the one rule everything here follows: 2xx accepted (250,
 * 251 and 252 alike, RFC 5321 4.2.2), 5xx refused for good, and anything else temporary: 4xx,
 * and also codes no step should answer (3xx outside DATA, nonsense), since a retry can always be
 * undone by the duplicate check and a bounce never can.
 */
export function replyClass(code: number): ReplyClass {
  if (!Number.isInteger(code)) return "temporary";
  if (code >= 200 && code < 300) return "accepted";
  if (code >= 500 && code < 600) return "permanent";
  return "temporary";
}

type Coded = { code: number };
export const isAccepted = (r: Coded) => replyClass(r.code) === "accepted";
export const isTemporary = (r: Coded) => replyClass(r.code) === "temporary";
export const isPermanent = (r: Coded) => replyClass(r.code) === "permanent";

// ---------------------------------------------------------------------------------------------
// Results the relay writes itself

/** A recipient accepted on the relay's own word (not an LMTP server's reply): "250 2.0.0 <text>". */
export function acceptedResult(address: string, text: string): RecipientResult {
  return { address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 ${text}` };
}

/** Not delivered yet, but durable in the host's spool under `spoolId` (answered 202). */
export function queuedResult(address: string, spoolId: string, why: string): RecipientResult {
  return { ...acceptedResult(address, `queued as ${spoolId} (LMTP: ${why})`), queued: true };
}

/** Delivered before (the same bytes to the same recipient): not delivered again. */
export function duplicateResult(address: string, messageId: string | null): RecipientResult {
  return { ...acceptedResult(address, `already delivered (${messageId ? `Message-ID ${messageId}` : "the same bytes, no Message-ID"})`), duplicate: true };
}

/** The same bytes are in the host's spool already, under `spoolId`, still to go to this recipient: not taken again (202). */
export function alreadyQueuedResult(address: string, spoolId: string): RecipientResult {
  return { ...acceptedResult(address, `already queued as ${spoolId}; not taken again`), queued: true };
}

/** A recipient the server gave no reply for: still to do. */
export function noReplyResult(address: string): RecipientResult {
  return { address, code: 451, enhanced: "4.3.0", reply: "451 4.3.0 no reply for this recipient" };
}

// ---------------------------------------------------------------------------------------------
// Results -> the HTTP answer

/** RFC 3463 X.3.4: "message too big for system" (an MTA's SIZE, or its refusal of the upload). */
const tooBig = (r: { enhanced?: string | null }) => r.enhanced === "5.3.4";

/** The HTTP status for a set of per-recipient results. */
export function statusForReplies(results: readonly { code: number; enhanced?: string | null; queued?: boolean }[]): 200 | 202 | 413 | 422 | 503 {
  const ok = (r: { code: number; queued?: boolean }) => isAccepted(r) && !r.queued;
  // No reply at all confirms nothing (every() would say "all delivered"): offer the message again.
  if (results.length === 0) return 503;
  if (results.every(ok)) return 200;
  // Anything neither delivered, queued nor refused for good is temporary: the message must be
  // offered again (a duplicate beats a loss).
  if (!results.every((r) => ok(r) || r.queued || isPermanent(r))) return 503;
  // Queued: the host will deliver it; refusals among several recipients are in the list.
  if (results.some((r) => r.queued)) return 202;
  // Only permanent refusals besides deliveries: the sender gets the bounce; 413 when every refusal
  // says the message is too big (the Worker's answer for that, with the server's reason).
  return results.filter(isPermanent).every(tooBig) ? 413 : 422;
}

export interface RepliesAnswer {
  status: 200 | 202 | 413 | 422 | 503;
  body: InboundResponse;
}

/** The answer to a delivery: its status, and the JSON body with every recipient's result. */
export function answerForReplies(results: RecipientResult[], envelopeTo: readonly string[]): RepliesAnswer {
  const status = statusForReplies(results);
  const one = envelopeTo.length === 1 ? { recipient: envelopeTo[0] } : {};
  if (status === 200 && results.every((r) => r.duplicate)) {
    return { status, body: { status: "duplicate", message: "already delivered; not delivered again", ...one, recipients: results } };
  }
  if (status === 200) return { status, body: { status: "success", message: "Email delivered to LMTP", ...one, recipients: results } };
  if (status === 202) {
    return { status, body: { status: "queued", message: "accepted into the durable spool; it will be delivered when Dovecot takes it", ...one, recipients: results } };
  }
  if (status === 422 || status === 413) {
    const refused = results.filter(isPermanent).map((r) => r.reply);
    const error = status === 413 ? "payload_too_large" : "lmtp_rejected";
    return { status, body: { status: "rejected", error, message: refused.join("; "), ...one, recipients: results } };
  }
  const deferred = results.filter((r) => !isAccepted(r) && !r.queued).map((r) => r.reply);
  return { status, body: { status: "deferred", error: "lmtp_deferred", message: `temporary failure: ${deferred.join("; ")}`, ...one, recipients: results } };
}

// ---------------------------------------------------------------------------------------------
// What a status means to the sender

export type SmtpOutcome = "accept" | "reject" | "retry";

/**
 * The edge turns the host's status into the SMTP outcome. Only statuses that mean "this message
 * can never be delivered as sent" bounce; everything else, unknown statuses included, is a
 * temporary failure that the sending MTA retries (a bounce cannot be taken back, a retry can).
 */
export function outcomeForStatus(status: number): SmtpOutcome {
  if (status >= 200 && status < 300) return "accept";
  if (status === 400 || status === 413 || status === 415 || status === 422) return "reject";
  return "retry";
}

/** What an answered inbound request meant for its message (what the host counts for GET /metrics). */
export type AnswerOutcome = "delivered" | "duplicate" | "queued" | "rejected" | "deferred" | "other";

/** The outcome of an answer with this status; `duplicate` when its results were all duplicates. */
export function answerOutcome(status: number, duplicate: boolean): AnswerOutcome {
  if (status === 200) return duplicate ? "duplicate" : "delivered";
  if (status === 202) return "queued";
  if (outcomeForStatus(status) === "reject") return "rejected";
  if (status >= 500 || status === 429) return "deferred";
  return "other";
}
