// The edge: Cloudflare Email Routing hands each message to email(), which streams it, untouched,
// to the host over HTTPS and turns the host's answer into the SMTP outcome:
//   2xx -> accept;  400/413/415/422 -> setReject (a bounce, with the host's reason);
//   anything else, a network error or a timeout -> throw (a temporary failure: the sender retries).
// It goes through the same Hono app as the host (shared/app.ts), whose Deliverer here is a streamed fetch
// to the host, so both sides validate a message the same way. Nothing here reads the body: no
// decoding, no parsing, nothing whose cost grows with the message.
// With an R2 bucket bound as EDGE_SPOOL (edge/spool.ts), a message the host cannot take now, for
// a recipient known to exist, is held there and accepted instead of thrown; the cron's scheduled()
// and every live success drain it (edge/drain.ts). Without the binding, nothing of that runs.

import { Hono, type Context } from "hono";
import { z } from "zod";
import { Refusal, TemporaryFailure, createApp, type Deliverer } from "./shared/app.ts";
import { ConfigError, MIN_KEY_LENGTH, fromEnv } from "./shared/config-env.ts";
import { DEFAULT_MAX_MESSAGE_BYTES, INBOUND_PATH, InboundResponse, addressProblem, headerValue } from "./shared/contract.ts";
import { drain, type DrainSummary, type DrainTrigger, type SendResult } from "./edge/drain.ts";
import { EdgeSpool, HOUR, MINUTE, isId, type HeldMessage, type R2BucketLike } from "./edge/spool.ts";
import { jsonLines, stamped } from "./shared/log.ts";
import { acceptedResult, isAccepted, isPermanent, outcomeForStatus } from "./shared/replies.ts";
import { apiKey } from "./shared/middleware/api-key.ts";

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
// Configuration (wrangler.toml [vars] and the API_KEY secret)

const allowEntry = z.string().refine((e) => (e.includes("@") ? addressProblem(e) === null : /^[a-z0-9.-]+\.[a-z]{2,}$/i.test(e)), {
  message: "must be an address (user@example.com) or a domain (example.com)",
});

export const WorkerEnv = z
  .object({
    DELL_API_ENDPOINT: z
      .string({ error: "is not set (the host's https://.../api/v1/inbound-mail)" })
      // abort: zod 4 runs later checks after a failed one, and new URL() would throw past safeParse.
      .url({ error: "must be a URL", abort: true })
      .refine((u) => isHttpsOrLocal(u), { message: "must be https:// (plain http only for localhost)" }),
    API_KEY: z
      .string({ error: "is not set (wrangler secret put API_KEY)" })
      .min(MIN_KEY_LENGTH, `is shorter than ${MIN_KEY_LENGTH} characters`),
    HOST_TIMEOUT_MS: z.coerce.number({ error: "must be a number" }).int().min(1_000, "must be at least 1000").max(29_000, "must be below the 30 s Worker limit").default(25_000),
    MAX_MESSAGE_BYTES: z.coerce.number({ error: "must be a number" }).int().positive().default(DEFAULT_MAX_MESSAGE_BYTES),
    /** Optional allow-list: comma-separated addresses and/or domains. Empty: every recipient goes to the host. */
    ALLOWED_RECIPIENTS: z
      .string()
      .default("")
      .transform((s) => s.split(",").map((e) => e.trim().toLowerCase()).filter(Boolean))
      .pipe(z.array(allowEntry)),
    /** With EDGE_SPOOL: how long a held message is retried before it goes to failed/ (Postfix's 5 days). */
    EDGE_SPOOL_MAX_AGE_HOURS: z.coerce.number({ error: "must be a number" }).positive("must be more than 0").default(120),
    /** With EDGE_SPOOL: who hears of a held message the edge gave up on. */
    POSTMASTER: z
      .string()
      .refine((a) => addressProblem(a) === null, { message: "must be an address (postmaster@example.com)" })
      .optional(),
  })
  .transform((e) => ({
    endpoint: e.DELL_API_ENDPOINT,
    apiKey: e.API_KEY,
    timeoutMs: e.HOST_TIMEOUT_MS,
    maxMessageBytes: e.MAX_MESSAGE_BYTES,
    allowed: e.ALLOWED_RECIPIENTS,
    maxAgeMs: e.EDGE_SPOOL_MAX_AGE_HOURS * HOUR,
    postmaster: e.POSTMASTER ?? "",
  }));
