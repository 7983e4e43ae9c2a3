// The drain: hands what the edge spool holds to the host, oldest first, streamed from R2. Run by
// the cron (every minute), right after a live delivery succeeded, and by an operator's flush.
//   - A message is deleted only after the host's own confirmation (success, queued, duplicate).
//   - A cron run starts with one message, the one due soonest, even if its backoff has not run
//     out (the probe). If it fails for now, the run ends: the host is not taking mail, and one
//     attempt a minute is enough to notice its return.
//   - Once the host has answered (in this run, or the live delivery that started it), the rest
//     follow at once, oldest first, whatever their backoff.
//   - Backoff per message as Postfix's: 5 min after the first failed attempt, doubling, at most 1 h.
//   - A permanent refusal, or EDGE_SPOOL_MAX_AGE_HOURS passed: failed/, and one notice to
//     POSTMASTER (queued here like any held message; none for a notice).
//   - Bounded: a wall-clock budget, and at most MAX_CALLS R2 calls and fetches (the free plan
//     allows 50 subrequests per invocation).

import { noticeMessage, summarizeHeaders } from "./notice.ts";
import { HOUR, MINUTE, NO_ANSWER_GRACE_MS, type EdgeSpool, type FailedMessage, type HeldMessage } from "./spool.ts";

export type DrainTrigger = "cron" | "live" | "flush";

/** What the host made of one attempt. */
export interface SendResult {
  outcome: "confirmed" | "permanent" | "temporary";
  reply: string;
}

export interface DrainOptions {
  trigger: DrainTrigger;
  /** Delivers one message to the host, its bytes streamed from R2. */
  send: (m: HeldMessage, body: ReadableStream<Uint8Array>, requestId: string) => Promise<SendResult>;
  maxAgeMs: number;
  postmaster: string;
  /** Stop starting new deliveries after this long (ms). */
  budgetMs: number;
  log: (line: Record<string, unknown>) => void;
  now?: () => number;
}

export interface DrainSummary {
  trigger: DrainTrigger;
  /** "idle": nothing held; "busy": another drain runs. */
  state: "idle" | "busy" | "ran";
  delivered: number;
  retried: number;
  failed: number;
  remaining: number;
}

/** R2 calls and fetches one run may make: under the free plan's 50 subrequests, with room to finish. */
export const MAX_CALLS = 40;
/** What one more delivery may cost at most (get, fetch, delete or retry write). */
const CALLS_PER_DELIVERY = 3;
/** Giving up: the header block, the notice, the copy's read and write, the delete. */
const CALLS_PER_GIVE_UP = 5;
/** The lock outlives any run (the longest is the cron's budget plus one message's limit). */
export const LOCK_LEASE_MS = 15 * MINUTE;

export function backoffMs(attempts: number): number {
  return Math.min(5 * MINUTE * 2 ** Math.max(0, attempts - 1), HOUR);
}

