// The operator's counters, in Prometheus' text format (GET /metrics).

import { metric } from "../shared/prometheus.ts";
import type { AnswerOutcome } from "../shared/replies.ts";
import { RecentCounts } from "./recent-counts.ts";

const BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

export type Counter =
  | "received"
  | "delivered"
  | "rejected"
  | "deferred"
  | "queued"
  | "duplicates"
  | "queued_repeats"
  | "unknown_outcome"
  | "spool_delivered"
  | "spool_retried"
  | "spool_failed"
  | "spool_incomplete_discarded"
  | "spool_write_errors"
  | "delivered_log_errors";

const HELP: Record<Counter, string> = {
  received: "Messages received over HTTP (authenticated POSTs).",
  delivered: "Messages answered 200: delivered to LMTP at once.",
  rejected: "Messages refused permanently (400, 413, 415, 422).",
  deferred: "Messages answered 503 or 429 (not delivered, not spooled: the sender retries).",
  queued: "Messages written to the spool and answered 202.",
  duplicates: "Repeats of a message already delivered, answered 200 without delivering.",
  queued_repeats: "Repeats of a message already in the spool, answered 202 with its spool id instead of being taken again.",
  unknown_outcome: "LMTP transactions without an answer after the final dot (timeout, connection lost, 421): Dovecot may have saved the message (a later retry may duplicate it).",
  spool_delivered: "Spooled messages delivered by the background deliverer.",
  spool_retried: "Failed delivery attempts of spooled messages (retried later).",
  spool_failed: "Spooled messages given up on (too old, or refused permanently) and moved to failed/.",
  spool_incomplete_discarded: "Half-written spool files found at start-up (never acknowledged) and removed.",
  spool_write_errors: "Attempts to spool a message that failed (the sender got 503).",
  delivered_log_errors: "Reads and writes of the record of deliveries (delivered.sqlite) that failed; delivery goes on, a repeat may not be recognised.",
};

/** The spool's depth and age, as the queue runner knows them. */
export interface SpoolGauge {
  queued: number;
  failed: number;
  unreadable: number;
  oldestAgeSeconds: number;
}
const NO_SPOOL: SpoolGauge = { queued: 0, failed: 0, unreadable: 0, oldestAgeSeconds: 0 };

/** The counter each answer adds to besides "received"; a queued message is counted when it is spooled. */
const ANSWER_COUNTERS: Partial<Record<AnswerOutcome, Counter>> = { delivered: "delivered", duplicate: "duplicates", rejected: "rejected", deferred: "deferred" };

/** What a spam scan gave: rspamd's action, "failed" (no verdict), or "other" for an action rspamd 3.4 does not name. */
export type ScanOutcome = (typeof SCAN_OUTCOMES)[number];
const SCAN_OUTCOMES = ["no action", "greylist", "add header", "rewrite subject", "soft reject", "reject", "discard", "quarantine", "other", "failed"] as const;

/** A histogram's buckets, sum and count. */
class Histogram {
  readonly buckets = new Array<number>(BUCKETS.length).fill(0);
  sum = 0;
  count = 0;

  observe(seconds: number): void {
    this.sum += seconds;
    this.count++;
    for (let i = 0; i < BUCKETS.length; i++) if (seconds <= BUCKETS[i]!) this.buckets[i]!++;
  }

  lines(name: string, help: string): string[] {
    const out = [`# HELP ${name} ${help}`, `# TYPE ${name} histogram`];
    BUCKETS.forEach((b, i) => out.push(`${name}_bucket{le="${b}"} ${this.buckets[i]}`));
    out.push(`${name}_bucket{le="+Inf"} ${this.count}`, `${name}_sum ${this.sum.toFixed(6)}`, `${name}_count ${this.count}`);
    return out;
  }
}

export class Metrics {
  private readonly counters = new Map<Counter, number>();
  private readonly delivery = new Histogram();
  /** Spam scans (RSPAMD_URL): how many by outcome, and how long they took. */
  private readonly scans = new Map<ScanOutcome, number>();
  private readonly scanTime = new Histogram();
  /** The same counts over the last hour (the /status page). */
  private readonly recent = new RecentCounts<Counter>();

  /**
   * `spool`: the spool's depth and age when rendered (none without a spool). `spamFilter`: scans
   * are counted (RSPAMD_URL); without it the page has no spam lines at all.
   */
  constructor(
    private readonly spool: () => SpoolGauge | undefined = () => undefined,
    private readonly spamFilter = false,
  ) {}

  inc(name: Counter, by = 1): void {
    this.counters.set(name, (this.counters.get(name) ?? 0) + by);
    this.recent.add(name, by);
  }

  /** One answered inbound request (with a valid key), by what it meant for the message. */
  countAnswer(outcome: AnswerOutcome): void {
    this.inc("received");
    const counter = ANSWER_COUNTERS[outcome];
    if (counter) this.inc(counter);
  }

  get(name: Counter): number {
    return this.counters.get(name) ?? 0;
  }

  /** The count of the last sixty minutes. */
  lastHour(name: Counter, now = Date.now()): number {
    return this.recent.sum(name, now);
  }

  /** One LMTP transaction's duration. */
  observeDelivery(seconds: number): void {
    this.delivery.observe(seconds);
  }

  /** One spam scan: rspamd's action (or "failed"), and how long it took. */
  observeScan(action: string, seconds: number): void {
    const outcome = (SCAN_OUTCOMES as readonly string[]).includes(action) ? (action as ScanOutcome) : "other";
    this.scans.set(outcome, (this.scans.get(outcome) ?? 0) + 1);
    this.scanTime.observe(seconds);
  }

  scanned(outcome: ScanOutcome): number {
    return this.scans.get(outcome) ?? 0;
  }

  render(): string {
    const out: string[] = [];
    for (const name of Object.keys(HELP) as Counter[]) out.push(...metric(`relay_${name}_total`, "counter", HELP[name], this.get(name)));
    const g = this.spool() ?? NO_SPOOL;
    out.push(
      ...metric("relay_spool_messages", "gauge", "Messages in the spool waiting for delivery.", g.queued),
      ...metric("relay_spool_failed_messages", "gauge", "Messages in the spool's failed/ area.", g.failed),
      ...metric("relay_spool_unreadable_files", "gauge", "Files in the spool's queue/ or failed/ that cannot be read as spool files (left there for the operator; see `queue list`).", g.unreadable),
      ...metric("relay_spool_oldest_age_seconds", "gauge", "Age of the oldest message waiting in the spool (0 when empty).", g.oldestAgeSeconds.toFixed(3)),
      ...this.delivery.lines("relay_delivery_seconds", "Duration of LMTP transactions."),
    );
    if (this.spamFilter) {
      out.push("# HELP relay_spam_scans_total Spam scans by rspamd's action; \"failed\": no verdict (rspamd down, slow or answering nonsense), the message delivered unscanned.", "# TYPE relay_spam_scans_total counter");
      for (const o of SCAN_OUTCOMES) out.push(`relay_spam_scans_total{outcome="${o}"} ${this.scanned(o)}`);
      out.push(...this.scanTime.lines("relay_spam_scan_seconds", "Duration of spam scans (rspamd's answer, or its time limit)."));
    }
    return out.join("\n") + "\n";
  }
}
