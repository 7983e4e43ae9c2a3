// The three ways a message goes into Dovecot in this bench, each as an Operation for load.ts:
//   ceiling:     lmtp.ts's LmtpPool straight into LMTP, no HTTP
//   relay raw:   POST message/rfc822 to the host (X-Envelope-From / X-Envelope-To), as the Worker does
//   relay JSON:  POST the runbook's {from, to, subject, raw, timestamp} to the host
// Request bodies are built before the clock starts, so the bench's own work per message is the
// HTTP call and nothing else.

import { LmtpPool, lmtpTarget } from "../lmtp.ts";
import type { Operation } from "./load.ts";
import { RECIPIENT, SENDER } from "./messages.ts";

export const INBOUND = "/api/v1/inbound-mail";

export function ceilingPool(host: string, port: number, concurrency: number): LmtpPool {
  return new LmtpPool(lmtpTarget(host, port), { maxConnections: concurrency, maxIdle: concurrency, lhloName: "bench" });
}

export function ceilingOp(pool: LmtpPool, messages: Uint8Array[]): Operation {
  const envelope = { from: SENDER, to: [RECIPIENT] };
  return async (i) => {
    const body = messages[i]!;
    const replies = await pool.deliver(envelope, body, body.length);
    const bad = replies.find((r) => r.code !== 250);
    return bad ? `LMTP ${bad.code} ${bad.text}` : undefined;
  };
}

/** What the Worker sends with a message/rfc822 body. */
export const RAW_HEADERS = { "content-type": "message/rfc822", "x-envelope-from": SENDER, "x-envelope-to": RECIPIENT } as const;

/** POST and check the host's answer: 200 with status "success" (a "duplicate" was not delivered). */
export async function post(url: string, apiKey: string, body: BodyInit, headers: Record<string, string>): Promise<{ status: number; detail: string | null }> {
  const res = await fetch(`${url}${INBOUND}`, {
    method: "POST",
    headers: { "x-api-key": apiKey, ...headers },
    body,
    // @ts-expect-error - Bun needs it for a stream body
    duplex: "half",
  });
  const text = await res.text();
  if (res.status !== 200) return { status: res.status, detail: `HTTP ${res.status}: ${text.slice(0, 200)}` };
  let status: unknown;
  try {
    status = (JSON.parse(text) as { status?: unknown }).status;
  } catch {
    return { status: res.status, detail: `HTTP 200 but not JSON: ${text.slice(0, 200)}` };
  }
  return { status: res.status, detail: status === "success" ? null : `HTTP 200 with status ${JSON.stringify(status)}` };
}

export function relayRawOp(url: string, apiKey: string, messages: Uint8Array<ArrayBuffer>[]): Operation {
  return async (i) => (await post(url, apiKey, messages[i]!, RAW_HEADERS)).detail ?? undefined;
}

/** The runbook's JSON body for each message, encoded before the run. */
export function jsonBodies(messages: Uint8Array[]): Uint8Array<ArrayBuffer>[] {
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  return messages.map((m, i) => {
    const raw = decoder.decode(m);
    const subject = /^Subject: (.*)$/m.exec(raw)?.[1] ?? "(件名なし)";
    return encoder.encode(JSON.stringify({ from: SENDER, to: RECIPIENT, subject, raw, timestamp: new Date(Date.UTC(2024, 10, 28, 12, 0, i % 60)).toISOString() }));
  });
}

export function relayJsonOp(url: string, apiKey: string, bodies: Uint8Array<ArrayBuffer>[]): Operation {
  return async (i) => (await post(url, apiKey, bodies[i]!, { "content-type": "application/json" })).detail ?? undefined;
}
