// The one Hono app that both runtimes serve. It knows the HTTP contract (contract.ts, replies.ts)
// and nothing of where messages go: the caller hands it a Deliverer (LMTP on the host, a streamed
// fetch to the host at the edge). Runtime-neutral: Web-standard Request/Response only, no Bun,
// node or cloudflare imports (tests/layout.test.ts checks).

import { Hono, type Context, type MiddlewareHandler } from "hono";
import { except } from "hono/combine";
import { HTTPException } from "hono/http-exception";
import { requestId } from "hono/request-id";
import { ALREADY_ACCEPTED, DEFAULT_MAX_MESSAGE_BYTES, EnvelopeHeaders, INBOUND_PATH, describeIssues, headerText, type InboundEnvelope, type InboundResponse, type RecipientResult } from "./contract.ts";
import { jsonLines, type LogLine, type LogWriter } from "./log.ts";
import { accessLog, logFields, type AccessLogEnv } from "./middleware/access-log.ts";
import { apiKey, keyCheck } from "./middleware/api-key.ts";
import { BodyStalled, countBytes, idleLimited } from "./body-limit.ts";
import { jsonTooLarge, maxJsonBytes, readJsonMessage } from "./json-message.ts";
import { PROMETHEUS_CONTENT_TYPE } from "./prometheus.ts";
import { Refusal, tooLarge } from "./refusal.ts";
import { answerForReplies, answerOutcome, type AnswerOutcome } from "./replies.ts";

export { Refusal, maxJsonBytes };

export interface InboundMessage {
  envelope: InboundEnvelope;
  /** The message's exact bytes: streamed from the request, or decoded from JSON. */
  body: ReadableStream<Uint8Array> | Uint8Array;
  /** Its size in bytes when known before reading (Content-Length, or a decoded JSON body). */
  size: number | null;
  requestId: string;
  /**
   * Aborted when the request's connection is gone: no answer can reach the sender any more, so
   * from then on nothing may be delivered (the host checks it just before the final dot).
   */
  signal: AbortSignal;
  /**
   * Set by the host's alias step (host/aliases.ts): each recipient that is not an address the
   * sender used, with the one it was sent to (LMTP's ORCPT, RFC 3461).
   */
  originalRecipients?: ReadonlyMap<string, string>;
  /**
   * The sender was told 250 before this request (X-Already-Accepted: the Worker's drain of the
   * edge spool): a refusal now would bounce to a sender that may be forged, so the host's spam
   * filter delivers it with its verdict instead of refusing or deferring it.
   */
  alreadyAccepted?: boolean;
}

/** Delivers one message; answers one result per recipient, in envelope order. */
export type Deliverer = (message: InboundMessage) => Promise<RecipientResult[]>;

/** Thrown by a Deliverer when nothing was delivered and a later attempt may succeed (503). */
export class TemporaryFailure extends Error {
  override name = "TemporaryFailure";
}

export interface AppOptions {
  apiKeys: readonly string[];
  deliver: Deliverer;
  maxMessageBytes?: number;
  /** Readiness probe (e.g. opens LMTP); throws when the deliverer cannot work now. What it returns, and its error, are shown only to a caller with the key. */
  ready?: () => Promise<LogLine>;
  /** Prometheus text for GET /metrics (behind the API key, like the inbound route). */
  metrics?: () => string | Promise<string>;
  log?: LogWriter;
  /** Called once per answered inbound request that passed the key check, with what the answer meant for the message. */
  onAnswer?: (outcome: AnswerOutcome) => void;
  /** Seconds a 503 asks the client to wait. */
  retryAfterSeconds?: number;
  /** A request body that sends no bytes for this long is answered 503 (body_stalled); unset: no limit. */
  bodyIdleMs?: number;
  /** A door in front of every route but GET /health, passed before the key is looked at (the host's Cloudflare Access check). */
  door?: MiddlewareHandler;
}

type AppEnv = { Variables: AccessLogEnv["Variables"] & { duplicate?: boolean } };

