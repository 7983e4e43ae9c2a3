// The background deliverer (Postfix's qmgr): takes spooled messages to LMTP, retries temporary
// failures with exponential backoff and jitter, and gives up only after the maximum age, moving
// the message to failed/ with its last reply. Never deletes a message it has not delivered.
// What an attempt decided is kept before the disk is touched: a message delivered (or given up
// on) whose file cannot be removed (or moved) is never offered to LMTP again; only that step is
// retried, with the same backoff as any failure, so an error that repeats is never a busy loop.
// A spool file that is damaged is an incident: logged (spool_unreadable), counted (the unreadable
// gauge) and left where it is for the operator; it is never offered to LMTP, moved or removed. A
// read that fails otherwise (out of file descriptors) says nothing about the file: it is retried.

import { watch, type FSWatcher } from "node:fs";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { mailboxKey, type RecipientResult } from "../shared/contract.ts";
import { stamped, type LogWriter } from "../shared/log.ts";
import { isAccepted, isPermanent, isTemporary, noReplyResult } from "../shared/replies.ts";
import type { Metrics } from "./metrics.ts";
import { SpoolFileDamaged, freshState, type SpoolHeader, type SpoolState } from "./spool-file.ts";
import { FLUSH_REQUEST, type SpoolEntry, type Spool } from "./spool.ts";

/** Delivers spooled bytes; throws on a connection fault (temporary). */
export type SpoolDeliver = (
  envelope: { from: string; to: string[] },
  body: ReadableStream<Uint8Array>,
  size: number,
  header: SpoolHeader,
) => Promise<RecipientResult[]>;

export interface QueueRunnerOptions {
  /** Give up after this long in the spool (default 5 days). */
  maxAgeMs?: number;
  /** First retry delay; doubles with each attempt up to maxBackoffMs. */
  baseBackoffMs?: number;
  maxBackoffMs?: number;
  /** Spooled messages delivered at once. */
  concurrency?: number;
  metrics?: Metrics;
  log?: LogWriter;
}

export const FIVE_DAYS_MS = 5 * 24 * 60 * 60 * 1000;

export function backoffMs(attempts: number, base: number, cap: number, random = Math.random): number {
  const exp = Math.min(cap, base * 2 ** Math.max(0, attempts - 1));
  return Math.round(exp * (0.8 + 0.4 * random())); // +-20 %: retries of many messages spread out
}

/** What becomes of a spooled message after an attempt. */
export type Next =
  | { then: "delivered" }
  | { then: "retry"; state: SpoolState; reply: string; /** Replies of recipients refused for good in this attempt. */ refusedNow: string[] }
  | { then: "give up"; state: SpoolState; reason: string };

/**
 * An attempt's results for the recipients `to`: retried while any is temporary (or had no reply),
 * then given up on for those refused for good (now or earlier), else delivered.
 */
export function afterAttempt(state: SpoolState, to: string[], results: RecipientResult[]): Next {
  // No reply confirms nothing: a recipient without one is still to do.
  const answered = new Set(results.map((r) => r.address));
  const unanswered = to.filter((a) => !answered.has(a)).map(noReplyResult);
  const temporary = [...results.filter(isTemporary), ...unanswered];
  const permanent = results.filter(isPermanent);
  // Refused for good while others wait: remembered, so the message ends in failed/ for them
  // (with Dovecot's reason) instead of the refusal vanishing when the others are delivered.
  const refused = [...(state.refused ?? []), ...permanent.map((r) => ({ address: r.address, reply: r.reply }))];
  if (temporary.length) {
    const remaining = temporary.map((r) => r.address);
    return { then: "retry", state: { ...state, remaining, refused: refused.length ? refused : undefined }, reply: temporary.map((r) => r.reply).join("; "), refusedNow: permanent.map((r) => r.reply) };
  }
  if (refused.length) return { then: "give up", state: { ...state, remaining: refused.map((r) => r.address), refused }, reason: `refused: ${refused.map((r) => r.reply).join("; ")}` };
  return { then: "delivered" };
}

/** Past the maximum age: given up on for every recipient not delivered, those refused earlier included. */
export function expired(state: SpoolState, ageMs: number): Next {
  const refused = state.refused ?? [];
  return {
    then: "give up",
    state: { ...state, remaining: [...state.remaining, ...refused.map((r) => r.address)] },
    reason:
      `expired after ${Math.round(ageMs / 3_600_000)} h in the spool; last reply: ${state.last_reply ?? "none"}` +
      (refused.length ? `; refused earlier: ${refused.map((r) => r.reply).join("; ")}` : ""),
  };
}

