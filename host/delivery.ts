// The host's Deliverer (Postfix's smtpd -> queue -> lmtp, in one process): receive the whole
// message first, then deliver it over LMTP, and if Dovecot cannot take it now, keep it in the
// durable spool and let the background deliverer retry. Receiving comes first so that a slow or
// stalled client holds only its own request: no pooled LMTP connection and no Dovecot process
// waits on its bytes. With a spool the message is received into a StagedMessage (its first MiB in
// memory, the rest in tmp/, not fsynced: cheap), and only when LMTP fails temporarily is it
// fsynced into queue/ and the sender answered 202. Without a spool the first MiB is held in
// memory before LMTP is tried and the rest streams to LMTP as it arrives.
//
// The SHA-256 of the bytes is taken while they arrive: with the recipient (and the Message-ID) it
// is the record of a delivery (delivered-log.ts) and finds the message in the spool, so a repeat
// of the same bytes is answered from what became of it (repeats.ts: "duplicate", or 202 with its
// spool id), never delivered twice, and another message that reuses a Message-ID is delivered.
//
// One message goes through steps, each its own function: receive -> repeats -> scan -> deliver now
// -> or spool the rest. A client that leaves gets nothing delivered after it left: the final dot is
// not sent (the LMTP client checks the request's signal), and nothing is spooled.
//
// With the spam filter (RSPAMD_URL, which needs the spool), a received message that is not a
// repeat is scanned before LMTP (spam-filter.ts): refused or deferred there if it is live, else
// delivered with the verdict's header fields on top. The digest stays that of the sender's bytes,
// and the spool keeps those bytes: a retry from the spool is scanned again, as already accepted.

import { BodyAborted, LmtpFault, formatReply, nonAscii, protocolOf, type LmtpEnvelope, type LmtpPool, type MessageBody } from "../lmtp.ts";
import { Refusal, TemporaryFailure, type Deliverer, type InboundMessage } from "../shared/app.ts";
import { BodyStalled } from "../shared/body-limit.ts";
import type { RecipientResult } from "../shared/contract.ts";
import type { LogWriter } from "../shared/log.ts";
import { isAccepted, isTemporary, queuedResult } from "../shared/replies.ts";
import type { DeliveredLog } from "./delivered-log.ts";
import type { LastAnswer } from "./last-answer.ts";
import { peekHeaders, type HeaderInfo } from "./message-headers.ts";
import type { Metrics } from "./metrics.ts";
import type { QueueRunner, SpoolDeliver } from "./queue-runner.ts";
import { filterSpam, prepended, type SpamFilter } from "./spam-filter.ts";
import { SpoolWriteError, type SpoolHeader } from "./spool-file.ts";
import type { Spool } from "./spool.ts";
import { OneAtATime, inEnvelopeOrder, repeatsOf, type Repeats } from "./repeats.ts";
import { HELD_BYTES, type StagedMessage } from "./staged-message.ts";

export interface HostDelivery {
  pool: LmtpPool;
  delivered: DeliveredLog;
  metrics: Metrics;
  /** Event lines (stamped with the time by the writer). */
  log: LogWriter;
  /** Every delivery names itself by its spool id, for Dovecot's duplicate Sieve script (LmtpEnvelope.deliveryId). */
  exactlyOnce?: boolean;
  /** The spam filter (RSPAMD_URL); only with the spool, which holds a message whole while it is scanned. */
  spam?: SpamFilter;
  /** Where the target's latest answer is kept for /status. */
  lastAnswer?: LastAnswer;
}

/** The durable spool behind the host's delivery, and its background deliverer. */
export interface SpoolQueue {
  spool: Spool;
  runner: QueueRunner;
}

/** Without a spool: LMTP at once; what Dovecot cannot take now is the sender's to offer again (503). */
export function deliverNow(h: HostDelivery): Deliverer {
  const sameBytes = new OneAtATime();
  return async (message: InboundMessage) => {
    const { info: { messageId, sender }, body } = await peekHeaders(message.body);
    const received = await receiveHeld(body, message.signal);
    return sameBytes.run(received.sha256(), async (waited) => {
      const { earlier, rest } = repeats(h, null, message.envelope.to, messageId, received.sha256(), waited);
      if (!rest.length) return inEnvelopeOrder(message.envelope.to, earlier, []);
      const attempt = await tryLmtp(h, addressedTo(message, rest), messageId, sender, received, undefined);
      if (attempt.fault) throw new TemporaryFailure(attempt.fault.message, { cause: attempt.fault });
      return inEnvelopeOrder(message.envelope.to, earlier, attempt.results);
    });
  };
}

