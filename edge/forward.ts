// The Deliverer at the edge: the message goes on to the host, streamed, as message/rfc822, and the
// host's answer comes back as results (or a Refusal, or a TemporaryFailure). Only the host's own
// answer counts: anything else that answers is retried, never accepted nor bounced.

import { Refusal, TemporaryFailure, type Deliverer } from "../shared/app.ts";
import { ALREADY_ACCEPTED, InboundResponse, headerValue } from "../shared/contract.ts";
import { acceptedResult, isAccepted, isPermanent, outcomeForStatus } from "../shared/replies.ts";
import type { WorkerConfig } from "./config.ts";
import type { SendResult } from "./drain.ts";
import { sized, type HeldMessage } from "./spool.ts";

/** How forwardToHost's failures start when the host answered; "host unreachable" otherwise. */
export const HOST_ANSWERED = "host answered";

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
 * operator's flush): through the HOST binding when there is one (Workers VPC: no public hostname),
 * else over the public hostname; with the Access service token when it is set, which Cloudflare
 * Access turns into the Cf-Access-Jwt-Assertion the host checks.
 */
export function fetchHost(config: WorkerConfig, init: RequestInit): Promise<Response> {
  const headers = new Headers(init.headers);
  if (config.access) {
    headers.set("cf-access-client-id", config.access.clientId);
    headers.set("cf-access-client-secret", config.access.clientSecret);
  }
  return (config.host ?? globalThis).fetch(config.endpoint, { ...init, headers });
}

export function forwardToHost(config: WorkerConfig): Deliverer {
  return async ({ envelope, body, size, requestId, alreadyAccepted }) => {
    let res: Response;
    try {
      res = await fetchHost(config, {
        method: "POST",
        headers: { ...messageHeaders(config.apiKey, envelope.from, envelope.to.join(", "), requestId, alreadyAccepted), "user-agent": "mailserver-inbound-relay-worker/1" },
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
          throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status} without a delivery confirmation`);
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
        if (!answer.success) throw new TemporaryFailure(`${HOST_ANSWERED} ${res.status} without its JSON reason`);
        if (res.status === 422 && recipients?.length) return recipients;
        throw new Refusal(res.status as 400 | 413 | 415 | 422, answer.data.error ?? "host_refused", text);
      case "retry":
        // The host's spam filter asks the sender to come back later (greylisting): passed on as
        // such, so that email() does not hold it (that would accept it on the sender's behalf).
        // Only the host's own 429 says so; anyone else's is a temporary failure like the rest.
        if (res.status === 429 && answer.success && answer.data.error === "spam_deferred") throw new Refusal(429, "spam_deferred", text);
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

/** One held message to the host, as email() would have sent it; the answer as the drain needs it. */
export function sendHeld(config: WorkerConfig) {
  const forward = forwardToHost(config);
  return async (m: HeldMessage, body: ReadableStream<Uint8Array>, requestId: string): Promise<SendResult> => {
    try {
      // Nobody waits on the other end of a drain: only forwardToHost's own time limit ends it.
      // Held: the sender was told 250 when it was held, so the host must not refuse it for spam now.
      const results = await forward({ envelope: { from: m.from, to: [m.to] }, body, size: m.size, requestId, signal: new AbortController().signal, alreadyAccepted: true });
      const replies = results.map((r) => r.reply).join("; ");
      if (results.every(isAccepted)) return { outcome: "confirmed", reply: replies };
      return { outcome: results.some(isPermanent) ? "permanent" : "temporary", reply: replies };
    } catch (e) {
      // Only a refusal for good gives up on the message; a deferral (429) is tried again later.
      if (e instanceof Refusal && outcomeForStatus(e.status) === "reject") return { outcome: "permanent", reply: `${e.status} ${e.message}` };
      return { outcome: "temporary", reply: (e as Error).message };
    }
  };
}
