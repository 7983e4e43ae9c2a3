// The edge: Cloudflare Email Routing hands each message to email(), which streams it, untouched,
// to the host over HTTPS and turns the host's answer into the SMTP outcome:
//   2xx -> accept;  400/413/415/422 -> setReject (a bounce, with the host's reason);
//   anything else, a network error or a timeout -> throw (a temporary failure: the sender retries).
// It goes through the same Hono app as the host (app.ts), whose Deliverer here is a streamed fetch
// to the host, so both sides validate a message the same way. Nothing here reads the body: no
// decoding, no parsing, nothing whose cost grows with the message.

import { z } from "zod";
import { Refusal, TemporaryFailure, createApp, type Deliverer } from "./app.ts";
import { MIN_KEY_LENGTH } from "./config.ts";
import { DEFAULT_MAX_MESSAGE_BYTES, INBOUND_PATH, InboundResponse, addressProblem, headerValue, outcomeForStatus, type RecipientResult } from "./contract.ts";

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
  })
  .transform((e) => ({
    endpoint: e.DELL_API_ENDPOINT,
    apiKey: e.API_KEY,
    timeoutMs: e.HOST_TIMEOUT_MS,
    maxMessageBytes: e.MAX_MESSAGE_BYTES,
    allowed: e.ALLOWED_RECIPIENTS,
  }));
export type WorkerConfig = z.output<typeof WorkerEnv>;

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
  const set = Object.fromEntries(Object.entries(env).filter(([, v]) => typeof v === "string" && v !== ""));
  const r = WorkerEnv.safeParse(set);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  throw new Error(`worker configuration: ${issue.path.map(String).join(".")} ${issue.message}`);
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
        return envelope.to.map((address): RecipientResult => {
          const r = recipients?.find((x) => x.address === address);
          return r && r.code < 300 ? r : { address, code: 250, enhanced: "2.0.0", reply: `250 2.0.0 ${text}` };
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

function log(line: Record<string, unknown>) {
  console.log(JSON.stringify({ time: new Date().toISOString(), ...line }));
}

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
}
const edgeApps = new WeakMap<Env, EdgeApps>();

function edgeApp(env: Env): EdgeApps {
  let built = edgeApps.get(env);
  if (!built) {
    const config = workerConfig(env); // throws: temporary (and not cached, so a fix takes effect)
    const opts = { apiKeys: [config.apiKey], deliver: forwardToHost(config), maxMessageBytes: config.maxMessageBytes };
    built = { config, mail: createApp({ ...opts, log: () => {} }), http: createApp(opts) };
    edgeApps.set(env, built);
  }
  return built;
}

export async function email(message: IncomingEmail, env: Env): Promise<void> {
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
      body: message.raw,
      // @ts-expect-error - see forwardToHost
      duplex: "half",
    }),
  );
  const answer = InboundResponse.safeParse(await res.json().catch(() => null));
  const text = answer.success ? answer.data.message : `HTTP ${res.status}`;
  const outcome = outcomeForStatus(res.status);
  log({ ...base, outcome, status: res.status, message: text, ms: Date.now() - started });

  if (outcome === "accept") return;
  if (outcome === "reject") {
    await message.setReject(smtpReason(res.status === 413 ? `552 5.3.4 ${text}` : text));
    return;
  }
  // Thrown: Email Routing answers the sender with a temporary failure and the sender retries.
  throw new Error(`temporary failure, try again later: ${text}`);
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

/** The edge's own HTTP face: the same app, forwarding to the host (GET /health answers locally). */
async function fetchHandler(request: Request, env: Env): Promise<Response> {
  let app;
  try {
    ({ http: app } = edgeApp(env));
  } catch (e) {
    return Response.json({ status: "error", error: "misconfigured", message: (e as Error).message }, { status: 500 });
  }
  return app.fetch(request);
}

export default { fetch: fetchHandler, email };