/** With a spool: LMTP at once, and what Dovecot cannot take now into the spool (202). */
export function deliverNowOrSpool(h: HostDelivery, queue: SpoolQueue): Deliverer {
  const sameBytes = new OneAtATime();
  return async (message: InboundMessage) => {
    const { info, body } = await peekHeaders(message.body);
    const { messageId } = info;
    const staged = queue.spool.stage();
    // Whatever happens below, a staged file is either committed or discarded: an open file
    // handle left to the garbage collector is an uncaught error in Bun (the process would die).
    try {
      const received = await receiveIntoSpool(h, message, body, staged);
      // What the spool holds is known before a repeat is looked for in it.
      await queue.runner.scanned();
      return await sameBytes.run(received.sha256(), async (waited) => {
        const { earlier, rest } = repeats(h, queue, message.envelope.to, messageId, received.sha256(), waited);
        if (!rest.length) return inEnvelopeOrder(message.envelope.to, earlier, []);
        const left = addressedTo(message, rest);
        const toDeliver = h.spam ? await scanned(h.spam, left, info, received, staged) : received;
        // The spool id names the delivery on this attempt and on every retry from the spool, so
        // that Dovecot can tell a retry of a message it already saved (see LmtpEnvelope.deliveryId).
        const attempt = await tryLmtp(h, left, messageId, info.sender, toDeliver, h.exactlyOnce ? staged.id : undefined);
        if (attempt.results?.some(isAccepted)) queue.runner.kick();
        const results = attempt.results && !attempt.results.some(isTemporary) ? attempt.results : await spoolTheRest(h, queue, left, messageId, received, staged, attempt);
        return inEnvelopeOrder(message.envelope.to, earlier, results);
      });
    } finally {
      await staged.discard();
    }
  };
}

/**
 * The background deliverer's way to LMTP (the queue runner's SpoolDeliver). The sending server,
 * for XFORWARD, comes from the spooled bytes' own trace header. With the spam filter, the spooled
 * message is scanned again (from a second read of its file), as already accepted.
 */
export function deliverSpooled(h: HostDelivery, spool?: Spool): SpoolDeliver {
  return async (envelope, spooled, spooledSize, header) => {
    // A file spooled before digests were kept has none: its delivery is neither looked up nor
    // recorded (a repeat of it would be delivered again: a duplicate, never a loss).
    const messageId = recordedAs(header);
    const sha256 = header.sha256 ?? null;
    // Recipients on record already (its state file lost after a partial delivery, or a removal
    // that failed before a restart) are not sent it again.
    const { earlier, rest } = repeats(h, null, envelope.to, messageId, sha256, true);
    if (!rest.length) {
      await spooled.cancel().catch(() => {});
      return inEnvelopeOrder(envelope.to, earlier, []);
    }
    const peeked = await peekHeaders(spooled);
    let body: MessageBody = peeked.body;
    let size = spooledSize;
    if (h.spam && spool) {
      try {
        const subject = { envelope: { from: envelope.from, to: rest }, queueId: header.request_id ?? header.id, info: peeked.info, alreadyAccepted: true };
        const fields = await filterSpam(h.spam, subject, await spool.body(header.id));
        body = prepended(fields, peeked.body);
        size += fields.byteLength;
      } catch (e) {
        if (peeked.body instanceof ReadableStream) await peeked.body.cancel().catch(() => {}); // the runner retries later
        throw e;
      }
    }
    const envelopeNow: LmtpEnvelope = { from: envelope.from, to: rest, deliveryId: h.exactlyOnce ? header.id : undefined, client: peeked.info.sender };
    const results = await lmtpTransaction(h, envelopeNow, body, size, undefined);
    // On disk before the runner removes the file: a crash between the two finds the record.
    recordDelivered(h, messageId, sha256, results);
    h.delivered.flush();
    return inEnvelopeOrder(envelope.to, earlier, results);
  };
}

