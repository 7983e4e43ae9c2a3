// The drain: hands what the edge spool holds to the host, oldest first, streamed from R2. One run
// fits in one invocation of the Worker; edge/drain-runner.ts starts runs (the cron every minute,
// a live delivery that succeeded, an operator's flush) and chains them.
//   - A message is deleted only after the host's own confirmation (success, queued, duplicate).
//   - Whether to run at all is the `held` marker's (one HEAD): something is due, or the host was
//     away at the last attempt (then the cron probes once a minute).
//   - A run not knowing the host to be up (the cron's) starts with one message, the one due
//     soonest even inside its backoff (the probe). If the host does not answer for it, the run
//     ends: one attempt a minute is enough to notice its return.
//   - Once the host is up (it confirmed, refused or answered for a message in this run, or the
//     live delivery or previous run that started this one succeeded), the rest follow at once,
//     oldest first, whatever their backoff, except a message whose last failure was its own (the
//     host answered for it, a full mailbox; or it took too long while the host was up): it waits
//     its backoff.
//   - Messages waiting out a backoff of their own hide nothing: a run lists on until it has as
//     many ready as it can deliver, or reaches the end of queue/.
//   - A failure without the host's answer ends the run: the host may have gone away.
//   - Backoff per message as Postfix's: 5 min after the first failed attempt, doubling, at most 1 h.
//   - A permanent refusal, or an attempt failed after EDGE_SPOOL_MAX_AGE_HOURS (its own, or the
//     run's that found the host away): failed/, and one notice to POSTMASTER (queued here like
//     any held message; none for a notice). Never without an attempt: a host back after the
//     maximum age gets the message (Postfix's maximal_queue_lifetime).
//   - Bounded by what one invocation may spend: each step starts only if its worst case in
//     subrequests fits the budget (edge/budget.ts) with the end's writes, and only while time is
//     left (RUN_MS). A run that ends for those reasons right after the host confirmed something
//     hands its lock to the next run (`next`), in a fresh invocation with a budget of its own.
//   - Nothing is restored only at the end: a run cut off anywhere leaves the marker saying
//     "held" and its lock to expire within LOCK_LEASE_MS; the next cron run goes on.

import type { Budget } from "./budget.ts";
import { noticeMessage, summarizeHeaders } from "./notice.ts";
import { HOUR, MINUTE, NO_ANSWER_GRACE_MS, noticeIdFor, type EdgeSpool, type FailedMessage, type HeldMessage, type Lease, type Marker, type MarkerState, type R2Ops } from "./spool.ts";

/** What started a run: the cron, a live delivery, an operator's flush, or the previous run of the same drain. */
export type DrainTrigger = "cron" | "live" | "flush" | "chain";

/** What the host made of one attempt. */
export interface SendResult {
  outcome: "confirmed" | "permanent" | "temporary";
  reply: string;
  /** For a temporary failure: the host itself answered for this message (its mailbox server's reply), so the host is up. */
  hostAnswered?: boolean;
  /** For a temporary failure: no answer within the time limit (the host away, or this message too slow for it). */
  noAnswer?: boolean;
}

export interface DrainOptions {
  trigger: DrainTrigger;
  /** Delivers one message to the host, its bytes streamed from R2, within `timeoutMs`. */
  send: (m: HeldMessage, body: ReadableStream<Uint8Array>, requestId: string, timeoutMs: number) => Promise<SendResult>;
  maxAgeMs: number;
  postmaster: string;
  log: (line: Record<string, unknown>) => void;
  now?: () => number;
  /** This run's place in its drain: 0 for the run a trigger started, n for the n-th run chained after it. */
  link?: number;
  /** For a chained run: the lock's ETag, handed over by the previous run. */
  lock?: string;
  /**
   * Starts the next run of this drain in a fresh invocation, handing over the lock; true once it
   * has started. Absent: the drain goes on at the next cron run.
   */
  next?: (lock: string, link: number) => Promise<boolean>;
}

export interface DrainSummary {
  trigger: DrainTrigger;
  link: number;
  /** "idle": nothing due; "busy": another drain runs (or took this drain's lock); "ran". */
  state: "idle" | "busy" | "ran";
  delivered: number;
  retried: number;
  failed: number;
  /** Held messages left, among those listed (`complete`: the listing reached the end). */
  remaining: number;
  complete: boolean;
  /** Why the run stopped: nothing left to do, the host did not answer, the invocation's budget or time, an error. */
  stopped?: "done" | "host" | "budget" | "time" | "error";
  /** The next run started in a fresh invocation. */
  chained: boolean;
  subrequests: number;
  r2: R2Ops;
}

