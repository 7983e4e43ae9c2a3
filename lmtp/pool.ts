// A few LMTP connections to one server, reused (LmtpPool): how many run at once, how many of them
// one mailbox may hold, which are kept idle, and the delivery's deadline, which starts when the
// pool is asked.

import { openConnection, type LmtpConnectionOptions } from "./connection.ts";
import type { SmtpConnection } from "./smtp-connection.ts";
import type { LmtpEnvelope, MessageBody } from "./envelope.ts";
import { BodyAborted, LmtpFault } from "./faults.ts";
import type { RecipientReply } from "./replies.ts";
import type { LmtpTarget } from "./target.ts";
import { DEFAULT_TIMEOUTS, waitInLine } from "./timeouts.ts";
import { MailboxTurns } from "./turns.ts";

/** How long a readiness probe's outcome is reused (LmtpPool.check). */
const CHECK_REUSE_MS = 1_000;

type Probe = { result: Promise<string[]>; settledAt: number | null; failed: boolean };

export interface LmtpPoolOptions extends LmtpConnectionOptions {
  /** Most connections open at once; further deliveries wait for one. */
  maxConnections?: number;
  /** Most of them busy with one mailbox at once (default half of maxConnections); see MailboxTurns. */
  maxPerMailbox?: number;
  /** Idle connections kept for reuse. */
  maxIdle?: number;
  /** An idle connection older than this is closed with QUIT. */
  idleMs?: number;
}

/**
 * A few LMTP connections for reuse. At most `maxConnections` deliveries run at once (a slot
 * each), at most `maxPerMailbox` of them to any one mailbox (its share, taken before the slot:
 * a delivery waiting for its mailbox holds no slot); the rest wait their turn. A connection goes back to the idle list only after a
 * transaction that ran to its end; any fault drops it. A reused connection may have been closed
 * by the server while idle: if it fails before the server answered LHLO, RSET or MAIL, nothing
 * of the message was sent, so the delivery is tried once more on a fresh connection.
 */
export class LmtpPool {
  private readonly idle: { conn: SmtpConnection; since: number }[] = [];
  private busy = 0;
  private readonly waiting: (() => void)[] = [];
  private readonly maxConnections: number;
  private readonly shares: MailboxTurns;
  private readonly maxIdle: number;
  private readonly idleMs: number;
  private closed = false;
  private readonly sweeper: Timer;

  private readonly opts: LmtpPoolOptions;

  constructor(
    readonly target: LmtpTarget,
    opts: LmtpPoolOptions = {},
  ) {
    this.opts = { ...opts, turns: opts.turns ?? new MailboxTurns() };
    this.maxConnections = opts.maxConnections ?? 16;
    const each = opts.maxPerMailbox ?? Math.max(1, Math.ceil(this.maxConnections / 2));
    this.shares = new MailboxTurns(each, (mailbox, ms) => new LmtpFault("timeout", "connect", `no LMTP connection free for ${mailbox} within ${ms} ms (${each} of ${this.maxConnections} busy with it)`));
    this.maxIdle = opts.maxIdle ?? 8;
    this.idleMs = opts.idleMs ?? 30_000;
    this.sweeper = setInterval(() => this.sweep(), Math.max(1_000, this.idleMs / 2));
    this.sweeper.unref?.();
  }

  /**
   * One transaction on a pooled connection (LmtpConnection.deliver). `signal`: the one who asked
   * is gone once it aborts, and the final dot is not sent after that.
   */
  async deliver(envelope: LmtpEnvelope, body: MessageBody, size: number | null, signal?: AbortSignal): Promise<RecipientReply[]> {
    const deadline = performance.now() + (this.opts.timeouts?.transaction ?? DEFAULT_TIMEOUTS.transaction);
    const release = this.shares.takeNow(envelope.to) ?? (await this.shares.take(envelope.to, deadline));
    try {
      if (signal?.aborted) throw new BodyAborted("the client left before the LMTP transaction began; nothing was sent");
      return await this.withConnection(deadline, async (conn, reused) => {
        try {
          return await conn.deliver(envelope, body, size, deadline, signal);
        } catch (e) {
          const stale = reused && e instanceof LmtpFault && e.kind === "closed" && (e.phase === "lhlo" || e.phase === "rset" || e.phase === "xforward" || e.phase === "mail");
          if (!stale) throw e;
          return this.withFresh(deadline, (fresh) => fresh.deliver(envelope, body, size, deadline, signal));
        }
      });
    } finally {
      release();
    }
  }