/**
 * What the record of deliveries knows a spooled message by: its Message-ID, so that a repeat
 * after the spool delivered it is a duplicate; without one, its spool id. The bytes alone cannot
 * tell it from an earlier message with the same bytes and no Message-ID, which is delivered again
 * (repeats.ts): the runbook's test posted twice, the second while Dovecot was down, was answered
 * 202 and then dropped from the spool as "delivered" on the first one's record. Only the spool's
 * own deliveries of this file count for it: the recipients it is still to go to were not
 * delivered on the live attempt.
 */
function recordedAs(header: SpoolHeader): string | null {
  return header.message_id ?? (header.sha256 ? `spool ${header.id}` : null);
}

/** Who of these recipients had this message before, delivered or queued (repeats.ts); counted when one is queued. */
function repeats(h: HostDelivery, queue: SpoolQueue | null, to: string[], messageId: string | null, sha256: string | null, waited: boolean): Repeats {
  const split = repeatsOf({ delivered: h.delivered, queuedAs: queue ? (digest, rcpt) => queue.runner.queuedAs(digest, rcpt) : undefined }, to, messageId, sha256, waited);
  if ([...split.earlier.values()].some((r) => r.queued)) h.metrics.inc("queued_repeats");
  return split;
}

/** The message for some of its recipients. */
function addressedTo(message: InboundMessage, to: string[]): InboundMessage {
  return to.length === message.envelope.to.length ? message : { ...message, envelope: { ...message.envelope, to } };
}

/** One LMTP transaction, timed and counted, its replies in the contract's form. */
async function lmtpTransaction(h: HostDelivery, envelope: LmtpEnvelope, body: MessageBody, size: number | null, signal: AbortSignal | undefined): Promise<RecipientResult[]> {
  const started = performance.now();
  try {
    const replies = await h.pool.deliver(envelope, body, size, signal);
    // After the final dot without an answer to hold on to (no reply, connection lost, "421
    // Shutting down" while Dovecot saves): it may have saved the message (seen here: it had).
    // Retried like any temporary failure, its reply saying the outcome is unknown, and counted:
    // a duplicate may follow. A fault thrown by deliver() came before the dot: not delivered.
    if (replies.some((r) => r.outcomeUnknown)) h.metrics.inc("unknown_outcome");
    const results = replies.map((r) => ({ address: r.recipient, code: r.code, enhanced: r.enhanced, reply: formatReply(r) }));
    h.lastAnswer?.note(results);
    return results;
  } catch (e) {
    // The target's fault only: a body that failed (the sender's stream, a client gone) says
    // nothing about the target, and /status would flag it as one.
    if (e instanceof LmtpFault) h.lastAnswer?.note(e);
    throw e;
  } finally {
    h.metrics.observeDelivery((performance.now() - started) / 1000);
  }
}

/** What one attempt at LMTP gave: a result per recipient, or the fault that left none. */
type Attempt = { results: RecipientResult[]; fault: null } | { results: null; fault: LmtpFault | BodyAborted };

/** The received message to LMTP now; what was delivered is recorded. */
async function tryLmtp(h: HostDelivery, message: InboundMessage, messageId: string | null, client: HeaderInfo["sender"], received: Received, deliveryId: string | undefined): Promise<Attempt> {
  let attempt: Attempt;
  try {
    const envelope: LmtpEnvelope = { ...message.envelope, deliveryId, client, orcpt: message.originalRecipients };
    attempt = { results: await lmtpTransaction(h, envelope, received.body, received.size ?? message.size, message.signal), fault: null };
  } catch (e) {
    // Streamed without a spool: the request body failed under LMTP (client gone, size limit,
    // stalled, a JSON body bad after its message): the app answers for what it says.
    if (e instanceof BodyAborted && (e.cause instanceof BodyStalled || e.cause instanceof Refusal)) throw e.cause;
    if (!(e instanceof LmtpFault || e instanceof BodyAborted)) throw e;
    attempt = { results: null, fault: e };
  } finally {
    // What LMTP did not read (refused before DATA, failed mid-way): the tmp/ file's reader, or the request's.
    if (received.body instanceof ReadableStream && !received.body.locked) await received.body.cancel().catch(() => {});
  }
  if (attempt.results) recordDelivered(h, messageId, received.sha256(), attempt.results);
  return attempt;
}