export function createApp(opts: AppOptions) {
  const maxMessage = opts.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
  // A JSON body carries the message escaped (up to 6 bytes for one: "\u00XX") or in base64.
  const maxJson = maxJsonBytes(maxMessage);
  const retryAfter = String(opts.retryAfterSeconds ?? 30);
  const log = opts.log ?? jsonLines;

  const app = new Hono<AppEnv>();
  app.use(requestId(), accessLog(log));
  if (opts.door) app.use(except("/health", opts.door));

  app.onError((err, c) => {
    // A middleware's own answer (hono/basic-auth's 401 with WWW-Authenticate), as it made it.
    if (err instanceof HTTPException) return err.getResponse();
    if (err instanceof BodyStalled) err = new Refusal(503, "body_stalled", `${err.message}; nothing was delivered, send it again`);
    if (err instanceof Refusal) {
      logFields(c, { error: err.code });
      const later = err.status === 503 || err.status === 429;
      if (later) c.header("Retry-After", retryAfter);
      return answer(c, err.status, { status: later ? "deferred" : "error", error: err.code, message: err.message });
    }
    // Anything unexpected is temporary for the sender (500: the edge retries). Details go to the log only.
    logFields(c, { error: "internal_error", detail: errorDetail(err) });
    return answer(c, 500, { status: "error", error: "internal_error", message: "internal error; the message was not delivered" });
  });

  app.notFound((c) => answer(c, 404, { status: "error", error: "not_found", message: `no route for ${c.req.method} ${c.req.path}` }));

  // The runbook's shape; no authentication (the container health check calls it).
  app.get("/health", async (c) => {
    if (c.req.query("deep") === undefined) return c.json({ status: "healthy", timestamp: new Date().toISOString() });
    return readiness(c);
  });
  app.get("/ready", (c) => readiness(c));

  // Reached through the tunnel without a key: the status only. The LMTP target, its
  // capabilities, the spool depth and the error text are for a caller with the key.
  const hasKey = keyCheck(opts.apiKeys);
  async function readiness(c: Context<AccessLogEnv>) {
    const details = (await hasKey(c)) === "valid";
    try {
      const detail = (await opts.ready?.()) ?? {};
      return c.json({ status: "ready", timestamp: new Date().toISOString(), ...(details ? detail : {}) });
    } catch (e) {
      c.header("Retry-After", retryAfter);
      return c.json({ status: "unavailable", timestamp: new Date().toISOString(), ...(details ? { error: (e as Error).message } : {}) }, 503);
    }
  }

  const refuseKey = (c: Context, message: string) => answer(c, 401, { status: "error", error: "unauthorized", message });

  if (opts.metrics) {
    const render = opts.metrics;
    app.get("/metrics", apiKey(opts.apiKeys, refuseKey), async (c) => c.text(await render(), 200, { "content-type": PROMETHEUS_CONTENT_TYPE }));
  }

  // Counted from the answer itself (refusals and errors included), whatever the log says.
  const onAnswer = opts.onAnswer;
  const reportAnswer: MiddlewareHandler<AppEnv> = async (c, next) => {
    await next();
    onAnswer?.(answerOutcome(c.res.status, c.get("duplicate") === true));
  };

  app.post(INBOUND_PATH, apiKey(opts.apiKeys, refuseKey), reportAnswer, async (c) => {
    refuseEncoded(c.req.header("content-encoding"));
    const alreadyAccepted = acceptedBefore(c.req.header(ALREADY_ACCEPTED));
    if (alreadyAccepted) logFields(c, { already_accepted: true });
    const type = mediaType(c.req.header("content-type"));
    const parsed =
      type === "message/rfc822"
        ? rawMessage(c, maxMessage, opts.bodyIdleMs)
        : type === "application/json"
          ? await jsonMessage(c.req.raw, maxMessage, maxJson, opts.bodyIdleMs)
          : unsupported(type);
    const { envelope, body, size, overLimit } = parsed;
    logFields(c, { from: envelope.from, to: envelope.to, size, body: type });

    // The connection is gone before the message went anywhere: nobody can hear an answer, so
    // nothing may be delivered. Bun (1.4.5) closes a connection as soon as a second request
    // arrives on it before the first is answered (HTTP pipelining), and the first one's answer is
    // lost with it.
    const signal = c.req.raw.signal;
    if (signal.aborted) throw clientGone();

    let results: RecipientResult[];
    try {
      results = await opts.deliver({ envelope, body, size, requestId: c.get("requestId"), signal, alreadyAccepted });
    } catch (e) {
      if (overLimit?.()) throw tooLarge(maxMessage);
      if (signal.aborted) throw clientGone();
      if (e instanceof TemporaryFailure) throw new Refusal(503, "lmtp_unavailable", `temporary failure, not delivered: ${e.message}`);
      // Hono hands only Error instances to onError; anything else would reach the runtime's own
      // error page (which shows the thrown value in development) instead of our 500.
      throw e instanceof Error ? e : new Error(`deliverer threw a non-Error: ${String(e)}`);
    }
    logFields(c, { replies: results.map((r) => r.reply) });

    const reply = answerForReplies(results, envelope.to);
    const duplicate = reply.body.status === "duplicate";
    if (duplicate) c.set("duplicate", true);
    logFields(c, { outcome: duplicate ? "duplicate" : reply.status === 202 ? "queued" : undefined });
    if (reply.status === 503) c.header("Retry-After", retryAfter);
    return answer(c, reply.status, reply.body);
  });

  return app;
}

