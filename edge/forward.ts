// The Deliverer at the edge: the message goes on to the host, streamed, as message/rfc822, and the
// host's answer comes back as results (or a Refusal, or a TemporaryFailure). Only the host's own
// answer counts: anything else that answers is retried, never accepted nor bounced.

import { Refusal, TemporaryFailure, type Deliverer } from "../shared/app.ts";
import { ALREADY_ACCEPTED, InboundResponse, headerValue } from "../shared/contract.ts";
import { acceptedResult, isAccepted, isPermanent, outcomeForStatus } from "../shared/replies.ts";
import type { WorkerConfig } from "./config.ts";
import type { SendResult } from "./drain.ts";
import { redactor } from "./redact.ts";
import { sized, type HeldMessage } from "./spool.ts";

/** How forwardToHost's failures start when the host answered; "host unreachable" otherwise. */
export const HOST_ANSWERED = "host answered";

/**
 * A temporary failure that the host's mailbox server gave for this recipient (LMTP 4xx: a full
 * mailbox, a greylist): the host itself is up, and this message waits for its own reasons.
 */
export class HostDeferral extends TemporaryFailure {
  override name = "HostDeferral";
}

/** No answer within the time limit: the host may be away, or still busy with this message (a large one through a slow tunnel). */
export class NoAnswer extends TemporaryFailure {
  override name = "NoAnswer";
}

/**
 * The headers of a message/rfc822 request to the app: the key, and the envelope as UTF-8 on the
 * wire (headerValue). The contract's MAX_ENVELOPE_TO_BYTES keeps the list well inside the host's
 * 16 KiB for all headers. `alreadyAccepted`: the sender heard 250 from the edge before (a held
 * message): the host's spam filter must not refuse it now (X-Already-Accepted).
 */
export function messageHeaders(apiKey: string, from: string, to: string, requestId: string, alreadyAccepted = false): Record<string, string> {
  return {
    "content-type": "message/rfc822",
    "x-api-key": apiKey,
    "x-envelope-from": headerValue(from === "" ? "<>" : from),
    "x-envelope-to": headerValue(to),
    "x-request-id": requestId,
    ...(alreadyAccepted ? { [ALREADY_ACCEPTED]: "true" } : {}),
  };
}

/**
 * Every request to the host leaves the Worker here (the live delivery, the drain's, notices, an
 * operator's flush, the /edge/metrics probe), and never follows a redirect: a redirect would carry
 * the key and the message to whatever origin it names (a misconfigured Access application or
 * tunnel answers with a login page elsewhere). Through the HOST binding when there is one (Workers
 * VPC: no public hostname), else over the public hostname; with the Access service token when it
 * is set, which Cloudflare Access turns into the Cf-Access-Jwt-Assertion the host checks.
 */
export function fetchHost(config: Pick<WorkerConfig, "access" | "host">, url: string, init: RequestInit): Promise<Response> {
  const headers = new Headers(init.headers);
  headers.set("user-agent", "mailserver-inbound-relay-worker/1");
  if (config.access) {
    headers.set("cf-access-client-id", config.access.clientId);
    headers.set("cf-access-client-secret", config.access.clientSecret);
  }
  return (config.host ?? globalThis).fetch(url, { ...init, headers, redirect: "manual" });
}

/** A message to the host's endpoint within a time limit; a redirect is the host's answer (a temporary failure, see forwardToHost). */
export async function requestHost(
  config: Pick<WorkerConfig, "endpoint" | "access" | "host">,
  init: { headers: Record<string, string>; body: BodyInit; timeoutMs: number },
): Promise<Response> {
  try {
    return await fetchHost(config, config.endpoint, {
      method: "POST",
      headers: init.headers,
      body: init.body,
      signal: AbortSignal.timeout(init.timeoutMs),
      // @ts-expect-error - Bun and Node need it for a stream body; workerd ignores it
      duplex: "half",
    });
  } catch (e) {
    const err = e as Error;
    if (err.name === "TimeoutError") throw new NoAnswer(`host unreachable: no answer within ${init.timeoutMs} ms`);
    throw new TemporaryFailure(`host unreachable: ${err.message}`);
  }
}

