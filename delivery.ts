// The host's Deliverer: deliver at once over LMTP, and if Dovecot cannot take the message now,
// keep it in the durable spool and let the background deliverer retry (Postfix's smtpd -> queue ->
// lmtp, in one process). While the message streams to LMTP it is also kept for the spool (its first
// MiB in memory, the rest in tmp/, not fsynced: cheap); only when LMTP fails temporarily is the
// rest of the body read in, written to queue/ fsynced, and the sender answered 202.

import { TemporaryFailure, type Deliverer, type InboundMessage } from "./app.ts";
import { replyClass, type RecipientResult } from "./contract.ts";
import type { DeliveredLog } from "./delivered-log.ts";
import { BodyAborted, LmtpFault, formatReply, type LmtpEnvelope, type LmtpPool, type MessageBody } from "./lmtp.ts";
import { peekHeaders } from "./message-headers.ts";
import type { Metrics } from "./metrics.ts";
import type { LogWriter } from "./middleware/access-log.ts";
import type { QueueRunner, SpoolDeliver } from "./queue-runner.ts";
import { SpoolWriteError, type Spool, type StagedMessage } from "./spool.ts";

export interface HostDelivery {
  pool: LmtpPool;
  delivered: DeliveredLog;
  metrics: Metrics;
  log: LogWriter;
  /** With a spool, temporary failures are queued (202); without, they are answered 503. */
  spool?: { spool: Spool; runner: QueueRunner };
  /** Every delivery names itself by its spool id, for Dovecot's duplicate Sieve script (LmtpEnvelope.deliveryId). */
  exactlyOnce?: boolean;
}

const isOk = (r: { code: number }) => replyClass(r.code) === "accepted";
const isTemporary = (r: { code: number }) => replyClass(r.code) === "temporary";

/** One LMTP transaction, timed and counted, its replies in the contract's form. */
async function lmtpTransaction(h: HostDelivery, envelope: LmtpEnvelope, body: MessageBody, size: number | null): Promise<RecipientResult[]> {
  const started = performance.now();
  try {
    const replies = await h.pool.deliver(envelope, body, size);
    // After the final dot without an answer to hold on to (no reply, connection lost, "421
    // Shutting down" while Dovecot saves): it may have saved the message (seen here: it had).
    // Retried like any temporary failure, its reply saying the outcome is unknown, and counted:
    // a duplicate may follow. A fault thrown by deliver() came before the dot: not delivered.
    if (replies.some((r) => r.outcomeUnknown)) h.metrics.inc("unknown_outcome");
    return replies.map((r) => ({ address: r.recipient, code: r.code, enhanced: r.enhanced, reply: formatReply(r) }));
  } finally {
    h.metrics.observeDelivery((performance.now() - started) / 1000);
  }
}

