// The edge: Cloudflare Email Routing hands each message to email(), which streams it, untouched,
// to the host over HTTPS and turns the host's answer into the SMTP outcome:
//   2xx -> accept;  400/413/415/422 -> setReject (a bounce, with the host's reason);
//   anything else, a network error or a timeout -> throw (a temporary failure: the sender retries).
// It goes through the same Hono app as the host (shared/app.ts), whose Deliverer here is a
// streamed fetch to the host (edge/forward.ts), so both sides validate a message the same way.
// Nothing here reads the body: no decoding, no parsing, nothing whose cost grows with the message.
// With an R2 bucket bound as EDGE_SPOOL (edge/spool.ts), a message the host cannot take now, for
// a recipient known to exist, is held there and accepted instead of thrown; the cron's scheduled()
// and a live success drain it (edge/drain-runner.ts). Without the binding, nothing of that runs.
// A 429 (the host's spam filter deferring: greylisting) is thrown and never held.

import { withoutTag, workerConfig, type WorkerConfig } from "./edge/config.ts";
import { Budget } from "./edge/budget.ts";
import { runDrain } from "./edge/drain-runner.ts";
import { HOST_ANSWERED, forwardToHost, messageHeaders } from "./edge/forward.ts";
import { edgeQueueApp, type RunDrain } from "./edge/queue-http.ts";
import { EdgeSpool, type R2BucketLike } from "./edge/spool.ts";
import { createApp } from "./shared/app.ts";
import { INBOUND_PATH, InboundResponse, type RecipientResult } from "./shared/contract.ts";
import { jsonLines, stamped } from "./shared/log.ts";
import { isAccepted, outcomeForStatus } from "./shared/replies.ts";

/** What this file needs of Cloudflare's ForwardableEmailMessage (kept structural so Bun can run it too). */
export interface IncomingEmail {
  readonly from: string;
  readonly to: string;
  readonly headers: Headers;
  readonly raw: ReadableStream<Uint8Array>;
  readonly rawSize: number;
  /**
   * void in production. In local workerd (wrangler dev) it is an RPC stub that returns a promise:
   * unless it is awaited, email() can finish first and wrangler reports the message as accepted.
   */
  setReject(reason: string): void | Promise<void>;
}

/** What this file needs of the ExecutionContext workerd passes to email() and scheduled(). */
export interface WaitUntil {
  waitUntil(promise: Promise<unknown>): void;
}

// ---------------------------------------------------------------------------------------------
// email(): one message, one recipient

type Env = Record<string, unknown>;

const log = stamped(jsonLines);

/**
 * The validated settings and the app built on them, once per env: workerd passes the same env
 * object to every invocation in an isolate, so the schema and the app are not rebuilt per message.
 */
interface EdgeApps {
  config: WorkerConfig;
  /** For email(), which writes its own log line. */
  mail: ReturnType<typeof createApp>;
  /** For fetch(): the app's access log on. */
  http: ReturnType<typeof createApp>;
  /** For fetch() under /edge/: the edge spool's listing and controls. */
  edge: ReturnType<typeof edgeQueueApp>;
}
const edgeApps = new WeakMap<Env, EdgeApps>();

function edgeApp(env: Env): EdgeApps {
  let built = edgeApps.get(env);
  if (!built) {
    const config = workerConfig(env); // throws: temporary (and not cached, so a fix takes effect)
    const opts = { apiKeys: [config.apiKey], deliver: forwardToHost(config), maxMessageBytes: config.maxMessageBytes };
    const drainNow: RunDrain = (chain) =>
      runDrain(config, chain ? "chain" : "flush", { ...chain, log }).catch((e: Error) => {
        log({ event: "edge_spool_error", during: chain ? `the drain's run ${chain.link}` : "a flush", error: e.message });
        throw e;
      });
    built = { config, mail: createApp({ ...opts, log: () => {} }), http: createApp(opts), edge: edgeQueueApp(config, drainNow, log) };
    edgeApps.set(env, built);
  }
  return built;
}