/** Each accepted recipient, for duplicate suppression: the one place a delivery is recorded. */
function recordDelivered(h: HostDelivery, messageId: string | null, sha256: string | null, results: RecipientResult[]): void {
  if (sha256) for (const r of results) if (isAccepted(r)) h.delivered.add(messageId, r.address, sha256);
}

/** Dovecot could not take it now: the spool takes it for the recipients still to do (the whole message is staged already). */
async function spoolTheRest(h: HostDelivery, queue: SpoolQueue, message: InboundMessage, messageId: string | null, received: Received, staged: StagedMessage, attempt: Attempt): Promise<RecipientResult[]> {
  const { envelope } = message;
  const { why, to } = stillToDo(attempt, envelope.to);
  // Nobody would hear the 202: not acknowledged, not spooled. Its retry (the same bytes) finds
  // what was delivered on record and takes the rest.
  if (message.signal.aborted) throw new TemporaryFailure(`${why}; not spooled: the client left before the answer`);
  // Unless it could never take it: a non-ASCII address needs SMTPUTF8 (RFC 6531), and a server not
  // seen to offer it would refuse it later, after the sender was told 202. Not spooled: the sender
  // retries, and hears the refusal with its reason once Dovecot answers.
  if ([envelope.from, ...to].some(nonAscii) && h.pool.offered("SMTPUTF8") !== true) {
    throw new TemporaryFailure(`${why}; not spooled: the envelope has a non-ASCII address, and the ${protocolOf(h.pool.target).toUpperCase()} server has not been seen to offer SMTPUTF8`);
  }
  const sha256 = received.sha256();
  let header;
  try {
    header = await staged.commit({
      from: envelope.from,
      to,
      received_at: Date.now(),
      request_id: message.requestId,
      message_id: messageId,
      ...(sha256 ? { sha256 } : {}),
    });
  } catch (e) {
    spoolUnwritable(h, message, e as Error);
    throw new TemporaryFailure(`${why}; and the spool could not be written: ${(e as SpoolWriteError).message}`);
  }
  queue.runner.add(header, why);
  h.metrics.inc("queued");
  const queued = (address: string) => queuedResult(address, header.id, why);
  if (!attempt.results) return envelope.to.map(queued);
  return attempt.results.map((r) => (isTemporary(r) ? queued(r.address) : r));
}

/** Who is still to be delivered to after an attempt, and why not yet. */
function stillToDo(attempt: Attempt, to: string[]): { why: string; to: string[] } {
  if (attempt.fault) return { why: attempt.fault.message, to };
  const waiting = attempt.results.filter(isTemporary);
  return { why: waiting.map((r) => r.reply).join("; "), to: waiting.map((r) => r.address) };
}

function spoolUnwritable(h: HostDelivery, message: InboundMessage, e: Error): void {
  h.metrics.inc("spool_write_errors");
  h.log({ event: "spool_unwritable", request_id: message.requestId, error: e.message });
}

/**
 * The spam filter's step: the received message scanned from a second read of its bytes (the same
 * buffer, or the tmp/ file again), and what LMTP gets: the verdict's fields, then those bytes.
 */
async function scanned(spam: SpamFilter, message: InboundMessage, info: HeaderInfo, received: Received, staged: StagedMessage): Promise<Received> {
  const subject = { envelope: message.envelope, queueId: message.requestId, info, alreadyAccepted: message.alreadyAccepted ?? false };
  let fields: Uint8Array;
  try {
    fields = await filterSpam(spam, subject, received.body instanceof Uint8Array ? received.body : await staged.content());
  } catch (e) {
    if (received.body instanceof ReadableStream) await received.body.cancel().catch(() => {});
    throw e;
  }
  // The scan may take seconds: a sender gone meanwhile can hear no answer, so nothing is delivered.
  if (message.signal.aborted) {
    if (received.body instanceof ReadableStream) await received.body.cancel().catch(() => {});
    throw new Error("the connection was closed during the spam scan");
  }
  return { body: prepended(fields, received.body), size: (received.size ?? 0) + fields.byteLength, sha256: received.sha256 };
}