export function deliverNowOrSpool(h: HostDelivery): Deliverer {
  return async (message: InboundMessage) => {
    const { envelope, size } = message;
    const peeked = await peekHeaders(message.body);
    message = { ...message, body: untilAborted(peeked.body, message.signal) };
    const messageId = peeked.info.messageId;

    // A repeat of something already delivered (the Worker retrying after a lost answer).
    if (messageId && envelope.to.every((rcpt) => h.delivered.has(messageId, rcpt, size))) {
      return envelope.to.map((address) => ({ address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 already delivered (Message-ID ${messageId})`, duplicate: true }));
    }

    const staged = h.spool ? h.spool.spool.stage() : null;
    // Whatever happens below, a staged file is either committed or discarded: an open file
    // handle left to the garbage collector is an uncaught error in Bun (the process would die).
    try {
      return await deliverWith(h, message, messageId, staged);
    } finally {
      await staged?.discard();
    }
  };
}

async function deliverWith(h: HostDelivery, message: InboundMessage, messageId: string | null, staged: StagedMessage | null): Promise<RecipientResult[]> {
  const { envelope, size } = message;
  const body = staged ? teeInto(message.body, staged) : message.body;

  let results: RecipientResult[] | null = null;
  let fault: Error | null = null;
  try {
    // The spool id names the delivery on this attempt and on every retry from the spool, so that
    // Dovecot can tell a retry of a message it already saved (see LmtpEnvelope.deliveryId).
    results = await lmtpTransaction(h, { ...envelope, deliveryId: h.exactlyOnce ? staged?.id : undefined }, body, size);
  } catch (e) {
    if (!(e instanceof LmtpFault || e instanceof BodyAborted)) throw e;
    fault = e;
  }

  if (results) {
    if (messageId) for (const r of results) if (isOk(r)) h.delivered.add(messageId, r.address, size);
    if (results.some(isOk)) h.spool?.runner.kick();
  }
  const waiting = results ? results.filter(isTemporary).map((r) => r.address) : envelope.to;
  if (waiting.length === 0 || !staged) {
    if (fault) throw new TemporaryFailure(fault.message, { cause: fault });
    return results!;
  }

  // Dovecot could not take it now: the spool takes it.
  const why = fault ? fault.message : results!.filter(isTemporary).map((r) => r.reply).join("; ");
  try {
    await drain(body); // the part LMTP never read (it failed mid-way, or before DATA)
  } catch (e) {
    // The request body itself failed (client gone, size limit): the message is incomplete.
    throw fault && !(fault instanceof BodyAborted) ? new TemporaryFailure(why) : e;
  }
  let header;
  try {
    header = await staged.commit({ from: envelope.from, to: waiting, received_at: Date.now(), request_id: message.requestId, message_id: messageId });
  } catch (e) {
    h.metrics.inc("spool_write_errors");
    h.log({ time: new Date().toISOString(), event: "spool_unwritable", request_id: message.requestId, error: (e as Error).message });
    throw new TemporaryFailure(`${why}; and the spool could not be written: ${(e as SpoolWriteError).message}`);
  }
  h.spool!.runner.add(header, why);
  h.metrics.inc("queued");
  const queued = (address: string): RecipientResult => ({ address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 queued as ${header.id} (LMTP: ${why})`, queued: true });
  if (!results) return envelope.to.map(queued);
  return results.map((r) => (isTemporary(r) ? queued(r.address) : r));
}

/** The background deliverer's way to LMTP, recording deliveries for duplicate suppression. */
export function deliverSpooled(h: HostDelivery): SpoolDeliver {
  return async (envelope, body, size, header) => {
    const results = await lmtpTransaction(h, { ...envelope, deliveryId: h.exactlyOnce ? header.id : undefined }, body, size);
    if (header.message_id) for (const r of results) if (isOk(r)) h.delivered.add(header.message_id, r.address, size);
    return results;
  };
}

/** Passes the body on to LMTP and appends every chunk to the staged spool file as it goes. */
function teeInto(body: MessageBody, staged: StagedMessage): MessageBody {
  if (body instanceof Uint8Array) {
    void staged.write(body);
    return body;
  }
  return body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      async transform(chunk, controller) {
        await staged.write(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
}

/**
 * The body as a stream that fails instead of ending if the request has been aborted by then: LMTP
 * reads the end just before it sends the final dot, so a message whose sender can no longer hear
 * the answer (the connection closed, as Bun does when a request is pipelined behind it) is not
 * delivered. The end waits one turn of the event loop first: a request pipelined in the same
 * packet as the body's last bytes is parsed, and the connection closed, only after those bytes
 * have been handed on.
 */
function untilAborted(body: MessageBody, signal: AbortSignal): ReadableStream<Uint8Array> {
  const source =
    body instanceof Uint8Array
      ? new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(body);
            controller.close();
          },
        })
      : body;
  return source.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      async flush(controller) {
        await new Promise((resolve) => setImmediate(resolve));
        if (signal.aborted) controller.error(new Error("the connection was closed before the answer"));
      },
    }),
  );
}

async function drain(body: MessageBody): Promise<void> {
  if (body instanceof Uint8Array) return;
  if (body.locked) throw new Error("message stream still locked");
  const reader = body.getReader();
  for (;;) if ((await reader.read()).done) break;
}