export async function email(message: IncomingEmail, env: Env, ctx?: WaitUntil): Promise<void> {
  const started = Date.now();
  const requestId = crypto.randomUUID();
  const base = { request_id: requestId, from: message.from, to: message.to, size: message.rawSize };
  const { config, mail: app } = edgeApp(env);

  const rcpt = message.to.toLowerCase();
  // RECIPIENT_DELIMITER: user+tag@ is who user@ is, for the allow-list and the edge spool.
  const untagged = withoutTag(rcpt, config.recipientDelimiter);
  if (config.allowed.length && !config.allowed.some((a) => (a.includes("@") ? rcpt === a || untagged === a : rcpt.endsWith(`@${a}`)))) {
    await message.setReject(smtpReason(`550 5.1.1 <${message.to}>: Recipient address rejected: no such user here`));
    log({ ...base, outcome: "reject", reason: "not in ALLOWED_RECIPIENTS", ms: Date.now() - started });
    return;
  }

  // message.raw can be read once. With the edge spool, a second branch keeps the bytes while the
  // first goes to the host (tee() buffers what the host has read): if the host cannot take the
  // message, that branch goes to R2. On any other outcome it is cancelled and the buffer freed.
  // What this invocation may spend, its drain after a live success included; the live delivery is one.
  const budget = new Budget(config.subrequests);
  budget.spend();
  const spool = config.spool ? new EdgeSpool(config.spool, budget) : null;
  const [live, kept] = spool ? message.raw.tee() : [message.raw, null];
  const res = await app.fetch(
    new Request(`http://edge${INBOUND_PATH}`, {
      method: "POST",
      headers: { ...messageHeaders(config.apiKey, message.from, message.to, requestId), "content-length": String(message.rawSize) },
      body: live,
      // @ts-expect-error - see forwardToHost (edge/forward.ts)
      duplex: "half",
    }),
  );
  const answer = InboundResponse.safeParse(await res.json().catch(() => null));
  const text = answer.success ? answer.data.message : `HTTP ${res.status}`;
  const outcome = outcomeForStatus(res.status);
  // Deferred by the host's spam filter (429: greylisting): back to the sender, never held here,
  // or the edge would accept on the sender's behalf what the filter wants it to send again.
  const deferredBySpamFilter = res.status === 429;

  if (outcome !== "retry" || !spool || !kept || deferredBySpamFilter) {
    void kept?.cancel();
    log({ ...base, outcome, status: res.status, message: text, ms: Date.now() - started });
    if (outcome === "accept") {
      // With RECIPIENT_DELIMITER, user+tag@ delivered says that user@ exists: learned once for
      // every tag (isKnown below looks the untagged address up), not once per tag.
      if (spool) await later(ctx, afterLiveSuccess(config, spool, deliveredTo(answer.data?.recipients, rcpt) ? untagged : null));
      return;
    }
    if (outcome === "reject") {
      // A 413 carries the host's words, or the delivery target's own reply (an MTA's 552 5.3.4).
      await message.setReject(smtpReason(res.status === 413 && !/^[245]\d\d[ -]/.test(text) ? `552 5.3.4 ${text}` : text));
      return;
    }
    // Thrown: Email Routing answers the sender with a temporary failure and the sender retries.
    throw new Error(`temporary failure, try again later: ${text}`);
  }

  // The host cannot take it now. Held only for a recipient known to exist: anyone else is asked
  // to retry, so that mail to random addresses is never accepted for a bounce later.
  try {
    const known = config.allowed.includes(rcpt) || config.allowed.includes(untagged) || (await spool.isKnown(rcpt)) || (untagged !== rcpt && (await spool.isKnown(untagged)));
    if (known) {
      const id = await spool.hold(kept, { from: message.from, to: message.to, size: message.rawSize, reason: text, noAnswer: !text.includes(HOST_ANSWERED) });
      nothingHeldUntil.delete(spool.bucket);
      log({ ...base, outcome: "held", status: res.status, id, reason: `the host cannot take it now (${text}); held at the edge for delivery when it can`, ms: Date.now() - started });
      return;
    }
    void kept.cancel();
    log({ ...base, outcome: "retry", status: res.status, message: text, held: false, why_not_held: "recipient not known at the edge", ms: Date.now() - started });
  } catch (e) {
    // hold() may have locked it (workerd's R2 put pipes it at once): then cancel() rejects.
    if (!kept.locked) void kept.cancel();
    log({ ...base, outcome: "retry", status: res.status, message: text, held: false, why_not_held: `edge spool: ${(e as Error).message}`, ms: Date.now() - started });
  }
  throw new Error(`temporary failure, try again later: ${text}`);
}