export class QueueRunner {
  private readonly entries = new Map<string, SpoolEntry>();
  /** Queued messages by the SHA-256 of their bytes, for the receiving side's repeat check (queuedAs). */
  private readonly byDigest = new Map<string, Set<string>>();
  /**
   * What an attempt decided that is still to be carried out on disk (removal from queue/, or the
   * move to failed/): the next attempt only carries it out again, LMTP is not asked twice.
   */
  private readonly decided = new Map<string, End>();
  private readonly running = new Set<string>();
  private readonly inFlight = new Set<Promise<void>>();
  /** Made due by kick() and not attempted since. */
  private readonly hurried = new Set<string>();
  /**
   * Whose last attempt was a hurried one, and failed: kick() leaves them to their backoff until
   * an attempt on their own schedule. A message that fails for a reason of its own (a full
   * mailbox, 452 4.2.2) was otherwise made due by every live delivery to another mailbox, and sent
   * again with each of them.
   */
  private readonly hurriedInVain = new Set<string>();
  /** State files being written by add(): an attempt waits for its message's, so that removing
   * a delivered message cannot race with (and be undone by) the first state write. */
  private readonly saving = new Map<string, Promise<void>>();
  private timer: Timer | null = null;
  /** The next look at queue/ after files in it could not be read (rescanAfter: how long until then). */
  private rescanTimer: Timer | null = null;
  private rescanAfter = 0;
  private firstScan: Promise<void> = Promise.resolve();
  private watcher: FSWatcher | null = null;
  private stopped = false;
  private failedCount = 0;
  /** "queue/<name>" or "failed/<name>" -> why it cannot be read, as of the last look. */
  private unreadable = new Map<string, string>();
  private readonly maxAgeMs: number;
  private readonly base: number;
  private readonly cap: number;
  private readonly concurrency: number;
  private readonly log: LogWriter;

  constructor(
    private readonly spool: Spool,
    private readonly deliver: SpoolDeliver,
    private readonly opts: QueueRunnerOptions = {},
  ) {
    this.maxAgeMs = opts.maxAgeMs ?? FIVE_DAYS_MS;
    this.base = opts.baseBackoffMs ?? 2_000;
    this.cap = opts.maxBackoffMs ?? 5 * 60_000;
    this.concurrency = opts.concurrency ?? 4;
    this.log = opts.log ? stamped(opts.log) : () => {};
  }

  /** Loads what the spool holds (left by a crash or a restart) and delivers it at once. */
  async start(): Promise<void> {
    this.firstScan = this.loadQueue();
    await this.firstScan;
    // `queue flush` / `queue retry` from the CLI drop a file here.
    this.watcher = watch(this.spool.dir, (_event, name) => {
      if (name === FLUSH_REQUEST) void this.flush();
    });
    this.watcher.unref?.();
  }

  /** Resolves once what was on disk at start() is known (size and stats() count it from then on). */
  scanned(): Promise<void> {
    return this.firstScan;
  }

  private async loadQueue(): Promise<void> {
    // A spool that cannot be listed now (queue/ gone or unreadable) must not stop the host: new
    // messages still get their own answers (503 when they cannot be spooled), and the next flush
    // or restart looks again. The error is logged, never thrown unhandled.
    try {
      const found = await this.rescan();
      if (found) this.log({ event: "spool_recovered", messages: found });
    } catch (e) {
      this.log({ event: "spool_error", error: `cannot list the spool: ${(e as Error).message}` });
    }
  }

  /** Picks up messages put back by the operator and makes everything due now. */
  async flush(): Promise<void> {
    try {
      await rm(join(this.spool.dir, FLUSH_REQUEST), { force: true });
      await this.rescan();
    } catch (e) {
      this.log({ event: "spool_error", error: `cannot list the spool: ${(e as Error).message}` });
    }
    for (const e of this.entries.values()) if (!this.running.has(e.header.id)) e.state.next_at = 0;
    this.log({ event: "spool_flush", messages: this.entries.size });
    this.schedule();
  }

  /** Loads what the spool holds that this process does not know of yet (left by a crash, or retried by the operator): due at once. */
  private async rescan(): Promise<number> {
    let found = 0;
    const queue = await this.spool.scan("queue");
    for (const e of queue.entries) {
      if (this.entries.has(e.header.id)) continue;
      this.track({ ...e, state: { ...e.state, next_at: 0 } });
      found++;
    }
    const failed = await this.spool.scan("failed");
    this.failedCount = failed.entries.length + failed.unreadable.length + failed.notReadNow.length;
    this.unreadable.clear();
    for (const u of queue.unreadable) this.noteUnreadable(`queue/${u.name}`, u.problem);
    for (const u of failed.unreadable) this.noteUnreadable(`failed/${u.name}`, u.problem, u.reason);
    // Not damaged, only not readable now (out of file descriptors): looked at again, later.
    for (const u of queue.notReadNow) this.log({ event: "spool_read_error", file: `queue/${u.name}`, error: u.problem });
    if (queue.notReadNow.length) this.rescanLater();
    else this.rescanAfter = 0;
    this.schedule();
    return found;
  }