/** The Deliverer at the edge. */
export function forwardToHost(config: WorkerConfig): Deliverer {
  // The host's words, without anything of the key or the service token it was sent (edge/redact.ts).
  const redact = redactor([config.apiKey, config.access?.clientId, config.access?.clientSecret]);
  return async ({ envelope, body, size, requestId, alreadyAccepted }) => {
    const res = await requestHost(config, {
      headers: messageHeaders(config.apiKey, envelope.from, envelope.to.join(", "), requestId, alreadyAccepted),
      body: withLength(body, size),
      timeoutMs: config.timeoutMs,
    });
    if (res.status >= 300 && res.status < 400) {
      void res.body?.cancel();
      const location = redact((res.headers.get("location") ?? "(no Location)").replace(/[\x00-\x1f\x7f]/g, "")).slice(0, 300);
      throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status}: a redirect to ${location}, not followed (DELL_API_ENDPOINT must be the host's own URL)`);
    }
    const answer = InboundResponse.safeParse(await res.json().catch(() => null));
    if (answer.success) {
      const d = answer.data;
      Object.assign(d, { message: redact(d.message), error: d.error && redact(d.error), recipients: d.recipients?.map((r) => ({ ...r, address: redact(r.address), reply: redact(r.reply) })) });
    }
    const text = answer.success ? answer.data.message : `HTTP ${res.status}`;
    const recipients = answer.success ? answer.data.recipients : undefined;

    switch (outcomeForStatus(res.status)) {
      case "accept":
        // A 2xx is a delivery only when it is the host's own answer saying so. Anything else (a
        // proxy's or another service's page, /health by a wrong DELL_API_ENDPOINT) confirms
        // nothing: accepting it would lose the message, so the sender is asked to retry.
        if (!answer.success || !["success", "queued", "duplicate"].includes(answer.data.status)) {
          throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status} without a delivery confirmation`);
        }
        // Delivered or safely queued on the host: every recipient is accepted, whatever the details.
        // Queued stays queued (a recipient is learned only from a delivery: worker.ts).
        return envelope.to.map((address) => {
          const r = recipients?.find((x) => x.address === address);
          if (r && isAccepted(r)) return r;
          return answer.data.status === "queued" ? { ...acceptedResult(address, text), queued: true } : acceptedResult(address, text);
        });
      case "reject":
        // A bounce cannot be taken back: only the host's own refusal, with its reason, bounces.
        // A bare 400 or 413 comes from something in front of the app (Bun answers a few requests
        // itself, without a body; a proxy, with its own page) and is retried.
        if (!answer.success) throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status} without its JSON reason`);
        if (res.status === 422 && recipients?.length) return recipients;
        throw new Refusal(res.status as 400 | 413 | 415 | 422, answer.data.error ?? "host_refused", text);
      case "retry":
        // The host's spam filter asks the sender to come back later (greylisting): passed on as
        // such, so that email() does not hold it (that would accept it on the sender's behalf).
        // Only the host's own 429 says so; anyone else's is a temporary failure like the rest.
        if (res.status === 429 && answer.success && answer.data.error === "spam_deferred") throw new Refusal(429, "spam_deferred", text);
        if (answer.success && recipients?.some((r) => !isAccepted(r) && !isPermanent(r))) throw new HostDeferral(`${HOST_ANSWERED} ${res.status}: ${text}`);
        throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status}: ${text}`);
    }
  };
}

/**
 * workerd sends a plain ReadableStream body chunked; sized() (its FixedLengthStream) makes the
 * request carry Content-Length, so the host can check the size before reading and pass it to LMTP
 * as SIZE=. The piping is native: no JavaScript touches the bytes. Elsewhere (Bun), the stream as is.
 */
function withLength(body: ReadableStream<Uint8Array> | Uint8Array, size: number | null): BodyInit {
  return body instanceof Uint8Array || size === null ? (body as BodyInit) : sized(body, size);
}

/**
 * One held message to the host, as email() would have sent it, within the time its run has left;
 * the answer as the drain needs it. Held: the sender was told 250 when it was held, so it goes as
 * already accepted (the host's spam filter must not refuse it now).
 */
export function sendHeld(config: WorkerConfig) {
  return async (m: HeldMessage, body: ReadableStream<Uint8Array>, requestId: string, timeoutMs: number): Promise<SendResult> => {
    const forward = forwardToHost({ ...config, timeoutMs });
    try {
      // Nobody waits on the other end of a drain: only the time limit ends it.
      const results = await forward({ envelope: { from: m.from, to: [m.to] }, body, size: m.size, requestId, signal: new AbortController().signal, alreadyAccepted: true });
      const replies = results.map((r) => r.reply).join("; ");
      if (results.every(isAccepted)) return { outcome: "confirmed", reply: replies };
      return { outcome: results.some(isPermanent) ? "permanent" : "temporary", reply: replies };
    } catch (e) {
      // Only a refusal for good gives up on the message; a deferral (429: the host is up, this
      // message waits) is tried again later.
      if (e instanceof Refusal && outcomeForStatus(e.status) === "reject") return { outcome: "permanent", reply: `${e.status} ${e.message}` };
      return { outcome: "temporary", reply: (e as Error).message, hostAnswered: e instanceof HostDeferral || e instanceof Refusal, noAnswer: e instanceof NoAnswer };
    }
  };
}