/** In workerd, after email() has answered; in Bun (tests, bench) there is no ctx: before it answers. */
async function later(ctx: WaitUntil | undefined, work: Promise<unknown>): Promise<void> {
  if (ctx) ctx.waitUntil(work);
  else await work;
}

/**
 * Per bucket, until when this isolate need not look for held mail after a live success: a drain
 * found nothing due a moment ago. Saves an R2 HEAD per healthy message; held mail from another
 * isolate then follows the next success after that moment, or the cron, within a minute.
 */
const nothingHeldUntil = new WeakMap<R2BucketLike, number>();
const NOTHING_HELD_FOR_MS = 10_000;

/**
 * Whether the host's answer says that this recipient's mailbox took the message: its own reply
 * accepted, and not merely queued. A host whose Dovecot is down queues mail for any address (202):
 * that proves nothing about who exists, and learning from it would make catch-all spam "known".
 */
function deliveredTo(recipients: RecipientResult[] | undefined, rcpt: string): boolean {
  return recipients?.some((r) => r.address.toLowerCase() === rcpt && isAccepted(r) && !r.queued) ?? false;
}

/** The host took a message: remember its recipient if it was delivered, and deliver what the edge holds while the host is up. */
async function afterLiveSuccess(config: WorkerConfig, spool: EdgeSpool, rcpt: string | null): Promise<void> {
  try {
    if (rcpt && (await spool.learn(rcpt))) log({ event: "edge_known", to: rcpt, message: "the host accepted mail for this address: it may be held at the edge for 60 days" });
    if (Date.now() < (nothingHeldUntil.get(spool.bucket) ?? 0)) return;
    const summary = await runDrain(config, "live", { budget: spool.budget, log });
    if (summary.state === "idle") nothingHeldUntil.set(spool.bucket, Date.now() + NOTHING_HELD_FOR_MS);
  } catch (e) {
    log({ event: "edge_spool_error", during: "after a live delivery", error: (e as Error).message });
  }
}

// ---------------------------------------------------------------------------------------------
// The drain: scheduled() every minute, after a live success, and on an operator's flush; each run
// chains the next while the host confirms (edge/drain-runner.ts)

/** failed/ is swept once an hour, at most this many list pages of 100 per cron run (the oldest first). */
const SWEEP_PAGES = 2;

export async function scheduled(controller: { scheduledTime: number }, env: Env): Promise<void> {
  const { config } = edgeApp(env);
  if (!config.spool) return;
  // One budget for the whole invocation: the sweep's calls count against the drain's.
  const budget = new Budget(config.subrequests);
  try {
    // Once an hour: failed/ keeps a message 30 days.
    if (new Date(controller.scheduledTime).getUTCMinutes() === 0) {
      const removed = await new EdgeSpool(config.spool, budget).sweepFailed(Date.now(), SWEEP_PAGES);
      if (removed) log({ event: "edge_failed_expired", removed });
    }
    await runDrain(config, "cron", { budget, log });
  } catch (e) {
    log({ event: "edge_spool_error", during: "the cron's drain", error: (e as Error).message });
  }
}

/**
 * The bounce text goes into the SMTP reply to the sender: one line, no control characters (a CR LF
 * from the host must not end the reply early or start another one), and short enough for a reply
 * line (RFC 5321: 512 octets with the code).
 */
export function smtpReason(text: string): string {
  const line = text.replace(/[\x00-\x1f\x7f]+/g, " ").replace(/ {2,}/g, " ").trim();
  return (line || "550 5.0.0 message refused by the host").slice(0, 450);
}

/**
 * The edge's own HTTP face: the same app, forwarding to the host (GET /health answers locally),
 * and, with the key, the edge spool: GET /edge/queue, GET /edge/metrics, POST /edge/flush,
 * POST /edge/retry/:id.
 */
async function fetchHandler(request: Request, env: Env, ctx?: WaitUntil & { passThroughOnException?(): void }): Promise<Response> {
  let built;
  try {
    built = edgeApp(env);
  } catch (e) {
    return Response.json({ status: "error", error: "misconfigured", message: (e as Error).message }, { status: 500 });
  }
  const app = new URL(request.url).pathname.startsWith("/edge/") ? built.edge : built.http;
  return app.fetch(request, env, ctx as Parameters<typeof app.fetch>[2]);
}

export default { fetch: fetchHandler, email, scheduled };