/**
 * What one invocation may take, as Cloudflare documents it: a cron whose interval is under an
 * hour may run 30 s; work after the answer (waitUntil, after email() or a request) gets 30 s;
 * a runtime update gives any invocation 30 s. A run starts no delivery after RUN_MS -
 * MIN_DELIVERY_MS, and each delivery gets the time left until RUN_MS (the first of a run up to
 * 25 s: more than HOST_TIMEOUT_MS if that is set lower); the rest is for the end's writes.
 */
export const RUN_MS = 25_000;
const MIN_DELIVERY_MS = 10_000;
/**
 * The lock's lease: longer than a run (its deliveries end by RUN_MS, the invocation by 30 s) and
 * its handover; each chained run renews it as it takes the lock over. A drain cut off anywhere
 * holds the others back at most this long, and the next cron run after it goes on.
 */
export const LOCK_LEASE_MS = 45_000;
/** A run lists no further than this many messages ready to go (ten pages of them at most). */
const MAX_READY = 500;
/** A drain chains at most this many runs: a request may cause 32 Worker invocations, each call through a service binding counting. */
export const MAX_LINKS = 30;

/**
 * The worst case of each step in subrequests (R2 calls and fetches), as counted where they are
 * made (tests/edge-spool.test.ts checks each against the calls it makes).
 */
export const COST = {
  /** The marker's HEAD, the lock's HEAD and put (a chained run: the lock's renewal and the marker's HEAD). */
  start: 3,
  /** One page of the listing (up to 100 objects). */
  page: 1,
  /** The body's GET, the fetch to the host, then the delete or the retry record. */
  delivery: 3,
  /** Whether failed/ has it, the header block's GET, the notice and its marker, the body's GET and its failed/ copy, the delete. */
  giveUp: 7,
  /** The marker's conditional write and the lock's release; or the call that starts the next run and, if it fails, the marker's write. */
  end: 2,
} as const;
/** An attempt that ends in a refusal: GET and fetch, then the give-up. */
const WORST_ATTEMPT = 2 + COST.giveUp;

export function backoffMs(attempts: number): number {
  return Math.min(5 * MINUTE * 2 ** Math.max(0, attempts - 1), HOUR);
}

/** A message held without the host's answer is not offered before this: its first copy may still be arriving. */
const graceEnd = (m: HeldMessage) => (m.noAnswer && m.attempts === 0 ? m.received + NO_ANSWER_GRACE_MS : 0);
/** Past EDGE_SPOOL_MAX_AGE_HOURS, and out of the grace: the next failed attempt gives it up. */
const expiredAt = (m: HeldMessage, at: number, maxAgeMs: number) => at - m.since >= maxAgeMs && graceEnd(m) <= at;
/** Not offered before this, whoever confirms what: the grace, and a backoff earned while the host was up. */
const notBefore = (m: HeldMessage) => Math.max(graceEnd(m), m.specific ? m.next : 0);