export type WorkerConfig = z.output<typeof WorkerEnv> & { spool: R2BucketLike | null };

function isHttpsOrLocal(u: string): boolean {
  let url: URL;
  try {
    url = new URL(u);
  } catch {
    return false;
  }
  return url.protocol === "https:" || (url.protocol === "http:" && /^(localhost|127\.0\.0\.1|\[::1\])$/.test(url.hostname));
}

/** A bad setting is the operator's to fix: mail waits at the sender meanwhile (thrown, never a bounce). */
export function workerConfig(env: Record<string, unknown>): WorkerConfig {
  const config = fromEnv(WorkerEnv, env, "worker configuration");
  const spool = (env.EDGE_SPOOL ?? null) as R2BucketLike | null;
  // Mail held at the edge can fail after the sender heard 250: someone must be told.
  if (spool && !config.postmaster) throw new ConfigError("worker configuration: POSTMASTER is not set (required with the EDGE_SPOOL bucket)");
  return { ...config, spool };
}

// ---------------------------------------------------------------------------------------------
// The Deliverer at the edge: the message goes on to the host, streamed.

export function forwardToHost(config: WorkerConfig): Deliverer {
  return async ({ envelope, body, size, requestId }) => {
    const headers: Record<string, string> = {
      "content-type": "message/rfc822",
      "x-api-key": config.apiKey,
      // UTF-8 on the wire (headerValue); the contract's MAX_ENVELOPE_TO_BYTES keeps the list
      // well inside the host's 16 KiB for all headers.
      "x-envelope-from": headerValue(envelope.from === "" ? "<>" : envelope.from),
      "x-envelope-to": headerValue(envelope.to.join(", ")),
      "x-request-id": requestId,
      "user-agent": "mailserver-inbound-relay-worker/1",
    };
    let res: Response;
    try {
      res = await fetch(config.endpoint, {
        method: "POST",
        headers,
        body: withLength(body, size),
        signal: AbortSignal.timeout(config.timeoutMs),
        // @ts-expect-error - Bun and Node need it for a stream body; workerd ignores it
        duplex: "half",
      });
    } catch (e) {
      const err = e as Error;
      const why = err.name === "TimeoutError" ? `no answer within ${config.timeoutMs} ms` : err.message;
      throw new TemporaryFailure(`host unreachable: ${why}`);
    }
    const answer = InboundResponse.safeParse(await res.json().catch(() => null));
    const text = answer.success ? answer.data.message : `HTTP ${res.status}`;
    const recipients = answer.success ? answer.data.recipients : undefined;

    switch (outcomeForStatus(res.status)) {
      case "accept":
        // A 2xx is a delivery only when it is the host's own answer saying so. Anything else (a
        // proxy's or another service's page, /health by a wrong DELL_API_ENDPOINT) confirms
        // nothing: accepting it would lose the message, so the sender is asked to retry.
        if (!answer.success || !["success", "queued", "duplicate"].includes(answer.data.status)) {
          throw new TemporaryFailure(`host answered ${res.status} without a delivery confirmation`);
        }
        // Delivered or safely queued on the host: every recipient is accepted, whatever the details.
        return envelope.to.map((address) => {
          const r = recipients?.find((x) => x.address === address);
          return r && isAccepted(r) ? r : acceptedResult(address, text);
        });
      case "reject":
        // A bounce cannot be taken back: only the host's own refusal, with its reason, bounces.
        // A bare 400 or 413 comes from something in front of the app (Bun answers a few requests
        // itself, without a body; a proxy, with its own page) and is retried.
        if (!answer.success) throw new TemporaryFailure(`host answered ${res.status} without its JSON reason`);
        if (res.status === 422 && recipients?.length) return recipients;
        throw new Refusal(res.status as 400 | 413 | 415 | 422, answer.data.error ?? "host_refused", text);
      case "retry":
        throw new TemporaryFailure(`host answered ${res.status}: ${text}`);
    }
  };
}