  /**
   * Readiness: a new connection that greets, answers LHLO and NOOP. Returns the capabilities.
   * Probes must not compete with deliveries: a probe takes no delivery slot, callers at the same
   * time share one probe, and its outcome (either way) is reused for CHECK_REUSE_MS after it, so
   * a flood of /ready calls opens one connection at a time, at most a few a second. A failure is
   * forgotten as soon as a delivery has worked again.
   */
  check(): Promise<string[]> {
    const last = this.lastCheck;
    if (last && (last.settledAt === null || performance.now() - last.settledAt < CHECK_REUSE_MS)) return last.result;
    const probe: Probe = { result: this.probe(), settledAt: null, failed: false };
    probe.result.then(
      () => void (probe.settledAt = performance.now()),
      () => void ((probe.settledAt = performance.now()), (probe.failed = true)),
    );
    this.lastCheck = probe;
    return probe.result;
  }

  private lastCheck: Probe | null = null;

  private async probe(): Promise<string[]> {
    if (this.closed) throw new LmtpFault("closed", "connect", "LMTP pool is shut down");
    const conn = await openConnection(this.target, this.opts);
    try {
      await conn.noop();
      return [...conn.capabilities.keys()];
    } finally {
      await conn.quit();
    }
  }

  /** Sends QUIT on every idle connection and refuses new deliveries. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.sweeper);
    await Promise.all(this.idle.splice(0).map(({ conn }) => conn.quit()));
  }

  get stats() {
    return { busy: this.busy, idle: this.idle.length, waiting: this.waiting.length };
  }

  private async withConnection<T>(deadline: number, fn: (conn: SmtpConnection, reused: boolean) => Promise<T>): Promise<T> {
    await this.takeSlot(deadline);
    try {
      let entry = this.idle.pop(); // most recently used first: the likeliest to be alive
      while (entry && !entry.conn.reusable) {
        entry.conn.close(new Error("dropped from the idle list"));
        entry = this.idle.pop();
      }
      const conn = entry?.conn ?? (await openConnection(this.target, this.opts, deadline));
      return await this.settle(conn, () => fn(conn, entry !== undefined));
    } finally {
      this.giveSlot();
    }
  }

  private async withFresh<T>(deadline: number, fn: (conn: SmtpConnection) => Promise<T>): Promise<T> {
    const conn = await openConnection(this.target, this.opts, deadline);
    return this.settle(conn, () => fn(conn));
  }

  /**
   * Whether the server offered a capability when a connection of this pool last greeted it; null
   * before any has. The host asks it of SMTPUTF8 before it spools a non-ASCII envelope that it
   * could not deliver now: one the server does not take would sit in the spool only to fail.
   */
  offered(capability: string): boolean | null {
    return this.seen ? this.seen.has(capability) : null;
  }

  private seen: ReadonlyMap<string, string> | null = null;

  /** Runs fn on conn; afterwards the connection is kept idle if healthy, otherwise closed. */
  private async settle<T>(conn: SmtpConnection, fn: () => Promise<T>): Promise<T> {
    this.seen = conn.capabilities;
    try {
      return await fn();
    } catch (e) {
      conn.close(e as Error);
      throw e;
    } finally {
      if (!conn.reusable) conn.close(new Error("not reusable"));
      else {
        if (this.lastCheck?.failed) this.lastCheck = null; // LMTP answers again
        if (this.closed || this.idle.length >= this.maxIdle) void conn.quit();
        else this.idle.push({ conn, since: Date.now() });
      }
    }
  }

  private async takeSlot(deadline = Infinity): Promise<void> {
    if (this.closed) throw new LmtpFault("closed", "connect", "LMTP pool is shut down");
    if (this.busy < this.maxConnections) {
      this.busy++;
      return;
    }
    // The slot is handed over as is (giveSlot); a delivery whose time runs out leaves the line.
    await waitInLine(this.waiting, deadline, (ms) => new LmtpFault("timeout", "connect", `no LMTP connection free within ${ms} ms (${this.maxConnections} busy)`));
  }

  private giveSlot(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.busy--;
  }

  private sweep(): void {
    const now = Date.now();
    for (let i = this.idle.length - 1; i >= 0; i--) {
      const e = this.idle[i]!;
      if (!e.conn.reusable || now - e.since > this.idleMs) {
        this.idle.splice(i, 1);
        void e.conn.quit();
      }
    }
  }
}