export async function drain(spool: EdgeSpool, budget: Budget, opts: DrainOptions): Promise<DrainSummary> {
  const now = opts.now ?? Date.now;
  const started = now();
  const link = opts.link ?? 0;
  const summary: DrainSummary = { trigger: opts.trigger, link, state: "idle", delivered: 0, retried: 0, failed: 0, remaining: 0, complete: false, chained: false, subrequests: 0, r2: spool.ops };
  const done = (s: Partial<DrainSummary> = {}) => Object.assign(summary, s, { subrequests: budget.used });
  const expired = (m: HeldMessage, at: number) => expiredAt(m, at, opts.maxAgeMs);

  // Take the lock (a chained run: take it over from the previous run), and read the marker
  // before listing: its ETag makes the end's write conditional on no hold since.
  let lease: Lease | null;
  let marker: Marker | null;
  if (opts.lock !== undefined) {
    lease = await spool.renew(opts.lock, LOCK_LEASE_MS, started);
    if (!lease) return done({ state: "busy" });
    marker = await spool.marker();
  } else {
    marker = await spool.marker();
    if (opts.trigger !== "flush" && (!marker || marker.empty || (!marker.probe && marker.due > started))) return done();
    lease = await spool.lock(LOCK_LEASE_MS, started);
    if (!lease) return done({ state: "busy" });
  }
  summary.state = "ran";

  let stopped: DrainSummary["stopped"] = "done";
  let confirmed = 0;
  let attempted = 0;
  // The host is up: the run that chained this one, the live delivery or the operator says so.
  let hostUp = opts.trigger !== "cron";
  let listing: { messages: HeldMessage[]; complete: boolean } = { messages: [], complete: false };
  let handedOn = false;
  const left = new Map<string, HeldMessage>();
  try {
    const t = now();
    // An operator's flush offers everything now; other runs respect the grace and the backoffs
    // earned while the host was up.
    const isReady = (m: HeldMessage) => (opts.trigger === "flush" ? graceEnd(m) : notBefore(m)) <= t;
    // Listed until there are as many ready messages as this run could deliver (at most MAX_READY),
    // page after page while the budget still allows an attempt after the page: messages waiting
    // out a backoff of their own (a full mailbox) at the head of the queue never hide the rest.
    const enough = Math.min(MAX_READY, Math.max(1, Math.floor((budget.left - COST.end) / COST.delivery)));
    listing = await spool.held(budget.left, (soFar) => soFar.filter(isReady).length < enough && budget.affords(COST.page + WORST_ATTEMPT, COST.end));
    for (const m of listing.messages) left.set(m.id, m);

    const ready = [...left.values()].filter(isReady);
    // Not known to be up: the message due soonest goes first (the probe), and alone unless the host answers.
    const probe = hostUp ? undefined : [...ready].sort((a, b) => a.next - b.next || (a.id < b.id ? -1 : 1))[0];
    const order = probe ? [probe, ...ready.filter((m) => m !== probe)] : ready;
    for (const m of order) {
      if (stopped !== "done") break;
      if (!hostUp && attempted > 0) break;
      if (now() - started > RUN_MS - MIN_DELIVERY_MS) {
        stopped = "time";
        break;
      }
      if (!budget.affords(WORST_ATTEMPT, COST.end)) {
        stopped = "budget";
        break;
      }
      attempted++;
      try {
        const r = await attempt(spool, budget, m, opts, RUN_MS - (now() - started));
        if (r === "gone") {
          // Removed meanwhile (by hand: the lock keeps other runs away): its .retry record goes
          // too. Nothing reached the host, so this says nothing of it: not a delivery, not an
          // attempt (the next message is the probe).
          await spool.delivered(m.id);
          left.delete(m.id);
          attempted--;
          continue;
        }
        if (r.outcome === "confirmed") {
          await spool.delivered(m.id);
          left.delete(m.id);
          summary.delivered++;
          confirmed++;
          hostUp = true;
          opts.log({ event: "edge_delivered", id: m.id, from: m.from, to: m.to, size: m.size, attempts: m.attempts + 1, trigger: opts.trigger, link, reply: r.reply });
        } else if (r.outcome === "permanent") {
          await giveUp(spool, m, "refused", r.reply, opts, now());
          left.delete(m.id);
          summary.failed++;
          hostUp = true;
        } else if (expired(m, now())) {
          // Past its maximum age, and this attempt failed too: given up (Postfix's maximal_queue_lifetime).
          await giveUp(spool, m, "expired", r.reply, opts, now());
          left.delete(m.id);
          summary.failed++;
          if (r.hostAnswered) hostUp = true;
          else stopped = "host";
        } else {
          // This message's own failure: the host answered for it, or took too long with it while
          // up. It waits its backoff whoever confirms what. A tunnel's error or a refused
          // connection says the host went away: no backoff of its own, the cron's probe decides.
          const specific = r.hostAnswered === true || (hostUp && r.noAnswer === true);
          const next = now() + backoffMs(m.attempts + 1);
          await spool.retryLater(m, r.reply, next, specific, now());
          Object.assign(m, { attempts: m.attempts + 1, next, specific, lastReply: r.reply });
          summary.retried++;
          opts.log({ event: "edge_retry", id: m.id, to: m.to, attempts: m.attempts, next_attempt: new Date(next).toISOString(), trigger: opts.trigger, link, reply: r.reply });
          if (r.hostAnswered) hostUp = true;
          else stopped = "host"; // no answer from the host: it may have gone away
        }
      } catch (e) {
        // The bucket failed on this message: the next run tries again, starting elsewhere.
        opts.log({ event: "edge_spool_error", during: "drain", id: m.id, error: (e as Error).message });
        await spool.retryLater(m, `the edge spool failed: ${(e as Error).message}`, now() + backoffMs(m.attempts + 1), false, now()).catch(() => {});
        stopped = "error";
      }
    }
    // The host did not answer in this run (the probe, or a delivery once it was up): what is past
    // its maximum age is given up now, as Postfix does with mail for a destination it found dead.
    // Never before an attempt: a host back after the maximum age gets every message first.
    if (stopped === "host") {
      for (const m of [...left.values()]) {
        if (!expired(m, now())) continue;
        if (!budget.affords(COST.giveUp, COST.end) || now() - started > RUN_MS) break;
        await giveUp(spool, m, "expired", m.lastReply || m.reason, opts, now());
        left.delete(m.id);
        summary.failed++;
      }
    }
    // Everything listed was offered, but the listing did not reach the end of queue/.
    if (stopped === "done" && !listing.complete) stopped = "budget";

    // Cut short by this invocation's limits right after the host confirmed: the next run goes on at once.
    const readyLeft = !listing.complete || [...left.values()].some((m) => notBefore(m) <= now());
    if ((stopped === "budget" || stopped === "time") && confirmed > 0 && readyLeft && opts.next && link < MAX_LINKS) {
      budget.spend(); // the call through the service binding
      handedOn = true;
      summary.chained = await opts.next(lease.etag, link + 1).catch((e) => {
        opts.log({ event: "edge_spool_error", during: "chaining the drain", error: (e as Error).message });
        return false;
      });
    }
  } finally {
    summary.remaining = left.size;
    summary.complete = listing.complete;
    // The host was away for the probe: the cron probes again in a minute, whatever the backoffs.
    // A run that tried to hand the lock on leaves it to its lease: the next run may have taken it
    // over (an error says nothing of that), and the call took the subrequest the release had.
    if (!summary.chained) await end(spool, marker, handedOn ? null : lease, left, listing.complete, !hostUp && attempted > 0, now, opts);
  }
  return done({ stopped });
}