/**
 * workerd sends a plain ReadableStream body chunked; wrapped in its FixedLengthStream the request
 * carries Content-Length, so the host can check the size before reading and pass it to LMTP as
 * SIZE=. The piping is native: no JavaScript touches the bytes. Elsewhere (Bun), the stream as is.
 */
function withLength(body: ReadableStream<Uint8Array> | Uint8Array, size: number | null): BodyInit {
  const Fixed = (globalThis as { FixedLengthStream?: new (n: number) => TransformStream<Uint8Array, Uint8Array> }).FixedLengthStream;
  if (body instanceof Uint8Array || size === null || !Fixed) return body as BodyInit;
  return body.pipeThrough(new Fixed(size));
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
    built = { config, mail: createApp({ ...opts, log: () => {} }), http: createApp(opts), edge: edgeQueueApp(config) };
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
  if (config.allowed.length && !config.allowed.some((a) => (a.includes("@") ? rcpt === a : rcpt.endsWith(`@${a}`)))) {
    await message.setReject(smtpReason(`550 5.1.1 <${message.to}>: Recipient address rejected: no such user here`));
    log({ ...base, outcome: "reject", reason: "not in ALLOWED_RECIPIENTS", ms: Date.now() - started });
    return;
  }

  // message.raw can be read once. With the edge spool, a second branch keeps the bytes while the
  // first goes to the host (tee() buffers what the host has read): if the host cannot take the
  // message, that branch goes to R2. On any other outcome it is cancelled and the buffer freed.
  const spool = config.spool ? new EdgeSpool(config.spool) : null;
  const [live, kept] = spool ? message.raw.tee() : [message.raw, null];
  const res = await app.fetch(
    new Request(`http://edge${INBOUND_PATH}`, {
      method: "POST",
      headers: {
        "content-type": "message/rfc822",
        "content-length": String(message.rawSize),
        "x-api-key": config.apiKey,
        "x-envelope-from": headerValue(message.from || "<>"),
        "x-envelope-to": headerValue(message.to),
        "x-request-id": requestId,
      },
      body: live,
      // @ts-expect-error - see forwardToHost
      duplex: "half",
    }),
  );
  const answer = InboundResponse.safeParse(await res.json().catch(() => null));
  const text = answer.success ? answer.data.message : `HTTP ${res.status}`;
  const outcome = outcomeForStatus(res.status);

  if (outcome !== "retry" || !spool || !kept) {
    void kept?.cancel();
    log({ ...base, outcome, status: res.status, message: text, ms: Date.now() - started });
    if (outcome === "accept") {
      if (spool) await later(ctx, afterLiveSuccess(config, spool, rcpt));
      return;
    }
    if (outcome === "reject") {
      await message.setReject(smtpReason(res.status === 413 ? `552 5.3.4 ${text}` : text));
      return;
    }
    // Thrown: Email Routing answers the sender with a temporary failure and the sender retries.
    throw new Error(`temporary failure, try again later: ${text}`);
  }

  // The host cannot take it now. Held only for a recipient known to exist: anyone else is asked
  // to retry, so that mail to random addresses is never accepted for a bounce later.
  try {
    const known = config.allowed.includes(rcpt) || (await spool.isKnown(rcpt));
    if (known) {
      const id = await spool.hold(kept, { from: message.from, to: message.to, size: message.rawSize, reason: text, noAnswer: !text.includes(HOST_ANSWERED) });
      nothingHeldUntil.delete(spool.bucket);
      log({ ...base, outcome: "held", status: res.status, id, reason: `the host cannot take it now (${text}); held at the edge for delivery when it can`, ms: Date.now() - started });
      return;
    }
    void kept.cancel();
    log({ ...base, outcome: "retry", status: res.status, message: text, held: false, why_not_held: "recipient not known at the edge", ms: Date.now() - started });
  } catch (e) {
    void kept.cancel();
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
 * found nothing a moment ago. Saves an R2 HEAD per healthy message; held mail from another
 * isolate then follows the next success after that moment, or the cron, within a minute.
 */
const nothingHeldUntil = new WeakMap<R2BucketLike, number>();
const NOTHING_HELD_FOR_MS = 10_000;

/** The host took a message: remember its recipient, and deliver what the edge holds while it is up. */
async function afterLiveSuccess(config: WorkerConfig, spool: EdgeSpool, rcpt: string): Promise<void> {
  try {
    if (await spool.learn(rcpt)) log({ event: "edge_known", to: rcpt, message: "the host accepted mail for this address: it may be held at the edge for 60 days" });
    if (Date.now() < (nothingHeldUntil.get(spool.bucket) ?? 0)) return;
    const summary = await runDrain(config, "live");
    if (summary.state === "idle") nothingHeldUntil.set(spool.bucket, Date.now() + NOTHING_HELD_FOR_MS);
  } catch (e) {
    log({ event: "edge_spool_error", during: "after a live delivery", error: (e as Error).message });
  }
}

// ---------------------------------------------------------------------------------------------
// The drain: scheduled() every minute, after a live success, and on an operator's flush

/** forwardToHost's answer for a host that answered; its "unreachable" text has none of it. */
const HOST_ANSWERED = "host answered";

/**
 * How long each kind of run may go on, and one message in it. A scheduled run may last minutes
 * (the cron's own limit is 15), so a message too large or too slow for the SMTP session's 25 s
 * still arrives; after a live delivery, the drain runs in that invocation's remaining time.
 */
const RUN_LIMITS: Record<DrainTrigger, { budgetMs: number; perMessageMs: number | null }> = {
  cron: { budgetMs: 8 * MINUTE, perMessageMs: 5 * MINUTE },
  flush: { budgetMs: 30_000, perMessageMs: 5 * MINUTE },
  live: { budgetMs: 20_000, perMessageMs: null }, // HOST_TIMEOUT_MS
};

export function runDrain(config: WorkerConfig, trigger: DrainTrigger): Promise<DrainSummary> {
  const limits = RUN_LIMITS[trigger];
  const send = sendHeld({ ...config, timeoutMs: limits.perMessageMs ?? config.timeoutMs });
  return drain(new EdgeSpool(config.spool!), { trigger, send, maxAgeMs: config.maxAgeMs, postmaster: config.postmaster, budgetMs: limits.budgetMs, log }).then((summary) => {
    if (summary.state !== "idle") log({ event: "edge_drain", ...summary });
    return summary;
  });
}

/** One held message to the host, as email() would have sent it; the answer as the drain needs it. */
function sendHeld(config: WorkerConfig) {
  const forward = forwardToHost(config);
  return async (m: HeldMessage, body: ReadableStream<Uint8Array>, requestId: string): Promise<SendResult> => {
    try {
      // Nobody waits on the other end of a drain: only forwardToHost's own time limit ends it.
      const results = await forward({ envelope: { from: m.from, to: [m.to] }, body, size: m.size, requestId, signal: new AbortController().signal });
      const replies = results.map((r) => r.reply).join("; ");
      if (results.every(isAccepted)) return { outcome: "confirmed", reply: replies };
      return { outcome: results.some(isPermanent) ? "permanent" : "temporary", reply: replies };
    } catch (e) {
      if (e instanceof Refusal) return { outcome: "permanent", reply: `${e.status} ${e.message}` };
      return { outcome: "temporary", reply: (e as Error).message };
    }
  };
}

export async function scheduled(controller: { scheduledTime: number }, env: Env): Promise<void> {
  const { config } = edgeApp(env);
  if (!config.spool) return;
  await runDrain(config, "cron");
  // Once an hour: failed/ keeps a message 30 days.
  if (new Date(controller.scheduledTime).getUTCMinutes() === 0) {
    const removed = await new EdgeSpool(config.spool).sweepFailed();
    if (removed) log({ event: "edge_failed_expired", removed });
  }
}

/**
 * The bounce text goes into the SMTP reply to the sender: one line, no control characters (a CR LF
 * from the host must not end the reply early or start another one), and short enough for a reply
 * line (RFC 5321: 512 octets with the code).
 */
export function smtpReason(text: string): string {
  // eslint-disable-next-line no-control-regex
  const line = text.replace(/[\x00-\x1f\x7f]+/g, " ").replace(/ {2,}/g, " ").trim();
  return (line || "550 5.0.0 message refused by the host").slice(0, 450);
}

/**
 * The edge's own HTTP face: the same app, forwarding to the host (GET /health answers locally),
 * and, with the key, the edge spool: GET /edge/queue, GET /edge/metrics, POST /edge/flush,
 * POST /edge/retry/:id.
 */
async function fetchHandler(request: Request, env: Env): Promise<Response> {
  let built;
  try {
    built = edgeApp(env);
  } catch (e) {
    return Response.json({ status: "error", error: "misconfigured", message: (e as Error).message }, { status: 500 });
  }
  return (new URL(request.url).pathname.startsWith("/edge/") ? built.edge : built.http).fetch(request);
}

function edgeQueueApp(config: WorkerConfig) {
  const app = new Hono();
  app.use("*", apiKey([config.apiKey], (c: Context, message: string) => c.json({ status: "error", error: "unauthorized", message }, 401)));
  app.use("*", async (c, next) => {
    if (!config.spool) return c.json({ status: "error", error: "no_edge_spool", message: "no R2 bucket is bound as EDGE_SPOOL" }, 404);
    await next();
  });
  const spool = () => new EdgeSpool(config.spool!);

  app.get("/edge/queue", async (c) => c.json(await edgeListing(spool())));
  app.get("/edge/metrics", async (c) => {
    const l = await edgeListing(spool());
    const lines = [
      "# HELP edge_spool_messages Messages held at the edge for the host.",
      "# TYPE edge_spool_messages gauge",
      `edge_spool_messages ${l.held}`,
      "# HELP edge_spool_oldest_age_seconds Age of the oldest held message.",
      "# TYPE edge_spool_oldest_age_seconds gauge",
      `edge_spool_oldest_age_seconds ${l.oldest_held_age_seconds ?? 0}`,
      "# HELP edge_spool_failed_messages Messages the edge gave up on (failed/).",
      "# TYPE edge_spool_failed_messages gauge",
      `edge_spool_failed_messages ${l.failed}`,
    ];
    return c.text(lines.join("\n") + "\n", 200, { "content-type": "text/plain; version=0.0.4" });
  });
  app.post("/edge/flush", async (c) => c.json({ status: "ok", ...(await runDrain(config, "flush")) }));
  app.post("/edge/retry/:id", async (c) => {
    const id = c.req.param("id");
    if (!isId(id) || !(await spool().retryFailed(id))) return c.json({ status: "error", error: "not_found", message: `no failed message ${JSON.stringify(id.slice(0, 80))}` }, 404);
    log({ event: "edge_retry_failed", id });
    return c.json({ status: "ok", id, message: "back in the edge queue; the next drain delivers it" });
  });
  app.notFound((c) => c.json({ status: "error", error: "not_found", message: `no route for ${c.req.method} ${c.req.path}` }, 404));
  return app;
}

async function edgeListing(spool: EdgeSpool) {
  const now = Date.now();
  const [{ messages, complete }, failed] = await Promise.all([spool.held(10), spool.failed()]);
  const row = (m: HeldMessage) => ({
    id: m.id,
    kind: m.kind,
    from: m.from === "" ? "<>" : m.from,
    to: m.to,
    size: m.size,
    age_seconds: Math.round((now - m.received) / 1000),
    attempts: m.attempts,
    next_attempt: m.next ? new Date(m.next).toISOString() : null,
    last_reply: m.lastReply || m.reason,
  });
  return {
    held: messages.length,
    oldest_held_age_seconds: messages.length ? Math.round((now - Math.min(...messages.map((m) => m.received))) / 1000) : null,
    failed: failed.length,
    complete,
    messages: messages.map(row),
    failed_messages: failed.map((f) => ({ ...row(f), why: f.why, failed_at: new Date(f.failed).toISOString() })),
  };
}

export default { fetch: fetchHandler, email, scheduled };