  private rescanLater(): void {
    if (this.stopped || this.rescanTimer) return;
    this.rescanAfter = Math.min(this.cap, Math.max(this.base, this.rescanAfter * 2));
    this.rescanTimer = setTimeout(() => {
      this.rescanTimer = null;
      this.rescan().catch((e) => this.log({ event: "spool_error", error: `cannot list the spool: ${(e as Error).message}` }));
    }, this.rescanAfter);
    this.rescanTimer.unref?.();
  }

  private noteUnreadable(file: string, problem: string, reason?: string): void {
    this.unreadable.set(file, problem);
    this.log({ event: "spool_unreadable", file, problem, ...(reason ? { reason } : {}) });
  }

  /** A message just spooled by the receiving side. */
  add(header: SpoolHeader, firstReply: string | null): void {
    const state = { ...freshState(header.to), attempts: 1, next_at: Date.now() + backoffMs(1, this.base, this.cap), last_reply: firstReply };
    this.track({ header, state });
    const saved = this.spool
      .saveState(header.id, state)
      .catch(() => {})
      .finally(() => {
        if (this.saving.get(header.id) === saved) this.saving.delete(header.id);
      });
    this.saving.set(header.id, saved);
    this.schedule();
  }

  /**
   * The id of a queued message with these bytes (SHA-256) still to be delivered to this
   * recipient, or null: a repeat of it is answered with that id instead of being taken again.
   */
  queuedAs(sha256: string, recipient: string): string | null {
    const mailbox = mailboxKey(recipient);
    for (const id of this.byDigest.get(sha256) ?? []) {
      const e = this.entries.get(id);
      if (!e || this.decided.has(id)) continue;
      if (toDo(e).some((a) => mailboxKey(a) === mailbox)) return id;
    }
    return null;
  }

  /**
   * LMTP works again: everything waiting for it is due now, once per backoff (not what waits for
   * the disk, nor what failed again when it was last hurried: see hurriedInVain).
   */
  kick(): void {
    if (this.stopped) return;
    let any = false;
    for (const e of this.entries.values()) {
      const id = e.header.id;
      if (e.state.next_at > Date.now() && !this.running.has(id) && !this.decided.has(id) && !this.hurriedInVain.has(id)) {
        e.state.next_at = 0;
        this.hurried.add(id);
        any = true;
      }
    }
    if (any) this.schedule();
  }

  get size(): number {
    return this.entries.size;
  }

  stats() {
    let oldest = Infinity;
    for (const e of this.entries.values()) oldest = Math.min(oldest, e.header.received_at);
    return {
      queued: this.entries.size,
      failed: this.failedCount,
      unreadable: this.unreadable.size,
      oldestAgeSeconds: oldest === Infinity ? 0 : (Date.now() - oldest) / 1000,
    };
  }

  /** Stops starting attempts and waits for the ones under way (they end within LMTP's timeouts). */
  async stop(): Promise<void> {
    this.stopped = true;
    this.watcher?.close();
    if (this.timer) clearTimeout(this.timer);
    if (this.rescanTimer) clearTimeout(this.rescanTimer);
    await Promise.allSettled([...this.inFlight]);
  }

  /** Resolves when the spool is empty (tests, `queue flush`). */
  async drained(pollMs = 50): Promise<void> {
    while (this.entries.size > 0) await Bun.sleep(pollMs);
  }

  private track(entry: SpoolEntry): void {
    this.entries.set(entry.header.id, entry);
    const digest = entry.header.sha256;
    if (!digest) return;
    const ids = this.byDigest.get(digest) ?? new Set<string>();
    ids.add(entry.header.id);
    this.byDigest.set(digest, ids);
  }

  private forget(id: string): void {
    const digest = this.entries.get(id)?.header.sha256;
    this.entries.delete(id);
    this.decided.delete(id);
    this.hurried.delete(id);
    this.hurriedInVain.delete(id);
    const ids = digest ? this.byDigest.get(digest) : undefined;
    ids?.delete(id);
    if (ids?.size === 0) this.byDigest.delete(digest!);
  }

  private schedule(): void {
    if (this.stopped) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const now = Date.now();
    let next = Infinity;
    for (const e of this.entries.values()) {
      if (this.running.has(e.header.id)) continue;
      if (e.state.next_at <= now && this.running.size < this.concurrency) this.begin(e);
      else next = Math.min(next, e.state.next_at);
    }
    if (next !== Infinity) {
      this.timer = setTimeout(() => this.schedule(), Math.max(10, next - now));
      this.timer.unref?.();
    }
  }