/** A message as received, ready for LMTP. */
interface Received {
  body: MessageBody;
  /** Its size, when known before LMTP reads it (always, except when streamed without a spool). */
  size: number | null;
  /** SHA-256 of its bytes (hex); for a streamed body known only once LMTP has read all of it. */
  sha256(): string | null;
}

/** With a spool: receiveStaged(), a spool that cannot take it answered 503 (and counted). */
async function receiveIntoSpool(h: HostDelivery, message: InboundMessage, body: MessageBody, staged: StagedMessage): Promise<Received> {
  try {
    return await receiveStaged(body, staged, message.signal);
  } catch (e) {
    if (!(e instanceof SpoolWriteError)) throw e; // the request body failed: the app answers for it
    // Past the first MiB the message is only in tmp/: without it, it cannot be delivered either.
    spoolUnwritable(h, message, e);
    throw new TemporaryFailure(`the spool could not be written: ${e.message}`);
  }
}

/** With a spool: the whole body into the staged message; LMTP then reads it back from there. */
async function receiveStaged(body: MessageBody, staged: StagedMessage, signal: AbortSignal): Promise<Received> {
  const hash = new Bun.CryptoHasher("sha256");
  if (body instanceof Uint8Array) {
    hash.update(body);
    await staged.write(body);
  } else {
    for await (const chunk of body) {
      hash.update(chunk);
      await staged.write(chunk);
    }
  }
  await stillListening(signal);
  const sha256 = hash.digest("hex");
  return { body: body instanceof Uint8Array ? body : await staged.content(), size: staged.size, sha256: () => sha256 };
}

/**
 * Without a spool: up to HELD_BYTES in memory before LMTP is tried, so that a client that stalls
 * in its first MiB holds no connection. A larger body streams on to LMTP as it arrives (memory
 * stays bounded; from there on one connection waits on this client, within LMTP's time limits).
 */
async function receiveHeld(body: MessageBody, signal: AbortSignal): Promise<Received> {
  const hash = new Bun.CryptoHasher("sha256");
  if (body instanceof Uint8Array) {
    hash.update(body);
    await stillListening(signal);
    const sha256 = hash.digest("hex");
    return { body, size: body.byteLength, sha256: () => sha256 };
  }
  const reader = body.getReader();
  const held: Uint8Array[] = [];
  let size = 0;
  while (size <= HELD_BYTES) {
    const r = await reader.read();
    if (r.done) {
      await stillListening(signal);
      const sha256 = hash.digest("hex");
      return { body: held.length === 1 ? held[0]! : Buffer.concat(held), size, sha256: () => sha256 };
    }
    hash.update(r.value);
    held.push(r.value);
    size += r.value.byteLength;
  }
  let sha256: string | null = null;
  const stream = new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        const next = held.shift();
        if (next) return controller.enqueue(next);
        const r = await reader.read();
        if (r.done) {
          // LMTP reads the end just before it sends the final dot: a failed stream drops the dot.
          try {
            await stillListening(signal);
          } catch (e) {
            return controller.error(e);
          }
          sha256 = hash.digest("hex");
          controller.close();
        } else {
          hash.update(r.value);
          controller.enqueue(r.value);
        }
      },
      cancel(reason) {
        return reader.cancel(reason);
      },
    },
    { highWaterMark: 0 },
  );
  return { body: stream, size: null, sha256: () => sha256 };
}

/**
 * Throws if the request has been aborted once its body is in: a message whose sender can no longer
 * hear the answer (the connection closed, as Bun does when a request is pipelined behind it) is
 * not delivered. It waits one turn of the event loop first: a request pipelined in the same packet
 * as the body's last bytes is parsed, and the connection closed, only after those bytes have been
 * handed on.
 */
async function stillListening(signal: AbortSignal): Promise<void> {
  await new Promise((resolve) => setImmediate(resolve));
  if (signal.aborted) throw new Error("the connection was closed before the answer");
}