export async function drain(spool: EdgeSpool, opts: DrainOptions): Promise<DrainSummary> {
  const now = opts.now ?? Date.now;
  const started = now();
  const summary: DrainSummary = { trigger: opts.trigger, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0 };
  if (opts.trigger !== "flush" && !(await spool.mayHold())) return summary;
  if (!(await spool.lock(LOCK_LEASE_MS, started))) return { ...summary, state: "busy" };
  summary.state = "ran";
  let remaining = true; // until the listing says otherwise, the marker must come back
  try {
    await spool.clearHeld();
    const { messages, complete } = await spool.held();
    const t = now();
    // Not yet: a message whose first copy may still be on its way into Dovecot at the host.
    const ready = messages.filter((m) => !(m.noAnswer && m.attempts === 0 && t - m.received < NO_ANSWER_GRACE_MS));
    const left = new Set(messages.map((m) => m.id));

    // Past the maximum age: given up before anything else, whatever the host does now.
    for (const m of ready) {
      if (t - m.since < opts.maxAgeMs || spool.calls + CALLS_PER_GIVE_UP > MAX_CALLS) continue;
      await giveUp(spool, m, "expired", m.lastReply || m.reason, opts, now());
      left.delete(m.id);
      summary.failed++;
    }

    // The host answered in this run (or the live delivery that started it): it is up.
    let hostUp = opts.trigger !== "cron";
    const waiting = ready.filter((m) => left.has(m.id)); // in arrival order
    // Not known to be up: the message due soonest goes first (the probe), and alone unless the host answers.
    const probe = hostUp ? undefined : [...waiting].sort((a, b) => a.next - b.next || (a.id < b.id ? -1 : 1))[0];
    const order = probe ? [probe, ...waiting.filter((m) => m !== probe)] : waiting;
    let attempted = 0;
    for (const m of order) {
      if (now() - started > opts.budgetMs || spool.calls + Math.max(CALLS_PER_DELIVERY, CALLS_PER_GIVE_UP) + 2 > MAX_CALLS) break;
      if (!hostUp && attempted > 0) break;
      attempted++;
      const r = await attempt(spool, m, opts);
      if (r.outcome === "confirmed") {
        await spool.delivered(m.id);
        left.delete(m.id);
        summary.delivered++;
        hostUp = true;
        opts.log({ event: "edge_delivered", id: m.id, from: m.from, to: m.to, size: m.size, attempts: m.attempts + 1, trigger: opts.trigger, reply: r.reply });
      } else if (r.outcome === "permanent") {
        await giveUp(spool, m, "refused", r.reply, opts, now());
        left.delete(m.id);
        summary.failed++;
        hostUp = true;
      } else {
        const next = now() + backoffMs(m.attempts + 1);
        await spool.retryLater(m, r.reply, next, now());
        summary.retried++;
        opts.log({ event: "edge_retry", id: m.id, to: m.to, attempts: m.attempts + 1, next_attempt: new Date(next).toISOString(), trigger: opts.trigger, reply: r.reply });
        if (!hostUp) break;
      }
    }
    summary.remaining = left.size;
    remaining = left.size > 0 || !complete;
  } finally {
    if (remaining) await spool.markHeld();
    await spool.unlock();
  }
  return summary;
}

async function attempt(spool: EdgeSpool, m: HeldMessage, opts: DrainOptions): Promise<SendResult> {
  if (m.from === "?" || m.to === "?") return { outcome: "temporary", reply: "the envelope of this message is unreadable: see the listing" };
  const o = await spool.body(m.id);
  // Gone meanwhile (delivered by another run, or removed by hand): nothing left to do.
  if (!o) return { outcome: "confirmed", reply: "no longer in the edge spool" };
  spool.calls++; // the fetch to the host
  try {
    return await opts.send(m, o.body, crypto.randomUUID());
  } catch (e) {
    return { outcome: "temporary", reply: `the drain failed: ${(e as Error).message}` };
  }
}

/**
 * failed/ and one notice. The notice is written first: if the run dies between the two, the next
 * run gives up on the message again (a second notice) rather than leaving nobody told.
 */
async function giveUp(spool: EdgeSpool, m: HeldMessage, why: FailedMessage["why"], reply: string, opts: DrainOptions, at: number): Promise<void> {
  const failed: FailedMessage = { ...m, lastReply: reply, failed: at, why };
  if (m.kind !== "notice") {
    const start = await spool.head(m.id);
    const headers = await summarizeHeaders(start ?? new Uint8Array());
    const text = noticeMessage(failed, headers, opts.postmaster, at);
    const size = new TextEncoder().encode(text).length;
    const noticeId = await spool.hold(text, { from: "", to: opts.postmaster, size, reason: `notice about ${m.id}`, noAnswer: false, kind: "notice", noticeFor: m.id }, at);
    opts.log({ event: "edge_notice", id: noticeId, about: m.id, to: opts.postmaster });
  }
  await spool.moveToFailed(m, why, reply, at);
  opts.log({ event: "edge_failed", id: m.id, from: m.from, to: m.to, size: m.size, why, attempts: m.attempts, kind: m.kind, reply });
}