  private begin(entry: SpoolEntry): void {
    const id = entry.header.id;
    this.running.add(id);
    const p = this.attempt(entry)
      .catch((e) => {
        this.log({ event: "spool_error", id, error: (e as Error).message });
        // Counted, and not due again at once: an error that repeats must not become a busy loop.
        const cur = this.entries.get(id);
        if (cur) {
          const attempts = cur.state.attempts + 1;
          cur.state = { ...cur.state, attempts, next_at: Date.now() + backoffMs(attempts, this.base, this.cap) };
        }
      })
      .finally(() => {
        this.running.delete(id);
        this.inFlight.delete(p);
        this.schedule();
      });
    this.inFlight.add(p);
  }

  private async attempt(entry: SpoolEntry): Promise<void> {
    const { header } = entry;
    const id = header.id;
    await this.saving.get(id);
    const decided = this.decided.get(id);
    if (decided) return this.carryOut(header, decided);
    let body: ReadableStream<Uint8Array>;
    try {
      body = await this.spool.body(id);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") {
        // Removed behind our back (by hand, or a stale entry of a message delivered meanwhile).
        this.forget(id);
        this.log({ event: "spool_vanished", id });
        return;
      }
      if (!(e instanceof SpoolFileDamaged)) {
        // Out of file descriptors, an I/O error: nothing is known to be wrong with the file.
        this.log({ event: "spool_read_error", id, error: (e as Error).message });
        return this.retryLater(id, entry.state, `the spool file could not be read: ${(e as Error).message}`);
      }
      // Damaged on disk: retrying cannot help, and its bytes are not what was acknowledged.
      // Left in queue/ for the operator (`queue list` shows it); read again at the next flush.
      this.forget(id);
      this.noteUnreadable(`queue/${id}`, e.message, `last reply: ${entry.state.last_reply ?? "none"}`);
      return;
    }
    const { state } = entry;
    const age = Date.now() - header.received_at;
    if (age > this.maxAgeMs) {
      await body.cancel().catch(() => {});
      return this.settle(header, state, expired(state, age));
    }
    const to = toDo(entry);
    let results: RecipientResult[];
    try {
      results = await this.deliver({ from: header.from, to }, body, header.size, header);
    } catch (e) {
      return this.retryLater(id, state, (e as Error).message);
    }
    // LMTP took something just now (not a delivery already on record): it works, the rest may go.
    if (results.some((r) => isAccepted(r) && !r.duplicate)) this.kick();
    return this.settle(header, state, afterAttempt(state, to, results));
  }

  /** What afterAttempt() or expired() decided: a retry is scheduled; an end is kept, then carried out. */
  private async settle(header: SpoolHeader, state: SpoolState, next: Next): Promise<void> {
    const id = header.id;
    if (next.then === "retry") {
      if (next.refusedNow.length) this.log({ event: "spool_refused", id, refused: next.refusedNow });
      return this.retryLater(id, next.state, next.reply);
    }
    this.decided.set(id, next);
    if (next.then === "delivered") {
      this.opts.metrics?.inc("spool_delivered");
      this.log({ event: "spool_delivered", id, request_id: header.request_id, to: header.to, attempts: state.attempts + 1, queued_ms: Date.now() - header.received_at });
    }
    return this.carryOut(header, next);
  }

  /** Removes a delivered message from queue/, or moves one given up on to failed/. */
  private async carryOut(header: SpoolHeader, end: End): Promise<void> {
    const id = header.id;
    try {
      if (end.then === "give up") await this.spool.moveToFailed(id, end.reason, end.state);
      else await this.spool.remove(id);
    } catch (e) {
      const what = end.then === "give up" ? "given up on, but not moved to failed/" : "delivered, but not removed from queue/";
      throw new Error(`${what} (tried again later, never delivered again): ${(e as Error).message}`);
    }
    this.forget(id);
    if (end.then === "give up") {
      this.failedCount++;
      this.opts.metrics?.inc("spool_failed");
      this.log({ event: "spool_failed", id, reason: end.reason });
    }
  }

  private async retryLater(id: string, state: SpoolState, reply: string): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    if (this.hurried.delete(id)) this.hurriedInVain.add(id);
    else this.hurriedInVain.delete(id);
    const attempts = state.attempts + 1;
    const next = { ...state, attempts, last_reply: reply, next_at: Date.now() + backoffMs(attempts, this.base, this.cap) };
    entry.state = next;
    this.opts.metrics?.inc("spool_retried");
    await this.spool.saveState(id, next).catch(() => {});
    this.log({ event: "spool_retry", id, attempts, next_in_ms: next.next_at - Date.now(), reply });
  }
}

/** An attempt's decision that ends the message's time in queue/. */
type End = Exclude<Next, { then: "retry" }>;

/** The recipients a queued message is still to be delivered to. */
function toDo({ header, state }: SpoolEntry): string[] {
  return state.remaining.length ? state.remaining : header.to;
}