/**
 * The marker and the lock at the end of a run that did not hand them on (`lease` null: the lock
 * is left to its lease). Either write may fail
 * (or never happen, if the run is cut off): the marker then still says "held" and the lease runs
 * out; nothing depends on this for the held mail to be delivered.
 */
async function end(spool: EdgeSpool, marker: Marker | null, lease: Lease | null, left: Map<string, HeldMessage>, complete: boolean, probe: boolean, now: () => number, opts: DrainOptions): Promise<void> {
  const state: MarkerState =
    complete && left.size === 0
      ? { empty: true }
      : // Unlisted messages are due now; so are those whose only wait is a backoff earned while the host was away.
        { empty: false, due: complete ? Math.min(...[...left.values()].map(notBefore)) : 0, probe };
  try {
    await spool.settleMarker(marker, state);
  } catch (e) {
    opts.log({ event: "edge_spool_error", during: "the drain's end (the marker)", error: (e as Error).message });
  }
  if (!lease) return;
  try {
    await spool.unlock(lease, now());
  } catch (e) {
    opts.log({ event: "edge_spool_error", during: "the drain's end (the lock)", error: (e as Error).message });
  }
}

async function attempt(spool: EdgeSpool, budget: Budget, m: HeldMessage, opts: DrainOptions, timeoutMs: number): Promise<SendResult | "gone"> {
  if (m.from === "?" || m.to === "?") return { outcome: "temporary", reply: "the envelope of this message is unreadable: see the listing", hostAnswered: true };
  const o = await spool.body(m.id);
  if (!o) return "gone";
  budget.spend(); // the fetch to the host
  try {
    return await opts.send(m, o.body, crypto.randomUUID(), timeoutMs);
  } catch (e) {
    return { outcome: "temporary", reply: `the drain failed: ${(e as Error).message}` };
  }
}

/**
 * One notice, the failed/ copy, then the message leaves queue/, in this order, each step once: a
 * give-up cut off is repeated by the next run, which finds what was done. A failed/ copy means
 * the notice was written; the notice's id follows from the message's and it is written only if
 * absent. A second notice needs a cut-off between the notice and the copy and the notice
 * delivered before the repeat; nobody is ever left untold.
 */
async function giveUp(spool: EdgeSpool, m: HeldMessage, why: FailedMessage["why"], reply: string, opts: DrainOptions, at: number): Promise<void> {
  if (!(await spool.inFailed(m.id))) {
    if (m.kind !== "notice") {
      const start = await spool.head(m.id);
      const headers = await summarizeHeaders(start ?? new Uint8Array());
      const text = noticeMessage({ ...m, lastReply: reply, failed: at, why }, headers, opts.postmaster, at);
      const size = new TextEncoder().encode(text).length;
      const noticeId = await spool.hold(text, { from: "", to: opts.postmaster, size, reason: `notice about ${m.id}`, noAnswer: false, kind: "notice", noticeFor: m.id, id: noticeIdFor(m.id) }, at);
      if (noticeId) opts.log({ event: "edge_notice", id: noticeId, about: m.id, to: opts.postmaster });
    }
    await spool.copyToFailed(m, why, reply, at);
  }
  await spool.delivered(m.id);
  opts.log({ event: "edge_failed", id: m.id, from: m.from, to: m.to, size: m.size, why, attempts: m.attempts, kind: m.kind, reply });
}