// ---------------------------------------------------------------------------------------------

interface ParsedRequest {
  envelope: InboundEnvelope;
  body: ReadableStream<Uint8Array> | Uint8Array;
  size: number | null;
  /** For a streamed body of unknown size: whether the limit cut it off. */
  overLimit?: () => boolean;
}

/** message/rfc822: the body is the message; the envelope is in X-Envelope-From / X-Envelope-To. */
function rawMessage(c: Context, max: number, idleMs?: number): ParsedRequest {
  const env = EnvelopeHeaders.safeParse({
    "x-envelope-from": envelopeHeader(c, "x-envelope-from"),
    "x-envelope-to": envelopeHeader(c, "x-envelope-to"),
  });
  if (!env.success) throw new Refusal(400, "invalid_envelope", describeIssues(env.error));
  const envelope = { from: env.data["x-envelope-from"], to: env.data["x-envelope-to"] };

  const length = c.req.header("content-length");
  const size = length !== undefined && /^\d+$/.test(length) ? Number(length) : null;
  if (size !== null && size > max) throw tooLarge(max);
  if (size === 0 || !c.req.raw.body) throw new Refusal(400, "empty_message", "the request body (the message) is empty");
  const body = idleMs ? idleLimited(c.req.raw.body, idleMs) : c.req.raw.body;
  if (size !== null) return { envelope, body, size };
  // No Content-Length (chunked): count while streaming; the stream fails past the limit and the
  // LMTP transaction is abandoned before its final dot.
  const counted = countBytes(body, max);
  return { envelope, body: counted.stream, size: null, overLimit: counted.exceeded };
}

/** An envelope header as text (UTF-8 on the wire); bytes that are not UTF-8 are refused, not replaced. */
function envelopeHeader(c: Context, name: "x-envelope-from" | "x-envelope-to"): string | undefined {
  const value = c.req.header(name);
  if (value === undefined) return undefined;
  const text = headerText(value);
  if (text === null) throw new Refusal(400, "invalid_envelope", `${name}: is not valid UTF-8`);
  return text;
}

/**
 * application/json: the runbook's {from, to, subject, raw, timestamp}, or raw_base64 for exact
 * bytes; the message streams out of its JSON string as it arrives (json-message.ts).
 */
async function jsonMessage(req: Request, maxMessage: number, maxJson: number, idleMs?: number): Promise<ParsedRequest> {
  const declared = Number(req.headers.get("content-length") ?? NaN);
  if (declared > maxJson) throw jsonTooLarge(maxJson);
  const body = req.body && idleMs ? idleLimited(req.body, idleMs) : req.body;
  return readJsonMessage(body, { maxMessage, maxJson });
}

/**
 * X-Already-Accepted: true says the message's sender was told 250 before (the Worker's drain of
 * the edge spool sends it). Read only behind the key check, like everything on this route.
 */
function acceptedBefore(value: string | undefined): boolean {
  if (value === undefined) return false;
  if (value.trim().toLowerCase() === "true") return true;
  throw new Refusal(400, "invalid_request", `${ALREADY_ACCEPTED}: must be "true" (the Worker's drain sends it for mail the edge accepted)`);
}

function unsupported(type: string): never {
  throw new Refusal(
    415,
    "unsupported_media_type",
    `Content-Type ${type ? JSON.stringify(type) : "is missing"}: send message/rfc822 (the message as the body) or application/json`,
  );
}

/**
 * Nothing decodes a Content-Encoding (Bun does not, and neither does the app): a gzip body would be
 * delivered still compressed. Only the identity is taken.
 */
function refuseEncoded(header: string | undefined): void {
  const coding = (header ?? "").trim().toLowerCase();
  if (coding === "" || coding === "identity") return;
  throw new Refusal(
    415,
    "unsupported_content_encoding",
    `Content-Encoding ${JSON.stringify(coding)} is not accepted: the message is delivered as its bytes arrive, so send it uncompressed`,
  );
}

function clientGone(): Refusal {
  return new Refusal(503, "client_gone", "the connection was closed before the answer could be sent; not delivered");
}

function mediaType(header: string | undefined): string {
  return (header ?? "").split(";")[0]!.trim().toLowerCase();
}

/** An error for the log. Bun's stack of some errors (a DOMException from atob) lacks the message. */
function errorDetail(err: Error): string {
  const head = `${err.name}: ${err.message}`;
  const stack = err.stack ?? "";
  return (stack.startsWith(head) ? stack : `${head}\n${stack}`).slice(0, 2000);
}

function answer(c: Context, status: number, body: InboundResponse): Response {
  return c.json({ ...body, request_id: c.get("requestId" as never) as string | undefined }, status as 200);
}
